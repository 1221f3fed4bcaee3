"""k-center greedy coreset subsampling of a memory bank (PatchCore): :func:`greedy_coreset`.

``features (N, D)`` -> indices ``(n,)`` int64 of the points that cover them, after a seeded
Johnson-Lindenstrauss projection to ``proj_dim`` dimensions (:func:`random_projection`,
``(N, D) -> (N, proj_dim)``). Exact: the same selection as :func:`plain_greedy_coreset`, the
textbook loop (every step reads every point) that tests and ``python -m adlib.bench`` compare
against, but each step takes the cheaper of two exact updates (:func:`greedy_projected`):
triangle-inequality pruning, or one dense matrix-vector product over the bank.

For banks too large for one greedy (its cost is ``n * N``, quadratic at a fixed ratio), see
:mod:`.chunked_coreset`: the same kernel within chunks, linear in ``N``, memory bounded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from ._runtime import check_matrix, exact_fp32, single_threaded_blas
from .neighbours import knn

#: A pruning step is taken when at most this fraction of the points pass its test; above it, the
#: dense step is cheaper (measured on 2 AMD EPYC cores, 214,016 x 128: a passing point costs a
#: gather of its row and a direct distance, ~2.4x the dense step's one read of the row).
DENSE_FRACTION = 0.3
#: After a pruning test that did not pay, the next ``wait`` steps are dense without testing; ``wait``
#: doubles up to this while the tests keep failing and drops back to 0 once one pays.
MAX_WAIT = 64
#: Bytes per point of the greedy's state beyond the projected bank (:class:`_GreedyState`: five
#: float32 and one int32 array, the mask, the gathered bounds and the candidate indices).
STATE_BYTES_PER_POINT = 40
#: The pruning test's centre distances are computed on the principal directions holding this
#: share of the bank's variance (a certified lower bound; see ``_GreedyState._principal_basis``).
PRUNE_VARIANCE = 0.97
#: Rows per block of :func:`random_projection`.
PROJECTION_ROWS = 8192
#: Rows per block of the direct distances: the ``(rows, d)`` buffer stays in the L2 cache.
_BLOCK_ROWS = 2048


def random_projection(features: Tensor, dim: int = 128, seed: int = 0) -> Tensor:
    """Johnson-Lindenstrauss projection ``(N, D) -> (N, dim)`` with a seeded Gaussian matrix; the
    identity (a float32 copy) when ``dim >= D``. Computed in blocks of :data:`PROJECTION_ROWS`
    rows, so a row's value does not depend on how the rows arrived (see :func:`project_blocks`)."""
    matrix = projection_matrix(features.shape[1], dim, seed)
    out_dim = features.shape[1] if matrix is None else matrix.shape[1]
    out = torch.empty(features.shape[0], out_dim, dtype=torch.float32, device=features.device)
    project_blocks(lambda a, b: features[a:b], features.shape[0], matrix, out)
    return out


def project_blocks(rows: Callable[[int, int], Tensor], n_rows: int, matrix: Tensor | None, out: Tensor) -> None:
    """``out[a:b] = rows(a, b) @ matrix`` (float32) for consecutive blocks of :data:`PROJECTION_ROWS`:
    ``(n_rows, D) -> out (n_rows, dim)`` with no ``(n_rows, D)`` float32 copy; ``matrix`` None
    copies the rows."""
    for a in range(0, n_rows, PROJECTION_ROWS):
        b = min(a + PROJECTION_ROWS, n_rows)
        block = rows(a, b).float()
        if matrix is None:
            out[a:b] = block
        else:
            torch.mm(block, matrix.to(block.device), out=out[a:b])


def projection_matrix(n_features: int, dim: int = 128, seed: int = 0) -> Tensor | None:
    """The seeded ``(n_features, dim)`` matrix of :func:`random_projection`; None for the identity."""
    if dim <= 0 or dim >= n_features:
        return None
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n_features, dim, generator=generator) / math.sqrt(dim)


