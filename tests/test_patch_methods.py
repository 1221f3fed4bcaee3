"""PatchCore and PaDiM: the bars of the book on real MVTec AD bottle, and their exactness."""

from __future__ import annotations

import pytest
import torch

from adlib import get_detector, load_detector, settings
from adlib.__main__ import _hyper, build_parser
from adlib.data import train_batches
from adlib.evaluate import evaluate
from adlib.kernels import MemoryBudgetError, chunked_coreset, greedy_coreset


@pytest.mark.slow
def test_patchcore_reaches_the_bars_on_real_bottle(real_bottle):
    train, test = real_bottle(256)
    m = evaluate(get_detector("patchcore", device="cpu"), test, train, progress=False).metrics
    assert m["image_auroc"] >= 0.99, m
    assert m["pixel_auroc"] >= 0.98, m
    assert m["aupro"] >= 0.90, m


@pytest.mark.slow
def test_padim_reaches_the_bars_on_real_bottle(real_bottle):
    train, test = real_bottle(256)
    m = evaluate(get_detector("padim", device="cpu"), test, train, progress=False).metrics
    assert m["image_auroc"] >= 0.99, m
    assert m["pixel_auroc"] >= 0.975, m


def test_patchcore_full_bank_scores_are_nearest_patch_distances(small_synthetic):
    train, images = small_synthetic
    det = get_detector("patchcore", coreset_ratio=1.0, sigma=0.0, device="cpu").fit(train_batches(train, 8))
    scores, _ = det.predict(images[:3])
    emb = det.embed(images[:3])
    patches = emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1]).double()
    brute = torch.cdist(patches, det.memory_bank.double()).min(1).values.view(3, -1).max(1).values
    torch.testing.assert_close(scores.double(), brute, rtol=1e-4, atol=1e-5)


