"""The detector contract, its registry, saving and loading, evaluation, map smoothing and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import ndimage

import adlib
from adlib import get_detector, load_detector
from adlib.data import MVTecDataset, load_split, train_batches
from adlib.detectors.base import gaussian_blur
from adlib.evaluate import PeakMemory, evaluate

JSON_KEYS = {"image_auroc", "pixel_auroc", "aupro", "f1_max", "fpr95", "ap", "fit_s", "ms_per_image",
             "peak_mem_mb", "method", "backbone", "device", "category", "n_train", "n_test"}


@pytest.fixture(scope="module")
def synthetic_sets(synthetic_root):
    return (MVTecDataset(synthetic_root, "synthetic", "train", image_size=96),
            MVTecDataset(synthetic_root, "synthetic", "test", image_size=96))


def test_pixel_stats_finds_synthetic_defects(synthetic_sets):
    train, test = synthetic_sets
    result = evaluate(get_detector("pixel_stats", device="cpu"), test, train, progress=False)
    assert result.metrics["image_auroc"] > 0.9
    assert result.metrics["pixel_auroc"] > 0.9
    assert result.maps.shape == (len(test), 96, 96) and result.scores.shape == (len(test),)


def test_save_load_round_trip(synthetic_sets, tmp_path):
    train, test = synthetic_sets
    det = get_detector("pixel_stats", sigma=2.0, device="cpu").fit(train_batches(train, 8))
    det.save(tmp_path / "det.safetensors")
    again = load_detector(tmp_path / "det.safetensors")
    assert again.sigma == 2.0
    images, _, _ = load_split(test)
    s1, m1 = det.predict(images)
    s2, m2 = again.predict(images)
    assert torch.equal(s1, s2) and torch.equal(m1, m2)


def check_safetensors(path) -> set[str]:
    """Assert ``path`` is a well-formed safetensors file and nothing else; return its tensor names.

    The format: 8 bytes little-endian header length N, then N bytes of JSON (tensor name ->
    dtype, shape, data_offsets; optional ``__metadata__`` of strings), then the tensor bytes, which
    the offsets cover exactly. A ``torch.save`` file (a zip, ``PK\\x03\\x04``, or a bare pickle,
    ``\\x80`` protocol opcode) fails this."""
    from safetensors import safe_open

    raw = open(path, "rb").read()
    assert not raw.startswith(b"PK\x03\x04"), f"{path}: a zip archive (torch.save format), not safetensors"
    assert not raw.startswith(b"\x80"), f"{path}: a pickle (protocol opcode 0x80), not safetensors"
    assert len(raw) >= 8, f"{path}: {len(raw)} bytes, shorter than the 8-byte header length"
    n = int.from_bytes(raw[:8], "little")
    assert 2 <= n <= len(raw) - 8, f"{path}: header length {n} does not fit in {len(raw)} bytes"
    try:
        header = json.loads(raw[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AssertionError(f"{path}: the header is not JSON ({err})") from err
    assert isinstance(header, dict), f"{path}: the header is not a JSON object"
    metadata = header.pop("__metadata__", {})
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    data_size, spans = len(raw) - 8 - n, []
    for name, entry in header.items():
        assert set(entry) == {"dtype", "shape", "data_offsets"}, f"{path}: tensor {name!r} entry {entry}"
        begin, end = entry["data_offsets"]
        assert 0 <= begin <= end <= data_size, f"{path}: tensor {name!r} lies outside the data"
        spans.append((begin, end))
    covered = 0  # the tensors tile the data: no gap, no overlap, nothing after the last one
    for begin, end in sorted(spans):
        assert begin == covered, f"{path}: data bytes {covered}..{begin} belong to no tensor"
        covered = end
    assert covered == data_size, f"{path}: {data_size - covered} bytes after the last tensor"
    with safe_open(str(path), framework="pt") as f:
        names = set(f.keys())
        for name in names:
            f.get_tensor(name)
    assert names == set(header)
    return names


def test_saved_file_is_safetensors_not_pickle(synthetic_sets, tmp_path):
    from safetensors.torch import load_file

    train, _ = synthetic_sets
    det = get_detector("pixel_stats", device="cpu").fit(train_batches(train, 8))
    det.save(tmp_path / "det.safetensors")
    names = check_safetensors(tmp_path / "det.safetensors")
    tensors = load_file(tmp_path / "det.safetensors")
    assert names == set(tensors) == set(det.state_dict())
    # the check would catch a detector that wrote torch.save files of the same tensors
    torch.save(tensors, tmp_path / "zip.pt")
    with pytest.raises(AssertionError, match="zip"):
        check_safetensors(tmp_path / "zip.pt")
    torch.save(tensors, tmp_path / "pickle.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(AssertionError, match="pickle"):
        check_safetensors(tmp_path / "pickle.pt")
    raw = (tmp_path / "det.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[:-1])  # total size no longer matches the header
    with pytest.raises(AssertionError, match="outside the data"):
        check_safetensors(tmp_path / "cut.safetensors")
    with pytest.raises(RuntimeError, match="fit"):
        get_detector("pixel_stats").save(tmp_path / "empty.safetensors")


def test_registry_and_bad_input():
    assert "pixel_stats" in adlib.DETECTORS
    with pytest.raises(ValueError, match="unknown method"):
        get_detector("nope")
    with pytest.raises(TypeError, match="no hyper-parameter"):
        get_detector("pixel_stats", coreset_ratio=0.1)
    det = get_detector("pixel_stats", device="cpu")
    with pytest.raises(RuntimeError, match="not fitted"):
        det.predict(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        det.predict(torch.zeros(3, 8, 8))


@pytest.mark.parametrize("sigma", [1.0, 4.0])
def test_gaussian_blur_matches_scipy(sigma):
    rng = np.random.default_rng(0)
    maps = rng.random((2, 40, 33))
    ours = gaussian_blur(torch.from_numpy(maps), sigma).numpy()
    ref = np.stack([ndimage.gaussian_filter(m, sigma, mode="mirror", truncate=4.0) for m in maps])
    np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-12)


def test_peak_memory_sees_a_large_allocation():
    with PeakMemory("cpu") as small:
        pass
    with PeakMemory("cpu") as big:
        block = torch.ones(300 * 2**20 // 4)  # 300 MB, touched
        del block
    assert big.peak_mb - small.peak_mb > 250


def test_cli_writes_json_on_any_mvtec_folder(synthetic_root, tmp_path):
    out = tmp_path / "metrics.json"
    cmd = [sys.executable, "-m", "adlib", "evaluate", "--method", "pixel_stats", "--data", str(synthetic_root),
           "--category", "synthetic", "--image-size", "64", "--device", "cpu", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    row = json.loads(out.read_text())
    assert JSON_KEYS <= set(row)
    assert row["n_train"] == 24 and row["n_test"] == 24 and row["category"] == "synthetic"
    assert row["image_auroc"] >= 0.9 and row["pixel_auroc"] >= 0.9, row     # the metrics of a real run
    assert "| image_auroc" in proc.stdout or "image_auroc |" in proc.stdout


def test_cli_refuses_backbone_for_method_without_one(synthetic_root):
    cmd = [sys.executable, "-m", "adlib", "evaluate", "--method", "pixel_stats", "--data", str(synthetic_root),
           "--category", "synthetic", "--backbone", "resnet18"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "uses no backbone" in proc.stderr


def test_calibrate_sets_mean_plus_k_std_of_held_out_scores_and_respects_own_rules(synthetic_sets):
    import numpy as np

    train, test = synthetic_sets
    images = load_split(train)[0]
    fit_part, held = images[:12], images[12:]                          # 12 held out: no warning
    detector = get_detector("pixel_stats").fit(fit_part)
    threshold = detector.calibrate(held.split(3))                      # batches, as from a loader
    scores = detector.predict(held)[0].double().numpy()
    assert threshold == pytest.approx(scores.mean() + 3 * scores.std(ddof=1), rel=1e-9)
    assert detector.calibrate(held, k=0.0) == pytest.approx(scores.mean(), rel=1e-9)
    assert (scores > detector.threshold).sum() < len(scores)           # the mean cuts through the scores
    with pytest.warns(UserWarning, match="from 2 held-out images is rough"):
        detector.calibrate(held[:2])
    dfr = get_detector("dfr", epochs=1).fit(fit_part)
    own = dfr.threshold
    with pytest.raises(ValueError, match="dfr sets its own threshold"):
        dfr.calibrate(held)
    assert dfr.threshold == own and np.isfinite(own)
    assert get_detector("autoencoder", holdout=0.0).calibrates_itself is False
    with pytest.raises(RuntimeError, match="not fitted"):
        get_detector("pixel_stats").calibrate(held)
