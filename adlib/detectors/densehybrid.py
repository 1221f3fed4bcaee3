"""DenseHybrid for industrial images (Dekovic, Grcic and Segvic, after Grcic et al., ECCV 2022).

A DeepLabV3 segmentation network (ASPP head) with a second head ``g`` predicting, per pixel, the
logit ``o`` of ``P(d_out | x)``, the probability that the pixel is an outlier. The ``K``
segmentation logits ``s`` are read as an unnormalized joint log-density, so
``ln p^(x) = logsumexp_k s_k`` (the negative energy). Trained on normal images with pasted
negatives (pieces of photographs, :mod:`adlib.negatives`) by Eq. (1) of the paper:

    L = -E_in[ln P(d_in | x)] - beta * E_out[ln P(d_out | x) - ln p^(x)],   beta = 0.03,

the expectations over inlier pixels (no pasted pixel in the cell) and outlier pixels (at least half
pasted) of the head's grid. Anomaly maps: ``"hybrid"`` ``ln P(d_out | x) - ln p^(x)`` (the paper's
score), ``"outlier"`` ``o`` alone or ``"density"`` ``-ln p^(x)`` alone; upsampled, smoothed, the
image score is the maximum. Without segmentation weights (offline) the ``K`` logits learn nothing
but Eq. (1)'s push of ``ln p^(x)`` down on pasted pixels: the "density" is then a second
discriminative cue, not a generative model of normal images.

Backbones: ``"deeplabv3_resnet50"``, torchvision's segmentation network with its COCO/VOC weights
(the paper's; they load from torchvision's cache: :func:`fetch_deeplab_weights` downloads them
where there is internet); ``"efficientnet_lite0"`` (and lite1/2), the ImageNet EfficientNet-Lite
with the same DeepLabV3 head, untrained, on its stride-8 and stride-16 stages brought to stride 8
(the Lite has no dilated variant); ``"auto"`` (default): the torchvision network when its weights
are in the cache, else EfficientNet-Lite0. The backbone a fit used is recorded in the detector.

Freezing (``freeze``): ``"all"`` trains only the final BN-ReLU-Conv of both heads. With
torchvision's weights that is the paper's setting and best result; ``"auto"`` (default) freezes
what was pre-trained: "all" on torchvision's network, "backbone" on EfficientNet-Lite. On EfficientNet-Lite the head has no
segmentation weights, and freezing random layers is not what the paper means, so ``"all"`` first
trains the whole head (ASPP and both heads, backbone frozen) for ``warmup_epochs`` on the same loss
and then freezes it; ``"backbone"`` trains the whole head for all epochs; ``"none"`` trains the
backbone too (its batch norms keep their statistics). With a frozen backbone, the features of
the pasted training images are computed once, not every epoch.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from ..backbones import (DEFAULT_BACKBONE, LITE_VARIANTS, FeatureExtractor, FineTunedBackbone, build_architecture,
                         concat_stages, input_affine, torchvision_weights_cached, trainable_prefix)
from ..data import denormalize, normalize
from ..negatives import SHAPES, PhotoNegatives, paste_negatives
from ..train import History, TrainConfig, train as train_loop
from .base import Detector, check_images, register, upsample_and_smooth

logger = logging.getLogger(__name__)

__all__ = ["DenseHybrid", "DenseHybridHead", "densehybrid_loss", "fetch_deeplab_weights", "FREEZES", "SCORES"]

FREEZES = ("auto", "all", "backbone", "none")
SCORES = ("hybrid", "outlier", "density")
TORCHVISION_DEEPLAB = "deeplabv3_resnet50"
VOC_CLASSES = 21
BACKBONE_CHOICES = ("auto", TORCHVISION_DEEPLAB, *LITE_VARIANTS)


def _deeplab_weights():
    from torchvision.models.segmentation import DeepLabV3_ResNet50_Weights

    return DeepLabV3_ResNet50_Weights.DEFAULT


def deeplab_weights_cached() -> bool:
    """Whether torchvision's DeepLabV3-ResNet50 weights are in torch's hub cache (no download tried)."""
    return torchvision_weights_cached(_deeplab_weights())


def fetch_deeplab_weights() -> None:
    """Download torchvision's DeepLabV3-ResNet50 weights into torch's cache (needs internet, e.g. Colab)."""
    from torchvision.models.segmentation import deeplabv3_resnet50

    deeplabv3_resnet50(weights=_deeplab_weights())


def densehybrid_loss(seg_logits: Tensor, outlier_logits: Tensor, cover: Tensor, beta: float = 0.03
                     ) -> dict[str, Tensor]:
    """Eq. (1) on a grid: ``seg_logits (B, K, h, w)``, ``outlier_logits (B, h, w)``, ``cover (B, h, w)``
    the pasted fraction of each cell. Inliers: ``cover == 0``; outliers: ``cover >= 0.5``; others
    are left out. Returns ``loss``, ``l_in`` (``-E_in ln P(d_in|x)``), ``l_out_disc``
    (``-E_out ln P(d_out|x)``) and ``energy_out`` (``E_out ln p^(x)``): loss = l_in + beta (l_out_disc + energy_out)."""
    inlier, outlier = cover == 0, cover >= 0.5
    o = outlier_logits.float()
    log_p_in, log_p_out = F.logsigmoid(-o), F.logsigmoid(o)
    log_density = torch.logsumexp(seg_logits.float(), 1)
    l_in = -(log_p_in * inlier).sum() / inlier.sum().clamp_min(1)
    l_out_disc = -(log_p_out * outlier).sum() / outlier.sum().clamp_min(1)
    energy_out = (log_density * outlier).sum() / outlier.sum().clamp_min(1)
    loss = l_in + beta * (l_out_disc + energy_out)
    return {"loss": loss, "l_in": l_in.detach(), "l_out_disc": l_out_disc.detach(), "energy_out": energy_out.detach()}


def _head(channels: int, outputs: int) -> nn.Sequential:
    """DeepLabV3's head after the ASPP: 3x3 conv, then the final BN-ReLU-Conv (indices 1-3)."""
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
                         nn.ReLU(), nn.Conv2d(channels, outputs, 1))


