"""``adlib.compare`` and ``adlib compare``: every method on every data set, seeds, tables, errors."""

from __future__ import annotations

import csv
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from adlib import evaluate, get_detector
from adlib.compare import CompareConfig, compare, load_data, method_options, summarize, write_results

METRICS = ("image_auroc", "pixel_auroc", "aupro", "f1_max", "fpr95", "ap", "n_train", "n_test")


def test_summarize_is_the_mean_and_sample_std_over_seeds_and_skips_nan():
    rng = np.random.default_rng(0)
    values = rng.uniform(0.5, 1.0, size=3)
    rows = [{"data": "d", "method": "m", "device": "cpu", "n_train": 5, "n_test": 4, "image_auroc": float(v),
             "pixel_auroc": math.nan, "aupro": math.nan, "f1_max": 0.5, "fpr95": 0.1, "fit_s": 1.0 + i,
             "ms_per_image": 2.0, "mem_mb": 10.0} for i, v in enumerate(values)]
    rows.append({**rows[0], "method": "other", "image_auroc": 0.7})
    (m, other) = summarize(rows)
    assert (m["method"], m["seeds"], other["seeds"]) == ("m", 3, 1)
    assert m["image_auroc"] == pytest.approx(float(np.mean(values)), abs=1e-12)
    assert m["image_auroc_std"] == pytest.approx(float(np.std(values, ddof=1)), abs=1e-12)
    assert m["fit_s"] == pytest.approx(2.0) and other["image_auroc_std"] == 0.0
    assert math.isnan(m["pixel_auroc"]) and math.isnan(m["pixel_auroc_std"])


def test_config_refuses_unknown_options_and_seeds_in_options():
    with pytest.raises(ValueError, match="has no option"):
        CompareConfig(options={"patchcore": {"coreset_ration": 0.1}})
    with pytest.raises(ValueError, match="seeds come from"):
        CompareConfig(options={"padim": {"seed": 3}})
    with pytest.raises(ValueError, match="unknown method"):
        CompareConfig(options={"fastflow": {}})
    assert method_options("centering")["epochs"] >= 1 and "images" in method_options("semi_formula")


def test_compare_runs_each_seeded_method_per_seed_and_writes_tables(synthetic_root, tmp_path):
    config = CompareConfig(image_size=64, train_limit=12, test_limit=4, seeds=(0, 1),
                           options={"centering": {"epochs": 1, "batch_size": 4}})
    seen = []
    rows = compare(["pixel_stats", "padim", "centering"], ["synthetic"], config, root=synthetic_root,
                   progress=False, on_row=seen.append)
    assert [(r["method"], r["seed"]) for r in rows] == [("pixel_stats", None), ("padim", 0), ("padim", 1),
                                                       ("centering", 0), ("centering", 1)]
    assert seen == rows
    for row in rows:
        assert 0.0 <= row["image_auroc"] <= 1.0 and 0.0 <= row["pixel_auroc"] <= 1.0
        assert row["image_auroc"] >= 0.9 and row["pixel_auroc"] >= 0.9, row    # the synthetic spots are found
        assert row["n_train"] == 12 and row["n_test"] == 12
        assert row["peak_mem_mb"] >= row["mem_mb"] and row["ms_per_image"] > 0
    centering = [r for r in rows if r["method"] == "centering"]
    assert all(r["pretrain_s"] > 0 and r["fit_s"] > r["pretrain_s"] for r in centering)
    assert all(r["pretrain_s"] == 0 for r in rows if r["method"] != "centering")
    # the seed reaches PaDiM's random channels: two seeds, two different maps, so different scores
    padim = [r for r in rows if r["method"] == "padim"]
    assert padim[0]["pixel_auroc"] != padim[1]["pixel_auroc"]
    # a row's metrics are adlib.evaluate's on the data the config describes (limits and size applied)
    train, test = load_data("synthetic", config, synthetic_root)
    assert (len(train), len(test), train.image_size) == (12, 12, 64)
    reference = evaluate(get_detector("pixel_stats", device="cpu"), test, train, batch_size=config.batch_size,
                         progress=False).metrics
    assert {k: rows[0][k] for k in METRICS} == {k: reference[k] for k in METRICS}
    paths = write_results(rows, tmp_path / "out")
    with paths["runs"].open() as f:
        assert len(list(csv.DictReader(f))) == 5
    markdown = paths["markdown"].read_text()
    assert markdown.count("\n| synthetic |") == 3 and " ± " in markdown


