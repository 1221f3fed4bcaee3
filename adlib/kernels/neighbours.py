"""Exact k nearest neighbours (PatchCore's scoring): :func:`knn`.

``queries (Q, D)`` against ``bank (M, D)`` -> Euclidean distances ``(Q, k)`` ascending and bank
indices ``(Q, k)`` int64, exact, with the distance tiles bounded by a memory budget whatever Q and
M are. The CPU path (:func:`_scan_cpu`) deals query tiles out to one thread per core with NumPy's
BLAS; accelerators (:func:`_scan_device`) run a running top-k over bank tiles with torch.
"""

from __future__ import annotations

import threading

import numpy as np
import torch
from torch import Tensor

from ._runtime import DEFAULT_BUDGET_MB, check_matrix, exact_fp32, in_threads


def knn(queries: Tensor, bank: Tensor, k: int = 1, budget_mb: float = DEFAULT_BUDGET_MB) -> tuple[Tensor, Tensor]:
    """Exact Euclidean k nearest neighbours of each query in the bank.

    Args:
        queries: ``(Q, D)`` float32/float64 (half precision is refused: distances need float32).
        bank: ``(M, D)`` on the same device.
        k: neighbours per query, ``1 <= k <= M``.
        budget_mb: bound on the extra memory of the distance tiles, whatever Q and M are.

    Returns:
        ``dist (Q, k)`` ascending and ``idx (Q, k)`` int64 into the bank.

    How: both sides are centred on the bank mean (distances are unchanged, float32 cancellation is
    smaller), the bank is augmented with its squared norms so that one matrix product gives
    ``|b|^2 - 2 q.b`` per tile, tiles are reduced with a running min/top-k, and the chosen
    neighbours' distances are recomputed directly as ``|q - b|`` so that duplicates give exactly 0.
    """
    check_matrix("queries", queries, allow_empty=True)
    check_matrix("bank", bank)
    if queries.shape[1] != bank.shape[1]:
        raise ValueError(f"queries have {queries.shape[1]} features, the bank {bank.shape[1]}")
    if queries.device != bank.device:
        raise ValueError(f"queries on {queries.device}, bank on {bank.device}: put them on one device")
    if queries.dtype in (torch.float16, torch.bfloat16) or bank.dtype in (torch.float16, torch.bfloat16):
        raise TypeError("knn needs float32 or float64 inputs; half precision loses the distances")
    if not 1 <= k <= bank.shape[0]:
        raise ValueError(f"k must be in [1, {bank.shape[0]}] (the bank size), got {k}")
    n_q, n_b = queries.shape[0], bank.shape[0]
    device = queries.device
    if n_q == 0:
        return torch.empty(0, k, device=device), torch.empty(0, k, dtype=torch.long, device=device)

    with torch.no_grad(), exact_fp32():
        centre = bank.mean(0, dtype=torch.float64).float()
        # [b, |b|^2] against [-2q, 1]: one product gives |b|^2 - 2 q.b
        bank_aug = torch.empty(n_b, bank.shape[1] + 1, dtype=torch.float32, device=device)
        torch.sub(bank, centre, out=bank_aug[:, :-1])
        bank_aug[:, -1] = bank_aug[:, :-1].pow(2).sum(1)
        if device.type == "cpu":
            dist, best_idx = _scan_cpu(queries, bank, centre, bank_aug.t(), k, budget_mb)
        else:
            best_idx = _scan_device(queries, centre, bank_aug.t(), k, budget_mb)
            dist = _direct_distances(queries, bank, best_idx, budget_mb)
        dist, order = dist.sort(dim=1)
        return dist.to(queries.dtype if queries.dtype == torch.float64 else torch.float32), best_idx.gather(1, order)


def _augmented_queries(queries: Tensor, centre: Tensor) -> Tensor:
    """``(q, D)`` -> ``(q, D + 1)`` float32 rows ``[-2 (q - centre), 1]``."""
    q_c = queries.float() - centre
    return torch.cat([-2.0 * q_c, torch.ones(q_c.shape[0], 1, device=q_c.device)], 1).contiguous()


