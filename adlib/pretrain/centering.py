"""Centering pre-training (Kobayashi & Hashimoto): pull the target's normal features together.

A pretrained backbone is fine-tuned on the target category's normal training images with

    L = L_class + lambda * L_center,    L_center = mean_i || f(x_i) - mean_j f(x_j) ||_2

over each mini-batch, where ``f`` is what PaDiM models. By default ``f`` is the per-position patch
feature (the stride 4, 8 and 16 stages on the stride-4 grid, PaDiM's embedding before its channel
subset), so ``L_center`` averages the distance of every patch to the batch mean *at its position*;
``form="pooled"`` uses the globally averaged vector instead (the ablation).

``L_class`` keeps the network a good ImageNet classifier so that the features cannot collapse to a
point. The paper trains on ImageNet's labels, which are not on these machines; the default here is
knowledge distillation from the frozen original network on the same batch,
``KL(p_original || p_finetuned)`` over the 1000 classes (EfficientNet-Lite ships its ImageNet
head). With ``labelled=`` an ImageFolder of ImageNet classes (ImageNet itself, Imagenette) the
cross-entropy on its labels is used instead.

Batch norms stay in eval mode (their ImageNet statistics), and only the blocks up to the deepest
stride ``f`` reads are trained: the stride-32 blocks and the classifier stay frozen, so
``L_class`` measures how far the trained features drift from what the fixed classifier reads.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbones import (DEFAULT_BACKBONE, EfficientNetLite, FineTunedBackbone, concat_stages, save_backbone,
                         stage_features_and_logits)
from ..train import History, TrainConfig, train
from .record import run_record

__all__ = ["CenteringRecipe", "CenteringNet", "CenteringRun", "center_loss", "pretrain_centering"]

FORMS = ("per_position", "pooled")


@dataclass
class CenteringRecipe:
    """The recipe's hyper-parameters; all of them are stored in the backbone file's metadata."""

    backbone: str = DEFAULT_BACKBONE   # an EfficientNet-Lite or torchvision architecture, ImageNet weights
    lambda_center: float = 0.1
    class_weight: float = 1.0          # weight of L_class; 0 lets L_center act alone (the collapse)
    form: str = "per_position"         # "per_position" (PaDiM's patches) or "pooled" (one vector per image)
    strides: tuple[int, ...] = (4, 8, 16)
    epochs: int = 8
    batch_size: int = 16
    lr: float = 1e-4
    seed: int = 0
    labelled: str | None = None        # ImageFolder of ImageNet classes for L_class; None = distillation

    def __post_init__(self) -> None:
        self.strides = tuple(sorted(self.strides))
        if self.form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {self.form!r}")
        if self.lambda_center < 0 or self.class_weight < 0:
            raise ValueError(f"lambda_center and class_weight must be >= 0, got {self.lambda_center}, "
                             f"{self.class_weight}")
        if self.batch_size < 2:
            raise ValueError(f"a batch mean needs batch_size >= 2, got {self.batch_size}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}")


class CenteringNet(nn.Module):
    """The network being fine-tuned (``student``) beside a frozen copy of the original (``teacher``).

    ``forward(images)`` takes ImageNet-normalized ``(B, 3, H, W)`` and returns the embedding
    ``f`` ``(B, C, H/4, W/4)`` (stages concatenated on the finest grid, nearest resizing as in
    PaDiM), the student's logits ``(B, 1000)`` and the teacher's ``(B, 1000)``.
    """

    def __init__(self, architecture: str = DEFAULT_BACKBONE, strides: tuple[int, ...] = (4, 8, 16)):
        super().__init__()
        self.architecture = architecture
        self.strides = tuple(sorted(strides))
        self.student = FineTunedBackbone.for_architecture(architecture, self.strides)
        self.teacher = copy.deepcopy(self.student.net).requires_grad_(False).eval()

    def train(self, mode: bool = True) -> "CenteringNet":
        """The student's batch norms stay in eval mode (ImageNet statistics); the teacher is never trained."""
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = self.student.net_input(images)
        feats, logits = stage_features_and_logits(self.student.net, x, self.strides)
        grid = tuple(feats[min(self.strides)].shape[-2:])
        with torch.no_grad():
            teacher_logits = self.teacher(x) if isinstance(self.teacher, EfficientNetLite) else \
                stage_features_and_logits(self.teacher, x, self.strides)[1]
        return concat_stages(feats, grid, mode="nearest"), logits, teacher_logits


def center_loss(embedding: Tensor, form: str = "per_position") -> Tensor:
    """``L_center`` of one batch of embeddings ``(B, C, h, w)``: the mean L2 distance to the batch mean,
    per position (``per_position``: over all ``B * h * w`` patches) or of the pooled vectors (``pooled``)."""
    if embedding.shape[0] < 2:
        raise ValueError("L_center needs at least 2 images in a batch")
    if form == "pooled":
        embedding = embedding.mean(dim=(2, 3))
    centred = embedding - embedding.mean(dim=0, keepdim=True)
    return centred.norm(dim=1).mean()


