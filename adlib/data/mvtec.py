"""MVTec-layout data on disk: where the data root is, how image files become detector inputs, the
dataset of one category's split, plain image files, and batches of them.

Layout (the same for every MVTec AD category and for :func:`adlib.data.synthetic.make_synthetic`)::

    <root>/<category>/train/good/*.png
    <root>/<category>/test/<defect>/*.png          (defect == "good" for normal test images)
    <root>/<category>/ground_truth/<defect>/<name>_mask.png

MVTec AD is licensed CC BY-NC-SA 4.0 by MVTec Software GmbH (non-commercial use, attribution,
share-alike); cite Bergmann et al., CVPR 2019 and IJCV 2021.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..imagefiles import IMAGE_SUFFIXES, IMAGENET_MEAN, IMAGENET_STD, DataError, read_resized

MVTEC_CATEGORIES = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
                    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper")
MVTEC_PAGE = "https://www.mvtec.com/company/research/datasets/mvtec-ad"
MVTEC_LICENSE = "CC BY-NC-SA 4.0 (non-commercial use only)"


def display_path(path: Path) -> str:
    """``path`` relative to the working folder when it is nearby (keeps printed output portable)."""
    try:
        rel = os.path.relpath(path)
    except ValueError:  # another drive on Windows
        return str(path)
    return rel if Path(rel).parts[:4].count("..") < 4 else str(path)


# --------------------------------------------------------------------------------------------
# Where data comes from
# --------------------------------------------------------------------------------------------

def _shared_candidates() -> list[Path]:
    """``<dir>/shared/data/mvtec_ad`` for every parent of the package and of the working folder."""
    starts = [Path(__file__).resolve().parent, Path.cwd().resolve()]
    seen, out = set(), []
    for start in starts:
        for parent in [start, *start.parents]:
            cand = parent / "shared" / "data" / "mvtec_ad"
            if cand not in seen:
                seen.add(cand)
                out.append(cand)
    return out


def user_cache_root() -> Path:
    """``$XDG_CACHE_HOME/adlib/mvtec_ad`` (default ``~/.cache/adlib/mvtec_ad``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "adlib" / "mvtec_ad"


def find_data_root(root: str | os.PathLike | None = None) -> Path:
    """The data root, in this order: ``root``; ``$ADLIB_DATA``; ``../shared/data/mvtec_ad`` beside
    the project (found by walking up from the package and from the working folder); the user cache.

    An explicit ``root`` or ``ADLIB_DATA`` is returned even if it does not exist (the dataset then
    says what is missing); the search falls through to the user cache otherwise.
    """
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get("ADLIB_DATA")
    if env:
        return Path(env).expanduser()
    for cand in _shared_candidates():
        if cand.is_dir():
            return cand
    return user_cache_root()


# --------------------------------------------------------------------------------------------
# Reading images and masks
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Preprocessing:
    """How an image file becomes a detector's input ``(3, S, S)``; detectors save it, so files of any
    size and bit depth are read at predict time as the training images were.

    The image is read as RGB (:func:`adlib.imagefiles.read_rgb`: 16-bit, 32-bit and float images by ``value_range``),
    resized to ``image_size`` (bilinear, antialiased), center-cropped to ``crop_size`` as in
    PatchCore/PaDiM, and ImageNet-normalized (or left in [0, 1] with ``normalize=False``). ``S`` is
    ``crop_size`` if given, else ``image_size``. Masks: nearest neighbour, non-zero = defective.
    """

    image_size: int = 256
    crop_size: int | None = None
    normalize: bool = True
    value_range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.image_size < 1:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        if self.crop_size is not None and not 1 <= self.crop_size <= self.image_size:
            raise ValueError(f"crop_size must be in [1, image_size={self.image_size}], got {self.crop_size}")
        if self.value_range is not None:
            object.__setattr__(self, "value_range", tuple(float(v) for v in self.value_range))
            if len(self.value_range) != 2 or not self.value_range[1] > self.value_range[0]:
                raise ValueError(f"value_range must be (low, high) with high > low, got {self.value_range}")

    @property
    def side(self) -> int:
        """Side of the square images it returns."""
        return self.crop_size or self.image_size

    def read(self, path: str | os.PathLike, mask: str | os.PathLike | None = None) -> tuple[Tensor, Tensor]:
        """A file (and its mask) -> ``(3, S, S)`` pixels (uint8, or float32 in [0, 1] for high-bit files)
        and a ``(1, S, S)`` uint8 mask in {0, 1} (zeros without ``mask``); not yet normalized."""
        pixels, mask_array = read_resized(path, self.image_size, self.crop_size, self.value_range, mask)
        return torch.from_numpy(pixels), torch.from_numpy(mask_array)

    def to_input(self, pixels: Tensor) -> Tensor:
        """``(..., 3, S, S)`` pixels from :meth:`read` -> float32 detector input (normalized if asked)."""
        image = pixels.float() / 255.0 if pixels.dtype == torch.uint8 else pixels.float()
        if self.normalize:
            image = normalize(image)
        return image

    def load(self, path: str | os.PathLike) -> Tensor:
        """One file -> detector input ``(3, S, S)``."""
        return self.to_input(self.read(path)[0])

    def load_many(self, paths: list[str | os.PathLike]) -> Tensor:
        """Files -> ``(N, 3, S, S)``."""
        return torch.stack([self.load(p) for p in paths])

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "Preprocessing":
        return cls(**values)


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())



