"""A k-center greedy coreset whose cost is linear in the bank and whose memory is bounded.

The exact greedy (:func:`.coreset.greedy_projected`) selecting ``K = ratio * N`` of ``N`` points
costs up to ``K * N`` distances: quadratic in the number of training images at PatchCore's fixed
ratio (600 images at 256 px = 614,400 patches: hours on a 2-core CPU). Here (:class:`CoresetStream`,
:func:`chunked_greedy_coreset`) the bank is cut, as it streams in, into chunks of ``c``
consecutive rows (:data:`DEFAULT_CHUNK_POINTS`, fewer under a small memory budget). Each chunk
runs the exact greedy for ``oversample`` times its share ``ratio * c`` (:func:`reduce_chunk`),
recording the radius at which each point was selected; only those rows are kept. Then:

- ``second_round=False`` (the default): the ``K`` points with the largest selection radii over all
  chunks are kept (:func:`merge_by_radius`). A chunk's radii are non-increasing, so this cuts every
  chunk's greedy order at one common radius ``tau``: a chunk with rarer content keeps more than its
  share, a redundant one fewer. Cost ``oversample * ratio * c * N`` distances: linear in ``N``.
- ``second_round=True``: the exact greedy over the union of the chunks' selections picks the ``K``
  (the two rounds of Malkomes et al., "Fast Distributed k-Center Clustering with Outliers on
  Massive Data", NeurIPS 2015). It adds up to ``K * oversample * K`` distances: quadratic in ``N``
  again at a fixed ratio (measured on bottle, 32,768-row chunks, oversample 2: the second round
  took longer than the first, and the radius was larger than the default merge's).

Guarantees, stated for what ships. Malkomes et al. prove a constant factor (4) of the optimal
``K``-centre radius when *every part selects* ``K`` centres and a second greedy runs over the
union; neither variant here has it, because each chunk selects only (``oversample`` times) its
share (selecting ``K`` per chunk would make the first round quadratic too): an
adversary can put more distinct patches into one chunk than its share covers, and the radius is
then unbounded relative to the optimum (measured: 8,000 points in 300 tight clusters, ratio 10%,
2,000-row chunks, so 200 centres a chunk: 3.7x the exact greedy's radius). What the default
does guarantee: each chunk's kept prefix is a greedy prefix, so it is within a factor 2 of the best
covering of that chunk by that many of its points, and every bank point lies within
:attr:`CoresetStream.radius_bound` (in the projected space) of the selection. The ratio to the
exact greedy's radius grows slowly with the number of chunks (no fixed chunk size bounds it for
every ``N``). Measured with the defaults (ratio 0.1, 2 busy CPU cores), covering radius over all
bank points, chunked / exact: MVTec AD bottle, 214,016 patches: 1.106 in the projected space,
1.043 in the original feature space (16.9 s vs 16.6 s: the exact greedy prunes well there); 600
images made from bottle's by flips and rotations, 614,400 patches: 1.104 and 1.059 (30 s vs
287 s). ``python -m adlib.bench --only coreset`` measures it on synthetic banks.

Threads: the chunks that are full are reduced together, one thread each (torch and NumPy release
the GIL in their operations, each thread runs single-threaded), while the caller waits, so the
backbone and the greedy do not compete for the cores. A chunk's selection depends only on its rows
and its seeded start, so the result is the same with any number of threads.

Several GPUs or machines (torch.distributed; not implemented here): rank ``r`` of ``world`` reduces
the chunks ``i`` with ``i % world == r`` with :func:`reduce_chunk` (the start of chunk ``i`` is
``chunk_start(n_rows, seed, i)``, so ranks agree), ``all_gather_object`` brings every rank's
:class:`ChunkCoreset` s (global offset, radii, kept rows) to all, and rank 0 runs
:func:`merge_by_radius` (or the second round) and broadcasts the selected rows: the same selection
as one process computes.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor

from ._runtime import check_matrix, single_threaded_blas
from .coreset import (STATE_BYTES_PER_POINT, coreset_size, seeded_start, greedy_projected, project_blocks,
                      projection_matrix)

__all__ = ["CoresetStream", "chunked_greedy_coreset", "reduce_chunk", "merge_by_radius", "ChunkCoreset",
           "MemoryBudgetError", "exact_bytes", "DEFAULT_CHUNK_POINTS", "DEFAULT_OVERSAMPLE", "AUTO_EXACT_POINTS"]

#: Rows per chunk: 64 images at 256 px (1,024 patches each). The chunked radius grows with the
#: number of chunks; measured on 600 bottle-derived images (614,400 patches, ratio 0.1, projected
#: space): 32,768-row chunks 1.154x the exact greedy's radius, 65,536 1.104x, 131,072 at most
#: 1.062x, at 46 s, 69 s and 105 s on 2 busy CPU cores (the cost is linear in it).
DEFAULT_CHUNK_POINTS = 65536
#: Each chunk selects this times its share, then :func:`merge_by_radius` keeps ``K`` in all.
DEFAULT_OVERSAMPLE = 1.5
#: ``scheme="auto"``: the exact greedy up to this many bank points (256 images at 256 px), chunked
#: beyond. Measured on 2 busy CPU cores at ratio 0.1: the exact greedy takes 17 s on bottle's
#: 214,016 patches, 287 s on 614,400 (it grows with the square of the bank; on unclustered features
#: every step is dense: ~5 min at this size); the chunked one grows linearly.
AUTO_EXACT_POINTS = 262144
#: Fraction of the budget the chunks being reduced may use (the rest: the kept rows, the caller).
_WORKING_SHARE = 0.4
SCHEMES = ("auto", "exact", "chunked")


class MemoryBudgetError(ValueError):
    """The coreset cannot be computed within the memory budget; the message says what would be needed."""


def _mb(n_bytes: float) -> str:
    mb = n_bytes / 2**20
    return f"{mb:,.0f} MB" if mb >= 10 else f"{mb:.2g} MB"


def point_bytes(dim: int, proj_dim: int) -> int:
    """Bytes per bank point while its greedy runs: the row, its projection, the greedy's state."""
    p = dim if proj_dim <= 0 or proj_dim >= dim else proj_dim
    return 4 * dim + 4 * p + STATE_BYTES_PER_POINT


