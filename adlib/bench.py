"""``python -m adlib.bench [--quick] [--out DIR] [--only KERNEL ...]``: adlib's kernels against their peers.

Every kernel and its peers run in this one process on the same inputs. The table gives median
times, ``speedup = peer_s / adlib_s``, extra peak memory (RSS on the CPU, allocated bytes on CUDA)
and ``max_rel_err``, the largest relative difference of the peer's result from adlib's (for the
coreset: ``(peer radius - adlib radius) / adlib radius`` of the coverage radius; positive = the
peer covers worse). The ``floor`` row of k-NN is the bare matrix product of the same shapes,
tiled, with the best BLAS here.

Peers come from the ``bench`` extra (``pip install -e .[bench]``): anomalib (its own PatchCore
nearest-neighbour search, KCenterGreedy, PaDiM Gaussian and distance) and faiss-cpu; a peer that
is not installed is reported as skipped. Writes ``bench.md`` and ``bench.csv`` to ``--out``.

The coreset rows run on synthetic banks of 100k, 300k and 1M points (``--quick``: 20k), clustered
(300 tight Gaussian clusters: pruning pays) and unclustered (isotropic: every step is dense):
adlib's exact greedy against the plain loop, patchcore-inspection's approximate greedy and
anomalib's KCenterGreedy for ``n = 1000`` (a peer too slow to run in full is timed over its first
100 steps and scaled, and its row says so), then adlib's chunked greedy against its exact one at
a PatchCore-like ratio (``coreset chunked`` rows: ``speedup`` = exact time / chunked time,
``max_rel_err`` = exact radius / chunked radius - 1 in the original space, so negative; the
radius ratios chunked / exact in both spaces are printed).

The ``stream`` row times the semi-formula anomaly stream against the training step it feeds,
on the same device (``speedup`` = how many times faster the stream makes images than training
uses them).

``--only methods`` runs whole methods instead: adlib's and anomalib's own PaDiM and PatchCore on
the same MVTec category, weights and image size (see :mod:`adlib.peers`), and writes
``methods.md`` and ``methods.csv``; ``--train-limit N`` caps the training images (``--quick``: 40),
``--methods`` picks padim and/or patchcore. ``--only patchcore-gap`` measures where the two
PatchCores' maps differ, one switch at a time over three coreset seeds (see
:func:`adlib.peers.patchcore_gap_study`; 80 training images, 40 with ``--quick``, unless ``--train-limit``), and writes
``patchcore_gap.md`` and ``patchcore_gap.csv``.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import threading
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import kernels
from .kernels import in_threads
from .kernels.chunked_coreset import DEFAULT_CHUNK_POINTS
from .kernels.coreset import plain_greedy_coreset
from .kernels.neighbours import cpu_tile_sizes
from .evaluate import PeakMemory, return_free_memory
from .settings import default_device

COLUMNS = ["kernel", "peer", "size", "adlib_s", "peer_s", "speedup", "adlib_peak_mb", "peer_peak_mb", "max_rel_err"]


@dataclass
class Timing:
    seconds: float
    peak_mb: float
    result: Any


def _sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that wall times include it (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], Any], device: torch.device, repeat: int = 3) -> Timing:
    """Median wall time of ``repeat`` runs after one warm-up (none when ``repeat == 1``), and the
    extra peak memory of one run over what was in use before it; free memory is given back to
    the system first (:func:`adlib.evaluate.return_free_memory`)."""
    result = None
    if repeat > 1:
        result = fn()
        _sync(device)
    return_free_memory()
    with PeakMemory(device) as peak:
        base = peak.peak_mb
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            result = fn()
            _sync(device)
            times.append(time.perf_counter() - start)
    extra = peak.peak_mb - (base if device.type == "cpu" else 0.0)
    return Timing(statistics.median(times), max(extra, 0.0), result)


def _rel_err(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    ours, theirs = ours.double().cpu(), theirs.double().cpu()
    scale = ours.abs().clamp_min(1e-6)
    return float(((theirs - ours).abs() / scale).max())


def _row(kernel: str, peer: str, size: str, ours: Timing, theirs: Timing | None, err: float | None) -> dict:
    if theirs is None:
        return {"kernel": kernel, "peer": peer, "size": size, "adlib_s": ours.seconds, "peer_s": None,
                "speedup": None, "adlib_peak_mb": ours.peak_mb, "peer_peak_mb": None, "max_rel_err": None}
    return {"kernel": kernel, "peer": peer, "size": size, "adlib_s": ours.seconds, "peer_s": theirs.seconds,
            "speedup": theirs.seconds / ours.seconds, "adlib_peak_mb": ours.peak_mb,
            "peer_peak_mb": theirs.peak_mb, "max_rel_err": err}


def _try_import(name: str):
    try:
        return __import__(name, fromlist=["_"])
    except Exception as err:  # noqa: BLE001 - a missing or broken peer is reported, not fatal
        print(f"  (peer {name} unavailable: {type(err).__name__}: {err})")
        return None


# ---------------------------------------------------------------------------------------------
# k-NN
# ---------------------------------------------------------------------------------------------

def _threaded_products(queries: np.ndarray, bank: np.ndarray) -> None:
    """The products of k-NN as adlib runs them on the CPU (one single-threaded BLAS per core,
    small tiles), without the reduction."""
    n_threads = torch.get_num_threads()
    tile_q, tile_b = cpu_tile_sizes(len(queries), len(bank), queries.shape[1], 256 / n_threads)
    bank_t = np.ascontiguousarray(bank.T)
    buffers = threading.local()

    def work(q0: int, q1: int) -> None:
        if not hasattr(buffers, "tile"):
            buffers.tile = np.empty((tile_q, tile_b), dtype=np.float32)
        a = queries[q0:q1]
        for b0 in range(0, bank_t.shape[1], tile_b):
            b = bank_t[:, b0:b0 + tile_b]
            np.matmul(a, b, out=buffers.tile[: a.shape[0], : b.shape[1]])
    in_threads(len(queries), tile_q, work)


def bench_knn(n_query: int, n_bank: int, dim: int, device: torch.device, repeat: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    # ReLU-like non-negative features with a common offset, as real CNN patch features are
    queries = torch.rand(n_query, dim, generator=g).pow(2).to(device)
    bank = torch.rand(n_bank, dim, generator=g).pow(2).to(device)
    size = f"Q={n_query} M={n_bank} D={dim}"
    ours = measure(lambda: kernels.knn(queries, bank, k=1), device, repeat)
    ref_d = ours.result[0][:, 0]
    rows = []

    tile_q, tile_b = 4096, 16384
    out = torch.empty(min(tile_q, n_query), min(tile_b, n_bank), device=device)

    def floor() -> None:
        """The same products, tile by tile into one buffer: the distance cannot beat this."""
        for q0 in range(0, n_query, tile_q):
            for b0 in range(0, n_bank, tile_b):
                a, b = queries[q0:q0 + tile_q], bank[b0:b0 + tile_b]
                o = out[: a.shape[0], : b.shape[0]]
                if device.type == "cpu":   # the best BLAS here: NumPy's (see kernels.neighbours._scan_cpu)
                    np.matmul(a.numpy(), b.numpy().T, out=o.numpy())
                else:
                    torch.mm(a, b.T, out=o)
    t = measure(floor, device, repeat)
    if device.type == "cpu":              # the floor is the faster of the two ways to run the products
        threaded = measure(lambda: _threaded_products(queries.numpy(), bank.numpy()), device, repeat)
        t = threaded if threaded.seconds < t.seconds else t
    rows.append(_row("knn", "floor", size, ours, t, None))

    def cdist() -> torch.Tensor:
        out = []
        for chunk in queries.split(4096):
            out.append(torch.cdist(chunk, bank).min(1).values)
        return torch.cat(out)
    t = measure(cdist, device, repeat)
    rows.append(_row("knn", "torch.cdist+min", size, ours, t, _rel_err(ref_d, t.result)))

    patchcore = _try_import("anomalib.models.image.patchcore.torch_model")
    if patchcore is not None:
        model = types.SimpleNamespace(memory_bank=bank, euclidean_dist=patchcore.PatchcoreModel.euclidean_dist)
        t = measure(lambda: patchcore.PatchcoreModel.nearest_neighbors(model, queries, 1)[0], device, repeat)
        rows.append(_row("knn", "anomalib PatchcoreModel.nearest_neighbors", size, ours, t,
                         _rel_err(ref_d, t.result.flatten())))
    else:
        rows.append(_row("knn", "anomalib (not installed)", size, ours, None, None))

    faiss = _try_import("faiss")
    if faiss is not None and device.type == "cpu":
        def faiss_search() -> torch.Tensor:
            index = faiss.IndexFlatL2(dim)
            index.add(bank.numpy())
            dist2, _ = index.search(queries.numpy(), 1)
            return torch.from_numpy(np.sqrt(np.maximum(dist2[:, 0], 0)))
        t = measure(faiss_search, device, repeat)
        rows.append(_row("knn", "faiss IndexFlatL2", size, ours, t, _rel_err(ref_d, t.result)))
    return rows


# ---------------------------------------------------------------------------------------------
# Coreset
# ---------------------------------------------------------------------------------------------

def _approximate_greedy(features: torch.Tensor, n: int, proj_dim: int, seed: int, n_start: int = 10) -> torch.Tensor:
    """patchcore-inspection's approximate greedy coreset, written from its description: the
    distances start as the mean distance to a few random points, then the greedy loop runs on
    those approximate distances, reading all points every step."""
    x = kernels.random_projection(features, proj_dim, seed)
    g = torch.Generator().manual_seed(seed)
    starts = torch.randperm(x.shape[0], generator=g)[:n_start]
    dist = torch.cdist(x, x[starts]).mean(1, keepdim=True)
    chosen = []
    for _ in range(n):
        new = int(torch.argmax(dist))
        chosen.append(new)
        dist = torch.minimum(dist, torch.cdist(x, x[new:new + 1]))
    return torch.tensor(chosen)


def coreset_features(n_points: int, dim: int, kind: str, seed: int = 1) -> torch.Tensor:
    """Bench banks ``(n_points, dim)``: ``"clustered"``, a mixture of 300 tight Gaussian clusters
    (pruning pays, as on real patch features of one product), or ``"unclustered"``, an isotropic
    Gaussian (pruning never pays: every step of the exact greedy is dense)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "unclustered":
        return torch.randn(n_points, dim, generator=g)
    if kind != "clustered":
        raise ValueError(f"kind must be clustered or unclustered, got {kind!r}")
    centres = 3 * torch.randn(300, dim, generator=g)
    return centres[torch.randint(300, (n_points,), generator=g)] + 0.5 * torch.randn(n_points, dim, generator=g)


