"""What every recipe writes into its backbone file's metadata: the recipe and the run's record."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..train import History


def run_record(method: str, recipe: Any, history: History, train_images: int, seconds: float, world_size: int,
               **extra: Any) -> dict[str, Any]:
    """``{"method", recipe fields..., "steps", "train_images", "seconds", "world_size", extra...}``:
    JSON-ready, stored in the backbone file (:func:`adlib.backbones.save_backbone`)."""
    return {"method": method, **dataclasses.asdict(recipe), "steps": history.steps, "train_images": train_images,
            "seconds": round(seconds, 1), "world_size": world_size, **extra}


def run_summary(run: Any) -> dict[str, Any]:
    """What every recipe's run reports on the command line: ``{"steps", "seconds", "world_size",
    the last epoch's mean of each loss...}`` (``run`` has ``history``, ``seconds``, ``world_size``)."""
    return {"steps": run.history.steps, "seconds": round(run.seconds, 1), "world_size": run.world_size,
            **{k: round(v[-1], 5) for k, v in run.history.epoch.items()}}
