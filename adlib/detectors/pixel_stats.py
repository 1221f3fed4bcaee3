"""The simplest detector there is: a Gaussian per pixel of the raw image.

It proves the API, the evaluation and the figures end to end in the first chapter, and it is the
floor every real method must beat. It works only where objects are perfectly aligned and lit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import Tensor
from tqdm import tqdm

from ..settings import default_device
from .base import Detector, gaussian_blur, register


@register("pixel_stats")
@dataclass(eq=False)
class PixelStats(Detector):
    """Per-pixel mean and standard deviation of the normal images.

    Map: squared z-score averaged over the colour channels, Gaussian-smoothed; score: map maximum.
    """

    sigma: float = 4.0
    min_std: float = 0.05
    device: str | None = None
    mean: Tensor | None = field(default=None, init=False, repr=False)  # (3, H, W)
    std: Tensor | None = field(default=None, init=False, repr=False)   # (3, H, W)

    def __post_init__(self) -> None:
        self.device_ = default_device(self.device)

    def _fit(self, train: Iterable[Tensor]) -> None:
        """Streaming float64 sums over ``(B, 3, H, W)`` batches -> mean, std ``(3, H, W)``."""
        total = total_sq = None
        count = 0
        for batch in tqdm(train, desc="pixel_stats fit", leave=False):
            x = batch.to(self.device_, torch.float64)
            if total is None:
                total, total_sq = x.sum(0), (x * x).sum(0)
            else:
                if x.shape[1:] != total.shape:
                    raise ValueError(f"all training images must share one size; got {tuple(x.shape[1:])} "
                                     f"after {tuple(total.shape)}")
                total += x.sum(0)
                total_sq += (x * x).sum(0)
            count += x.shape[0]
        if count < 2:
            raise ValueError(f"need at least 2 training images, got {count}")
        mean = total / count
        var = (total_sq - count * mean * mean) / (count - 1)
        self.mean = mean.float()
        self.std = var.clamp_min(0).sqrt().clamp_min(self.min_std).float()

    def _predict(self, images: Tensor) -> tuple[Tensor, Tensor]:
        if self.mean is None:
            raise RuntimeError("PixelStats is not fitted: call fit() first")
        if images.shape[1:] != self.mean.shape:
            raise ValueError(f"images are {tuple(images.shape[1:])}, the detector was fitted on "
                             f"{tuple(self.mean.shape)}")
        z = (images.to(self.device_, torch.float32) - self.mean) / self.std
        maps = gaussian_blur((z * z).mean(1), self.sigma)
        return maps.flatten(1).amax(1), maps

    def state_dict(self) -> dict[str, Tensor]:
        return {} if self.mean is None else {"mean": self.mean, "std": self.std}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.mean = state["mean"].to(self.device_)
        self.std = state["std"].to(self.device_)
