"""adlib: industrial visual anomaly detection, the library of the book.

Train on normal images only; score each test image and give a per-pixel anomaly map. Every
method is a :class:`~adlib.detectors.Detector` with ``fit(train) -> self`` and
``predict(images) -> (scores, maps)``; :func:`evaluate` measures any of them the same way.

Names are imported on first use, so that ``adlib.deploy`` (numpy and onnxruntime, no PyTorch)
runs where PyTorch is not installed.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

__version__ = "0.1.0"

_SUBMODULES = ("backbones", "data", "metrics", "pretrain", "settings", "train")
_NAMES = {"MVTecDataset": "data", "find_data_root": "data", "load_split": "data", "make_synthetic": "data",
          "train_batches": "data", "DETECTORS": "detectors", "Detector": "detectors", "get_detector": "detectors",
          "load_detector": "detectors", "Evaluation": "evaluate", "evaluate": "evaluate", "format_table": "evaluate"}
__all__ = [*_SUBMODULES, *_NAMES]


def __getattr__(name: str) -> Any:
    if name in _NAMES:
        return getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f".{name}", __name__)      # any submodule: adlib.kernels, adlib.viz, ...
    raise AttributeError(f"module 'adlib' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
