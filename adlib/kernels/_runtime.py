"""Runtime helpers shared by the kernels: input checks, exact float32 products, the CPU threads.

- ``DEFAULT_BUDGET_MB``: the default bound, in MB, on the extra memory of a kernel's work tiles.
- :func:`check_matrix`: refuses anything but a 2-D ``(N, D)`` floating-point tensor, clearly.
- :func:`exact_fp32`: TF32 off for the distance products (CUDA).
- :func:`in_threads`: ``work(i0, i1)`` over chunks of ``n_items``, one thread per core, each
  with a single-threaded BLAS (the CPU paths of k-NN and the Gaussians).
"""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

import torch
from threadpoolctl import threadpool_limits
from torch import Tensor

DEFAULT_BUDGET_MB = 256.0


# ---------------------------------------------------------------------------------------------
# Input checks shared by the kernels
# ---------------------------------------------------------------------------------------------

def check_matrix(name: str, x: Tensor, allow_empty: bool = False) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise TypeError(f"{name} must be floating point, got {x.dtype}")
    if not allow_empty and x.shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """TF32 off for distance products: its 10-bit mantissa would break the 1e-4 accuracy."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved

def in_threads(n_items: int, chunk: int, work: Callable[[int, int], None]) -> None:
    """CPU: ``work(i0, i1)`` for every chunk of ``chunk`` items, the chunks dealt out round-robin to
    one thread per core, each thread with a single-threaded BLAS.

    Why: the kernels' CPU work is many small BLAS calls (a query tile, a few positions' C x C
    matrices). One multi-threaded call for each spends its time synchronizing threads, and torch's
    batched CPU routines call MKL one matrix at a time, which takes a generic path on AMD
    processors. NumPy releases the GIL in its products and reductions, and so does ctypes in the
    BLAS/LAPACK calls of :func:`adlib.kernels._lapack._nogil_routine`, so the threads overlap.
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


@contextlib.contextmanager
def single_threaded_blas(torch_threads: int | None = None) -> Iterator[None]:
    """The BLAS single-threaded inside (a process-wide setting), and torch's CPU thread count set to
    ``torch_threads`` (None: left as is) and restored after, also when code inside changed it."""
    saved = torch.get_num_threads()
    if torch_threads is not None:
        torch.set_num_threads(torch_threads)
    try:
        with threadpool_limits(1, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(saved)
