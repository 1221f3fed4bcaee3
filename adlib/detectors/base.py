"""The one API every method follows, its registry, saving and loading, and shared map helpers.

A detector is a dataclass whose ``init`` fields are its hyper-parameters (the papers' defaults) and
whose ``init=False`` fields hold what ``fit`` learns::

    detector = get_detector("padim", backbone="efficientnet_lite0")
    detector.fit(train_batches)                 # iterable of (B, 3, H, W), normal images only
    scores, maps = detector.predict(images)     # (B,), (B, H, W) at input resolution
    detector.save("padim.safetensors"); same = load_detector("padim.safetensors")

Fitted state is a flat dict of tensors (``state_dict``), saved with safetensors together with
the method's name and hyper-parameters as JSON metadata: no pickle anywhere.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, ClassVar, Iterable, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backbones import BackboneFileError, FeatureExtractor, file_sha256, is_backbone_file
from ..settings import default_device

__all__ = ["Detector", "FeatureDetector", "register", "get_detector", "load_detector", "DETECTORS", "upsample_and_smooth",
           "gaussian_blur", "check_images"]

DETECTORS: dict[str, type["Detector"]] = {}
D = TypeVar("D", bound="Detector")


def register(name: str) -> Callable[[type[D]], type[D]]:
    """Class decorator: make a detector available under ``name`` to the CLI, benchmark and book."""

    def wrap(cls: type[D]) -> type[D]:
        if name in DETECTORS and DETECTORS[name] is not cls:
            raise ValueError(f"a detector is already registered as {name!r}")
        cls.name = name
        DETECTORS[name] = cls
        return cls

    return wrap


def get_detector(name: str, **hyper: Any) -> "Detector":
    """A new, unfitted detector of the method ``name`` with hyper-parameters overriding the defaults."""
    if name not in DETECTORS:
        raise KeyError(f"unknown method {name!r}; registered: {sorted(DETECTORS)}")
    cls = DETECTORS[name]
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = set(hyper) - fields
    if unknown:
        raise TypeError(f"{name} has no hyper-parameter(s) {sorted(unknown)}; it has {sorted(fields)}")
    return cls(**hyper)


def check_images(images: Tensor) -> None:
    """Refuse anything that is not a float batch ``(B, 3, H, W)``."""
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
    if not images.dtype.is_floating_point:
        raise TypeError(f"images must be floating point (ImageNet-normalized), got {images.dtype}")


class Detector:
    """Base class of every method. Subclasses are dataclasses and implement ``fit``, ``predict``,
    ``state_dict`` and ``load_state_dict``; this class gives ``save``/``load`` and ``hyper``."""

    name: ClassVar[str] = "detector"

    def fit(self: D, train: Iterable[Tensor]) -> D:  # pragma: no cover - interface
        """Learn from normal images only: ``train`` yields batches ``(B, 3, H, W)``. Returns self."""
        raise NotImplementedError

    def predict(self, images: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - interface
        """``(B, 3, H, W)`` -> image scores ``(B,)`` and anomaly maps ``(B, H, W)``, higher = more anomalous."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Tensor]) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def hyper(self) -> dict[str, Any]:
        """The hyper-parameters (the dataclass fields set at construction) as a JSON-friendly dict."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}  # type: ignore[arg-type]

    def save(self, path: str | os.PathLike) -> None:
        """Write the fitted detector as one safetensors file (tensors + JSON metadata)."""
        from safetensors.torch import save_file

        state = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        if not state:
            raise RuntimeError(f"{self.name} has no fitted state to save: call fit() first")
        save_file(state, str(path), metadata={"method": self.name, "hyper": json.dumps(self.hyper),
                                              **self.file_metadata()})

    def file_metadata(self) -> dict[str, str]:
        """Extra string metadata :meth:`save` writes (e.g. the identity of a backbone file)."""
        return {}

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device | None = None) -> "Detector":
        """Read a file written by :meth:`save` (any registered method, whatever ``cls`` is)."""
        return load_detector(path, device)


class FeatureDetector(Detector):
    """A detector on a frozen pretrained backbone. Subclasses are dataclasses with the fields
    ``backbone``, ``strides`` and ``device``; the extractor is built on first use."""

    def __post_init__(self) -> None:
        self.strides = tuple(self.strides)
        self.backbone = os.fspath(self.backbone)
        self._device = default_device(self.device)
        self._extractor: FeatureExtractor | None = None
        self._expected_backbone_sha256: str | None = None   # set when loaded from a detector file

    @property
    def extractor(self) -> FeatureExtractor:
        """The backbone's :class:`~adlib.backbones.FeatureExtractor` for ``strides``, on the device."""
        if self._extractor is None:
            extractor = FeatureExtractor(self.backbone, self.strides, self._device)
            _check_backbone_hash(self.backbone, extractor.sha256, self._expected_backbone_sha256)
            self._extractor = extractor
        return self._extractor

    def file_metadata(self) -> dict[str, str]:
        """A fine-tuned backbone file is recorded by its SHA-256, so a load can refuse another file."""
        if is_backbone_file(self.backbone):
            return {"backbone_sha256": self.extractor.sha256 or ""}
        return {}