#: A peer loop that reads all points each step is run in full when ``N * n`` is at most this;
#: beyond, ``CORESET_STEPS`` steps are timed and the time scaled to ``n`` steps, and the row says so.
PEER_FULL_WORK = 10**8
CORESET_STEPS = 100


def _peer_row(name: str, size: str, ours: Timing, run: Callable[[int], torch.Tensor], features: torch.Tensor,
              n: int, radius: float, device: torch.device) -> dict:
    """One peer of the exact greedy: its full run (with the radius difference), or its first
    :data:`CORESET_STEPS` steps timed and scaled to ``n`` (no radius), said in the peer's name."""
    if features.shape[0] * n <= PEER_FULL_WORK:
        t = measure(lambda: run(n), device, 1)
        return _row("coreset", name, size, ours, t, (kernels.covering_radius(features, t.result) - radius) / radius)
    t = measure(lambda: run(CORESET_STEPS), device, 1)
    scaled = Timing(t.seconds * n / CORESET_STEPS, t.peak_mb, t.result)
    return _row("coreset", f"{name} (time of {CORESET_STEPS} steps x {n / CORESET_STEPS:g})", size, ours, scaled, None)


def bench_coreset(n_points: int, dim: int, kind: str, n: int, device: torch.device) -> list[dict]:
    """adlib's exact greedy (pruned or dense steps) against the plain loop, patchcore-inspection's
    approximate greedy and anomalib's KCenterGreedy: ``n`` points of ``n_points``."""
    features = coreset_features(n_points, dim, kind).to(device)
    size = f"N={n_points} D={dim} n={n} {kind}"
    ours = measure(lambda: kernels.greedy_coreset(features, n=n, proj_dim=128), device, 1)
    radius = kernels.covering_radius(features, ours.result)
    rows = [_peer_row("plain greedy loop", size, ours, lambda m: plain_greedy_coreset(features, m, proj_dim=128),
                      features, n, radius, device)]
    if n_points * n > PEER_FULL_WORK:       # the same selection: its first steps agree with ours
        first = plain_greedy_coreset(features, 10, proj_dim=128)
        assert torch.equal(first, ours.result[:10].cpu()), "the plain loop's first steps differ from the exact greedy"
    rows.append(_peer_row("approximate greedy (patchcore-inspection)", size, ours,
                          lambda m: _approximate_greedy(features, m, 128, 0), features, n, radius, device))
    sampling = _try_import("anomalib.models.components.sampling")
    if sampling is not None:
        def anomalib_greedy(m: int) -> torch.Tensor:
            ratio = m / n_points + 0.5 / n_points   # anomalib takes int(N * ratio) points
            return torch.as_tensor(sampling.KCenterGreedy(features, ratio).select_coreset_idxs())
        rows.append(_peer_row("anomalib KCenterGreedy", size, ours, anomalib_greedy, features, n, radius, device))
    else:
        rows.append(_row("coreset", "anomalib (not installed)", size, ours, None, None))
    return rows


