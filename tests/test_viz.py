"""adlib.viz: the figures have the promised layout and colour conventions."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import torch

from adlib import viz
from adlib.evaluate import Evaluation


def _evaluation(n_normal: int = 4, n_defect: int = 5) -> Evaluation:
    n = n_normal + n_defect
    maps = torch.rand(n, 16, 16, generator=torch.Generator().manual_seed(0))
    maps[n_normal:] += torch.linspace(0, 3, n_defect).view(-1, 1, 1)
    labels = torch.tensor([0] * n_normal + [1] * n_defect)
    masks = torch.zeros(n, 16, 16)
    masks[n_normal:, 4:8, 4:8] = 1
    return Evaluation({}, maps.flatten(1).amax(1), maps, labels, masks, ["good"] * n_normal + ["dent"] * n_defect)


def test_failure_grid_rows_are_top_defects_top_normals_bottom_defects():
    ev = _evaluation()
    fig = viz.failure_grid(ev, torch.zeros(9, 3, 16, 16), k=3)
    titles = [ax.get_title() for ax in fig.axes]
    assert len(titles) == 9
    assert all(t.startswith("dent") for t in titles[:3] + titles[6:])
    assert all(t.startswith("good") for t in titles[3:6])
    top = [float(t.split("s=")[1]) for t in titles[:3]]
    assert top == sorted(top, reverse=True) and top[0] == float(f"{float(ev.scores.max()):.3g}")


def test_overlay_leaves_values_below_vmin_transparent():
    fig, ax = matplotlib.pyplot.subplots()
    art = viz.overlay(ax, torch.zeros(3, 4, 4), np.arange(16.0).reshape(4, 4), vmin=8.0, vmax=15.0)
    shown = art.get_array()
    assert np.ma.is_masked(shown) and shown.mask.sum() == 8


def test_roc_legend_reports_auroc():
    fig = viz.plot_roc({"perfect": ([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1])})
    assert "AUROC 1.000" in fig.axes[0].get_legend().get_texts()[0].get_text()
    # hand-worked: normals 0.1, 0.4; anomalies 0.35, 0.8: 3 of 4 pairs ordered, the curve's steps
    # (0, 0) -> (0, 0.5) -> (0.5, 0.5) -> (0.5, 1) -> (1, 1)
    fig = viz.plot_roc({"perfect": ([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]),
                        "three of four": ([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])})
    texts = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert texts == ["perfect (AUROC 1.000)", "three of four (AUROC 0.750)"]
    fpr, tpr = (np.asarray(v, dtype=float) for v in fig.axes[0].lines[1].get_data())
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert {(0.0, 0.5), (0.5, 0.5), (0.5, 1.0)} <= set(zip(fpr.tolist(), tpr.tolist()))
    assert float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2)) == 0.75       # the area under the drawn line


def test_failure_grid_colour_scale_works_for_mean_scores():
    """A detector whose score is the map's mean (the autoencoder) still gets vmin < vmax."""
    ev = _evaluation()
    ev.scores = ev.maps.mean((1, 2))
    fig = viz.failure_grid(ev, torch.zeros(9, 3, 16, 16), k=3)
    fig.canvas.draw()  # the colour normalization is checked when drawing
    vmin, vmax = fig.axes[0].images[-1].get_clim()
    assert vmin < vmax and vmax == 2 * float(ev.maps[ev.labels == 0].max())


def test_label_points_keeps_crowded_labels_apart():
    """Five methods at almost the same cost and accuracy (bottle's ceiling): their labels must not overlap."""
    from matplotlib.text import Text

    from adlib.viz import label_points

    fig, ax = plt.subplots(figsize=(5, 3.5))
    xs, ys = [10.0, 10.5, 11.0, 10.2, 300.0], [0.999, 1.0, 0.998, 0.9995, 0.80]
    names = ["padim", "patchcore", "centering", "semi_formula", "autoencoder"]
    ax.plot(xs, ys, "o")
    ax.set_xscale("log")
    colors = ["C0", "C1", "C2", "C3", "C4"]
    notes = label_points(ax, xs, ys, names, colors=colors)
    renderer = fig.canvas.get_renderer()
    boxes = [Text.get_window_extent(n, renderer) for n in notes]     # the text alone, without a leader line
    assert [n.get_text() for n in notes] == names
    assert [n.get_color() for n in notes] == colors                    # each label in its point's colour
    far = [abs(n.xyann[1]) > 15 for n in notes]
    assert any(far) and [n.arrow_patch is not None for n in notes] == far   # pushed far: a leader line
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    crowded_naive = [ax.annotate(t, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
                     for t, x, y in zip(names, xs, ys)]       # the old fixed offset: these do overlap
    naive = [n.get_window_extent(renderer) for n in crowded_naive[:4]]
    assert any(a.overlaps(b) for i, a in enumerate(naive) for b in naive[i + 1:])
    plt.close(fig)
    fig, ax = plt.subplots()
    ax.plot([1.0, 2.0], [0.9, 0.8], "o")
    notes = label_points(ax, [1.0, 2.0, 3.0], [0.9, 0.8, float("nan")], ["a", "b", "no masks"])
    assert [n.get_text() for n in notes[:2]] == ["a", "b"] and notes[2] is None   # a NaN metric: no label
    plt.close(fig)