def _reweighted_scores_float64(detector, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's re-weighted image score by a plain loop in float64: per image, the test patch m
    farthest from the bank, its nearest bank patch m*, and the ``num_neighbors`` bank patches nearest
    m* (m* first); score = (1 - softmax(|m - those patches|)[m*]) * |m - m*|. Returns (re-weighted, max)."""
    emb = detector.embed(images).double()
    bank = detector.memory_bank.double()
    reweighted, plain = [], []
    for features in emb:
        patches = features.permute(1, 2, 0).reshape(-1, features.shape[0])
        nearest = torch.cdist(patches, bank).min(1)
        j = int(nearest.values.argmax())
        anchor = int(nearest.indices[j])
        around = torch.cdist(bank[anchor][None], bank)[0].topk(detector.num_neighbors, largest=False).indices
        assert int(around[0]) == anchor
        weight = 1 - torch.softmax((bank[around] - patches[j]).norm(dim=1), 0)[0]
        plain.append(float(nearest.values[j]))
        reweighted.append(float(weight) * plain[-1])
    return torch.tensor(reweighted, dtype=torch.float64), torch.tensor(plain, dtype=torch.float64)


def test_patchcore_coreset_is_the_greedy_selection_of_the_bank_and_reweighting_is_the_papers(small_synthetic):
    train, images = small_synthetic
    full = get_detector("patchcore", coreset_ratio=1.0, device="cpu").fit(train_batches(train, 8))
    small = get_detector("patchcore", coreset_ratio=0.1, reweight=True, device="cpu").fit(train_batches(train, 8))
    assert small.memory_bank.shape[0] == round(0.1 * full.memory_bank.shape[0])
    # the small bank is exactly the greedy coreset's rows of the full bank (same features, same seed)
    chosen = greedy_coreset(full.memory_bank, ratio=0.1, proj_dim=small.proj_dim, seed=small.seed)
    assert small.coreset_used == "exact" and torch.equal(small.memory_bank, full.memory_bank[chosen])
    scores, maps = small.predict(images[:4])
    assert scores.shape == (4,) and maps.shape == (4, 64, 64) and torch.isfinite(scores).all()
    reference, plain = _reweighted_scores_float64(small, images[:4])
    torch.testing.assert_close(scores.double(), reference, rtol=1e-5, atol=0.0)
    assert not torch.allclose(reference, plain, rtol=1e-5, atol=0.0)      # the re-weighting is visible here


def test_patchcore_over_a_tiny_memory_budget_streams_chunked_or_fails_clearly(small_synthetic):
    train, images = small_synthetic                  # 24 images -> a bank of 1,536 x 152 (0.9 MB)
    chunked = get_detector("patchcore", coreset="chunked", memory_mb=0.5, device="cpu").fit(train_batches(train, 8))
    assert chunked.coreset_used == "chunked" and chunked.memory_bank.shape == (154, 152)
    scores = chunked.predict(images[:2])[0]
    assert torch.isfinite(scores).all()
    emb = chunked.embed(images[:2])                  # the scores are nearest-patch distances to the chunked bank
    patches = emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1]).double()
    brute = torch.cdist(patches, chunked.memory_bank.double()).min(1).values.view(2, -1).max(1).values
    torch.testing.assert_close(scores.double(), brute, rtol=1e-4, atol=1e-5)
    auto = get_detector("patchcore", memory_mb=0.5, device="cpu").fit(train_batches(train, 8))
    assert auto.coreset_used == "chunked"            # auto: the exact bank would not fit
    assert torch.equal(auto.memory_bank, chunked.memory_bank)      # ... and it chunks as "chunked" does
    with pytest.raises(MemoryBudgetError, match=r"coreset=exact .*need about .* MB.* budget of 0.5 MB.*coreset=chunked"):
        get_detector("patchcore", coreset="exact", memory_mb=0.5, device="cpu").fit(train_batches(train, 8))


def test_patchcore_memory_budget_defaults_to_the_setting(small_synthetic, monkeypatch):
    train, _ = small_synthetic
    monkeypatch.setenv("ADLIB_MEMORY_MB", "0.3")
    assert settings.memory_budget_mb() == 0.3
    with pytest.raises(MemoryBudgetError, match="ADLIB_MEMORY_MB"):
        get_detector("patchcore", coreset="exact", device="cpu").fit(train_batches(train, 8))
    monkeypatch.setenv("ADLIB_MEMORY_MB", "lots")
    with pytest.raises(ValueError, match="ADLIB_MEMORY_MB must be a number"):
        settings.memory_budget_mb()
    monkeypatch.delenv("ADLIB_MEMORY_MB")
    assert settings.memory_budget_mb() == settings.DEFAULT_MEMORY_MB


@pytest.mark.parametrize("auto_points,expected", [(1000, "chunked"), (100_000, "exact")])
def test_patchcore_auto_coreset_picks_the_scheme_by_bank_size(small_synthetic, monkeypatch, auto_points, expected):
    train, _ = small_synthetic
    monkeypatch.setattr(chunked_coreset, "AUTO_EXACT_POINTS", auto_points)
    det = get_detector("patchcore", device="cpu").fit(train_batches(train, 8))
    assert det.coreset_used == expected and det.memory_bank.shape == (154, 152)
    forced = get_detector("patchcore", coreset="exact", device="cpu").fit(train_batches(train, 8))
    assert forced.coreset_used == "exact"
    with pytest.raises(ValueError, match="coreset must be one of"):
        get_detector("patchcore", coreset="fast", device="cpu")


def test_cli_memory_mb_reaches_patchcore_only():
    parse = lambda *extra: build_parser().parse_args(["evaluate", *extra])
    assert _hyper(parse("--method", "patchcore", "--memory-mb", "64", "--set", "coreset=exact")) == \
        {"memory_mb": 64.0, "coreset": "exact", "device": None}
    with pytest.raises(ValueError, match="no memory budget"):
        _hyper(parse("--method", "padim", "--memory-mb", "64"))


@pytest.mark.parametrize("method", ["patchcore", "padim"])
def test_save_load_gives_identical_predictions(small_synthetic, method, tmp_path):
    train, images = small_synthetic
    det = get_detector(method, device="cpu").fit(train_batches(train, 8))
    det.save(tmp_path / "m.safetensors")
    again = load_detector(tmp_path / "m.safetensors")
    s1, m1 = det.predict(images[:4])
    s2, m2 = again.predict(images[:4])
    assert torch.equal(s1, s2) and torch.equal(m1, m2)


def test_padim_is_deterministic_per_seed_and_checks_sizes(small_synthetic):
    train, images = small_synthetic
    a = get_detector("padim", n_features=50, seed=3, device="cpu").fit(train_batches(train, 8))
    b = get_detector("padim", n_features=50, seed=3, device="cpu").fit(train_batches(train, 8))
    assert torch.equal(a.channels, b.channels) and torch.equal(a.predict(images[:2])[0], b.predict(images[:2])[0])
    with pytest.raises(ValueError, match="fitted on 64x64 images"):
        a.predict(torch.zeros(1, 3, 96, 96))
    with pytest.raises(ValueError, match="n_features"):
        get_detector("padim", n_features=10_000, device="cpu").fit(train_batches(train, 8))