def bench_chunked_coreset(n_points: int, dim: int, kind: str, ratio: float, chunk_points: int, run_exact: bool,
                          device: torch.device) -> list[dict]:
    """adlib's chunked greedy (linear in N) against its exact greedy on the same bank, ``ratio`` of
    it: ``speedup`` = exact time / chunked time, ``max_rel_err`` = exact radius / chunked radius - 1
    in the original feature space (negative: the exact greedy covers better; -0.13 is the 1.15x
    bar); both spaces' ratios chunked / exact are printed. Without ``run_exact`` (its ``K * N``
    distances would not finish) only the chunked time is given."""
    from .kernels.chunked_coreset import DEFAULT_OVERSAMPLE, chunked_greedy_coreset

    features = coreset_features(n_points, dim, kind).to(device)
    n = max(1, round(n_points * ratio))
    size = f"N={n_points} D={dim} n={n} {kind}"
    kernel = f"coreset chunked ({chunk_points}-row chunks, oversample {DEFAULT_OVERSAMPLE:g})"
    chunked = measure(lambda: chunked_greedy_coreset(features, n=n, chunk_points=chunk_points), device, 1)
    if not run_exact:
        print(f"  chunked {chunked.seconds:.1f} s; exact not run")
        return [_row(kernel, "exact greedy (adlib; not run: K * N distances)", size, chunked, None, None)]
    exact = measure(lambda: kernels.greedy_coreset(features, n=n, proj_dim=128), device, 1)
    projected = kernels.random_projection(features, 128, 0)
    ratios = {space: kernels.covering_radius(x, chunked.result) / kernels.covering_radius(x, exact.result)
              for space, x in (("original", features), ("projected", projected))}
    print(f"  chunked {chunked.seconds:.1f} s vs exact {exact.seconds:.1f} s; covering radius chunked / exact: "
          f"{ratios['original']:.3f} (original space), {ratios['projected']:.3f} (projected space)")
    return [_row(kernel, "exact greedy (adlib)", size, chunked, exact, 1 / ratios["original"] - 1)]