def coreset_size(n_points: int, ratio: float | None, n: int | None) -> int:
    if (ratio is None) == (n is None):
        raise ValueError("give exactly one of ratio (0 < ratio <= 1) or n (1 <= n <= N)")
    if ratio is not None:
        if not 0 < ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {ratio}")
        return max(1, int(round(n_points * ratio)))
    if not 1 <= n <= n_points:
        raise ValueError(f"n must be in [1, {n_points}], got {n}")
    return int(n)


def seeded_start(n_points: int, seed: int) -> int:
    return int(torch.randint(n_points, (1,), generator=torch.Generator().manual_seed(seed)))


def greedy_coreset(features: Tensor, ratio: float | None = None, n: int | None = None, proj_dim: int = 128,
                   seed: int = 0, start: int | None = None, progress: bool = False) -> Tensor:
    """k-center greedy coreset (PatchCore): indices ``(n,)`` of points that cover ``features (N, D)``.

    Each step adds the point farthest from the coreset so far. ``features`` are first projected
    to ``proj_dim`` dimensions (seeded) as in PatchCore; ``start`` (default: a seeded random
    index) is the first centre. Exact: the same selection as the plain algorithm
    (:func:`plain_greedy_coreset`) given the same projection and start; see
    :func:`greedy_projected` for how a step is made cheap.
    """
    check_matrix("features", features)
    size = coreset_size(features.shape[0], ratio, n)
    with torch.no_grad():
        x = random_projection(features, proj_dim, seed).contiguous()
        if start is None:
            start = seeded_start(x.shape[0], seed)
        return greedy_projected(x, size, start, progress=progress).selected


def covering_radius(features: Tensor, chosen: Tensor) -> float:
    """The largest distance of any of ``features (N, D)`` to its nearest selected row
    ``features[chosen]`` (``chosen (K,)`` indices): how far the coreset leaves a bank point (exact
    k-NN over all ``N``, memory bounded)."""
    return float(knn(features, features[chosen])[0].max())


@dataclass
class GreedyResult:
    """What :func:`greedy_projected` returns: ``selected (n,)`` int64 in selection order;
    ``radii (n,)``: the distance of each selected point to the points selected before it when it
    was selected (non-increasing; ``inf`` for the first); ``radius``: the covering radius of all
    ``N`` points by the selection (in the space the greedy ran in); how many steps took each
    update (``pruned + dense = n - 1``); ``prune_dim``: the dimension of the pruning test's
    centre distances (``d`` without a principal basis)."""

    selected: Tensor
    radii: Tensor
    radius: float
    pruned: int
    dense: int
    prune_dim: int