def distillation_loss(logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """``KL(p_teacher || p_student)`` over the classes of ``(B, K)`` logits, averaged over the batch.

    Its gradient with respect to the student's logits is ``(p_student - p_teacher) / B``; the
    loss is written so that autograd returns exactly that, and so exactly zero when the two
    networks agree. Through ``log_softmax`` and ``kl_div`` the same gradient comes out as rounding
    noise of about 1e-8, and Adam, which divides each gradient by its own running magnitude, turns
    noise into full-size steps: with lambda = 0 the weights would drift instead of staying put.
    """
    logits, teacher_logits = logits.float(), teacher_logits.float()
    with torch.no_grad():
        log_p_teacher = F.log_softmax(teacher_logits, 1)
        value = F.kl_div(F.log_softmax(logits, 1), log_p_teacher, log_target=True, reduction="batchmean")
        grad = (F.softmax(logits, 1) - F.softmax(teacher_logits, 1)) / len(logits)   # one function on both sides
    surrogate = (grad * logits).sum()           # d surrogate / d logits = grad, exactly
    return value + surrogate - surrogate.detach()


class _LabelledImages:
    """Random labelled batches from an ImageFolder of ImageNet classes (draws from torch's global RNG,
    which the training loop seeds and checkpoints, so a resumed run draws the same batches)."""

    def __init__(self, root: str, image_size: int, batch_size: int):
        from torchvision import datasets, transforms

        from ..data import IMAGENET_MEAN, IMAGENET_STD

        try:
            from timm.data import ImageNetInfo
        except ImportError as err:
            raise ImportError("mapping an ImageFolder's class folders to ImageNet's 1000 classes uses timm's "
                              "synset list: pip install timm") from err
        synsets = {s: i for i, s in enumerate(ImageNetInfo().label_names())}
        tf = transforms.Compose([transforms.Resize(image_size), transforms.CenterCrop(image_size),
                                 transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        self.folder = datasets.ImageFolder(root, transform=tf)
        unknown = [c for c in self.folder.classes if c not in synsets]
        if unknown:
            raise ValueError(f"{root}: class folders must be ImageNet synsets (e.g. n01440764), found {unknown[:3]}")
        self.to_imagenet = torch.tensor([synsets[c] for c in self.folder.classes])
        self.batch_size = batch_size

    def sample(self, device: torch.device) -> tuple[Tensor, Tensor]:
        idx = torch.randint(len(self.folder), (self.batch_size,))
        images, labels = zip(*(self.folder[int(i)] for i in idx))
        return torch.stack(images).to(device), self.to_imagenet[torch.tensor(labels)].to(device)


@dataclass
class CenteringRun:
    """What :func:`pretrain_centering` returns: the trained net, the loss record and the time."""

    net: CenteringNet
    recipe: CenteringRecipe
    history: History
    seconds: float
    train_images: int
    world_size: int = 1     # processes: each took its batch mean over its own batch_size images

    def save(self, path: str | Path, **extra: Any) -> str:
        """Write the fine-tuned backbone (student) as a backbone file; returns its SHA-256. ``extra``
        goes into the recipe metadata (e.g. the category it was trained on)."""
        recipe = run_record("centering", self.recipe, self.history, self.train_images, self.seconds,
                            self.world_size, **extra)
        return save_backbone(self.net.student.net, path, self.net.architecture, recipe)


def pretrain_centering(images: Tensor, recipe: CenteringRecipe = CenteringRecipe(), *,
                       device: str | torch.device | None = None, checkpoint_dir: str | Path | None = None,
                       checkpoint_every: int = 0, resume: bool = False, stop_after_steps: int | None = None,
                       progress: bool = True, data_name: str | None = None) -> CenteringRun:
    """Fine-tune ``recipe.backbone`` on the target's normal images ``(N, 3, H, W)`` (ImageNet-normalized).

    Runs on :func:`adlib.train.train` (checkpoints, resume, DDP under ``torchrun``). The per-step
    record holds ``loss``, ``l_class`` and ``l_center``. Under ``torchrun`` each process takes its
    batch mean over its own ``batch_size`` images (the file records ``world_size``). A resume
    refuses a checkpoint of another recipe, image size or ``data_name``.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, H, W), got {tuple(images.shape)}")
    if len(images) < 2:
        raise ValueError(f"centering needs at least 2 normal images, got {len(images)}")
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN or infinite values")
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):   # the copy is deterministic anyway; keep global RNG untouched
        net = CenteringNet(recipe.backbone, recipe.strides)
    labelled = None
    if recipe.labelled is not None:
        labelled = _LabelledImages(recipe.labelled, images.shape[-1], recipe.batch_size)

    def loss_fn(model: nn.Module, batch: Tensor) -> dict[str, Tensor]:
        if labelled is None:
            embedding, logits, teacher_logits = model(batch)
            l_class = distillation_loss(logits, teacher_logits)
        else:   # one forward over both (DDP expects one forward per backward)
            extra, labels = labelled.sample(batch.device)
            embedding, logits, _ = model(torch.cat([batch, extra]))
            embedding, logits = embedding[: len(batch)], logits[len(batch):]
            l_class = F.cross_entropy(logits.float(), labels)
        l_center = center_loss(embedding.float(), recipe.form)
        loss = recipe.class_weight * l_class + recipe.lambda_center * l_center
        return {"loss": loss, "l_class": l_class.detach(), "l_center": l_center.detach()}

    config = TrainConfig(epochs=recipe.epochs, batch_size=recipe.batch_size, lr=recipe.lr, schedule="cosine",
                         seed=recipe.seed, device=device, min_batch=2, checkpoint_dir=checkpoint_dir,
                         checkpoint_every=checkpoint_every, resume=resume, stop_after_steps=stop_after_steps,
                         desc=f"centering (lambda={recipe.lambda_center:g}, {recipe.form})", progress=progress)
    fingerprint = {"recipe": dataclasses.asdict(recipe), "image_shape": list(images.shape[1:]), "data": data_name}
    history = train(net, loss_fn, images, config, fingerprint=fingerprint)
    return CenteringRun(net.to("cpu").eval(), recipe, history, time.perf_counter() - start, len(images),
                        history.world_size)
