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
import warnings
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Iterator, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backbones import BackboneFileError, FeatureExtractor, file_sha256, is_backbone_file
from ..settings import default_device

if TYPE_CHECKING:
    from ..data import Preprocessing

__all__ = ["Detector", "FeatureDetector", "register", "get_detector", "load_detector", "DETECTORS", "upsample_and_smooth",
           "gaussian_blur", "check_images", "CheckedBatches"]

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
        raise ValueError(f"unknown method {name!r}; registered: {sorted(DETECTORS)}")
    cls = DETECTORS[name]
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = set(hyper) - fields
    if unknown:
        raise TypeError(f"{name} has no hyper-parameter(s) {sorted(unknown)}; it has {sorted(fields)}")
    return cls(**hyper)


def check_images(images: Tensor) -> None:
    """Refuse anything that is not a finite float batch ``(B, 3, H, W)``."""
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
    if not images.dtype.is_floating_point:
        raise TypeError(f"images must be floating point (ImageNet-normalized), got {images.dtype}")
    finite = torch.isfinite(images)
    if not bool(finite.all()):
        bad = int((~finite).flatten(1).any(1).sum())
        raise ValueError(f"{bad} of {len(images)} images contain NaN or infinite pixel values: a detector "
                         f"fitted or scored on them would give NaN scores; clean or drop those images")


