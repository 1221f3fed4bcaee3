"""Data: the MVTec AD folder layout, where data comes from, a downloader, a synthetic stand-in.

Layout (the same for every MVTec AD category and for :func:`make_synthetic`)::

    <root>/<category>/train/good/*.png
    <root>/<category>/test/<defect>/*.png          (defect == "good" for normal test images)
    <root>/<category>/ground_truth/<defect>/<name>_mask.png

MVTec AD is licensed CC BY-NC-SA 4.0 by MVTec Software GmbH (non-commercial use, attribution,
share-alike); cite Bergmann et al., CVPR 2019 and IJCV 2021.
"""

from __future__ import annotations

import os
import tarfile
import urllib.request
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from .hashing import file_sha256
from .imagefiles import IMAGE_SUFFIXES, IMAGENET_MEAN, IMAGENET_STD, DataError, read_resized

__all__ = [
    "DataError",
    "MVTecDataset",
    "find_data_root",
    "load_split",
    "batches",
    "train_batches",
    "download_mvtec",
    "make_synthetic",
    "choose_data",
    "DataChoice",
    "Preprocessing",
    "ImageFiles",
    "list_image_files",
    "normalize",
    "denormalize",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MVTEC_CATEGORIES",
]

MVTEC_CATEGORIES = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
                    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper")
# MVTec's own download server: one <category>.tar.xz per category below this folder.
MVTEC_URL = "https://www.mvtec.com/fileadmin/Redaktion/mvtec.com/company/research/datasets/mvtec_anomaly_detection/"
MVTEC_SHA256: dict[str, str] = {}  # SHA-256 of <category>.tar.xz where known: MVTec publishes none (see download_mvtec)
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

    The image is read as RGB (:func:`_read_rgb`: 16-bit, 32-bit and float images by ``value_range``),
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
            :func:`_scale_high_bit`).
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


def train_batches(dataset: MVTecDataset, batch_size: int = 32) -> _Batches:
    """Re-iterable image batches of a dataset, for ``Detector.fit``."""
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


# --------------------------------------------------------------------------------------------
# Downloader: one archive per category from MVTec's server; tests run it against a local server.
# --------------------------------------------------------------------------------------------

_EXTRACTING = ".adlib-extracting"   # in a category folder while download_mvtec extracts into it
_COMPLETE = ".complete"             # written there once the extraction is done


class _FetchFailed(Exception):
    """A transfer failed; the message says how (HTTP status, DNS, refused, timeout, connection cut)."""


def _reason(err: BaseException) -> str:
    import socket

    cause = getattr(err, "reason", None) or err
    text = str(cause) or type(cause).__name__
    if isinstance(cause, (TimeoutError, socket.timeout)):
        return f"timed out ({text})"
    if isinstance(cause, socket.gaierror):
        return f"the host name could not be resolved, no network or no DNS ({text})"
    if isinstance(cause, ConnectionRefusedError):
        return f"the connection was refused ({text})"
    return text


def _fetch(url: str, dest: Path, timeout: float = 60.0, chunk: int = 1 << 20) -> int:
    """Download ``url`` to ``dest`` with a progress bar on stderr, continuing a partial ``dest`` with an
    HTTP Range request (a server that ignores it sends everything again, which replaces ``dest``).

    Returns how many bytes of ``dest`` were there before and kept (0: all of it downloaded now).
    Raises :class:`_FetchFailed` on any network failure, leaving what arrived in ``dest``.
    """
    import http.client
    import sys
    from urllib.error import HTTPError

    from tqdm import tqdm

    start = dest.stat().st_size if dest.exists() else 0
    headers = {"User-Agent": "adlib", **({"Range": f"bytes={start}-"} if start else {})}
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except HTTPError as err:
        if err.code == 416 and start:   # nothing after `start`: the file is whole (the checks say)
            return start
        raise _FetchFailed(f"HTTP error {err.code} ({err.reason})") from err
    except (OSError, http.client.HTTPException) as err:   # URLError (DNS, refused), timeouts
        raise _FetchFailed(_reason(err)) from err
    with response:
        resumed = (bool(start) and getattr(response, "status", None) == 206
                   and response.headers.get("Content-Range", "").startswith(f"bytes {start}-"))
        kept = start if resumed else 0
        length = response.headers.get("Content-Length", "")
        total = kept + int(length) if length.isdigit() else None
        got = kept
        with open(dest, "ab" if resumed else "wb") as f, tqdm(
                total=total, initial=kept, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                desc=f"download {dest.name.removesuffix('.part')}") as bar:
            while True:
                try:
                    block = response.read(chunk)
                except (OSError, http.client.HTTPException) as err:
                    raise _FetchFailed(f"the connection broke after {got:,} bytes: {_reason(err)}") from err
                if not block:
                    break
                f.write(block)
                got += len(block)
                bar.update(len(block))
    if total is not None and got < total:
        raise _FetchFailed(f"the connection closed after {got:,} of {total:,} bytes")
    return kept