def _augmented_queries_numpy(queries: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """NumPy twin of :func:`_augmented_queries`, for the CPU threads (no torch op, hence no
    torch OpenMP team, inside them)."""
    n, dim = queries.shape
    out = np.empty((n, dim + 1), dtype=np.float32)
    np.subtract(queries, centre, out=out[:, :dim], casting="same_kind")
    out[:, :dim] *= -2.0
    out[:, dim] = 1.0
    return out


def _scan_device(queries: Tensor, centre: Tensor, bank_aug_t: Tensor, k: int, budget_mb: float) -> Tensor:
    """Accelerators: query tiles one after another, each a running k-smallest over bank tiles."""
    n_q, n_b = queries.shape[0], bank_aug_t.shape[1]
    tile_q, tile_b = _tile_sizes(n_q, n_b, budget_mb)
    buffer = torch.empty(tile_q * tile_b, dtype=torch.float32, device=queries.device)
    best_idx = torch.empty(n_q, k, dtype=torch.long, device=queries.device)
    for q0 in range(0, n_q, tile_q):
        _, best_idx[q0:q0 + tile_q] = _scan_bank(_augmented_queries(queries[q0:q0 + tile_q], centre),
                                                 bank_aug_t, k, tile_b, buffer)
    return best_idx


def _scan_cpu(queries: Tensor, bank: Tensor, centre: Tensor, bank_aug_t: Tensor, k: int,
              budget_mb: float) -> tuple[Tensor, Tensor]:
    """CPU: query tiles dealt out to one thread per core; each thread runs single-threaded BLAS
    products into a small tile and reduces it itself.

    Why not one multi-threaded product per tile: the min over a tile is then a separate,
    single-threaded pass over a tile too large for the cache, which is what kept adlib behind
    faiss. With a ~4 MB tile per thread, the product and the min both run on every core and the
    min reads the tile while it is still cached. NumPy releases the GIL in both.

    The products go through NumPy's BLAS (OpenBLAS), not torch's: torch's MKL takes a generic
    path on AMD processors and was 1.4-2x slower on these skinny shapes (measured in the
    benchmark). Nothing inside the threads is a torch op: torch's OpenMP workers would spin
    against OpenBLAS on the same cores (measured: +30% on a 2-core machine).
    """
    n_q, dim, n_b = queries.shape[0], bank_aug_t.shape[0], bank_aug_t.shape[1]
    tile_q, tile_b = cpu_tile_sizes(n_q, n_b, dim, budget_mb / max(1, torch.get_num_threads()))
    aug_np, centre_np = bank_aug_t.numpy(), centre.numpy()
    queries_np, bank_np = queries.detach().numpy(), bank.detach().numpy()
    dist_dtype = np.float64 if queries.dtype == torch.float64 else np.float32
    best_idx = np.empty((n_q, k), dtype=np.int64)
    dist = np.empty((n_q, k), dtype=dist_dtype)
    buffers = threading.local()       # one distance tile per thread, reused across its query tiles

    def work(q0: int, q1: int) -> None:
        if not hasattr(buffers, "tile"):
            buffers.tile = np.empty(tile_q * tile_b, dtype=np.float32)
        q = queries_np[q0:q1]
        idx = _scan_bank_numpy(_augmented_queries_numpy(q, centre_np), aug_np, k, tile_b, buffers.tile)
        # exact distances of the chosen neighbours, computed directly (no cancellation)
        diff = bank_np[idx].astype(dist_dtype, copy=False) - q[:, None, :].astype(dist_dtype, copy=False)
        dist[q0:q1] = np.sqrt(np.einsum("qkd,qkd->qk", diff, diff))
        best_idx[q0:q1] = idx

    in_threads(n_q, tile_q, work)
    return torch.from_numpy(dist), torch.from_numpy(best_idx)


def cpu_tile_sizes(n_q: int, n_b: int, dim: int, budget_mb: float) -> tuple[int, int]:
    """Per-thread tiles of 512 x 2048 (short features) or 1024 x 2048 (long ones): 4-8 MB, the
    best measured on a 2-core AMD EPYC; smaller when the per-thread budget is smaller."""
    floats = max(1024, min(2**20 if dim < 512 else 2**21, int(budget_mb * 2**20 / 4)))
    tile_b = min(n_b, 2048, floats)
    tile_q = max(1, min(n_q, floats // tile_b))
    return tile_q, tile_b


def _scan_bank_numpy(q_aug: np.ndarray, bank_aug_t: np.ndarray, k: int, tile_b: int,
                     buffer: np.ndarray) -> np.ndarray:
    """Columns of the k smallest ``|b|^2 - 2 q.b`` of each query row, ``(q, k)`` int64, unsorted."""
    n_q, n_b = q_aug.shape[0], bank_aug_t.shape[1]
    rows = np.arange(n_q)[:, None]
    best_val = np.full((n_q, k), np.inf, dtype=np.float32)
    best_idx = np.zeros((n_q, k), dtype=np.int64)
    for b0 in range(0, n_b, tile_b):
        cols = min(tile_b, n_b - b0)
        tile = buffer[: n_q * cols].reshape(n_q, cols)
        np.matmul(q_aug, bank_aug_t[:, b0:b0 + cols], out=tile)
        if k == 1:
            j = tile.argmin(axis=1)[:, None]
            val = np.take_along_axis(tile, j, axis=1)
            better = val < best_val
            best_val[better] = val[better]
            best_idx[better] = j[better] + b0
            continue
        j = np.argpartition(tile, k - 1, axis=1)[:, :k] if cols > k else np.broadcast_to(np.arange(cols), (n_q, cols))
        all_val = np.concatenate([best_val, tile[rows, j]], 1)
        all_idx = np.concatenate([best_idx, j + b0], 1)
        keep = np.argpartition(all_val, k - 1, axis=1)[:, :k]
        best_val, best_idx = all_val[rows, keep], all_idx[rows, keep]
    return best_idx


def _tile_sizes(n_q: int, n_b: int, budget_mb: float) -> tuple[int, int]:
    """Accelerator query and bank tile sizes whose float32 distance tile fits the budget."""
    budget = max(int(budget_mb * 2**20 / 4), 1024)
    tile_b = min(n_b, 2048)              # 4096 x 2048 tiles: large enough for BLAS efficiency
    tile_q = max(1, min(n_q, 4096, budget // tile_b))
    if tile_q < 1024:                    # a small budget: shorten the bank tiles, not the query tiles
        tile_q = min(n_q, 1024)
        tile_b = max(1, min(n_b, budget // tile_q))
    return tile_q, tile_b


def _scan_bank(q_aug: Tensor, bank_aug_t: Tensor, k: int, tile_b: int, buffer: Tensor) -> tuple[Tensor, Tensor]:
    """Running k-smallest of ``|b|^2 - 2 q.b`` over bank tiles for one query tile."""
    n_q, n_b = q_aug.shape[0], bank_aug_t.shape[1]
    best_val = best_idx = None
    for b0 in range(0, n_b, tile_b):
        cols = min(tile_b, n_b - b0)
        tile = torch.mm(q_aug, bank_aug_t[:, b0:b0 + cols], out=buffer[: n_q * cols].view(n_q, cols))
        val, idx = _smallest(tile, min(k, cols))
        idx = idx + b0
        if best_val is None:
            best_val, best_idx = val, idx
        else:
            val, j = _smallest(torch.cat([best_val, val], 1), k)
            best_val, best_idx = val, torch.cat([best_idx, idx], 1).gather(1, j)
    return best_val, best_idx


def _smallest(values: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k smallest entries of each row (unsorted) and their columns."""
    if k == 1:
        return values.min(dim=1, keepdim=True)
    return values.topk(k, dim=1, largest=False, sorted=False)


def _direct_distances(queries: Tensor, bank: Tensor, idx: Tensor, budget_mb: float) -> Tensor:
    """``|q_i - b_idx[i, j]|`` for ``idx (Q, k)``, chunked."""
    n_q, k = idx.shape
    dim = queries.shape[1]
    dtype = torch.float64 if queries.dtype == torch.float64 else torch.float32
    out = torch.empty(n_q, k, dtype=dtype, device=queries.device)
    step = max(1, int(budget_mb * 2**20 / 4 / max(1, k * dim)))
    for q0 in range(0, n_q, step):
        q = queries[q0:q0 + step].to(dtype)
        b = bank[idx[q0:q0 + step]].to(dtype)             # (q, k, D)
        out[q0:q0 + step] = (b - q[:, None, :]).pow_(2).sum(-1).sqrt_()
    return out
