"""Export a fitted detector to one ONNX file: image pixels in, ``(score, anomaly map)`` out.

The graph holds the whole scoring path: ImageNet normalization (when the detector's preprocessing
asks for it), the backbone, and the method's scoring: PatchCore's nearest bank patch, PaDiM's
Mahalanobis distance, DFR's and the autoencoder's reconstruction errors, DenseHybrid's head. What
the graph cannot hold, reading and resizing an image file, is written into the file's metadata
(``preprocessing``) and done by :mod:`adlib.deploy` with the same code :mod:`adlib.data` uses.

Graph::

    pixels   float32 (B, 3, S, S) in [0, 1]   (a file read and resized as in training)
    score    float32 (B,)                     (higher = more anomalous; compare with ``threshold``)
    anomaly_map float32 (B, S, S)

Metadata (ONNX ``metadata_props``, strings): ``adlib_format`` (:data:`FORMAT`), ``method``,
``adlib_version``, ``input_size``, ``threshold`` (JSON ``null`` when the detector has none),
``preprocessing`` and ``hyper`` (JSON).
"""

from __future__ import annotations

import io
import json
import os
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from .data import Preprocessing, normalize
from .deploy import FORMAT
from .detectors import DETECTORS, Detector, load_detector

__all__ = ["FORMAT", "EXPORTABLE", "ExportError", "export_onnx", "ExportedScoring"]

EXPORTABLE = ("autoencoder", "densehybrid", "dfr", "padim", "patchcore")
OPSET = 18


class ExportError(ValueError):
    """A detector or file that cannot be exported, with the reason."""


class ExportedScoring(nn.Module):
    """What the ONNX graph computes: ``pixels (B, 3, S, S)`` in [0, 1] -> ``(score (B,), map (B, S, S))``.

    Runs in PyTorch too (the parity tests compare it with the detector and with onnxruntime)."""

    def __init__(self, detector: Detector, normalize_input: bool):
        super().__init__()
        self.scoring = detector.scoring_module().eval()
        self.normalize_input = normalize_input

    def forward(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        images = normalize(pixels) if self.normalize_input else pixels
        return self.scoring(images)


def _check_exportable(detector: Detector) -> None:
    if detector.name not in EXPORTABLE:
        raise ExportError(f"{detector.name} cannot be exported to ONNX; exportable methods: {', '.join(EXPORTABLE)}")
    if detector.input_size is None:
        raise ExportError(f"this {detector.name} is not fitted: fit it (or load a fitted file) before exporting")


def _preprocessing_of(detector: Detector, preprocessing: Preprocessing | None) -> Preprocessing:
    chosen = preprocessing or detector.preprocessing
    if chosen is None:
        side = detector.input_size[0] if detector.input_size[0] == detector.input_size[1] else None
        raise ExportError(f"this {detector.name} was fitted on tensors, so it does not know how its image files were "
                          f"read; pass preprocessing=Preprocessing(image_size={side or 'S'}) (what the training "
                          f"images went through) or fit it on a dataset")
    if (chosen.side, chosen.side) != tuple(detector.input_size):
        raise ExportError(f"the preprocessing gives {chosen.side}x{chosen.side} images, but the {detector.name} was "
                          f"fitted on {detector.input_size[0]}x{detector.input_size[1]}")
    return chosen


def metadata(detector: Detector, preprocessing: Preprocessing) -> dict[str, str]:
    """The strings written into the ONNX file beside the graph (see the module docstring)."""
    from . import __version__

    return {"adlib_format": FORMAT, "method": detector.name, "adlib_version": __version__,
            "input_size": json.dumps(list(detector.input_size)), "threshold": json.dumps(detector.threshold),
            "preprocessing": json.dumps(preprocessing.to_dict()), "hyper": json.dumps(detector.hyper)}


def export_onnx(detector: Detector | str | os.PathLike, out: str | os.PathLike,
                preprocessing: Preprocessing | None = None, opset: int = OPSET) -> Path:
    """Write ``detector`` (fitted, or the path of a saved detector file) as one ONNX file ``out``.

    The batch size stays free; the image size is the one the detector was fitted on. Raises
    :class:`ExportError` for a method that cannot be exported or a detector without preprocessing
    (fitted on tensors: pass ``preprocessing``). Returns ``out``.
    """
    import onnx

    if not isinstance(detector, Detector):
        detector = load_detector(detector, device="cpu") if _has_device(detector) else load_detector(detector)
    _check_exportable(detector)
    chosen = _preprocessing_of(detector, preprocessing)
    module = ExportedScoring(detector, chosen.normalize).to("cpu").eval()
    example = torch.rand(2, 3, chosen.side, chosen.side)
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")     # the tracer's notes on shape arithmetic in Python ints
        torch.onnx.export(module, (example,), buffer, input_names=["pixels"], output_names=["score", "anomaly_map"],
                          dynamic_axes={"pixels": {0: "batch"}, "score": {0: "batch"}, "anomaly_map": {0: "batch"}},
                          opset_version=opset, dynamo=False)
    model = onnx.load_from_string(buffer.getvalue())
    _name_shapes(model, chosen.side)
    for key, value in metadata(detector, chosen).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out))
    return out


def _name_shapes(model, side: int) -> None:
    """State the outputs' shapes in the file: ``score (batch,)``, ``anomaly_map (batch, S, S)`` (the
    tracer leaves the map's dimensions as guesses of its shape inference)."""
    shapes = {"pixels": ["batch", 3, side, side], "score": ["batch"], "anomaly_map": ["batch", side, side]}
    for value in [*model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        del dims[:]
        for size in shapes[value.name]:
            dim = dims.add()
            if isinstance(size, str):
                dim.dim_param = size
            else:
                dim.dim_value = size


def _has_device(path: str | os.PathLike) -> bool:
    """Whether the saved method takes a ``device`` (export runs on the CPU)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            method = (f.metadata() or {}).get("method")
    except Exception as err:     # safetensors raises its own error class for a file it cannot parse
        raise ExportError(f"{path}: not an adlib detector file (not a safetensors file: {err})") from None
    if method is None:
        raise ExportError(f"{path}: not an adlib detector file (no 'method' in its metadata)")
    if method not in DETECTORS:
        raise ExportError(f"{path}: a {method!r} detector, a method this adlib does not know (a newer version?)")
    cls = DETECTORS[method]
    return "device" in {f.name for f in cls.__dataclass_fields__.values() if f.init}
