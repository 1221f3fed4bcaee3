"""Shared fixtures: the real data root (MVTec AD bottle, when present) and its datasets, a synthetic
category and its 64 px images, the ELPV cells."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adlib.data import MVTecDataset, find_data_root, load_split, make_synthetic


@pytest.fixture(scope="session")
def real_root() -> Path:
    """The data root holding the real MVTec AD ``bottle`` category; skips where it is absent."""
    root = find_data_root()
    if not (root / "bottle" / "train" / "good").is_dir():
        pytest.skip(f"real MVTec AD bottle not found under {root} (set ADLIB_DATA)")
    return root


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A small synthetic category ``synthetic`` in the MVTec layout, made once per session."""
    return make_synthetic(tmp_path_factory.mktemp("synthetic"), n_train=24, n_test_good=8, n_test_defect=8, size=96)


@pytest.fixture(scope="session")
def elpv_root(tmp_path_factory) -> Path:
    """The real ELPV solar cells (PyPI elpv-dataset), both cell types prepared in the MVTec AD layout
    once per session in a temporary folder; skips where the package is not installed."""
    pytest.importorskip("elpv_dataset", reason="pip install elpv-dataset (part of the test extra)")
    from adlib.elpv import prepare_elpv

    root = tmp_path_factory.mktemp("elpv")
    for category in ("elpv_mono", "elpv_poly"):
        prepare_elpv(category, root)
    return root


@pytest.fixture(scope="session")
def small_synthetic(synthetic_root):
    """The synthetic category at 64 px: the training split as a dataset (fit from it, with its
    preprocessing) and every test image as one normalized tensor ``(24, 3, 64, 64)``; made once per
    session (the dataset keeps its decoded images)."""
    train = MVTecDataset(synthetic_root, "synthetic", "train", image_size=64)
    test = MVTecDataset(synthetic_root, "synthetic", "test", image_size=64)
    return train, load_split(test)[0]


@pytest.fixture(scope="session")
def synthetic_normals(small_synthetic):
    """``synthetic_normals(n)``: the first ``n`` normalized 64 px training images of the synthetic
    category, as ``MVTecDataset(..., limit=n)`` reads them; a fresh copy on every call."""
    images = load_split(small_synthetic[0])[0]

    def first(n: int) -> torch.Tensor:
        if not 1 <= n <= len(images):
            raise ValueError(f"the synthetic training split has {len(images)} images, asked for {n}")
        return images[:n].clone()

    return first


@pytest.fixture(scope="session")
def real_bottle(real_root):
    """``real_bottle(image_size)``: (train, test) datasets of the real MVTec AD bottle, made once per size
    and session, so that the slow tests of several files decode its 292 images once (skips without it)."""
    made: dict[int, tuple[MVTecDataset, MVTecDataset]] = {}

    def at(image_size: int = 256) -> tuple[MVTecDataset, MVTecDataset]:
        if image_size not in made:
            made[image_size] = (MVTecDataset(real_root, "bottle", "train", image_size=image_size),
                                MVTecDataset(real_root, "bottle", "test", image_size=image_size))
        return made[image_size]

    return at