class CheckedBatches:
    """A re-iterable view of a detector's training data that checks every batch on the way.

    ``train`` is an iterable of ``(B, 3, H, W)`` batches (iterated once per epoch by the methods that
    train) or one ``(N, 3, H, W)`` tensor (split into batches of ``batch_size``). Every batch passes
    :func:`check_images`, and all share the first one's ``(H, W)``, recorded as ``size``.
    """

    def __init__(self, train: Iterable[Tensor] | Tensor, batch_size: int = 32):
        self.train, self.batch_size = train, batch_size
        self.size: tuple[int, int] | None = None

    def __iter__(self) -> Iterator[Tensor]:
        source = self.train.split(self.batch_size) if isinstance(self.train, Tensor) else self.train
        for batch in source:
            check_images(batch)
            size = (int(batch.shape[-2]), int(batch.shape[-1]))
            if self.size is None:
                self.size = size
            elif size != self.size:
                raise ValueError(f"all training images must share one size: got a batch of {size} after "
                                 f"{self.size}; resize them the same way (adlib.data.Preprocessing)")
            yield batch

    def __len__(self) -> int:
        if isinstance(self.train, Tensor):
            return -(-len(self.train) // self.batch_size)
        return len(self.train)  # type: ignore[arg-type]


class Detector:
    """Base class of every method. Subclasses are dataclasses and implement ``_fit``, ``_predict``,
    ``state_dict`` and ``load_state_dict``; this class gives the checked ``fit``/``predict``,
    ``save``/``load`` and ``hyper``.

    ``device_`` is where it computes (its ``device`` setting resolved by
    :func:`adlib.settings.default_device`). What every fitted detector knows besides its method's
    state: ``input_size`` ``(H, W)`` of the
    images it was fitted on (``predict`` refuses another size), ``preprocessing`` (how files became
    those images, when it was fitted from a dataset: ``predict_files`` and the CLI use it) and an
    optional decision ``threshold`` on the image score. All three are saved with the detector.
    """

    name: ClassVar[str] = "detector"
    calibrates_itself: ClassVar[bool] = False    # True: fit sets ``threshold`` by the method's own rule
    device_: torch.device = torch.device("cpu")   # where it computes: the ``device`` setting, resolved
    input_size: tuple[int, int] | None = None
    preprocessing: "Preprocessing | None" = None
    threshold: float | None = None

    def fit(self: D, train: Iterable[Tensor] | Tensor, preprocessing: "Preprocessing | None" = None) -> D:
        """Learn from normal images only: ``train`` yields batches ``(B, 3, H, W)`` (or is one
        ``(N, 3, H, W)`` tensor). Refitting forgets everything learnt before. Returns self.

        ``preprocessing`` says how files became these images; it is saved, and ``predict_files`` and the
        CLI read files with it. Without it, a ``train`` that carries its own ``preprocessing`` attribute
        (:func:`adlib.data.train_batches` does) gives it; a plain tensor or list gives none."""
        checked = CheckedBatches(train)
        self.threshold = None   # a method that calibrates one sets it again in _fit
        self._fit(checked)
        if checked.size is None:
            raise ValueError("no training images")
        self.input_size = checked.size
        self.preprocessing = preprocessing if preprocessing is not None else getattr(train, "preprocessing", None)
        return self

    @torch.no_grad()
    def predict(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, 3, H, W)`` -> image scores ``(B,)`` and anomaly maps ``(B, H, W)``, higher = more anomalous.
        ``(H, W)`` must be the training images' size (``predict_files`` resizes files as they were)."""
        check_images(images)
        size = (int(images.shape[-2]), int(images.shape[-1]))
        if self.input_size is not None and size != tuple(self.input_size):
            how = ("predict_files() or the CLI read files as the training images were read"
                   if self.preprocessing is not None else "resize them as the training images were")
            raise ValueError(f"images are {size[0]}x{size[1]}, but {self.name} was fitted on "
                             f"{self.input_size[0]}x{self.input_size[1]} images: {how}")
        return self._predict(images)

    def predict_files(self, paths: Iterable[str | os.PathLike], batch_size: int = 16) -> tuple[Tensor, Tensor]:
        """Image files of any size and bit depth -> ``(N,)`` scores and ``(N, S, S)`` maps, each file
        read with the ``preprocessing`` the detector was fitted with."""
        if self.preprocessing is None:
            raise ValueError(f"this {self.name} was fitted on tensors, so it does not know how files were "
                             f"read; fit it on a dataset (adlib.data.train_batches) or call predict() on tensors")
        paths = list(paths)
        scores, maps = [], []
        for start in range(0, len(paths), batch_size):
            images = self.preprocessing.load_many(paths[start:start + batch_size])
            s, m = self.predict(images)
            scores.append(s.cpu())
            maps.append(m.cpu())
        if not scores:
            raise ValueError("no image files given")
        return torch.cat(scores), torch.cat(maps)

    def calibrate(self, held_out: Iterable[Tensor] | Tensor, k: float = 3.0) -> float:
        """Set ``threshold`` to mean + ``k`` std of the image scores of held-out *normal* images
        (batches ``(B, 3, H, W)`` or one ``(N, 3, H, W)`` tensor; at least 2 images, never seen by
        fit): a threshold set without a single defect, as a production line must. Returns it.

        Methods that calibrate themselves in ``fit`` (``calibrates_itself``: DFR's quantile of
        training scores, the autoencoder's own hold-out) are refused: their rule is part of the method.
        """
        from ..metrics import mean_std_threshold

        if self.calibrates_itself:
            raise ValueError(f"{self.name} sets its own threshold in fit ({self.threshold}); calibrate() would "
                             f"replace the method's rule")
        if self.input_size is None:
            raise RuntimeError(f"{self.name} is not fitted: call fit() first")
        scores = torch.cat([self.predict(batch)[0].cpu() for batch in CheckedBatches(held_out)])
        if len(scores) < 10:
            warnings.warn(f"a threshold from {len(scores)} held-out images is rough; more make it steadier",
                          stacklevel=2)
        self.threshold = mean_std_threshold(scores, k)
        return self.threshold

    def _fit(self, train: Iterable[Tensor]) -> None:  # pragma: no cover - interface
        """The method's learning on checked ``(B, 3, H, W)`` batches; overwrites all fitted state."""
        raise NotImplementedError

    def _predict(self, images: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def scoring_module(self) -> torch.nn.Module:
        """The fitted scoring path as one plain module for export (:mod:`adlib.export`):
        ImageNet-normalized ``(B, 3, H, W)`` -> ``(scores (B,), maps (B, H, W))``, the same values as
        :meth:`predict` from standard tensor operations only (no input checks, no custom kernels)."""
        raise NotImplementedError(f"{self.name} cannot be exported; the methods that can: "
                                  f"{sorted(n for n, c in DETECTORS.items() if c.scoring_module is not Detector.scoring_module)}")

    def state_dict(self) -> dict[str, Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Tensor]) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def hyper(self) -> dict[str, Any]:
        """The hyper-parameters (the dataclass fields set at construction) as a JSON-friendly dict.
        ``device`` is not among them: where to compute is a setting of the run, not of the model."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)  # type: ignore[arg-type]
                if f.init and f.name != "device"}

    def save(self, path: str | os.PathLike) -> None:
        """Write the fitted detector as one safetensors file (tensors + JSON metadata)."""
        from safetensors.torch import save_file

        state = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        if not state:
            raise RuntimeError(f"{self.name} has no fitted state to save: call fit() first")
        fitted = {"input_size": list(self.input_size) if self.input_size else None, "threshold": self.threshold,
                  "preprocessing": self.preprocessing.to_dict() if self.preprocessing else None}
        save_file(state, str(path), metadata={"method": self.name, "hyper": json.dumps(self.saved_hyper()),
                                              "fitted": json.dumps(fitted), **self.file_metadata()})

    def saved_hyper(self) -> dict[str, Any]:
        """The hyper-parameters a saved file records (a method whose fit resolves one, such as an
        "auto", records the resolved value so that a load rebuilds what was fitted)."""
        return self.hyper

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
        self.device_ = default_device(self.device)
        self._extractor: FeatureExtractor | None = None
        self._expected_backbone_sha256: str | None = None   # set when loaded from a detector file

    @property
    def extractor(self) -> FeatureExtractor:
        """The backbone's :class:`~adlib.backbones.FeatureExtractor` for ``strides``, on the device."""
        if self._extractor is None:
            extractor = FeatureExtractor(self.backbone, self.strides, self.device_)
            _check_backbone_hash(self.backbone, extractor.sha256, self._expected_backbone_sha256)
            self._extractor = extractor
        return self._extractor

    def embed(self, images: Tensor) -> Tensor:
        """ImageNet-normalized ``(B, 3, H, W)`` -> the method's feature map ``(B, D, h, w)`` (each method's
        ``_embed`` says which features and grid), after checking the input once."""
        check_images(images)
        return self._embed(images)

    def _embed(self, images: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

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
    hyper.pop("device", None)   # files written before the device became a run setting
    if device is not None:
        if "device" not in {f.name for f in dataclasses.fields(DETECTORS[meta["method"]]) if f.init}:
            raise ValueError(f"{meta['method']} runs on the CPU only; drop the device argument")
        hyper["device"] = str(device)
    if meta["method"] not in DETECTORS:
        raise ValueError(f"{path}: a {meta['method']!r} detector, a method this adlib does not know")
    try:
        detector = get_detector(meta["method"], **hyper)
    except TypeError as err:      # hyper-parameters this version does not have: another version's file
        raise ValueError(f"{path}: {err} (written by another version of adlib?)") from None
    if "backbone_sha256" in meta:
        backbone = hyper["backbone"]
        actual = file_sha256(backbone) if os.path.isfile(backbone) else None
        _check_backbone_hash(backbone, actual, meta["backbone_sha256"])
        detector._expected_backbone_sha256 = meta["backbone_sha256"]
    detector.load_state_dict(load_file(str(path)))
    _restore_fitted(detector, json.loads(meta.get("fitted", "{}")))
    return detector


def _restore_fitted(detector: Detector, fitted: dict[str, Any]) -> None:
    """Put back what every fitted detector knows: input size, preprocessing, threshold."""
    from ..data import Preprocessing

    if fitted.get("input_size"):
        detector.input_size = tuple(int(v) for v in fitted["input_size"])  # type: ignore[assignment]
    if fitted.get("preprocessing"):
        detector.preprocessing = Preprocessing.from_dict(fitted["preprocessing"])
    if fitted.get("threshold") is not None:
        detector.threshold = float(fitted["threshold"])


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