def adlib(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "adlib", "compare", *args], capture_output=True, text=True, timeout=300)


def test_cli_compare_writes_the_table(synthetic_root, tmp_path):
    done = adlib("--methods", "pixel_stats", "--data", "synthetic", "--root", str(synthetic_root),
                 "--image-size", "64", "--test-limit", "3", "--out", str(tmp_path / "cmp"))
    assert done.returncode == 0, done.stderr
    assert "| synthetic | pixel_stats | 1 |" in done.stdout
    assert (tmp_path / "cmp" / "compare.csv").is_file()
    with (tmp_path / "cmp" / "compare.csv").open() as f:
        (row,) = list(csv.DictReader(f))
    # --test-limit 3 takes 3 images of each of the 3 test folders (good, scratch, spot); all 24 normals fit
    assert (row["data"], row["method"], row["seeds"], row["n_train"], row["n_test"]) == \
        ("synthetic", "pixel_stats", "1", "24", "9")
    assert float(row["image_auroc"]) >= 0.9 and float(row["pixel_auroc"]) >= 0.9, row
    assert f"| {float(row['image_auroc']):.3f} | {float(row['pixel_auroc']):.3f} |" in done.stdout   # the same run


@pytest.mark.slow
def test_cli_compare_on_real_bottle_and_elpv(real_root, elpv_root, tmp_path, monkeypatch):
    """The chapter's command on its two real data sets (small: 128 px, 40 training images, 20 test
    images per folder): one row per (data set, method), pixel metrics on bottle only, and the image
    AUROCs of real data above chance by a margin (bottle's defects are easy; ELPV's cracks are not)."""
    monkeypatch.setenv("ADLIB_ELPV", str(elpv_root))
    done = adlib("--methods", "pixel_stats", "padim", "--data", "bottle", "elpv_mono", "--root", str(real_root),
                 "--image-size", "128", "--train-limit", "40", "--test-limit", "20", "--seeds", "0",
                 "--out", str(tmp_path / "cmp"))
    assert done.returncode == 0, done.stderr
    with (tmp_path / "cmp" / "compare.csv").open() as f:
        rows = {(r["data"], r["method"]): r for r in csv.DictReader(f)}
    assert set(rows) == {(d, m) for d in ("bottle", "elpv_mono") for m in ("pixel_stats", "padim")}
    assert float(rows["bottle", "padim"]["image_auroc"]) >= 0.95, rows["bottle", "padim"]
    assert float(rows["bottle", "padim"]["pixel_auroc"]) >= 0.9, rows["bottle", "padim"]
    assert float(rows["elpv_mono", "padim"]["image_auroc"]) >= 0.6, rows["elpv_mono", "padim"]
    assert math.isnan(float(rows["elpv_mono", "padim"]["pixel_auroc"]))     # ELPV has no masks
    assert int(rows["elpv_mono", "padim"]["n_train"]) == 40
    assert "| elpv_mono | padim | 1 |" in done.stdout and "| bottle | padim | 1 |" in done.stdout


