"""The naive convolutional autoencoder: reconstruct normal images, score by the pixel error.

fit: a strided-convolution encoder squeezes a ``(3, H, W)`` image into one latent vector, a
transposed-convolution decoder rebuilds it; trained with MSE on normal images only. A seeded
``holdout`` fraction of the training images is never trained on: their scores set the decision
threshold ``mu + 3 sigma`` (which assumes those scores are normally distributed).
predict: anomaly map = per-pixel squared error averaged over the colour channels ``(B, H, W)``
(in ``[0, 1]`` pixel units); image score = mean of the map.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import Tensor, nn

from ..data import denormalize
from ..settings import default_device
from ..train import History, TrainConfig, train as train_loop
from .base import Detector, check_images, register


def _down(c_in: int, c_out: int) -> nn.Sequential:
    """4x4 convolution, stride 2: halves the resolution."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 4, 2, 1), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2))


def _up(c_in: int, c_out: int) -> nn.Sequential:
    """4x4 transposed convolution, stride 2: doubles the resolution."""
    return nn.Sequential(nn.ConvTranspose2d(c_in, c_out, 4, 2, 1), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2))


class ConvAutoencoder(nn.Module):
    """``(B, 3, S, S)`` in ``[0, 1]`` -> latent ``(B, latent_dim, 1, 1)`` -> ``(B, 3, S, S)`` in ``[0, 1]``.

    Five stride-2 convolutions take ``S`` to ``S / 32``; one convolution as large as what is left
    makes the latent vector (a dense bottleneck, as in Bergmann et al.'s MVTec baseline). The
    decoder mirrors it with transposed convolutions and ends in a sigmoid.
    """

    def __init__(self, image_size: int, widths: tuple[int, ...] = (16, 32, 64, 64, 128), latent_dim: int = 128):
        super().__init__()
        depth = len(widths)
        if image_size % 2**depth:
            raise ValueError(f"image_size must be divisible by {2 ** depth} for {depth} stride-2 layers, "
                             f"got {image_size}")
        bottom = image_size // 2**depth
        channels = (3, *widths)
        self.encoder = nn.Sequential(*[_down(channels[i], channels[i + 1]) for i in range(depth)],
                                     nn.Conv2d(widths[-1], latent_dim, bottom))
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(latent_dim, widths[-1], bottom), nn.BatchNorm2d(widths[-1]), nn.LeakyReLU(0.2),
            *[_up(channels[i + 1], channels[i]) for i in range(depth - 1, 0, -1)],
            nn.ConvTranspose2d(widths[0], 3, 4, 2, 1), nn.Sigmoid())

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder(x))


def reconstruction_error(pixels: Tensor, reconstruction: Tensor) -> Tensor:
    """Per-pixel squared error averaged over channels: ``(B, 3, H, W)`` x2 -> ``(B, H, W)``."""
    return (pixels - reconstruction).pow(2).mean(1)


def _mse_loss(net: nn.Module, pixels: Tensor) -> dict[str, Tensor]:
    """The training loss: mean squared error of the reconstruction of ``(B, 3, S, S)`` pixels."""
    return {"loss": reconstruction_error(pixels, net(pixels)).mean()}


