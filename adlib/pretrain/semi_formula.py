"""Semi-formula-driven pre-training (Kobayashi, Murakami, Hiramatsu, Suzuki, Hashimoto, BMVC 2024).

ImageNet features are trained to tell a dog from a cat, not a flawless surface from one with a faint
smudge: (a) they need not separate subtle local differences, and (b) nothing orders their distances
by how anomalous a difference is. The recipe pre-trains on a stream of *semi-formula-driven*
anomalies: a real normal image of the target plus a random 2-D Gaussian mixture
(:func:`adlib.kernels.gmm_blobs`), with its exact mask and an anomaly score from the mixture's
parameters; none is ever stored. Two losses on the patch features ``f`` of the pair
``(x, x~ = x + blobs)``, per stage ``s`` of the feature pyramid PaDiM reads, with
``d_p = ||f(x~)_p - f(x)_p|| / rms_q ||f(x)_q||`` the change of patch ``p`` relative to the
batch's typical feature norm:

- (a) separation: ``L_sep = mean_{p in blob} relu(margin - d_p)^2 + mean_{p far from blobs} d_p^2``;
  a patch is in the blob when the mask covers at least half of it, far when no mask pixel lies in
  it or its 8 neighbours (patches in between are left alone: their receptive field sees the blob);
- (b) ranking: ``D_i = mean_p d_p`` is image ``i``'s total feature change;
  ``L_rank = mean_{i, j: s_i > s_j} softplus(-(log D_i - log D_j) / tau)``, RankNet's pairwise
  logistic loss: ``D`` ordered as the blobs' scores ``s`` are.

``L = L_sep + L_rank`` (or one of them, for the ablation), averaged over the stages. Batch norms
keep their ImageNet statistics when starting from ImageNet (from scratch they train), and only
the blocks up to the deepest stage are trained.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbones import (DEFAULT_BACKBONE, FineTunedBackbone, batch_norms, build_architecture, input_affine,
                         save_backbone, trainable_prefix)
from ..data import denormalize, normalize
from ..kernels import gmm_blobs
from ..settings import default_device
from ..train import History, StepStream, TrainConfig, train
from .record import run_record

__all__ = ["SemiFormulaRecipe", "SemiFormulaStream", "SemiFormulaNet", "SemiFormulaRun", "pretrain_semi_formula",
           "patch_changes", "separation_loss", "ranking_loss", "semi_formula_losses", "stream_rate", "probe",
           "LOSSES", "INITS"]

LOSSES = ("both", "separation", "ranking")
INITS = ("imagenet", "scratch")


@dataclass
class SemiFormulaRecipe:
    """The recipe: the blob distribution, the losses and the optimization (all stored in the file).

    Blob parameters (each drawn independently per component, uniform on the range given):
    ``components`` how many Gaussians per image (integers, inclusive); ``centre`` y and x as
    fractions of the side; ``sigma`` the y and x standard deviations as fractions of the side (the y
    one sets the vertical size); ``rotation`` radians; ``amplitude`` the peak change in intensity
    units of a [0, 1] image, with a random sign when ``signs="both"``; ``colour`` per-channel
    weights in [0.5, 1] (``"random"``) or 1 (``"gray"``); blobs are cut at ``mask_level`` sigma.
    """

    backbone: str = DEFAULT_BACKBONE
    init: str = "imagenet"                 # "imagenet" weights or "scratch" (random initialization)
    losses: str = "both"                   # "both", "separation" (a) or "ranking" (b)
    margin: float = 1.0                    # separation: relative change wanted inside a blob
    tau: float = 0.1                       # ranking: temperature of the pairwise logistic loss
    strides: tuple[int, ...] = (4, 8, 16)
    images: int = 1_000_000                # anomalous images streamed (all processes together)
    batch_size: int = 8                    # pairs (normal, anomalous) per step and process
    lr: float = 1e-4
    seed: int = 0
    components: tuple[int, int] = (1, 3)
    centre: tuple[float, float] = (0.1, 0.9)
    sigma: tuple[float, float] = (0.01, 0.08)
    rotation: tuple[float, float] = (0.0, math.pi)
    amplitude: tuple[float, float] = (0.05, 0.5)
    signs: str = "both"
    colour: str = "random"
    mask_level: float = 2.0

    def __post_init__(self) -> None:
        self.strides = tuple(sorted(self.strides))
        for name in ("components", "centre", "sigma", "rotation", "amplitude"):
            setattr(self, name, tuple(getattr(self, name)))
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.losses not in LOSSES:
            raise ValueError(f"losses must be one of {LOSSES}, got {self.losses!r}")
        if self.batch_size < 2:
            raise ValueError(f"the ranking loss compares images of a batch: batch_size >= 2, got {self.batch_size}")
        if self.images < 1 or self.margin <= 0 or self.tau <= 0:
            raise ValueError(f"need images >= 1, margin > 0, tau > 0; got {self.images}, {self.margin}, {self.tau}")
        if not (0 < self.sigma[0] <= self.sigma[1]) or self.mask_level <= 0:
            raise ValueError(f"need 0 < sigma min <= max and mask_level > 0; got {self.sigma}, {self.mask_level}")
        if not (1 <= self.components[0] <= self.components[1]):
            raise ValueError(f"components must be (min, max) with 1 <= min <= max, got {self.components}")

    def blob_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`adlib.kernels.gmm_blobs` this recipe draws with."""
        return dict(n_components=self.components, centre=self.centre, sigma=self.sigma, rotation=self.rotation,
                    amplitude=self.amplitude, signs=self.signs, colour=self.colour, mask_level=self.mask_level)


