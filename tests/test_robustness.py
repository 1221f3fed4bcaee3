"""Inputs real inspection cameras and labelling tools write, and detectors used twice: no silent wrong
answer. 16-bit / 32-bit / float images, 0/1 masks, non-finite pixels, other sizes, refits, devices."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adlib import DETECTORS, get_detector, load_detector
from adlib.data import DataError, MVTecDataset, Preprocessing, load_split, train_batches
from adlib.evaluate import evaluate

SIDE = 64


def _gray16(path: Path, out: Path, scale: float = 257.0) -> None:
    """An 8-bit image file -> a 16-bit grayscale PNG of the same picture (values * ``scale``)."""
    gray = np.asarray(Image.open(path).convert("L"), dtype=np.float64)
    Image.fromarray(np.round(gray * scale).astype(np.uint16)).save(out)


@pytest.fixture(scope="module")
def root16(synthetic_root, tmp_path_factory) -> Path:
    """The synthetic category with every image rewritten as a 16-bit grayscale PNG (masks as 0/1)."""
    root = tmp_path_factory.mktemp("sixteen")
    shutil.copytree(synthetic_root / "synthetic", root / "synthetic")
    for path in (root / "synthetic").rglob("*.png"):
        if "ground_truth" in path.parts:
            mask = np.asarray(Image.open(path).convert("L")) > 127
            Image.fromarray(mask.astype(np.uint8)).save(path)     # 0/1, as many labelling tools write
        else:
            _gray16(path, path)
    return root


def test_16_bit_images_read_by_their_range_not_clipped(synthetic_root, root16):
    as8 = MVTecDataset(synthetic_root, "synthetic", "test", image_size=SIDE, normalize=False)
    as16 = MVTecDataset(root16, "synthetic", "test", image_size=SIDE, normalize=False)
    assert Image.open(as16.entries[0].image).mode in ("I;16", "I")
    for i in (0, len(as8) - 1):
        gray8 = as8[i]["image"].mean(0)           # RGB -> gray differs from L's weights by a little
        img16 = as16[i]["image"]
        assert img16.std() > 0.02                 # not a constant all-white or all-black picture
        assert torch.equal(img16[0], img16[2])    # one gray channel for R, G, B
        assert (img16[0] - gray8).abs().mean() < 0.03


def test_16_bit_category_evaluates_like_8_bit(root16):
    """On today's main the 16-bit set is all white: image AUROC 0.500 with exit 0."""
    train = MVTecDataset(root16, "synthetic", "train", image_size=SIDE)
    test = MVTecDataset(root16, "synthetic", "test", image_size=SIDE)
    result = evaluate(get_detector("pixel_stats", device="cpu"), test, train, progress=False)
    assert result.metrics["image_auroc"] > 0.9 and result.metrics["pixel_auroc"] > 0.9


def test_zero_one_masks_equal_zero_255_masks(synthetic_root, root16):
    masks255 = load_split(MVTecDataset(synthetic_root, "synthetic", "test", image_size=SIDE))[1]
    masks01 = load_split(MVTecDataset(root16, "synthetic", "test", image_size=SIDE))[1]
    assert masks255.sum() > 0 and torch.equal(masks01, masks255)


def test_float_and_32_bit_images(tmp_path):
    ramp = np.linspace(0, 1, 48 * 40, dtype=np.float32).reshape(48, 40)
    Image.fromarray(ramp).save(tmp_path / "f.tif")
    Image.fromarray(np.round(ramp * 65535).astype(np.int32)).save(tmp_path / "i32.tif")
    prep = Preprocessing(image_size=40, normalize=False)
    as_float = prep.read(tmp_path / "f.tif")[0]
    as_int = prep.read(tmp_path / "i32.tif")[0]
    assert Image.open(tmp_path / "i32.tif").mode == "I"
    assert as_float.dtype == torch.float32 and float(as_float.max()) > 0.95 and float(as_float.min()) < 0.05
    assert (as_float - as_int).abs().max() < 1e-4


def test_out_of_range_high_bit_images_are_refused_not_clipped(tmp_path):
    Image.fromarray(np.full((20, 20), 3.5, np.float32)).save(tmp_path / "f.tif")
    Image.fromarray(np.full((20, 20), 1_000_000, np.int32)).save(tmp_path / "i.tif")
    with pytest.raises(DataError, match=r"outside the value range.*value_range"):
        Preprocessing(16).read(tmp_path / "f.tif")
    with pytest.raises(DataError, match="value_range"):
        Preprocessing(16).read(tmp_path / "i.tif")
    scaled = Preprocessing(16, normalize=False, value_range=(0, 7)).read(tmp_path / "f.tif")[0]
    assert torch.allclose(scaled, torch.full_like(scaled, 0.5))


def test_colour_and_16_bit_masks_count_any_nonzero(tmp_path):
    image = np.zeros((30, 30, 3), np.uint8)
    Image.fromarray(image).save(tmp_path / "img.png")
    blue = np.zeros((30, 30, 3), np.uint8)
    blue[5:10, 5:10, 2] = 1                       # luminance of (0, 0, 1) rounds to 0 in convert("L")
    Image.fromarray(blue).save(tmp_path / "blue.png")
    deep = np.zeros((30, 30), np.uint16)
    deep[:3] = 1
    Image.fromarray(deep).save(tmp_path / "deep.png")
    prep = Preprocessing(30)
    assert int(prep.read(tmp_path / "img.png", tmp_path / "blue.png")[1].sum()) == 25
    assert int(prep.read(tmp_path / "img.png", tmp_path / "deep.png")[1].sum()) == 90


