"""PaDiM (Defard et al., 2021): a Gaussian per patch position, the Mahalanobis distance as score.

fit: stride-4, 8 and 16 features, resized to the stride-4 grid and concatenated, a seeded random
subset of ``n_features`` channels; per position the mean and covariance (+ eps I, eps 0.01) from a
streaming accumulator, never holding all training features. predict: the Mahalanobis distance of
each position's feature to its Gaussian, upsampled and smoothed; the image score is the maximum.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import Tensor, nn
from tqdm import tqdm

from ..backbones import DEFAULT_BACKBONE, concat_stages
from ..kernels import GaussianAccumulator, mahalanobis
from .base import FeatureDetector, register, upsample_and_smooth


@register("padim")
@dataclass(eq=False)
class PaDiM(FeatureDetector):
    """PaDiM with the paper's defaults (``n_features`` = d, the random channel subset)."""

    backbone: str = DEFAULT_BACKBONE
    strides: tuple[int, ...] = (4, 8, 16)
    n_features: int = 100
    eps: float = 0.01
    sigma: float = 4.0
    seed: int = 0
    device: str | None = None
    channels: Tensor | None = field(default=None, init=False, repr=False)   # (d,) chosen channel indices
    mean: Tensor | None = field(default=None, init=False, repr=False)       # (P, d)
    chol: Tensor | None = field(default=None, init=False, repr=False)       # (P, d, d)
    grid: tuple[int, int] | None = field(default=None, init=False, repr=False)

    def choose_channels(self) -> Tensor:
        """The seeded random subset of ``n_features`` channel indices ``(d,)``, sorted (PaDiM's d)."""
        total = sum(self.extractor.channels.values())
        if not 1 <= self.n_features <= total:
            raise ValueError(f"n_features must be in [1, {total}] for {self.backbone} strides {self.strides}")
        generator = torch.Generator().manual_seed(self.seed)
        return torch.randperm(total, generator=generator)[: self.n_features].sort().values

    def _embed(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W)`` -> ``(B, d, h, w)`` on the finest stride's grid, the chosen channels only."""
        feats = self.extractor(images)
        grid = tuple(feats[min(self.strides)].shape[-2:])
        emb = concat_stages(feats, grid, mode="nearest")
        return emb.index_select(1, self.channels.to(emb.device))

    def _fit(self, train: Iterable[Tensor]) -> None:
        self.channels = self.choose_channels()
        acc = GaussianAccumulator(dtype=torch.float32)  # sums around a shift: float32 is accurate
        self.grid = None
        for batch in tqdm(train, desc="padim fit", leave=False):
            emb = self._embed(batch)
            self.grid = self.grid or tuple(emb.shape[-2:])   # one size for all: fit checks the batches
            acc.update(emb)
        gaussians = acc.finalize(self.eps)
        self.mean, self.chol = gaussians.mean, gaussians.chol

    def _predict(self, images: Tensor) -> tuple[Tensor, Tensor]:
        if self.mean is None:
            raise RuntimeError("PaDiM is not fitted: call fit() first")
        emb = self._embed(images)
        b, _, h, w = emb.shape
        dist = mahalanobis(emb, self.mean, self.chol).view(b, h, w)
        maps = upsample_and_smooth(dist, tuple(images.shape[-2:]), self.sigma)
        return maps.flatten(1).amax(1), maps

    def state_dict(self) -> dict[str, Tensor]:
        if self.mean is None:
            return {}
        return {"channels": self.channels, "mean": self.mean, "chol": self.chol, "grid": torch.tensor(self.grid)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.channels = state["channels"]
        self.mean, self.chol = state["mean"].to(self.device_), state["chol"].to(self.device_)
        self.grid = tuple(int(v) for v in state["grid"])

    def scoring_module(self) -> nn.Module:
        if self.mean is None:
            raise RuntimeError("PaDiM is not fitted: call fit() first")
        return _PaDiMScoring(self)


class _PaDiMScoring(nn.Module):
    """PaDiM's predict as a plain module: the Mahalanobis distance as ``|W_p (x_p - mu_p)|`` with the
    whitening ``W_p = L_p^{-1}`` inverted once in float64 (a graph has no triangular solve)."""

    def __init__(self, padim: PaDiM):
        super().__init__()
        self.extractor, self.strides, self.sigma = padim.extractor, padim.strides, padim.sigma
        self.register_buffer("channels", padim.channels.to(padim.mean.device))
        self.register_buffer("mean", padim.mean.float())
        eye = torch.eye(padim.chol.shape[-1], dtype=torch.float64, device=padim.chol.device)
        whitening = torch.linalg.solve_triangular(padim.chol.double(), eye.expand_as(padim.chol), upper=False)
        self.register_buffer("whitening", whitening.float())                     # (P, d, d)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        feats = self.extractor(images)
        grid = tuple(feats[min(self.strides)].shape[-2:])
        emb = concat_stages(feats, grid, mode="nearest").index_select(1, self.channels)   # (B, d, h, w)
        b, d, h, w = emb.shape
        diff = emb.flatten(2).permute(2, 0, 1) - self.mean[:, None, :]          # (P, B, d)
        z = torch.matmul(diff, self.whitening.transpose(1, 2))                  # (P, B, d)
        dist = z.pow(2).sum(-1).sqrt().t().reshape(b, h, w)
        maps = upsample_and_smooth(dist, tuple(images.shape[-2:]), self.sigma)
        return maps.flatten(1).amax(1), maps