@dataclass(frozen=True)
class _Entry:
    image: Path
    mask: Path | None
    defect: str


class MVTecDataset(Dataset):
    """One split of one category in the MVTec AD layout.

    Each item is a dict: ``image`` ``(3, S, S)`` float32, ImageNet-normalized (or in [0, 1] with
    ``normalize=False``); ``mask`` ``(1, S, S)`` float32 in {0, 1}, all zeros for good images;
    ``label`` 0 (good) or 1 (defective); ``defect`` the defect folder's name; ``path`` the image file.
    ``S`` is ``crop_size`` if given, else ``image_size``.

    Images are resized to ``image_size`` (bilinear, antialiased), then center-cropped to
    ``crop_size`` as in PatchCore/PaDiM; masks are resized with nearest neighbour. Decoded, resized
    images are cached in memory as uint8, float32 for 16-bit and float files (``cache=False`` to turn
    off). How files are read is :attr:`preprocessing` (a :class:`Preprocessing`), which a detector
    fitted on this dataset keeps.

    Args:
        root: data root; default :func:`find_data_root`.
        category: e.g. ``"bottle"``.
        split: ``"train"`` (``train/good``) or ``"test"`` (all of ``test/``).
        image_size: side after resizing.
        crop_size: side of the center crop, or None for no crop.
        normalize: apply ImageNet normalization.
        limit: keep only the first ``limit`` images of each defect folder (small runs).
        missing_masks: what to do with a defective test image that has no mask: ``"error"`` (default),
            ``"skip"`` it, or ``"none"``: keep it with an all-zero mask, for image-level data sets such as
            ELPV (:attr:`has_masks` is then False and :func:`adlib.evaluate` reports no pixel metrics).
        value_range: how 16-bit, 32-bit and float files map to [0, 1] (default: by their type; see
            :func:`adlib.imagefiles.scale_high_bit`).
    """

    def __init__(self, root: str | os.PathLike | None = None, category: str = "bottle", split: str = "train",
                 image_size: int = 256, crop_size: int | None = None, normalize: bool = True,
                 limit: int | None = None, missing_masks: str = "error", cache: bool = True,
                 value_range: tuple[float, float] | None = None):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if missing_masks not in ("error", "skip", "none"):
            raise ValueError(f"missing_masks must be 'error', 'skip' or 'none', got {missing_masks!r}")
        if crop_size is not None and crop_size > image_size:
            raise ValueError(f"crop_size {crop_size} is larger than image_size {image_size}")
        self.root = find_data_root(root)
        self.category = category
        self.split = split
        self.preprocessing = Preprocessing(image_size, crop_size, normalize, value_range)
        self.image_size = image_size
        self.crop_size = crop_size
        self.normalize = normalize
        self.folder = self.root / category
        self.entries = self._index(limit, missing_masks)
        self._cache: dict[int, tuple[Tensor, Tensor]] | None = {} if cache else None

    # -- indexing ------------------------------------------------------------------------------
    def _index(self, limit: int | None, missing_masks: str) -> list[_Entry]:
        if not self.folder.is_dir():
            available = sorted(p.name for p in self.root.iterdir() if p.is_dir()) if self.root.is_dir() else []
            hint = (f"categories found there: {available}" if available else
                    "the data root does not exist or is empty; set ADLIB_DATA, call adlib.data.download_mvtec(), "
                    "or make a synthetic set with adlib.data.make_synthetic()")
            raise DataError(f"{self.folder}: category folder {self.category!r} not found; {hint}")
        if self.split == "train":
            good = self.folder / "train" / "good"
            images = _list_images(good) if good.is_dir() else []
            if not images:
                raise DataError(f"{good}: no training images (expected normal images in train/good)")
            return [_Entry(p, None, "good") for p in images[:limit]]
        test = self.folder / "test"
        if not test.is_dir():
            raise DataError(f"{test}: test folder not found")
        entries: list[_Entry] = []
        for defect_dir in sorted(d for d in test.iterdir() if d.is_dir()):
            for path in _list_images(defect_dir)[:limit]:
                if defect_dir.name == "good":
                    entries.append(_Entry(path, None, "good"))
                    continue
                mask = self.folder / "ground_truth" / defect_dir.name / f"{path.stem}_mask.png"
                if not mask.is_file():
                    if missing_masks == "skip":
                        continue
                    if missing_masks == "none":
                        entries.append(_Entry(path, None, defect_dir.name))
                        continue
                    raise DataError(f"{path}: defective test image has no mask at {mask} "
                                    f"(pass missing_masks='skip', CLI --missing-masks skip, to leave such images out)")
                entries.append(_Entry(path, mask, defect_dir.name))
        if not entries:
            raise DataError(f"{test}: no test images")
        return entries

    # -- items -----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.entries)

    @property
    def labels(self) -> Tensor:
        """``(N,)`` int64: 1 for defective images."""
        return torch.tensor([int(e.defect != "good") for e in self.entries])

    @property
    def has_masks(self) -> bool:
        """Whether every defective image has a defect mask (pixel metrics are then defined)."""
        return all(e.mask is not None for e in self.entries if e.defect != "good")

    @property
    def defects(self) -> list[str]:
        return [e.defect for e in self.entries]

    @property
    def side(self) -> int:
        """Side of the returned square images."""
        return self.crop_size or self.image_size

    def _load_pixels(self, idx: int) -> tuple[Tensor, Tensor]:
        entry = self.entries[idx]
        return self.preprocessing.read(entry.image, entry.mask)

    def __getitem__(self, idx: int) -> dict:
        if self._cache is not None and idx in self._cache:
            pixels, mask = self._cache[idx]
        else:
            pixels, mask = self._load_pixels(idx)
            if self._cache is not None:
                self._cache[idx] = (pixels, mask)
        entry = self.entries[idx]
        return {"image": self.preprocessing.to_input(pixels), "mask": mask.float(),
                "label": int(entry.defect != "good"), "defect": entry.defect, "path": str(entry.image)}

    def __repr__(self) -> str:
        return (f"MVTecDataset(category={self.category!r}, split={self.split!r}, n={len(self)}, "
                f"side={self.side}, root={display_path(self.root)!r})")


