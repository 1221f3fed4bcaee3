"""Run by the tests under ``torchrun --nproc-per-node 2``: trains on the shared loop (gloo on the CPU)
and writes this rank's final weights to ``OUT/rank{R}.safetensors`` (the test, not the loop, writes
per-rank files, to compare them). ``worker.py OUT`` trains test_train's small model;
``worker.py OUT semi_formula`` pre-trains EfficientNet-Lite0 on a small semi-formula stream."""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train import make_problem  # noqa: E402

from adlib.train import TrainConfig, train  # noqa: E402

def semi_formula(out: Path, rank: int) -> None:
    """Records the sample numbers of the batches the loss really saw on this rank."""
    from adlib.pretrain import SemiFormulaRecipe, pretrain_semi_formula, semi_formula as module

    seen_batches = []
    real_losses = module.semi_formula_losses

    def recording(features, batch, recipe):
        seen_batches.append(batch["index"].cpu())
        return real_losses(features, batch, recipe)

    module.semi_formula_losses = recording
    normals = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    recipe = SemiFormulaRecipe(images=32, batch_size=4, lr=1e-3)
    run = pretrain_semi_formula(normals, recipe, device="cpu", progress=False)
    seen = torch.cat(seen_batches)
    weights = {k: v.contiguous() for k, v in run.net.state_dict().items()}
    weights["losses"] = torch.tensor(run.history.step["loss"], dtype=torch.float64)
    save_file(weights, str(out / f"rank{rank}.safetensors"))
    save_file({"indices": seen}, str(out / f"indices{rank}.safetensors"))


if __name__ == "__main__":
    out = Path(sys.argv[1])
    if sys.argv[2:] == ["semi_formula"]:
        semi_formula(out, int(__import__("os").environ["RANK"]))
        sys.exit(0)
    model, loss_fn, data = make_problem()
    config = TrainConfig(epochs=3, batch_size=4, lr=1e-2, device="cpu", progress=False,
                         checkpoint_dir=out / "ckpt")
    history = train(model, loss_fn, data, config)
    rank = int(__import__("os").environ["RANK"])
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    weights["losses"] = torch.tensor(history.step["loss"], dtype=torch.float64)
    save_file(weights, str(out / f"rank{rank}.safetensors"))
