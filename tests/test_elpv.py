"""ELPV: the real solar-cell data set as an image-level category (no masks), and what evaluates on it."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import adlib
from adlib.data import DataError, MVTecDataset, choose_data
from adlib.elpv import elpv_source, prepare_elpv, read_labels


def _names(folder) -> set[str]:
    return {p.name for p in folder.glob("*.png")}


@pytest.mark.parametrize("cell_type", ["mono", "poly"])
def test_split_holds_every_cell_of_its_type_once(elpv_root, cell_type):
    rows = read_labels(elpv_source())
    mine = [(path.split("/")[-1], p) for path, p, kind in rows if kind == cell_type]
    category = elpv_root / f"elpv_{cell_type}"
    train, test_good = _names(category / "train" / "good"), _names(category / "test" / "good")
    assert not train & test_good
    assert train | test_good == {name for name, p in mine if p == 0.0}
    assert len(test_good) == round(0.25 * (len(train) + len(test_good)))
    for folder, value in (("defect_p033", 1 / 3), ("defect_p067", 2 / 3), ("defect_p100", 1.0)):
        assert _names(category / "test" / folder) == {name for name, p in mine if abs(p - value) < 1e-6}
    counts = json.loads((category / ".adlib-elpv.json").read_text())["counts"]
    assert counts["train/good"] == len(train) and sum(counts.values()) == len(mine)


def test_images_are_real_300px_grayscale_read_as_rgb(elpv_root):
    path = sorted((elpv_root / "elpv_mono" / "train" / "good").glob("*.png"))[0]
    with Image.open(path) as image:
        assert image.size == (300, 300) and image.mode == "L"
    train = MVTecDataset(elpv_root, "elpv_mono", "train", image_size=64, limit=2, normalize=False)
    pixels = train[0]["image"]
    assert pixels.shape == (3, 64, 64)
    assert torch.equal(pixels[0], pixels[1]) and torch.equal(pixels[1], pixels[2])
    assert 0.05 < float(pixels.std())   # a real cell image, not a blank


def test_prepare_again_copies_nothing_and_another_seed_changes_the_split(elpv_root, tmp_path):
    marker = elpv_root / "elpv_mono" / ".adlib-elpv.json"
    before = marker.stat().st_mtime_ns
    assert prepare_elpv("elpv_mono", elpv_root) == elpv_root
    assert marker.stat().st_mtime_ns == before
    prepare_elpv("elpv_mono", tmp_path, seed=1)
    assert _names(tmp_path / "elpv_mono" / "test" / "good") != _names(elpv_root / "elpv_mono" / "test" / "good")


def test_prepare_refuses_a_folder_it_did_not_write_and_unknown_names(tmp_path):
    (tmp_path / "elpv_mono" / "train").mkdir(parents=True)
    (tmp_path / "elpv_mono" / "train" / "mine.txt").write_text("user data")
    with pytest.raises(DataError, match="not written by adlib"):
        prepare_elpv("elpv_mono", tmp_path)
    assert (tmp_path / "elpv_mono" / "train" / "mine.txt").read_text() == "user data"
    with pytest.raises(DataError, match="unknown ELPV category"):
        prepare_elpv("elpv_thin", tmp_path)
    with pytest.raises(ValueError, match="test_fraction"):
        prepare_elpv("elpv_mono", tmp_path / "other", test_fraction=1.0)


def test_test_split_without_masks_needs_missing_masks_none(elpv_root):
    with pytest.raises(DataError, match="has no mask"):
        MVTecDataset(elpv_root, "elpv_mono", "test", image_size=64, limit=2)
    test = MVTecDataset(elpv_root, "elpv_mono", "test", image_size=64, limit=2, missing_masks="none")
    assert not test.has_masks
    assert test.labels.tolist() == [1, 1, 1, 1, 1, 1, 0, 0]   # defect_p033, p067, p100 sort before good
    assert all(float(test[i]["mask"].sum()) == 0 for i in range(len(test)))


def test_choose_data_prepares_elpv_in_its_own_root(monkeypatch, tmp_path):
    monkeypatch.setenv("ADLIB_ELPV", str(tmp_path))
    choice = choose_data("elpv_poly", banner=False)
    assert choice.real and choice.root == tmp_path and choice.category == "elpv_poly"
    assert "ELPV" in choice.describe() and "CC BY-NC-SA 4.0" in choice.describe()
    assert (tmp_path / "elpv_poly" / "train" / "good").is_dir()


@pytest.mark.slow
def test_patchcore_finds_certain_defects_on_real_solar_cells(elpv_root):
    """Image AUROC of PatchCore on real ELPV cells (good vs defect probability 1), small size, above a
    bar; pixel metrics are NaN since ELPV has no masks."""
    train = MVTecDataset(elpv_root, "elpv_mono", "train", image_size=128, limit=60)
    test = MVTecDataset(elpv_root, "elpv_mono", "test", image_size=128, limit=30, missing_masks="none")
    test.entries = [e for e in test.entries if e.defect in ("good", "defect_p100")]
    result = adlib.evaluate(adlib.get_detector("patchcore"), test, train, progress=False)
    assert result.metrics["image_auroc"] > 0.85, result.metrics
    assert all(math.isnan(result.metrics[k]) for k in ("pixel_auroc", "aupro", "pixel_fpr95", "pixel_ap"))
    assert int(result.labels.sum()) == 30 and len(result.labels) == 60
