"""Run an exported detector (:mod:`adlib.export`) with onnxruntime: numpy, Pillow and onnxruntime
only, no PyTorch. Files are read by :mod:`adlib.imagefiles`, the code that read the training images.

    detector = ExportedDetector("padim.onnx")
    scores, maps = detector.predict_files(paths)        # (N,), (N, S, S)
    flagged = scores > detector.threshold               # the threshold saved with the model

Command line (one CSV row per image: path, score, decision)::

    python -m adlib.deploy --model padim.onnx IMAGES_OR_FOLDERS... [--csv scores.csv]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .imagefiles import IMAGE_SUFFIXES, DataError, pixels_to_unit, read_resized

__all__ = ["ExportedDetector", "ModelFileError", "FORMAT", "list_images", "max_relative_error"]

FORMAT = "adlib-onnx/1"   # what adlib.export writes; a file of another format is refused by name


class ModelFileError(ValueError):
    """A model file that is not an exported adlib detector this version can run."""


class ExportedDetector:
    """An exported detector in onnxruntime.

    Attributes from the file's metadata: ``method``, ``threshold`` (float or None), ``input_size``
    ``(S, S)``, ``preprocessing`` (dict: ``image_size``, ``crop_size``, ``value_range``; how files
    are read), ``adlib_version``. ``providers`` are onnxruntime's execution providers (default:
    what the installed onnxruntime offers, CUDA before CPU).
    """

    def __init__(self, path: str | os.PathLike, providers: Sequence[str] | None = None, threads: int | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise ModelFileError(f"{self.path}: no such model file")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        available = ort.get_available_providers()
        chosen = list(providers) if providers else [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                                                    if p in available]
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=chosen)
        except Exception as err:    # onnxruntime raises its own classes for every kind of bad file
            raise ModelFileError(f"{self.path}: not an ONNX model onnxruntime can load ({str(err).splitlines()[0]})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        found = meta.get("adlib_format")
        if found is None:
            raise ModelFileError(f"{self.path}: an ONNX model, but not one exported by adlib (no adlib_format in its "
                                 f"metadata); export a detector with `adlib export`")
        if found != FORMAT:
            raise ModelFileError(f"{self.path}: exported in format {found!r} (adlib {meta.get('adlib_version', '?')}); "
                                 f"this adlib reads {FORMAT!r}: export the model again with this version")
        self.method = meta["method"]
        self.adlib_version = meta.get("adlib_version", "?")
        threshold = json.loads(meta.get("threshold", "null"))
        self.threshold: float | None = None if threshold is None else float(threshold)
        self.input_size = tuple(json.loads(meta["input_size"]))
        self.preprocessing: dict = json.loads(meta["preprocessing"])
        self.providers = self.session.get_providers()

    def __repr__(self) -> str:
        return (f"ExportedDetector({self.method}, {self.input_size[0]}x{self.input_size[1]}, threshold="
                f"{self.threshold}, providers={self.providers})")

    def read(self, path: str | os.PathLike) -> np.ndarray:
        """One image file -> ``(3, S, S)`` float32 pixels in [0, 1], read as the training images were."""
        p = self.preprocessing
        value_range = tuple(p["value_range"]) if p.get("value_range") else None
        pixels, _ = read_resized(path, p["image_size"], p.get("crop_size"), value_range)
        return pixels_to_unit(pixels)

    def predict(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(B, 3, S, S)`` float32 pixels in [0, 1] -> scores ``(B,)`` and anomaly maps ``(B, S, S)``."""
        pixels = np.asarray(pixels)
        if pixels.ndim != 4 or pixels.shape[1] != 3 or tuple(pixels.shape[-2:]) != self.input_size:
            raise ValueError(f"pixels must be (B, 3, {self.input_size[0]}, {self.input_size[1]}), got {pixels.shape}: "
                             f"read files with read() or predict_files()")
        if not np.isfinite(pixels).all():
            raise ValueError("pixels contain NaN or infinite values")
        score, anomaly_map = self.session.run(["score", "anomaly_map"],
                                              {"pixels": np.ascontiguousarray(pixels, dtype=np.float32)})
        return score, anomaly_map

    def predict_files(self, paths: Iterable[str | os.PathLike], batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
        """Image files -> scores ``(N,)`` and maps ``(N, S, S)``, ``batch_size`` files per run."""
        paths = list(paths)
        if not paths:
            raise ValueError("no image files given")
        scores, maps = [], []
        for start in range(0, len(paths), batch_size):
            s, m = self.predict(np.stack([self.read(p) for p in paths[start:start + batch_size]]))
            scores.append(s)
            maps.append(m)
        return np.concatenate(scores), np.concatenate(maps)

    def decide(self, scores: np.ndarray, threshold: float | None = None) -> np.ndarray:
        """``scores > threshold`` (the model's own unless given); refuses when there is none."""
        cut = self.threshold if threshold is None else threshold
        if cut is None:
            raise ValueError(f"{self.path.name} has no threshold (its detector was fitted without a hold-out); "
                             f"pass one")
        return np.asarray(scores) > cut


def max_relative_error(actual: np.ndarray, reference: np.ndarray) -> float:
    """How far an exported graph's output is from adlib's: the largest ``|actual - reference|`` of any
    image, relative to that image's largest ``|reference|``. Both ``(N, ...)``: scores ``(N,)`` (each
    score then is its own scale) or maps ``(N, H, W)``; computed in float64."""
    actual, reference = np.asarray(actual, np.float64), np.asarray(reference, np.float64)
    if actual.shape != reference.shape or actual.ndim == 0 or len(actual) == 0:
        raise ValueError(f"need two non-empty arrays of one shape (N, ...), got {actual.shape} and {reference.shape}")
    ref = reference.reshape(len(reference), -1)
    diff = np.abs(actual.reshape(len(actual), -1) - ref).max(1)
    return float((diff / np.maximum(np.abs(ref).max(1), 1e-12)).max())


def list_images(items: Iterable[str | os.PathLike]) -> list[Path]:
    """Image files and folders (their image files, sorted, not recursive) -> files."""
    files: list[Path] = []
    for item in map(Path, items):
        if item.is_dir():
            files += sorted(p for p in item.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif item.is_file():
            files.append(item)
        else:
            raise DataError(f"{item}: no such file or folder")
    if not files:
        raise DataError("no image files found in " + ", ".join(map(str, items)))
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adlib.deploy",
                                     description="score images with an exported detector (onnxruntime, no PyTorch)")
    parser.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER")
    parser.add_argument("--model", type=Path, required=True, help="an ONNX file written by `adlib export`")
    parser.add_argument("--csv", type=Path, default=None, help="write the scores here (default: standard output)")
    parser.add_argument("--threshold", type=float, default=None, help="decide at this score instead of the model's")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    try:
        detector = ExportedDetector(args.model)
        files = list_images(args.images)
        scores, _ = detector.predict_files(files, args.batch_size)
        cut = detector.threshold if args.threshold is None else args.threshold
        out = open(args.csv, "w", newline="") if args.csv else sys.stdout
        try:
            writer = csv.writer(out)
            writer.writerow(["path", "score", "anomalous"])
            for path, score in zip(files, scores):
                writer.writerow([str(path), f"{float(score):.6g}", "" if cut is None else int(score > cut)])
        finally:
            if args.csv:
                out.close()
    except (ValueError, OSError) as err:
        print(f"adlib deploy: error: {err}", file=sys.stderr)
        return 2
    print(f"adlib deploy: {len(files)} images scored with {detector.method} on {detector.providers[0]}"
          + ("" if cut is None else f"; {int((scores > cut).sum())} above the threshold {cut:.6g}"), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