# ---------------------------------------------------------------------------------------------
# Per-position Gaussian + Mahalanobis
# ---------------------------------------------------------------------------------------------

def _adlib_gaussian(embedding: torch.Tensor, batch: int = 32) -> kernels.PositionGaussians:
    acc = kernels.GaussianAccumulator(torch.float32)
    for chunk in embedding.split(batch):
        acc.update(chunk)
    return acc.finalize(0.01)


def _naive_gaussian(embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position: torch.cov, + 0.01 I, torch.linalg.inv, a Python loop over positions."""
    n, c, h, w = embedding.shape
    x = embedding.view(n, c, h * w)
    mean = x.mean(0)
    inv = torch.empty(h * w, c, c)
    eye = torch.eye(c)
    for p in range(h * w):
        inv[p] = torch.linalg.inv(torch.cov(x[:, :, p].T) + 0.01 * eye)
    return mean, inv


def _naive_distance(test: torch.Tensor, mean: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    b, c, h, w = test.shape
    x = test.view(b, c, h * w)
    out = torch.empty(b, h * w)
    for p in range(h * w):
        d = x[:, :, p] - mean[:, p]
        out[:, p] = ((d @ inv[p]) * d).sum(1).sqrt()
    return out


def bench_mahalanobis(n_train: int, channels: int, side: int, device: torch.device, repeat: int) -> list[dict]:
    g = torch.Generator().manual_seed(2)
    mix = torch.randn(channels, channels, generator=g) / math.sqrt(channels)
    train = (torch.randn(n_train, side * side, channels, generator=g) @ mix).permute(0, 2, 1)
    train = train.reshape(n_train, channels, side, side).contiguous().to(device)
    test = train[:8] + 0.5 * torch.randn(8, channels, side, side, generator=g).to(device)
    size = f"N={n_train} C={channels} P={side}x{side}"
    rows = []
    fit = measure(lambda: _adlib_gaussian(train), device, 1)
    gauss = fit.result
    dist_repeat = max(repeat, 5)   # tens of milliseconds: one run is noise
    dist = measure(lambda: gauss.mahalanobis(test), device, dist_repeat)
    ref = dist.result
    anomalib_gauss = _try_import("anomalib.models.components.stats.multi_variate_gaussian")
    anomalib_map = _try_import("anomalib.models.image.padim.anomaly_map")
    if anomalib_gauss is not None and anomalib_map is not None:
        try:
            t_fit = measure(lambda: anomalib_gauss.MultiVariateGaussian().fit(train), device, 1)
            stats = t_fit.result
            t_dist = measure(lambda: anomalib_map.AnomalyMapGenerator.compute_distance(test, stats), device,
                             dist_repeat)
            theirs = t_dist.result.view(test.shape[0], -1)
            err = _rel_err(ref, theirs)
            rows.append(_row("gaussian_fit", "anomalib MultiVariateGaussian.fit", size, fit, t_fit, err))
            rows.append(_row("mahalanobis", "anomalib AnomalyMapGenerator.compute_distance", size, dist, t_dist, err))
        except Exception as error:  # noqa: BLE001 - anomalib's fit has crashed on this CPU build
            print(f"  anomalib PaDiM failed: {type(error).__name__}: {error}")
            rows.append(_row("gaussian_fit", f"anomalib (failed: {type(error).__name__})", size, fit, None, None))
    if device.type == "cpu" and channels <= 200:
        t_fit = measure(lambda: _naive_gaussian(train), device, 1)
        mean, inv = t_fit.result
        t_dist = measure(lambda: _naive_distance(test, mean, inv), device, 1)
        err = _rel_err(ref, t_dist.result)
        rows.append(_row("gaussian_fit", "naive per-position torch.linalg.inv", size, fit, t_fit, err))
        rows.append(_row("mahalanobis", "naive per-position loop", size, dist, t_dist, err))
    return rows


# ---------------------------------------------------------------------------------------------
# Blobs
# ---------------------------------------------------------------------------------------------

def _blobs_loop(images: torch.Tensor, params: kernels.BlobParams, mask_level: float = 2.0) -> torch.Tensor:
    """The same blobs, one image and one component at a time, each cut off at its ellipse."""
    b, c, h, w = images.shape
    ys = (torch.arange(h, device=images.device) + 0.5) / h
    xs = (torch.arange(w, device=images.device) + 0.5) / w
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    out = images.clone()
    for i in range(b):
        for k in range(params.active.shape[1]):
            if not params.active[i, k]:
                continue
            cy, cx = params.centre[i, k]
            sy, sx = params.sigma[i, k]
            t = params.angle[i, k]
            u = ((xx - cx) * torch.cos(t) + (yy - cy) * torch.sin(t)) / sx
            v = (-(xx - cx) * torch.sin(t) + (yy - cy) * torch.cos(t)) / sy
            q = u * u + v * v
            blob = params.amplitude[i, k] * torch.exp(-0.5 * q) * (q <= mask_level ** 2)
            out[i] += blob * params.colour[i].view(c, 1, 1)
    return out


def _blob_rims(params: kernels.BlobParams, h: int, w: int, mask_level: float = 2.0, tol: float = 1e-4) -> torch.Tensor:
    """``(B, 1, H, W)``: pixels within ``tol`` (relative) of some active component's cut-off ellipse,
    where float32 rounding decides whether the component is in or out (a jump of e^-2 = 13.5% of
    its amplitude); comparisons of two implementations leave them out."""
    ys = ((torch.arange(h, dtype=torch.float64, device=params.centre.device) + 0.5) / h)[:, None]
    xs = (torch.arange(w, dtype=torch.float64, device=params.centre.device) + 0.5) / w
    cy, cx = (params.centre[..., i].double()[..., None, None] for i in (0, 1))
    sy, sx = (params.sigma[..., i].double()[..., None, None] for i in (0, 1))
    cos, sin = (f(params.angle.double())[..., None, None] for f in (torch.cos, torch.sin))
    u = ((xs - cx) * cos + (ys - cy) * sin) / sx
    v = (-(xs - cx) * sin + (ys - cy) * cos) / sy
    near = ((u * u + v * v) / mask_level ** 2 - 1).abs() < tol
    return (near & params.active[..., None, None]).any(1, keepdim=True)


def bench_blobs(n_images: int, side: int, device: torch.device, repeat: int) -> list[dict]:
    images = torch.rand(n_images, 3, side, side, generator=torch.Generator().manual_seed(3)).to(device)
    size = f"B={n_images} 3x{side}x{side}"

    def ours_fn():
        return kernels.gmm_blobs(images, generator=torch.Generator(device=device).manual_seed(0))
    ours = measure(ours_fn, device, repeat)
    params = ours.result[2]
    t = measure(lambda: _blobs_loop(images, params), device, 1)
    change = (ours.result[0] - images).abs().max()
    clear = ~_blob_rims(params, side, side)                          # the rims: float32 decides in or out
    err = float(((t.result - ours.result[0]).abs() * clear).max() / change)   # relative to the largest blob value
    return [_row("gmm_blobs", "per-image Python loop", size, ours, t, err)]


def blob_stream_rate(batch: int, side: int, device: torch.device, seconds: float) -> float:
    """Anomalous images a minute when streaming batches of ``batch`` images (3 x side x side), all
    made from one normal image and none held, for about ``seconds`` (at least two batches): the
    issue's GPU bar is 1,000,000 a minute at 224 x 224."""
    normal = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(4)).to(device)
    images = normal.expand(batch, -1, -1, -1)
    generator = torch.Generator(device=device).manual_seed(0)
    kernels.gmm_blobs(images, generator=generator)                       # warm-up
    _sync(device)
    made, start = 0, time.perf_counter()
    while made < 2 * batch or time.perf_counter() - start < seconds:
        kernels.gmm_blobs(images, generator=generator)
        made += batch
        _sync(device)
    rate = made / (time.perf_counter() - start) * 60
    print(f"  blobs streamed: {made:,} images of 3x{side}x{side} in batches of {batch}: "
          f"{rate / 1e6:.3f} million a minute")
    return rate


