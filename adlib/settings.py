"""The settings adlib reads from the environment, each with a default.

- ``ADLIB_DATA``: the data root (see :func:`adlib.data.find_data_root`).
- ``ADLIB_SMALL=1``: the small configuration used by tests and nbval (fewer images, epochs and
  pixels; the same code paths).
- ``ADLIB_DEVICE``: ``cuda``, ``cpu`` or unset (automatic: CUDA when available).
- ``ADLIB_MVTEC_URL``: where :func:`adlib.data.download_mvtec` fetches MVTec AD's per-category archives
  (the folder holding ``<category>.tar.xz``; default :data:`adlib.data.MVTEC_URL`, MVTec's server).
- ``ADLIB_NO_CTYPES=1``: the kernels never call SciPy's BLAS/LAPACK through ctypes, only torch
  (see :func:`adlib.kernels.lapack_available`; same results, other speed).
- ``ADLIB_MEMORY_MB``: the memory budget, in MB, of PatchCore's memory bank and coreset (default
  2048; see :func:`memory_budget_mb`, the ``memory_mb`` hyper-parameter and ``--memory-mb``).
"""

from __future__ import annotations

import os
from typing import Protocol

import torch

__all__ = ["is_small", "is_book_run", "BOOK_CATEGORY", "default_device", "pick", "ctypes_disabled", "mvtec_url", "memory_budget_mb"]

DEFAULT_MEMORY_MB = 2048.0
BOOK_CATEGORY = "bottle"     # the MVTec AD category of the book's stored runs; its prose quotes them


def is_small() -> bool:
    """True when ``ADLIB_SMALL`` is set to a true value (``1``, ``true``, ``yes``)."""
    return os.environ.get("ADLIB_SMALL", "").strip().lower() in {"1", "true", "yes", "on"}


def default_device(device: str | torch.device | None = None) -> torch.device:
    """The device to compute on: the argument, else ``ADLIB_DEVICE``, else CUDA if available."""
    chosen = device if device is not None else os.environ.get("ADLIB_DEVICE") or None
    if chosen is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    chosen = torch.device(chosen)
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {chosen} was asked for but torch sees no CUDA device")
    return chosen


class _Data(Protocol):
    """What :func:`is_book_run` reads of a :class:`adlib.data.DataChoice` (a frozen dataclass)."""

    @property
    def real(self) -> bool: ...

    @property
    def category(self) -> str: ...


def is_book_run(choice: _Data, category: str = BOOK_CATEGORY) -> bool:
    """True when a notebook runs what its text describes: real data of ``category`` at full size.

    ``choice`` is the notebook's :class:`adlib.data.DataChoice`. The chapters' key checks, bars their
    stored numbers clear, apply only then: another category (a chapter's ``CATEGORY``), a synthetic
    stand-in or ``ADLIB_SMALL`` skips them instead of failing on numbers meant for bottle.
    """
    return bool(choice.real) and choice.category == category and not is_small()


def pick(full, small):
    """``small`` in the small configuration, else ``full``: sizes change, code paths do not."""
    return small if is_small() else full


def ctypes_disabled() -> bool:
    """True when ``ADLIB_NO_CTYPES`` is set to a true value: the kernels' torch paths only."""
    return os.environ.get("ADLIB_NO_CTYPES", "").strip().lower() in {"1", "true", "yes", "on"}


def mvtec_url() -> str | None:
    """``ADLIB_MVTEC_URL``: the folder holding MVTec AD's ``<category>.tar.xz`` (a mirror, or a test
    server), or a pattern containing ``{category}``; None when unset (MVTec's own server)."""
    return os.environ.get("ADLIB_MVTEC_URL", "").strip() or None


def memory_budget_mb() -> float:
    """``ADLIB_MEMORY_MB`` (a positive number of MB), else :data:`DEFAULT_MEMORY_MB`: the bound on
    the memory PatchCore's bank and coreset may hold while fitting (see
    :class:`adlib.kernels.CoresetStream`)."""
    text = os.environ.get("ADLIB_MEMORY_MB", "").strip()
    if not text:
        return DEFAULT_MEMORY_MB
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"ADLIB_MEMORY_MB must be a number of MB, got {text!r}") from None
    if not value > 0:
        raise ValueError(f"ADLIB_MEMORY_MB must be positive, got {text!r}")
    return value
