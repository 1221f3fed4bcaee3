"""Data: the MVTec AD folder layout, where data comes from, a downloader, a synthetic stand-in.

Layout (the same for every MVTec AD category and for :func:`make_synthetic`)::

    <root>/<category>/train/good/*.png
    <root>/<category>/test/<defect>/*.png          (defect == "good" for normal test images)
    <root>/<category>/ground_truth/<defect>/<name>_mask.png

MVTec AD is licensed CC BY-NC-SA 4.0 by MVTec Software GmbH (non-commercial use, attribution,
share-alike); cite Bergmann et al., CVPR 2019 and IJCV 2021.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

__all__ = [
    "DataError",
    "MVTecDataset",
    "Split",
    "find_data_root",
    "load_split",
    "batches",
    "train_batches",
    "download_mvtec",
    "make_synthetic",
    "choose_data",
    "DataChoice",
    "denormalize",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MVTEC_CATEGORIES",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MVTEC_CATEGORIES = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
                    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper")
MVTEC_URL = ("https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f282/download/"
             "420938113-1629952094/mvtec_anomaly_detection.tar.xz")
MVTEC_SHA256 = "cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def display_path(path: Path) -> str:
    """``path`` relative to the working folder when it is nearby (keeps printed output portable)."""
    try:
        rel = os.path.relpath(path)
    except ValueError:  # another drive on Windows
        return str(path)
    return rel if Path(rel).parts[:4].count("..") < 4 else str(path)


class DataError(ValueError):
    """A data set problem, with the file or folder and what is wrong with it."""


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

def _read_rgb(path: Path) -> Image.Image:
    """An image as 3-channel RGB (grayscale, palette and RGBA become RGB); errors name the file."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
                return Image.alpha_composite(background, rgba).convert("RGB")
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DataError(f"{path}: cannot read image, the file is corrupt or truncated ({err})") from err


def _read_mask(path: Path) -> Image.Image:
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("L")
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DataError(f"{path}: cannot read mask, the file is corrupt or truncated ({err})") from err


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _center_crop_box(width: int, height: int, crop: int) -> tuple[int, int, int, int]:
    left, top = (width - crop) // 2, (height - crop) // 2
    return left, top, left + crop, top + crop


@dataclass(frozen=True)
class _Entry:
    image: Path
    mask: Path | None
    defect: str


Split = str  # "train" or "test"