# ---------------------------------------------------------------------------------------------
# The stream: anomalies made on the training device from (seed, sample number), never stored
# ---------------------------------------------------------------------------------------------

def _mix(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 steps): nearby inputs give unrelated seeds."""
    z = 0x9E3779B97F4A7C15
    for v in values:
        z = (z ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        z ^= z >> 31
    return z >> 1


class SemiFormulaStream(StepStream):
    """``images`` anomalous images made from the normal ones, in batches, one per optimizer step.

    Sample ``i`` (a global number: batch ``g = (epoch * steps + step) * world + rank`` holds samples
    ``g * batch_size ... + batch_size - 1``) pairs normal image ``perm_k[i mod N]`` (``k = i div N``,
    ``perm_k`` a permutation drawn from ``(seed, k)``: each normal image once per pass) with blobs
    drawn from a generator seeded by ``(seed, g)``. So no two processes or workers ever make the
    same sample, and a batch is the same whoever makes it and whenever.

    Args:
        normals: the target's normal images ``(N, 3, H, W)``, ImageNet-normalized (as
            :func:`adlib.data.load_split` gives them); kept on ``device`` in [0, 1] intensities.
        recipe: the blob distribution, ``images`` and ``batch_size``.
        device: where the blobs are made (the training device).

    A batch is a dict: ``normal`` and ``anomalous`` ``(B, 3, H, W)`` ImageNet-normalized, ``mask``
    ``(B, 1, H, W)`` in {0, 1} (exactly the changed pixels), ``score`` ``(B,)``, ``peak`` ``(B,)``
    the largest component amplitude ``|a_k|``, ``index`` ``(B,)`` the samples' global numbers.
    """

    def __init__(self, normals: Tensor, recipe: SemiFormulaRecipe, device: str | torch.device | None = None):
        if normals.ndim != 4 or normals.shape[1] != 3 or len(normals) == 0:
            raise ValueError(f"normal images must be (N, 3, H, W) with N >= 1, got {tuple(normals.shape)}")
        if not torch.isfinite(normals).all():
            raise ValueError("normal images contain NaN or infinite values")
        self.device = default_device(device)
        self.recipe = recipe
        self.batch_size = recipe.batch_size
        self.normals = denormalize(normals.to(self.device, torch.float32), clamp=False).contiguous()
        self._perms: dict[int, Tensor] = {}

    def steps_per_epoch(self, world: int) -> int:
        return self.recipe.images // (self.batch_size * world)

    def _normal_indices(self, samples: Tensor) -> Tensor:
        n = len(self.normals)
        passes, slots = samples // n, samples % n
        out = torch.empty_like(samples)
        for k in passes.unique().tolist():
            if k not in self._perms:
                if len(self._perms) > 4:
                    self._perms.clear()
                self._perms[k] = torch.randperm(n, generator=torch.Generator().manual_seed(_mix(self.recipe.seed, 1, k)))
            which = passes == k
            out[which] = self._perms[k][slots[which]]
        return out

    def batch(self, epoch: int, step: int, rank: int = 0, world: int = 1) -> dict[str, Tensor]:
        global_batch = (epoch * self.steps_per_epoch(world) + step) * world + rank
        return self.samples(global_batch)

    def samples(self, global_batch: int) -> dict[str, Tensor]:
        """Global batch number ``global_batch`` of the stream (see the class docstring)."""
        index = global_batch * self.batch_size + torch.arange(self.batch_size)
        normal = self.normals[self._normal_indices(index).to(self.device)]
        generator = torch.Generator(device=self.device).manual_seed(_mix(self.recipe.seed, 2, global_batch))
        anomalous, mask, params, score = gmm_blobs(normal, generator=generator, **self.recipe.blob_kwargs())
        return {"normal": normalize(normal), "anomalous": normalize(anomalous),
                "mask": mask, "score": score, "peak": params.amplitude.abs().amax(1), "index": index.to(self.device)}


def stream_rate(stream: SemiFormulaStream, batches: int = 20) -> float:
    """Anomalous images per second that ``stream`` makes on its device (after one warm-up batch)."""
    stream.samples(0)
    _sync(stream.device)
    start = time.perf_counter()
    for g in range(1, batches + 1):
        stream.samples(g)
    _sync(stream.device)
    return batches * stream.batch_size / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# The network and the losses
# ---------------------------------------------------------------------------------------------

class SemiFormulaNet(FineTunedBackbone):
    """The backbone being pre-trained; ``forward(images)`` takes ImageNet-normalized ``(B, 3, H, W)``
    and returns ``{stride: (B, C_s, H/s, W/s)}`` for the recipe's strides.

    From ImageNet weights the batch norms keep their statistics and affine parameters (frozen, eval
    mode); from scratch they train. Blocks deeper than the deepest stride stay frozen either way.
    """

    def __init__(self, architecture: str = DEFAULT_BACKBONE, strides: tuple[int, ...] = (4, 8, 16),
                 init: str = "imagenet"):
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        net = build_architecture(architecture, pretrained=init == "imagenet")
        super().__init__(net, strides, trainable_prefix(net, max(strides)), freeze_batchnorm=init == "imagenet",
                         affine=input_affine(architecture))
        self.architecture, self.init = architecture, init


def patch_changes(normal: Tensor, anomalous: Tensor, eps: float = 1e-6) -> Tensor:
    """``d (B, h, w)``: the L2 change of each patch feature ``(B, C, h, w)`` from the normal image to
    the anomalous one, divided by the RMS norm of the batch's normal patch features (a constant of
    the step, so that scaling the features up cannot satisfy a margin)."""
    scale = normal.detach().pow(2).sum(1).mean().sqrt().clamp_min(eps)
    return ((anomalous - normal).pow(2).sum(1) + eps * eps).sqrt() / scale


def _patch_sets(mask: Tensor, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Masks ``(B, 1, H, W)`` -> (patches at least half covered, patches with no mask pixel in
    them or their 8 neighbours), both ``(B, h, w)`` bool."""
    cover = F.adaptive_avg_pool2d(mask, grid)[:, 0]
    touched = F.max_pool2d((cover > 0).float()[:, None], 3, stride=1, padding=1)[:, 0]
    return cover >= 0.5, touched == 0