def exact_bytes(n_points: int, dim: int, proj_dim: int, size: int) -> int:
    """Peak bytes of the exact scheme on ``n_points`` rows selecting ``size``: bank + projection +
    state + the selected rows."""
    return n_points * point_bytes(dim, proj_dim) + 4 * dim * size


def chunk_start(n_rows: int, seed: int, index: int) -> int:
    """The seeded first centre of chunk ``index`` (``n_rows`` rows): the same on every rank."""
    return seeded_start(n_rows, seed * 1_000_003 + index)


@dataclass
class ChunkCoreset:
    """One chunk's greedy selection. ``offset``: global row of the chunk's first point;
    ``selected (k,)`` int64 chunk-local, in greedy order; ``radii (k,)`` float64 non-increasing
    (``inf`` first); ``rows (k, D)``: the selected rows; ``projected (k, p)`` or None: their
    projections (kept for the second round only); ``radius``: covering radius of the chunk by all ``k``."""

    offset: int
    selected: Tensor
    radii: Tensor
    rows: Tensor
    projected: Tensor | None
    radius: float


def reduce_chunk(rows: Tensor, k: int, matrix: Tensor | None, start: int, offset: int = 0,
                 keep_projected: bool = False) -> ChunkCoreset:
    """The exact greedy on one chunk ``rows (n, D)``: ``k`` points from ``start``, after the
    projection ``matrix (D, p)`` (None: none)."""
    p = rows.shape[1] if matrix is None else matrix.shape[1]
    x = torch.empty(rows.shape[0], p, dtype=torch.float32, device=rows.device)
    project_blocks(lambda a, b: rows[a:b], rows.shape[0], matrix, x)
    result = greedy_projected(x, k, start)
    chosen = result.selected
    return ChunkCoreset(offset, chosen, result.radii, rows[chosen], x[chosen] if keep_projected else None,
                        result.radius)


