"""Every method of the book side by side, on every data set, with seeds: ``python -m adlib compare``.

One run is (method, data set, seed): fit on the data set's normal training images, score its test
split with :func:`adlib.evaluate`. The two pre-training recipes are methods here too:
``centering`` and ``semi_formula`` fine-tune the default backbone on the target's normal images
first, then fit PaDiM on the fine-tuned backbone (as chapters 5 and 6 do); their ``fit_s`` includes
the pre-training. Methods whose fit draws random numbers (a ``seed`` hyper-parameter) run once per
seed, so a difference can be told from seed noise; ``pixel_stats`` has none and runs once.

::

    rows = compare(["patchcore", "padim"], ["bottle", "elpv_mono"], CompareConfig(seeds=(0, 1, 2)))
    table = summarize(rows)          # mean and std over seeds per (data set, method)
    write_results(rows, "compare_out")

Memory: ``mem_mb`` is what a run added on top of the process's resident memory at its start
(free heap pages given back first, so runs do not inherit each other's), on CUDA torch's peak
allocation; ``peak_mem_mb`` is the process's whole peak (data, Python and torch included).
"""

from __future__ import annotations

import csv
import dataclasses
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from .data import DataError, MVTecDataset, choose_data, holdout_split, load_split
from .detectors import DETECTORS, get_detector
from .elpv import ELPV_CATEGORIES, is_elpv
from . import metrics
from .evaluate import PeakMemory, evaluate, format_table, return_free_memory, rss_mb
from .pretrain import RECIPES
from .settings import default_device

__all__ = ["METHODS", "RECIPES", "CompareConfig", "method_options", "check_data", "compare", "run_one", "summarize",
           "write_results", "summary_markdown", "load_data", "plot_accuracy_vs_time", "threshold_study", "SUMMARY_METRICS"]

METHODS = ("pixel_stats", "autoencoder", "dfr", "patchcore", "padim", "centering", "semi_formula", "densehybrid")
SUMMARY_METRICS = ("image_auroc", "pixel_auroc", "aupro", "f1_max", "fpr95", "fit_s", "ms_per_image", "mem_mb")


def _option_fields(method: str) -> dict[str, dataclasses.Field]:
    if method in RECIPES:
        return {f.name: f for f in RECIPES[method].fields()}
    if method not in DETECTORS:
        raise ValueError(f"unknown method {method!r}; choose from {list(METHODS)}")
    return {f.name: f for f in dataclasses.fields(DETECTORS[method]) if f.init and f.name != "device"}


def method_options(method: str) -> dict[str, Any]:
    """The options one can set for ``method`` and their defaults (a recipe's for the pre-trainings)."""
    return {name: f.default for name, f in _option_fields(method).items()}


def _is_seeded(method: str) -> bool:
    return "seed" in _option_fields(method)


@dataclass
class CompareConfig:
    """How big a comparison is. ``options`` overrides method options, e.g.
    ``{"autoencoder": {"epochs": 30}, "semi_formula": {"images": 800}}`` (checked by name)."""

    image_size: int = 256
    train_limit: int | None = None      # first N training images (None: all)
    test_limit: int | None = None       # first N images of each test folder (None: all)
    seeds: tuple[int, ...] = (0, 1, 2)
    device: str | None = None
    batch_size: int = 16
    missing_masks: str = "error"        # MVTec-layout data without masks: "error", "skip" or "none" (ELPV: "none")
    options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ValueError("seeds must name at least one seed")
        if self.missing_masks not in ("error", "skip", "none"):
            raise ValueError(f"missing_masks must be 'error', 'skip' or 'none', got {self.missing_masks!r}")
        for method, values in self.options.items():
            known = _option_fields(method)
            unknown = sorted(set(values) - set(known) - {"seed"})
            if unknown:
                raise ValueError(f"{method} has no option(s) {unknown}; it has {sorted(known)}")
            if "seed" in values:
                raise ValueError(f"{method}: seeds come from CompareConfig.seeds, not from options")