def bench_semi_formula_stream(batch: int, side: int, device: torch.device, repeat: int) -> list[dict]:
    """The semi-formula stream against the training step it feeds, on the same device: one batch of
    ``batch`` anomalous images (3 x side x side, drawn from 16 normal images) vs one optimizer step
    of :mod:`adlib.pretrain.semi_formula` on such a batch (EfficientNet-Lite0, ``batch`` pairs).
    ``speedup`` = step time / stream time = how many times faster the stream makes images than
    training consumes them (the bar: at least 5)."""
    from .pretrain.semi_formula import SemiFormulaNet, SemiFormulaRecipe, SemiFormulaStream, semi_formula_losses
    from .train import autocast

    recipe = SemiFormulaRecipe(batch_size=batch, images=batch * 1000)
    normals = torch.randn(16, 3, side, side, generator=torch.Generator().manual_seed(5))
    stream = SemiFormulaStream(normals, recipe, device)
    counter = iter(range(1 << 30))
    ours = measure(lambda: stream.samples(next(counter)), device, max(repeat, 5))
    net = SemiFormulaNet(recipe.backbone, recipe.strides).to(device)
    optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=recipe.lr)
    fixed = stream.samples(0)

    amp_context, _ = autocast(device, True)      # as the training loop runs it: mixed precision on CUDA

    def step() -> float:
        with amp_context:
            losses = semi_formula_losses(net(torch.cat([fixed["normal"], fixed["anomalous"]])), fixed, recipe)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()
        return float(losses["loss"].detach())
    theirs = measure(step, device, repeat)
    print(f"  stream {batch / ours.seconds:,.0f} images/s; training {batch / theirs.seconds:,.1f} pairs/s; "
          f"ratio {theirs.seconds / ours.seconds:,.1f}x (bar: 5x)")
    return [_row("semi_formula stream", "its training step (Lite0)", f"B={batch} 3x{side}x{side}", ours, theirs, None)]


