"""adlib.kernels against float64 references: knn, greedy coreset, Gaussian fit + Mahalanobis, blobs.

Runs twice in ``make unit``: as is, with the CPU Gaussians on SciPy's BLAS/LAPACK through ctypes,
and with ``ADLIB_NO_CTYPES=1``, on torch's linear algebra only (``test_ctypes_layer_is_in_use``
is skipped then, saying so).
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from adlib import bench, kernels, settings
from adlib.kernels import GaussianAccumulator, _lapack, blobs, gaussian, greedy_coreset, gmm_blobs, knn, mahalanobis
from adlib.kernels import chunked_coreset, coreset
from adlib.kernels.coreset import plain_greedy_coreset


def _brute_knn(q: torch.Tensor, b: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float64, by direct differences (no norm expansion, so duplicates give exactly 0)."""
    d = ((q.double()[:, None, :] - b.double()[None]) ** 2).sum(-1).sqrt()
    return d.topk(k, dim=1, largest=False)


def _assert_knn_matches(q, b, k, budget_mb=256.0):
    dist, idx = knn(q, b, k=k, budget_mb=budget_mb)
    ref_d, _ = _brute_knn(q, b, k)
    assert dist.shape == (q.shape[0], k) and idx.shape == (q.shape[0], k)
    np.testing.assert_allclose(dist.double().numpy(), ref_d.numpy(), rtol=1e-4, atol=1e-6)
    # the returned indices really are at the returned distances
    direct = ((q.double()[:, None, :] - b.double()[idx]) ** 2).sum(-1).sqrt()
    np.testing.assert_allclose(direct.numpy(), dist.double().numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("budget_mb", [0.05, 256.0])  # tiny budget: many tiles over queries and bank
def test_knn_random_data(k, budget_mb):
    g = torch.Generator().manual_seed(0)
    q, b = torch.rand(700, 40, generator=g) * 5, torch.rand(3000, 40, generator=g) * 5
    _assert_knn_matches(q, b, k, budget_mb)


def test_knn_duplicates_are_exactly_zero():
    g = torch.Generator().manual_seed(1)
    b = torch.rand(500, 32, generator=g) + 10.0   # far from the origin: the expansion would cancel badly
    q = torch.cat([b[:50], torch.rand(50, 32, generator=g) + 10.0])
    dist, idx = knn(q, b, k=2)
    assert torch.equal(dist[:50, 0], torch.zeros(50))
    assert torch.equal(idx[:50, 0], torch.arange(50))
    _assert_knn_matches(q, b, 2)


def test_knn_real_features(real_root):
    from adlib.backbones import FeatureExtractor
    from adlib.data import MVTecDataset, load_split

    images, _, _ = load_split(MVTecDataset(real_root, "bottle", "train", image_size=128, limit=6))
    feats = FeatureExtractor(strides=(8,), device="cpu")(images)[8]        # (6, 40, 16, 16)
    patches = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])
    _assert_knn_matches(patches[:256], patches[256:], k=3, budget_mb=1.0)


def test_knn_float64_and_bad_input():
    g = torch.Generator().manual_seed(2)
    q, b = torch.rand(20, 8, generator=g, dtype=torch.float64), torch.rand(50, 8, generator=g, dtype=torch.float64)
    dist, idx = knn(q, b, k=2)
    assert dist.dtype == torch.float64
    ref_d, ref_i = _brute_knn(q, b, 2)                       # float64 all the way: to float64's rounding
    np.testing.assert_allclose(dist.numpy(), ref_d.numpy(), rtol=1e-12, atol=0)
    assert torch.equal(idx, ref_i)
    with pytest.raises(ValueError, match="features"):
        knn(torch.rand(3, 4), torch.rand(5, 6))
    with pytest.raises(ValueError, match="k must be"):
        knn(torch.rand(3, 4), torch.rand(5, 4), k=6)
    with pytest.raises(TypeError, match="half precision"):
        knn(torch.rand(3, 4).half(), torch.rand(5, 4).half())
    with pytest.raises(ValueError, match="empty"):
        knn(torch.rand(3, 4), torch.rand(0, 4))
    d, i = knn(torch.rand(0, 4), torch.rand(5, 4), k=2)
    assert d.shape == (0, 2) and i.shape == (0, 2)