def greedy_projected(x: Tensor, size: int, start: int, progress: bool = False) -> GreedyResult:
    """The exact k-center greedy on ``x (N, d)`` (float32 or float64, any device): ``size`` steps
    from ``start``, the same selection as the plain loop on ``x``.

    A step picks ``z = argmax dist`` (``dist(x)``: distance to the nearest centre ``c(x)``), then
    must lower ``dist`` where ``|x - z| < dist(x)``. Two exact ways, the cheaper one per step:

    - **pruning**: ``z`` can be nearer to ``x`` only if ``|c(x) - z| < 2 dist(x)`` (triangle
      inequality). A lower bound of ``|c - z|`` for all centres is one small product (on the
      bank's principal directions, a fraction of ``d``), the test one gather and one comparison
      per point (~20 bytes); only passing points get a direct distance. It pays while few points
      pass, i.e. when the points cluster.
    - **dense**: ``|x - z|^2`` for every point from one matrix-vector product over the contiguous
      ``(N, d)`` bank (its only read, at memory bandwidth, no ``(N, d)`` temporary) with
      precomputed squared norms; only points whose approximate distance is below ``dist`` plus a
      certified rounding bound get a direct distance (almost only the points that move).

    The rule: a pruning test whose passing fraction exceeds :data:`DENSE_FRACTION` switches to
    dense steps; pruning is re-tried after 1, 2, 4, ... :data:`MAX_WAIT` dense steps (distances
    shrink as the coreset grows, so it may start paying later). Exactness: every distance that
    enters ``dist`` is the direct ``sqrt(sum((x - z)^2))`` of the plain loop, bit for bit, and both
    tests only skip points whose direct distance provably cannot be smaller (the bounds include the
    float rounding of the norm expansions, which are centred on the bank mean to keep them small).

    Off the CPU (CUDA, MPS) both ways are replaced by :func:`greedy_dense_on_device`: the pruning
    test reads counts and index lists back to the host every step, and on an H200 that made chapter
    03's 25% coreset slower than on the CPU; the all-dense steps queue without a synchronisation
    (their GPU time is not measured yet: no GPU was lent when this was written).
    """
    if x.device.type != "cpu":
        with torch.no_grad(), exact_fp32():
            return greedy_dense_on_device(x.contiguous(), size, start, progress)
    # One thread for torch and the BLAS: a step is many small operations and one memory-bound
    # product; a parallel region per operation costs more than it saves (measured 4x slower with 2
    # threads on a loaded 2-core machine, where a region waits for a busy core).
    with torch.no_grad(), exact_fp32(), single_threaded_blas(torch_threads=1):
        state = _GreedyState(x.contiguous(), size, start)
        iterator = range(1, size)
        if progress:
            from tqdm import tqdm
            iterator = tqdm(iterator, desc="coreset", leave=False)
        for step in iterator:
            state.step(step)
        radius = float(state.dist.max()) if x.shape[0] else 0.0
        return GreedyResult(state.selected, state.radii, radius, state.n_pruned, state.n_dense,
                            state.centres.shape[1])


def greedy_dense_on_device(x: Tensor, size: int, start: int, progress: bool = False) -> GreedyResult:
    """The exact greedy as a GPU wants it: every step dense (the plain loop's own update,
    ``min(dist, |x - z|)`` over all ``N`` points of ``x (N, d)``), and nothing read back to the host
    until the end: the chosen index stays a device tensor, so the steps queue up without a
    synchronisation each (the pruning path's per-step counts and index lists would force one per
    step, which costs more than a dense step on a GPU). The same selection as
    :func:`plain_greedy_coreset` on the same device. Used by :func:`greedy_projected` off the CPU.
    Memory: one ``(N, d)`` temporary per step on the device, beyond what the coreset memory budget
    (:func:`.chunked_coreset.point_bytes`, host memory) counts."""
    n_points = x.shape[0]
    selected = torch.empty(size, dtype=torch.long, device=x.device)
    radii = torch.empty(size, dtype=x.dtype, device=x.device)
    new = torch.full((1,), start, dtype=torch.long, device=x.device)
    selected[0] = start
    radii[0] = math.inf
    dist = (x - x.index_select(0, new)).pow_(2).sum(1).sqrt_()
    iterator = range(1, size)
    if progress:
        from tqdm import tqdm
        iterator = tqdm(iterator, desc="coreset", leave=False)
    for step in iterator:
        new = torch.argmax(dist).view(1)                 # first index of the maximum, on the device
        selected[step:step + 1] = new
        radii[step:step + 1] = dist.index_select(0, new)
        torch.minimum(dist, (x - x.index_select(0, new)).pow_(2).sum(1).sqrt_(), out=dist)
    radius = float(dist.max()) if n_points else 0.0
    return GreedyResult(selected, radii.cpu().double(), radius, 0, size - 1, x.shape[1])


