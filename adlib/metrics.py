"""Metrics for image scores and anomaly maps, exact and tie-aware, computed in float64 with NumPy.

Image level (``scores (N,)`` against ``labels (N,)`` in {0, 1}): :func:`auroc`, :func:`f1_max`,
:func:`fpr_at_tpr` (FPR95), :func:`average_precision`. Pixel level (``maps (N, H, W)`` against
``masks (N, H, W)``): :func:`pixel_auroc` and :func:`aupro`.

Every curve treats tied scores as one threshold, so results do not depend on the order of ties.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

__all__ = ["roc_curve", "auroc", "pixel_auroc", "aupro", "pro_curve", "precision_recall_curve", "f1_max",
           "fpr_at_tpr", "average_precision", "all_metrics", "mean_std_threshold", "best_f1_threshold", "rates_at"]


def _trapezoid(y: Any, x: Any) -> float:
    """Trapezoidal integral of ``y`` over ``x``: ``np.trapezoid`` (NumPy >= 2.0), else ``np.trapz``
    (NumPy 1.x, deprecated in 2.0), so every NumPy that pyproject.toml allows works. The only place
    in adlib that may name either function (tests/test_metrics.py checks)."""
    integrate = getattr(np, "trapezoid", None) or np.trapz
    return float(integrate(y, x))


def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().to("cpu")
        if x.dtype.is_floating_point:
            x = x.double()
        x = x.numpy()
    return np.asarray(x)


def _check_binary(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    s = _as_numpy(scores).astype(np.float64).ravel()
    y = _as_numpy(labels).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in size: {s.shape} vs {y.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 (normal) or 1 (anomalous)")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinity")
    y = y.astype(bool)
    if y.all() or not y.any():
        raise ValueError("both classes are needed: labels are all "
                         + ("anomalous" if y.all() else "normal"))
    return s, y


def _cumulative_counts(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True and false positives at each distinct threshold, from the highest score down."""
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], positive[order]
    last_of_tie = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]
    tp = np.cumsum(y)[last_of_tie].astype(np.float64)
    fp = (last_of_tie + 1 - tp).astype(np.float64)
    return tp, fp, s[last_of_tie]


def roc_curve(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)``, starting at (0, 0) with threshold +inf."""
    s, y = _check_binary(scores, labels)
    tp, fp, thresholds = _cumulative_counts(s, y)
    tpr = np.r_[0.0, tp / tp[-1]]
    fpr = np.r_[0.0, fp / fp[-1]]
    return fpr, tpr, np.r_[np.inf, thresholds]


def auroc(scores: Any, labels: Any) -> float:
    """Area under the ROC curve: the chance that an anomaly scores above a normal (ties count half)."""
    fpr, tpr, _ = roc_curve(scores, labels)
    return _trapezoid(tpr, fpr)


def pixel_auroc(maps: Any, masks: Any) -> float:
    """AUROC over all pixels of all images: ``maps (N, H, W)`` vs ``masks (N, H, W)`` (or with a
    singleton channel). Dominated by large defects; see :func:`aupro` for a per-region view."""
    m, g = _pixel_arrays(maps, masks)
    return auroc(m, g)


def _pixel_arrays(maps: Any, masks: Any) -> tuple[np.ndarray, np.ndarray]:
    m = _as_numpy(maps).astype(np.float64)
    g = _as_numpy(masks)
    if m.ndim == 4:
        m = m[:, 0]
    if g.ndim == 4:
        g = g[:, 0]
    if m.shape != g.shape or m.ndim != 3:
        raise ValueError(f"maps and masks must both be (N, H, W); got {m.shape} and {g.shape}")
    return m, (g > 0.5).astype(np.uint8)


def pro_curve(maps: Any, masks: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(fpr, pro)`` at every distinct threshold, exactly.

    PRO at a threshold is the mean, over all connected ground-truth regions (8-connected, per
    image), of the fraction of the region's pixels above the threshold. FPR is over all normal
    pixels. One sort gives every threshold: a normal pixel adds ``1 / n_normal`` to the FPR, an
    anomalous pixel of a region of size ``a`` adds ``1 / (K a)`` to the PRO (``K`` regions).
    """
    m, g = _pixel_arrays(maps, masks)
    weights = np.zeros(m.shape, dtype=np.float64)
    regions = 0
    region_labels = []
    for i in range(g.shape[0]):
        lab, n = ndimage.label(g[i], structure=np.ones((3, 3), dtype=int))
        region_labels.append((lab, n))
        regions += n
    if regions == 0:
        raise ValueError("the masks hold no anomalous region: PRO is undefined")
    for i, (lab, n) in enumerate(region_labels):
        if n:
            sizes = np.bincount(lab.ravel(), minlength=n + 1).astype(np.float64)
            per_pixel = np.where(lab > 0, 1.0 / (regions * sizes[lab]), 0.0)
            weights[i] = per_pixel
    normal = g == 0
    n_normal = normal.sum()
    if n_normal == 0:
        raise ValueError("no normal pixel: FPR is undefined")
    scores = m.ravel()
    order = np.argsort(-scores, kind="mergesort")
    s = scores[order]
    last_of_tie = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]
    fpr = np.cumsum(normal.ravel()[order])[last_of_tie] / n_normal
    pro = np.cumsum(weights.ravel()[order])[last_of_tie]
    return np.r_[0.0, fpr], np.r_[0.0, pro]


