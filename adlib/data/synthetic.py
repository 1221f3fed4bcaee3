"""A synthetic data set in the MVTec AD layout: a fallback and a teaching aid, not a result."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from ..imagefiles import DataError

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
