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
from matplotlib import colormaps
from PIL import Image

from adlib.__main__ import main
from adlib.data import Preprocessing
from adlib.viz import MAP_CMAP
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


def test_fit_then_predict_on_a_plain_folder(folders, synthetic_root, tmp_path):
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
    # each spot image's overlay is hotter inside its defect than outside: undo the 50% blend with the
    # image, then read the map level back off the colour map
    plain = Preprocessing(image_size=64)
    palette = 255 * colormaps[MAP_CMAP](np.linspace(0, 1, 256))[:, :3]
    for png in heat.glob("spot_*_heatmap.png"):
        stem = png.name[len("spot_"):-len("_heatmap.png")]
        mask_file = synthetic_root / "synthetic" / "ground_truth" / "spot" / f"{stem}_mask.png"
        pixels = plain.read(test / f"spot_{stem}.png")[0].permute(1, 2, 0).numpy().astype(float)
        colour = 2 * np.asarray(Image.open(png), dtype=float) - pixels
        level = ((colour[:, :, None, :] - palette) ** 2).sum(-1).argmin(-1) / 255
        inside = np.asarray(Image.open(mask_file).convert("L").resize((64, 64), Image.NEAREST)) > 127
        assert level[inside].mean() > 3 * level[~inside].mean() + 0.03, png.name


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
    defects = sum(1 for f in (root / "synthetic" / "test").rglob("*.png") if f.parent.name != "good")
    goods = sum(1 for _ in (root / "synthetic" / "test" / "good").glob("*.png"))
    result = json.loads((tmp_path / "m.json").read_text())
    assert result["n_test"] == goods + defects - 1            # exactly the image without its mask is left out


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


# ---------------------------------------------------------------------------------------------
# predict streams: one read per file, batches no larger than --batch-size, each batch written and
# dropped before the next is read
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def many_inputs(folders, tmp_path_factory) -> tuple[Path, list[str]]:
    """A fitted pixel_stats model and 12 inputs in two folders holding the same file names."""
    _, normal, test = folders
    base = tmp_path_factory.mktemp("many")
    model = base / "ps.safetensors"
    assert main(["fit", "--method", "pixel_stats", "--images", str(normal), "--out", str(model),
                 "--image-size", "48", "--holdout", "0.25"]) == 0
    inputs = []
    for part in ("a", "b"):
        (base / part).mkdir()
        for path in sorted(test.glob("*.png")):
            shutil.copy(path, base / part / path.name)
        inputs.append(str(base / part))
    return model, inputs


def test_predict_streams_each_file_read_once_batches_bounded(many_inputs, tmp_path, monkeypatch, capsys):
    import gc
    import weakref

    from adlib.data import Preprocessing, list_image_files
    from adlib.detectors import PixelStats

    model, inputs = many_inputs
    files = list_image_files(inputs)
    heat = tmp_path / "heat"
    reads: list[str] = []
    real_read = Preprocessing.read

    def counting_read(self, path, *args, **kwargs):
        reads.append(str(path))
        return real_read(self, path, *args, **kwargs)

    sizes: list[int] = []
    earlier_maps: list[weakref.ref] = []
    real_predict = PixelStats.predict

    def recording_predict(self, images):
        gc.collect()
        # every earlier batch is written (its heat maps on disk) and no longer held when the next one comes
        assert all(ref() is None for ref in earlier_maps), "an earlier batch's maps are still held"
        assert len(list(heat.glob("*.png"))) == sum(sizes)
        sizes.append(len(images))
        scores, maps = real_predict(self, images)
        earlier_maps.append(weakref.ref(maps))
        return scores, maps

    monkeypatch.setattr(Preprocessing, "read", counting_read)
    monkeypatch.setattr(PixelStats, "predict", recording_predict)
    assert main(["predict", "--model", str(model), *inputs, "--csv", str(tmp_path / "s.csv"),
                 "--heatmaps", str(heat), "--batch-size", "5"]) == 0
    assert sizes == [5, 5, 2]
    assert sorted(reads) == sorted(map(str, files))        # each input opened exactly once, heat maps included
    # heat-map names as before: the stem, numbered from 2 where two inputs share it
    stems = [p.stem for p in files]
    expected = {f"{s}_heatmap.png" for s in stems} | {f"{s}_2_heatmap.png" for s in stems}
    assert {p.name for p in heat.glob("*.png")} == expected
    assert "12 heat maps" in capsys.readouterr().err