def separation_loss(d: Tensor, inside: Tensor, far: Tensor, margin: float) -> Tensor:
    """(a) ``mean_inside relu(margin - d)^2 + mean_far d^2`` of changes ``d (B, h, w)``; an empty set adds 0."""
    pull = (F.relu(margin - d) ** 2 * inside).sum() / inside.sum().clamp_min(1)
    keep = (d ** 2 * far).sum() / far.sum().clamp_min(1)
    return pull + keep


def ranking_loss(d: Tensor, score: Tensor, tau: float) -> Tensor:
    """(b) RankNet over the batch's pairs: ``softplus(-(log D_i - log D_j) / tau)`` for each pair with
    ``score_i > score_j``, averaged; ``D = mean_p d (B,)`` per image. Zero when no pair differs."""
    total = d.flatten(1).mean(1).log()
    above = score[:, None] > score[None, :]                     # (B, B): i scored above j
    margins = (total[:, None] - total[None, :]) / tau
    return (F.softplus(-margins) * above).sum() / above.sum().clamp_min(1)


def _spearman(a: Tensor, b: Tensor) -> Tensor:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return (ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-12)


def semi_formula_losses(features: dict[int, Tensor], batch: dict[str, Tensor], recipe: SemiFormulaRecipe
                        ) -> dict[str, Tensor]:
    """The recipe's loss and its parts from ``features`` of ``cat([normal, anomalous])`` per stride.

    Returns ``loss`` (minimized), ``l_sep``, ``l_rank``, ``d_blob`` / ``d_far`` (mean change inside /
    far from the blobs) and ``rank_corr`` (Spearman's rho of ``D`` and the score), averaged over stages.
    """
    sums: dict[str, Tensor] = {}
    for stride, f in features.items():
        f = f.float()
        normal, anomalous = f.chunk(2)
        d = patch_changes(normal, anomalous)
        inside, far = _patch_sets(batch["mask"].float(), tuple(d.shape[-2:]))
        parts = {"l_sep": separation_loss(d, inside, far, recipe.margin),
                 "l_rank": ranking_loss(d, batch["score"], recipe.tau)}
        with torch.no_grad():
            parts["d_blob"] = (d * inside).sum() / inside.sum().clamp_min(1)
            parts["d_far"] = (d * far).sum() / far.sum().clamp_min(1)
            parts["rank_corr"] = _spearman(d.flatten(1).mean(1), batch["score"]).float()
        for k, v in parts.items():
            sums[k] = sums.get(k, 0) + v / len(features)
    weights = {"both": (1.0, 1.0), "separation": (1.0, 0.0), "ranking": (0.0, 1.0)}[recipe.losses]
    loss = weights[0] * sums["l_sep"] + weights[1] * sums["l_rank"]
    return {"loss": loss, **{k: v.detach() for k, v in sums.items()}}