def _placement_help(category: str, root: Path) -> str:
    """Where MVTec AD comes from, its license, and how to put a category in place by hand."""
    return (f"MVTec AD is published by MVTec Software GmbH at {MVTEC_PAGE} under the {MVTEC_LICENSE} "
            f"license. To place '{category}' by hand, download it from that page and extract it so that\n"
            f"    {root}/{category}/train/good/*.png\n"
            f"    {root}/{category}/test/<defect>/*.png            (<defect> = good for normal images)\n"
            f"    {root}/{category}/ground_truth/<defect>/*_mask.png\n"
            f"exist, then set ADLIB_DATA={root} (or pass root=). Or save {category}.tar.xz in {root} and call "
            f"download_mvtec again: it checks and extracts that file and never deletes it. If MVTec moved its "
            f"files, set ADLIB_MVTEC_URL to the address of the folder that holds <category>.tar.xz.")


def _check_archive(path: Path, category: str) -> None:
    """Read all of ``path`` (xz's and gzip's own checks catch a corrupt or cut file) and check that it
    holds only ``<category>/...``, with images in ``<category>/train/good/`` and a ``<category>/test/``."""
    import lzma
    import zlib

    names = []
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                names.append(member.name)
                if member.isfile():
                    stream = tar.extractfile(member)
                    while stream.read(1 << 20):
                        pass
    except (tarfile.TarError, lzma.LZMAError, zlib.error, EOFError, OSError) as err:
        raise DataError(f"{path}: not a readable tar archive, or a corrupt or truncated one ({err})") from err
    parts = [Path(name).parts for name in names]
    if bad := [n for n, p in zip(names, parts) if Path(n).is_absolute() or ".." in p]:
        raise DataError(f"{path}: archive member {bad[0]!r} would be written outside the data root")
    tops = sorted({p[0] for p in parts if p and p[0] != "."})
    has_train = any(p[:3] == (category, "train", "good") and Path(*p).suffix.lower() in IMAGE_SUFFIXES for p in parts)
    if tops != [category] or not has_train or not any(p[:2] == (category, "test") for p in parts):
        raise DataError(f"{path}: not an MVTec AD '{category}' archive: expected only {category}/ with images in "
                        f"{category}/train/good/ and a {category}/test/ folder; its top-level names are "
                        f"{tops[:5]}{' ...' if len(tops) > 5 else ''}")


def _safe_members(archive: tarfile.TarFile, target: Path, categories: set[str] | None,
                  seen: set[str] | None = None) -> Iterator[tarfile.TarInfo]:
    """The members to extract: only files and folders, only inside ``target``, only of ``categories``
    (all if None), not those already extracted. Adds every top-level name to ``seen``."""
    target = target.resolve()
    for member in archive:
        if not (member.isfile() or member.isdir()):
            continue
        out = (target / member.name).resolve()
        if target not in out.parents and out != target:
            raise DataError(f"archive member {member.name!r} would be written outside {target}")
        top = Path(member.name).parts[0] if Path(member.name).parts else ""
        if seen is not None and top:
            seen.add(top)
        if categories is not None and top not in categories:
            continue
        # Resumable extraction: a file already there with the right size was extracted before.
        if member.isfile() and out.exists() and out.stat().st_size == member.size:
            continue
        yield member


def _unknown_categories(names: list[str], where: str) -> DataError:
    return DataError(f"{where} has no category {', '.join(map(repr, names))}; the MVTec AD categories are: "
                     f"{', '.join(MVTEC_CATEGORIES)}")


def _category_present(root: Path, category: str) -> bool:
    """``root/category`` is in place: ``train/good`` is there and no extraction of it was cut short."""
    return (root / category / "train" / "good").is_dir() and not (root / category / _EXTRACTING).exists()