def test_predict_csv_and_heatmaps_equal_one_unbatched_predict(many_inputs, tmp_path):
    from adlib.data import list_image_files
    from adlib.viz import heatmap_rgb

    model, inputs = many_inputs
    out_csv, heat = tmp_path / "s.csv", tmp_path / "heat"
    assert main(["predict", "--model", str(model), *inputs, "--csv", str(out_csv), "--heatmaps", str(heat),
                 "--batch-size", "4"]) == 0
    rows = list(csv.DictReader(open(out_csv, newline="")))
    assert list(rows[0]) == ["path", "score", "decision", "threshold"]
    assert not list(tmp_path.glob(".*partial"))
    detector = load_detector(model)
    files = list_image_files(inputs)
    images = detector.preprocessing.load_many(files)
    scores, maps = detector.predict(images)                  # all files in one call, nothing streamed
    t = detector.threshold
    assert [r["path"] for r in rows] == [str(p) for p in files]
    assert [r["threshold"] for r in rows] == [f"{t:.6g}"] * len(files)
    assert [r["decision"] for r in rows] == ["anomalous" if s > t else "normal" for s in scores.tolist()]
    assert [float(r["score"]) for r in rows] == pytest.approx(scores.tolist(), rel=1e-5)
    # one colour scale, fixed at the first batch (the first 4 maps) and twice the threshold
    vmin, vmax = float(maps[:4].min()), max(float(maps[:4].max()), 2 * t)
    seen: set[str] = set()
    for path, image, amap in zip(files, images, maps):
        name = f"{path.stem}_heatmap.png" if f"{path.stem}_heatmap.png" not in seen else f"{path.stem}_2_heatmap.png"
        seen.add(name)
        written = np.asarray(Image.open(heat / name)).astype(int)
        assert np.abs(written - heatmap_rgb(image, amap, vmin, vmax).astype(int)).max() <= 1, name


def test_predict_that_fails_midway_leaves_no_csv(many_inputs, tmp_path, monkeypatch):
    from adlib.detectors import PixelStats

    model, inputs = many_inputs
    calls = []
    real_predict = PixelStats.predict

    def failing_second_batch(self, images):
        calls.append(len(images))
        if len(calls) == 2:
            raise ValueError("unreadable image")
        return real_predict(self, images)

    monkeypatch.setattr(PixelStats, "predict", failing_second_batch)
    out_csv = tmp_path / "s.csv"
    assert main(["predict", "--model", str(model), *inputs, "--csv", str(out_csv), "--batch-size", "5"]) == 2
    assert not out_csv.exists() and not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------
# pretrain: options read from the recipe registry; main's user errors
# ---------------------------------------------------------------------------------------------

OPTIONS_BEFORE_THE_REGISTRY = {   # every recipe option the CLI had when it declared them by hand
    "centering": ["backbone", "epochs", "lambda_center", "form", "batch_size", "lr", "seed", "labelled"],
    "semi_formula": ["images", "backbone", "init", "losses", "margin", "tau", "batch_size", "lr", "seed", "workers"],
}


@pytest.mark.parametrize("name", ["centering", "semi_formula"])
def test_pretrain_options_are_the_recipe_fields_with_their_defaults(name):
    import dataclasses
    import inspect

    from adlib.__main__ import _recipe_from_args, build_parser
    from adlib.pretrain import RECIPES

    entry = RECIPES[name]
    parser = build_parser()
    sub = next(a for a in parser._actions if hasattr(a, "choices") and a.choices and "pretrain" in a.choices)
    recipe_parser = next(a for a in sub.choices["pretrain"]._actions if getattr(a, "choices", None)
                         and name in a.choices).choices[name]
    flags = {a.dest: a for a in recipe_parser._actions}
    for f in entry.fields():
        assert f"--{f.name.replace('_', '-')}" in flags[f.name].option_strings
        assert flags[f.name].default == f.default, f.name
    for option in entry.run_options:
        assert flags[option].default == inspect.signature(entry.pretrain).parameters[option].default
    assert set(OPTIONS_BEFORE_THE_REGISTRY[name]) <= set(flags)
    assert flags["checkpoint_every"].default == entry.checkpoint_every == {"centering": 20, "semi_formula": 200}[name]
    defaults = build_parser().parse_args(["pretrain", name, "--out", "w.safetensors"])
    assert _recipe_from_args(entry, defaults) == entry.recipe()
    assert dataclasses.asdict(_recipe_from_args(entry, defaults)) == dataclasses.asdict(entry.recipe())


