"""adlib.metrics against independent computations: scikit-learn, hand-worked cases, brute-force PRO."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from sklearn import metrics as skm

from adlib import metrics


@pytest.fixture
def tied_scores():
    rng = np.random.default_rng(1)
    return rng.integers(0, 12, 400).astype(float), rng.integers(0, 2, 400)


def test_auroc_matches_sklearn_with_ties(tied_scores):
    s, y = tied_scores
    assert metrics.auroc(s, y) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)


def test_auroc_hand_worked():
    # normals 0.1, 0.4; anomalies 0.35, 0.8: pairs won 3 of 4
    assert metrics.auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    # a tie between a normal and an anomaly counts half
    assert metrics.auroc([0.5, 0.5], [0, 1]) == pytest.approx(0.5)


def test_average_precision_and_f1_max_match_sklearn(tied_scores):
    s, y = tied_scores
    assert metrics.average_precision(s, y) == pytest.approx(skm.average_precision_score(y, s), abs=1e-12)
    p, r, _ = skm.precision_recall_curve(y, s)
    f1 = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-300), 0)
    assert metrics.f1_max(s, y) == pytest.approx(f1.max(), abs=1e-12)


def test_fpr95_hand_worked():
    # 20 anomalies at 1..20, normals at 0.5, 10.5, 15.5, 19.5 ; 95% TPR needs 19 anomalies: threshold 2,
    # above which 3 of 4 normals lie
    anomalies = np.arange(1, 21, dtype=float)
    normals = np.array([0.5, 10.5, 15.5, 19.5])
    s = np.r_[normals, anomalies]
    y = np.r_[np.zeros(4), np.ones(20)]
    assert metrics.fpr_at_tpr(s, y, 0.95) == pytest.approx(0.75)
    fpr, tpr, _ = skm.roc_curve(y, s)
    assert metrics.fpr_at_tpr(s, y, 0.95) == pytest.approx(fpr[np.argmax(tpr >= 0.95)])


def test_pixel_auroc_matches_sklearn():
    rng = np.random.default_rng(2)
    masks = (rng.random((3, 16, 16)) > 0.9).astype(np.uint8)
    maps = rng.random((3, 16, 16)) + masks * 0.3
    assert metrics.pixel_auroc(maps, masks) == pytest.approx(skm.roc_auc_score(masks.ravel(), maps.ravel()))


def test_pixel_fpr95_and_ap_are_the_image_metrics_over_all_pixels():
    rng = np.random.default_rng(3)
    masks = (rng.random((4, 12, 12)) > 0.85).astype(np.uint8)
    maps = rng.random((4, 12, 12)) + masks * 0.4
    out = metrics.all_metrics(rng.random(4), np.array([0, 1, 0, 1]), maps, masks)
    assert out["pixel_ap"] == pytest.approx(skm.average_precision_score(masks.ravel(), maps.ravel()))
    fpr, tpr, _ = skm.roc_curve(masks.ravel(), maps.ravel())
    assert out["pixel_fpr95"] == pytest.approx(fpr[np.argmax(tpr >= 0.95)])
    assert out["pixel_auroc"] == pytest.approx(skm.roc_auc_score(masks.ravel(), maps.ravel()))


def _brute_force_aupro(maps: np.ndarray, masks: np.ndarray, limit: float) -> float:
    """Threshold at every distinct score, binarize, measure each region's overlap: slow and obvious."""
    regions = []
    for i in range(masks.shape[0]):
        lab, n = ndimage.label(masks[i], structure=np.ones((3, 3)))
        regions += [(i, lab == k) for k in range(1, n + 1)]
    normal = masks == 0
    points = [(0.0, 0.0)]
    for t in np.sort(np.unique(maps))[::-1]:
        pred = maps >= t
        fpr = (pred & normal).sum() / normal.sum()
        pro = np.mean([pred[i][region].mean() for i, region in regions])
        points.append((fpr, pro))
    fpr, pro = np.array(points).T
    # integrate to `limit`, interpolating at the limit
    xs, ys = [0.0], [0.0]
    for k in range(1, len(fpr)):
        if fpr[k] <= limit:
            xs.append(fpr[k]); ys.append(pro[k])
        else:
            t = (limit - fpr[k - 1]) / (fpr[k] - fpr[k - 1])
            xs.append(limit); ys.append(pro[k - 1] + t * (pro[k] - pro[k - 1]))
            break
    xs, ys = np.asarray(xs), np.asarray(ys)
    return float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1]) / 2)) / limit  # trapezoids, by hand


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aupro_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    masks = np.zeros((3, 12, 12), np.uint8)
    masks[0, 2:5, 2:5] = 1          # one 3x3 region
    masks[0, 8:10, 7:11] = 1        # a second region in the same image
    masks[1, 0:1, 0:1] = 1          # a single pixel
    maps = rng.integers(0, 30, masks.shape).astype(float) + 10 * masks * rng.random(masks.shape)
    for limit in (0.3, 1.0):
        assert metrics.aupro(maps, masks, limit) == pytest.approx(_brute_force_aupro(maps, masks, limit), abs=1e-12)