def _set_aside(path: Path, kept: int) -> str:
    """A rejected download: deleted if this call downloaded all of it, else renamed (never lost)."""
    if not kept:
        path.unlink()
        return f"{path} (downloaded now) has been deleted"
    n, aside = 0, path.with_name(path.name.removesuffix(".part") + ".rejected")
    while aside.exists():
        n += 1
        aside = path.with_name(path.name.removesuffix(".part") + f".rejected{n}")
    path.rename(aside)
    return f"{path} (partly downloaded by an earlier call) has been renamed {aside.name}; delete it yourself"


def _foreign(folder: Path) -> bool:
    """``folder`` exists, not empty, and not from an extraction of download_mvtec's: never written into."""
    return ((folder.exists() or folder.is_symlink()) and not (folder / _EXTRACTING).exists()
            and (folder.is_symlink() or not folder.is_dir() or any(folder.iterdir())))


def _foreign_error(folder: Path) -> DataError:
    return DataError(f"{folder}: already exists but holds no {folder.name}/train/good; download_mvtec does not write "
                     f"into a folder it did not make and left it as it is: move it away, or complete it by hand")


def _extract(archive: Path, root: Path, category: str) -> None:
    """Extract ``category`` from ``archive`` into ``root``, resumably (see :func:`_safe_members`)."""
    import sys

    from tqdm import tqdm

    folder = root / category
    marker = folder / _EXTRACTING
    if _foreign(folder):
        raise _foreign_error(folder)
    folder.mkdir(parents=True, exist_ok=True)
    marker.touch()
    with tarfile.open(archive) as tar:
        for member in tqdm(_safe_members(tar, root, {category}), desc=f"extract {category}", unit=" files",
                           file=sys.stderr):
            if hasattr(tarfile, "data_filter"):
                tar.extract(member, root, filter="data")
            else:
                tar.extract(member, root)
    (folder / _COMPLETE).touch()
    marker.unlink()


def download_mvtec(root: str | os.PathLike | None = None, categories: str | list[str] | None = None,
                   url: str | None = None, sha256: dict[str, str | None] | None = None, keep_archive: bool = False,
                   timeout: float = 60.0) -> Path:
    """Download and extract MVTec AD categories into ``root`` (default: the user cache), one archive
    per category (``bottle.tar.xz`` is about 150 MB; all 15 together about 4.9 GB). Returns ``root``.

    ``categories``: a name or a list (default: all 15); a name that is not an MVTec AD category is
    refused before anything is downloaded. A category already in place (``root/<category>/train/good``,
    however it got there) is not downloaded again.

    Where from: ``url``, else the setting ``ADLIB_MVTEC_URL``, else :data:`MVTEC_URL` (MVTec's own
    server), is the folder holding ``<category>.tar.xz`` (or a pattern containing ``{category}``).

    Resumable: the download goes to ``<category>.tar.xz.part``, and a call after a cut continues it
    with an HTTP Range request; extraction skips files already extracted with the right size.

    Checked before it is renamed into place and before anything is extracted: the SHA-256 of each
    archive where known (``sha256`` maps category -> hex digest and adds to :data:`MVTEC_SHA256`; a
    value None skips the check). MVTec publishes no per-category checksums and none is known to adlib,
    so by default what can be verified is: the whole archive decompresses (xz's own CRC checks), it
    holds only ``<category>/``, with images in ``<category>/train/good/`` and a ``<category>/test/``,
    and no member would land outside ``root`` (nor links). A rejected download is deleted if this
    call downloaded all of it, else renamed ``.rejected``, and :class:`DataError` says expected and
    actual. A ``<category>.tar.xz`` already in ``root`` (saved there by you, or by ``keep_archive``)
    is checked and extracted, never deleted; one downloaded now is deleted once extracted.

    When the download fails (HTTP error such as 404, DNS, refused, timeout, a cut connection) one
    :class:`DataError` says why, where the official page is, the license, and how to put the data
    in place by hand. By downloading you accept MVTec AD's license: CC BY-NC-SA 4.0, non-commercial
    use only (MVTec Software GmbH, https://www.mvtec.com/company/research/datasets/mvtec-ad).
    """
    from adlib.settings import mvtec_url

    root = Path(root).expanduser() if root is not None else user_cache_root()
    wanted = list(dict.fromkeys([categories] if isinstance(categories, str) else (categories or MVTEC_CATEGORIES)))
    if unknown := [c for c in wanted if c not in MVTEC_CATEGORIES]:
        raise _unknown_categories(unknown, "MVTec AD")  # before downloading anything
    if blocked := [root / c for c in wanted if not _category_present(root, c) and _foreign(root / c)]:
        raise _foreign_error(blocked[0])  # before downloading anything
    base = url or mvtec_url() or MVTEC_URL
    checksums = {**MVTEC_SHA256, **(sha256 or {})}
    for category in wanted:
        if _category_present(root, category):
            continue
        root.mkdir(parents=True, exist_ok=True)
        archive = root / f"{category}.tar.xz"
        expected = (checksums.get(category) or "").lower() or None
        downloaded = not archive.exists()
        if downloaded:
            source = (base.replace("{category}", category) if "{category}" in base
                      else f"{base.rstrip('/')}/{category}.tar.xz")
            partial = archive.with_name(archive.name + ".part")
            try:
                kept = _fetch(source, partial, timeout)
            except _FetchFailed as err:
                size = partial.stat().st_size if partial.exists() else 0
                resume = (f" The {size:,} bytes received are kept in {partial}; call download_mvtec again to "
                          f"continue from there." if size else "")
                raise DataError(f"Could not download MVTec AD '{category}' from {source}: {err}.{resume}\n"
                                f"{_placement_help(category, root)}") from None
            if expected and (actual := file_sha256(partial)) != expected:
                raise DataError(f"{source}: SHA-256 mismatch for MVTec AD '{category}': expected {expected}, actual "
                                f"{actual}; {_set_aside(partial, kept)}. Nothing was extracted; call again to "
                                f"download afresh.")
            try:
                _check_archive(partial, category)
            except DataError as err:
                raise DataError(f"{source}: the download is not a valid MVTec AD '{category}' archive ({err}); "
                                f"{_set_aside(partial, kept)}. Nothing was extracted.\n"
                                f"{_placement_help(category, root)}") from None
            partial.rename(archive)
        else:
            how = ("This file was already there (adlib did not download it now) and is left as it is: move or "
                   "delete it yourself to download afresh")
            if expected and (actual := file_sha256(archive)) != expected:
                raise DataError(f"{archive}: SHA-256 {actual} does not match the expected {expected}. {how}, or pass "
                                f"sha256={{{category!r}: None}} to extract it unchecked")
            try:
                _check_archive(archive, category)
            except DataError as err:
                raise DataError(f"{err}. {how}.") from None
        _extract(archive, root, category)
        if downloaded and not keep_archive:
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


