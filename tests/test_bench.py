"""adlib.bench writes the documented table; its peers agree with adlib (correctness, not speed)."""

from __future__ import annotations

import csv

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
    calls = []
    real = kernels.gmm_blobs
    monkeypatch.setattr(kernels, "gmm_blobs", lambda images, **kw: calls.append(len(images)) or real(images, **kw))
    rate = bench.blob_stream_rate(3, 16, torch.device("cpu"), seconds=0.0)
    assert calls == [3, 3, 3]                                    # warm-up + at least two streamed batches
    assert rate > 0


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
    assert bench._coverage_radius(x, chosen) < 0.8 * bench._coverage_radius(x, first_60)