def _clustered(n: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = 4 * torch.randn(30, dim, generator=g)
    return centres[torch.randint(30, (n,), generator=g)] + torch.randn(n, dim, generator=g)


@pytest.mark.parametrize("proj_dim", [16, 0])
def test_coreset_same_selection_as_plain_loop(proj_dim):
    x = _clustered(4000, 48, seed=3)
    fast = greedy_coreset(x, n=300, proj_dim=proj_dim, seed=5)
    plain = plain_greedy_coreset(x, 300, proj_dim=proj_dim, seed=5)
    assert torch.equal(fast, plain)
    assert fast.unique().numel() == 300


def test_coreset_covers_better_than_random():
    x = torch.rand(3000, 3, generator=torch.Generator().manual_seed(4)) ** 3   # uneven density
    chosen = greedy_coreset(x, ratio=0.05, proj_dim=0)
    random = torch.randperm(3000, generator=torch.Generator().manual_seed(0))[: chosen.numel()]
    radius = lambda idx: knn(x, x[idx])[0].max()
    assert radius(chosen) < 0.8 * radius(random)


def test_coreset_bad_arguments():
    x = torch.rand(10, 4)
    with pytest.raises(ValueError, match="exactly one"):
        greedy_coreset(x)
    with pytest.raises(ValueError, match="ratio"):
        greedy_coreset(x, ratio=1.5)
    with pytest.raises(ValueError, match="n must be"):
        greedy_coreset(x, n=11)


def _unclustered(n: int, dim: int, seed: int, offset: float = 0.0) -> torch.Tensor:
    """Isotropic Gaussian: pruning never pays, every step is dense; ``offset`` moves it far from the
    origin, where the norm expansions' rounding is largest."""
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)) + offset


@pytest.mark.parametrize("offset", [0.0, 30.0])
@pytest.mark.parametrize("proj_dim", [16, 0])
def test_coreset_dense_steps_select_as_the_plain_loop(proj_dim, offset):
    x = _unclustered(4000, 48, seed=6, offset=offset)
    projected = coreset.random_projection(x, proj_dim, seed=5)
    result = coreset.greedy_projected(projected, 300, start=7)
    assert result.dense > 250                      # the dense path is what is being checked
    assert torch.equal(result.selected, plain_greedy_coreset(x, 300, proj_dim=proj_dim, seed=5, start=7))
    assert torch.equal(result.selected, greedy_coreset(x, n=300, proj_dim=proj_dim, seed=5, start=7))


def test_coreset_switches_between_pruning_and_dense_steps_exactly():
    """Uneven 3-d points: pruning pays after the first steps, dense steps come first."""
    x = torch.rand(6000, 3, generator=torch.Generator().manual_seed(8)) ** 2
    result = coreset.greedy_projected(x, 400, start=0)
    assert result.dense > 0 and result.pruned > 0
    assert torch.equal(result.selected, plain_greedy_coreset(x, 400, proj_dim=0, start=0))
    radii = result.radii
    assert torch.isinf(radii[0]) and bool((radii[1:-1] >= radii[2:]).all())   # selection radii never grow
    assert result.radius == pytest.approx(float(knn(x, x[result.selected])[0].max()), rel=1e-5)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_coreset_device_path_selects_as_the_plain_loop(device):
    """The sync-free all-dense greedy that runs off the CPU (checked here on the CPU too): the plain
    loop's selection on the same device, radii that never grow, the covering radius."""
    x = coreset.random_projection(_clustered(4000, 48, seed=9), 16, seed=5).to(device)
    result = coreset.greedy_dense_on_device(x, 300, start=11)
    plain = plain_greedy_coreset(x, 300, proj_dim=0, start=11)
    assert torch.equal(result.selected.cpu(), plain.cpu())
    assert result.dense == 299 and result.pruned == 0
    assert result.selected.device == x.device and result.radii.dtype == torch.float64 and result.radii.device.type == "cpu"
    assert torch.equal(result.radii, coreset.greedy_projected(x.cpu(), 300, start=11).radii)   # as the CPU path
    assert torch.isinf(result.radii[0]) and bool((result.radii[1:-1] >= result.radii[2:]).all())
    assert result.radius == pytest.approx(float(knn(x.cpu(), x.cpu()[result.selected.cpu()])[0].max()), rel=1e-5)
    if device != "cpu":
        assert torch.equal(coreset.greedy_projected(x, 300, start=11).selected.cpu(), plain.cpu())