@pytest.mark.parametrize("name", sorted(DETECTORS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_fit_refuses_non_finite_pixels(name, bad):
    images = torch.randn(4, 3, SIDE, SIDE)
    images[1, 0, 5, 7] = bad
    detector = get_detector(name, device="cpu")
    with pytest.raises(ValueError, match="1 of 2 images contain NaN or infinite"):
        detector.fit([images[:2], images[2:]])


def test_predict_refuses_non_finite_pixels(synthetic_root):
    train = MVTecDataset(synthetic_root, "synthetic", "train", image_size=SIDE)
    detector = get_detector("pixel_stats", device="cpu").fit(train_batches(train, 8))
    images = load_split(train)[0][:2].clone()
    images[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        detector.predict(images)


@pytest.mark.parametrize("name", ["patchcore", "dfr", "padim", "pixel_stats"])
def test_predict_refuses_another_size_and_predict_files_resizes(name, synthetic_root):
    """On today's main PatchCore and DFR score a 96 px image of a 64 px model without a word."""
    train = MVTecDataset(synthetic_root, "synthetic", "train", image_size=SIDE, limit=8)
    hyper = {"epochs": 1} if name == "dfr" else {}
    detector = get_detector(name, device="cpu", **hyper).fit(train_batches(train, 8))
    bigger = load_split(MVTecDataset(synthetic_root, "synthetic", "train", image_size=96, limit=2))[0]
    with pytest.raises(ValueError, match=r"images are 96x96, but .* was fitted on 64x64"):
        detector.predict(bigger)
    files = [e.image for e in train.entries[:2]]
    scores, maps = detector.predict_files(files)
    expected, _ = detector.predict(load_split(train)[0][:2])
    assert maps.shape == (2, SIDE, SIDE) and torch.allclose(scores, expected, rtol=1e-5)


def test_preprocessing_and_threshold_survive_save(synthetic_root, tmp_path):
    train = MVTecDataset(synthetic_root, "synthetic", "train", image_size=80, crop_size=SIDE)
    detector = get_detector("pixel_stats", device="cpu").fit(train_batches(train, 8))
    detector.threshold = 1.25
    detector.save(tmp_path / "d.safetensors")
    again = load_detector(tmp_path / "d.safetensors")
    assert again.preprocessing == train.preprocessing and again.input_size == (SIDE, SIDE)
    assert again.threshold == 1.25
    tensors_fitted = get_detector("pixel_stats", device="cpu").fit(load_split(train)[0])
    with pytest.raises(ValueError, match="fitted on tensors"):
        tensors_fitted.predict_files([train.entries[0].image])
    explicit = get_detector("pixel_stats", device="cpu").fit(load_split(train)[0], preprocessing=train.preprocessing)
    scores, _ = explicit.predict_files([train.entries[0].image])     # tensors + the preprocessing given: files work
    assert explicit.preprocessing == train.preprocessing
    assert torch.allclose(scores, explicit.predict(load_split(train)[0][:1])[0])


def _fit_predict(name: str, train: MVTecDataset, images: torch.Tensor, detector=None):
    hyper = {"epochs": 2} if name in ("dfr", "autoencoder") else {}
    detector = detector or get_detector(name, device="cpu", **hyper)
    return detector, detector.fit(train_batches(train, 8)).predict(images)


@pytest.mark.parametrize("name", ["padim", "patchcore", "pixel_stats", "dfr", "autoencoder"])
def test_refit_equals_a_fresh_fit(name, synthetic_root, tmp_path):
    """PaDiM on today's main keeps its first grid after a refit at another size and cannot predict."""
    first = MVTecDataset(synthetic_root, "synthetic", "train", image_size=96, limit=8)
    second = MVTecDataset(synthetic_root, "synthetic", "train", image_size=SIDE, limit=10)
    images = load_split(MVTecDataset(synthetic_root, "synthetic", "test", image_size=SIDE, limit=2))[0]
    reused, _ = _fit_predict(name, first, load_split(first)[0][:2])
    _, (s_refit, m_refit) = _fit_predict(name, second, images, detector=reused)
    _, (s_fresh, m_fresh) = _fit_predict(name, second, images)
    assert torch.allclose(s_refit, s_fresh, rtol=1e-5) and torch.allclose(m_refit, m_fresh, rtol=1e-4, atol=1e-6)
    reused.save(tmp_path / "refit.safetensors")
    s_loaded, _ = load_detector(tmp_path / "refit.safetensors").predict(images)
    assert torch.allclose(s_loaded, s_fresh, rtol=1e-5)


def test_device_object_is_a_run_setting_not_saved(synthetic_root, tmp_path):
    from safetensors import safe_open

    train = MVTecDataset(synthetic_root, "synthetic", "train", image_size=SIDE, limit=4)
    detector = get_detector("pixel_stats", device=torch.device("cpu")).fit(train_batches(train, 4))
    detector.save(tmp_path / "d.safetensors")          # TypeError on today's main
    with safe_open(str(tmp_path / "d.safetensors"), framework="pt") as f:
        assert "device" not in f.metadata()["hyper"]
    assert load_detector(tmp_path / "d.safetensors", device="cpu").device_ == torch.device("cpu")