def test_pretrain_tuple_and_optional_options_parse():
    from adlib.__main__ import _recipe_from_args, build_parser
    from adlib.pretrain import RECIPES

    args = build_parser().parse_args(["pretrain", "centering", "--out", "w.safetensors", "--strides", "16", "4",
                                      "--labelled", "none", "--class-weight", "0.5"])
    recipe = _recipe_from_args(RECIPES["centering"], args)
    assert recipe.strides == (4, 16) and recipe.labelled is None and recipe.class_weight == 0.5
    args = build_parser().parse_args(["pretrain", "centering", "--out", "w.safetensors", "--labelled", "imagenet/"])
    assert _recipe_from_args(RECIPES["centering"], args).labelled == "imagenet/"
    args = build_parser().parse_args(["pretrain", "semi_formula", "--out", "w.safetensors", "--components", "2", "4",
                                      "--sigma", "0.02", "0.1", "--signs", "positive"])
    recipe = _recipe_from_args(RECIPES["semi_formula"], args)
    assert recipe.components == (2, 4) and recipe.sigma == (0.02, 0.1) and recipe.signs == "positive"
    with pytest.raises(SystemExit):      # a (min, max) option takes exactly two numbers
        build_parser().parse_args(["pretrain", "semi_formula", "--out", "w.safetensors", "--components", "2"])


@pytest.mark.parametrize("name", ["centering", "semi_formula"])
def test_pretrain_runs_every_recipe_through_one_path(name, synthetic_root, tmp_path, monkeypatch, capsys):
    """The recipe from the options and the run options reach the registered function; one summary/save."""
    import dataclasses
    import functools

    from adlib.pretrain import RECIPES
    from adlib.train import History

    entry = RECIPES[name]
    seen = {}

    @functools.wraps(entry.pretrain)      # the signature the CLI reads run options from
    def fake_pretrain(images, recipe, **kwargs):
        seen.update(images=len(images), recipe=recipe, **kwargs)
        history = History(epoch={"loss": [0.5, 0.25]}, lr=[1e-4] * 3)      # 3 steps, 2 epochs
        values = dict(net=None, recipe=recipe, history=history, seconds=1.0, train_images=len(images), world_size=1,
                      stream_images_per_s=10.0)
        return entry.run(**{f.name: values[f.name] for f in dataclasses.fields(entry.run)})

    def fake_save(run, path, **extra):
        Path(path).write_bytes(b"backbone")
        seen["extra"] = extra
        return "abc"

    monkeypatch.setitem(RECIPES, name, dataclasses.replace(entry, pretrain=fake_pretrain))
    monkeypatch.setattr(entry.run, "save", fake_save)
    out = tmp_path / "w.safetensors"
    extra = ["--strides", "8", "16"] + (["--workers", "0"] if name == "semi_formula" else ["--epochs", "2"])
    assert main(["pretrain", name, "--data", str(synthetic_root), "--category", "synthetic", "--out", str(out),
                 "--image-size", "32", "--limit", "4", "--device", "cpu", "--batch-size", "2", *extra]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert seen["recipe"] == entry.recipe(strides=(8, 16), batch_size=2, **({"epochs": 2} if name == "centering" else {}))
    assert seen["images"] == 4 and seen["checkpoint_every"] == entry.checkpoint_every and not seen["resume"]
    assert ("workers" in seen) == (name == "semi_formula")
    assert seen["extra"] == {"category": "synthetic", "image_size": 32}
    assert summary["recipe"] == name and summary["sha256"] == "abc" and summary["out"] == str(out)
    assert summary["steps"] == 3 and summary["loss"] == 0.25 and summary["world_size"] == 1
    count = "train_images" if name == "centering" else "normal_images"
    assert summary[count] == 4


@pytest.mark.parametrize("error, code", [(ValueError("bad"), 2), (OSError("disk"), 2), (ImportError("onnx"), 2),
                                         (TypeError("bug"), None), (KeyError("bug"), None), (RuntimeError("bug"), None)])
def test_main_turns_only_user_errors_into_exit_2(error, code, monkeypatch, capsys):
    import adlib.__main__ as cli

    def fail(args):
        raise error

    monkeypatch.setattr(cli, "run_export", fail)
    argv = ["export", "--model", "m.safetensors", "--out", "m.onnx"]
    if code is None:         # a bug: its traceback, not "bad input"
        with pytest.raises(type(error)):
            cli.main(argv)
    else:
        assert cli.main(argv) == code
        assert "adlib export: error:" in capsys.readouterr().err
