"""PatchCore (Roth et al., CVPR 2022): a memory bank of locally aggregated patch features.

fit: every training image -> patch features ``(h*w, D)`` (stride-8 and stride-16 stages, 3x3 local
average, resized to the stride-8 grid, concatenated) -> memory bank ``(N*h*w, D)`` -> greedy
coreset (default 10%), streamed batch by batch into :class:`~adlib.kernels.CoresetStream`: the
exact greedy while the bank is small (``coreset="auto"``, up to
:data:`~adlib.kernels.chunked_coreset.AUTO_EXACT_POINTS` patches), the chunked greedy beyond (fit
time linear in the number of images), the bank's memory within ``memory_mb`` either way.
predict: each test patch's distance to its nearest bank patch is its anomaly score; the image
score is the maximum (optionally re-weighted as in the paper); the patch map is upsampled to the
image and Gaussian-smoothed (sigma 4).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import Tensor, nn
from tqdm import tqdm

from ..backbones import DEFAULT_BACKBONE, concat_stages
from ..kernels import CoresetStream, knn
from ..kernels.chunked_coreset import SCHEMES
from ..settings import memory_budget_mb
from .base import FeatureDetector, register, upsample_and_smooth


@register("patchcore")
@dataclass(eq=False)
class PatchCore(FeatureDetector):
    """PatchCore with the paper's defaults; ``coreset_ratio=1.0`` keeps the whole bank.

    ``coreset``: ``"exact"`` (the exact k-center greedy over the whole bank), ``"chunked"`` (the
    greedy within chunks of the bank, merged by selection radius: linear in the number of images,
    covering radius measured within 1.15x of the exact one's) or ``"auto"`` (exact up to
    :data:`~adlib.kernels.chunked_coreset.AUTO_EXACT_POINTS` bank patches, chunked beyond).
    ``memory_mb``: the budget of the bank and coreset while fitting (None: ``ADLIB_MEMORY_MB``,
    default 2048); ``"exact"`` raises :class:`~adlib.kernels.MemoryBudgetError` when the bank would
    not fit it.
    """

    backbone: str = DEFAULT_BACKBONE
    strides: tuple[int, ...] = (8, 16)
    patch_size: int = 3
    coreset_ratio: float = 0.1
    coreset: str = "auto"
    memory_mb: float | None = None
    proj_dim: int = 128
    reweight: bool = False
    num_neighbors: int = 9
    sigma: float = 4.0
    seed: int = 0
    device: str | None = None
    memory_bank: Tensor | None = field(default=None, init=False, repr=False)   # (M, D)
    coreset_used: str | None = field(default=None, init=False, repr=False)     # fit's scheme: exact, chunked, all

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.coreset not in SCHEMES:
            raise ValueError(f"coreset must be one of {list(SCHEMES)}, got {self.coreset!r}")
        if self.memory_mb is not None and not self.memory_mb > 0:
            raise ValueError(f"memory_mb must be a positive number of MB (or None for ADLIB_MEMORY_MB), "
                             f"got {self.memory_mb!r}")

    def _embed(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W)`` -> locally aggregated patch features ``(B, D, h, w)`` on the finest stride's grid."""
        feats = self.extractor(images)
        grid = tuple(feats[min(self.strides)].shape[-2:])
        return concat_stages(feats, grid, mode="bilinear", aggregate=self.patch_size)

    def _fit(self, train: Iterable[Tensor]) -> None:
        budget = self.memory_mb if self.memory_mb is not None else memory_budget_mb()
        with torch.no_grad(), CoresetStream(self.coreset_ratio, self.coreset, proj_dim=self.proj_dim, seed=self.seed,
                                            budget_mb=budget, progress=True) as stream:
            for i, batch in enumerate(tqdm(train, desc="patchcore features", leave=False)):
                emb = self._embed(batch)
                stream.add(emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1]))
                if i == 0:
                    stream.expect(_expected_rows(train, emb))
            if stream.n_points == 0:
                raise ValueError("no training images")
            self.memory_bank = stream.finish()
        self.coreset_used = stream.scheme_used

    def _predict(self, images: Tensor) -> tuple[Tensor, Tensor]:
        if self.memory_bank is None:
            raise RuntimeError("PatchCore is not fitted: call fit() first")
        emb = self._embed(images)
        b, d, h, w = emb.shape
        patches = emb.permute(0, 2, 3, 1).reshape(-1, d)
        dist, idx = knn(patches, self.memory_bank, k=1)
        patch_scores = dist[:, 0].view(b, h * w)
        scores = self._image_scores(patch_scores, patches.view(b, h * w, d), idx[:, 0].view(b, h * w))
        maps = upsample_and_smooth(patch_scores.view(b, h, w), tuple(images.shape[-2:]), self.sigma)
        return scores, maps

    def _image_scores(self, patch_scores: Tensor, patches: Tensor, nearest: Tensor) -> Tensor:
        """Max patch score, or the paper's re-weighting: ``s * (1 - softmax-weight of the nearest
        bank patch among its own neighbours in the bank)``; large when that region of the bank is sparse."""
        best, where = patch_scores.max(1)
        if not self.reweight:
            return best
        rows = torch.arange(patches.shape[0], device=patches.device)
        test_patch = patches[rows, where]                           # (B, D)
        anchor = self.memory_bank[nearest[rows, where]]             # (B, D)
        k = min(self.num_neighbors, self.memory_bank.shape[0])
        _, neighbours = knn(anchor, self.memory_bank, k=k)          # (B, k), first is the anchor itself
        dists = (self.memory_bank[neighbours] - test_patch[:, None]).norm(dim=-1)   # (B, k)
        weight = 1 - torch.softmax(dists, dim=1)[:, 0]
        return weight * best

    def scoring_module(self) -> nn.Module:
        if self.memory_bank is None:
            raise RuntimeError("PatchCore is not fitted: call fit() first")
        return _PatchCoreScoring(self)

    def state_dict(self) -> dict[str, Tensor]:
        return {} if self.memory_bank is None else {"memory_bank": self.memory_bank}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.memory_bank = state["memory_bank"].to(self.device_)