class DenseHybridHead(nn.Module):
    """ASPP + segmentation head (``classes`` logits) + outlier head ``g`` (one logit), on features
    ``(B, C_in, h, w)`` -> ``(seg (B, K, h, w), outlier (B, h, w))``."""

    def __init__(self, in_channels: int, channels: int = 64, classes: int = VOC_CLASSES,
                 rates: tuple[int, ...] = (12, 24, 36)):
        super().__init__()
        from torchvision.models.segmentation.deeplabv3 import ASPP

        self.aspp = ASPP(in_channels, rates, channels)
        self.seg = _head(channels, classes)
        self.outlier = _head(channels, 1)

    @classmethod
    def from_torchvision(cls, classifier: nn.Sequential) -> "DenseHybridHead":
        """The pretrained DeepLabV3 classifier as the segmentation branch; ``g`` starts as a copy of its
        3x3 conv and batch norm with a new 1x1 output (so "all" freezes trained layers, as in the paper)."""
        head = cls.__new__(cls)
        nn.Module.__init__(head)
        head.aspp = classifier[0]
        head.seg = nn.Sequential(*list(classifier.children())[1:5])
        head.outlier = nn.Sequential(copy.deepcopy(classifier[1]), copy.deepcopy(classifier[2]), nn.ReLU(),
                                     nn.Conv2d(classifier[1].out_channels, 1, 1))
        return head

    def train(self, mode: bool = True) -> "DenseHybridHead":
        """Frozen layers stay in eval mode: a frozen ASPP drops no activations, frozen batch norms keep
        their statistics."""
        super().train(mode)
        if not any(p.requires_grad for p in self.aspp.parameters()):
            self.aspp.eval()
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d) and not module.weight.requires_grad:
                module.eval()
        return self

    def final_layers(self) -> list[nn.Module]:
        """The final BN-ReLU-Conv of both heads: what ``freeze="all"`` trains."""
        return [self.seg[1], self.seg[3], self.outlier[1], self.outlier[3]]

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        x = self.aspp(features)
        return self.seg(x), self.outlier(x)[:, 0]