def test_coreset_pruning_on_principal_directions_selects_as_the_plain_loop():
    """Clusters on a 6-d subspace of 48 dims, far from the origin: the pruning test's centre
    distances run on a few principal directions (a lower bound) and must still skip no point that
    moves."""
    g = torch.Generator().manual_seed(9)
    centres = 5 * torch.randn(25, 6, generator=g)
    low = centres[torch.randint(25, (5000,), generator=g)] + torch.randn(5000, 6, generator=g)
    x = low @ torch.randn(6, 48, generator=g) + 0.05 * torch.randn(5000, 48, generator=g) + 20
    result = coreset.greedy_projected(x, 500, start=3)
    assert result.prune_dim < 48 and result.pruned > 400
    assert torch.equal(result.selected, plain_greedy_coreset(x, 500, proj_dim=0, start=3))


def test_coreset_duplicates_and_single_point():
    x = torch.cat([torch.zeros(50, 4), torch.ones(50, 4)])
    assert set(greedy_coreset(x, n=2, proj_dim=0, start=0).tolist()) == {0, 50}
    assert torch.equal(greedy_coreset(x, n=5, proj_dim=0, start=0), plain_greedy_coreset(x, 5, proj_dim=0, start=0))
    assert greedy_coreset(torch.rand(1, 3), n=1).tolist() == [0]