# ---------------------------------------------------------------------------------------------

SIZES = {
    "quick": {"knn": [(6272, 16384, 152), (6272, 16384, 1536)],
              "coreset": [(20480, 152, "clustered", 200), (20480, 152, "unclustered", 200)],
              "coreset_chunked": [(20480, 152, "clustered", 0.1, 4096, True),
                                  (20480, 152, "unclustered", 0.1, 4096, True)],
              "mahalanobis": [(64, 100, 28)], "blobs": [(64, 224)], "stream": [(8, 128)]},
    "full": {"knn": [(39200, 16384, 152), (39200, 163840, 152), (39200, 16384, 1536)],
             "coreset": [(n, 152, kind, 1000) for n in (100_000, 300_000, 1_000_000)
                         for kind in ("clustered", "unclustered")],
             "coreset_chunked": [(n, 152, kind, ratio, DEFAULT_CHUNK_POINTS, n < 10**6)
                                 for n, ratio in ((100_000, 0.1), (300_000, 0.01), (1_000_000, 0.1))
                                 for kind in ("clustered", "unclustered")],
             "mahalanobis": [(209, 100, 56), (209, 550, 56)],
             "blobs": [(256, 224)], "stream": [(8, 256), (64, 256)]},
}


def bench_export(detector: Any, pixels: torch.Tensor, path: Path, repeat: int = 3, threads: int | None = None
                 ) -> dict:
    """One fitted detector: adlib's ``predict`` against the exported ONNX graph in onnxruntime on
    the same ``pixels (B, 3, S, S)`` in [0, 1], both on the CPU. The row's times are per image
    (``adlib_s``, ``peer_s``); ``speedup`` is onnxruntime's time over adlib's, as in every row (above 1:
    adlib is faster); ``max_rel_err``
    compares the maps (relative to each map's largest value)."""
    from .data import normalize
    from .deploy import ExportedDetector, max_relative_error
    from .export import export_onnx

    export_onnx(detector, path)
    cpu = torch.device("cpu")
    exported = ExportedDetector(path, providers=["CPUExecutionProvider"], threads=threads or torch.get_num_threads())
    images = normalize(pixels)
    ours = measure(lambda: detector.predict(images), cpu, repeat)
    theirs = measure(lambda: exported.predict(pixels.numpy()), cpu, repeat)
    err = max_relative_error(theirs.result[1], ours.result[1].cpu().numpy())
    n = len(pixels)
    side = pixels.shape[-1]
    return _row(f"{detector.name} predict", "onnxruntime", f"{n} images {side}px",
                Timing(ours.seconds / n, ours.peak_mb, None), Timing(theirs.seconds / n, theirs.peak_mb, None), err)