def load_data(name: str, config: CompareConfig, root: str | Path | None = None) -> tuple[MVTecDataset, MVTecDataset]:
    """(train, test) of the data set ``name``: an MVTec AD category (under ``root``/``ADLIB_DATA`` or the
    user cache) or an ELPV cell type (``elpv_mono``, ``elpv_poly``; image labels only). Every image is
    decoded into the datasets' caches here, so that no run's time or memory includes reading files."""
    choice = choose_data(name, root, synthetic="never", banner=False)
    common = dict(root=choice.root, category=choice.category, image_size=config.image_size)
    train = MVTecDataset(split="train", limit=config.train_limit, **common)
    test = MVTecDataset(split="test", limit=config.test_limit,
                        missing_masks="none" if is_elpv(name) else config.missing_masks, **common)
    for dataset in (train, test):
        for index in range(len(dataset)):
            dataset[index]
    return train, test


def check_data(name: str, root: str | Path | None = None) -> None:
    """Refuse, in one line and before any work, a data set that cannot be had here (found as
    :func:`load_data` finds it: ELPV from its package, MVTec AD categories under ``root``/``ADLIB_DATA``
    or in the user cache)."""
    try:
        choose_data(name, root, synthetic="never", banner=False)
    except DataError as err:
        hint = "" if is_elpv(name) else (f" (nor is it one of {list(ELPV_CATEGORIES)}); set --root/ADLIB_DATA or "
                                         f"fetch it with adlib.data.download_mvtec")
        raise DataError(f"data set {name!r}: {str(err).splitlines()[0]}{hint}") from err


def _pretrain(method: str, train: MVTecDataset, options: dict[str, Any], seed: int, device: torch.device,
              folder: Path, progress: bool) -> tuple[str, float]:
    """Fine-tune the default backbone with ``method``'s recipe; returns (backbone file, seconds)."""
    entry = RECIPES[method]
    recipe = entry.make(**{**options, "seed": seed})
    start = time.perf_counter()
    run = entry.pretrain(load_split(train)[0], recipe, device=device, progress=progress)
    path = folder / f"{method}_{train.category}_seed{seed}.safetensors"
    run.save(path, category=train.category, image_size=train.image_size)
    return str(path), time.perf_counter() - start


def run_one(method: str, train: MVTecDataset, test: MVTecDataset, seed: int | None = 0,
            options: dict[str, Any] | None = None, device: str | torch.device | None = None,
            batch_size: int = 16, progress: bool = False, pretrain_data: MVTecDataset | None = None) -> dict[str, Any]:
    """Fit ``method`` on ``train``, evaluate on ``test``; the metrics row of :func:`adlib.evaluate` plus
    ``method``, ``data``, ``seed``, ``device``, ``pretrain_s`` (pre-training time, inside ``fit_s``),
    ``mem_mb`` (memory the run added, see the module's notes) and ``pretrained_on``. A pre-training
    method fine-tunes on ``pretrain_data``'s normal images if given (the cross-data-set variant:
    pre-train on one data set, detect on another), else on ``train``'s."""
    options = dict(options or {})
    run_device = default_device(device)
    pretrain_s = 0.0
    return_free_memory()
    start_mb = rss_mb() if run_device.type != "cuda" else 0.0
    with tempfile.TemporaryDirectory(prefix="adlib-compare-") as tmp, PeakMemory(run_device) as peak:
        pretrain_peak_mb = 0.0
        if method in RECIPES:
            backbone, pretrain_s = _pretrain(method, pretrain_data or train, options, 0 if seed is None else seed,
                                             run_device, Path(tmp), progress)
            if run_device.type == "cuda":   # evaluate's own PeakMemory resets the device's peak counter
                pretrain_peak_mb = torch.cuda.max_memory_allocated(run_device) / 2**20
            detector = get_detector("padim", backbone=backbone, device=str(run_device),
                                    **({"seed": seed} if seed is not None else {}))
        else:
            hyper = {**options, **({"seed": seed} if seed is not None and _is_seeded(method) else {})}
            if "device" in {f.name for f in dataclasses.fields(DETECTORS[method])}:
                hyper["device"] = str(run_device)
            detector = get_detector(method, **hyper)
        result = evaluate(detector, test, train, batch_size=batch_size, progress=progress)
    row = {"method": method, "data": train.category, "seed": seed, "device": str(run_device), **result.metrics}
    row["fit_s"] = row["fit_s"] + pretrain_s
    row["pretrain_s"] = pretrain_s
    row["pretrained_on"] = (pretrain_data or train).category if method in RECIPES else None
    row["peak_mem_mb"] = max(row["peak_mem_mb"], peak.peak_mb, pretrain_peak_mb)
    row["mem_mb"] = row["peak_mem_mb"] - start_mb
    return row