def _mixed(n: int, dim: int, seed: int) -> torch.Tensor:
    """40 clusters of different spreads plus a uniform background, shuffled (no order to exploit)."""
    g = torch.Generator().manual_seed(seed)
    centres, spread = 6 * torch.randn(40, dim, generator=g), 0.3 + 1.5 * torch.rand(40, 1, generator=g)
    k = torch.randint(40, (n,), generator=g)
    x = torch.cat([centres[k] + spread[k] * torch.randn(n, dim, generator=g),
                   torch.rand(n // 5, dim, generator=g) * 16 - 8])
    return x[torch.randperm(x.shape[0], generator=g)]


def test_chunked_coreset_covers_within_115_percent_of_exact():
    x = _mixed(10000, 16, seed=0)
    exact = greedy_coreset(x, ratio=0.1, proj_dim=0)
    chunked = chunked_coreset.chunked_greedy_coreset(x, ratio=0.1, proj_dim=0, chunk_points=4000)
    assert chunked.numel() == exact.numel() == 1200 and chunked.unique().numel() == 1200
    radius = lambda idx: float(knn(x, x[idx])[0].max())
    assert radius(exact) <= radius(chunked) <= 1.15 * radius(exact)


def test_chunked_coreset_same_with_any_number_of_threads():
    x = _mixed(6000, 12, seed=1)
    threads = torch.get_num_threads()
    one = chunked_coreset.chunked_greedy_coreset(x, ratio=0.1, proj_dim=8, chunk_points=1000, threads=1)
    three = chunked_coreset.chunked_greedy_coreset(x, ratio=0.1, proj_dim=8, chunk_points=1000, threads=3)
    assert torch.equal(one, three)
    assert torch.get_num_threads() == threads       # the workers' single-thread setting did not leak


def test_merge_by_radius_keeps_a_prefix_of_every_chunk():
    chunks = [chunked_coreset.ChunkCoreset(0, torch.arange(4), torch.tensor([math.inf, 5.0, 3.0, 1.0]),
                                           torch.zeros(4, 2), None, 0.5),
              chunked_coreset.ChunkCoreset(4, torch.arange(3), torch.tensor([math.inf, 4.0, 3.0]),
                                           torch.zeros(3, 2), None, 2.0)]
    assert chunked_coreset.merge_by_radius(chunks, 5) == [3, 2]     # inf, inf, 5, 4, then the first 3.0
    assert chunked_coreset.merge_by_radius(chunks, 7) == [4, 3]


def test_stream_exact_scheme_is_greedy_coreset_whatever_the_pieces():
    x = _mixed(3000, 10, seed=2)
    stream = chunked_coreset.CoresetStream(0.1, "exact", proj_dim=6, seed=3)
    for piece in x.split(377):
        stream.add(piece)
    rows = stream.finish()
    assert stream.scheme_used == "exact"
    assert torch.equal(stream.indices, greedy_coreset(x, ratio=0.1, proj_dim=6, seed=3))
    assert torch.equal(rows, x[stream.indices])


@pytest.mark.parametrize("n_rows,expected", [(2000, "exact"), (5000, "chunked")])
def test_stream_auto_picks_the_scheme_by_bank_size(n_rows, expected):
    x = _mixed(n_rows, 10, seed=4)[:n_rows]
    stream = chunked_coreset.CoresetStream(0.1, "auto", proj_dim=0, auto_points=3000, chunk_points=1000)
    for piece in x.split(500):
        stream.add(piece)
    rows = stream.finish()
    assert stream.scheme_used == expected and rows.shape == (200 if n_rows == 2000 else 500, 10)
    assert torch.equal(rows, x[stream.indices])
    if expected == "chunked":   # rows held before the switch were chunked like the rest
        assert torch.equal(stream.indices, chunked_coreset.chunked_greedy_coreset(x, ratio=0.1, proj_dim=0,
                                                                                  chunk_points=1000))
        assert stream.radius_bound >= float(knn(x, rows)[0].max()) * (1 - 1e-5)


def test_stream_memory_budget_bounds_the_rows_held_or_fails_clearly():
    x = _mixed(20000, 16, seed=5)
    budget_mb = 1.0                                 # 1,542 rows a chunk with 2 threads
    stream = chunked_coreset.CoresetStream(0.1, "chunked", proj_dim=8, budget_mb=budget_mb, threads=2)
    for piece in x.split(2000):
        stream.add(piece)
    rows = stream.finish()
    assert rows.shape == (2400, 16)
    per_point = chunked_coreset.point_bytes(16, 8)
    assert stream.chunk_rows < 2000 and stream.max_rows_held * per_point <= budget_mb * 2**20
    exact = chunked_coreset.CoresetStream(0.1, "exact", proj_dim=8, budget_mb=budget_mb)
    with pytest.raises(kernels.MemoryBudgetError, match=r"coreset=exact .* need about .* MB.*coreset=chunked"):
        for piece in x.split(2000):
            exact.add(piece)
    assert exact.n_points < x.shape[0]              # it failed as soon as it knew, not at the end


def _reference_mahalanobis(train: np.ndarray, test: np.ndarray, eps: float) -> np.ndarray:
    """float64, position by position, with an explicit inverse: (N, C, P), (B, C, P) -> (B, P)."""
    out = np.empty((test.shape[0], test.shape[2]))
    for p in range(train.shape[2]):
        x = train[:, :, p]
        inv = np.linalg.inv(np.cov(x, rowvar=False) + eps * np.eye(x.shape[1]))
        diff = test[:, :, p] - x.mean(0)
        out[:, p] = np.sqrt(np.einsum("bc,cd,bd->b", diff, inv, diff))
    return out


# buffer_mb 0.005 holds 3 of these images: batches of 16 are split across many flushes
@pytest.mark.parametrize("dtype,buffer_mb", [(torch.float64, None), (torch.float32, None), (torch.float32, 0.005)])
def test_streaming_gaussian_matches_float64(dtype, buffer_mb):
    g = torch.Generator().manual_seed(6)
    train = torch.randn(50, 12, 5, 6, generator=g) * 3 + 7   # offset: tests the shifted sums
    test = torch.randn(4, 12, 5, 6, generator=g) * 3 + 7
    acc = GaussianAccumulator(dtype=dtype, buffer_mb=buffer_mb)
    for chunk in train.split(16):
        acc.update(chunk)
    gauss = acc.finalize(eps=0.01)
    ref = _reference_mahalanobis(train.flatten(2).double().numpy(), test.flatten(2).double().numpy(), 0.01)
    np.testing.assert_allclose(gauss.mahalanobis(test).double().numpy(), ref, rtol=1e-4)
    np.testing.assert_allclose(gauss.mean.double().numpy(), train.flatten(2).double().mean(0).t().numpy(), rtol=1e-5)
    small_budget = mahalanobis(test, gauss.mean, gauss.chol, budget_mb=0.001)   # one position per chunk
    np.testing.assert_allclose(small_budget.double().numpy(), ref, rtol=1e-4)


def test_many_channels_lapack_path_matches_float64(monkeypatch):
    """C >= 160: the CPU distance is one LAPACK solve per position; the factor is exactly lower
    triangular and reproduces the covariance; the torch path gives the same distances."""
    g = torch.Generator().manual_seed(8)
    channels = gaussian._LAPACK_SOLVE_MIN_CHANNELS + 10
    train = torch.randn(channels + 30, channels, 2, 3, generator=g) + 2
    test = torch.randn(3, channels, 2, 3, generator=g) + 2
    acc = GaussianAccumulator(dtype=torch.float32)
    for chunk in train.split(64):
        acc.update(chunk)
    gauss = acc.finalize(eps=0.01)
    assert torch.equal(gauss.chol, gauss.chol.tril())
    x = train.flatten(2)[:, :, 4].double().numpy()
    cov = np.cov(x, rowvar=False) + 0.01 * np.eye(channels)
    l4 = gauss.chol[4].double().numpy()
    np.testing.assert_allclose(l4 @ l4.T, cov, atol=1e-4 * np.abs(cov).max())
    ref = _reference_mahalanobis(train.flatten(2).double().numpy(), test.flatten(2).double().numpy(), 0.01)
    np.testing.assert_allclose(gauss.mahalanobis(test).double().numpy(), ref, rtol=1e-4)
    mixed = mahalanobis(test.double(), gauss.mean.double(), gauss.chol)   # float64 inputs, float32 factors
    np.testing.assert_allclose(mixed.double().numpy(), ref, rtol=1e-4)
    monkeypatch.setattr(gaussian, "_LAPACK_SOLVE_MIN_CHANNELS", 10**6)   # torch's batched solve
    np.testing.assert_allclose(gauss.mahalanobis(test).double().numpy(), ref, rtol=1e-4)


def test_singular_covariance_gets_jitter_not_nan():
    g = torch.Generator().manual_seed(11)
    train = torch.randn(3, 10, 2, 2, generator=g)    # 3 samples, 10 channels: rank-deficient covariance
    test = torch.randn(2, 10, 2, 2, generator=g)
    acc = GaussianAccumulator()
    acc.update(train)
    gauss = acc.finalize(eps=0.0)       # no regularization: jitter must rescue it
    d = gauss.mahalanobis(test)
    assert torch.isfinite(d).all()
    # each factor is that of covariance + jitter I, the jitter one of the tenfold steps from 1e-6 (float64
    # reference), and the distances are the float64 ones with that jitter
    x = train.flatten(2).double().numpy()
    for p in range(4):
        cov = np.cov(x[:, :, p], rowvar=False)
        factor = gauss.chol[p].double().numpy()
        jitter = float(np.mean(np.diag(factor @ factor.T - cov)))
        assert any(abs(jitter - j) < 0.01 * j for j in (1e-5, 1e-4, 1e-3)), jitter
        np.testing.assert_allclose(factor @ factor.T, cov + jitter * np.eye(10), atol=1e-6)
        ref = _reference_mahalanobis(x[:, :, p:p + 1], test.flatten(2)[:, :, p:p + 1].double().numpy(), jitter)
        np.testing.assert_allclose(d[:, p].double().numpy(), ref[:, 0], rtol=1e-2)   # float32 factor, cond ~1e5


def test_nan_features_give_a_clear_error():
    train = torch.randn(8, 4, 2, 2)
    train[0, 0, 0, 0] = float("nan")
    acc = GaussianAccumulator()
    acc.update(train)
    with pytest.raises(ValueError, match="NaN"):
        acc.finalize()


def test_gaussian_fit_with_two_threads_in_a_fresh_process():
    """anomalib's batched inverse crashed with 2 threads on this torch build; ours must not."""
    code = ("import numpy as np, torch; torch.set_num_threads(2)\n"
            "from adlib.kernels import GaussianAccumulator\n"
            "g = torch.Generator().manual_seed(0)\n"
            "train, test = torch.randn(40, 64, 16, 16, generator=g), torch.randn(3, 64, 16, 16, generator=g)\n"
            "a = GaussianAccumulator(torch.float32); a.update(train)\n"
            "d = a.finalize().mahalanobis(test)\n"
            "assert torch.isfinite(d).all()\n"
            "# float64 reference (NumPy's solve, position by position): covariance + 0.01 I, the default eps\n"
            "x, t = train.flatten(2).double().numpy(), test.flatten(2).double().numpy()\n"
            "xc = x - x.mean(0)\n"
            "cov = np.einsum('ncp,ndp->pcd', xc, xc) / 39 + 0.01 * np.eye(64)\n"
            "diff = (t - x.mean(0)).transpose(2, 0, 1)\n"
            "ref = np.sqrt(np.einsum('pbc,pcb->bp', diff, np.linalg.solve(cov, diff.transpose(0, 2, 1))))\n"
            "print('ok', tuple(d.shape), 'max_rel_err', float((np.abs(d.double().numpy() - ref) / ref).max()))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ok (3, 256)" in proc.stdout, proc.stderr
    assert float(proc.stdout.split("max_rel_err")[1]) < 1e-4, proc.stdout


def test_finalize_twice_returns_the_same_fit():
    acc = GaussianAccumulator()
    acc.update(torch.randn(20, 5, 2, 3, generator=torch.Generator().manual_seed(9)))
    first = acc.finalize(eps=0.01)
    second = acc.finalize(eps=0.01)
    assert second is first and torch.isfinite(first.chol).all()
    with pytest.raises(ValueError, match="already ran with eps=0.01"):
        acc.finalize(eps=0.1)                        # the sums became the covariance: say so
    with pytest.raises(ValueError, match="new GaussianAccumulator"):
        acc.update(torch.randn(2, 5, 2, 3))
    broken = GaussianAccumulator()
    broken.update(torch.full((4, 3, 2, 2), float("nan")))
    with pytest.raises(ValueError, match="NaN"):
        broken.finalize()
    with pytest.raises(ValueError, match="earlier finalize"):
        broken.finalize()


# ---------------------------------------------------------------------------------------------
# The ctypes layer (SciPy's BLAS/LAPACK without the GIL) and its torch fallback
# ---------------------------------------------------------------------------------------------

def _many_channels_fit_matches_float64() -> torch.Tensor:
    """C >= 160 (the LAPACK solve's range, when LAPACK is on), float32 sums: fit, factor and
    distances equal the float64 reference; returns the factors."""
    g = torch.Generator().manual_seed(10)
    channels = gaussian._LAPACK_SOLVE_MIN_CHANNELS + 4
    train = torch.randn(channels + 40, channels, 2, 2, generator=g) + 3
    test = torch.randn(3, channels, 2, 2, generator=g) + 3
    acc = GaussianAccumulator(dtype=torch.float32)
    for chunk in train.split(50):
        acc.update(chunk)
    gauss = acc.finalize(eps=0.01)
    assert torch.equal(gauss.chol, gauss.chol.tril())
    ref = _reference_mahalanobis(train.flatten(2).double().numpy(), test.flatten(2).double().numpy(), 0.01)
    np.testing.assert_allclose(gauss.mahalanobis(test).double().numpy(), ref, rtol=1e-4)
    return gauss.chol


def _raises(error: Exception):
    def fail(*args):
        raise error
    return fail


def _no_binding(name: str):
    raise AssertionError(f"{name} was bound through ctypes in torch mode")


def test_signature_check_accepts_scipy_capsules():
    assert _lapack._signature_problem() is None
    from scipy.linalg import cython_lapack
    found = _lapack._capsule_name(cython_lapack.__pyx_capi__["spotrf"])
    assert _lapack._normalized(found) == "void (char *, int *, float *, int *, int *)", found


def test_ctypes_layer_is_in_use():
    """Not silently off: with SciPy's real tables and no setting, the CPU Gaussians use LAPACK."""
    if settings.ctypes_disabled():
        pytest.skip("ADLIB_NO_CTYPES=1: this run tests the kernels' torch paths")
    assert kernels.lapack_available()


def test_forced_torch_mode_binds_nothing_and_matches_float64(monkeypatch):
    monkeypatch.setenv("ADLIB_NO_CTYPES", "1")
    monkeypatch.setattr(_lapack, "_nogil_routine", _no_binding)
    assert settings.ctypes_disabled() and kernels.lapack_available() is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")               # asked for: no warning
        _many_channels_fit_matches_float64()


@pytest.mark.parametrize("break_it", ["signature", "capsule", "import"])
def test_signature_mismatch_falls_back_to_torch_with_one_warning(monkeypatch, break_it):
    monkeypatch.delenv("ADLIB_NO_CTYPES", raising=False)
    monkeypatch.setattr(_lapack, "_check_result", None)             # check again here (restored after)
    monkeypatch.setattr(_lapack, "_nogil_routine", _no_binding)
    if break_it == "signature":                                      # as an ILP64 build would declare it
        monkeypatch.setitem(_lapack._SIGNATURES, "potrf", "void (char *, int64_t *, {r} *, int64_t *, int64_t *)")
        reason = r"spotrf has signature .*int64_t"
    elif break_it == "capsule":                                      # the capsule reader fails
        monkeypatch.setattr(_lapack, "_capsule_name", _raises(ValueError("invalid PyCapsule object")))
        reason = "not readable .*ValueError"
    else:                                                            # SciPy's Cython tables do not import
        monkeypatch.setattr(_lapack, "_table", _raises(ImportError("cannot import name 'cython_blas'")))
        reason = "not readable .*ImportError"
    assert _lapack._signature_problem() is not None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chol = _many_channels_fit_matches_float64()
        assert torch.equal(_many_channels_fit_matches_float64(), chol)          # deterministic, warned once
        assert kernels.lapack_available() is False
    ours = [w for w in caught if "adlib.kernels" in str(w.message)]
    assert len(ours) == 1 and issubclass(ours[0].category, RuntimeWarning), [str(w.message) for w in caught]
    assert "torch" in str(ours[0].message)
    assert re.search(reason, str(ours[0].message)), str(ours[0].message)


def test_blobs_are_deterministic_and_masks_are_exactly_the_changed_pixels():
    images = torch.rand(6, 3, 48, 48, generator=torch.Generator().manual_seed(5))
    out1, masks1, params1, score1 = gmm_blobs(images, signs="positive", generator=torch.Generator().manual_seed(0))
    out2, masks2, _, score2 = gmm_blobs(images, signs="positive", generator=torch.Generator().manual_seed(0))
    assert torch.equal(out1, out2) and torch.equal(masks1, masks2) and torch.equal(score1, score2)
    assert masks1.shape == (6, 1, 48, 48) and 0 < masks1.mean() < 1
    changed = (out1 != images).any(1, keepdim=True)
    assert torch.equal(changed, masks1 == 1)                 # every masked pixel changed, no other one
    counts = params1.active.sum(1)
    assert counts.min() >= 1 and counts.max() <= 4
    # with signs mixed, components may cancel inside, but nothing outside the mask ever changes
    out, masks, _, _ = gmm_blobs(images, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out[(masks == 0).expand_as(out)], images[(masks == 0).expand_as(out)])


def _one_blob(**change) -> kernels.BlobParams:
    """One image, one component, centred; ``change`` overrides one parameter (tensors of shape (1, K...))."""
    base = dict(centre=torch.tensor([[[0.5, 0.5]]]), sigma=torch.tensor([[[0.05, 0.05]]]),
                angle=torch.tensor([[0.3]]), amplitude=torch.tensor([[0.2]]), active=torch.tensor([[True]]),
                colour=torch.ones(1, 3))
    return kernels.BlobParams(**{**base, **change})


def test_blob_score_grows_with_amplitude_extent_and_count_and_ignores_position():
    images = torch.zeros(1, 3, 64, 64)

    def score(**change) -> float:
        _, mask, s = kernels.paint_blobs(images, _one_blob(**change))
        return float(s), int(mask.sum())

    base, base_area = score()
    for name, value in [("amplitude", torch.tensor([[0.4]])), ("amplitude", torch.tensor([[-0.4]])),
                        ("sigma", torch.tensor([[[0.10, 0.05]]])), ("sigma", torch.tensor([[[0.05, 0.10]]]))]:
        assert score(**{name: value})[0] > base, (name, value)
    assert score(sigma=torch.tensor([[[0.10, 0.05]]]))[1] > base_area      # the y sigma enlarges the mask
    two = dict(centre=torch.tensor([[[0.5, 0.5], [0.2, 0.3]]]), sigma=torch.full((1, 2, 2), 0.05),
               angle=torch.tensor([[0.3, 0.3]]), amplitude=torch.tensor([[0.2, 0.2]]),
               active=torch.tensor([[True, True]]))
    assert score(**two)[0] > base                                            # one more component
    assert score(angle=torch.tensor([[1.2]]))[0] == base                     # rotation: same energy
    assert score(centre=torch.tensor([[[0.3, 0.6]]]))[0] == base             # position: same energy
    # float64 reference of the score: |a| * pi * (2 sy)(2 sx)
    assert abs(base - 0.2 * np.pi * 0.1 * 0.1) < 1e-7
    with pytest.raises(ValueError, match="parameter rows"):
        kernels.paint_blobs(torch.zeros(2, 3, 8, 8), _one_blob())


def test_paint_blobs_refuses_gaps_in_active_and_leaves_blobless_images_alone():
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    two = dict(centre=torch.full((2, 2, 2), 0.5), sigma=torch.full((2, 2, 2), 0.1), angle=torch.zeros(2, 2),
               amplitude=torch.full((2, 2), 0.3), colour=torch.ones(2, 3))
    with pytest.raises(ValueError, match="come first"):
        kernels.paint_blobs(images, kernels.BlobParams(active=torch.tensor([[False, True], [True, False]]), **two))
    out, masks, score = kernels.paint_blobs(images, kernels.BlobParams(
        active=torch.tensor([[False, False], [True, False]]), **two))
    assert torch.equal(out[0], images[0]) and masks[0].sum() == 0 and score[0] == 0   # no blob: unchanged
    assert masks[1].sum() > 0 and score[1] > 0
    with pytest.raises(ValueError, match="positive"):
        kernels.paint_blobs(images, kernels.BlobParams(active=torch.ones(2, 2, dtype=torch.bool),
                                                       **{**two, "sigma": torch.zeros(2, 2, 2)}))


def test_blobs_match_a_per_image_loop():
    images = torch.rand(3, 3, 32, 40)
    out, _, p, score = gmm_blobs(images, colour="gray", generator=torch.Generator().manual_seed(1))
    clear = ~bench._blob_rims(p, 32, 40)                             # off the cut-off ellipses' rims
    torch.testing.assert_close(out * clear, bench._blobs_loop(images, p) * clear, rtol=1e-5, atol=1e-5)
    area = np.pi * 4 * p.sigma[..., 0] * p.sigma[..., 1]                                  # 2-sigma ellipses
    torch.testing.assert_close(score, (p.amplitude.abs() * area * p.active).sum(1), rtol=1e-5, atol=1e-7)


def test_blobs_in_chunks_match_the_loop_and_the_ellipses(monkeypatch):
    monkeypatch.setattr(blobs, "_BLOB_CHUNK_ELEMENTS", 2 * 4 * 24 * 28)   # 2 images a chunk: 5 chunks
    images = torch.rand(9, 3, 24, 28, dtype=torch.float64)
    out, masks, p, _ = gmm_blobs(images, generator=torch.Generator().manual_seed(2))
    assert len(p.active.sum(1).unique()) > 1                                  # several component-count groups
    clear = ~bench._blob_rims(p, 24, 28)
    torch.testing.assert_close(out * clear, bench._blobs_loop(images, p) * clear, rtol=1e-5, atol=1e-5)
    # masks: inside some active component's 2-sigma ellipse, from the rotated coordinates in float64
    ys = ((torch.arange(24, dtype=torch.float64) + 0.5) / 24)[:, None]
    xs = (torch.arange(28, dtype=torch.float64) + 0.5) / 28
    cy, cx = (p.centre[..., i].double()[..., None, None] for i in (0, 1))
    sy, sx = (p.sigma[..., i].double()[..., None, None] for i in (0, 1))
    cos, sin = (f(p.angle.double())[..., None, None] for f in (torch.cos, torch.sin))
    u = ((xs - cx) * cos + (ys - cy) * sin) / sx
    v = (-(xs - cx) * sin + (ys - cy) * cos) / sy
    q = (u * u + v * v).masked_fill(~p.active[..., None, None], float("inf")).amin(1)   # (B, H, W)
    clear = (q - 4).abs() > 1e-3                                              # not on an ellipse's rim
    assert torch.equal(masks[:, 0][clear] == 1, (q <= 4)[clear])


def test_blobs_bad_input():
    with pytest.raises(ValueError, match="n_components"):
        gmm_blobs(torch.zeros(1, 3, 8, 8), n_components=(0, 2))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        gmm_blobs(torch.zeros(3, 8, 8))