SYNTHETIC_MARKER = ".adlib-synthetic.json"


def _synthetic_files(n_train: int, n_test_good: int, n_test_defect: int) -> list[str]:
    """The files :func:`make_synthetic` writes in a category folder, relative to it."""
    files = [f"train/good/{i:03d}.png" for i in range(n_train)]
    files += [f"test/good/{i:03d}.png" for i in range(n_test_good)]
    for kind in ("scratch", "spot"):
        files += [f"test/{kind}/{i:03d}.png" for i in range(n_test_defect)]
        files += [f"ground_truth/{kind}/{i:03d}_mask.png" for i in range(n_test_defect)]
    return files


def _clear_own_synthetic(folder: Path) -> None:
    """Make way for :func:`make_synthetic` in ``folder``, deleting only what it wrote there before.

    A missing or empty folder is fine. A folder is emptied only if it holds the marker file
    :func:`make_synthetic` writes first, and no file but those the marker lists; otherwise nothing
    is touched and :class:`DataError` says how to proceed.
    """
    import json

    if not folder.exists() and not folder.is_symlink():
        return
    how = f"pass another category name, or move or delete {folder} yourself"
    if folder.is_symlink() or not folder.is_dir():
        raise DataError(f"{folder}: exists and is not a folder; make_synthetic left it as it is. To proceed, {how}")
    marker = folder / SYNTHETIC_MARKER
    if not marker.is_file():
        if not any(folder.iterdir()):
            return
        raise DataError(f"{folder}: already exists and was not made by make_synthetic (it has no {SYNTHETIC_MARKER}); "
                        f"make_synthetic does not delete folders it did not make and left it as it is. To proceed, {how}")
    try:
        own = json.loads(marker.read_text(encoding="utf-8"))["files"]
        if not (isinstance(own, list) and all(isinstance(f, str) for f in own)):
            raise TypeError("'files' is not a list of strings")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{marker}: unreadable ({err}); make_synthetic left {folder} as it is. To proceed, {how}") from err
    own_paths = {marker} | {folder / f for f in own if ".." not in Path(f).parts and not Path(f).is_absolute()}
    others = sorted(p for p in folder.rglob("*") if (p.is_symlink() or not p.is_dir()) and p not in own_paths)
    if others:
        shown = ", ".join(str(p.relative_to(folder)) for p in others[:3]) + (", ..." if len(others) > 3 else "")
        raise DataError(f"{folder}: made by make_synthetic, but it now also holds {len(others)} file(s) it did not "
                        f"write ({shown}); nothing was deleted. To proceed, {how}")
    for path in own_paths - {marker}:
        path.unlink(missing_ok=True)
    marker.unlink()
    for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        try:
            sub.rmdir()  # only folders left empty
        except OSError:
            pass