def aupro(maps: Any, masks: Any, fpr_limit: float = 0.3) -> float:
    """Area under the PRO curve up to ``fpr_limit`` (MVTec: 0.3), divided by ``fpr_limit`` -> [0, 1]."""
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    fpr, pro = pro_curve(maps, masks)
    keep = fpr <= fpr_limit
    x, y = fpr[keep], pro[keep]
    if x[-1] < fpr_limit and keep.sum() < fpr.size:
        j = keep.sum()  # first point beyond the limit: interpolate the curve at the limit
        t = (fpr_limit - fpr[j - 1]) / (fpr[j] - fpr[j - 1])
        x = np.r_[x, fpr_limit]
        y = np.r_[y, pro[j - 1] + t * (pro[j] - pro[j - 1])]
    return _trapezoid(y, x) / fpr_limit


def precision_recall_curve(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(precision, recall, thresholds)`` at each distinct threshold, highest first."""
    s, y = _check_binary(scores, labels)
    tp, fp, thresholds = _cumulative_counts(s, y)
    return tp / (tp + fp), tp / tp[-1], thresholds


def f1_max(scores: Any, labels: Any) -> float:
    """Best F1 over all thresholds (:func:`best_f1_threshold` gives the threshold too)."""
    return best_f1_threshold(scores, labels)[1]


def average_precision(scores: Any, labels: Any) -> float:
    """AP = sum over thresholds of (R_n - R_{n-1}) P_n (the step-wise area, no interpolation)."""
    precision, recall, _ = precision_recall_curve(scores, labels)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def fpr_at_tpr(scores: Any, labels: Any, tpr: float = 0.95) -> float:
    """The lowest FPR at which at least ``tpr`` of the anomalies are found (FPR95 for 0.95)."""
    fpr_curve, tpr_curve, _ = roc_curve(scores, labels)
    return float(fpr_curve[np.argmax(tpr_curve >= tpr - 1e-12)])


def mean_std_threshold(normal_scores: Any, k: float = 3.0) -> float:
    """``mean + k * std`` (sample std) of scores of held-out *normal* images: a threshold set without
    seeing a single defect, as a production line must (k = 3: about 0.13% false alarms if the
    scores were normal)."""
    s = _as_numpy(normal_scores).astype(np.float64).ravel()
    if s.size < 2:
        raise ValueError(f"a mean + k std threshold needs at least 2 normal scores, got {s.size}")
    return float(s.mean() + k * s.std(ddof=1))


def best_f1_threshold(scores: Any, labels: Any) -> tuple[float, float]:
    """``(threshold, F1)`` of the threshold with the best F1 on these labelled scores (an image is
    called anomalous when its score is >= the threshold). It looks at the defects, so on a test set it
    is an oracle: an upper bound for a threshold chosen before the defects are known."""
    precision, recall, thresholds = precision_recall_curve(scores, labels)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-300)
    best = int(np.argmax(f1))
    return float(thresholds[best]), float(f1[best])


def rates_at(scores: Any, labels: Any, threshold: float) -> dict[str, float]:
    """What a threshold does on labelled scores (anomalous when score >= threshold): ``recall`` (share of
    defects caught), ``false_alarm_rate`` (share of normal images flagged), ``precision`` (NaN when
    nothing is flagged) and ``f1``."""
    s, y = _check_binary(scores, labels)
    flagged = s >= threshold
    tp = float(np.sum(flagged & y))
    fp = float(np.sum(flagged & ~y))
    recall = tp / float(np.sum(y))
    precision = tp / (tp + fp) if tp + fp > 0 else float("nan")
    f1 = 2 * precision * recall / (precision + recall) if tp > 0 else 0.0
    return {"recall": recall, "false_alarm_rate": fp / float(np.sum(~y)), "precision": precision, "f1": f1}


def all_metrics(scores: Any, labels: Any, maps: Any = None, masks: Any = None) -> dict[str, float]:
    """Image metrics (``image_auroc``, ``f1_max``, ``fpr95``, ``ap``), plus, when maps and masks are
    given and at least one mask holds a defect, the pixel metrics ``pixel_auroc``, ``aupro``,
    ``pixel_fpr95`` and ``pixel_ap`` (FPR95 and AP over all pixels, as dense anomaly detection
    papers such as DenseHybrid report them)."""
    out = {"image_auroc": auroc(scores, labels), "f1_max": f1_max(scores, labels),
           "fpr95": fpr_at_tpr(scores, labels, 0.95), "ap": average_precision(scores, labels)}
    if maps is not None and masks is not None:
        m, g = _pixel_arrays(maps, masks)
        m, g = m.ravel(), g.ravel()
        out["pixel_auroc"] = auroc(m, g)
        out["aupro"] = aupro(maps, masks)
        out["pixel_fpr95"] = fpr_at_tpr(m, g, 0.95)
        out["pixel_ap"] = average_precision(m, g)
    return out
