"""Shared fixtures: the real data root (MVTec AD bottle, when present) and a synthetic category."""

from __future__ import annotations

from pathlib import Path

import pytest

from adlib.data import find_data_root, make_synthetic


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
