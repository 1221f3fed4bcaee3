"""Negative data for methods that learn from pasted outliers (DenseHybrid): where pieces come from and
how they are pasted onto normal images.

A *source* gives pieces: an RGB image ``(3, h, w)`` in [0, 1] with a boolean mask ``(h, w)`` of the
pixels that belong to the piece. Two shapes, as in the DenseHybrid-for-industry paper:

- ``"rectangle"``: a random window of a photograph, all of it;
- ``"mask"``: an irregular region of a photograph, one of its superpixels (SLIC), with the window
  around it; the paper cuts object masks out of ADE20K instead.

:meth:`PhotoNegatives.offline` uses the real photographs that ship inside the scikit-image and
scikit-learn wheels (no download); :meth:`PhotoNegatives.from_folder` takes any folder of images
(ADE20K's, for instance), with optional masks beside them. Anything with a ``piece(generator)``
method returning ``(image, mask)`` can serve as a source.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["NegativeSource", "PhotoNegatives", "paste_negatives", "OFFLINE_PHOTOS", "SHAPES"]

SHAPES = ("rectangle", "mask")
# real photographs in scikit-image's wheel (no download); its synthetic images and masks are left out,
# and "cat", which is "chelsea" again
OFFLINE_PHOTOS = ("astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins", "grass",
                  "gravel", "hubble_deep_field", "immunohistochemistry", "moon", "page", "retina", "rocket", "text")


class NegativeSource(Protocol):
    def piece(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """One piece: image ``(3, h, w)`` in [0, 1] and its mask ``(h, w)`` bool (not all False)."""
        ...


def _to_rgb01(array: np.ndarray) -> Tensor:
    """An image array ``(H, W)``, ``(H, W, 3)`` or ``(H, W, 4)``, any integer or float range -> ``(3, H, W)`` in [0, 1]."""
    x = np.asarray(array)
    if x.dtype == bool:
        x = x.astype(np.float32)
    elif np.issubdtype(x.dtype, np.integer):
        x = x.astype(np.float32) / float(np.iinfo(x.dtype).max)
    else:
        x = x.astype(np.float32)
        lo, hi = float(x.min()), float(x.max())
        x = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
    if x.ndim == 2:
        x = np.repeat(x[..., None], 3, axis=2)
    return torch.from_numpy(np.ascontiguousarray(x[..., :3])).permute(2, 0, 1).contiguous()


def _shrink(image: Tensor, longest: int) -> Tensor:
    """``(3, H, W)`` scaled down so its longer side is at most ``longest`` (antialiased)."""
    h, w = image.shape[-2:]
    if max(h, w) <= longest:
        return image
    scale = longest / max(h, w)
    size = (max(8, round(h * scale)), max(8, round(w * scale)))
    return F.interpolate(image[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0].clamp_(0, 1)


def _superpixels(image: Tensor, n_segments: int) -> Tensor:
    """SLIC superpixel labels ``(H, W)`` int64 of an image ``(3, H, W)`` (labels start at 0)."""
    from skimage.segmentation import slic

    labels = slic(image.permute(1, 2, 0).numpy(), n_segments=n_segments, compactness=10, start_label=0)
    return torch.from_numpy(labels.astype(np.int64))


@dataclass
class PhotoNegatives:
    """Pieces of photographs: ``"rectangle"`` windows or ``"mask"``-shaped regions.

    Args:
        photos: images ``(3, H, W)`` in [0, 1] (each at most ``longest`` px after loading).
        shape: ``"rectangle"`` or ``"mask"``.
        names: one name per photo, for the record.
        regions: per photo, a label map ``(H, W)`` of the regions ``"mask"`` pieces are cut from;
            default: SLIC superpixels (about ``n_segments`` per photo).
    """

    photos: list[Tensor]
    shape: str = "mask"
    names: list[str] | None = None
    regions: list[Tensor] | None = None
    n_segments: int = 40
    min_region_pixels: int = 64

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {SHAPES}, got {self.shape!r}")
        if not self.photos:
            raise ValueError("no photos to cut negatives from")
        if self.shape == "mask":
            if self.regions is None:
                self.regions = [_superpixels(p, self.n_segments) for p in self.photos]
            self._pieces = [(i, int(lab)) for i, labels in enumerate(self.regions)
                            for lab, count in zip(*torch.unique(labels, return_counts=True))
                            if lab >= 0 and count >= self.min_region_pixels]   # -1: no region
            if not self._pieces:
                raise ValueError(f"no region of at least {self.min_region_pixels} pixels in the photos")

    @classmethod
    def offline(cls, shape: str = "mask", longest: int = 384) -> "PhotoNegatives":
        """The real photographs of scikit-image's wheel (:data:`OFFLINE_PHOTOS`) and scikit-learn's two
        sample images (china, flower): 19 photographs, no download (built once per process)."""
        return _offline(shape, longest)

    @classmethod
    def _load_offline(cls, shape: str, longest: int) -> "PhotoNegatives":
        import skimage.data
        from sklearn.datasets import load_sample_images

        photos, names = [], []
        for name in OFFLINE_PHOTOS:
            photos.append(_shrink(_to_rgb01(getattr(skimage.data, name)()), longest))
            names.append(f"skimage.data.{name}")
        sample = load_sample_images()
        for image, filename in zip(sample.images, sample.filenames):
            photos.append(_shrink(_to_rgb01(image), longest))
            names.append(f"sklearn {Path(filename).name}")
        return cls(photos, shape, names)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, shape: str = "mask", masks: str | os.PathLike | None = None,
                    longest: int = 384, limit: int | None = None) -> "PhotoNegatives":
        """Photos of ``folder`` as a source (built once per process for the same arguments); see
        :meth:`_load_folder`."""
        return _folder(os.fspath(folder), shape, None if masks is None else os.fspath(masks), longest, limit)

    @classmethod
    def _load_folder(cls, folder: str | os.PathLike, shape: str = "mask", masks: str | os.PathLike | None = None,
                     longest: int = 384, limit: int | None = None) -> "PhotoNegatives":
        """Photos from ``folder`` (jpg/png, sorted); with ``masks``, a folder of label images of the
        same stems (e.g. ADE20K's object masks: each non-zero label is one region), else superpixels."""
        from PIL import Image

        paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:limit]
        if not paths:
            raise ValueError(f"{folder}: no .jpg or .png images to cut negatives from")
        photos, regions = [], [] if masks is not None else None
        for path in paths:
            photo = _to_rgb01(np.asarray(Image.open(path).convert("RGB")))
            if regions is not None:
                label_path = next((Path(masks) / f"{path.stem}{ext}" for ext in (".png", ".jpg")
                                   if (Path(masks) / f"{path.stem}{ext}").is_file()), None)
                if label_path is None:
                    raise ValueError(f"no mask for {path.name} in {masks}")
                labels = torch.from_numpy(np.asarray(Image.open(label_path)).astype(np.int64))
                if labels.ndim == 3:
                    labels = labels[..., 0] * 65536 + labels[..., 1] * 256 + labels[..., 2]
                if labels.shape != photo.shape[-2:]:
                    raise ValueError(f"{label_path.name}: mask of size {tuple(labels.shape)}, photo of {tuple(photo.shape[-2:])}")
                labels = torch.where(labels == 0, -1, labels)        # label 0: no object
                photo = _shrink(photo, longest)
                regions.append(F.interpolate(labels[None, None].double(), size=photo.shape[-2:],
                                             mode="nearest")[0, 0].long())
            else:
                photo = _shrink(photo, longest)
            photos.append(photo)
        return cls(photos, shape, [p.name for p in paths], regions)

    def piece(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """A random piece: ``(3, h, w)`` in [0, 1] and its mask ``(h, w)``."""
        if self.shape == "rectangle":
            photo = self.photos[int(torch.randint(len(self.photos), (1,), generator=generator))]
            h, w = photo.shape[-2:]
            ph = int(torch.randint(max(1, h // 8), max(1, h // 2) + 1, (1,), generator=generator))
            pw = int(torch.randint(max(1, w // 8), max(1, w // 2) + 1, (1,), generator=generator))
            y = int(torch.randint(0, h - ph + 1, (1,), generator=generator))
            x = int(torch.randint(0, w - pw + 1, (1,), generator=generator))
            return photo[:, y:y + ph, x:x + pw], torch.ones(ph, pw, dtype=torch.bool)
        i, label = self._pieces[int(torch.randint(len(self._pieces), (1,), generator=generator))]
        region = self.regions[i] == label
        ys, xs = torch.nonzero(region, as_tuple=True)
        y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
        return self.photos[i][:, y0:y1, x0:x1], region[y0:y1, x0:x1]


def _resized_piece(source: NegativeSource, generator: torch.Generator, scale: tuple[float, float], h: int, w: int,
                   tries: int = 20) -> tuple[Tensor, Tensor, tuple[int, int]]:
    """A piece scaled so its longer side is ``scale`` (uniform) times the shorter image side, keeping
    its aspect ratio and fitting the image; the mask is resampled like the piece (bilinear, > 0.5)
    and a piece whose mask vanishes at that size is drawn again."""
    for _ in range(tries):
        piece, mask = source.piece(generator)
        side = scale[0] + (scale[1] - scale[0]) * float(torch.rand((), generator=generator))
        ph, pw = piece.shape[-2:]
        ratio = min(max(2, round(side * min(h, w))) / max(ph, pw), h / ph, w / pw)
        size = (max(1, round(ph * ratio)), max(1, round(pw * ratio)))
        resized = F.interpolate(piece[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
        shrunk = F.interpolate(mask[None, None].float(), size=size, mode="bilinear", antialias=True,
                               align_corners=False)[0, 0] > 0.5
        if shrunk.any():
            return resized.clamp(0, 1), shrunk, size
    raise ValueError(f"the negative source gave {tries} pieces in a row that vanish at the pasted size; "
                     f"raise the paste scale")


def paste_negatives(images: Tensor, source: NegativeSource, generator: torch.Generator,
                    scale: tuple[float, float] = (0.1, 0.35), per_image: tuple[int, int] = (1, 2)
                    ) -> tuple[Tensor, Tensor]:
    """Paste pieces of ``source`` onto ``images (B, 3, H, W)`` in [0, 1]: each image gets between
    ``per_image[0]`` and ``per_image[1]`` pieces, each resized so its longer side is ``scale`` times
    the image's shorter side (uniform), at a random place wholly inside the image.

    Returns the pasted images ``(B, 3, H, W)`` and masks ``(B, 1, H, W)`` (1 = pasted pixel): a pixel
    changes only where its mask is 1, and takes the piece's value there.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    if not 0 < scale[0] <= scale[1] <= 1 or not 0 <= per_image[0] <= per_image[1]:
        raise ValueError(f"need 0 < scale min <= max <= 1 and 0 <= per_image min <= max; got {scale}, {per_image}")
    b, _, h, w = images.shape
    out, masks = images.clone(), torch.zeros(b, 1, h, w, dtype=images.dtype, device=images.device)
    for i in range(b):
        count = int(torch.randint(per_image[0], per_image[1] + 1, (1,), generator=generator))
        for _ in range(count):
            piece, mask, size = _resized_piece(source, generator, scale, h, w)
            y = int(torch.randint(0, h - size[0] + 1, (1,), generator=generator))
            x = int(torch.randint(0, w - size[1] + 1, (1,), generator=generator))
            window = (slice(y, y + size[0]), slice(x, x + size[1]))
            mask = mask.to(images.device)
            out[i, :, window[0], window[1]] = torch.where(mask, piece.to(images), out[i, :, window[0], window[1]])
            masks[i, 0, window[0], window[1]] = torch.maximum(masks[i, 0, window[0], window[1]], mask.to(masks.dtype))
    return out, masks


@functools.lru_cache(maxsize=4)
def _offline(shape: str, longest: int) -> PhotoNegatives:
    return PhotoNegatives._load_offline(shape, longest)


@functools.lru_cache(maxsize=4)
def _folder(folder: str, shape: str, masks: str | None, longest: int, limit: int | None) -> PhotoNegatives:
    return PhotoNegatives._load_folder(folder, shape, masks, longest, limit)
