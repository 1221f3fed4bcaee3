"""Image files to pixels, without PyTorch: what :class:`adlib.data.Preprocessing` and the exported
models' runner (:mod:`adlib.deploy`, numpy and onnxruntime only) both read files with, so that a
file gives the same pixels in training and on the production line.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["DataError", "IMAGE_SUFFIXES", "IMAGENET_MEAN", "IMAGENET_STD", "read_rgb", "read_mask", "read_resized",
           "pixels_to_unit", "center_crop_box"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class DataError(ValueError):
    """A data set problem, with the file or folder and what is wrong with it."""


_HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def read_rgb(path: Path, value_range: tuple[float, float] | None = None) -> Image.Image:
    """An image file as 8-bit ``RGB`` (grayscale, palette and RGBA become RGB), or, for 16-bit, 32-bit
    integer and float files, as a one-channel float ``F`` image in [0, 1] (see :func:`scale_high_bit`:
    never clipped, never cut to 8 bits). Errors name the file."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in _HIGH_BIT_MODES:
                return scale_high_bit(img, path, value_range)
            if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
                return Image.alpha_composite(background, rgba).convert("RGB")
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DataError(f"{path}: cannot read image: an unsupported format, or the file is corrupt or "
                        f"truncated ({err})") from err


def scale_high_bit(img: Image.Image, path: Path, value_range: tuple[float, float] | None) -> Image.Image:
    """A 16-bit, 32-bit integer or float image -> ``F`` image in [0, 1] by a fixed range, the same for
    every file (an anomaly may be an intensity: stretching each image to its own min-max would hide it).

    The range is ``value_range`` if given, else the type's: 16-bit 0..65535; 32-bit integers whose values
    fit 0..65535 (how Pillow opens many 16-bit PNGs) the same; floats 0..1. Values outside the range
    are refused, never clipped. A 12-bit camera writing 0..4095 into 16-bit files gives dark but exact
    images; pass ``value_range=(0, 4095)`` to use the whole scale.
    """
    pixels = np.asarray(img, dtype=np.float64)
    low, high = float(pixels.min()), float(pixels.max())
    if value_range is None:
        if img.mode == "F":
            value_range = (0.0, 1.0)
        elif img.mode == "I" and not (0 <= low and high <= 65535):
            raise DataError(f"{path}: 32-bit integer image with values in [{low:g}, {high:g}]; say how to "
                            f"scale it with value_range=(low, high) (CLI: --value-range LOW HIGH)")
        else:
            value_range = (0.0, 65535.0)
    lo, hi = (float(v) for v in value_range)
    if not hi > lo:
        raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}")
    if not np.isfinite(pixels).all():
        raise DataError(f"{path}: the image contains NaN or infinite values")
    if low < lo or high > hi:
        raise DataError(f"{path}: pixel values span [{low:g}, {high:g}], outside the value range "
                        f"[{lo:g}, {hi:g}] ({img.mode} image); pass value_range=(low, high) covering them "
                        f"(CLI: --value-range LOW HIGH) instead of having them clipped")
    return Image.fromarray(((pixels - lo) / (hi - lo)).astype(np.float32))   # 2-D float32: mode F


def read_mask(path: Path) -> Image.Image:
    """A mask file -> ``L`` image, 255 where any channel is non-zero (0/1, 0/255, 16-bit and colour
    masks alike: a labelling tool's "1" is as defective as 255)."""
    try:
        with Image.open(path) as img:
            img.load()
            values = np.asarray(img)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DataError(f"{path}: cannot read mask, the file is corrupt or truncated ({err})") from err
    defective = values != 0
    if defective.ndim == 3:
        defective = defective.any(-1)
    return Image.fromarray(defective.astype(np.uint8) * 255)   # 2-D uint8: mode L


def center_crop_box(width: int, height: int, crop: int) -> tuple[int, int, int, int]:
    left, top = (width - crop) // 2, (height - crop) // 2
    return left, top, left + crop, top + crop


def read_resized(path: str | os.PathLike, image_size: int, crop_size: int | None = None,
                 value_range: tuple[float, float] | None = None, mask: str | os.PathLike | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """A file (and its mask) -> ``(3, S, S)`` pixels (uint8, or float32 in [0, 1] for high-bit files)
    and a ``(1, S, S)`` uint8 mask in {0, 1} (zeros without ``mask``): resized to ``image_size``
    (bilinear, antialiased; the mask nearest), then center-cropped to ``crop_size``."""
    path = Path(path)
    image = read_rgb(path, value_range)
    mask_img = read_mask(Path(mask)) if mask is not None else Image.new("L", image.size, 0)
    if mask_img.size != image.size:
        raise DataError(f"{mask}: mask size {mask_img.size} differs from its image's {image.size} ({path})")
    size = (image_size, image_size)
    image = image.resize(size, Image.BILINEAR, reducing_gap=None)
    mask_img = mask_img.resize(size, Image.NEAREST)
    if crop_size is not None:
        box = center_crop_box(image_size, image_size, crop_size)
        image, mask_img = image.crop(box), mask_img.crop(box)
    if image.mode == "F":   # one float channel: the same for R, G and B
        plane = np.clip(np.asarray(image, dtype=np.float32), 0, 1)   # only bilinear's rounding steps outside
        pixels = np.ascontiguousarray(np.broadcast_to(plane[None], (3, *plane.shape)))
    else:
        pixels = np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))
    return pixels, (np.asarray(mask_img) > 127).astype(np.uint8)[None]


def pixels_to_unit(pixels: np.ndarray) -> np.ndarray:
    """Pixels from :func:`read_resized` -> float32 in [0, 1] (uint8 divided by 255)."""
    return pixels.astype(np.float32) / np.float32(255.0) if pixels.dtype == np.uint8 else pixels.astype(np.float32)