@torch.no_grad()
def probe(net: SemiFormulaNet, stream: SemiFormulaStream, batches: int = 8, first_batch: int = 0,
          batch_norm: str = "running") -> dict[str, Tensor]:
    """How a backbone's patch features react to the stream's anomalies, one row per sample.

    Runs ``batches`` batches of ``stream`` (global numbers ``first_batch`` on; use a stream of
    held-out normal images or another seed than the training run's) through ``net`` in eval mode.
    Returns, each ``(batches * batch_size,)``: ``score``, ``peak`` (largest ``|a_k|``), ``d_blob``
    and ``d_far`` (mean relative patch change inside / far from the blobs, averaged over the stages
    that have such patches: a small blob may cover half a patch only at stride 4; NaN when no stage
    has one) and ``total`` (``D``, the mean change over all patches, averaged over the stages).
    ``net`` is moved to the stream's device and left in eval mode.

    ``batch_norm="running"`` normalizes with the stored running statistics, as a detector does;
    ``"batch"`` with each forward's own batch statistics (normal and anomalous halves together), as
    training does for a net whose batch norms train (``init="scratch"``). The running statistics
    are not updated by either.
    """
    if batch_norm not in ("running", "batch"):
        raise ValueError(f"batch_norm must be 'running' or 'batch', got {batch_norm!r}")
    net.to(stream.device).eval()
    if batch_norm == "batch":
        net = copy.deepcopy(net)
        for norm in batch_norms(net):
            norm.train()
    rows: dict[str, list[Tensor]] = {k: [] for k in ("score", "peak", "d_blob", "d_far", "total")}
    for g in range(first_batch, first_batch + batches):
        batch = stream.samples(g)
        with torch.no_grad():
            features = net(torch.cat([batch["normal"], batch["anomalous"]]))
        per_stage = {k: [] for k in ("d_blob", "d_far", "total")}
        for f in features.values():
            normal, anomalous = f.float().chunk(2)
            d = patch_changes(normal, anomalous)
            inside, far = _patch_sets(batch["mask"].float(), tuple(d.shape[-2:]))
            per_stage["d_blob"].append((d * inside).sum((1, 2)) / inside.sum((1, 2)))
            per_stage["d_far"].append((d * far).sum((1, 2)) / far.sum((1, 2)))
            per_stage["total"].append(d.flatten(1).mean(1))
        for k, v in per_stage.items():
            rows[k].append(torch.stack(v).nanmean(0).cpu())
        rows["score"].append(batch["score"].cpu())
        rows["peak"].append(batch["peak"].cpu())
    return {k: torch.cat(v) for k, v in rows.items()}


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