def make_synthetic(root: str | os.PathLike, category: str = "synthetic", n_train: int = 40, n_test_good: int = 10,
                   n_test_defect: int = 10, size: int = 128, seed: int = 0) -> Path:
    """Write a small synthetic category in the MVTec layout; deterministic for a seed, seconds to make.

    Normal images are ring patterns ("a bottle from above") with jitter and noise; defect types
    ``spot`` (a coloured disc) and ``scratch`` (a thin bright line) come with exact masks. Returns
    the data root (pass it as ``root`` to :class:`MVTecDataset`).

    The category folder gets a marker file, ``.adlib-synthetic.json`` (the parameters and the files
    written). An existing ``root/category`` is replaced only if it carries that marker and holds
    nothing else than those files; any other existing, non-empty folder raises :class:`DataError`
    and is left untouched.
    """
    import json

    root = Path(root)
    rng = np.random.default_rng(seed)
    folder = root / category
    _clear_own_synthetic(folder)
    files = _synthetic_files(n_train, n_test_good, n_test_defect)
    folder.mkdir(parents=True, exist_ok=True)
    params = {"category": category, "n_train": n_train, "n_test_good": n_test_good, "n_test_defect": n_test_defect,
              "size": size, "seed": seed}
    # Written first, so that a run stopped halfway still leaves a folder make_synthetic may replace.
    (folder / SYNTHETIC_MARKER).write_text(json.dumps({"made_by": "adlib.data.make_synthetic", "params": params,
                                                       "files": files}, indent=1) + "\n", encoding="utf-8")

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
    """Which data a notebook or script runs on: ``root``/``category`` and whether it is real.

    A synthetic stand-in is never silent: ``requested`` names the MVTec AD category it stands in for
    and ``reason`` why; :meth:`describe`, ``str()``, :meth:`banner` and, in a notebook, the displayed
    object (``_repr_html_``) all say that every number computed on it differs from the book's text.
    """

    root: Path
    category: str
    real: bool
    requested: str | None = None
    reason: str = ""

    def describe(self) -> str:
        if self.real and self.category.startswith("elpv_"):
            return (f"real ELPV solar cells '{self.category}' from {display_path(self.root)} "
                    f"(CC BY-NC-SA 4.0, Buerhop-Lutz et al. 2018; image labels only, no masks)")
        if self.real:
            return (f"real MVTec AD '{self.category}' from {display_path(self.root)} "
                    f"(CC BY-NC-SA 4.0, MVTec Software GmbH)")
        return (f"SYNTHETIC STAND-IN '{self.category}' in {display_path(self.root)}, not MVTec AD "
                f"'{self.requested or self.category}': every number below will differ from the text")

    def _banner_lines(self) -> list[str]:
        want = self.requested or "bottle"
        return [f"SYNTHETIC STAND-IN: this is not MVTec AD '{want}'.",
                "Every number below will differ from the text.",
                *([f"Why: {self.reason.rstrip('.')}."] if self.reason else []),
                f"For the real data: choose_data({want!r}, download=True), or place it by hand and set ADLIB_DATA "
                f"(see adlib.data.download_mvtec). MVTec AD: {MVTEC_PAGE}, license {MVTEC_LICENSE}.",
                f"Synthetic data used: '{self.category}' in {display_path(self.root)}."]

    def banner(self) -> str:
        """A plain-text box saying that the data is a synthetic stand-in; empty for real data."""
        if self.real:
            return ""
        import textwrap

        lines = [piece for line in self._banner_lines() for piece in textwrap.wrap(line, 74, break_long_words=True)]
        rule = "#" * 80
        return "\n".join([rule, *(f"## {line:<74} ##" for line in lines), rule])

    def _repr_html_(self) -> str:
        import html

        if self.real:
            return f"<p>data: {html.escape(self.describe())}</p>"
        head, *rest = self._banner_lines()
        body = "".join(f"<div>{html.escape(line)}</div>" for line in rest)
        return ('<div style="border:4px solid #c00;background:#fee;color:#600;padding:0.6em 1em;margin:0.6em 0">'
                f'<div style="font-size:1.3em;font-weight:bold">{html.escape(head)}</div>{body}</div>')

    def __str__(self) -> str:
        return self.describe() if self.real else f"{self.banner()}\n{self.describe()}"

    def show_banner(self) -> None:
        """Show :meth:`banner` (nothing for real data): an HTML box in a notebook, else text on stdout."""
        if self.real:
            return
        try:
            from IPython import get_ipython

            shell = get_ipython()
        except ImportError:
            shell = None
        if shell is not None and getattr(shell, "kernel", None) is not None:
            from IPython.display import display

            display({"text/html": self._repr_html_(), "text/plain": self.banner()}, raw=True)
        else:
            print(self.banner(), flush=True)