def _check_backbone_hash(path: str, actual: str | None, expected: str | None) -> None:
    """Refuse a backbone file whose hash is not the one the detector was fitted with."""
    if expected is None:
        return
    if actual is None:
        raise BackboneFileError(f"the detector was fitted with the backbone file {path!r} (SHA-256 "
                                f"{expected[:12]}...), which is not found")
    if actual != expected:
        raise BackboneFileError(f"the backbone file {path!r} has SHA-256 {actual[:12]}..., but the detector was "
                                f"fitted with one of SHA-256 {expected[:12]}...: a different file; point at the "
                                f"file it was fitted with, or refit")


def load_detector(path: str | os.PathLike, device: str | torch.device | None = None) -> Detector:
    """Rebuild a fitted detector from a safetensors file written by :meth:`Detector.save`."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "method" not in meta:
        raise ValueError(f"{path}: not an adlib detector file (no 'method' in its metadata)")
    hyper = json.loads(meta.get("hyper", "{}"))
    if device is not None and "device" in hyper:
        hyper["device"] = str(device)
    detector = get_detector(meta["method"], **hyper)
    if "backbone_sha256" in meta:
        backbone = hyper["backbone"]
        actual = file_sha256(backbone) if os.path.isfile(backbone) else None
        _check_backbone_hash(backbone, actual, meta["backbone_sha256"])
        detector._expected_backbone_sha256 = meta["backbone_sha256"]
    detector.load_state_dict(load_file(str(path)))
    return detector


# ---------------------------------------------------------------------------------------------
# Shared post-processing of anomaly maps
# ---------------------------------------------------------------------------------------------

def _gaussian_kernel1d(sigma: float, device: torch.device, dtype: torch.dtype) -> Tensor:
    radius = max(1, int(4.0 * sigma + 0.5))  # same truncation as scipy.ndimage.gaussian_filter
    x = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(maps: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian smoothing of ``(B, H, W)`` maps, reflect padding (as scipy's default)."""
    if sigma <= 0:
        return maps
    kernel = _gaussian_kernel1d(sigma, maps.device, maps.dtype)
    r = kernel.numel() // 2
    x = maps[:, None]
    mode = "reflect" if min(maps.shape[-2:]) > r else "replicate"
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode=mode), kernel.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode=mode), kernel.view(1, 1, -1, 1))
    return x[:, 0]


def upsample_and_smooth(maps: Tensor, size: tuple[int, int], sigma: float = 4.0) -> Tensor:
    """Patch-grid maps ``(B, h, w)`` -> ``(B, H, W)``: bilinear upsampling, then Gaussian smoothing."""
    up = F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return gaussian_blur(up, sigma)