def run_export(category: str, methods: tuple[str, ...], side: int, train_limit: int, n_images: int,
               out: Path, repeat: int = 3) -> list[dict]:
    """Fit each method on ``category``'s first ``train_limit`` training images at ``side`` px, then
    :func:`bench_export` on ``n_images`` of its test images; writes ``export.md``/``export.csv``."""
    from .data import MVTecDataset, find_data_root, load_split, train_batches
    from .detectors import get_detector

    root = find_data_root()
    train = MVTecDataset(root, category, "train", image_size=side, limit=train_limit)
    test = MVTecDataset(root, category, "test", image_size=side, normalize=False)
    pixels = load_split(test)[0][:n_images]
    quick_fit = {"dfr": {"epochs": 3}, "autoencoder": {"epochs": 3}, "densehybrid": {"epochs": 1}}
    rows = []
    for method in methods:
        print(f"export {method}: fit on {len(train)} images, {side} px")
        detector = get_detector(method, device="cpu", **quick_fit.get(method, {})).fit(train_batches(train, 16))
        rows.append(bench_export(detector, pixels, out / f"{method}.onnx", repeat))
    write_table(rows, COLUMNS, out / "export", f"CPU, torch {torch.__version__}, threads {torch.get_num_threads()}; "
                f"times are seconds per image", digits=4)
    return rows


def run(quick: bool, only: list[str] | None, device: torch.device) -> list[dict]:
    sizes = SIZES["quick" if quick else "full"]
    repeat = 3 if quick else 1
    rows: list[dict] = []
    wanted = set(only or ["knn", "coreset", "mahalanobis", "blobs", "stream"])
    if "knn" in wanted:
        for q, m, d in sizes["knn"]:
            print(f"knn Q={q} M={m} D={d}")
            rows += bench_knn(q, m, d, device, repeat)
    if "coreset" in wanted:
        for n_points, d, kind, n in sizes["coreset"]:
            print(f"coreset N={n_points} D={d} n={n} {kind}")
            rows += bench_coreset(n_points, d, kind, n, device)
        for n_points, d, kind, ratio, chunk, run_exact in sizes["coreset_chunked"]:
            print(f"coreset chunked vs exact N={n_points} D={d} ratio={ratio} {kind}")
            rows += bench_chunked_coreset(n_points, d, kind, ratio, chunk, run_exact, device)
    if "mahalanobis" in wanted:
        for n, c, side in sizes["mahalanobis"]:
            print(f"gaussian N={n} C={c} P={side}x{side}")
            rows += bench_mahalanobis(n, c, side, device, repeat)
    if "blobs" in wanted:
        for b, side in sizes["blobs"]:
            print(f"blobs B={b} side={side}")
            rows += bench_blobs(b, side, device, repeat)
            blob_stream_rate(b, side, device, seconds=1.0 if quick else 5.0)
    if "stream" in wanted:
        for b, side in sizes["stream"]:
            if device.type == "cpu" and b > 8:
                continue                      # 64 pairs a step: a GPU size
            print(f"semi-formula stream B={b} side={side}")
            rows += bench_semi_formula_stream(b, side, device, repeat)
    return rows