def merge_by_radius(chunks: list[ChunkCoreset], size: int) -> list[int]:
    """How many of each chunk's points to keep: the ``size`` largest selection radii over all
    chunks (ties: earlier chunks first), which is a prefix of every chunk's greedy order."""
    radii = torch.cat([c.radii for c in chunks])
    owner = torch.cat([torch.full((c.radii.numel(),), i, dtype=torch.long) for i, c in enumerate(chunks)])
    top = torch.sort(radii, descending=True, stable=True).indices[:size]
    return torch.bincount(owner[top], minlength=len(chunks)).tolist()


class CoresetStream:
    """Bank rows in, coreset rows out: ``add(rows (B, D))`` as features are computed, then
    ``finish() -> (K, D)`` with ``K = max(1, round(ratio * N))`` (all ``N`` rows when ``ratio`` is 1).

    ``scheme``: ``"exact"`` holds the whole bank and runs the exact greedy on it
    (:func:`.coreset.greedy_coreset`'s selection); a bank that would not fit ``budget_mb`` raises
    :class:`MemoryBudgetError` as soon as it is known. ``"chunked"`` reduces chunks as they fill
    (see the module docstring): memory bounded by ``budget_mb`` whatever ``N``. ``"auto"``: exact
    while the bank has at most ``auto_points`` rows and fits the budget, else chunked (the rows held
    so far are chunked then). The budget covers the rows held, their projections, the greedy's state
    and the kept rows, not the caller's own tensors. After ``finish``: ``indices (K,)`` (global
    rows), ``scheme_used``, ``radius_bound`` (chunked: the projected-space bound, else None) and
    ``max_rows_held`` (the most bank rows held at once, in pieces and chunks).
    """

    def __init__(self, ratio: float, scheme: str = "auto", *, proj_dim: int = 128, seed: int = 0,
                 budget_mb: float = math.inf, chunk_points: int = DEFAULT_CHUNK_POINTS,
                 oversample: float = DEFAULT_OVERSAMPLE, second_round: bool = False,
                 auto_points: int | None = None, threads: int | None = None, progress: bool = False):
        if scheme not in SCHEMES:
            raise ValueError(f"coreset scheme must be one of {SCHEMES}, got {scheme!r}")
        if not 0 < ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {ratio}")
        if not budget_mb > 0:
            raise ValueError(f"the memory budget must be positive (MB), got {budget_mb}")
        if chunk_points < 1 or oversample < 1:
            raise ValueError(f"chunk_points must be >= 1 and oversample >= 1, got {chunk_points}, {oversample}")
        self.ratio, self.scheme, self.proj_dim, self.seed = ratio, scheme, proj_dim, seed
        self.budget = budget_mb * 2**20
        self.chunk_points, self.oversample, self.second_round = chunk_points, oversample, second_round
        self.auto_points = AUTO_EXACT_POINTS if auto_points is None else auto_points
        self.progress = progress
        self.threads = max(1, threads if threads is not None else torch.get_num_threads())
        self.mode = "chunked" if scheme == "chunked" and ratio < 1 else "exact"
        self.n_points = 0
        self.expected = 0
        self.dim: int | None = None
        self.pieces: list[Tensor] = []                # exact: the bank as it came
        self.ready: list[tuple[int, Tensor]] = []     # chunked: full chunks waiting (offset, rows)
        self.fill: Tensor | None = None               # chunked: the chunk being filled
        self.fill_rows = 0
        self.chunks: list[ChunkCoreset] = []
        self.kept_bytes = 0
        self.chunk_rows = 0
        self.max_rows_held = 0
        self.matrix: Tensor | None = None
        self.pool: ThreadPoolExecutor | None = None
        self.indices: Tensor | None = None
        self.scheme_used: str | None = None
        self.radius_bound: float | None = None
        self._bar = None

    # -- input --------------------------------------------------------------------------------

    def expect(self, n_points: int) -> None:
        """An estimate of the bank's final size (e.g. from the number of batches): ``"auto"`` goes
        chunked at once when it is above ``auto_points`` or would not fit the budget exactly, rather
        than holding rows that will be chunked anyway. Only ``"auto"`` uses it: an estimate cannot
        make ``"exact"`` fail."""
        self.expected = max(self.expected, n_points)
        if self.dim is not None:
            self._maybe_switch()

    def add(self, rows: Tensor) -> None:
        """Append bank rows ``(B, D)``."""
        check_matrix("rows", rows)
        if self.dim is None:
            self.dim = rows.shape[1]
            self.matrix = projection_matrix(self.dim, self.proj_dim, self.seed)
        elif rows.shape[1] != self.dim:
            raise ValueError(f"rows have {rows.shape[1]} features, earlier rows {self.dim}")
        rows = rows.detach()
        if self.mode == "chunked":
            self._add_chunked(rows)
        else:
            self._add_exact(rows)
        self._note_held()

    def _note_held(self) -> None:
        held = sum(p.shape[0] for p in self.pieces) + sum(r.shape[0] for _, r in self.ready)
        self.max_rows_held = max(self.max_rows_held, held + (self.fill_rows if self.fill is not None else 0))

    def _add_exact(self, rows: Tensor) -> None:
        self.pieces.append(rows)
        self.n_points += rows.shape[0]
        if self.ratio >= 1 and 8 * self.dim * self.n_points > self.budget:
            raise MemoryBudgetError(f"coreset ratio 1 keeps the whole bank: {self.n_points:,} rows of {self.dim} "
                                    f"values (so far) need about {_mb(8 * self.dim * self.n_points)}, "
                                    f"over the memory budget of {_mb(self.budget)}; use a coreset ratio "
                                    f"below 1 or a larger budget (memory_mb, --memory-mb or ADLIB_MEMORY_MB)")
        if self.scheme == "exact" and self.ratio < 1 and self._exact_bytes(self.n_points) > self.budget:
            raise MemoryBudgetError(self._exact_message(self.n_points))
        self._maybe_switch()

    def _maybe_switch(self) -> None:
        """``"auto"``: chunked once the bank (or its estimate) is too large for the exact greedy."""
        if self.scheme != "auto" or self.mode != "exact" or self.ratio >= 1:
            return
        n = max(self.n_points, self.expected)
        if n > self.auto_points or self._exact_bytes(n) > self.budget:
            self._go_chunked()

    def _exact_bytes(self, n_points: int) -> int:
        return exact_bytes(n_points, self.dim, self.proj_dim, coreset_size(n_points, self.ratio, None))

    def _exact_message(self, n_points: int) -> str:
        need = self._exact_bytes(n_points)
        return (f"coreset=exact holds the whole memory bank: {n_points:,} patch features of {self.dim} values "
                f"(so far) need about {_mb(need)} with their projection and the greedy's state, over "
                f"the memory budget of {_mb(self.budget)}; use coreset=chunked (memory bounded by "
                f"the budget) or a larger budget (memory_mb, --memory-mb or ADLIB_MEMORY_MB)")

    def _go_chunked(self) -> None:
        """Switch to chunks; the rows held so far are chunked, each freed once copied."""
        self.mode = "chunked"
        self.n_points = 0
        while self.pieces:
            self._add_chunked(self.pieces.pop(0))

    def _add_chunked(self, rows: Tensor) -> None:
        if self.chunk_rows == 0:
            self.chunk_rows = self._chunk_rows()
        pos = 0
        while pos < rows.shape[0]:
            if self.fill is None:
                self.fill = torch.empty(self.chunk_rows, self.dim, dtype=rows.dtype, device=rows.device)
                self.fill_rows = 0
            take = min(self.chunk_rows - self.fill_rows, rows.shape[0] - pos)
            self.fill[self.fill_rows:self.fill_rows + take] = rows[pos:pos + take]
            self.fill_rows += take
            self.n_points += take
            pos += take
            if self.fill_rows == self.chunk_rows:
                self.ready.append((self.n_points - self.chunk_rows, self.fill))
                self.fill = None
                if len(self.ready) >= self.threads:
                    self._reduce_ready()

    def _chunk_rows(self) -> int:
        """``chunk_points``, or fewer so that ``threads`` chunks being reduced fit the budget's
        working share."""
        fit = _WORKING_SHARE * self.budget / (self.threads * point_bytes(self.dim, self.proj_dim))
        if fit < 16:
            raise MemoryBudgetError(f"a memory budget of {_mb(self.budget)} cannot hold even 16 bank "
                                    f"points per chunk ({point_bytes(self.dim, self.proj_dim)} bytes each, "
                                    f"{self.threads} threads); raise it (memory_mb, --memory-mb or ADLIB_MEMORY_MB)")
        return int(min(self.chunk_points, fit))

    # -- reduction ----------------------------------------------------------------------------

    def _share(self, end: int) -> int:
        """The coreset size of the first ``end`` rows: chunk shares sum to ``K`` exactly."""
        return 0 if end == 0 else coreset_size(end, self.ratio, None)

    def _reduce_ready(self) -> None:
        """Reduce the waiting chunks, one thread each; keep their selections."""
        self._note_held()
        jobs = []
        for offset, rows in self.ready:
            n = rows.shape[0]
            share = self._share(offset + n) - self._share(offset)
            k = min(n, max(1, math.ceil(self.oversample * share)))
            jobs.append((rows, k, self.matrix, chunk_start(n, self.seed, len(self.chunks) + len(jobs)), offset,
                         self.second_round))
        self.ready = []
        if len(jobs) == 1 or self.threads == 1:
            results = [reduce_chunk(*job) for job in jobs]
        else:
            if self.pool is None:
                self.pool = ThreadPoolExecutor(self.threads, initializer=torch.set_num_threads, initargs=(1,))
            with single_threaded_blas():   # each thread sets its torch threads to 1
                results = list(self.pool.map(lambda job: reduce_chunk(*job), jobs))
        for result in results:
            self._keep(result)

    def _keep(self, chunk: ChunkCoreset) -> None:
        self.chunks.append(chunk)
        self.kept_bytes += chunk.rows.numel() * chunk.rows.element_size() + 16 * chunk.selected.numel()
        if chunk.projected is not None:
            self.kept_bytes += chunk.projected.numel() * 4
        need = self.kept_bytes + 4 * self.dim * self._share(self.n_points)   # + the final (K, D) copy
        if need > (1 - _WORKING_SHARE) * self.budget:
            raise MemoryBudgetError(f"the coreset's rows alone ({sum(c.selected.numel() for c in self.chunks):,} "
                                    f"rows of {self.dim} values after {self.n_points:,} bank points, and their "
                                    f"final copy) need {_mb(need)}, over {1 - _WORKING_SHARE:.0%} of the memory "
                                    f"budget of {_mb(self.budget)}; lower the coreset ratio or raise the "
                                    f"budget (memory_mb, --memory-mb or ADLIB_MEMORY_MB)")
        if self._bar is None and self.progress:
            from tqdm import tqdm
            self._bar = tqdm(desc="coreset chunks", unit="chunk", leave=False)
        if self._bar is not None:
            self._bar.update(1)

    # -- output -------------------------------------------------------------------------------

    def finish(self) -> Tensor:
        """The coreset rows ``(K, D)``; the stream is spent afterwards."""
        try:
            if self.n_points == 0:
                raise ValueError("no bank rows were added")
            if self.ratio >= 1:
                return self._keep_all()
            return self._finish_exact() if self.mode == "exact" else self._finish_chunked()
        finally:
            self.close()

    def _keep_all(self) -> Tensor:
        self.scheme_used = "all"
        if self.mode == "chunked":
            raise ValueError("coreset ratio 1 keeps the whole bank: there is nothing to chunk")
        bank = torch.cat(self.pieces)
        self.pieces = []
        self.indices = torch.arange(bank.shape[0])
        return bank

    def _rows(self, a: int, b: int) -> Tensor:
        """Bank rows ``[a, b)`` held as pieces (a view when they lie in one piece)."""
        parts, offset = [], 0
        for piece in self.pieces:
            lo, hi = max(a, offset), min(b, offset + piece.shape[0])
            if lo < hi:
                parts.append(piece[lo - offset:hi - offset])
            offset += piece.shape[0]
            if offset >= b:
                break
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _finish_exact(self) -> Tensor:
        self.scheme_used = "exact"
        size = coreset_size(self.n_points, self.ratio, None)
        p = self.dim if self.matrix is None else self.matrix.shape[1]
        x = torch.empty(self.n_points, p, dtype=torch.float32, device=self.pieces[0].device)
        project_blocks(self._rows, self.n_points, self.matrix, x)
        chosen = greedy_projected(x, size, seeded_start(self.n_points, self.seed), progress=self.progress).selected
        del x
        self.indices = chosen.cpu()
        starts = torch.tensor([0] + [piece.shape[0] for piece in self.pieces]).cumsum(0)
        owner = torch.searchsorted(starts, self.indices, right=True) - 1
        out = torch.empty(size, self.dim, dtype=self.pieces[0].dtype, device=self.pieces[0].device)
        for i in owner.unique().tolist():
            where = (owner == i).nonzero().squeeze(1)
            out[where.to(out.device)] = self.pieces[i][(self.indices[where] - starts[i]).to(out.device)]
        self.pieces = []
        return out

    def _finish_chunked(self) -> Tensor:
        self.scheme_used = "chunked"
        if self.fill is not None:
            self.ready.append((self.n_points - self.fill_rows, self.fill[: self.fill_rows]))
            self.fill = None
        if self.ready:
            self._reduce_ready()
        size = coreset_size(self.n_points, self.ratio, None)
        if self.second_round:
            return self._second_round(size)
        keep = merge_by_radius(self.chunks, size)
        self.radius_bound = max(float(c.radii[k]) if k < c.radii.numel() else c.radius
                                for c, k in zip(self.chunks, keep))
        self.indices = torch.cat([c.selected[:k].cpu() + c.offset for c, k in zip(self.chunks, keep)])
        out = torch.cat([c.rows[:k] for c, k in zip(self.chunks, keep)])
        self.chunks = []
        return out

    def _second_round(self, size: int) -> Tensor:
        """The exact greedy over the union of the chunks' selections (Malkomes et al.'s round two)."""
        projected = torch.cat([c.projected for c in self.chunks])
        rows = torch.cat([c.rows for c in self.chunks])
        index = torch.cat([c.selected.cpu() + c.offset for c in self.chunks])
        self.chunks = []
        chosen = greedy_projected(projected.contiguous(), size, seeded_start(rows.shape[0], self.seed)).selected
        self.indices = index[chosen.cpu()]
        return rows[chosen]

    def close(self) -> None:
        """Free the threads and the progress bar (``finish`` does it; also on errors)."""
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "CoresetStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def chunked_greedy_coreset(features: Tensor, ratio: float | None = None, n: int | None = None, *,
                           proj_dim: int = 128, seed: int = 0, chunk_points: int = DEFAULT_CHUNK_POINTS,
                           oversample: float = DEFAULT_OVERSAMPLE, second_round: bool = False,
                           threads: int | None = None) -> Tensor:
    """The chunked coreset of an in-memory bank ``features (N, D)``: indices ``(K,)`` int64, in
    chunk order (see the module docstring); ``K = n`` or ``max(1, round(ratio * N))``."""
    check_matrix("features", features)
    size = coreset_size(features.shape[0], ratio, n)
    stream = CoresetStream(size / features.shape[0], "chunked", proj_dim=proj_dim, seed=seed,
                           chunk_points=chunk_points, oversample=oversample, second_round=second_round,
                           threads=threads)
    with torch.no_grad(), stream:
        for a in range(0, features.shape[0], chunk_points):
            stream.add(features[a:a + chunk_points])
        stream.finish()
    assert stream.indices is not None and stream.indices.numel() == size
    return stream.indices
