"""adlib.bench writes the documented table; its peers agree with adlib (correctness, not speed)."""

from __future__ import annotations

import csv
import types

import pytest
import torch

from adlib import bench, kernels


def test_bench_writes_the_documented_csv(tmp_path, capsys):
    assert bench.main(["--quick", "--only", "blobs", "--out", str(tmp_path), "--device", "cpu"]) == 0
    with open(tmp_path / "bench.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == bench.COLUMNS
        rows = list(reader)
    assert rows and all(r["kernel"] == "gmm_blobs" for r in rows)
    row = rows[0]
    assert float(row["speedup"]) == pytest.approx(float(row["peer_s"]) / float(row["adlib_s"]), rel=1e-9)
    assert float(row["max_rel_err"]) < 1e-4                      # the loop makes the same blobs
    assert "device: cpu" in (tmp_path / "bench.md").read_text()
    assert "million a minute" in capsys.readouterr().out        # the streaming rate (the GPU bar's unit)


def test_stream_row_prints_the_ratio_of_stream_to_training_rate(tmp_path, capsys):
    assert bench.main(["--quick", "--only", "stream", "--out", str(tmp_path), "--device", "cpu"]) == 0
    with open(tmp_path / "bench.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert row["kernel"] == "semi_formula stream"
    ratio = float(row["speedup"])
    assert ratio == pytest.approx(float(row["peer_s"]) / float(row["adlib_s"]), rel=1e-9)
    assert f"ratio {ratio:,.1f}x" in capsys.readouterr().out


def test_blob_stream_rate_counts_whole_batches(monkeypatch):
    calls, clock = [], [100.0]
    real = kernels.gmm_blobs

    def blobs_taking_half_a_second(images, **kw):               # a clock that moves only while blobs are made
        calls.append(len(images))
        clock[0] += 0.5
        return real(images, **kw)

    monkeypatch.setattr(kernels, "gmm_blobs", blobs_taking_half_a_second)
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    rate = bench.blob_stream_rate(3, 16, torch.device("cpu"), seconds=0.0)
    assert calls == [3, 3, 3]                                    # warm-up + at least two streamed batches
    assert rate == 6 / 1.0 * 60                                  # 6 images in the 1 s after the warm-up, a minute


def test_naive_gaussian_peer_agrees_with_adlib():
    train = torch.randn(30, 6, 3, 3, generator=torch.Generator().manual_seed(0))
    test = torch.randn(2, 6, 3, 3, generator=torch.Generator().manual_seed(1))
    mean, inv = bench._naive_gaussian(train)
    ours = bench._adlib_gaussian(train).mahalanobis(test)
    torch.testing.assert_close(bench._naive_distance(test, mean, inv), ours, rtol=1e-4, atol=1e-5)


def test_approximate_greedy_peer_returns_distinct_points():
    x = torch.rand(2000, 3, generator=torch.Generator().manual_seed(2)) ** 3     # uneven density, low dimension
    chosen = bench._approximate_greedy(x, 60, proj_dim=0, seed=0)
    assert chosen.unique().numel() == 60
    first_60 = torch.arange(60)                                                   # an arbitrary subset
    assert kernels.covering_radius(x, chosen) < 0.8 * kernels.covering_radius(x, first_60)


@pytest.mark.parametrize("kind", ["clustered", "unclustered"])
def test_coreset_rows_compare_the_exact_greedy_with_its_peers(kind, monkeypatch):
    rows = bench.bench_coreset(3000, 24, kind, 40, torch.device("cpu"))
    plain = rows[0]
    assert plain["peer"] == "plain greedy loop" and plain["max_rel_err"] == 0.0    # the same selection
    assert plain["speedup"] == pytest.approx(plain["peer_s"] / plain["adlib_s"])
    assert any("not installed" in r["peer"] or "anomalib" in r["peer"] for r in rows)
    monkeypatch.setattr(bench, "PEER_FULL_WORK", 0)            # too large to run in full: scaled steps
    monkeypatch.setattr(bench, "CORESET_STEPS", 10)
    scaled = bench.bench_coreset(3000, 24, kind, 40, torch.device("cpu"))[0]
    assert scaled["peer"] == "plain greedy loop (time of 10 steps x 4)" and scaled["max_rel_err"] is None


def test_chunked_coreset_row_reports_time_and_radius_against_exact(capsys):
    (row,) = bench.bench_chunked_coreset(8000, 24, "clustered", 0.1, 4000, True, torch.device("cpu"))
    assert row["kernel"].startswith("coreset chunked (4000-row chunks") and row["peer"] == "exact greedy (adlib)"
    assert row["speedup"] == pytest.approx(row["peer_s"] / row["adlib_s"])
    assert abs(row["max_rel_err"]) < 0.15                       # within the 1.15x bar (original space)
    assert "(projected space)" in capsys.readouterr().out
    (alone,) = bench.bench_chunked_coreset(8000, 24, "unclustered", 0.1, 2000, False, torch.device("cpu"))
    assert alone["adlib_s"] > 0 and alone["peer_s"] is None and "not run" in alone["peer"]


def test_write_table_writes_markdown_and_csv_with_missing_values(tmp_path, capsys):
    rows = [{"name": "a", "value": 0.123456, "missing": None}, {"name": "b", "value": 2.0, "missing": 1.5}]
    bench.write_table(rows, ["name", "value", "missing"], tmp_path / "out" / "table", "device: cpu", digits=3)
    md = (tmp_path / "out" / "table.md").read_text()
    assert md.startswith("device: cpu\n\n| name | value | missing |")
    assert "| a | 0.123 | n/a |" in md and "| b | 2.000 | 1.500 |" in md
    assert "| a | 0.123 | n/a |" in capsys.readouterr().out
    with open(tmp_path / "out" / "table.csv") as f:
        read = list(csv.DictReader(f))
    assert [r["name"] for r in read] == ["a", "b"] and read[0]["missing"] == "" and float(read[0]["value"]) == 0.123456


def test_export_row_times_both_runtimes_per_image_and_checks_the_maps(tmp_path):
    pytest.importorskip("onnxruntime")
    from adlib.data import normalize
    from adlib.detectors import get_detector

    pixels = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    detector = get_detector("autoencoder", epochs=1).fit(normalize(torch.rand(4, 3, 64, 64)))
    from adlib.data import Preprocessing
    detector.preprocessing = Preprocessing(image_size=64)
    row = bench.bench_export(detector, pixels, tmp_path / "ae.onnx", repeat=1)
    assert (row["kernel"], row["peer"], row["size"]) == ("autoencoder predict", "onnxruntime", "3 images 64px")
    assert row["adlib_s"] > 0 and row["peer_s"] > 0
    assert row["speedup"] == pytest.approx(row["peer_s"] / row["adlib_s"])
    assert row["max_rel_err"] < 1e-4
    assert (tmp_path / "ae.onnx").is_file()