class _Backbone(FineTunedBackbone):
    """Images ``(B, 3, H, W)`` (ImageNet-normalized) -> features ``(B, C, H/8, W/8)`` at output stride 8:
    DeepLabV3's ResNet-50 body, or an EfficientNet-Lite's stride 8 and 16 stages concatenated. With
    ``trainable`` the (used) blocks train; the batch norms keep their pretrained statistics either way."""

    def __init__(self, name: str, trainable: bool):
        if name == TORCHVISION_DEEPLAB:
            from torchvision.models.segmentation import deeplabv3_resnet50

            try:
                model = deeplabv3_resnet50(weights=_deeplab_weights(), weights_backbone=None)
            except (OSError, RuntimeError) as err:      # URLError is an OSError
                raise ValueError(f"torchvision's DeepLabV3-ResNet50 weights are not in torch's cache and could not be "
                                 f"downloaded ({err}); call adlib.detectors.densehybrid.fetch_deeplab_weights() "
                                 f"where there is internet, or use backbone='{DEFAULT_BACKBONE}'") from err
            super().__init__(model.backbone, (8,), [model.backbone] if trainable else [])
            self.channels = 2048
            self.__dict__["classifier"] = model.classifier    # the head's start, not part of the backbone
        else:
            net = build_architecture(name, pretrained=True)
            used = trainable_prefix(net, 16)                  # blocks past stride 16 are never run
            super().__init__(net, (8, 16), used if trainable else [], affine=input_affine(name))
            self.channels = sum(self.net.stage_features(torch.zeros(1, 3, 32, 32), (8, 16))[s].shape[1] for s in (8, 16))
            self.__dict__["classifier"] = None
        self.name = name
        self.eval()

    def forward(self, images: Tensor) -> Tensor:
        if self.classifier is not None:
            return self.net(images)["out"]
        feats = super().forward(images)
        return concat_stages(feats, tuple(feats[8].shape[-2:]), mode="bilinear")


class _FullNet(nn.Module):
    """Backbone + head in one module, for ``freeze="none"``: ``(B, 3, H, W)`` -> (seg, outlier)."""

    def __init__(self, backbone: _Backbone, head: DenseHybridHead):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        return self.head(self.backbone(images))


def _grid_cover(masks: Tensor, grid: tuple[int, int]) -> Tensor:
    """Masks ``(B, 1, H, W)`` -> the pasted fraction of each grid cell ``(B, h, w)``."""
    return F.adaptive_avg_pool2d(masks.float(), grid)[:, 0]


