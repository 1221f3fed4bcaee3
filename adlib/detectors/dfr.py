"""DFR (Shi, Yang and Qi, 2021): reconstruct deep regional features instead of pixels.

fit: several stages of a frozen pretrained CNN (default strides 4, 8 and 16) are brought to one
grid (``grid_stride``, default 8) by regional average pooling (finer stages) or bilinear
upsampling (coarser ones) and concatenated to ``(B, C, h, w)``; each channel is standardized with
the training mean and std; a feature autoencoder of 1x1 convolutions (C -> hidden -> latent ->
hidden -> C, the latent size from PCA at ``explained_variance``, as DFR does) learns to rebuild
them from normal images. predict: anomaly map = channel-mean squared feature error ``(B, h, w)``,
upsampled to the image and Gaussian-smoothed; image score = maximum of the map. ``threshold``
is the ``1 - expected_fpr`` quantile of the training images' scores, DFR's rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from ..backbones import DEFAULT_BACKBONE
from ..train import History, TrainConfig, train as train_loop
from .base import FeatureDetector, register, upsample_and_smooth


def regional_features(features: dict[int, Tensor], grid: tuple[int, int]) -> Tensor:
    """``{stride: (B, C_s, h_s, w_s)}`` -> ``(B, sum C_s, *grid)``, stages in stride order.

    A stage finer than ``grid`` is average-pooled over the region each grid cell covers (DFR's
    regional aggregation: a cell describes its neighbourhood, not one point); a coarser stage is
    upsampled bilinearly.
    """
    maps = []
    for stride in sorted(features):
        x = features[stride]
        if x.shape[-2] > grid[0] or x.shape[-1] > grid[1]:
            x = F.adaptive_avg_pool2d(x, grid)
        elif tuple(x.shape[-2:]) != tuple(grid):
            x = F.interpolate(x, size=grid, mode="bilinear", align_corners=False)
        maps.append(x)
    return torch.cat(maps, 1)


def cumulative_explained_variance(features: Tensor) -> Tensor:
    """``features (N, C)`` -> ``(C,)``: the fraction of variance the first k principal components explain."""
    eig = torch.linalg.eigvalsh(torch.cov(features.double().T)).flip(0).clamp_min(0)
    return eig.cumsum(0) / eig.sum()


def pca_latent_dim(features: Tensor, explained_variance: float) -> int:
    """Smallest number of principal components of ``features (N, C)`` explaining the given fraction."""
    if not 0.0 < explained_variance <= 1.0:
        raise ValueError(f"explained_variance must be in (0, 1], got {explained_variance}")
    ratio = cumulative_explained_variance(features)
    return int(torch.searchsorted(ratio, torch.tensor(explained_variance, dtype=ratio.dtype, device=ratio.device)).item()) + 1


class FeatureAutoencoder(nn.Module):
    """1x1-convolution autoencoder over feature vectors: ``(B, C, h, w)`` -> ``(B, C, h, w)``.

    A 1x1 convolution is one linear map applied at every position, so the network is written with
    ``Linear`` layers over the channel axis; it sees one position at a time.
    """

    def __init__(self, channels: int, latent_dim: int):
        super().__init__()
        hidden = (channels + latent_dim) // 2
        self.encoder = nn.Sequential(nn.Linear(channels, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                                     nn.Linear(hidden, latent_dim))
        self.decoder = nn.Sequential(nn.Linear(latent_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                                     nn.Linear(hidden, channels))

    def forward_vectors(self, x: Tensor) -> Tensor:
        """``(N, C)`` -> ``(N, C)``."""
        return self.decoder(self.encoder(x))

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, h, w)`` -> ``(B, C, h, w)``, or vectors ``(N, C)`` -> ``(N, C)``."""
        if x.ndim == 2:
            return self.forward_vectors(x)
        b, c, h, w = x.shape
        vectors = x.permute(0, 2, 3, 1).reshape(-1, c)
        return self.forward_vectors(vectors).view(b, h, w, c).permute(0, 3, 1, 2)