class MVTecDataset(Dataset):
    """One split of one category in the MVTec AD layout.

    Each item is a dict: ``image`` ``(3, S, S)`` float32, ImageNet-normalized (or in [0, 1] with
    ``normalize=False``); ``mask`` ``(1, S, S)`` float32 in {0, 1}, all zeros for good images;
    ``label`` 0 (good) or 1 (defective); ``defect`` the defect folder's name; ``path`` the image file.
    ``S`` is ``crop_size`` if given, else ``image_size``.

    Images are resized to ``image_size`` (bilinear, antialiased), then center-cropped to
    ``crop_size`` as in PatchCore/PaDiM; masks are resized with nearest neighbour. Decoded, resized
    images are cached in memory as uint8 (``cache=False`` to turn off).

    Args:
        root: data root; default :func:`find_data_root`.
        category: e.g. ``"bottle"``.
        split: ``"train"`` (``train/good``) or ``"test"`` (all of ``test/``).
        image_size: side after resizing.
        crop_size: side of the center crop, or None for no crop.
        normalize: apply ImageNet normalization.
        limit: keep only the first ``limit`` images of each defect folder (small runs).
        missing_masks: ``"error"`` (default) or ``"skip"`` defective test images without a mask.
    """

    def __init__(self, root: str | os.PathLike | None = None, category: str = "bottle", split: Split = "train",
                 image_size: int = 256, crop_size: int | None = None, normalize: bool = True,
                 limit: int | None = None, missing_masks: str = "error", cache: bool = True):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if missing_masks not in ("error", "skip"):
            raise ValueError(f"missing_masks must be 'error' or 'skip', got {missing_masks!r}")
        if crop_size is not None and crop_size > image_size:
            raise ValueError(f"crop_size {crop_size} is larger than image_size {image_size}")
        self.root = find_data_root(root)
        self.category = category
        self.split = split
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
                    raise DataError(f"{path}: defective test image has no mask at {mask} "
                                    f"(pass missing_masks='skip' to leave such images out)")
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
    def defects(self) -> list[str]:
        return [e.defect for e in self.entries]

    @property
    def side(self) -> int:
        """Side of the returned square images."""
        return self.crop_size or self.image_size

    def _load_uint8(self, idx: int) -> tuple[Tensor, Tensor]:
        entry = self.entries[idx]
        image = _read_rgb(entry.image)
        if entry.mask is not None:
            mask = _read_mask(entry.mask)
            if mask.size != image.size:
                raise DataError(f"{entry.mask}: mask size {mask.size} differs from its image's {image.size} "
                                f"({entry.image})")
        else:
            mask = Image.new("L", image.size, 0)
        size = (self.image_size, self.image_size)
        image = image.resize(size, Image.BILINEAR, reducing_gap=None)
        mask = mask.resize(size, Image.NEAREST)
        if self.crop_size is not None:
            box = _center_crop_box(self.image_size, self.image_size, self.crop_size)
            image, mask = image.crop(box), mask.crop(box)
        image_t = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
        mask_t = torch.from_numpy((np.asarray(mask) > 127).astype(np.uint8))[None]
        return image_t, mask_t

    def __getitem__(self, idx: int) -> dict:
        if self._cache is not None and idx in self._cache:
            image_u8, mask_u8 = self._cache[idx]
        else:
            image_u8, mask_u8 = self._load_uint8(idx)
            if self._cache is not None:
                self._cache[idx] = (image_u8, mask_u8)
        image = image_u8.float() / 255.0
        if self.normalize:
            image = (image - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
        entry = self.entries[idx]
        return {"image": image, "mask": mask_u8.float(), "label": int(entry.defect != "good"),
                "defect": entry.defect, "path": str(entry.image)}

    def __repr__(self) -> str:
        return (f"MVTecDataset(category={self.category!r}, split={self.split!r}, n={len(self)}, "
                f"side={self.side}, root={display_path(self.root)!r})")


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


def train_batches(dataset: MVTecDataset, batch_size: int = 32) -> _Batches:
    """Re-iterable image batches of a dataset, for ``Detector.fit``."""
    return _Batches(dataset, batch_size)



def denormalize(images: Tensor) -> Tensor:
    """ImageNet-normalized ``(..., 3, H, W)`` back to [0, 1] for display."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(3, 1, 1)
    return (images * std + mean).clamp(0, 1)


# --------------------------------------------------------------------------------------------
# Downloader: real code for users with internet; tests run it against a local archive.
# --------------------------------------------------------------------------------------------

def _sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _fetch(url: str, dest: Path, chunk: int = 1 << 20) -> None:
    """Download ``url`` to ``dest``, resuming a partial ``dest`` with an HTTP Range request."""
    from tqdm import tqdm

    start = dest.stat().st_size if dest.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={start}-"} if start else {})
    with urllib.request.urlopen(request) as response:
        status = getattr(response, "status", None)
        if start and status != 206:  # server (or file://) ignored the range: skip what we have
            remaining = start
            while remaining:
                got = response.read(min(chunk, remaining))
                if not got:
                    break
                remaining -= len(got)
        length = response.headers.get("Content-Length")
        total = start + int(length) if (length and status == 206) else (int(length) if length else None)
        with open(dest, "ab") as f, tqdm(total=total, initial=start, unit="B", unit_scale=True,
                                         desc=f"download {dest.name}") as bar:
            while block := response.read(chunk):
                f.write(block)
                bar.update(len(block))


def _safe_members(archive: tarfile.TarFile, target: Path, categories: set[str] | None) -> Iterator[tarfile.TarInfo]:
    target = target.resolve()
    for member in archive:
        if not (member.isfile() or member.isdir()):
            continue
        out = (target / member.name).resolve()
        if target not in out.parents and out != target:
            raise DataError(f"archive member {member.name!r} would be written outside {target}")
        top = Path(member.name).parts[0] if Path(member.name).parts else ""
        if categories is not None and top not in categories:
            continue
        # Resumable extraction: a file already there with the right size was extracted before.
        if member.isfile() and out.exists() and out.stat().st_size == member.size:
            continue
        yield member


def download_mvtec(root: str | os.PathLike | None = None, categories: list[str] | None = None,
                   url: str = MVTEC_URL, sha256: str | None = MVTEC_SHA256, keep_archive: bool = False) -> Path:
    """Download and extract MVTec AD (4.9 GB) into ``root`` (default: the user cache).

    Resumable at both steps: a partial archive continues where it stopped (HTTP Range), and
    extraction skips files already extracted with the right size. The archive's SHA-256 is checked
    before anything is extracted; a mismatch deletes it and raises. ``categories`` extracts only
    those. Returns the data root. By downloading you accept the license of MVTec AD
    (CC BY-NC-SA 4.0, non-commercial use only).
    """
    root = Path(root).expanduser() if root is not None else user_cache_root()
    root.mkdir(parents=True, exist_ok=True)
    wanted = set(categories) if categories else None
    if wanted and all((root / c / "train" / "good").is_dir() and (root / c / ".complete").exists() for c in wanted):
        return root
    archive = root / Path(urllib.request.urlparse(url).path).name
    partial = archive.with_name(archive.name + ".part")
    if not archive.exists():
        _fetch(url, partial)
        partial.rename(archive)
    if sha256 is not None:
        actual = _sha256(archive)
        if actual != sha256:
            archive.unlink()
            raise DataError(f"{archive}: SHA-256 {actual} does not match the expected {sha256}; "
                            f"the download was corrupt and has been deleted, call again to retry")
    from tqdm import tqdm

    with tarfile.open(archive) as tar:
        for member in tqdm(_safe_members(tar, root, wanted), desc="extract", unit="file"):
            tar.extract(member, root, filter="data") if hasattr(tarfile, "data_filter") else tar.extract(member, root)
    extracted = wanted or {p.name for p in root.iterdir() if (p / "train").is_dir()}
    for category in extracted:
        (root / category / ".complete").touch()
    if not keep_archive:
        archive.unlink()
    return root


# --------------------------------------------------------------------------------------------
# A synthetic data set in the same layout: a fallback and a teaching aid, not a result.
# --------------------------------------------------------------------------------------------

def _synthetic_normal(rng: np.random.Generator, size: int) -> np.ndarray:
    """A 'bottle seen from above': concentric rings on a dark background, jittered, with texture."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx = size / 2 + rng.normal(0, size * 0.01, 2)
    r = np.hypot(yy - cy, xx - cx) / size
    base = np.where(r < 0.42, 0.55 + 0.25 * np.cos(r * 40.0 + rng.uniform(-0.2, 0.2)), 0.08)
    base = base + rng.normal(0, 0.02, (size, size))
    tint = np.array([0.55, 0.45, 0.3]) + rng.normal(0, 0.01, 3)
    return np.clip(base[..., None] * tint / tint.max(), 0, 1)


def _synthetic_defect(rng: np.random.Generator, image: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape[0]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    centre = size / 2 + rng.uniform(-0.25, 0.25, 2) * size
    if kind == "spot":
        radius = rng.uniform(0.03, 0.08) * size
        mask = np.hypot(yy - centre[0], xx - centre[1]) < radius
        colour = rng.uniform(0, 1, 3)
    else:  # scratch: a thin straight line
        angle = rng.uniform(0, np.pi)
        length = rng.uniform(0.15, 0.35) * size
        d = np.stack([yy - centre[0], xx - centre[1]])
        along = d[0] * np.sin(angle) + d[1] * np.cos(angle)
        across = -d[0] * np.cos(angle) + d[1] * np.sin(angle)
        mask = (np.abs(across) < max(1.0, size * 0.008)) & (np.abs(along) < length / 2)
        colour = np.array([0.95, 0.95, 0.9])
    out = image.copy()
    out[mask] = colour
    return out, mask


def make_synthetic(root: str | os.PathLike, category: str = "synthetic", n_train: int = 40, n_test_good: int = 10,
                   n_test_defect: int = 10, size: int = 128, seed: int = 0) -> Path:
    """Write a small synthetic category in the MVTec layout; deterministic for a seed, seconds to make.

    Normal images are ring patterns ("a bottle from above") with jitter and noise; defect types
    ``spot`` (a coloured disc) and ``scratch`` (a thin bright line) come with exact masks. Returns
    the data root (pass it as ``root`` to :class:`MVTecDataset`).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    folder = root / category
    if folder.exists():
        shutil.rmtree(folder)

    def save(array: np.ndarray, path: Path, mode: str = "RGB") -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = (array * 255).round().astype(np.uint8) if mode == "RGB" else array.astype(np.uint8) * 255
        Image.fromarray(data, mode).save(path)

    for i in range(n_train):
        save(_synthetic_normal(rng, size), folder / "train" / "good" / f"{i:03d}.png")
    for i in range(n_test_good):
        save(_synthetic_normal(rng, size), folder / "test" / "good" / f"{i:03d}.png")
    for kind in ("scratch", "spot"):
        for i in range(n_test_defect):
            image, mask = _synthetic_defect(rng, _synthetic_normal(rng, size), kind)
            save(image, folder / "test" / kind / f"{i:03d}.png")
            save(mask, folder / "ground_truth" / kind / f"{i:03d}_mask.png", mode="L")
    return root


@dataclass(frozen=True)
class DataChoice:
    """Which data a notebook or script runs on: ``root``/``category`` and whether it is real."""

    root: Path
    category: str
    real: bool

    def describe(self) -> str:
        if self.real:
            return (f"real MVTec AD '{self.category}' from {display_path(self.root)} "
                    f"(CC BY-NC-SA 4.0, MVTec Software GmbH)")
        return (f"SYNTHETIC stand-in '{self.category}' in {display_path(self.root)}: MVTec AD was not found, so numbers "
                f"below are not results on real data")


def choose_data(category: str = "bottle", root: str | os.PathLike | None = None,
                synthetic_root: str | os.PathLike | None = None) -> DataChoice:
    """Real data for ``category`` when it is there (see :func:`find_data_root`), else a synthetic
    category made on the fly, so every notebook runs anywhere and says which data it used."""
    found = find_data_root(root)
    if (found / category / "train" / "good").is_dir():
        return DataChoice(found, category, True)
    synthetic_root = Path(synthetic_root) if synthetic_root else user_cache_root().parent / "synthetic"
    if not (synthetic_root / "synthetic" / "train" / "good").is_dir():
        make_synthetic(synthetic_root, size=256, n_train=60, n_test_good=15, n_test_defect=15)
    return DataChoice(synthetic_root, "synthetic", False)