def test_aupro_perfect_and_inverted_maps():
    masks = np.zeros((2, 10, 10), np.uint8)
    masks[0, 3:6, 3:6] = 1
    assert metrics.aupro(masks.astype(float), masks) == pytest.approx(1.0)
    assert metrics.aupro(1.0 - masks, masks) == pytest.approx(0.0)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="both classes"):
        metrics.auroc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="differ in size"):
        metrics.auroc([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(ValueError, match="NaN"):
        metrics.auroc([0.1, float("nan")], [0, 1])
    with pytest.raises(ValueError, match="no anomalous region"):
        metrics.aupro(np.zeros((1, 4, 4)), np.zeros((1, 4, 4)))


def test_trapezoid_helper_matches_hand_computation():
    # trapezoids of widths 1, 2, 0.5 under y = 0 -> 2 -> 2 -> 5: 1 + 4 + 1.75
    assert metrics._trapezoid([0.0, 2.0, 2.0, 5.0], [0.0, 1.0, 3.0, 3.5]) == pytest.approx(6.75, abs=1e-15)
    assert metrics._trapezoid([1.0, 1.0], [0.0, 0.0]) == 0.0  # a vertical step adds no area


def test_trapezoid_helper_falls_back_to_numpy_1_trapz(monkeypatch):
    """NumPy 1.x (pyproject allows >= 1.24) has only ``np.trapz``; 2.0 renamed it ``np.trapezoid``."""
    calls = []

    def trapz(y, x):
        calls.append(1)
        y, x = np.asarray(y, float), np.asarray(x, float)
        return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2))

    monkeypatch.delattr(np, "trapezoid", raising=False)
    monkeypatch.setattr(np, "trapz", trapz, raising=False)
    assert metrics.auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert calls


def test_no_trapezoid_call_outside_the_helper():
    """``np.trapezoid`` exists only in NumPy >= 2.0 and ``np.trapz`` only before 2.4: adlib names
    either (as an attribute or a getattr string) only inside ``metrics._trapezoid``."""
    package = Path(metrics.__file__).resolve().parent
    names = {"trapezoid", "trapz"}
    found = []
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        allowed = [node for node in ast.walk(tree) if path.name == "metrics.py" and path.parent == package
                   and isinstance(node, ast.FunctionDef) and node.name == "_trapezoid"]
        inside = {id(n) for fn in allowed for n in ast.walk(fn)}
        for node in ast.walk(tree):
            hit = ((isinstance(node, ast.Attribute) and node.attr in names)
                   or (isinstance(node, ast.Constant) and node.value in names))
            if hit and id(node) not in inside:
                found.append(f"{path.relative_to(package.parent)}:{node.lineno}")
    assert not found, f"call metrics._trapezoid instead of np.trapezoid/np.trapz at {found}"


def test_thresholds_against_a_brute_force_reference():
    from adlib.metrics import best_f1_threshold, f1_max, mean_std_threshold, rates_at

    rng = np.random.default_rng(3)
    labels = rng.random(200) < 0.3
    scores = np.round(rng.normal(size=200) + 1.2 * labels, 2)   # rounded: ties included
    best_t, best_f1 = best_f1_threshold(scores, labels.astype(int))
    brute = []
    for t in np.unique(scores):
        flagged = scores >= t
        tp, fp = np.sum(flagged & labels), np.sum(flagged & ~labels)
        f1 = 2 * tp / (2 * tp + fp + np.sum(~flagged & labels))
        brute.append((f1, t))
        rates = rates_at(scores, labels.astype(int), t)
        assert rates["recall"] == pytest.approx(tp / labels.sum(), abs=1e-12)
        assert rates["false_alarm_rate"] == pytest.approx(fp / (~labels).sum(), abs=1e-12)
        assert rates["f1"] == pytest.approx(f1, abs=1e-12)
    f1_ref, t_ref = max(brute)
    assert best_f1 == pytest.approx(f1_ref, abs=1e-12) == pytest.approx(f1_max(scores, labels.astype(int)), abs=1e-12)
    assert rates_at(scores, labels.astype(int), best_t)["f1"] == pytest.approx(best_f1, abs=1e-12)
    normal = rng.normal(5.0, 2.0, size=50)
    assert mean_std_threshold(normal) == pytest.approx(normal.mean() + 3 * normal.std(ddof=1), abs=1e-12)
    assert mean_std_threshold(normal, k=0) == pytest.approx(normal.mean(), abs=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        mean_std_threshold([1.0])
    nothing = rates_at([0.1, 0.2], [0, 1], 5.0)
    assert nothing["recall"] == 0.0 and nothing["false_alarm_rate"] == 0.0 and math.isnan(nothing["precision"])