@register("autoencoder")
@dataclass(eq=False)
class Autoencoder(Detector):
    """The naive convolutional autoencoder baseline (MSE, mean-error score, mu + 3 sigma threshold)."""

    @property
    def calibrates_itself(self) -> bool:
        """With a hold-out (``holdout > 0``) fit sets the threshold from the held-out images itself."""
        return self.holdout > 0

    latent_dim: int = 128
    widths: tuple[int, ...] = (16, 32, 64, 64, 128)
    epochs: int = 100
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-5
    holdout: float = 0.15
    seed: int = 0
    device: str | None = None
    net: ConvAutoencoder | None = field(default=None, init=False, repr=False)
    threshold: float | None = field(default=None, init=False)            # mu + 3 sigma of held-out scores
    holdout_scores: Tensor | None = field(default=None, init=False, repr=False)  # (n_holdout,)
    history: dict[str, list[float]] = field(default_factory=dict, init=False, repr=False)  # per epoch
    train_history: History | None = field(default=None, init=False, repr=False)         # per step too

    def __post_init__(self) -> None:
        self.widths = tuple(self.widths)
        self.device_ = default_device(self.device)
        if not 0.0 <= self.holdout < 1.0:
            raise ValueError(f"holdout must be in [0, 1), got {self.holdout}")

    def _build(self, image_size: int) -> None:
        with torch.random.fork_rng(devices=[]):  # same seed, same initial weights; global RNG untouched
            torch.manual_seed(self.seed)
            self.net = ConvAutoencoder(image_size, self.widths, self.latent_dim).to(self.device_)

    @staticmethod
    def _collect(train: Iterable[Tensor]) -> Tensor:
        """All training batches -> one ``(N, 3, S, S)`` tensor of ``[0, 1]`` pixels (many epochs reuse it)."""
        chunks = []
        for batch in train:
            if batch.shape[-1] != batch.shape[-2]:
                raise ValueError(f"the autoencoder needs square images, got {tuple(batch.shape[-2:])}")
            chunks.append(denormalize(batch.float().cpu()))
        if not chunks:
            raise ValueError("no training images")
        return torch.cat(chunks)

    def _split(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        order = torch.randperm(n, generator=generator)
        n_holdout = max(2, int(round(self.holdout * n))) if self.holdout > 0 else 0  # a std needs 2 scores
        if n - n_holdout < 1:
            raise ValueError(f"no images left to train on ({n} images, holdout={self.holdout})")
        return order[n_holdout:], order[:n_holdout]

    def _fit(self, train: Iterable[Tensor]) -> None:
        """Train on ``(B, 3, S, S)`` batches of normal images; set ``threshold`` from the held-out ones."""
        pixels = self._collect(train)
        generator = torch.Generator().manual_seed(self.seed)
        train_idx, holdout_idx = self._split(len(pixels), generator)
        self._build(pixels.shape[-1])
        held = pixels[holdout_idx]

        def holdout_loss(epoch: int) -> dict[str, float]:
            return {"holdout_loss": float(self._scores(held).mean())} if len(held) else {}

        # cosine decay: the last steps are small, so the final weights are not a noisy snapshot
        config = TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                             weight_decay=self.weight_decay, schedule="cosine", seed=self.seed,
                             device=self.device_, min_batch=2 if len(train_idx) >= 2 else 1,  # batch norm
                             desc="autoencoder fit")
        self.train_history = train_loop(self.net, _mse_loss, pixels[train_idx], config, on_epoch_end=holdout_loss)
        self.history = {"train_loss": self.train_history.epoch.get("loss", []),
                        "holdout_loss": self.train_history.epoch.get("holdout_loss", [])}
        if len(held):
            self.holdout_scores = self._scores(held)
            self.threshold = float(self.holdout_scores.mean() + 3 * self.holdout_scores.std())

    @torch.no_grad()
    def _scores(self, pixels: Tensor, batch_size: int = 32) -> Tensor:
        self.net.eval()
        out = [reconstruction_error(x, self.net(x)).mean((1, 2)).cpu()
               for x in pixels.to(self.device_).split(batch_size)]
        return torch.cat(out)

    @torch.no_grad()
    def reconstruct(self, images: Tensor) -> Tensor:
        """ImageNet-normalized ``(B, 3, S, S)`` -> reconstructions ``(B, 3, S, S)`` in ``[0, 1]`` pixels."""
        check_images(images)
        if self.net is None:
            raise RuntimeError("Autoencoder is not fitted: call fit() first")
        size = self.net.encoder[-1].kernel_size[0] * 2 ** len(self.widths)
        if tuple(images.shape[-2:]) != (size, size):
            raise ValueError(f"images are {tuple(images.shape[-2:])}, the autoencoder was fitted on "
                             f"({size}, {size})")
        return self._reconstruct(images)

    def _reconstruct(self, images: Tensor) -> Tensor:
        self.net.eval()
        return self.net(denormalize(images.float()).to(self.device_))

    def _predict(self, images: Tensor) -> tuple[Tensor, Tensor]:
        if self.net is None:
            raise RuntimeError("Autoencoder is not fitted: call fit() first")
        maps = reconstruction_error(denormalize(images.float()).to(self.device_), self._reconstruct(images))
        return maps.mean((1, 2)), maps

    def scoring_module(self) -> nn.Module:
        if self.net is None:
            raise RuntimeError("Autoencoder is not fitted: call fit() first")
        return _AutoencoderScoring(self.net.eval())

    def state_dict(self) -> dict[str, Tensor]:
        if self.net is None:
            return {}
        state = {f"net.{k}": v for k, v in self.net.state_dict().items()}
        size = self.net.encoder[-1].kernel_size[0] * 2 ** len(self.widths)
        state["image_size"] = torch.tensor(size)
        if self.threshold is not None:
            state["threshold"] = torch.tensor(self.threshold, dtype=torch.float64)
            state["holdout_scores"] = self.holdout_scores
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self._build(int(state["image_size"]))
        self.net.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("net.")})
        self.net.eval()
        if "threshold" in state:
            self.threshold = float(state["threshold"])
            self.holdout_scores = state["holdout_scores"]


class _AutoencoderScoring(nn.Module):
    """The autoencoder's predict as a plain module: reconstruct the pixels, the error map, its mean."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        pixels = denormalize(images)
        maps = reconstruction_error(pixels, self.net(pixels))
        return maps.mean((1, 2)), maps

