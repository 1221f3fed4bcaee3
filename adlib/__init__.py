"""adlib: industrial visual anomaly detection, the library of the book.

Train on normal images only; score each test image and give a per-pixel anomaly map. Every
method is a :class:`~adlib.detectors.Detector` with ``fit(train) -> self`` and
``predict(images) -> (scores, maps)``; :func:`evaluate` measures any of them the same way.

Where PyTorch is not installed (a production machine running an exported model), only the
PyTorch-free modules import: :mod:`adlib.deploy` and :mod:`adlib.imagefiles`.
"""

__version__ = "0.1.0"

try:
    import torch as _torch  # noqa: F401  (the library proper needs it; the runner does not)
except ImportError:          # pragma: no cover - exercised by tests/test_export.py in a subprocess
    __all__: list[str] = []
else:
    from . import backbones, data, metrics, pretrain, settings, train
    from .data import MVTecDataset, find_data_root, load_split, make_synthetic, train_batches
    from .detectors import DETECTORS, Detector, get_detector, load_detector
    from .evaluate import Evaluation, evaluate, format_table

    __all__ = ["backbones", "data", "metrics", "pretrain", "settings", "train", "MVTecDataset", "find_data_root",
               "load_split", "make_synthetic", "train_batches", "DETECTORS", "Detector", "get_detector",
               "load_detector", "Evaluation", "evaluate", "format_table"]
