"""The shared training loop: bit-for-bit resume, seeded sharding, DDP on gloo, refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from adlib.train import TrainConfig, epoch_batches, load_checkpoint_state, train


def make_problem(seed: int = 0, dropout: float = 0.0):
    """A small regression problem: ``(model, loss_fn, (inputs (64, 8), targets (64, 1)))``."""
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randn(64, 8, generator=g)
    targets = inputs @ torch.randn(8, 1, generator=g) + 0.1 * torch.randn(64, 1, generator=g)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, 1))

    def loss_fn(net, batch):
        x, y = batch
        mse = (net(x) - y).pow(2).mean()
        return {"loss": mse, "mae": (net(x) - y).abs().mean().detach()}

    return model, loss_fn, (inputs, targets)


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# mid-epoch, exactly at an epoch's end (8 steps per epoch), and mid-epoch where a periodic checkpoint falls too
@pytest.mark.parametrize("stop_at, every", [(5, 0), (8, 0), (9, 3)])
def test_resume_continues_bit_for_bit(tmp_path, stop_at, every):
    config = dict(epochs=3, batch_size=8, lr=1e-2, device="cpu", progress=False, checkpoint_every=every)
    model, loss_fn, data = make_problem(dropout=0.2)   # dropout: the RNG state must be restored too
    full = train(model, loss_fn, data, TrainConfig(**config, checkpoint_dir=tmp_path / "a"))
    reference = _weights(model)

    model, loss_fn, data = make_problem(dropout=0.2)
    cut = train(model, loss_fn, data, TrainConfig(**config, checkpoint_dir=tmp_path / "b", stop_after_steps=stop_at))
    assert cut.steps == stop_at and load_checkpoint_state(tmp_path / "b")["step"] == stop_at
    assert len(cut.epoch.get("loss", [])) == stop_at // 8          # an interrupted epoch is not summarized
    model, loss_fn, data = make_problem(dropout=0.2)   # a new process would rebuild everything
    resumed = train(model, loss_fn, data, TrainConfig(**config, checkpoint_dir=tmp_path / "b", resume=True))
    for k, v in reference.items():
        assert torch.equal(model.state_dict()[k], v), k
    assert resumed.step == full.step and resumed.epoch == full.epoch and resumed.lr == full.lr
    assert len(full.epoch["loss"]) == 3 and full.steps == 24
    assert (full.resumed_at, resumed.resumed_at, resumed.steps_this_session) == (0, stop_at, 24 - stop_at)
    assert full.world_size == cut.world_size == resumed.world_size == 1     # a plain process


def test_a_crash_after_a_checkpoint_on_an_epoch_end_resumes_with_the_epoch_summaries(tmp_path):
    config = dict(epochs=3, batch_size=8, lr=1e-2, device="cpu", progress=False, checkpoint_every=8)
    epochs_seen = lambda e: {"val": float(e)}
    model, loss_fn, data = make_problem()
    full = train(model, loss_fn, data, TrainConfig(**config, checkpoint_dir=tmp_path / "a"), on_epoch_end=epochs_seen)

    model, loss_fn, data = make_problem()
    calls = iter(range(1000))

    def crashing(net, batch):       # a real interruption: the 12th step raises, no checkpoint of its own
        if next(calls) == 11:
            raise KeyboardInterrupt
        return loss_fn(net, batch)

    with pytest.raises(KeyboardInterrupt):
        train(model, crashing, data, TrainConfig(**config, checkpoint_dir=tmp_path / "b"), on_epoch_end=epochs_seen)
    assert load_checkpoint_state(tmp_path / "b")["step"] == 8       # the checkpoint at epoch 0's end
    model, loss_fn, data = make_problem()
    resumed = train(model, loss_fn, data, TrainConfig(**config, checkpoint_dir=tmp_path / "b", resume=True),
                    on_epoch_end=epochs_seen)
    assert resumed.epoch == full.epoch and resumed.epoch["val"] == [0.0, 1.0, 2.0]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in load_file(str(tmp_path / "a" / "model.safetensors")).items())


def test_resume_refuses_other_settings_and_a_half_written_checkpoint(tmp_path):
    model, loss_fn, data = make_problem()
    train(model, loss_fn, data, TrainConfig(epochs=2, batch_size=8, device="cpu", progress=False,
                                            checkpoint_dir=tmp_path, stop_after_steps=3), fingerprint={"data": "a"})
    with pytest.raises(ValueError, match=r"other settings \(batch_size"):
        train(model, loss_fn, data, TrainConfig(epochs=2, batch_size=4, device="cpu", progress=False,
                                                checkpoint_dir=tmp_path, resume=True), fingerprint={"data": "a"})
    with pytest.raises(ValueError, match=r"other settings \(data"):
        train(model, loss_fn, data, TrainConfig(epochs=2, batch_size=8, device="cpu", progress=False,
                                                checkpoint_dir=tmp_path, resume=True), fingerprint={"data": "b"})
    from safetensors.torch import save_file
    save_file(load_file(str(tmp_path / "model.safetensors")), str(tmp_path / "model.safetensors"),
              metadata={"step": "5"})   # weights of a later step beside the step-3 optimizer state
    with pytest.raises(ValueError, match="weights are from step 5, the optimizer state from step 3"):
        train(model, loss_fn, data, TrainConfig(epochs=2, batch_size=8, device="cpu", progress=False,
                                                checkpoint_dir=tmp_path, resume=True), fingerprint={"data": "a"})


def test_checkpoint_loads_with_weights_only_and_records_every_step(tmp_path):
    model, loss_fn, data = make_problem()
    history = train(model, loss_fn, data, TrainConfig(epochs=2, batch_size=16, device="cpu", progress=False,
                                                      checkpoint_dir=tmp_path, checkpoint_every=3))
    state = load_checkpoint_state(tmp_path)          # torch.load(weights_only=True) inside
    assert state["step"] == history.steps == 8
    assert set(history.step) == {"loss", "mae"} and len(history.step["loss"]) == 8
    assert history.epoch["loss"][1] < history.epoch["loss"][0]
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    assert history.lr[0] == pytest.approx(1e-3) and history.lr[-1] < history.lr[0]   # cosine decay


def test_epoch_batches_are_seeded_disjoint_shards():
    config = TrainConfig(batch_size=4, seed=3)
    one = torch.cat(epoch_batches(10, 0, config))
    assert sorted(one.tolist()) == list(range(10))
    assert torch.equal(one, torch.cat(epoch_batches(10, 0, config)))        # same seed, same order
    assert not torch.equal(one, torch.cat(epoch_batches(10, 1, config)))    # a new order each epoch
    shards = [torch.cat(epoch_batches(10, 0, config, rank=r, world=3)) for r in range(3)]
    assert {len(s) for s in shards} == {4}                                   # padded to equal sizes
    assert set(torch.cat(shards).tolist()) == set(range(10))
    assert len(epoch_batches(9, 0, TrainConfig(batch_size=4, min_batch=2))) == 2   # trailing single dropped


def test_refuses_bad_setups(tmp_path):
    model, loss_fn, data = make_problem()
    with pytest.raises(ValueError, match="resume=True needs a checkpoint_dir"):
        TrainConfig(resume=True)
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="sgd")
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(model.requires_grad_(False), loss_fn, data, TrainConfig(epochs=1, progress=False, device="cpu"))
    model, _, data = make_problem()
    with pytest.raises(FloatingPointError, match="loss became nan"):
        train(model, lambda net, b: {"loss": net(b[0]).sum() * float("nan")}, data,
              TrainConfig(epochs=1, progress=False, device="cpu"))
    with pytest.raises(ValueError, match="same first axis"):
        train(model, loss_fn, (data[0], data[1][:10]), TrainConfig(epochs=1, progress=False, device="cpu"))


def _torchrun(script: Path, *args: str) -> None:
    """Runs ``script`` under ``torchrun --nproc-per-node 2`` on the CPU (gloo)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script), *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def _ddp_resume_worker(out: Path) -> None:
    """Run by :func:`test_a_two_process_run_records_its_world_size_and_resumes_bit_for_bit` in each
    process: an unbroken run and one stopped mid-epoch then resumed; writes ``out/rank{R}.json``.
    The three runs share one process group made here (``train`` uses an existing group and leaves it):
    gloo does not reliably re-form a group destroyed moments before in the same processes."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        _three_runs(out)
    finally:
        dist.destroy_process_group()


def _three_runs(out: Path) -> None:
    config = dict(epochs=2, batch_size=4, lr=1e-2, device="cpu", progress=False)
    model, loss_fn, data = make_problem(dropout=0.2)   # per-rank dropout: every rank's RNG is restored
    full = train(model, loss_fn, data, TrainConfig(**config))
    reference = _weights(model)
    model, loss_fn, data = make_problem(dropout=0.2)
    cut = train(model, loss_fn, data, TrainConfig(**config, checkpoint_dir=out / "ckpt", stop_after_steps=5))
    model, loss_fn, data = make_problem(dropout=0.2)
    resumed = train(model, loss_fn, data, TrainConfig(**config, checkpoint_dir=out / "ckpt", resume=True))
    record = {"world_size": [full.world_size, cut.world_size, resumed.world_size], "steps": [full.steps, cut.steps],
              "same_losses": resumed.step == full.step and resumed.epoch == full.epoch,
              "same_weights": all(torch.equal(v, model.state_dict()[k]) for k, v in reference.items())}
    (out / f"rank{os.environ['RANK']}.json").write_text(json.dumps(record))


@pytest.mark.slow
def test_a_two_process_run_records_its_world_size_and_resumes_bit_for_bit(tmp_path):
    _torchrun(Path(__file__), str(tmp_path))
    for rank in range(2):
        record = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert record == {"world_size": [2, 2, 2], "steps": [16, 5], "same_losses": True, "same_weights": True}


@pytest.mark.slow
def test_two_process_torchrun_gives_identical_weights_equal_to_one_process_with_twice_the_batch(tmp_path):
    _torchrun(Path(__file__).with_name("ddp_worker.py"), str(tmp_path))
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]
    for k in ranks[0]:
        assert torch.equal(ranks[0][k], ranks[1][k]), k      # the gradients were all-reduced every step
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()     # rank 0 wrote the checkpoint

    model, loss_fn, data = make_problem()     # one process, batch 8 = 2 ranks x 4, the same order
    history = train(model, loss_fn, data, TrainConfig(epochs=3, batch_size=8, lr=1e-2, device="cpu", progress=False))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(ranks[0][k], v, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ranks[0]["losses"], torch.tensor(history.step["loss"], dtype=torch.float64),
                               rtol=1e-4, atol=1e-6)


if __name__ == "__main__":     # under torchrun, for the two-process resume test
    _ddp_resume_worker(Path(sys.argv[1]))