def to_markdown(rows: list[dict]) -> str:
    def fmt(v: Any, key: str) -> str:
        if v is None:
            return "n/a"
        if isinstance(v, float):
            if key == "speedup":
                return f"{v:.2f}x"
            if key == "max_rel_err":
                return f"{v:.1e}"
            return f"{v:.3f}" if key.endswith("_s") else f"{v:.0f}"
        return str(v)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt(r[k], k) for k in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adlib.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (minutes on a laptop CPU)")
    parser.add_argument("--out", type=Path, default=Path("bench_out"))
    parser.add_argument("--only", nargs="*", choices=["knn", "coreset", "mahalanobis", "blobs", "stream", "methods",
                                                       "patchcore-gap", "export"])
    parser.add_argument("--device", default=None)
    parser.add_argument("--category", default="bottle", help="MVTec AD category for --only methods / patchcore-gap")
    parser.add_argument("--methods", nargs="*", choices=["padim", "patchcore"], default=["padim", "patchcore"],
                        help="which methods --only methods compares")
    parser.add_argument("--train-limit", type=int, default=None, help="training images for --only methods (default all; --quick 40) / patchcore-gap (default 80; --quick 40)")
    args = parser.parse_args(argv)
    device = default_device(args.device)
    print(f"device: {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    if args.only and "methods" in args.only:
        train_limit = args.train_limit if args.train_limit is not None else (40 if args.quick else None)
        run_methods(args.category, tuple(args.methods), train_limit, device, args.out)
    if args.only and "patchcore-gap" in args.only:
        train_limit = args.train_limit if args.train_limit is not None else (40 if args.quick else 80)
        run_patchcore_gap(args.category, train_limit, device, args.out)
    if args.only and "export" in args.only:
        from .export import EXPORTABLE
        run_export(args.category, EXPORTABLE, 128 if args.quick else 256, args.train_limit or 40,
                   8 if args.quick else 32, args.out)
    if args.only:
        args.only = [k for k in args.only if k not in ("methods", "patchcore-gap", "export")]
        if not args.only:
            return 0
    rows = run(args.quick, args.only, device)
    print(to_markdown(rows))
    save(rows, args.out, device)
    print(f"wrote {args.out / 'bench.md'} and {args.out / 'bench.csv'}")
    return 0


METHOD_COLUMNS = ["method", "library", "category", "image_size", "image_auroc", "pixel_auroc", "aupro", "fit_s",
                  "ms_per_image", "peak_mem_mb", "n_train", "n_test"]


def run_methods(category: str, methods: tuple[str, ...], train_limit: int | None, device: torch.device,
                out: Path) -> list[dict]:
    """adlib vs anomalib, whole methods (:func:`adlib.peers.compare_methods`); writes methods.md/csv."""
    from .peers import compare_methods

    rows = compare_methods(category, train_limit=train_limit, device=str(device), methods=methods)
    write_table(rows, METHOD_COLUMNS, out / "methods", f"device: {device}, torch {torch.__version__}, "
                f"threads {torch.get_num_threads()}", digits=3)
    return rows


def write_table(rows: list[dict], columns: list[str], stem: Path, header: str, digits: int) -> None:
    """Print ``rows`` as a markdown table of ``columns`` (floats to ``digits`` decimals, None as n/a)
    and write it to ``stem.md`` under ``header``, and the rows to ``stem.csv``."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join("n/a" if r[k] is None else f"{r[k]:.{digits}f}" if isinstance(r[k], float)
                                else str(r[k]) for k in columns) + " |" for r in rows]
    table = "\n".join(lines)
    print(table)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text(f"{header}\n\n{table}\n")
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


GAP_COLUMNS = ["input", "border", "image_auroc", "pixel_auroc", "pixel_auroc_min", "pixel_auroc_max", "aupro",
               "aupro_min", "aupro_max", "max_feature_diff_to_anomalib", "n_train"]


def run_patchcore_gap(category: str, train_limit: int, device: torch.device, out: Path) -> list[dict]:
    """Where adlib's and anomalib's PatchCore differ (:func:`adlib.peers.patchcore_gap_study`);
    writes patchcore_gap.md/csv."""
    from .peers import patchcore_gap_study

    rows = [{**r, "n_train": train_limit} for r in
            patchcore_gap_study(category, train_limit=train_limit, device=str(device))]
    write_table(rows, GAP_COLUMNS, out / "patchcore_gap", f"device: {device}, torch {torch.__version__}, threads "
                f"{torch.get_num_threads()}, category {category}", digits=4)
    return rows


def save(rows: list[dict], out: Path, device: torch.device) -> None:
    """Write ``bench.md`` (with the device) and ``bench.csv`` (the columns of :data:`COLUMNS`)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.md").write_text(f"device: {device}, torch {torch.__version__}, threads {torch.get_num_threads()}"
                                  f"\n\n{to_markdown(rows)}\n")
    with open(out / "bench.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    raise SystemExit(main())
