"""Figures with one look: anomaly-map overlays with ground-truth contours, ROC curves, score
histograms and example grids. Every function draws on a given Matplotlib axes (or makes a figure)
and returns the figure."""

from __future__ import annotations

from typing import Any, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import Tensor

from . import metrics
from .data import denormalize

__all__ = ["label_points", "use_style", "show_image", "overlay", "heatmap_rgb", "plot_roc", "plot_score_histogram",
           "plot_pixel_score_histogram", "example_grid",
           "failure_grid", "NORMAL_COLOR", "ANOMALY_COLOR"]

NORMAL_COLOR = "#2b83ba"
ANOMALY_COLOR = "#d7191c"
MAP_CMAP = "inferno"


def use_style() -> None:
    """The book's Matplotlib style: light grid, no top/right spines, readable sizes."""
    plt.rcParams.update({
        "figure.dpi": 110, "savefig.dpi": 110, "axes.grid": True, "grid.alpha": 0.25,
        "axes.spines.top": False, "axes.spines.right": False, "font.size": 10, "axes.titlesize": 10,
        "legend.frameon": False, "image.interpolation": "nearest",
    })


def _to_numpy_image(image: Tensor | np.ndarray, normalized: bool = True) -> np.ndarray:
    if isinstance(image, Tensor):
        image = denormalize(image) if normalized else image.clamp(0, 1)
        return image.detach().cpu().permute(1, 2, 0).numpy()
    return np.asarray(image)


def _np2d(x: Tensor | np.ndarray) -> np.ndarray:
    arr = x.detach().cpu().float().numpy() if isinstance(x, Tensor) else np.asarray(x, dtype=np.float32)
    return arr.reshape(arr.shape[-2:])


def show_image(ax: plt.Axes, image: Tensor | np.ndarray, title: str | None = None, normalized: bool = True) -> None:
    """An image ``(3, H, W)`` (ImageNet-normalized unless ``normalized=False``) without axes."""
    ax.imshow(_to_numpy_image(image, normalized))
    ax.set_axis_off()
    if title:
        ax.set_title(title)


def overlay(ax: plt.Axes, image: Tensor, anomaly_map: Tensor | np.ndarray, mask: Tensor | np.ndarray | None = None,
            vmin: float | None = None, vmax: float | None = None, alpha: float = 0.5, title: str | None = None) -> Any:
    """Heat map ``(H, W)`` over the image ``(3, H, W)``, the ground-truth ``mask`` as a cyan contour.

    Pass one ``vmin``/``vmax`` for all images of a figure so that colours compare across images;
    values below ``vmin`` are left transparent, so the image stays visible where nothing is
    anomalous. Returns the heat-map artist (for a colour bar).
    """
    show_image(ax, image, title)
    values = _np2d(anomaly_map)
    shown = np.ma.masked_less(values, vmin) if vmin is not None else values
    art = ax.imshow(shown, cmap=MAP_CMAP, alpha=alpha, vmin=vmin, vmax=vmax)
    if mask is not None:
        m = _np2d(mask)
        if m.max() > 0:
            ax.contour(m, levels=[0.5], colors="cyan", linewidths=1.0)
    return art


def heatmap_rgb(image: Tensor, anomaly_map: Tensor | np.ndarray, vmin: float, vmax: float,
                alpha: float = 0.5) -> np.ndarray:
    """The overlay as an ``(H, W, 3)`` uint8 array for a PNG file (no figure): the image ``(3, H, W)``
    (ImageNet-normalized), the map ``(H, W)`` coloured on one fixed ``[vmin, vmax]`` scale and blended
    where it is above ``vmin``."""
    from matplotlib import colormaps

    rgb = _to_numpy_image(image)
    level = np.clip((_np2d(anomaly_map) - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
    colour = colormaps[MAP_CMAP](level)[..., :3]
    weight = alpha * (level > 0)[..., None]
    return np.round(255 * ((1 - weight) * rgb + weight * colour)).astype(np.uint8)


def plot_roc(results: dict[str, tuple[Any, Any]], ax: plt.Axes | None = None, title: str = "ROC") -> plt.Figure:
    """ROC curves of several score sets: ``{name: (scores, labels)}``, AUROC in the legend."""
    if ax is None:
        _, ax = plt.subplots(figsize=(4, 4))
    for name, (scores, labels) in results.items():
        fpr, tpr, _ = metrics.roc_curve(scores, labels)
        ax.plot(fpr, tpr, label=f"{name} (AUROC {metrics.auroc(scores, labels):.3f})", lw=1.5)
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
    ax.set(xlabel="false-positive rate", ylabel="true-positive rate", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right")
    return ax.figure


def plot_score_histogram(scores: Any, labels: Any, ax: plt.Axes | None = None, threshold: float | None = None,
                         bins: int = 30, title: str = "image scores") -> plt.Figure:
    """Histograms of normal vs anomalous scores on shared bins, with an optional threshold line."""
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3))
    s = np.asarray(scores.cpu() if isinstance(scores, Tensor) else scores, dtype=np.float64)
    y = np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels).astype(bool)
    edges = np.histogram_bin_edges(s, bins=bins)
    ax.hist(s[~y], bins=edges, alpha=0.6, color=NORMAL_COLOR, label=f"normal (n={int((~y).sum())})")
    ax.hist(s[y], bins=edges, alpha=0.6, color=ANOMALY_COLOR, label=f"anomalous (n={int(y.sum())})")
    if threshold is not None:
        ax.axvline(threshold, color="black", ls="--", lw=1, label=f"threshold {threshold:.3g}")
    ax.set(xlabel="anomaly score", ylabel="images", title=title)
    ax.legend()
    return ax.figure


