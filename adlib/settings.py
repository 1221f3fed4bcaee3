"""The three settings adlib reads from the environment, each with a default.

- ``ADLIB_DATA``: the data root (see :func:`adlib.data.find_data_root`).
- ``ADLIB_SMALL=1``: the small configuration used by tests and nbval (fewer images, epochs and
  pixels; the same code paths).
- ``ADLIB_DEVICE``: ``cuda``, ``cpu`` or unset (automatic: CUDA when available).
"""

from __future__ import annotations

import os

import torch

__all__ = ["is_small", "default_device", "pick"]


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


def pick(full, small):
    """``small`` in the small configuration, else ``full``: sizes change, code paths do not."""
    return small if is_small() else full