def _vector_mse(net: nn.Module, vectors: Tensor) -> dict[str, Tensor]:
    """The training loss: mean squared reconstruction error of feature vectors ``(N, C)``."""
    return {"loss": F.mse_loss(net(vectors), vectors)}


@register("dfr")
@dataclass(eq=False)
class DFR(FeatureDetector):
    """Deep feature reconstruction; ``latent_dim=None`` takes it from PCA at ``explained_variance``."""

    calibrates_itself: ClassVar[bool] = True   # threshold: the (1 - expected_fpr) quantile of training scores

    backbone: str = DEFAULT_BACKBONE
    strides: tuple[int, ...] = (4, 8, 16)
    grid_stride: int = 8
    latent_dim: int | None = None
    explained_variance: float = 0.9
    epochs: int = 15
    batch_size: int = 1024
    lr: float = 1e-3
    expected_fpr: float = 0.005
    sigma: float = 4.0
    seed: int = 0
    device: str | None = None
    net: FeatureAutoencoder | None = field(default=None, init=False, repr=False)
    feature_mean: Tensor | None = field(default=None, init=False, repr=False)  # (C,)
    feature_std: Tensor | None = field(default=None, init=False, repr=False)   # (C,)
    threshold: float | None = field(default=None, init=False)
    history: list[float] = field(default_factory=list, init=False, repr=False)        # loss per epoch
    train_history: History | None = field(default=None, init=False, repr=False)   # per step too

    def _embed(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W)`` -> standardized regional features ``(B, C, H / grid_stride, W / grid_stride)``."""
        feats = self.extractor(images)
        grid = (-(-images.shape[-2] // self.grid_stride), -(-images.shape[-1] // self.grid_stride))
        emb = regional_features(feats, grid)
        if self.feature_mean is not None:
            emb = (emb - self.feature_mean.view(1, -1, 1, 1)) / self.feature_std.view(1, -1, 1, 1)
        return emb

    def _build(self, channels: int, latent_dim: int) -> None:
        with torch.random.fork_rng(devices=[]):  # same seed, same initial weights; global RNG untouched
            torch.manual_seed(self.seed)
            self.net = FeatureAutoencoder(channels, latent_dim).to(self.device_)

    def _fit(self, train: Iterable[Tensor]) -> None:
        """Extract features of all ``(B, 3, H, W)`` training batches once, then train for ``epochs``."""
        self.feature_mean = self.feature_std = None
        maps, image_size = [], None
        for batch in tqdm(train, desc="dfr features", leave=False):
            maps.append(self._embed(batch))
            image_size = tuple(batch.shape[-2:])
        if not maps:
            raise ValueError("no training images")
        maps = torch.cat(maps)
        if len(maps) < 2:
            raise ValueError(f"need at least 2 training images, got {len(maps)}")
        self.feature_mean, self.feature_std = maps.mean((0, 2, 3)), maps.std((0, 2, 3)).clamp_min(1e-6)
        maps = (maps - self.feature_mean.view(1, -1, 1, 1)) / self.feature_std.view(1, -1, 1, 1)
        vectors = maps.permute(0, 2, 3, 1).reshape(-1, maps.shape[1])
        latent = self.latent_dim or pca_latent_dim(vectors[:: max(1, len(vectors) // 50_000)], self.explained_variance)
        self._build(vectors.shape[1], latent)
        self._train(vectors)
        scores = torch.cat([self._image_scores_and_maps(m, image_size)[0] for m in maps.split(32)])
        self.threshold = float(torch.quantile(scores.double(), 1.0 - self.expected_fpr))

    def _train(self, vectors: Tensor) -> None:
        """Minimize the MSE of ``(N, C)`` feature vectors on the shared loop (seeded shuffles)."""
        config = TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, schedule="cosine",
                             seed=self.seed, device=self.device_, min_batch=2, desc="dfr fit")  # batch norm: 2
        self.train_history = train_loop(self.net, _vector_mse, vectors, config)
        self.history = self.train_history.epoch.get("loss", [])

    @torch.no_grad()
    def _score_maps(self, emb: Tensor) -> Tensor:
        """Standardized features ``(B, C, h, w)`` -> squared error maps ``(B, h, w)``."""
        return (self.net(emb) - emb).pow(2).mean(1)

    def _image_scores_and_maps(self, emb: Tensor, image_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        maps = upsample_and_smooth(self._score_maps(emb), image_size, self.sigma)
        return maps.flatten(1).amax(1), maps

    def _predict(self, images: Tensor) -> tuple[Tensor, Tensor]:
        if self.net is None:
            raise RuntimeError("DFR is not fitted: call fit() first")
        return self._image_scores_and_maps(self._embed(images), tuple(images.shape[-2:]))

    def scoring_module(self) -> nn.Module:
        if self.net is None:
            raise RuntimeError("DFR is not fitted: call fit() first")
        return _DFRScoring(self)

    def state_dict(self) -> dict[str, Tensor]:
        if self.net is None:
            return {}
        state = {f"net.{k}": v for k, v in self.net.state_dict().items()}
        state.update(feature_mean=self.feature_mean, feature_std=self.feature_std,
                     threshold=torch.tensor(self.threshold, dtype=torch.float64))
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        latent, _ = state["net.encoder.3.weight"].shape  # Linear weights are (out, in)
        channels = state["feature_mean"].numel()
        self._build(channels, latent)
        self.net.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("net.")})
        self.net.eval()
        self.feature_mean = state["feature_mean"].to(self.device_)
        self.feature_std = state["feature_std"].to(self.device_)
        self.threshold = float(state["threshold"])


class _DFRScoring(nn.Module):
    """DFR's predict as a plain module for the fitted image size: regional features (the regions'
    average pools with sizes fixed here, as an ONNX graph needs), standardized, through the autoencoder."""

    def __init__(self, dfr: DFR):
        super().__init__()
        self.extractor, self.net, self.sigma = dfr.extractor, dfr.net.eval(), dfr.sigma
        self.size = tuple(dfr.input_size)
        self.grid = (-(-self.size[0] // dfr.grid_stride), -(-self.size[1] // dfr.grid_stride))
        with torch.no_grad():
            probe = self.extractor(torch.zeros(1, 3, *self.size, device=self.extractor.device))
        self.pools = {s: _region_pool(tuple(f.shape[-2:]), self.grid) for s, f in probe.items()}
        self.register_buffer("feature_mean", dfr.feature_mean.view(1, -1, 1, 1))
        self.register_buffer("feature_std", dfr.feature_std.view(1, -1, 1, 1))

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        stages = []
        for stride, x in sorted(self.extractor(images).items()):
            pool = self.pools[stride]
            if pool is None:
                x = F.interpolate(x, size=self.grid, mode="bilinear", align_corners=False) if (
                    tuple(x.shape[-2:]) != self.grid) else x
            else:
                x = F.avg_pool2d(x, pool) if pool != (1, 1) else x
            stages.append(x)
        emb = (torch.cat(stages, 1) - self.feature_mean) / self.feature_std
        maps = upsample_and_smooth((self.net(emb) - emb).pow(2).mean(1), self.size, self.sigma)
        return maps.flatten(1).amax(1), maps


def _region_pool(stage: tuple[int, int], grid: tuple[int, int]) -> tuple[int, int] | None:
    """The average pool that equals :func:`regional_features`'s adaptive pool from a ``stage`` grid to
    ``grid``: ``(kh, kw)``; None for a stage no finer than ``grid`` (upsampled instead)."""
    if stage[0] <= grid[0] and stage[1] <= grid[1]:
        return None if stage != grid else (1, 1)
    if stage[0] % grid[0] or stage[1] % grid[1]:
        raise ValueError(f"a stage of {stage} cannot be exported onto a {grid} grid (not a whole number of cells); "
                         f"export at an image size divisible by 32")
    return stage[0] // grid[0], stage[1] // grid[1]
