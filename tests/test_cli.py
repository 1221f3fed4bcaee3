"""The command line an inspection engineer uses on a plain folder: ``adlib fit`` and ``adlib predict``,
and user errors as one line on stderr with a non-zero exit."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adlib.__main__ import main
from adlib.detectors import load_detector


def adlib(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the CLI in a fresh process, as a user would."""
    return subprocess.run([sys.executable, "-m", "adlib", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def folders(synthetic_root, tmp_path_factory) -> tuple[Path, Path, Path]:
    """A plain folder of normal images (no MVTec layout), and a folder of test images of another
    size (normal and defective ones), as a camera and a labelling tool would leave them."""
    base = tmp_path_factory.mktemp("plain")
    normal, test = base / "normal", base / "incoming"
    normal.mkdir()
    test.mkdir()
    category = synthetic_root / "synthetic"
    for path in sorted((category / "train" / "good").glob("*.png")):
        shutil.copy(path, normal / f"cam_{path.name}")
    for kind in ("good", "spot"):
        for path in sorted((category / "test" / kind).glob("*.png"))[:3]:
            Image.open(path).resize((150, 120)).save(test / f"{kind}_{path.stem}.png")
    return base, normal, test


def test_fit_then_predict_on_a_plain_folder(folders, tmp_path):
    _, normal, test = folders
    model = tmp_path / "models" / "ps.safetensors"
    fit = adlib("fit", "--method", "pixel_stats", "--images", str(normal), "--out", str(model),
                "--image-size", "64", "--device", "cpu", "--holdout", "0.25")
    assert fit.returncode == 0, fit.stderr
    assert model.is_file() and '"threshold"' in fit.stdout
    out_csv, heat = tmp_path / "scores.csv", tmp_path / "heat"
    pred = adlib("predict", "--model", str(model), str(test), "--csv", str(out_csv), "--heatmaps", str(heat))
    assert pred.returncode == 0, pred.stderr
    rows = list(csv.DictReader(open(out_csv)))
    assert len(rows) == 6 and {r["decision"] for r in rows} <= {"normal", "anomalous"}
    decided = {Path(r["path"]).name.split("_")[0]: [] for r in rows}
    for r in rows:
        decided[Path(r["path"]).name.split("_")[0]].append(r["decision"])
    assert decided["spot"].count("anomalous") >= 2 and decided["good"].count("normal") >= 2
    pngs = sorted(heat.glob("*_heatmap.png"))
    assert len(pngs) == 6 and Image.open(pngs[0]).size == (64, 64)
    # the heat map shows something: a defective image's overlay differs from a plain image somewhere
    assert np.asarray(Image.open(pngs[0])).std() > 1


def test_predict_decision_threshold_override_and_stdout(folders, tmp_path, capsys):
    _, normal, test = folders
    model = tmp_path / "m.safetensors"
    assert main(["fit", "--method", "pixel_stats", "--images", str(normal), "--out", str(model),
                 "--image-size", "48", "--holdout", "0"]) == 0
    capsys.readouterr()
    assert main(["predict", "--model", str(model), str(test), "--threshold", "-1"]) == 0
    rows = list(csv.DictReader(capsys.readouterr().out.splitlines()))
    assert len(rows) == 6 and all(r["decision"] == "anomalous" for r in rows)


@pytest.mark.parametrize("args, message", [
    (["fit", "--method", "pixel_stats", "--images", "NOWHERE", "--out", "m.safetensors"], "NOWHERE: no such file"),
    (["fit", "--method", "pixel_stats", "--images", "{normal}", "--out", "m.pt"], "--out must end in .safetensors"),
    (["fit", "--method", "pixel_stats", "--images", "{normal}", "--out", "{normal}/cam_000.png/m.safetensors"],
     "is a file"),
    (["fit", "--method", "padim", "--images", "{normal}", "--out", "m.safetensors", "--set", "n_features=many"],
     "expected a value of type int"),
    (["fit", "--method", "padim", "--images", "{normal}", "--out", "m.safetensors", "--set", "k=3"],
     "padim has no such hyper-parameter"),
    (["fit", "--method", "padim", "--images", "{normal}", "--out", "m.safetensors", "--set", "k"], "KEY=VALUE"),
    (["fit", "--method", "pixel_stats", "--images", "{normal}", "--out", "m.safetensors", "--limit", "0"],
     "positive whole number"),
    (["fit", "--method", "pixel_stats", "--images", "{normal}", "--out", "m.safetensors", "--batch-size", "-2"],
     "positive whole number"),
    (["fit", "--method", "pixel_stats", "--images", "{normal}", "--out", "m.safetensors", "--limit", "3"],
     "too few to hold out"),
    (["predict", "--model", "missing.safetensors", "{normal}"], "missing.safetensors: no such file"),
    (["predict", "--model", "{normal}/cam_000.png", "{normal}"], "not a readable adlib model file"),
])
def test_user_errors_are_one_line_without_traceback(folders, tmp_path, args, message):
    _, normal, _ = folders
    proc = subprocess.run([sys.executable, "-m", "adlib", *[a.format(normal=normal) for a in args]],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("*.safetensors"))     # nothing written when the input was refused


def test_output_path_is_checked_before_any_work(folders, tmp_path):
    """A typo in --out is reported at once, not after the fit."""
    _, normal, _ = folders
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    proc = adlib("fit", "--method", "patchcore", "--images", str(normal), "--out", str(blocker / "m.safetensors"))
    assert proc.returncode == 2 and "is a file" in proc.stderr
    assert "patchcore features" not in proc.stderr      # no progress bar: nothing was computed


def test_debug_shows_the_traceback(folders, tmp_path):
    _, normal, _ = folders
    proc = adlib("fit", "--debug", "--method", "pixel_stats", "--images", "NOWHERE", "--out", str(tmp_path / "m.safetensors"))
    assert proc.returncode == 2 and "Traceback" in proc.stderr and "no such file" in proc.stderr


def test_missing_masks_option_that_the_error_suggests(synthetic_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(synthetic_root / "synthetic", root / "synthetic")
    next((root / "synthetic" / "ground_truth").rglob("*.png")).unlink()
    base = ["evaluate", "--method", "pixel_stats", "--data", str(root), "--category", "synthetic",
            "--image-size", "48", "--device", "cpu"]
    refused = adlib(*base)
    assert refused.returncode == 2 and "--missing-masks skip" in refused.stderr
    skipped = adlib(*base, "--missing-masks", "skip", "--json", str(tmp_path / "m.json"))
    assert skipped.returncode == 0, skipped.stderr


def test_fit_keeps_a_method_s_own_threshold_rule_and_says_which_rule_it_used(folders, tmp_path, capsys):
    _, normal, _ = folders
    for method, extra in [("dfr", ["--set", "epochs=1"]), ("pixel_stats", [])]:
        model = tmp_path / f"{method}.safetensors"
        assert main(["fit", "--method", method, "--images", str(normal), "--out", str(model), "--image-size", "64",
                     "--holdout", "0.25", *extra]) == 0
        summary = json.loads(capsys.readouterr().out)
        if method == "dfr":      # its quantile of training scores: all images fit, none held out by the CLI
            assert summary["holdout_images"] == 0 and "dfr's own" in summary["threshold_rule"]
            assert summary["threshold"] == pytest.approx(load_detector(model).threshold)
        else:
            assert summary["holdout_images"] >= 2 and summary["threshold_rule"].startswith("mean + 3 std of")
