"""Run a detector over a test split: every metric, fit time, inference time per image, peak memory."""

from __future__ import annotations

import ctypes
import gc
import math
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import Tensor
from tqdm import tqdm

from . import metrics
from .data import MVTecDataset, train_batches
from .detectors.base import Detector

__all__ = ["Evaluation", "evaluate", "PeakMemory", "format_table", "return_free_memory", "rss_mb"]


def return_free_memory() -> None:
    """Collect Python's garbage and, with glibc, give the heap's free pages back to the system.

    Why: freed heap pages stay resident, so a later run reuses them without page faults and its
    memory does not show in the RSS (measured in one process after the k-NN and coreset rows: a
    Gaussian fit that needs 370 MB showed 0.8 MB and ran 30% faster). Every measured run starts
    from the same state.
    """
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):   # not glibc (macOS, musl): nothing to give back this way
        pass


def rss_mb() -> float:
    """Resident set size of this process in MB: now on Linux (``/proc``); the lifetime peak on other
    POSIX systems (``getrusage``); now on Windows (``psutil`` if installed, else the Win32 call
    ``GetProcessMemoryInfo``); NaN where none of these can be had (unknown, not zero)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, AttributeError):  # no /proc; os.sysconf does not exist on Windows
        pass
    try:
        import resource  # POSIX only: importing it at the top made `import adlib` fail on Windows
    except ImportError:
        resource = None
    if resource is not None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB elsewhere
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        return psutil.Process().memory_info().rss / 2**20
    if sys.platform == "win32":
        try:
            return _windows_working_set_mb()
        except (OSError, AttributeError):
            pass
    return math.nan


def _windows_working_set_mb() -> float:
    """The working set (resident memory) of this process, from ``psapi.GetProcessMemoryInfo``."""
    import ctypes
    from ctypes import wintypes

    class Counters(ctypes.Structure):  # PROCESS_MEMORY_COUNTERS
        _fields_ = [("cb", wintypes.DWORD), ("PageFaultCount", wintypes.DWORD),
                    ("PeakWorkingSetSize", ctypes.c_size_t), ("WorkingSetSize", ctypes.c_size_t),
                    ("QuotaPeakPagedPoolUsage", ctypes.c_size_t), ("QuotaPagedPoolUsage", ctypes.c_size_t),
                    ("QuotaPeakNonPagedPoolUsage", ctypes.c_size_t), ("QuotaNonPagedPoolUsage", ctypes.c_size_t),
                    ("PagefileUsage", ctypes.c_size_t), ("PeakPagefileUsage", ctypes.c_size_t)]

    kernel32, psapi = ctypes.WinDLL("kernel32"), ctypes.WinDLL("psapi")
    kernel32.GetCurrentProcess.restype = wintypes.HANDLE
    psapi.GetProcessMemoryInfo.argtypes = [wintypes.HANDLE, ctypes.POINTER(Counters), wintypes.DWORD]
    psapi.GetProcessMemoryInfo.restype = wintypes.BOOL
    counters = Counters()
    counters.cb = ctypes.sizeof(Counters)
    if not psapi.GetProcessMemoryInfo(kernel32.GetCurrentProcess(), ctypes.byref(counters), counters.cb):
        raise OSError("GetProcessMemoryInfo failed")
    return counters.WorkingSetSize / 2**20


class PeakMemory:
    """Context manager measuring peak memory of a block, in MB.

    On CUDA: peak bytes allocated by torch on the device. On CPU: peak resident set size of the
    whole process (libraries included, as ``/usr/bin/time`` would report), sampled every 5 ms.
    """

    def __init__(self, device: torch.device | str = "cpu", interval_s: float = 0.005):
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, rss_mb())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak_mb = rss_mb()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._stop.set()
            assert self._thread is not None
            self._thread.join()
            self.peak_mb = max(self.peak_mb, rss_mb())


@dataclass
class Evaluation:
    """What :func:`evaluate` returns: the metrics dict plus everything needed for figures.

    ``scores (N,)``, ``maps (N, H, W)``, ``labels (N,)``, ``masks (N, H, W)``, ``defects`` and
    ``paths`` follow the order of the test dataset.
    """

    metrics: dict[str, Any]
    scores: Tensor
    maps: Tensor
    labels: Tensor
    masks: Tensor
    defects: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)


def _device_of(detector: Detector) -> torch.device:
    dev = getattr(detector, "device_", None)
    return torch.device(dev) if dev is not None else torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def evaluate(detector: Detector, test: MVTecDataset, train: MVTecDataset | Iterable[Tensor] | None = None,
             batch_size: int = 16, progress: bool = True) -> Evaluation:
    """Fit ``detector`` on ``train`` (if given), run it over ``test`` and compute every metric.

    Returns an :class:`Evaluation` whose ``metrics`` has ``image_auroc``, ``pixel_auroc``,
    ``aupro``, ``f1_max``, ``fpr95``, ``ap`` (the last three at image level), ``pixel_fpr95``,
    ``pixel_ap`` (over all pixels), ``fit_s``,
    ``ms_per_image`` (inference, excluding data loading), ``peak_mem_mb`` (see
    :class:`PeakMemory`), ``n_train`` and ``n_test``. On a test split without defect masks
    (``test.has_masks`` False, e.g. ELPV) the pixel metrics are NaN.
    """
    device = _device_of(detector)
    n_train = 0
    fit_s = 0.0
    with PeakMemory(device) as peak:
        if train is not None:
            if isinstance(train, MVTecDataset):
                n_train = len(train)
                train = train_batches(train, batch_size)
            start = time.perf_counter()
            detector.fit(train)
            _sync(device)
            fit_s = time.perf_counter() - start
        scores, maps, masks = [], [], []
        infer_s = 0.0
        bar = tqdm(range(0, len(test), batch_size), desc=f"{detector.name} predict", disable=not progress,
                   leave=False)
        for begin in bar:
            items = [test[i] for i in range(begin, min(begin + batch_size, len(test)))]
            images = torch.stack([it["image"] for it in items])
            start = time.perf_counter()
            s, m = detector.predict(images)
            _sync(device)
            infer_s += time.perf_counter() - start
            scores.append(s.detach().float().cpu())
            maps.append(m.detach().float().cpu())
            masks.append(torch.stack([it["mask"][0] for it in items]))
    scores_t, maps_t, masks_t = torch.cat(scores), torch.cat(maps), torch.cat(masks)
    labels = test.labels
    pixel_truth = getattr(test, "has_masks", True)   # image-level data (ELPV) has no masks
    result = metrics.all_metrics(scores_t, labels, maps_t if pixel_truth else None, masks_t if pixel_truth else None)
    if not pixel_truth:
        result.update(dict.fromkeys(PIXEL_METRICS, math.nan))
    result.update(fit_s=fit_s, ms_per_image=1000 * infer_s / len(test), peak_mem_mb=peak.peak_mb,
                  n_train=n_train, n_test=len(test))
    return Evaluation(result, scores_t, maps_t, labels, masks_t, test.defects, [e.image.as_posix() for e in test.entries])


PIXEL_METRICS = ("pixel_auroc", "aupro", "pixel_fpr95", "pixel_ap")
_ORDER = ("data", "method", "seed", "seeds", "backbone", "category", "device", "image_auroc", "pixel_auroc", "aupro", "f1_max", "fpr95",
          "ap", "pixel_fpr95", "pixel_ap", "fit_s", "ms_per_image", "mem_mb", "peak_mem_mb", "n_train", "n_test")


def format_table(rows: list[dict[str, Any]] | dict[str, Any]) -> str:
    """A Markdown table of one or more metric dicts, known keys first, floats to 3 decimals."""
    rows = [rows] if isinstance(rows, dict) else rows
    keys = [k for k in _ORDER if any(k in r for r in rows)]
    keys += [k for r in rows for k in r if k not in keys and not isinstance(r[k], (list, dict))]
    keys = list(dict.fromkeys(keys))

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 1e4 else f"{v:.0f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines)