def plot_pixel_score_histogram(maps: Tensor, labels: Tensor, masks: Tensor, ax: plt.Axes | None = None,
                               title: str = "pixel scores", bins: int = 60) -> float:
    """Densities of normal pixels (all pixels of the normal test images) against defect pixels (inside
    the masks) of ``maps (N, H, W)``, each divided by the median normal pixel's score so that two
    backbones share one scale. ``labels (N,)``, ``masks (N, H, W)`` or ``(N, 1, H, W)``.

    Returns the defect median over the normal median (NaN without defect pixels); the title says it.
    """
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3.2))
    maps = maps.float().cpu()
    masks = masks.cpu().reshape(maps.shape) > 0.5
    normal_px = maps[labels.cpu() == 0].flatten()
    defect_px = maps[masks]
    if len(normal_px) == 0:
        raise ValueError("the test images hold no normal image: there is no normal pixel to compare with")
    scale = normal_px.median()
    top = float(torch.quantile(defect_px / scale, 0.99)) if len(defect_px) else 3.0
    edges = np.linspace(0, top, bins)
    ax.hist((normal_px / scale).numpy(), bins=edges, density=True, alpha=0.6, color=NORMAL_COLOR, label="normal pixels")
    ratio = float("nan")
    if len(defect_px):
        ax.hist((defect_px / scale).numpy(), bins=edges, density=True, alpha=0.6, color=ANOMALY_COLOR,
                label="defect pixels")
        ratio = float(defect_px.median() / scale)
        title = f"{title}: defect median = {ratio:.2f} x normal median"
    ax.set(xlabel="pixel score / median normal pixel score", title=title)
    return ratio


