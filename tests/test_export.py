"""ONNX export: onnxruntime gives adlib's scores and maps on the real bottle test set, without PyTorch;
bad model files and unsupported methods are one clear line."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
import onnx  # noqa: E402

from adlib.data import MVTecDataset, Preprocessing, normalize, train_batches  # noqa: E402
from adlib.deploy import ExportedDetector, ModelFileError, max_relative_error  # noqa: E402
from adlib.detectors import get_detector  # noqa: E402
from adlib.export import EXPORTABLE, ExportError, export_onnx  # noqa: E402

SIZE = 128
RTOL = 1e-4
# Short fits: parity does not need a good detector, only the same one on both sides.
HYPER = {"padim": {}, "patchcore": {}, "dfr": {"epochs": 2}, "autoencoder": {"epochs": 2},
         "densehybrid": {"epochs": 1, "variants": 1}}


def test_max_relative_error_is_per_image_and_refuses_mismatched_shapes():
    reference = np.array([[[10.0, -20.0]], [[1.0, 0.5]]])          # image scales 20 and 1
    actual = reference + np.array([[[0.0, 2.0]], [[0.25, 0.0]]])    # 2 / 20 = 0.1, 0.25 / 1 = 0.25
    assert max_relative_error(actual, reference) == pytest.approx(0.25, rel=1e-12)
    assert max_relative_error(np.array([1.0, 4.0]), np.array([2.0, 4.0])) == pytest.approx(0.5)   # scores: own scale
    with pytest.raises(ValueError, match="one shape"):
        max_relative_error(actual[:1], reference)


@pytest.fixture(scope="module")
def bottle(real_root):
    train = MVTecDataset(real_root, "bottle", "train", image_size=SIZE, limit=24)
    test = MVTecDataset(real_root, "bottle", "test", image_size=SIZE)
    return train, [entry.image for entry in test.entries]


@pytest.mark.slow
@pytest.mark.parametrize("method", EXPORTABLE)
def test_onnxruntime_matches_adlib_on_the_bottle_test_set(method, bottle, tmp_path):
    train, test_files = bottle
    detector = get_detector(method, **HYPER[method]).fit(train_batches(train, 8))
    detector.threshold = 1.25     # any value: it must come back from the file as it was
    path = export_onnx(detector, tmp_path / f"{method}.onnx")
    exported = ExportedDetector(path, providers=["CPUExecutionProvider"])
    graph = onnx.load(str(path)).graph
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph.output}
    assert dims == {"score": ["batch"], "anomaly_map": ["batch", SIZE, SIZE]}
    assert (exported.method, exported.input_size, exported.threshold) == (method, (SIZE, SIZE), 1.25)
    scores, maps = exported.predict_files(test_files, batch_size=16)
    ref_scores, ref_maps = detector.predict_files(test_files, batch_size=16)
    assert scores.shape == (len(test_files),) and maps.shape == (len(test_files), SIZE, SIZE)
    assert max_relative_error(scores, ref_scores.numpy()) < RTOL
    assert max_relative_error(maps, ref_maps.numpy()) < RTOL
    assert np.unique(np.round(scores, 4)).size > len(test_files) // 2     # real, varied scores, not a constant


@pytest.mark.slow
def test_patchcore_reweighted_score_matches_too(bottle, tmp_path):
    train, test_files = bottle
    detector = get_detector("patchcore", reweight=True).fit(train_batches(train, 8))
    exported = ExportedDetector(export_onnx(detector, tmp_path / "pc.onnx"))
    scores, _ = exported.predict_files(test_files[:24])
    reference, _ = detector.predict_files(test_files[:24])
    plain, _ = get_detector("patchcore").fit(train_batches(train, 8)).predict_files(test_files[:24])
    assert not torch.allclose(reference, plain)                 # the re-weighting changes the scores ...
    assert max_relative_error(scores, reference.numpy()) < RTOL   # ... and the graph has it


@pytest.mark.slow
def test_the_runner_needs_no_pytorch_and_writes_the_csv(bottle, tmp_path):
    train, test_files = bottle
    detector = get_detector("padim").fit(train_batches(train, 8))
    folder = test_files[0].parent                               # test/broken_large: one folder of files
    files = sorted(p for p in folder.iterdir() if p.suffix == ".png")
    reference, _ = detector.predict_files(files)
    middle = reference.sort().values[len(files) // 2 - 1: len(files) // 2 + 1]
    detector.threshold = float(middle.mean())                   # between two scores: half the folder above it
    model = export_onnx(detector, tmp_path / "padim.onnx")
    blocker = "import sys; sys.modules['torch'] = None; import runpy; sys.argv = sys.argv[1:]; " \
              "runpy.run_module('adlib.deploy', run_name='__main__')"
    out = tmp_path / "scores.csv"
    run = subprocess.run([sys.executable, "-c", blocker, "adlib.deploy", "--model", str(model), str(folder),
                          "--csv", str(out)], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert run.returncode == 0, run.stderr
    rows = list(csv.DictReader(out.open()))
    assert [Path(r["path"]).name for r in rows] == [p.name for p in files]
    got = np.array([float(r["score"]) for r in rows])
    assert np.allclose(got, reference.numpy(), rtol=RTOL)
    flagged = [int(r["anomalous"]) for r in rows]
    assert flagged == [int(s > detector.threshold) for s in reference] and 0 < sum(flagged) < len(files)


def test_export_refuses_what_it_cannot_export(tmp_path, synthetic_root):
    with pytest.raises(ExportError, match="pixel_stats cannot be exported.*padim"):
        export_onnx(get_detector("pixel_stats").fit(torch.zeros(2, 3, 32, 32)), tmp_path / "x.onnx")
    with pytest.raises(ExportError, match="not fitted"):
        export_onnx(get_detector("padim"), tmp_path / "x.onnx")
    on_tensors = get_detector("autoencoder", epochs=1).fit(normalize(torch.rand(4, 3, 64, 64)))
    with pytest.raises(ExportError, match=r"fitted on tensors.*Preprocessing\(image_size=64\)"):
        export_onnx(on_tensors, tmp_path / "x.onnx")
    with pytest.raises(ExportError, match="gives 32x32 images, but the autoencoder was fitted on 64x64"):
        export_onnx(on_tensors, tmp_path / "x.onnx", preprocessing=Preprocessing(image_size=32))
    assert export_onnx(on_tensors, tmp_path / "ok.onnx", preprocessing=Preprocessing(image_size=64)).is_file()


def test_the_runner_refuses_foreign_and_other_version_files(tmp_path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model at all")
    with pytest.raises(ModelFileError, match="not an ONNX model onnxruntime can load"):
        ExportedDetector(garbage)
    with pytest.raises(ModelFileError, match="no such model file"):
        ExportedDetector(tmp_path / "missing.onnx")
    detector = get_detector("autoencoder", epochs=1).fit(normalize(torch.rand(4, 3, 64, 64)))
    detector.threshold = None                                   # (it calibrates one on a hold-out of its own)
    model = onnx.load(export_onnx(detector, tmp_path / "ae.onnx", preprocessing=Preprocessing(image_size=64)))
    foreign, older = onnx.ModelProto(), onnx.ModelProto()
    foreign.CopyFrom(model)
    older.CopyFrom(model)
    del foreign.metadata_props[:]
    for entry in older.metadata_props:
        if entry.key == "adlib_format":
            entry.value = "adlib-onnx/0"
    onnx.save(foreign, str(tmp_path / "foreign.onnx"))
    onnx.save(older, str(tmp_path / "older.onnx"))
    with pytest.raises(ModelFileError, match="not one exported by adlib"):
        ExportedDetector(tmp_path / "foreign.onnx")
    with pytest.raises(ModelFileError, match="format 'adlib-onnx/0'.*export the model again"):
        ExportedDetector(tmp_path / "older.onnx")
    exported = ExportedDetector(tmp_path / "ae.onnx")
    with pytest.raises(ValueError, match=r"pixels must be \(B, 3, 64, 64\)"):
        exported.predict(np.zeros((1, 3, 32, 32), np.float32))
    with pytest.raises(ValueError, match="has no threshold"):
        exported.decide(np.zeros(2))


@pytest.mark.slow
def test_cli_export_writes_a_runnable_file_and_refuses_bad_models(tmp_path, synthetic_root):
    from adlib.__main__ import main

    model, onnx_file = tmp_path / "m.safetensors", tmp_path / "m.onnx"
    assert main(["fit", "--method", "padim", "--data", str(synthetic_root), "--category", "synthetic",
                 "--image-size", "64", "--out", str(model)]) == 0
    assert main(["export", "--model", str(model), "--out", str(onnx_file)]) == 0
    exported = ExportedDetector(onnx_file)
    from adlib.detectors import load_detector
    assert exported.threshold == pytest.approx(load_detector(model).threshold)
    assert exported.preprocessing["image_size"] == 64
    stats = tmp_path / "stats.safetensors"
    assert main(["fit", "--method", "pixel_stats", "--data", str(synthetic_root), "--category", "synthetic",
                 "--image-size", "64", "--out", str(stats)]) == 0
    not_model = tmp_path / "notes.safetensors"
    not_model.write_bytes(b"\x00" * 64)
    for argv, message in [(["--model", str(stats)], "pixel_stats cannot be exported"),
                          (["--model", str(not_model)], "not an adlib detector file"),
                          (["--model", str(tmp_path / "none.safetensors")], "no such file"),
                          (["--model", str(model), "--out", str(tmp_path / "m.txt")], "--out must end in .onnx")]:
        if "--out" not in argv:
            argv = [*argv, "--out", str(tmp_path / "x.onnx")]
        run = subprocess.run([sys.executable, "-m", "adlib", "export", *argv], capture_output=True, text=True,
                             cwd=Path(__file__).parents[1], env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
        assert run.returncode == 2, run.stderr
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], run.stderr
    assert json.loads(subprocess.run([sys.executable, "-m", "adlib", "export", "--model", str(model), "--out",
                                      str(tmp_path / "again.onnx")], capture_output=True, text=True,
                                     cwd=Path(__file__).parents[1]).stdout)["format"] == "onnx"