def compare(methods: list[str] | tuple[str, ...], data: list[str] | tuple[str, ...], config: CompareConfig | None = None,
            root: str | Path | None = None, progress: bool = True,
            on_row: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Every (data set, method, seed) run; one row each (see :func:`run_one`). ``on_row`` is called
    after each run (to print or save partial results of a long comparison)."""
    config = config or CompareConfig()
    for method in methods:
        _option_fields(method)   # unknown names fail before any work
    unused = sorted(set(config.options) - set(methods))
    if unused:
        raise ValueError(f"options given for {unused}, which are not among the methods compared {list(methods)}")
    if not data:
        raise ValueError("name at least one data set")
    for name in data:
        check_data(name, root)
    rows: list[dict[str, Any]] = []
    plan = [(name, method, seed) for name in data for method in methods
            for seed in (config.seeds if _is_seeded(method) else (None,))]
    bar = tqdm(plan, desc="compare", disable=not progress)
    loaded: dict[str, tuple[MVTecDataset, MVTecDataset]] = {}
    for name, method, seed in bar:
        bar.set_postfix_str(f"{name} {method} seed {seed}")
        if name not in loaded:
            loaded = {name: load_data(name, config, root)}   # one data set in memory at a time
        train, test = loaded[name]
        row = run_one(method, train, test, seed, config.options.get(method), config.device, config.batch_size)
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


def _mean_std(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return math.nan, math.nan
    mean = sum(finite) / len(finite)
    std = math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1)) if len(finite) > 1 else 0.0
    return mean, std


def summarize(rows: list[dict[str, Any]], keys: tuple[str, ...] = SUMMARY_METRICS) -> list[dict[str, Any]]:
    """One row per (data set, method), in first-seen order: ``seeds`` (how many runs), and for each
    metric ``<metric>`` (mean over seeds) and ``<metric>_std`` (sample std; 0 for one run)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["data"], row["method"]), []).append(row)
    out = []
    for (data, method), runs in groups.items():
        summary: dict[str, Any] = {"data": data, "method": method, "seeds": len(runs), "device": runs[0]["device"]}
        for key in keys:
            summary[key], summary[f"{key}_std"] = _mean_std([float(r[key]) for r in runs])
        summary["n_train"], summary["n_test"] = runs[0]["n_train"], runs[0]["n_test"]
        out.append(summary)
    return out


def summary_markdown(summary: list[dict[str, Any]]) -> str:
    """Summary rows as Markdown: each metric as ``mean ± std`` (std only where there were seeds)."""
    def cell(row: dict[str, Any], key: str) -> str:
        mean, std = row[key], row[f"{key}_std"]
        if math.isnan(mean):
            return "n/a"
        digits = 3 if key in ("image_auroc", "pixel_auroc", "aupro", "f1_max", "fpr95") else 1
        return f"{mean:.{digits}f} ± {std:.{digits}f}" if row["seeds"] > 1 else f"{mean:.{digits}f}"

    table = [{"data": r["data"], "method": r["method"], "seeds": r["seeds"],
              **{k: cell(r, k) for k in SUMMARY_METRICS}, "n_train": r["n_train"], "n_test": r["n_test"]}
             for r in summary]
    return format_table(table)


