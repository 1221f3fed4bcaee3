"""Run by tests/test_train.py under ``torchrun --nproc-per-node 2``: trains a small model on the
shared loop (gloo on the CPU) and writes this rank's final weights to ``OUT/rank{R}.safetensors``
(the test, not the loop, writes per-rank files, to compare them)."""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train import make_problem  # noqa: E402

from adlib.train import TrainConfig, train  # noqa: E402

if __name__ == "__main__":
    out = Path(sys.argv[1])
    model, loss_fn, data = make_problem()
    config = TrainConfig(epochs=3, batch_size=4, lr=1e-2, device="cpu", progress=False,
                         checkpoint_dir=out / "ckpt")
    history = train(model, loss_fn, data, config)
    rank = int(__import__("os").environ["RANK"])
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    weights["losses"] = torch.tensor(history.step["loss"], dtype=torch.float64)
    save_file(weights, str(out / f"rank{rank}.safetensors"))