def _content_hash(images: Tensor) -> str:
    """SHA-256 of the images' bytes: a resume on other normal images is refused, not silently mixed."""
    import hashlib

    return hashlib.sha256(images.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()).hexdigest()


@dataclass
class SemiFormulaRun:
    """What :func:`pretrain_semi_formula` returns: the trained net, the loss record, time and rates."""

    net: SemiFormulaNet
    recipe: SemiFormulaRecipe
    history: History
    seconds: float
    train_images: int
    world_size: int = 1
    stream_images_per_s: float | None = None

    @property
    def train_images_per_s(self) -> float:
        """Anomalous images a second this call trained on (all processes; after a resume, only the
        steps taken since)."""
        return self.history.steps_this_session * self.recipe.batch_size * self.world_size / max(self.seconds, 1e-9)

    def save(self, path: str | Path, **extra: Any) -> str:
        """Write the pre-trained backbone as a backbone file; returns its SHA-256."""
        recipe = run_record("semi_formula", self.recipe, self.history, self.train_images, self.seconds,
                            self.world_size, **extra)
        return save_backbone(self.net.net, path, self.net.architecture, recipe)


def pretrain_semi_formula(images: Tensor, recipe: SemiFormulaRecipe = SemiFormulaRecipe(), *,
                          device: str | torch.device | None = None, checkpoint_dir: str | Path | None = None,
                          checkpoint_every: int = 0, resume: bool = False, stop_after_steps: int | None = None,
                          workers: int = 0, progress: bool = True, data_name: str | None = None) -> SemiFormulaRun:
    """Pre-train ``recipe.backbone`` on ``recipe.images`` anomalies streamed from the normal images
    ``(N, 3, H, W)`` (ImageNet-normalized), on :func:`adlib.train.train` (checkpoints, resume, DDP
    under ``torchrun``: each process streams its own samples). The per-step record holds every
    entry of :func:`semi_formula_losses`. ``workers`` > 0 makes the blobs in DataLoader worker
    processes (CPU only: CUDA makes them in the training process, on the GPU).
    """
    run_device = default_device(device)
    if workers and run_device.type == "cuda":
        raise ValueError("on CUDA the blobs are made on the GPU in the training process: use workers=0")
    start = time.perf_counter()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if recipe.images < recipe.batch_size * world:
        raise ValueError(f"{recipe.images} images give no step of {recipe.batch_size} per process on {world} processes")
    stream_device = run_device
    if world > 1 and run_device.type == "cuda":
        stream_device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    stream = SemiFormulaStream(images, recipe, stream_device)
    rate = stream_rate(stream, batches=5)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)       # from scratch: the same initialization on every process
        net = SemiFormulaNet(recipe.backbone, recipe.strides, recipe.init)

    def loss_fn(model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        features = model(torch.cat([batch["normal"], batch["anomalous"]]))
        return semi_formula_losses(features, batch, recipe)

    config = TrainConfig(epochs=1, batch_size=recipe.batch_size, lr=recipe.lr, schedule="cosine", seed=recipe.seed,
                         device=device, checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
                         resume=resume, stop_after_steps=stop_after_steps, workers=workers,
                         desc=f"semi-formula ({recipe.losses}, from {recipe.init})", progress=progress)
    fingerprint = {"recipe": dataclasses.asdict(recipe), "image_shape": list(images.shape[1:]), "data": data_name,
                   "normal_images": len(images), "images_sha256": _content_hash(images)}
    history = train(net, loss_fn, stream, config, fingerprint=fingerprint)
    return SemiFormulaRun(net.to("cpu").eval(), recipe, history, time.perf_counter() - start, len(images),
                          history.world_size, rate)