def _expected_rows(train: Iterable[Tensor], first: Tensor) -> int:
    """The bank's size estimated from the first batch's embedding ``(B, D, h, w)`` and the number of
    batches, as if all but the last were as large (0 when the batches cannot be counted)."""
    try:
        n_batches = len(train)  # type: ignore[arg-type]
    except TypeError:
        return 0
    b, _, h, w = first.shape
    return ((n_batches - 1) * b + 1) * h * w


def _nearest(queries: Tensor, bank: Tensor, bank_sq: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``k`` nearest rows of ``bank (M, D)`` for ``queries (Q, D)``: found by the expanded squared
    distance, then measured again directly (the expansion loses digits on near neighbours).
    Returns distances ``(Q, k)`` and indices ``(Q, k)``."""
    approx = bank_sq[None] - 2.0 * queries @ bank.t()                          # |b|^2 - 2 q.b
    idx = torch.topk(approx, k, dim=1, largest=False).indices                   # (Q, k)
    dist = (bank[idx] - queries[:, None]).pow(2).sum(-1).sqrt()
    return dist, idx


class _PatchCoreScoring(nn.Module):
    """PatchCore's predict as a plain module: nearest bank patch by matrix product and top-k."""

    def __init__(self, patchcore: PatchCore):
        super().__init__()
        self.extractor, self.strides, self.patch_size = patchcore.extractor, patchcore.strides, patchcore.patch_size
        self.sigma, self.reweight = patchcore.sigma, patchcore.reweight
        self.k = min(patchcore.num_neighbors, patchcore.memory_bank.shape[0])
        self.register_buffer("bank", patchcore.memory_bank.float())
        self.register_buffer("bank_sq", patchcore.memory_bank.float().pow(2).sum(1))

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        feats = self.extractor(images)
        grid = tuple(feats[min(self.strides)].shape[-2:])
        emb = concat_stages(feats, grid, mode="bilinear", aggregate=self.patch_size)
        b, d, h, w = emb.shape
        patches = emb.permute(0, 2, 3, 1).reshape(-1, d)
        dist, idx = _nearest(patches, self.bank, self.bank_sq, 1)
        patch_scores = dist[:, 0].reshape(b, h * w)
        best, where = patch_scores.max(1)
        scores = best
        if self.reweight:
            test_patch = torch.gather(patches.reshape(b, h * w, d), 1, where[:, None, None].expand(b, 1, d))[:, 0]
            anchor = self.bank[torch.gather(idx[:, 0].reshape(b, h * w), 1, where[:, None])[:, 0]]
            _, neighbours = _nearest(anchor, self.bank, self.bank_sq, self.k)
            dists = (self.bank[neighbours] - test_patch[:, None]).pow(2).sum(-1).sqrt()
            scores = (1 - torch.softmax(dists, dim=1)[:, 0]) * best
        maps = upsample_and_smooth(patch_scores.reshape(b, h, w), tuple(images.shape[-2:]), self.sigma)
        return scores, maps