def write_results(rows: list[dict[str, Any]], out: str | Path) -> dict[str, Path]:
    """Write ``compare_runs.csv`` (every run), ``compare.csv`` and ``compare.md`` (mean ± std)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(rows)
    paths = {"runs": out / "compare_runs.csv", "summary": out / "compare.csv", "markdown": out / "compare.md"}
    for path, table in ((paths["runs"], rows), (paths["summary"], summary)):
        keys = list(dict.fromkeys(k for r in table for k in r))
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(table)
    paths["markdown"].write_text(summary_markdown(summary) + "\n")
    return paths


def plot_accuracy_vs_time(summary: list[dict[str, Any]], data: str, metric: str = "image_auroc", ax: Any = None) -> Any:
    """Scatter of ``metric`` (mean, with the seed std as error bar) against fit time + the time to
    score 100 images (log scale), one point per method, for the data set ``data``."""
    import matplotlib.pyplot as plt

    from .viz import label_points

    ax = ax or plt.subplots(figsize=(6, 4))[1]
    rows = [r for r in summary if r["data"] == data]
    costs = [r["fit_s"] + 0.1 * r["ms_per_image"] for r in rows]
    colors = [ax.errorbar(cost, row[metric], yerr=row[f"{metric}_std"], fmt="o", capsize=3)[0].get_color()
              for row, cost in zip(rows, costs)]
    ax.set_xscale("log")
    label_points(ax, costs, [r[metric] for r in rows], [r["method"] for r in rows], colors=colors)
    ax.set_xlabel("fit time + time to score 100 images (s, log scale)")
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_title(data)
    return ax


def threshold_study(method: str, train: MVTecDataset, test: MVTecDataset, holdout: float = 0.1, k: float = 3.0,
                    seed: int = 0, options: dict[str, Any] | None = None, batch_size: int = 16) -> dict[str, Any]:
    """The decision a production line needs, measured: fit ``method`` on ``1 - holdout`` of the normal
    training images (seeded split), set the threshold at ``mean + k * std`` of the held-out normal
    images' scores (no defect seen), and compare it on ``test`` with the best-F1 threshold (an oracle
    that looks at the test defects). Returns both thresholds and, for each, :func:`adlib.metrics.rates_at`
    (``recall``, ``false_alarm_rate``, ``precision``, ``f1``) prefixed ``calibrated_`` and ``oracle_``."""
    if method in RECIPES:
        raise ValueError(f"threshold_study takes a detector ({sorted(DETECTORS)}); {method!r} is a pre-training "
                         f"recipe: pre-train first, then study 'padim' with backbone=<its file> in options")
    images = load_split(train)[0]
    kept_index, held_index = holdout_split(len(images), holdout, seed)
    held, kept = images[held_index], images[kept_index]
    hyper = dict(options or {})
    if _is_seeded(method):
        hyper["seed"] = seed
    detector = get_detector(method, **hyper).fit(kept)
    held_scores = torch.cat([detector.predict(b)[0] for b in held.split(batch_size)])
    test_images, _, labels = load_split(test)
    scores = torch.cat([detector.predict(b)[0] for b in test_images.split(batch_size)])
    calibrated = metrics.mean_std_threshold(held_scores, k)
    oracle, _ = metrics.best_f1_threshold(scores, labels)
    row: dict[str, Any] = {"method": method, "data": train.category, "n_fit": len(kept), "n_held": len(held),
                           "calibrated_threshold": calibrated, "oracle_threshold": oracle}
    for name, threshold in (("calibrated", calibrated), ("oracle", oracle)):
        row.update({f"{name}_{key}": value for key, value in metrics.rates_at(scores, labels, threshold).items()})
    return row