class ImageFiles(Dataset):
    """Image files of normal images (any layout: a folder, a list) read with one :class:`Preprocessing`.

    Items are dicts with ``image`` ``(3, S, S)`` and ``path``, so :func:`train_batches` and
    ``Detector.fit`` take it like an MVTec AD split (and the detector keeps the preprocessing).
    """

    def __init__(self, paths: list[str | os.PathLike], preprocessing: Preprocessing | None = None):
        self.paths = [Path(p) for p in paths]
        if not self.paths:
            raise DataError("no image files given")
        self.preprocessing = preprocessing or Preprocessing()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, idx: int) -> dict:
        return {"image": self.preprocessing.load(self.paths[idx]), "path": str(self.paths[idx])}

    def __repr__(self) -> str:
        return f"ImageFiles(n={len(self)}, side={self.preprocessing.side})"


def list_image_files(inputs: list[str | os.PathLike]) -> list[Path]:
    """Files and folders -> image files: a folder gives its image files (sorted, not recursive), a
    file is taken as it is. Missing paths and folders without images are errors."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = _list_images(item)
            if not found:
                raise DataError(f"{item}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
            files.extend(found)
        elif item.is_file():
            files.append(item)
        else:
            raise DataError(f"{item}: no such file or folder")
    if not files:
        raise DataError("no image files given")
    return files


def holdout_split(n: int, fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Seeded split of ``n`` normal images into (fit, held-out) index lists, each sorted: the held-out
    images set a decision threshold (:func:`adlib.metrics.mean_std_threshold`), which needs at least 2
    of them, and the fit at least 2 images. ``fraction == 0`` holds out nothing."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"the held-out fraction must be in [0, 1), got {fraction}")
    if fraction == 0:
        return list(range(n)), []
    n_held = max(2, round(fraction * n))
    if n - n_held < 2:
        raise ValueError(f"{n} images are too few to hold out {n_held} for the threshold and fit on the rest; "
                         f"add images or hold out none")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[n_held:]), sorted(order[:n_held])


def load_split(dataset: MVTecDataset) -> tuple[Tensor, Tensor, Tensor]:
    """All of a split at once: images ``(N, 3, S, S)``, masks ``(N, 1, S, S)``, labels ``(N,)``."""
    items = [dataset[i] for i in range(len(dataset))]
    return (torch.stack([it["image"] for it in items]), torch.stack([it["mask"] for it in items]),
            torch.tensor([it["label"] for it in items]))


def batches(dataset: MVTecDataset, batch_size: int = 32) -> Iterator[Tensor]:
    """Image batches ``(B, 3, S, S)`` in order: the ``train`` argument of ``Detector.fit``."""
    for start in range(0, len(dataset), batch_size):
        yield torch.stack([dataset[i]["image"] for i in range(start, min(start + batch_size, len(dataset)))])


class _Batches:
    """A re-iterable view of :func:`batches` (detectors that train for several epochs iterate again)."""

    def __init__(self, dataset: MVTecDataset, batch_size: int):
        self.dataset, self.batch_size = dataset, batch_size

    def __iter__(self) -> Iterator[Tensor]:
        return batches(self.dataset, self.batch_size)

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    @property
    def preprocessing(self) -> Preprocessing | None:
        """How the dataset reads its files; ``Detector.fit`` saves it with the detector."""
        return self.dataset.preprocessing


def train_batches(dataset: MVTecDataset, batch_size: int = 32) -> _Batches:
    """Re-iterable image batches of a dataset, for ``Detector.fit`` (which takes its ``preprocessing``)."""
    return _Batches(dataset, batch_size)


def normalize(images: Tensor) -> Tensor:
    """Pixels in [0, 1] ``(..., 3, H, W)`` -> ImageNet-normalized detector input."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(3, 1, 1)
    return (images - mean) / std


def denormalize(images: Tensor, clamp: bool = True) -> Tensor:
    """ImageNet-normalized ``(..., 3, H, W)`` back to pixels in [0, 1] (``clamp=False``: without the
    clamp that removes rounding's steps outside [0, 1], so that :func:`normalize` inverts it exactly)."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(3, 1, 1)
    pixels = images * std + mean
    return pixels.clamp(0, 1) if clamp else pixels
