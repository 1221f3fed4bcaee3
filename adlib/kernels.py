"""The hot code of adlib, and nothing else: tensors in, tensors out.

- :func:`knn`: exact k-nearest-neighbour Euclidean distances of patch features to a memory bank
  (PatchCore), chunked under a memory budget.
- :func:`greedy_coreset`: k-center greedy subsampling of a memory bank (PatchCore), with
  triangle-inequality pruning.
- :class:`GaussianAccumulator` / :class:`PositionGaussians`: streaming per-position mean and
  covariance, Cholesky factors, and the batched Mahalanobis distance (PaDiM).
- :func:`gmm_blobs`: synthetic anomalies from random 2-D Gaussian mixtures (semi-formula-driven
  pre-training).

Every kernel runs on CPU and CUDA with the same code; see the Performance chapter for why each
is fast and ``python -m adlib.bench`` for the measurements against the field's implementations.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from scipy.linalg import cython_blas, cython_lapack
from threadpoolctl import threadpool_limits
from torch import Tensor

__all__ = ["knn", "greedy_coreset", "random_projection", "GaussianAccumulator", "PositionGaussians",
           "mahalanobis", "gmm_blobs", "paint_blobs", "blob_score", "BlobParams", "DEFAULT_BUDGET_MB"]

DEFAULT_BUDGET_MB = 256.0


# ---------------------------------------------------------------------------------------------
# Input checks shared by the kernels
# ---------------------------------------------------------------------------------------------

def _check_matrix(name: str, x: Tensor, allow_empty: bool = False) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise TypeError(f"{name} must be floating point, got {x.dtype}")
    if not allow_empty and x.shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")


@contextlib.contextmanager
def _exact_fp32() -> Iterator[None]:
    """TF32 off for distance products: its 10-bit mantissa would break the 1e-4 accuracy."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


@functools.lru_cache(maxsize=None)
def _nogil_routine(name: str) -> Callable[..., None]:
    """A BLAS/LAPACK routine (``"spotrf"``, ``"dsyrk"``, ...) from SciPy's Cython tables, called
    through ctypes with every argument a pointer (Fortran convention).

    Why: ctypes releases the GIL during the call, so threads run their LAPACK calls at the same
    time; SciPy's Python wrappers (``scipy.linalg.lapack``) hold it (measured: two threads of
    ``potrf`` gave 1.0x through them, 1.9x through this).
    """
    n_args = {"potrf": 5, "syrk": 10, "trsm": 11, "lacpy": 7, "laset": 7}[name[1:]]
    module = cython_blas if name[1:] in ("syrk", "trsm") else cython_lapack
    capsule = module.__pyx_capi__[name]
    # own prototypes: setting argtypes on ctypes.pythonapi's functions would change them for everyone
    get_name = ctypes.PYFUNCTYPE(ctypes.c_char_p, ctypes.py_object)(("PyCapsule_GetName", ctypes.pythonapi))
    get_pointer = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
        ("PyCapsule_GetPointer", ctypes.pythonapi))
    return ctypes.CFUNCTYPE(None, *[ctypes.c_void_p] * n_args)(get_pointer(capsule, get_name(capsule)))


class _LowerTriangles:
    """BLAS/LAPACK on the lower triangles (C order) of C-contiguous ``(C, C)`` float32/float64
    matrices, given by address (``array.ctypes.data``), each call without the GIL.

    A C-order matrix is its own transpose read in Fortran order, so C order's lower triangle is
    Fortran's upper one (``"U"``) and Fortran's upper Cholesky factor U (U^T U = A) is, read in
    C order, the lower factor L (L L^T = A). The constant arguments are built once: with a few
    thousand small matrices, building them per call costs as much as the arithmetic.
    """

    def __init__(self, channels: int, dtype: np.dtype):
        kind = np.dtype(dtype)
        if kind not in (np.float32, np.float64):
            raise TypeError(f"float32 or float64 needed, got {kind}")
        prefix = "s" if kind == np.float32 else "d"
        self._real = ctypes.c_float if kind == np.float32 else ctypes.c_double
        self._c = channels
        self._n = self._int(channels)
        self._upper, self._lower, self._no_transpose = (ctypes.c_char_p(flag) for flag in (b"U", b"L", b"N"))
        self._syrk, self._potrf, self._trsm, self._lacpy, self._laset = (
            _nogil_routine(prefix + name) for name in ("syrk", "potrf", "trsm", "lacpy", "laset"))
        self._right, self._one = ctypes.c_char_p(b"R"), ctypes.byref(self._real(1.0))
        self._one_less = self._int(max(channels - 1, 1))
        self._zero = ctypes.byref(self._real(0.0))
        self._next = kind.itemsize   # one element on: the strict upper triangle's first column

    @staticmethod
    def _int(value: int) -> ctypes._CArgObject:
        return ctypes.byref(ctypes.c_int(value))

    def rank_one(self, alpha: float, beta: float) -> Callable[[int, int], None]:
        """``update(matrix, v)``: ``matrix = alpha v v^T + beta matrix`` for a vector ``v (C,)``
        (a symmetric rank-1 update, syrk with one column)."""
        fixed = (self._upper, self._no_transpose, self._n, self._int(1), ctypes.byref(self._real(alpha)))
        middle = (self._n, ctypes.byref(self._real(beta)))

        def update(matrix: int, v: int) -> None:
            self._syrk(*fixed, v, *middle, matrix, self._n)
        return update

    def solve(self, columns: int) -> Callable[[int, int], None]:
        """``solve(factor, rhs)``: ``rhs (C, columns)``, C-contiguous, becomes ``L^{-1} rhs`` for the
        lower factor L (a triangular solve, trsm)."""
        # Fortran sees rhs^T (columns, C) and L^T: solve X L^T = rhs^T from the right
        columns_arg = self._int(columns)
        fixed = (self._right, self._upper, self._no_transpose, self._no_transpose, columns_arg, self._n, self._one)

        def solve(factor: int, rhs: int) -> None:
            self._trsm(*fixed, factor, self._n, rhs, columns_arg)
        return solve

    def cholesky(self, matrix: int) -> int:
        """Lower triangle -> Cholesky factor, in place; the strict upper triangle is not touched.
        Returns LAPACK's info: 0, or the order of the first minor not positive definite."""
        info = ctypes.c_int(0)
        self._potrf(self._upper, self._n, matrix, self._n, ctypes.byref(info))
        return info.value

    def copy(self, dst: int, src: int) -> None:
        """``dst``'s lower triangle, with the diagonal, = ``src``'s."""
        self._lacpy(self._upper, self._n, self._n, src, self._n, dst, self._n)

    def zero_strict_upper(self, matrix: int) -> None:
        """Zeros above the diagonal, the diagonal kept."""
        if self._c < 2:
            return
        # C order's strict upper triangle is Fortran's strict lower one: the lower triangle, with
        # its diagonal, of the (C-1, C-1) block one element on
        self._laset(self._lower, self._one_less, self._one_less, self._zero, self._zero, matrix + self._next, self._n)