class _GreedyState:
    """The per-point state of :func:`greedy_projected`, ``N`` points of dimension ``d``.

    ``dist (N,)``: direct distance to the nearest centre; ``nearest (N,)`` int32: its slot;
    ``limit (N,)``: ``2 dist (1 + 2 eps)``, the pruning bound; ``cn (N,)``: ``|x - mu|^2``;
    ``slack (N,)``: ``cn - dist^2``; ``centres (n, m)``: centres minus ``mu`` on the principal
    basis (``m <= d``). At most :data:`STATE_BYTES_PER_POINT` bytes per point beyond the ``4 d`` of
    the bank. On the CPU the small and 1-D operations run on NumPy views of the same memory (no
    parallel regions, no allocation per index, microseconds instead of tens of them).
    """

    def __init__(self, x: Tensor, size: int, start: int):
        self.x = x
        n_points, dim = x.shape
        unit = 2.0 ** -24 if x.dtype == torch.float32 else 2.0 ** -53
        self.eps = (dim + 8) * unit          # bounds the relative rounding of a d-term sum
        self.mu = x.mean(0, dtype=torch.float64).to(x.dtype)
        self.block = torch.empty(min(_BLOCK_ROWS, n_points), dim, dtype=x.dtype, device=x.device)
        self.cn, max_sq = self._norms()
        self.c_max = float(self.cn.max()) * (1 + self.eps)
        self.x_max = math.sqrt(max_sq * (1 + self.eps))
        self.mu_norm = float(self.mu.norm())
        self.selected = torch.empty(size, dtype=torch.long, device=x.device)
        self.radii = torch.full((size,), math.inf, dtype=torch.float64)
        self.radii_view = self.radii.numpy()
        self.basis = self._principal_basis()
        basis_dim = dim if self.basis is None else self.basis.shape[1]
        self.basis_slack = 2 * math.sqrt(basis_dim * self.c_max) * self.eps   # rounding of a rotated |c - z|
        self.centres = torch.empty(size, basis_dim, dtype=x.dtype, device=x.device)
        self.centre_sq = torch.empty(size, dtype=x.dtype, device=x.device)
        self.nearest = torch.zeros(n_points, dtype=torch.int32, device=x.device)
        self.dist = self._direct_distances(None, x[start])
        self.limit = self.dist * (2 * (1 + 2 * self.eps))
        self.slack = self.cn - self.dist * self.dist
        self.buffer = torch.empty(n_points, dtype=x.dtype, device=x.device)
        self.arrays = [_native(t) for t in (self.dist, self.limit, self.slack, self.cn, self.nearest)]
        self.native = {name: None if t is None else _native(t) for name, t in
                       (("x", x), ("mu", self.mu), ("basis", self.basis), ("selected", self.selected),
                        ("centres", self.centres), ("centre_sq", self.centre_sq), ("nearest", self.nearest),
                        ("limit", self.limit))}
        self._add_centre(0, start)
        self.wait = self.skip = 0
        self.n_pruned = self.n_dense = 0

    def _norms(self) -> tuple[Tensor, float]:
        """``|x - mu|^2 (N,)`` and ``max |x|^2``, block by block (no ``(N, d)`` temporary)."""
        cn = torch.empty(self.x.shape[0], dtype=self.x.dtype, device=self.x.device)
        max_sq = 0.0
        for i in range(0, self.x.shape[0], _BLOCK_ROWS):
            rows = self.x[i:i + _BLOCK_ROWS]
            block = self.block[: rows.shape[0]]
            torch.sub(rows, self.mu, out=block)
            torch.sum(block.pow_(2), 1, out=cn[i:i + _BLOCK_ROWS])
            max_sq = max(max_sq, float(torch.mul(rows, rows, out=block).sum(1).max()))
        return cn, max_sq

    def _direct_distances(self, index: Tensor | None, z: Tensor) -> Tensor:
        """Direct ``|x[index] - z|`` (all rows when ``index`` is None), the plain loop's values bit
        for bit, block by block through one cached ``(rows, d)`` buffer."""
        n = self.x.shape[0] if index is None else index.numel()
        out = torch.empty(n, dtype=self.x.dtype, device=self.x.device)
        for i in range(0, n, _BLOCK_ROWS):
            j = min(i + _BLOCK_ROWS, n)
            block = self.block[: j - i]
            if index is None:
                block.copy_(self.x[i:j])
            else:
                torch.index_select(self.x, 0, index[i:j], out=block)
            torch.sum(block.sub_(z).pow_(2), 1, out=out[i:j])
        return out.sqrt_()

    def _principal_basis(self) -> Tensor | None:
        """``(d, m)``: the top principal directions of the bank holding :data:`PRUNE_VARIANCE` of
        its variance, or None when that needs most of the ``d`` dimensions. ``|B^T (c - z)|`` is a
        lower bound of ``|c - z|`` (``B`` orthonormal), ``m / d`` of its cost: the pruning test's
        centre-to-centre distances, which cost more than the test itself late in the greedy, are
        computed in ``m`` dimensions (real patch features: ``m`` = 32 of 128 keep 97.5%)."""
        n, dim = self.x.shape
        cov = torch.zeros(dim, dim, dtype=torch.float64, device=self.x.device)
        for i in range(0, n, _BLOCK_ROWS):
            block = self.block[: min(_BLOCK_ROWS, n - i)]
            torch.sub(self.x[i:i + _BLOCK_ROWS], self.mu, out=block)
            cov += (block.T @ block).double()
        values, vectors = torch.linalg.eigh(cov)
        share = values.flip(0).clamp_min(0).cumsum(0) / values.clamp_min(0).sum().clamp_min(1e-300)
        m = int((share < PRUNE_VARIANCE).sum()) + 1
        m = min(dim, -(-m // 8) * 8)
        if m > 0.75 * dim:
            return None
        return vectors.flip(1)[:, :m].to(self.x.dtype).contiguous()

    def _add_centre(self, step: int, index: int) -> tuple[Tensor, float]:
        """Record centre ``step`` = point ``index`` (rotated onto the basis for the pruning test);
        returns ``w = z - mu`` and ``|w|^2``. (NumPy views on the CPU: a step's small operations
        cost microseconds there, tens of microseconds through torch.)"""
        x, mu, basis = self.native["x"], self.native["mu"], self.native["basis"]
        w = x[index] - mu
        rotated = w if basis is None else w @ basis
        self.native["selected"][step] = index
        self.native["centres"][step] = rotated
        self.native["centre_sq"][step] = float(rotated @ rotated)
        return _as_tensor(w), float(w @ w)

    def step(self, step: int) -> None:
        new = _argmax(self.dist)
        radius = float(self.arrays[0][new])
        self.radii_view[step] = radius
        w, w_sq = self._add_centre(step, new)
        candidates = None
        if self.skip > 0:
            self.skip -= 1
        else:
            candidates = self._pruning_candidates(step)
            if candidates is None:              # too many pass: dense for the next `wait` steps
                self.wait = min(max(1, 2 * self.wait), MAX_WAIT)
                self.skip = self.wait
            else:
                self.wait = 0
        if candidates is None:
            candidates = self._dense_candidates(w, w_sq, radius)
            self.n_dense += 1
        else:
            self.n_pruned += 1
        self._update(candidates, self.x[new], step)

    def _pruning_candidates(self, step: int) -> Tensor | None:
        """Points that pass ``|c(x) - z| < limit(x)``, or None when more than
        :data:`DENSE_FRACTION` of them pass. ``|c - z|`` is a lower bound: the norm expansion of
        ``|B^T (c - z)|`` (all of ``|c - z|`` without a basis) minus the rounding of the expansion
        and of the rotation, divided by ``B``'s largest singular value (1 up to float rounding)."""
        centres, centre_sq = self.native["centres"], self.native["centre_sq"]
        rotated, r_sq = centres[step], float(centre_sq[step])
        bound = 4 * self.eps * (self.c_max + r_sq + 2 * math.sqrt(self.c_max * r_sq))
        cz_low = (centre_sq[:step] - 2 * (centres[:step] @ rotated) + (r_sq - bound)).clip(min=0) ** 0.5
        if self.basis is not None:
            cz_low = (cz_low - self.basis_slack) * (1 - 1e-4)
        passing = _take(cz_low, self.native["nearest"]) < self.native["limit"]
        if _count(passing) > DENSE_FRACTION * passing.shape[0]:
            return None
        return _nonzero(passing)

    def _dense_candidates(self, w: Tensor, w_sq: float, radius: float) -> Tensor:
        """Points whose distance to ``z`` may be below ``dist``: with ``w = z - mu``,
        ``|x - z|^2 = cn + |w|^2 + 2 mu.w - 2 x.w``, so the test is
        ``slack - 2 x.w < bound - |w|^2 - 2 mu.w`` (one matrix-vector product; ``bound`` covers
        the rounding of every term, ``dist <= radius``)."""
        w_norm = math.sqrt(w_sq)
        bound = 8 * self.eps * (self.c_max + radius * radius + w_sq + 2 * (self.x_max + self.mu_norm) * w_norm)
        threshold = bound - w_sq - 2 * float(self.mu.dot(w))
        _addmv(self.slack, self.x, w, -2.0, out=self.buffer)
        return _nonzero(self.buffer < threshold)

    def _update(self, candidates: Tensor, z: Tensor, step: int) -> None:
        """Direct distances of the candidates to ``z``; ``dist`` (and the rest) where smaller."""
        if candidates.numel() == 0:
            return
        d_new = _native(self._direct_distances(candidates, z))
        dist, limit, slack, cn, nearest = self.arrays
        index = _native(candidates)
        closer = d_new < dist[index]
        moved, d_moved = index[closer], d_new[closer]
        dist[moved] = d_moved
        limit[moved] = d_moved * (2 * (1 + 2 * self.eps))
        slack[moved] = cn[moved] - d_moved * d_moved
        nearest[moved] = step


def _native(t: Tensor):
    """A CPU tensor as a NumPy view of its memory (cheap 1-D indexing); other devices unchanged."""
    return t.numpy() if t.device.type == "cpu" else t


def _as_tensor(a) -> Tensor:
    return torch.from_numpy(a) if isinstance(a, np.ndarray) else a


def _argmax(values: Tensor) -> int:
    """First index of the maximum; NumPy on the CPU, where it is ~10x faster on 1-D arrays."""
    return int(np.argmax(values.numpy())) if values.device.type == "cpu" else int(torch.argmax(values))


def _take(values, index):
    """``values[index]`` for 1-D arrays (NumPy's take on the CPU, ~3x faster than torch's gather)."""
    return np.take(values, index) if isinstance(values, np.ndarray) else values[index]


def _count(mask) -> int:
    return int(np.count_nonzero(mask)) if isinstance(mask, np.ndarray) else int(mask.sum())


def _nonzero(mask) -> Tensor:
    """Indices of the true entries of a 1-D mask (NumPy array or tensor), as a tensor."""
    if isinstance(mask, np.ndarray):
        return torch.from_numpy(np.flatnonzero(mask))
    if mask.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(mask.numpy()))
    return torch.nonzero(mask).squeeze(1)


def _addmv(vector: Tensor, matrix: Tensor, w: Tensor, alpha: float, out: Tensor) -> Tensor:
    """``out = vector + alpha * matrix @ w``; on the CPU NumPy's single-threaded BLAS (its gemv
    reads the matrix at memory bandwidth, measured 1.5-2x faster than torch's here)."""
    if matrix.device.type != "cpu":
        return torch.addmv(vector, matrix, w, alpha=alpha, out=out)
    o = out.numpy()
    np.dot(matrix.numpy(), w.numpy(), out=o)
    o *= alpha
    o += vector.numpy()
    return out


def plain_greedy_coreset(features: Tensor, size: int, proj_dim: int = 128, seed: int = 0,
                         start: int | None = None) -> Tensor:
    """The plain k-center greedy loop, for tests and the benchmark's "plain greedy loop" row: every
    step reads every point. Indices ``(size,)``; :func:`greedy_coreset` selects the same ones."""
    x = random_projection(features, proj_dim, seed)
    if start is None:
        start = seeded_start(x.shape[0], seed)
    selected = [start]
    dist = (x - x[start]).pow(2).sum(1).sqrt()
    for _ in range(1, size):
        new = int(torch.argmax(dist))
        selected.append(new)
        dist = torch.minimum(dist, (x - x[new]).pow(2).sum(1).sqrt())
    return torch.tensor(selected)
