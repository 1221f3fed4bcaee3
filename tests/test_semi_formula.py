"""Semi-formula-driven pre-training: the stream (disjoint ranks and workers, restartable, exact masks),
the losses against float64 loops, resume on the shared loop, DDP weights, the CLI and PaDiM on its file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adlib.__main__ import main
from adlib.data import normalize
from adlib.backbones import build_architecture, load_backbone_file, read_backbone_metadata
from adlib.pretrain import SemiFormulaNet, SemiFormulaRecipe, SemiFormulaStream, pretrain_semi_formula
from adlib.pretrain.semi_formula import (patch_changes, ranking_loss, semi_formula_losses, separation_loss,
                                         stream_rate)

ROOT = Path(__file__).resolve().parents[1]


def _normals(n: int = 5, side: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(0))


def _stream(images: int = 48, batch: int = 4, **kw) -> SemiFormulaStream:
    return SemiFormulaStream(_normals(), SemiFormulaRecipe(images=images, batch_size=batch, **kw), "cpu")


def test_two_ranks_stream_disjoint_samples_and_together_cover_the_stream():
    stream = _stream(images=48, batch=4)
    steps = stream.steps_per_epoch(world=2)
    assert steps == 6
    ranks = [[stream.batch(0, s, rank, 2) for s in range(steps)] for rank in (0, 1)]
    ids = [torch.cat([b["index"] for b in r]) for r in ranks]
    assert not set(ids[0].tolist()) & set(ids[1].tolist())
    assert sorted(torch.cat(ids).tolist()) == list(range(48))          # every sample of the epoch, once
    images = [torch.cat([b["anomalous"] for b in r]) for r in ranks]
    for a in images[0]:                                                 # and no image is made twice
        assert not any(torch.equal(a, b) for b in images[1])


def test_each_normal_image_is_used_once_per_pass():
    stream = _stream(images=20, batch=5)
    normalized = normalize(stream.normals)                # the stream keeps [0, 1] pixels
    for g in range(2):                                  # two passes of 5 samples over 5 normal images
        used = [next(i for i in range(5) if torch.equal(x, normalized[i])) for x in stream.samples(g)["normal"]]
        assert sorted(used) == [0, 1, 2, 3, 4]


@pytest.mark.filterwarnings("ignore:This DataLoader will create")   # 3 workers on a 2-core machine: on purpose
def test_restarted_stream_gives_the_unbroken_streams_batches_with_or_without_workers():
    from torch.utils.data import DataLoader

    stream = _stream(images=40, batch=4)
    unbroken = list(stream.at(0, 0))
    restarted = list(stream.at(0, 4))
    assert len(unbroken) == 10 and len(restarted) == 6
    for a, b in zip(unbroken[4:], restarted):
        assert torch.equal(a["anomalous"], b["anomalous"]) and torch.equal(a["index"], b["index"])
    for start, workers in [(4, 2), (5, 2), (5, 3)]:          # odd restarts: the loader asks worker 0 first
        by_workers = list(DataLoader(stream.at(0, start), batch_size=None, num_workers=workers))
        expected = unbroken[start:]
        assert [b["index"].tolist() for b in by_workers] == [b["index"].tolist() for b in expected]
        assert all(torch.equal(a["mask"], b["mask"]) for a, b in zip(by_workers, expected))


def test_stream_masks_are_exactly_the_changed_pixels_and_scores_positive(monkeypatch):
    import adlib.pretrain.semi_formula as semi_formula_module

    stream = _stream(images=16, batch=8, signs="positive")
    batch = stream.samples(3)
    changed = (batch["anomalous"] != batch["normal"]).any(1, keepdim=True)
    assert torch.equal(changed, batch["mask"] == 1)
    assert (batch["score"] > 0).all() and batch["mask"].sum() > 0
    assert stream_rate(stream, batches=2) > 0
    clock, made, real = [10.0], [], stream.samples                # a clock that moves only while samples are made

    def samples_taking_a_quarter_second(g):
        made.append(g)
        clock[0] += 0.25
        return real(g)

    monkeypatch.setattr(stream, "samples", samples_taking_a_quarter_second)
    monkeypatch.setattr(semi_formula_module, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    assert stream_rate(stream, batches=2) == 2 * 8 / 0.5          # images a second, after one warm-up batch
    assert made == [0, 1, 2]


def test_separation_and_ranking_losses_match_float64_loops():
    g = torch.Generator().manual_seed(1)
    normal, anomalous = torch.randn(2, 3, 6, 5, 4, generator=g, dtype=torch.float64)
    d = patch_changes(normal, anomalous, eps=0.0)
    rms = normal.pow(2).sum(1).mean().sqrt()
    for b in range(3):
        for y in range(5):
            for x in range(4):
                ref = (anomalous[b, :, y, x] - normal[b, :, y, x]).norm() / rms
                assert abs(float(d[b, y, x] - ref)) < 1e-12
    inside = torch.rand(3, 5, 4, generator=g) > 0.6
    far = ~inside & (torch.rand(3, 5, 4, generator=g) > 0.3)
    ref = sum(max(0.0, 0.7 - float(v)) ** 2 for v in d[inside]) / int(inside.sum()) + \
        sum(float(v) ** 2 for v in d[far]) / int(far.sum())
    assert abs(float(separation_loss(d, inside, far, 0.7)) - ref) < 1e-12
    score = torch.tensor([0.3, 0.1, 0.2], dtype=torch.float64)
    total = d.flatten(1).mean(1)
    pairs = [(i, j) for i in range(3) for j in range(3) if score[i] > score[j]]
    ref = sum(float(torch.nn.functional.softplus(-(total[i].log() - total[j].log()) / 0.5)) for i, j in pairs) / len(pairs)
    assert abs(float(ranking_loss(d, score, 0.5)) - ref) < 1e-12
    # the losses point the right way: ordered totals cost less than reversed ones; a satisfied margin costs 0
    ordered = score.view(3, 1, 1).expand(3, 5, 4)
    assert ranking_loss(ordered, score, 0.1) < ranking_loss(1 / ordered, score, 0.1)
    assert float(separation_loss(torch.full((3, 5, 4), 0.8, dtype=torch.float64), inside, torch.zeros_like(far), 0.7)) == 0
    assert float(ranking_loss(d, torch.ones(3), 0.1)) == 0                # no pair differs


def test_losses_record_their_parts_and_reach_the_weights():
    stream = _stream(images=8, batch=4)
    net = SemiFormulaNet("efficientnet_lite0", (4, 8, 16))
    batch = stream.samples(0)
    out = semi_formula_losses(net(torch.cat([batch["normal"], batch["anomalous"]])), batch, stream.recipe)
    assert set(out) == {"loss", "l_sep", "l_rank", "d_blob", "d_far", "rank_corr"}
    assert set(batch) == {"normal", "anomalous", "mask", "score", "peak", "index"}
    out["loss"].backward()
    stem = net.net._conv_stem.weight
    assert stem.grad is not None and stem.grad.abs().sum() > 0
    assert net.net._conv_head.weight.grad is None                  # beyond stride 16: frozen
    assert all(m.weight.grad is None for m in net.net.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_probe_sees_bigger_changes_inside_blobs_and_for_stronger_blobs():
    from adlib.pretrain.semi_formula import probe

    normals = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 0.2 - 1.0   # smooth, dark
    stream = SemiFormulaStream(normals, SemiFormulaRecipe(images=64, batch_size=8), "cpu")
    rows = probe(SemiFormulaNet("efficientnet_lite0"), stream, batches=2)
    assert all(len(v) == 16 for v in rows.values())
    seen = torch.isfinite(rows["d_blob"]) & torch.isfinite(rows["d_far"])
    assert seen.sum() >= 12                                                    # most samples have both kinds
    assert (rows["d_blob"][seen] > rows["d_far"][seen]).all()                 # the blob moves its patches most
    weak, strong = (SemiFormulaStream(normals, SemiFormulaRecipe(images=64, batch_size=8, amplitude=a), "cpu")
                    for a in ((0.05, 0.05), (0.5, 0.5)))
    net = SemiFormulaNet("efficientnet_lite0")
    assert probe(net, strong, 1)["total"].mean() > probe(net, weak, 1)["total"].mean()


def test_probe_batch_statistics_change_a_scratch_net_and_leave_its_running_statistics_alone():
    from adlib.pretrain.semi_formula import probe

    normals = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(5)) * 0.4 - 0.2
    stream = SemiFormulaStream(normals, SemiFormulaRecipe(images=32, batch_size=8), "cpu")
    net = SemiFormulaNet("efficientnet_lite0", init="scratch")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    running = probe(net, stream, 1, batch_norm="running")
    batch = probe(net, stream, 1, batch_norm="batch")
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())   # nothing updated
    assert not torch.allclose(running["total"], batch["total"])                  # the mode matters
    assert torch.equal(running["score"], batch["score"])                         # same samples
    assert not net.training
    with pytest.raises(ValueError, match="batch_norm"):
        probe(net, stream, 1, batch_norm="train")


def test_recipe_and_stream_refuse_bad_input():
    with pytest.raises(ValueError, match="losses"):
        SemiFormulaRecipe(losses="contrastive")
    with pytest.raises(ValueError, match="init"):
        SemiFormulaRecipe(init="random")
    with pytest.raises(ValueError, match="batch_size >= 2"):
        SemiFormulaRecipe(batch_size=1)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        SemiFormulaStream(torch.zeros(4, 1, 8, 8), SemiFormulaRecipe())
    bad = _normals()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        SemiFormulaStream(bad, SemiFormulaRecipe())
    with pytest.raises(ValueError, match="no step"):
        pretrain_semi_formula(_normals(), SemiFormulaRecipe(images=3, batch_size=4), device="cpu", progress=False)


def test_interrupted_pretraining_resumes_to_the_unbroken_weights(tmp_path):
    recipe = SemiFormulaRecipe(images=24, batch_size=4, lr=1e-3)
    images = _normals(side=64)
    unbroken = pretrain_semi_formula(images, recipe, device="cpu", progress=False)
    folder = tmp_path / "ckpt"
    pretrain_semi_formula(images, recipe, device="cpu", progress=False, checkpoint_dir=folder, stop_after_steps=2)
    resumed = pretrain_semi_formula(images, recipe, device="cpu", progress=False, checkpoint_dir=folder, resume=True)
    assert unbroken.history.steps == resumed.history.steps == 6
    assert resumed.history.resumed_at == 2 and resumed.history.steps_this_session == 4
    assert unbroken.history.step["loss"] == resumed.history.step["loss"]
    a, b = unbroken.net.state_dict(), resumed.net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="images_sha256"):                     # other normal images: refused
        pretrain_semi_formula(images.flip(-1), recipe, device="cpu", progress=False, checkpoint_dir=folder, resume=True)
    original = SemiFormulaNet("efficientnet_lite0").state_dict()
    assert any(not torch.equal(a[k], v) for k, v in original.items())       # it trained


def _torchrun(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_two_processes_end_with_identical_weights(tmp_path):
    done = _torchrun([str(ROOT / "tests" / "ddp_worker.py"), str(tmp_path), "semi_formula"])
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)          # weights and the averaged losses
    assert len(rank0["losses"]) == 4                                     # 32 images / (2 ranks x 4) per step
    ids0, ids1 = (set(load_file(str(tmp_path / f"indices{r}.safetensors"))["indices"].tolist()) for r in (0, 1))
    assert len(ids0) == len(ids1) == 16 and not ids0 & ids1             # each rank trained on its own samples


@pytest.mark.slow
def test_cli_under_torchrun_writes_a_backbone_padim_evaluates(synthetic_root, tmp_path):
    out = tmp_path / "w.safetensors"
    done = _torchrun(["-m", "adlib", "pretrain", "semi_formula", "--data", str(synthetic_root), "--category",
                      "synthetic", "--images", "32", "--batch-size", "4", "--image-size", "64", "--limit", "8",
                      "--device", "cpu", "--out", str(out)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count('"sha256"') == 1
    recipe = read_backbone_metadata(out)["recipe"]
    assert recipe["method"] == "semi_formula" and recipe["world_size"] == 2 and recipe["steps"] == 4
    moved = load_backbone_file(out)[0].state_dict()
    original = build_architecture("efficientnet_lite0").state_dict()
    assert any(not torch.equal(moved[k], original[k]) for k in original)
    metrics = tmp_path / "m.json"
    assert main(["evaluate", "--method", "padim", "--backbone", str(out), "--data", str(synthetic_root),
                 "--category", "synthetic", "--image-size", "64", "--limit", "8", "--device", "cpu",
                 "--json", str(metrics)]) == 0
    row = json.loads(metrics.read_text())
    assert 0.0 <= row["image_auroc"] <= 1.0
    # 4 steps leave a backbone PaDiM still finds the synthetic spots with (measured 1.000 / 0.991, as with
    # the ImageNet weights); a file that broke the features would not
    assert row["backbone"] == str(out) and (row["n_train"], row["n_test"]) == (8, 24)
    assert row["image_auroc"] >= 0.9 and row["pixel_auroc"] >= 0.9, row


def test_cli_refuses_bad_options_in_one_line(synthetic_root, tmp_path, capsys):
    code = main(["pretrain", "semi_formula", "--data", str(synthetic_root), "--category", "synthetic",
                 "--images", "0", "--out", str(tmp_path / "w.safetensors"), "--device", "cpu"])
    assert code == 2 and "images >= 1" in capsys.readouterr().err
    code = main(["pretrain", "semi_formula", "--out", str(tmp_path / "w.pt"), "--device", "cpu"])
    assert code == 2 and ".safetensors" in capsys.readouterr().err