def example_grid(images: Tensor, maps: Tensor | None = None, masks: Tensor | None = None,
                 titles: Sequence[str] | None = None, ncols: int = 6, size: float = 1.9,
                 vmin: float | None = None, vmax: float | None = None) -> plt.Figure:
    """Images ``(N, 3, H, W)`` in a grid; with ``maps (N, H, W)`` as overlays on one colour scale
    (default: the maps' minimum to their 99.9th percentile), with ``masks (N, 1, H, W)`` as contours."""
    n = images.shape[0]
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows + 0.3), squeeze=False)
    if maps is not None and (vmin is None or vmax is None):
        flat = maps.detach().float().cpu().flatten()
        vmin = float(flat.min()) if vmin is None else vmin
        vmax = float(torch.quantile(flat[:: max(1, flat.numel() // 1_000_000)], 0.999)) if vmax is None else vmax
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.set_axis_off()
            continue
        title = titles[i] if titles is not None else None
        mask = masks[i] if masks is not None else None
        if maps is not None:
            overlay(ax, images[i], maps[i], mask, vmin=vmin, vmax=vmax, title=title)
        else:
            show_image(ax, images[i], title)
            if mask is not None and float(mask.max()) > 0:
                ax.contour(_np2d(mask), levels=[0.5], colors="cyan", linewidths=1.0)
    fig.tight_layout()
    return fig


def failure_grid(evaluation: Any, images: Tensor, k: int = 3, size: float = 2.4) -> plt.Figure:
    """Three rows of ``k`` test images with their maps and masks: the top-scoring defects, the
    highest-scoring normal images (false alarms first) and the lowest-scoring defects (misses
    first). ``evaluation`` is an :class:`adlib.Evaluation`; ``images (N, 3, H, W)`` in test order.

    The colour scale is set by the normal images: transparent below the 99th percentile of their
    pixels,
    saturated at twice their hottest pixel, so what stands out is what normal variation does not
    explain, and a miss shows whatever faint response it has."""
    scores, labels = evaluation.scores, evaluation.labels
    order = torch.argsort(scores, descending=True).tolist()
    defects_high = [i for i in order if labels[i] == 1][:k]
    normals_high = [i for i in order if labels[i] == 0][:k]
    defects_low = [i for i in reversed(order) if labels[i] == 1][:k]
    picks = defects_high + normals_high + defects_low
    titles = [f"{evaluation.defects[i]} s={float(scores[i]):.3g}" for i in picks]
    normal_maps = evaluation.maps[labels == 0].flatten()
    sample = normal_maps[:: max(1, normal_maps.numel() // 1_000_000)]
    vmin = float(torch.quantile(sample, 0.99)) if normal_maps.numel() else None
    # twice the hottest normal pixel (not the normal score, which may be a mean rather than a max)
    vmax = 2.0 * float(normal_maps.max()) if normal_maps.numel() else None
    fig = example_grid(images[picks], evaluation.maps[picks], evaluation.masks[picks][:, None], titles=titles,
                       ncols=k, size=size, vmin=vmin, vmax=vmax)
    fig.suptitle("rows: top-scoring defects / highest-scoring normals / lowest-scoring defects", y=1.02)
    return fig


# Offsets (points) tried in turn for a point's label: right of it above, below, left above, below, then further out.
_LABEL_OFFSETS = [(dx, dy) for dy in (4, -11, 15, -22, 26, -33, 37, -44) for dx in (5, -5)]
_NEAR_ROWS = 15     # labels offset further than this (points) get a leader line to their point


def _annotate(ax: plt.Axes, text: str, xy: tuple[float, float], offset: tuple[int, int], fontsize: float,
              color: Any, leader: bool = False) -> Any:
    arrow = dict(arrowstyle="-", lw=0.6, color=color, shrinkA=1, shrinkB=4) if leader else None
    return ax.annotate(text, xy, textcoords="offset points", xytext=offset, fontsize=fontsize, color=color,
                       ha="left" if offset[0] > 0 else "right", arrowprops=arrow)


def label_points(ax: plt.Axes, xs: Any, ys: Any, labels: list[str], fontsize: float = 8.0,
                 pad: float = 1.5, colors: Sequence[Any] | None = None) -> list[Any | None]:
    """Write ``labels[i]`` beside the point ``(xs[i], ys[i])`` (data coordinates) so that no two labels
    overlap each other or a point: each label takes the first offset in ``_LABEL_OFFSETS`` whose box
    (``pad`` pixels around the text) meets no point and no label placed before it; the points are
    labelled from the top down. A label pushed beyond the nearest rows of offsets gets a thin leader
    line to its point, and with ``colors`` each label is written in its point's colour, so a crowded
    label still names the right point. A point with a non-finite coordinate (a metric that is NaN on a
    data set without masks) gets no label (``None``). Call it after the points are drawn and the
    scales set. Returns the annotations, in the order of ``labels``."""
    from matplotlib.transforms import Bbox

    ax.autoscale_view()
    renderer = ax.figure.canvas.get_renderer()
    points = np.column_stack([np.asarray(xs, float), np.asarray(ys, float)])
    drawable = [i for i in range(len(labels)) if np.isfinite(points[i]).all()]
    centres = ax.transData.transform(points[drawable]) if drawable else np.empty((0, 2))
    marker = 4.0 * ax.figure.dpi / 72          # about a marker's radius, in pixels
    placed: list[Any] = [Bbox.from_extents(x - marker, y - marker, x + marker, y + marker) for x, y in centres]
    annotations: dict[int, Any] = {}
    for i in sorted(drawable, key=lambda k: -points[k, 1]):
        color = "black" if colors is None else colors[i]
        for offset in _LABEL_OFFSETS:
            note = _annotate(ax, labels[i], (xs[i], ys[i]), offset, fontsize, color)
            box = note.get_window_extent(renderer).padded(pad)
            if not any(box.overlaps(other) for other in placed):
                break
            note.remove()
        else:   # every offset is taken: keep the first one, overlapping
            offset = _LABEL_OFFSETS[0]
            note = _annotate(ax, labels[i], (xs[i], ys[i]), offset, fontsize, color)
            box = note.get_window_extent(renderer).padded(pad)
        if abs(offset[1]) > _NEAR_ROWS:
            note.remove()
            note = _annotate(ax, labels[i], (xs[i], ys[i]), offset, fontsize, color, leader=True)
        placed.append(box)
        annotations[i] = note
    return [annotations.get(i) for i in range(len(labels))]