@register("densehybrid")
@dataclass(eq=False)
class DenseHybrid(Detector):
    """DenseHybrid with the paper's loss (beta 0.03), mask-shaped pieces and, by default, its rule for
    freezing: everything that was pre-trained (see :meth:`resolved_freeze`)."""

    backbone: str = "auto"
    freeze: str = "auto"                 # "all" with torchvision's DeepLabV3 weights, else "backbone"
    patch: str = "mask"                  # "mask" (irregular pieces) or "rectangle"
    negatives: str = "offline"           # "offline" (scikit-image / scikit-learn photos) or a folder of images
    negative_masks: str | None = None    # with a folder: label images of the same names (e.g. ADE20K objects)
    variants: int = 2                    # pasted copies of each training image
    paste_scale: tuple[float, float] = (0.1, 0.35)
    epochs: int = 12
    warmup_epochs: int = 4               # "all" on an untrained head: epochs training the whole head first
    batch_size: int = 16
    lr: float = 1e-3
    beta: float = 0.03
    head_channels: int = 64              # the EfficientNet-Lite head's width (torchvision's is 256)
    score: str = "hybrid"                # "hybrid", "outlier" or "density"
    sigma: float = 4.0
    seed: int = 0
    device: str | None = None
    backbone_: str | None = field(default=None, init=False)   # what fit used: "auto" resolved
    freeze_: str | None = field(default=None, init=False)
    head: DenseHybridHead | None = field(default=None, init=False, repr=False)
    train_history: History | None = field(default=None, init=False, repr=False)
    warmup_history: History | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.freeze not in FREEZES:
            raise ValueError(f"freeze must be one of {FREEZES}, got {self.freeze!r}")
        if self.patch not in SHAPES:
            raise ValueError(f"patch must be one of {SHAPES}, got {self.patch!r}")
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {self.score!r}")
        if self.variants < 1 or self.epochs < 1 or self.warmup_epochs < 0:
            raise ValueError(f"need variants >= 1, epochs >= 1, warmup_epochs >= 0; got {self.variants}, "
                             f"{self.epochs}, {self.warmup_epochs}")
        if self.freeze == "all" and self.warmup_epochs >= self.epochs:
            raise ValueError(f"freeze='all': the warm-up is part of the epochs, so warmup_epochs < epochs; got "
                             f"{self.warmup_epochs} and {self.epochs}")
        if self.backbone not in BACKBONE_CHOICES:
            raise ValueError(f"backbone must be one of {BACKBONE_CHOICES}, got {self.backbone!r}")
        self.paste_scale = tuple(self.paste_scale)
        if not 0 < self.paste_scale[0] <= self.paste_scale[1] <= 1:
            raise ValueError(f"paste_scale must be (min, max) with 0 < min <= max <= 1, got {self.paste_scale}")
        self.negatives = os.fspath(self.negatives)
        if self.negative_masks is not None:
            self.negative_masks = os.fspath(self.negative_masks)
        from ..settings import default_device

        self.device_ = default_device(self.device)
        self._backbone: _Backbone | None = None
        self._extractor: FeatureExtractor | None = None

    # -- the pieces -----------------------------------------------------------------------------

    def resolved_freeze(self, backbone: str) -> str:
        """``"auto"``: freeze what was pre-trained. With torchvision's segmentation weights that is all
        but the final BN-ReLU-Conv of both heads (the paper's best, "all"); on EfficientNet-Lite only
        the backbone was pre-trained, so "backbone" is the same rule (and measured the better of the two
        on bottle: see the chapter)."""
        if self.freeze != "auto":
            return self.freeze
        return "all" if backbone == TORCHVISION_DEEPLAB else "backbone"

    def resolved_backbone(self) -> str:
        """The backbone a fit uses: ``"auto"`` becomes torchvision's DeepLabV3 when its weights are cached."""
        if self.backbone != "auto":
            return self.backbone
        return TORCHVISION_DEEPLAB if deeplab_weights_cached() else DEFAULT_BACKBONE

    def _resolve(self) -> None:
        """Fix ``backbone_`` / ``freeze_`` if no fit or load has (pieces built before a fit)."""
        if self.backbone_ is None:
            self.backbone_ = self.resolved_backbone()
            self.freeze_ = self.resolved_freeze(self.backbone_)

    def _backbone_net(self) -> _Backbone:
        self._resolve()
        if self._backbone is None:
            with torch.random.fork_rng(devices=[]):
                self._backbone = _Backbone(self.backbone_, trainable=self.freeze_ == "none").to(self.device_)
        return self._backbone

    def _uses_extractor(self) -> bool:
        """A frozen EfficientNet-Lite runs through the BN-folded :class:`FeatureExtractor`."""
        self._resolve()
        return self.backbone_ != TORCHVISION_DEEPLAB and self.freeze_ != "none"

    def _lite_extractor(self) -> FeatureExtractor:
        self._resolve()
        if self._extractor is None:
            self._extractor = FeatureExtractor(self.backbone_, (8, 16), self.device_)
        return self._extractor

    def _features(self, images: Tensor) -> Tensor:
        """Frozen-backbone features ``(B, C, H/8, W/8)``."""
        if self._uses_extractor():
            feats = self._lite_extractor()(images)
            return concat_stages(feats, tuple(feats[8].shape[-2:]), mode="bilinear")
        with torch.no_grad():
            return self._backbone_net()(images.to(self.device_))

    def _build_head(self) -> None:
        """A new head, seeded (the backbone is built first, so its construction cannot shift the seed)."""
        self._resolve()
        if self.backbone_ == TORCHVISION_DEEPLAB:
            classifier = copy.deepcopy(self._backbone_net().classifier)
        else:
            channels = (sum(self._lite_extractor().channels.values()) if self._uses_extractor()
                        else self._backbone_net().channels)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            if self.backbone_ == TORCHVISION_DEEPLAB:
                self.head = DenseHybridHead.from_torchvision(classifier)
            else:
                self.head = DenseHybridHead(channels, self.head_channels)
        self.head.to(self.device_)

    def negative_source(self) -> PhotoNegatives:
        """Where pasted pieces come from: the offline photographs, or the folder ``negatives``."""
        if self.negatives == "offline":
            return PhotoNegatives.offline(self.patch)
        return PhotoNegatives.from_folder(self.negatives, self.patch, masks=self.negative_masks)

    def pasted_pool(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``variants`` pasted copies of each normal image ``(N, 3, H, W)`` (ImageNet-normalized) ->
        (pasted images ``(variants * N, 3, H, W)`` normalized, masks ``(variants * N, 1, H, W)``)."""
        source = self.negative_source()
        generator = torch.Generator().manual_seed(self.seed)
        plain = denormalize(images.cpu())
        pasted, masks = zip(*(paste_negatives(plain, source, generator, self.paste_scale) for _ in range(self.variants)))
        return normalize(torch.cat(pasted)), torch.cat(masks)

    # -- fit ------------------------------------------------------------------------------------

    def _fit(self, train: Iterable[Tensor]) -> None:
        """Paste negatives onto the normal ``(B, 3, H, W)`` batches, then train the head (and, with
        ``freeze="none"``, the backbone) on Eq. (1)."""
        batches = [b for b in train]
        if not batches:
            raise ValueError("no training images")
        images = torch.cat(batches)
        if len(images) < 2:
            raise ValueError(f"need at least 2 training images, got {len(images)}")
        self.backbone_ = self.resolved_backbone()
        self.freeze_ = self.resolved_freeze(self.backbone_)
        self._backbone, self._extractor = None, None
        logger.info("densehybrid: backbone %s%s, freeze %s", self.backbone_,
                    " (torchvision's DeepLabV3 weights)" if self.backbone_ == TORCHVISION_DEEPLAB
                    else " (ImageNet weights, DeepLabV3 head untrained)", self.freeze_)
        pasted, masks = self.pasted_pool(images)
        self._build_head()
        if self.freeze_ == "none":
            data = (pasted, masks)
            net: nn.Module = _FullNet(self._backbone_net(), self.head)
        else:
            store = torch.float16 if self.backbone_ == TORCHVISION_DEEPLAB else torch.float32   # 2048 channels: halved
            feats = torch.cat([self._features(b.to(self.device_)).to("cpu", store) for b in tqdm(
                pasted.split(self.batch_size), desc="densehybrid features", leave=False)])
            data = (feats, _grid_cover(masks, tuple(feats.shape[-2:])))
            del pasted
            net = self.head
        warmup = self.warmup_epochs if (self.freeze_ == "all" and self.backbone_ != TORCHVISION_DEEPLAB) else 0
        self.warmup_history = None
        if warmup:
            self.head.requires_grad_(True)
            self.warmup_history = self._train(net, data, warmup, "densehybrid warm-up (whole head)")
        self._set_trainable()
        self.train_history = self._train(net, data, self.epochs - warmup if warmup else self.epochs,
                                         f"densehybrid fit (freeze {self.freeze_})")
        self.head.eval()

    def _set_trainable(self) -> None:
        """Gradients only where ``freeze`` allows; frozen batch norms stay in eval mode."""
        self.head.requires_grad_(self.freeze_ != "all")
        if self.freeze_ == "all":
            for module in self.head.final_layers():
                module.requires_grad_(True)

    def _train(self, net: nn.Module, data: tuple[Tensor, Tensor], epochs: int, desc: str) -> History:
        full = self.freeze_ == "none"

        def loss_fn(model: nn.Module, batch: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
            x, extra = batch
            seg, outlier = model(x.float())
            cover = _grid_cover(extra, tuple(outlier.shape[-2:])) if full else extra
            return densehybrid_loss(seg, outlier, cover, self.beta)

        config = TrainConfig(epochs=max(epochs, 0), batch_size=self.batch_size, lr=self.lr, seed=self.seed,
                             device=self.device_, min_batch=2, desc=desc)
        return train_loop(net, loss_fn, data, config)

    # -- predict --------------------------------------------------------------------------------

    @torch.no_grad()
    def maps(self, images: Tensor) -> dict[str, Tensor]:
        """Grid maps ``(B, h, w)``: ``outlier`` (the logit o), ``log_density`` (ln p^(x)), ``density``
        (-ln p^(x): high where the density is low) and ``hybrid``."""
        if self.head is None:
            raise RuntimeError("DenseHybrid is not fitted: call fit() first")
        check_images(images)
        return self._maps(images)

    def _maps(self, images: Tensor) -> dict[str, Tensor]:
        self.head.eval()
        seg, outlier = self.head(self._features(images.to(self.device_)))
        log_density = torch.logsumexp(seg.float(), 1)
        return {"outlier": outlier.float(), "log_density": log_density, "density": -log_density,
                "hybrid": F.logsigmoid(outlier.float()) - log_density}

    def _predict(self, images: Tensor) -> tuple[Tensor, Tensor]:
        if self.head is None:
            raise RuntimeError("DenseHybrid is not fitted: call fit() first")
        grid = self._maps(images)[self.score]
        maps = upsample_and_smooth(grid, tuple(images.shape[-2:]), self.sigma)
        return maps.flatten(1).amax(1), maps

    def scoring_module(self) -> nn.Module:
        if self.head is None:
            raise RuntimeError("DenseHybrid is not fitted: call fit() first")
        return _DenseHybridScoring(self)

    # -- files ----------------------------------------------------------------------------------

    def saved_hyper(self) -> dict:
        """The file names the backbone and freeze setting the fit used, not "auto"."""
        return {**self.hyper, "backbone": self.backbone_, "freeze": self.freeze_}

    def state_dict(self) -> dict[str, Tensor]:
        if self.head is None:
            return {}
        state = {f"head.{k}": v for k, v in self.head.state_dict().items()}
        if self.freeze_ == "none":
            state.update({f"backbone.{k}": v for k, v in self._backbone_net().state_dict().items()})
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if "auto" in (self.backbone, self.freeze):
            raise ValueError("a saved DenseHybrid names its backbone and freeze setting; 'auto' is resolved by fit")
        self.backbone_, self.freeze_ = self.backbone, self.freeze
        self._backbone, self._extractor = None, None
        self._build_head()
        self.head.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("head.")})
        if self.freeze_ == "none":
            self._backbone_net().load_state_dict({k[9:]: v for k, v in state.items() if k.startswith("backbone.")})
        self.head.eval()


class _DenseHybridScoring(nn.Module):
    """DenseHybrid's predict as a plain module: features, head, the chosen score map, smoothed."""

    def __init__(self, detector: DenseHybrid):
        super().__init__()
        self.uses_extractor = detector._uses_extractor()
        self.features = detector._lite_extractor() if self.uses_extractor else detector._backbone_net().eval()
        self.head, self.score, self.sigma = detector.head.eval(), detector.score, detector.sigma

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        if self.uses_extractor:
            feats = self.features(images)
            feats = concat_stages(feats, tuple(feats[8].shape[-2:]), mode="bilinear")
        else:
            feats = self.features(images)
        seg, outlier = self.head(feats)
        log_density = torch.logsumexp(seg.float(), 1)
        grid = {"outlier": outlier.float(), "density": -log_density,
                "hybrid": F.logsigmoid(outlier.float()) - log_density}[self.score]
        maps = upsample_and_smooth(grid, tuple(images.shape[-2:]), self.sigma)
        return maps.flatten(1).amax(1), maps

