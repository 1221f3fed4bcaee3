"""adlib.viz: the figures have the promised layout and colour conventions."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

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


def test_failure_grid_colour_scale_works_for_mean_scores():
    """A detector whose score is the map's mean (the autoencoder) still gets vmin < vmax."""
    ev = _evaluation()
    ev.scores = ev.maps.mean((1, 2))
    fig = viz.failure_grid(ev, torch.zeros(9, 3, 16, 16), k=3)
    fig.canvas.draw()  # the colour normalization is checked when drawing
    vmin, vmax = fig.axes[0].images[-1].get_clim()
    assert vmin < vmax and vmax == 2 * float(ev.maps[ev.labels == 0].max())