def _in_threads(n_items: int, chunk: int, work: Callable[[int, int], None]) -> None:
    """CPU: ``work(i0, i1)`` for every chunk of ``chunk`` items, the chunks dealt out round-robin to
    one thread per core, each thread with a single-threaded BLAS.

    Why: the kernels' CPU work is many small BLAS calls (a query tile, a few positions' C x C
    matrices). One multi-threaded call for each spends its time synchronizing threads, and torch's
    batched CPU routines call MKL one matrix at a time, which takes a generic path on AMD
    processors. NumPy releases the GIL in its products and reductions, and so does ctypes in the
    BLAS/LAPACK calls of :func:`_nogil_routine`, so the threads overlap.
    """
    starts = list(range(0, n_items, chunk))
    n_threads = max(1, min(torch.get_num_threads(), len(starts)))

    def run(my_starts: list[int]) -> None:
        for i0 in my_starts:
            work(i0, min(i0 + chunk, n_items))

    with threadpool_limits(1, user_api="blas"):
        if n_threads == 1:
            run(starts)
        else:
            with ThreadPoolExecutor(n_threads) as pool:
                list(pool.map(run, [starts[i::n_threads] for i in range(n_threads)]))


# ---------------------------------------------------------------------------------------------
# k nearest neighbours
# ---------------------------------------------------------------------------------------------

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
    _check_matrix("queries", queries, allow_empty=True)
    _check_matrix("bank", bank)
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

    with torch.no_grad(), _exact_fp32():
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
    tile_q, tile_b = _cpu_tile_sizes(n_q, n_b, dim, budget_mb / max(1, torch.get_num_threads()))
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

    _in_threads(n_q, tile_q, work)
    return torch.from_numpy(dist), torch.from_numpy(best_idx)


def _cpu_tile_sizes(n_q: int, n_b: int, dim: int, budget_mb: float) -> tuple[int, int]:
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


# ---------------------------------------------------------------------------------------------
# Greedy coreset (k-center)
# ---------------------------------------------------------------------------------------------

def random_projection(features: Tensor, dim: int = 128, seed: int = 0) -> Tensor:
    """Johnson-Lindenstrauss projection ``(N, D) -> (N, dim)`` with a seeded Gaussian matrix; the
    identity (a float32 copy) when ``dim >= D``."""
    n_features = features.shape[1]
    if dim <= 0 or dim >= n_features:
        return features.float()
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.randn(n_features, dim, generator=generator) / math.sqrt(dim)
    return features.float() @ matrix.to(features.device)


def _coreset_size(n_points: int, ratio: float | None, n: int | None) -> int:
    if (ratio is None) == (n is None):
        raise ValueError("give exactly one of ratio (0 < ratio <= 1) or n (1 <= n <= N)")
    if ratio is not None:
        if not 0 < ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {ratio}")
        return max(1, int(round(n_points * ratio)))
    if not 1 <= n <= n_points:
        raise ValueError(f"n must be in [1, {n_points}], got {n}")
    return int(n)


