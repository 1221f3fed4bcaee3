"""adlib.data: the real MVTec layout, transforms, bad input, data-root lookup, synthetic set, choose_data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adlib import data
from adlib.data import DataError, MVTecDataset, find_data_root, load_split, make_synthetic


def _write_category(root: Path, name: str = "cat", n_train: int = 3, size=(40, 30)) -> Path:
    rng = np.random.default_rng(0)
    folder = root / name
    for i in range(n_train):
        p = folder / "train" / "good" / f"{i:03d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(p)
    (folder / "test" / "good").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / "test/good/000.png")
    (folder / "test" / "dent").mkdir(parents=True)
    (folder / "ground_truth" / "dent").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / "test/dent/000.png")
    mask = np.zeros((size[1], size[0]), np.uint8)
    mask[5:15, 10:20] = 255
    Image.fromarray(mask).save(folder / "ground_truth/dent/000_mask.png")
    return folder


def test_real_bottle_counts_and_masks(real_root):
    train = MVTecDataset(real_root, "bottle", "train")
    test = MVTecDataset(real_root, "bottle", "test", image_size=128)
    assert len(train) == 209
    assert len(test) == 83
    assert int(test.labels.sum()) == 63
    assert sorted(set(test.defects)) == ["broken_large", "broken_small", "contamination", "good"]
    item = test[test.defects.index("broken_large")]
    assert item["image"].shape == (3, 128, 128) and item["mask"].shape == (1, 128, 128)
    assert set(item["mask"].unique().tolist()) == {0.0, 1.0}
    good = test[test.defects.index("good")]
    assert good["mask"].sum() == 0 and good["label"] == 0


def test_resize_crop_and_normalization(real_root):
    ds = MVTecDataset(real_root, "bottle", "train", image_size=256, crop_size=224, limit=4)
    x = torch.stack([ds[i]["image"] for i in range(len(ds))])
    assert x.shape == (4, 3, 224, 224)
    raw_ds = MVTecDataset(real_root, "bottle", "train", image_size=256, crop_size=224, limit=4, normalize=False)
    raw = raw_ds[0]["image"]
    # float64 reference: antialiased bilinear resize of the 900 px file to 256, then the central 224
    original = torch.from_numpy(np.asarray(Image.open(raw_ds[0]["path"]).convert("RGB"), dtype=np.float64) / 255)
    resized = torch.nn.functional.interpolate(original.permute(2, 0, 1)[None], size=(256, 256), mode="bilinear",
                                              antialias=True, align_corners=False)[0]
    reference = resized[:, 16:240, 16:240]
    assert (raw.double() - reference).abs().mean() < 1 / 255 and (raw.double() - reference).abs().max() < 6 / 255
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64)[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64)[:, None, None]
    assert torch.allclose(ds[0]["image"].double(), (raw.double() - mean) / std, atol=1e-5)
    assert torch.allclose(data.denormalize(ds[0]["image"]), raw, atol=1e-5)


def test_mask_resized_with_nearest_stays_binary(tmp_path):
    _write_category(tmp_path)
    ds = MVTecDataset(tmp_path, "cat", "test", image_size=17)
    masks = torch.stack([ds[i]["mask"] for i in range(len(ds))])
    assert set(masks.unique().tolist()) <= {0.0, 1.0} and masks.sum() > 0
    # nearest neighbour: output pixel i reads source pixel floor((i + 0.5) * source / 17)
    written = np.zeros((30, 40), bool)
    written[5:15, 10:20] = True
    rows = np.floor((np.arange(17) + 0.5) * 30 / 17).astype(int)
    cols = np.floor((np.arange(17) + 0.5) * 40 / 17).astype(int)
    expected = torch.from_numpy(written[rows][:, cols]).float()
    assert torch.equal(masks[ds.defects.index("dent"), 0], expected)
    assert masks[ds.defects.index("good")].sum() == 0


def test_grayscale_rgba_and_mixed_sizes_become_rgb(tmp_path):
    folder = _write_category(tmp_path)
    Image.fromarray(np.full((50, 60), 128, np.uint8), "L").save(folder / "train/good/010.png")
    Image.fromarray(np.full((20, 20, 4), 200, np.uint8), "RGBA").save(folder / "train/good/011.png")
    ds = MVTecDataset(tmp_path, "cat", "train", image_size=32, normalize=False)
    images = torch.stack([ds[i]["image"] for i in range(len(ds))])
    assert images.shape == (5, 3, 32, 32)
    gray, rgba = ds[3]["image"], ds[4]["image"]
    assert torch.allclose(gray, torch.full_like(gray, 128 / 255), atol=1e-6)   # one gray value in all 3 channels
    assert torch.allclose(rgba, torch.full_like(rgba, 157 / 255), atol=1e-6)   # composited on black: 200 * 200 / 255


def test_missing_category_names_folder_and_lists_found(tmp_path):
    _write_category(tmp_path, "cat")
    with pytest.raises(DataError, match=r"'dog' not found.*\['cat'\]"):
        MVTecDataset(tmp_path, "dog", "train")


def test_empty_train_good(tmp_path):
    (tmp_path / "cat" / "train" / "good").mkdir(parents=True)
    with pytest.raises(DataError, match=r"train/good: no training images"):
        MVTecDataset(tmp_path, "cat", "train")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_png_names_file(tmp_path, damage):
    folder = _write_category(tmp_path)
    bad = folder / "train/good/001.png"
    content = bad.read_bytes()
    intact = MVTecDataset(tmp_path, "cat", "train")
    before = [intact[0]["image"], intact[2]["image"]]
    bad.write_bytes(b"not a png at all" if damage == "garbage" else content[: len(content) // 2])
    ds = MVTecDataset(tmp_path, "cat", "train")
    assert torch.equal(ds[0]["image"], before[0]) and torch.equal(ds[2]["image"], before[1])  # the others load as before
    with pytest.raises(DataError, match=r"001\.png: cannot read image"):
        ds[1]


def test_defect_without_mask_errors_or_is_skipped(tmp_path):
    folder = _write_category(tmp_path)
    (folder / "ground_truth/dent/000_mask.png").unlink()
    with pytest.raises(DataError, match=r"000\.png: defective test image has no mask"):
        MVTecDataset(tmp_path, "cat", "test")
    ds = MVTecDataset(tmp_path, "cat", "test", missing_masks="skip")
    assert ds.defects == ["good"]


def test_mask_size_mismatch(tmp_path):
    folder = _write_category(tmp_path)
    Image.fromarray(np.zeros((7, 7), np.uint8)).save(folder / "ground_truth/dent/000_mask.png")
    ds = MVTecDataset(tmp_path, "cat", "test")
    idx = ds.defects.index("dent")
    with pytest.raises(DataError, match=r"mask size \(7, 7\) differs"):
        ds[idx]


def test_find_data_root_order(tmp_path, monkeypatch):
    monkeypatch.setenv("ADLIB_DATA", str(tmp_path / "env"))
    assert find_data_root(tmp_path / "explicit") == tmp_path / "explicit"
    assert find_data_root() == tmp_path / "env"
    monkeypatch.delenv("ADLIB_DATA")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data.mvtec, "_shared_candidates", lambda: [tmp_path / "nope"])
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert find_data_root() == tmp_path / "cache" / "adlib" / "mvtec_ad"


def test_synthetic_is_deterministic_and_loadable(tmp_path):
    a = make_synthetic(tmp_path / "a", n_train=3, n_test_good=2, n_test_defect=2, size=64, seed=7)
    b = make_synthetic(tmp_path / "b", n_train=3, n_test_good=2, n_test_defect=2, size=64, seed=7)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*.png"))
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files_a)
    images, masks, labels = load_split(MVTecDataset(a, "synthetic", "test", image_size=64))
    assert labels.tolist().count(1) == 4 and masks[labels == 1].flatten(1).amax(1).min() == 1
    assert masks[labels == 0].sum() == 0


def test_synthetic_never_deletes_a_folder_it_did_not_make(tmp_path):
    folder = tmp_path / "synthetic"
    (folder / "train" / "good").mkdir(parents=True)
    (folder / "notes.txt").write_text("my own work")
    (folder / "train" / "good" / "mine.png").write_bytes(b"precious")
    with pytest.raises(DataError, match=r"synthetic: already exists and was not made by make_synthetic.*"
                                        r"another category name, or move or delete"):
        make_synthetic(tmp_path, n_train=2, n_test_good=1, n_test_defect=1, size=16)
    assert (folder / "notes.txt").read_text() == "my own work"
    assert sorted(p.name for p in folder.rglob("*")) == ["good", "mine.png", "notes.txt", "train"]


def test_synthetic_replaces_its_own_output_but_not_files_added_to_it(tmp_path):
    import json

    make_synthetic(tmp_path, n_train=3, n_test_good=1, n_test_defect=1, size=16)
    marker = json.loads((tmp_path / "synthetic" / data.synthetic.SYNTHETIC_MARKER).read_text())
    assert marker["params"]["n_train"] == 3 and "train/good/002.png" in marker["files"]
    make_synthetic(tmp_path, n_train=2, n_test_good=1, n_test_defect=1, size=16, seed=1)  # its own: replaced
    assert len(MVTecDataset(tmp_path, "synthetic", "train")) == 2
    extra = tmp_path / "synthetic" / "test" / "good" / "added_by_user.png"
    extra.write_bytes(b"keep me")
    before = sorted(p for p in (tmp_path / "synthetic").rglob("*"))
    with pytest.raises(DataError, match=r"also holds 1 file\(s\) it did not write \(test/good/added_by_user.png\)"):
        make_synthetic(tmp_path, n_train=2, n_test_good=1, n_test_defect=1, size=16)
    assert extra.read_bytes() == b"keep me" and sorted((tmp_path / "synthetic").rglob("*")) == before
    (tmp_path / "empty").mkdir()  # an empty folder holds nothing to lose: used
    make_synthetic(tmp_path, "empty", n_train=1, n_test_good=1, n_test_defect=1, size=16)
    assert len(MVTecDataset(tmp_path, "empty", "train")) == 1


# The downloader's tests (a local HTTP server) are in test_download.py.


@pytest.fixture
def no_real_data(tmp_path, monkeypatch):
    """No MVTec AD anywhere: ADLIB_DATA and the user cache point at empty folders."""
    monkeypatch.setenv("ADLIB_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "data"


def test_choose_data_uses_real_data_without_a_banner(tmp_path, monkeypatch, capsys):
    _write_category(tmp_path / "data", "bottle")
    monkeypatch.setenv("ADLIB_DATA", str(tmp_path / "data"))
    choice = data.choose_data("bottle", synthetic_root=tmp_path / "syn")
    assert choice.real and choice.root == tmp_path / "data" and choice.category == "bottle"
    assert capsys.readouterr().out == "" and choice.banner() == "" and "SYNTHETIC" not in str(choice)
    assert not (tmp_path / "syn").exists()


def test_choose_data_stand_in_is_never_silent(tmp_path, no_real_data, capsys):
    choice = data.choose_data("bottle", synthetic_root=tmp_path / "syn")
    assert not choice.real and choice.category == "synthetic" and choice.requested == "bottle"
    shown = capsys.readouterr().out
    assert "SYNTHETIC STAND-IN: this is not MVTec AD 'bottle'" in shown
    assert "Every number below will differ from the text" in shown and "not found" in shown
    assert "download=True" in shown and "ADLIB_DATA" in shown
    assert "SYNTHETIC STAND-IN" in choice.describe() and "SYNTHETIC STAND-IN" in str(choice)
    assert "SYNTHETIC STAND-IN" in choice._repr_html_()
    assert len(MVTecDataset(choice.root, choice.category, "train", limit=2)) == 2
    assert all(len(line) == 80 for line in choice.banner().splitlines())
    data.choose_data("bottle", synthetic_root=tmp_path / "syn", banner=False)  # made once; banner=False: quiet
    assert capsys.readouterr().out == ""


def test_choose_data_banner_is_html_in_a_notebook(tmp_path, no_real_data, monkeypatch, capsys):
    import types

    import IPython
    import IPython.display

    shown = []
    monkeypatch.setattr(IPython, "get_ipython", lambda: types.SimpleNamespace(kernel=object()))
    monkeypatch.setattr(IPython.display, "display", lambda obj, raw=False: shown.append((obj, raw)))
    data.choose_data("bottle", synthetic_root=tmp_path / "syn")
    assert capsys.readouterr().out == ""
    (bundle, raw), = shown
    assert raw and "SYNTHETIC STAND-IN" in bundle["text/html"] and "<div" in bundle["text/html"]
    assert "SYNTHETIC STAND-IN" in bundle["text/plain"]


def test_choose_data_never_synthetic_raises_with_how_to_get_the_data(tmp_path, no_real_data):
    with pytest.raises(DataError, match=r"(?s)'bottle' was not found.*synthetic='never'.*download=True.*"
                                        r"mvtec-ad.*CC BY-NC-SA 4\.0.*ADLIB_DATA="):
        data.choose_data("bottle", synthetic_root=tmp_path / "syn", synthetic="never")
    assert not (tmp_path / "syn").exists()
    with pytest.raises(ValueError, match="synthetic must be"):
        data.choose_data("bottle", synthetic="maybe")


def test_choose_data_always_synthetic_even_with_real_data(tmp_path, monkeypatch, capsys):
    _write_category(tmp_path / "data", "bottle")
    monkeypatch.setenv("ADLIB_DATA", str(tmp_path / "data"))
    choice = data.choose_data("bottle", synthetic_root=tmp_path / "syn", synthetic="always")
    assert not choice.real and "synthetic='always'" in capsys.readouterr().out
