"""The ELPV solar-cell data set as an image-level anomaly detection category in the MVTec AD layout.

ELPV (Buerhop-Lutz et al. 2018, Deitsch et al. 2019) holds 2,624 real electroluminescence images of
solar cells, 300 x 300, 8-bit grayscale, from 44 modules, each with a defect probability (0, 1/3,
2/3 or 1) given by an expert and the cell type (``mono`` or ``poly`` crystalline). It installs
offline from PyPI (``pip install elpv-dataset``); licence CC BY-NC-SA 4.0 (images) and Apache-2.0
(code). There are no defect masks: ELPV measures image scores only, and the pixel metrics of an
evaluation on it are NaN.

:func:`prepare_elpv` turns one cell type into a category that :class:`adlib.data.MVTecDataset`
reads like any other (file copies, no re-encoding)::

    <root>/elpv_mono/train/good/           75% of the cells with defect probability 0 (seeded split)
    <root>/elpv_mono/test/good/            the other 25% of them
    <root>/elpv_mono/test/defect_p033/     probability 1/3 (an expert unsure: hardest)
    <root>/elpv_mono/test/defect_p067/     probability 2/3
    <root>/elpv_mono/test/defect_p100/     probability 1 (defective for certain)

The split is this book's own choice (the data set defines none for anomaly detection): train on
normal cells of one type only, test on every other cell of that type. ``labels.csv`` does not say
which module a cell came from, so cells of one module can land in both train and test: a split by
module would be stricter.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from .data import DataError, user_cache_root

__all__ = ["ELPV_CATEGORIES", "ELPV_LICENSE", "ELPV_CITATION", "elpv_source", "elpv_root", "is_elpv",
           "prepare_elpv", "read_labels"]

ELPV_CATEGORIES = ("elpv_mono", "elpv_poly")
ELPV_LICENSE = "CC BY-NC-SA 4.0 (images; non-commercial use only), Apache-2.0 (the package's code)"
ELPV_CITATION = ("C. Buerhop-Lutz, S. Deitsch, A. Maier, F. Gallwitz, S. Berger, B. Doll, J. Hauch, C. Camus, "
                 "C. J. Brabec, 'A Benchmark for Visual Identification of Defective Solar Cells in "
                 "Electroluminescence Imagery', EU PVSEC 2018; S. Deitsch et al., Solar Energy 185, 2019")
_MARKER = ".adlib-elpv.json"
_DEFECT_FOLDERS = {1 / 3: "defect_p033", 2 / 3: "defect_p067", 1.0: "defect_p100"}


def is_elpv(category: str) -> bool:
    """Whether ``category`` names an ELPV cell type (``elpv_mono`` or ``elpv_poly``)."""
    return category in ELPV_CATEGORIES


def elpv_root() -> Path:
    """Where prepared ELPV categories live: ``ADLIB_ELPV`` if set, else ``~/.cache/adlib/elpv``."""
    env = os.environ.get("ADLIB_ELPV")
    return Path(env).expanduser() if env else user_cache_root().parent / "elpv"


def elpv_source() -> Path:
    """The installed package's data folder (``labels.csv`` and ``images/``)."""
    try:
        import elpv_dataset
    except ImportError as err:
        raise DataError("the ELPV solar-cell data comes from the PyPI package elpv-dataset (about 90 MB, "
                        "CC BY-NC-SA 4.0): pip install elpv-dataset") from err
    folder = Path(elpv_dataset.__file__).parent / "data"
    if not (folder / "labels.csv").is_file():
        raise DataError(f"{folder}: the elpv-dataset package has no data/labels.csv; reinstall it")
    return folder


def read_labels(source: Path) -> list[tuple[str, float, str]]:
    """``labels.csv`` -> (relative image path, defect probability, cell type) per cell, file order."""
    rows = []
    for number, line in enumerate((source / "labels.csv").read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 3:
            raise DataError(f"{source / 'labels.csv'}:{number}: expected 'path probability type', got {line!r}")
        rows.append((parts[0], float(parts[1]), parts[2]))
    return rows


def _defect_folder(probability: float) -> str:
    for value, name in _DEFECT_FOLDERS.items():
        if abs(probability - value) < 1e-6:
            return name
    raise DataError(f"unexpected ELPV defect probability {probability} (expected 0, 1/3, 2/3 or 1)")


def _plan(rows: list[tuple[str, float, str]], cell_type: str, test_fraction: float,
          seed: int) -> dict[str, list[str]]:
    """Folder (``train/good``, ``test/...``) -> the image paths going there."""
    cells = [(path, p) for path, p, kind in rows if kind == cell_type]
    normal = sorted(path for path, p in cells if p == 0.0)
    order = np.random.default_rng(seed).permutation(len(normal))
    n_test = int(round(test_fraction * len(normal)))
    plan: dict[str, list[str]] = {"train/good": sorted(normal[i] for i in order[n_test:]),
                                  "test/good": sorted(normal[i] for i in order[:n_test])}
    for path, p in cells:
        if p > 0.0:
            plan.setdefault(f"test/{_defect_folder(p)}", []).append(path)
    return plan


def prepare_elpv(category: str = "elpv_mono", root: str | os.PathLike | None = None, *,
                 test_fraction: float = 0.25, seed: int = 0) -> Path:
    """Write ELPV's ``category`` (``elpv_mono`` or ``elpv_poly``) in the MVTec AD layout under
    ``root`` (default :func:`elpv_root`) and return ``root``. Already prepared with the same split:
    nothing is copied again. A folder there that this function did not write is never touched."""
    if not is_elpv(category):
        raise DataError(f"unknown ELPV category {category!r}; choose one of {list(ELPV_CATEGORIES)}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    root = Path(root).expanduser() if root is not None else elpv_root()
    folder = root / category
    settings = {"category": category, "test_fraction": test_fraction, "seed": seed}
    marker = folder / _MARKER
    if marker.is_file():
        recorded = json.loads(marker.read_text())
        if {k: recorded.get(k) for k in settings} == settings:
            return root
        shutil.rmtree(folder)   # our own earlier split with other settings
    elif folder.exists():
        raise DataError(f"{folder} exists and was not written by adlib.elpv.prepare_elpv; move it or pass another root")
    source = elpv_source()
    plan = _plan(read_labels(source), category.split("_", 1)[1], test_fraction, seed)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    for sub, paths in plan.items():
        (partial / sub).mkdir(parents=True, exist_ok=True)
        for path in paths:
            shutil.copyfile(source / path, partial / sub / Path(path).name)
    counts = {sub: len(paths) for sub, paths in sorted(plan.items())}
    (partial / _MARKER).write_text(json.dumps({**settings, "counts": counts, "license": ELPV_LICENSE,
                                               "citation": ELPV_CITATION}, indent=2) + "\n")
    partial.rename(folder)
    return root