def greedy_coreset(features: Tensor, ratio: float | None = None, n: int | None = None, proj_dim: int = 128,
                   seed: int = 0, start: int | None = None, progress: bool = False) -> Tensor:
    """k-center greedy coreset (PatchCore): indices ``(n,)`` of points that cover ``features (N, D)``.

    Each step adds the point farthest from the coreset so far. ``features`` are first projected
    to ``proj_dim`` dimensions (seeded) as in PatchCore; ``start`` (default: a seeded random
    index) is the first centre. Exact: the same selection as the plain algorithm
    (:func:`_greedy_coreset_reference`) given the same projection and start.

    Fast because a step computes few distances: with ``c(x)`` the centre nearest to ``x`` and
    ``d(x)`` its distance, a new centre ``z`` can be nearer to ``x`` only if
    ``|c(x) - z| < 2 d(x)`` (triangle inequality). So a step computes ``|c - z|`` for the centres
    (one matrix-vector product), tests every point with one gather and one comparison, and
    computes exact distances only for the points that pass; as the coreset grows, ``d(x)`` shrinks
    and almost every point is skipped. (Cluster-level pruning, which would skip the per-point
    test, was measured slower on real 128-d patch features: distances concentrate, and most
    clusters pass a test that uses the cluster radius instead of ``d(x)``.)
    """
    _check_matrix("features", features)
    size = _coreset_size(features.shape[0], ratio, n)
    with torch.no_grad(), _exact_fp32():
        x = random_projection(features, proj_dim, seed).contiguous()
        n_points = x.shape[0]
        if start is None:
            start = int(torch.randint(n_points, (1,), generator=torch.Generator().manual_seed(seed)))
        selected = torch.empty(size, dtype=torch.long, device=x.device)
        centres = torch.empty(size, x.shape[1], dtype=x.dtype, device=x.device)
        selected[0] = start
        centres[0] = x[start]
        nearest = torch.zeros(n_points, dtype=torch.long, device=x.device)  # slot in `centres`
        dist = (x - x[start]).pow_(2).sum(1).sqrt_()
        sq_norm = (x * x).sum(1)
        centre_sq = torch.empty(size, dtype=x.dtype, device=x.device)
        centre_sq[0] = sq_norm[start]
        limit = 2.0 * dist * (1 + 1e-3) + 1e-3   # points with |c(x) - z| >= limit cannot move
        iterator = range(1, size)
        if progress:
            from tqdm import tqdm
            iterator = tqdm(iterator, desc="coreset", leave=False)
        for step in iterator:
            new = _argmax(dist)
            z = x[new]
            selected[step] = new
            centres[step] = z
            # |c - z| for every centre by one matrix-vector product (the norm expansion); it only
            # prunes, so a small relative margin absorbs its rounding.
            cz = torch.addmv(centre_sq[:step] + sq_norm[new], centres[:step], z, alpha=-2.0).clamp_min_(0).sqrt_()
            centre_sq[step] = sq_norm[new]
            candidates = _nonzero(_take(cz, nearest) < limit)
            if candidates.numel() == 0:
                continue
            d_new = (x[candidates] - z).pow_(2).sum(1).sqrt_()
            closer = d_new < dist[candidates]
            moved = candidates[closer]
            dist[moved] = d_new[closer]
            limit[moved] = 2.0 * d_new[closer] * (1 + 1e-3) + 1e-3
            nearest[moved] = step
            dist[new] = 0.0
            limit[new] = 0.0
        return selected


def _argmax(values: Tensor) -> int:
    """First index of the maximum; NumPy on the CPU, where it is ~10x faster on 1-D arrays."""
    return int(np.argmax(values.numpy())) if values.device.type == "cpu" else int(torch.argmax(values))


def _take(values: Tensor, index: Tensor) -> Tensor:
    """``values[index]`` for 1-D tensors; NumPy's take on the CPU (~3x faster than torch's gather)."""
    if values.device.type == "cpu":
        return torch.from_numpy(np.take(values.numpy(), index.numpy()))
    return values[index]


def _nonzero(mask: Tensor) -> Tensor:
    """Indices of the true entries of a 1-D mask."""
    if mask.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(mask.numpy()))
    return torch.nonzero(mask).squeeze(1)


def _greedy_coreset_reference(features: Tensor, size: int, proj_dim: int = 128, seed: int = 0,
                              start: int | None = None) -> Tensor:
    """The plain k-center greedy loop, for tests and the benchmark: every step reads every point."""
    x = random_projection(features, proj_dim, seed)
    if start is None:
        start = int(torch.randint(x.shape[0], (1,), generator=torch.Generator().manual_seed(seed)))
    selected = [start]
    dist = (x - x[start]).pow(2).sum(1).sqrt()
    for _ in range(1, size):
        new = int(torch.argmax(dist))
        selected.append(new)
        dist = torch.minimum(dist, (x - x[new]).pow(2).sum(1).sqrt())
    return torch.tensor(selected)


# ---------------------------------------------------------------------------------------------
# Per-position Gaussians and the Mahalanobis distance
# ---------------------------------------------------------------------------------------------