@pytest.mark.parametrize("args, message", [
    (["--set", "padim.nope=1"], "padim has no such option"),
    (["--set", "padim.seed=4"], "seeds come from --seeds"),
    (["--set", "padim.n_features=many"], "expected a value of type int"),
    (["--set", "padim=1"], "METHOD.KEY=VALUE"),
    (["--data", "no_such_category"], "no_such_category"),
])
def test_cli_compare_bad_input_is_one_line(synthetic_root, tmp_path, args, message):
    done = adlib("--methods", "padim", "--root", str(synthetic_root), "--data", "synthetic",
                 "--out", str(tmp_path / "x"), *args)
    assert done.returncode == 2
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_threshold_study_calibrates_on_held_out_normals_only(synthetic_root, monkeypatch):
    import adlib.compare as compare_module
    from adlib.compare import threshold_study
    from adlib.data import MVTecDataset, holdout_split, load_split

    train = MVTecDataset(synthetic_root, "synthetic", "train", image_size=64)
    test = MVTecDataset(synthetic_root, "synthetic", "test", image_size=64)
    built = []
    real_get_detector = compare_module.get_detector
    monkeypatch.setattr(compare_module, "get_detector", lambda *a, **kw: built.append(real_get_detector(*a, **kw))
                        or built[-1])
    row = threshold_study("padim", train, test, holdout=0.25, seed=1)
    assert (row["n_fit"], row["n_held"]) == (18, 6)
    # against a float64 reference from the fitted detector: mean + 3 sample std of the 6 held-out normals'
    # scores, and the rates and best F1 counted by plain loops over the test scores
    (detector,) = built
    _, held_index = holdout_split(24, 0.25, 1)
    held_scores = detector.predict(load_split(train)[0][held_index])[0].double().numpy()
    assert row["calibrated_threshold"] == pytest.approx(held_scores.mean() + 3 * held_scores.std(ddof=1), rel=1e-9)
    test_images, _, labels = load_split(test)
    scores = torch.cat([detector.predict(b)[0] for b in test_images.split(16)]).double().numpy()   # its batches
    labels = labels.numpy().astype(bool)
    for name in ("calibrated", "oracle"):
        flagged = scores >= row[f"{name}_threshold"]
        assert row[f"{name}_recall"] == (flagged & labels).sum() / labels.sum()
        assert row[f"{name}_false_alarm_rate"] == (flagged & ~labels).sum() / (~labels).sum()
    best_f1 = max(2 * np.sum((scores >= t) & labels) / (np.sum(scores >= t) + labels.sum()) for t in scores)
    assert row["oracle_f1"] == pytest.approx(best_f1, abs=1e-12)
    # another test set (other labels, other images) moves the oracle, never the calibrated threshold
    fewer = MVTecDataset(synthetic_root, "synthetic", "test", image_size=64, limit=2)
    other = threshold_study("padim", train, fewer, holdout=0.25, seed=1)
    assert other["calibrated_threshold"] == row["calibrated_threshold"]
    assert other["n_fit"] == row["n_fit"]
    assert row["oracle_f1"] >= row["calibrated_f1"] - 1e-12    # the oracle is the best F1 there is
    for name in ("calibrated", "oracle"):
        assert 0.0 <= row[f"{name}_recall"] <= 1.0 and 0.0 <= row[f"{name}_false_alarm_rate"] <= 1.0
    with pytest.raises(ValueError, match="too few"):
        threshold_study("padim", MVTecDataset(synthetic_root, "synthetic", "train", image_size=64, limit=3), test)
    with pytest.raises(ValueError, match="pre-training recipe"):
        threshold_study("centering", train, test)


def test_options_for_a_method_not_compared_are_refused(synthetic_root):
    with pytest.raises(ValueError, match="not among the methods"):
        compare(["padim"], ["synthetic"], CompareConfig(options={"autoencoder": {"epochs": 1}}),
                root=synthetic_root, progress=False)


def test_data_is_decoded_before_any_run_is_timed(synthetic_root):
    from adlib.compare import load_data

    train, test = load_data("synthetic", CompareConfig(image_size=64), synthetic_root)
    assert len(train._cache) == len(train) and len(test._cache) == len(test)
