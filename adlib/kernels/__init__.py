"""The hot code of adlib, and nothing else: tensors in, tensors out.

- :func:`knn` (:mod:`.neighbours`): exact k-nearest-neighbour Euclidean distances of patch
  features ``(Q, D)`` to a memory bank ``(M, D)`` (PatchCore), chunked under a memory budget.
- :func:`greedy_coreset` (:mod:`.coreset`): exact k-center greedy subsampling of a memory bank
  ``(N, D)`` (PatchCore); each step prunes by the triangle inequality or runs one dense
  matrix-vector product, whichever is cheaper.
- :class:`CoresetStream` / :func:`chunked_greedy_coreset` (:mod:`.chunked_coreset`): the greedy
  within chunks of the bank as it streams in, merged by selection radius: cost linear in ``N``,
  memory bounded by a budget (:class:`MemoryBudgetError` when it cannot be).
- :class:`GaussianAccumulator` / :class:`PositionGaussians` (:mod:`.gaussian`): streaming
  per-position mean ``(P, C)`` and covariance ``(P, C, C)``, Cholesky factors, and the batched
  Mahalanobis distance ``(B, P)`` (PaDiM).
- :func:`gmm_blobs` (:mod:`.blobs`): synthetic anomalies ``(B, C, H, W)`` with exact masks from
  random 2-D Gaussian mixtures (semi-formula-driven pre-training).

Shared by them: :mod:`._runtime` (input checks, TF32 off, the CPU threads) and :mod:`._lapack`
(SciPy's BLAS/LAPACK through ctypes without the GIL, signature-checked on first use;
:func:`lapack_available` says whether it is in use or the kernels run their torch paths).

Every kernel runs on CPU and CUDA with the same code; see the Performance chapter for why each
is fast and ``python -m adlib.bench`` for the measurements against the field's implementations.
"""

from ._lapack import lapack_available
from ._runtime import DEFAULT_BUDGET_MB, in_threads
from .blobs import BLOB_COLOURS, BLOB_SIGNS, BlobParams, blob_score, gmm_blobs, paint_blobs
from .chunked_coreset import CoresetStream, MemoryBudgetError, chunked_greedy_coreset
from .coreset import covering_radius, greedy_coreset, random_projection
from .gaussian import GaussianAccumulator, PositionGaussians, mahalanobis
from .neighbours import knn

__all__ = ["knn", "greedy_coreset", "covering_radius", "random_projection", "chunked_greedy_coreset", "CoresetStream",
           "MemoryBudgetError", "GaussianAccumulator", "PositionGaussians",
           "mahalanobis", "gmm_blobs", "BLOB_SIGNS", "BLOB_COLOURS", "paint_blobs", "blob_score", "BlobParams", "DEFAULT_BUDGET_MB",
           "lapack_available", "in_threads"]