class GaussianAccumulator:
    """Streaming sums for a Gaussian per position, never holding all training features.

    ``update(x (B, C, H, W) or (B, C, P))`` adds a batch; ``finalize(eps)`` gives the fitted
    :class:`PositionGaussians`. Sums are taken around a shift (the first batch's mean) to avoid
    the cancellation of ``E[x x^T] - mu mu^T``. Batches are buffered and folded in together: the
    outer products of a flush are one batched product per position block with a long inner
    dimension, and the ``(P, C, C)`` sum, the largest array, is read and written once per flush.

    ``dtype`` of the sums: float64 (default) for accuracy, float32 halves the memory of the
    ``(P, C, C)`` sum for large C (the shift keeps it accurate). ``buffer_mb``: how much feature
    data to buffer before a flush; None = a quarter of the ``(P, C, C)`` sum's size, at least
    256 MB, so the sum is read and written a handful of times whatever the number of images.
    """

    def __init__(self, dtype: torch.dtype = torch.float64, buffer_mb: float | None = None):
        self.dtype = dtype
        self.buffer_mb = buffer_mb
        self.count = 0
        self.shift: Tensor | None = None   # (P, C)
        self.sum: Tensor | None = None     # (P, C)
        self.outer: Tensor | None = None   # (P, C, C)
        self._buffer: Tensor | None = None  # (P, capacity, C): batches, positions first
        self._filled = 0

    def update(self, features: Tensor) -> None:
        """Add a batch ``(B, C, H, W)`` or ``(B, C, P)``."""
        x = _positions_last(features, "features").detach()        # (B, C, P)
        known = self._buffer.shape[::2] if self._buffer is not None else None
        if known is not None and (x.shape[2], x.shape[1]) != tuple(known):
            raise ValueError(f"batch has {x.shape[1]} channels x {x.shape[2]} positions; earlier batches had "
                             f"{known[1]} x {known[0]}")
        if self._buffer is None:
            _, c, p = x.shape
            itemsize = torch.empty(0, dtype=self.dtype).element_size()
            capacity = max(1, int(self._buffer_bytes(c, p) // (p * c * itemsize)))
            self._buffer = torch.empty(p, capacity, c, dtype=self.dtype, device=x.device)
        done = 0
        while done < x.shape[0]:
            take = min(x.shape[0] - done, self._buffer.shape[1] - self._filled)
            _transpose_into(self._buffer[:, self._filled:self._filled + take], x[done:done + take])
            self._filled += take
            done += take
            if self._filled == self._buffer.shape[1]:
                self._flush()

    def _buffer_bytes(self, channels: int, positions: int) -> float:
        if self.buffer_mb is not None:
            return self.buffer_mb * 2**20
        itemsize = torch.empty(0, dtype=self.dtype).element_size()
        return max(DEFAULT_BUDGET_MB * 2**20, positions * channels * channels * itemsize / 4)

    def _flush(self) -> None:
        if self._buffer is None or self._filled == 0:
            return
        x = self._buffer[:, :self._filled]                        # (P, b, C)
        self._filled = 0
        first = self.shift is None
        if first:
            self.shift = torch.empty(x.shape[0], x.shape[2], dtype=self.dtype, device=x.device)
            self.sum = torch.zeros_like(self.shift)
            # empty, not zeros: the first products write it (in threads, which also shares out
            # the page faults of touching gigabytes of fresh memory)
            self.outer = torch.empty(x.shape[0], x.shape[2], x.shape[2], dtype=self.dtype, device=x.device)
        if x.device.type == "cpu":
            _accumulate_cpu(self.outer.numpy(), self.sum.numpy(), self.shift.numpy(), x.numpy(), first)
        else:
            if first:
                self.shift.copy_(x.mean(1))
            x -= self.shift[:, None, :]
            self.sum += x.sum(1)
            self.outer.baddbmm_(x.transpose(1, 2), x, beta=0.0 if first else 1.0)
        self.count += x.shape[1]

    def finalize(self, eps: float = 0.01, jitter_tries: int = 3) -> "PositionGaussians":
        """Mean ``(P, C)``, covariance ``+ eps I`` and its Cholesky factor ``(P, C, C)``.

        If a position's covariance is still not positive definite (``eps`` = 0 with fewer samples
        than channels), its jitter grows tenfold up to ``jitter_tries`` times; then a clear error
        names the position. NaN or infinite features raise a clear error. Never NaN silently.
        """
        self._flush()
        self._buffer = None
        if self.count < 2 or self.outer is None:
            raise ValueError(f"need at least 2 samples to fit a Gaussian, got {self.count}")
        n = self.count
        mean_shifted = self.sum / n                                   # (P, C)
        mean = (mean_shifted + self.shift).float()
        cov, self.outer = self.outer, None   # the covariance is made in place; no second copy
        if not torch.isfinite(mean).all():
            raise ValueError("covariance holds NaN or infinity: the features were not finite")
        if cov.device.type == "cpu":
            _covariance_cholesky_cpu(cov.numpy(), mean_shifted.numpy(), n, eps, jitter_tries)
        else:
            cov.baddbmm_(mean_shifted[:, :, None], mean_shifted[:, None, :], alpha=-n).div_(n - 1)
            _cholesky_in_place(cov, eps, jitter_tries)
        return PositionGaussians(mean=mean, chol=cov.float() if cov.dtype != torch.float32 else cov, eps=eps)


def _transpose_into(dst: Tensor, src: Tensor) -> None:
    """``dst (P, b, C) = src (b, C, P)`` rearranged. On the CPU image by image: a 2-D transpose
    copy is cache-blocked, a 3-D permuted copy is not (6x slower measured at C = 550)."""
    if dst.device.type != "cpu":
        dst.copy_(src.permute(2, 0, 1))
        return
    for j in range(src.shape[0]):
        dst[:, j].copy_(src[j].t())


def _accumulate_cpu(outer: np.ndarray, total: np.ndarray, shift: np.ndarray, x: np.ndarray, first: bool) -> None:
    """For ``x (P, b, C)``, in place, in threads over chunks of positions, each step while the
    chunk is in cache: (``first``: ``shift = `` the mean over b), ``x -= shift``, ``total += x``
    summed over b, ``outer[p] += x[p]^T x[p]`` (``=`` when ``first``) for ``outer (P, C, C)``."""

    def work(p0: int, p1: int) -> None:
        xs = x[p0:p1]
        if first:
            np.mean(xs, axis=1, out=shift[p0:p1])
        xs -= shift[p0:p1, None, :]
        total[p0:p1] += xs.sum(1)
        if first:
            np.matmul(xs.transpose(0, 2, 1), xs, out=outer[p0:p1])
        else:
            outer[p0:p1] += np.matmul(xs.transpose(0, 2, 1), xs)
    # 4 positions a chunk: the product's result is still in cache for the +=. A symmetric
    # rank-k update (syrk, half the multiplications) was measured no faster than NumPy's gemm.
    _in_threads(x.shape[0], 4, work)


def _covariance_cholesky_cpu(sums: np.ndarray, mean_shifted: np.ndarray, n: int, eps: float,
                             jitter_tries: int) -> None:
    """In place, in threads over chunks of positions: ``sums (P, C, C)`` of shifted outer products
    -> covariance ``+ eps I`` -> lower Cholesky factor with zeros above the diagonal (LAPACK potrf,
    one call per position), with a tenfold jitter, up to ``jitter_tries`` times, where a matrix
    is not positive definite. Each step reads and writes only the lower triangle of a matrix
    while it is in cache: the covariance ``(S - n m m^T) / (n - 1)`` is one rank-1 update."""
    if mean_shifted.dtype != sums.dtype or not (sums.flags.c_contiguous and mean_shifted.flags.c_contiguous):
        raise TypeError("sums and means must be C-contiguous arrays of one dtype (LAPACK reads raw memory)")
    c = sums.shape[-1]
    diagonal = np.arange(c)
    lapack = _LowerTriangles(c, sums.dtype)
    centre = lapack.rank_one(alpha=-n / (n - 1), beta=1 / (n - 1))
    local = threading.local()

    def work(p0: int, p1: int) -> None:
        cov = sums[p0:p1]
        addresses = [sums[p].ctypes.data for p in range(p0, p1)]
        for p, address in zip(range(p0, p1), addresses):
            centre(address, mean_shifted[p].ctypes.data)
        # the diagonal bounds the rest (|cov_ij| <= sqrt(cov_ii cov_jj)); above it is not updated
        if not np.isfinite(cov[:, diagonal, diagonal]).all():
            raise ValueError("covariance holds NaN or infinity: the features were not finite")
        cov[:, diagonal, diagonal] += eps
        if getattr(local, "backup", None) is None:
            local.backup = np.empty((c, c), dtype=sums.dtype)
        backup = local.backup.ctypes.data
        for i, address in enumerate(addresses):
            lapack.copy(backup, address)       # potrf overwrites its input, even when it fails
            info = lapack.cholesky(address)
            jitter = eps
            for _ in range(jitter_tries):
                if info == 0:
                    break
                jitter = max(jitter, 1e-6) * 10
                lapack.copy(address, backup)
                cov[i, diagonal, diagonal] += jitter - eps
                info = lapack.cholesky(address)
            if info != 0:
                raise ValueError(f"covariance not positive definite at position {p0 + i} even with jitter "
                                 f"{jitter:g}; use a larger eps or more training images")
            lapack.zero_strict_upper(address)
    _in_threads(sums.shape[0], 8, work)


def _cholesky_in_place(cov: Tensor, eps: float, jitter_tries: int, chunk: int = 256) -> Tensor:
    """Accelerators: Cholesky factors of ``cov + eps I`` for ``(P, C, C)``, chunked over positions,
    in place; positions that are not positive definite get a tenfold jitter, up to
    ``jitter_tries`` times."""
    c = cov.shape[-1]
    eye = torch.eye(c, dtype=cov.dtype, device=cov.device)
    if not torch.isfinite(cov).all():
        raise ValueError("covariance holds NaN or infinity: the features were not finite")
    for p0 in range(0, cov.shape[0], chunk):
        block = cov[p0:p0 + chunk]
        factor, info = torch.linalg.cholesky_ex(block + eps * eye)
        jitter = eps
        for _ in range(jitter_tries):
            bad = torch.nonzero(info).squeeze(1)
            if len(bad) == 0:
                break
            jitter = max(jitter, 1e-6) * 10
            factor[bad], info[bad] = torch.linalg.cholesky_ex(block[bad] + jitter * eye)
        if int(info.max()) != 0:
            bad = (p0 + torch.nonzero(info).squeeze(1)).tolist()[:10]
            raise ValueError(f"covariance not positive definite at positions {bad} even with jitter {jitter:g}; "
                             f"use a larger eps or more training images")
        block.copy_(factor)
    return cov


def _positions_last(features: Tensor, name: str) -> Tensor:
    if features.ndim == 4:
        return features.flatten(2)
    if features.ndim == 3:
        return features
    raise ValueError(f"{name} must be (B, C, H, W) or (B, C, P), got shape {tuple(features.shape)}")


@dataclass
class PositionGaussians:
    """Fitted per-position Gaussians: ``mean (P, C)``, Cholesky factor ``chol (P, C, C)`` of
    ``cov + eps I`` (lower triangular)."""

    mean: Tensor
    chol: Tensor
    eps: float = 0.01

    def mahalanobis(self, features: Tensor, budget_mb: float = DEFAULT_BUDGET_MB) -> Tensor:
        """``(B, C, H, W)`` or ``(B, C, P)`` -> distances ``(B, P)``; see :func:`mahalanobis`."""
        return mahalanobis(features, self.mean, self.chol, budget_mb)


def mahalanobis(features: Tensor, mean: Tensor, chol: Tensor, budget_mb: float = DEFAULT_BUDGET_MB) -> Tensor:
    """Mahalanobis distance of every position's feature to its Gaussian: ``(B, P)``.

    ``d_p(x) = |L_p^{-1} (x_p - mu_p)|`` with the Cholesky factor ``L_p`` (``L L^T = cov``), by
    triangular solves, never an explicit inverse. On the CPU with many channels: one LAPACK solve
    per position, in threads; otherwise torch's batched solve, chunked over positions so that the
    working set stays in budget. For a few test images either is bound by reading the factors
    (``P C^2`` numbers).
    """
    x = _positions_last(features, "features")                 # (B, C, P)
    b, c, p = x.shape
    if mean.shape != (p, c) or chol.shape != (p, c, c):
        raise ValueError(f"features are {c} channels x {p} positions, the Gaussians "
                         f"{tuple(mean.shape)} / {tuple(chol.shape)}")
    x = x.to(chol.device, chol.dtype)
    out = torch.empty(b, p, dtype=chol.dtype, device=chol.device)
    if (chol.device.type == "cpu" and chol.dtype in (torch.float32, torch.float64) and chol.is_contiguous()
            and c >= _LAPACK_SOLVE_MIN_CHANNELS and b > 0):
        _mahalanobis_cpu(x.detach().numpy(), mean.detach().to(chol.dtype).contiguous().numpy(), chol.detach().numpy(),
                         out.numpy())
        return out
    step = max(1, int(budget_mb * 2**20 / (chol.element_size() * c * (c + 2 * b))))
    for p0 in range(0, p, step):
        diff = (x[:, :, p0:p0 + step] - mean[p0:p0 + step].t()[None]).permute(2, 1, 0)  # (p, C, B)
        z = torch.linalg.solve_triangular(chol[p0:p0 + step], diff, upper=False)
        out[:, p0:p0 + step] = z.pow_(2).sum(1).sqrt_().t()
    return out


# measured on a 2-core AMD EPYC, 3136 positions, 8 images: below ~160 channels torch's batched
# solve (1.8x faster at C = 100) beats a LAPACK call per position; at C = 550 the calls are 1.25x faster
_LAPACK_SOLVE_MIN_CHANNELS = 160


def _mahalanobis_cpu(x: np.ndarray, mean: np.ndarray, chol: np.ndarray, out: np.ndarray, chunk: int = 32) -> None:
    """CPU: ``out (B, P)`` = distances of ``x (B, C, P)`` for ``mean (P, C)``, factors ``chol (P, C, C)``,
    one LAPACK triangular solve per position, in threads over chunks of positions."""
    b, c, _ = x.shape
    if not (x.dtype == mean.dtype == chol.dtype == out.dtype) or not chol.flags.c_contiguous:
        raise TypeError("features, means, factors and output must share one dtype, factors C-contiguous "
                        "(LAPACK reads raw memory)")
    solve = _LowerTriangles(c, chol.dtype).solve(b)

    def work(p0: int, p1: int) -> None:
        diff = np.ascontiguousarray((x[:, :, p0:p1] - mean[p0:p1].T[None]).transpose(2, 1, 0))  # (p, C, B)
        for i, p in enumerate(range(p0, p1)):
            solve(chol[p].ctypes.data, diff[i].ctypes.data)
        np.sqrt(np.einsum("pcb,pcb->bp", diff, diff), out=out[:, p0:p1])
    _in_threads(x.shape[2], chunk, work)


# ---------------------------------------------------------------------------------------------
# Gaussian-mixture blobs: synthetic anomalies
# ---------------------------------------------------------------------------------------------

@dataclass
class BlobParams:
    """Parameters of the blobs added to each image; ``K`` is the largest component count.

    ``centre (B, K, 2)`` in [0, 1] (y, x); ``sigma (B, K, 2)`` as fractions of the image side;
    ``angle (B, K)`` radians; ``amplitude (B, K)`` signed; ``active (B, K)`` bool;
    ``colour (B, C)`` per-channel weights.
    """

    centre: Tensor
    sigma: Tensor
    angle: Tensor
    amplitude: Tensor
    active: Tensor
    colour: Tensor


def _uniform(shape: tuple[int, ...], low: float, high: float, generator: torch.Generator, device) -> Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator, device=device)


def gmm_blobs(images: Tensor, n_components: tuple[int, int] = (1, 4), centre: tuple[float, float] = (0.15, 0.85),
              sigma: tuple[float, float] = (0.02, 0.12), rotation: tuple[float, float] = (0.0, math.pi),
              amplitude: tuple[float, float] = (0.3, 1.5), signs: str = "both", colour: str = "random",
              mask_level: float = 2.0, generator: torch.Generator | None = None,
              ) -> tuple[Tensor, Tensor, BlobParams, Tensor]:
    """Add a random mixture of 2-D Gaussians to each image: synthetic anomalies with exact masks.

    For image ``b`` with ``n_b`` components drawn from ``n_components`` (inclusive), the blob field is
    ``g(u) = sum_k a_k exp(-q_k(u) / 2)`` with ``q_k`` the rotated anisotropic quadratic form of centre
    ``c_k``, standard deviations ``sigma_k`` (fractions of the side) and angle ``theta_k``; the image
    becomes ``x + g * colour`` (colour: ``"random"`` unit-norm-ish per-channel weights in [0.5, 1], or
    ``"gray"`` all ones). Vectorized over images and components (images grouped by their component
    count), on the images' device; the same ``generator`` seed gives the same anomalies.

    Each component is cut off at its ``mask_level``-sigma ellipse (zero outside it), so a pixel
    changes exactly where the mask says: the mask is the ground truth of the change, not an
    approximation of it (at ``mask_level = 2`` the cut is at e^-2 = 13.5% of the amplitude).

    Returns:
        anomalous images ``(B, C, H, W)``; masks ``(B, 1, H, W)``: pixels inside some component's
        ``mask_level``-sigma ellipse; the :class:`BlobParams`; and a score ``(B,)`` from
        :func:`blob_score`: the blobs' total contrast times extent.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    if not images.dtype.is_floating_point:
        raise TypeError(f"images must be floating point, got {images.dtype}")
    lo, hi = n_components
    if not (0 < sigma[0] <= sigma[1] and mask_level > 0):
        raise ValueError(f"sigma must be (min, max) with 0 < min <= max and mask_level > 0, got {sigma}, {mask_level}")
    if not 1 <= lo <= hi:
        raise ValueError(f"n_components must be (min, max) with 1 <= min <= max, got {n_components}")
    if signs not in ("both", "positive", "negative"):
        raise ValueError(f"signs must be 'both', 'positive' or 'negative', got {signs!r}")
    if colour not in ("random", "gray"):
        raise ValueError(f"colour must be 'random' or 'gray', got {colour!r}")
    b, c, h, w = images.shape
    device = images.device
    if generator is None:
        generator = torch.Generator(device=device).manual_seed(0)
    k = hi
    count = torch.randint(lo, hi + 1, (b, 1), generator=generator, device=device)
    active = torch.arange(k, device=device)[None] < count                           # (B, K)
    centres = _uniform((b, k, 2), *centre, generator, device)
    sigmas = _uniform((b, k, 2), *sigma, generator, device)
    angles = _uniform((b, k), *rotation, generator, device)
    amps = _uniform((b, k), *amplitude, generator, device)
    if signs == "both":
        amps = amps * torch.where(torch.rand((b, k), generator=generator, device=device) < 0.5, -1.0, 1.0)
    elif signs == "negative":
        amps = -amps
    amps = amps * active
    weights = (_uniform((b, c), 0.5, 1.0, generator, device) if colour == "random"
               else torch.ones(b, c, device=device))

    params = BlobParams(centres, sigmas, angles, amps, active, weights)
    out, masks, score = paint_blobs(images, params, mask_level)
    return out, masks, params, score


def blob_score(params: BlobParams, mask_level: float = 2.0) -> Tensor:
    """The anomaly score ``(B,)`` of each image's blobs: ``sum_k |a_k| * area_k`` over its active
    components, ``area_k = pi (mask_level sigma_y,k)(mask_level sigma_x,k)`` the ellipse's area as a
    fraction of the image. It grows with every amplitude, either standard deviation and the number
    of components, and ignores centre, angle and colour (the part of an ellipse beyond the border
    still counts)."""
    area = math.pi * (mask_level * params.sigma[..., 0]) * (mask_level * params.sigma[..., 1])
    return (params.amplitude.abs() * area * params.active).sum(1)


def paint_blobs(images: Tensor, params: BlobParams, mask_level: float = 2.0) -> tuple[Tensor, Tensor, Tensor]:
    """Add given blobs to ``images (B, C, H, W)`` -> (anomalous images, masks ``(B, 1, H, W)``, scores
    ``(B,)``): :func:`gmm_blobs` with parameters chosen by the caller, e.g. to change one at a time.
    Each image's active components come first; an image with none is returned unchanged."""
    if images.ndim != 4 or params.centre.shape[0] != images.shape[0]:
        raise ValueError(f"images must be (B, C, H, W) with B = {params.centre.shape[0]} parameter rows, "
                         f"got {tuple(images.shape)}")
    k = params.active.shape[1]
    prefix = torch.arange(k, device=params.active.device)[None] < params.active.sum(1, keepdim=True)
    if not torch.equal(params.active, prefix):
        raise ValueError("the active components of each image must come first (active = [True, ..., False, ...])")
    if not bool((params.sigma > 0).all()) or mask_level <= 0:
        raise ValueError("standard deviations and mask_level must be positive")
    out, masks = _paint_blobs(images, params, mask_level)
    return out, masks, blob_score(params, mask_level)


# exp() of very negative numbers gives subnormal floats, which x86 CPUs make ~4x slower (microcode
# assists; measured 72 -> 17 ms for the exponentials of 256 images); a component is cut to exactly 0
# below this exponent at the latest (e^-80 < 2e-35 of its amplitude), whatever mask_level asks
_EXPONENT_FLOOR = -80.0
# CPU: images x components x pixels computed per chunk, so that the temporaries stay near the cache
_BLOB_CHUNK_ELEMENTS = 1 << 21


def _paint_blobs(images: Tensor, params: BlobParams, mask_level: float) -> tuple[Tensor, Tensor]:
    """``images (B, C, H, W)`` + the blobs of ``params`` -> (anomalous images, masks ``(B, 1, H, W)``).

    Chunks of images; inside a chunk, the images with the same number of components go together,
    so no work is spent on unused component slots. Each output element is written once.
    """
    b, c, h, w = images.shape
    device = images.device
    cos, sin = torch.cos(params.angle), torch.sin(params.angle)
    inv_x, inv_y = 1.0 / params.sigma[..., 1] ** 2, 1.0 / params.sigma[..., 0] ** 2
    # q = A dx^2 + 2 B dx dy + C dy^2: the rotated ellipse's quadratic form
    quadratic = torch.stack([cos * cos * inv_x + sin * sin * inv_y, cos * sin * (inv_x - inv_y),
                             sin * sin * inv_x + cos * cos * inv_y], -1)           # (B, K, 3)
    counts = params.active.sum(1)
    out = torch.empty_like(images)
    masks = torch.empty(b, 1, h, w, dtype=images.dtype, device=device)
    step = max(1, _BLOB_CHUNK_ELEMENTS // max(1, params.active.shape[1] * h * w)) if device.type == "cpu" else b
    field = torch.empty(min(step, b), h, w, device=device)
    for i0 in range(0, b, step):
        chunk = slice(i0, i0 + step)
        chunk_counts = counts[chunk]
        for n in torch.unique(chunk_counts).tolist():
            which = torch.nonzero(chunk_counts == n).squeeze(1)
            if n == 0:                    # no blob: unchanged image, empty mask
                field[which], masks[i0 + which] = 0, 0
                continue
            parts = [t[chunk][which, :n] for t in (params.centre, quadratic, params.amplitude)]
            field[which], inside = _blob_field(*parts, h, w, mask_level)
            masks[i0 + which, 0] = inside.to(masks.dtype)
        g = len(chunk_counts)
        torch.addcmul(images[chunk], field[:g, None].to(images.dtype),
                      params.colour[chunk, :, None, None].to(images.dtype), out=out[chunk])
    return out, masks


def _blob_field(centre: Tensor, quadratic: Tensor, amplitude: Tensor, h: int, w: int,
                mask_level: float) -> tuple[Tensor, Tensor]:
    """``g`` images with ``k`` components each: centres ``(g, k, 2)``, quadratic forms ``(g, k, 3)``,
    amplitudes ``(g, k)`` -> field ``sum_k a_k exp(-q_k / 2)`` and "inside some ellipse" ``(g, H, W)``.

    The exponent ``-q/2 = u(y) + v(x) + s(y) x`` has a row part, a column part and one product
    term, so three passes build it; below the cut-off it is set to -inf (the component is zero
    there); the mask is one ``max`` over components, the sum one batched product.
    """
    g, k, _ = centre.shape
    ys = (torch.arange(h, device=centre.device, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, device=centre.device, dtype=torch.float32) + 0.5) / w
    dy = ys - centre[..., 0, None]                                     # (g, k, H)
    dx = xs - centre[..., 1, None]                                     # (g, k, W)
    coef_a, coef_b, coef_c = quadratic.unbind(-1)
    row = (-0.5 * coef_c)[..., None] * dy * dy
    column = (-0.5 * coef_a)[..., None] * dx * dx
    exponent = row[..., :, None] + column[..., None, :]               # (g, k, H, W)
    exponent.addcmul_((-coef_b[..., None] * dy)[..., :, None], dx[..., None, :])
    cut = max(-0.5 * mask_level ** 2, _EXPONENT_FLOOR)
    inside = exponent.amax(1) >= cut
    blobs = exponent.masked_fill_(exponent < cut, -math.inf).exp_().view(g, k, h * w)   # exp(-inf) = 0
    return torch.bmm(amplitude[:, None, :], blobs).view(g, h, w), inside
