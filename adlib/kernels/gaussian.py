"""Per-position Gaussians and the Mahalanobis distance (PaDiM).

- :class:`GaussianAccumulator`: streaming sums over batches ``(B, C, H, W)`` or ``(B, C, P)``, never
  holding all training features; ``finalize`` -> :class:`PositionGaussians`: mean ``(P, C)`` and
  the lower Cholesky factor ``(P, C, C)`` of covariance ``+ eps I``.
- :func:`mahalanobis`: features ``(B, C, H, W)`` or ``(B, C, P)`` -> distances ``(B, P)`` by
  triangular solves, never an explicit inverse.

On the CPU the covariance, its Cholesky factor and (with many channels) the solves are one
BLAS/LAPACK call per position through :mod:`adlib.kernels._lapack`, in threads; where that layer
is not available (:func:`adlib.kernels.lapack_available`) and on accelerators, torch's batched
routines do the same work.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ._lapack import LowerTriangles, lapack_available
from ._runtime import DEFAULT_BUDGET_MB, in_threads


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
        # finalize(): ((eps, jitter_tries), result) once it succeeded; "consumed" once it has begun
        # turning the sums into the covariance in place
        self._fitted: tuple[tuple[float, int], PositionGaussians] | None = None
        self._consumed = False

    def update(self, features: Tensor) -> None:
        """Add a batch ``(B, C, H, W)`` or ``(B, C, P)``."""
        if self._consumed:
            raise ValueError("finalize() has made the covariance from the sums: start a new GaussianAccumulator "
                             "to add more batches")
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

        Idempotent: a second call with the same arguments returns the same result. The sums become
        the covariance in place (no second ``(P, C, C)`` copy), so other arguments, or more
        batches, need a new accumulator (a clear error says so).
        """
        if self._fitted is not None:
            arguments, result = self._fitted
            if arguments != (eps, jitter_tries):
                raise ValueError(f"finalize() already ran with eps={arguments[0]!r}, jitter_tries={arguments[1]!r} "
                                 f"and used up the sums; fit a new GaussianAccumulator for other arguments")
            return result
        if self._consumed:
            raise ValueError("an earlier finalize() failed after it began making the covariance from the sums; "
                             "fit a new GaussianAccumulator")
        self._flush()
        self._buffer = None
        if self.count < 2 or self.outer is None:
            raise ValueError(f"need at least 2 samples to fit a Gaussian, got {self.count}")
        n = self.count
        mean_shifted = self.sum / n                                   # (P, C)
        mean = (mean_shifted + self.shift).float()
        cov, self.outer = self.outer, None   # the covariance is made in place; no second copy
        self._consumed = True
        if not torch.isfinite(mean).all():
            raise ValueError("covariance holds NaN or infinity: the features were not finite")
        if cov.device.type == "cpu" and lapack_available():
            _covariance_cholesky_cpu(cov.numpy(), mean_shifted.numpy(), n, eps, jitter_tries)
        else:
            cov.baddbmm_(mean_shifted[:, :, None], mean_shifted[:, None, :], alpha=-n).div_(n - 1)
            _cholesky_in_place(cov, eps, jitter_tries)
        result = PositionGaussians(mean=mean, chol=cov.float() if cov.dtype != torch.float32 else cov, eps=eps)
        self._fitted = ((eps, jitter_tries), result)
        return result


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
    in_threads(x.shape[0], 4, work)


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
    lapack = LowerTriangles(c, sums.dtype)
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
    in_threads(sums.shape[0], 8, work)


def _cholesky_in_place(cov: Tensor, eps: float, jitter_tries: int, chunk: int = 256) -> Tensor:
    """Accelerators, and the CPU without :mod:`adlib.kernels._lapack`: Cholesky factors of
    ``cov + eps I`` for ``(P, C, C)``, chunked over positions, in place; positions that are not
    positive definite get a tenfold jitter, up to ``jitter_tries`` times."""
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
    per position, in threads (where :func:`adlib.kernels.lapack_available`); otherwise torch's
    batched solve, chunked over positions so that the working set stays in budget. For a few test
    images either is bound by reading the factors (``P C^2`` numbers).
    """
    x = _positions_last(features, "features")                 # (B, C, P)
    b, c, p = x.shape
    if mean.shape != (p, c) or chol.shape != (p, c, c):
        raise ValueError(f"features are {c} channels x {p} positions, the Gaussians "
                         f"{tuple(mean.shape)} / {tuple(chol.shape)}")
    x = x.to(chol.device, chol.dtype)
    out = torch.empty(b, p, dtype=chol.dtype, device=chol.device)
    if (chol.device.type == "cpu" and chol.dtype in (torch.float32, torch.float64) and chol.is_contiguous()
            and c >= _LAPACK_SOLVE_MIN_CHANNELS and b > 0 and lapack_available()):
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
    solve = LowerTriangles(c, chol.dtype).solve(b)

    def work(p0: int, p1: int) -> None:
        diff = np.ascontiguousarray((x[:, :, p0:p1] - mean[p0:p1].T[None]).transpose(2, 1, 0))  # (p, C, B)
        for i, p in enumerate(range(p0, p1)):
            solve(chol[p].ctypes.data, diff[i].ctypes.data)
        np.sqrt(np.einsum("pcb,pcb->bp", diff, diff), out=out[:, p0:p1])
    in_threads(x.shape[2], chunk, work)