def _download_root(root: str | os.PathLike | None) -> Path:
    """Where :func:`choose_data` downloads: ``root``, else ``ADLIB_DATA``, else the user cache."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get("ADLIB_DATA")
    return Path(env).expanduser() if env else user_cache_root()


def choose_data(category: str = "bottle", root: str | os.PathLike | None = None,
                synthetic_root: str | os.PathLike | None = None, *, download: bool = False,
                synthetic: str = "fallback", banner: bool = True) -> DataChoice:
    """The data to run on: real MVTec AD ``category`` when it can be had, else a synthetic stand-in
    that never goes unannounced.

    ELPV's cell types (``"elpv_mono"``, ``"elpv_poly"``) come from the installed PyPI package
    ``elpv-dataset``, prepared once in the MVTec AD layout by :func:`adlib.elpv.prepare_elpv`.

    1. Real data already there is used: under :func:`find_data_root` (``root``, ``ADLIB_DATA``,
       ``../shared/data/mvtec_ad``), or, without ``root`` and ``ADLIB_DATA``, the user cache.
    2. Else, with ``download=True``, :func:`download_mvtec` fetches this one category (bottle: about
       150 MB) into ``root``, else ``ADLIB_DATA``, else the user cache.
    3. Else ``synthetic`` decides: ``"fallback"`` (default) makes a synthetic category (in
       ``synthetic_root``, default ``~/.cache/adlib/synthetic``) and shows a banner, an HTML box in a
       notebook and a text box on stdout elsewhere, saying it is not MVTec AD and every number differs
       from the text; ``"never"`` raises :class:`DataError` (with the download error, if any, and how to
       place the data); ``"always"`` uses the synthetic set even where real data exists (banner too).

    ``banner=False`` only stops the banner being shown now; the returned :class:`DataChoice` still
    says what it is (``describe()``, ``str()``, ``real``).
    """
    if synthetic not in ("fallback", "never", "always"):
        raise ValueError(f"synthetic must be 'fallback', 'never' or 'always', got {synthetic!r}")
    if synthetic == "always":
        reason = "synthetic='always' was asked for"
    elif category.startswith("elpv_"):
        from .elpv import prepare_elpv   # ELPV installs with pip (elpv-dataset); no download here

        try:
            return DataChoice(prepare_elpv(category), category, True, category)
        except DataError as err:
            if synthetic == "never":
                raise
            reason = str(err).splitlines()[0]
    else:
        found = find_data_root(root)
        places = [found] + ([user_cache_root()] if root is None and not os.environ.get("ADLIB_DATA") else [])
        for place in dict.fromkeys(places):
            if (place / category / "train" / "good").is_dir():
                return DataChoice(place, category, True, category)
        reason = (f"MVTec AD '{category}' was not found under "
                  f"{' or '.join(display_path(p) for p in dict.fromkeys(places))}")
        if download:
            try:
                return DataChoice(download_mvtec(_download_root(root), [category]), category, True, category)
            except DataError as err:
                if synthetic == "never":
                    raise
                reason += f", and downloading it failed: {str(err).splitlines()[0]}"
        elif synthetic == "never":
            raise DataError(f"{reason}, and synthetic='never' refuses a stand-in. Pass download=True to download "
                            f"it, or place it by hand.\n{_placement_help(category, _download_root(root))}")
    synthetic_root = Path(synthetic_root) if synthetic_root else user_cache_root().parent / "synthetic"
    if not (synthetic_root / "synthetic" / "train" / "good").is_dir():
        make_synthetic(synthetic_root, size=256, n_train=60, n_test_good=15, n_test_defect=15)
    choice = DataChoice(synthetic_root, "synthetic", False, category, reason)
    if banner:
        choice.show_banner()
    return choice
