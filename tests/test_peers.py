"""The bridge to anomalib: the same EfficientNet-Lite weights under timm's names, the same network."""

from __future__ import annotations

import pytest
import torch

timm = pytest.importorskip("timm")  # in the test extra; anomalib itself is only in the bench extra

from adlib.backbones import load_efficientnet_lite  # noqa: E402
from adlib.peers import local_timm_weights, lukemelas_to_timm, timm_name, timm_weights_file  # noqa: E402


def test_timm_model_with_mapped_weights_computes_the_same_logits(tmp_path):
    ours = load_efficientnet_lite("efficientnet_lite0")
    original = timm.create_model
    with local_timm_weights("efficientnet_lite0", cache_dir=tmp_path) as path:
        theirs = timm.create_model("tf_efficientnet_lite0", pretrained=True).eval()
    assert path.is_file() and path.suffix == ".safetensors"
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(x), theirs(x)
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()
    assert timm.create_model is original  # outside the block timm is itself again


def test_features_only_backbone_as_anomalib_builds_it_gets_the_weights(tmp_path):
    with local_timm_weights("efficientnet_lite0", cache_dir=tmp_path):
        feats = timm.create_model("tf_efficientnet_lite0", pretrained=True, pretrained_cfg=None, features_only=True,
                                  out_indices=[2, 3])
    stem = load_efficientnet_lite("efficientnet_lite0").state_dict()["_conv_stem.weight"]
    assert torch.equal(feats.conv_stem.weight, stem)
    assert feats.feature_info.reduction() == [8, 16]


def test_mapping_refuses_mismatched_state_and_unknown_backbones(tmp_path):
    with pytest.raises(ValueError, match="tensors"):
        lukemelas_to_timm({"a": torch.zeros(1)}, ["a", "b"])
    with pytest.raises(ValueError, match="EfficientNet-Lite"):
        timm_name("resnet50")
    first = timm_weights_file("efficientnet_lite0", cache_dir=tmp_path)
    assert timm_weights_file("efficientnet_lite0", cache_dir=tmp_path) == first  # written once


@pytest.mark.slow
def test_gap_study_baseline_is_adlibs_patchcore_and_switches_change_features(synthetic_root, monkeypatch):
    """The study's ("own", "valid") row is adlib's PatchCore (exact 10% coreset, seed 0); the switches
    change the features (so the other rows are not the baseline by accident); the extractor's input
    map is restored afterwards."""
    from adlib import evaluate, get_detector
    from adlib.backbones import concat_stages
    from adlib.data import MVTecDataset
    from adlib.peers import GAP_VARIANTS, patchcore_gap_study

    import adlib.peers
    from adlib.backbones import input_affine

    built = []

    def capture(*args, **kwargs):
        built.append(get_detector(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(adlib.peers, "get_detector", capture)
    rows = patchcore_gap_study("synthetic", root=synthetic_root, image_size=64, train_limit=12, seeds=(0,),
                               device="cpu")
    scale, shift = input_affine("efficientnet_lite0")
    assert torch.equal(built[0].extractor.scale, scale) and torch.equal(built[0].extractor.shift, shift)
    assert [(r["input"], r["border"]) for r in rows] == list(GAP_VARIANTS)
    for r in rows:
        assert 0.0 <= r["pixel_auroc_min"] <= r["pixel_auroc"] <= r["pixel_auroc_max"] <= 1.0
        for key in ("image_auroc", "pixel_auroc", "aupro"):                 # one seed: its mean is its min and max
            assert r[f"{key}_min"] == r[key] == r[f"{key}_max"], (key, r)
        assert r["image_auroc"] >= 0.8 and r["pixel_auroc"] >= 0.8, r        # measured 0.86-1.00 and 0.88-0.96
    assert len({r["pixel_auroc"] for r in rows}) == len(rows)               # every variant scores otherwise
    train = MVTecDataset(synthetic_root, "synthetic", "train", image_size=64, limit=12)
    test = MVTecDataset(synthetic_root, "synthetic", "test", image_size=64)
    detector = get_detector("patchcore", coreset="exact", device="cpu")
    reference = evaluate(detector, test, train, progress=False).metrics
    assert rows[0]["pixel_auroc"] == pytest.approx(reference["pixel_auroc"], abs=1e-6)
    assert rows[0]["aupro"] == pytest.approx(reference["aupro"], abs=1e-6)

    feats = {8: detector.extractor(torch.rand(1, 3, 64, 64))[8]}   # one stage: no resize mixes the border in
    valid = concat_stages(feats, (8, 8), aggregate=3)
    zeros = concat_stages(feats, (8, 8), aggregate=3, count_zero_border=True)
    assert torch.allclose(valid[..., 1:-1, 1:-1], zeros[..., 1:-1, 1:-1])
    assert not torch.allclose(valid[..., 0, :], zeros[..., 0, :])


def test_border_average_counts_the_zero_padding_only_when_asked():
    from adlib.backbones import concat_stages

    ones = {8: torch.ones(1, 1, 4, 4)}
    assert torch.equal(concat_stages(ones, (4, 4), aggregate=3), torch.ones(1, 1, 4, 4))
    zeros = concat_stages(ones, (4, 4), aggregate=3, count_zero_border=True)[0, 0]
    assert zeros[0, 0] == pytest.approx(4 / 9) and zeros[0, 1] == pytest.approx(6 / 9) and zeros[1, 1] == 1.0


def test_anomalib_wrappers_build_feed_and_finish_the_model_they_name(monkeypatch):
    """Without anomalib installed: fake torch-model modules record what the wrappers build and call."""
    import contextlib
    import sys
    import types

    from adlib.peers import AnomalibPaDiM, AnomalibPatchCore

    calls: list[tuple] = []

    class FakeModel(torch.nn.Module):
        def __init__(self, **kwargs):
            super().__init__()
            calls.append(("build", type(self).__name__, kwargs))

        def forward(self, x):
            calls.append(("forward", self.training, len(x)))

        def subsample_embedding(self, ratio):
            calls.append(("subsample", ratio))

        def fit(self):
            calls.append(("fit",))

    for module, cls in [("anomalib.models.image.patchcore.torch_model", "PatchcoreModel"),
                        ("anomalib.models.image.padim.torch_model", "PadimModel")]:
        fake = types.ModuleType(module)
        setattr(fake, cls, type(cls, (FakeModel,), {}))
        monkeypatch.setitem(sys.modules, module, fake)
    monkeypatch.setattr("adlib.peers.local_timm_weights", lambda backbone: contextlib.nullcontext())
    batches = [torch.zeros(2, 3, 32, 32), torch.zeros(1, 3, 32, 32)]

    AnomalibPatchCore(coreset_ratio=0.25, num_neighbors=3, device="cpu")._fit(batches)
    assert calls == [("build", "PatchcoreModel", {"backbone": "tf_efficientnet_lite0", "layers": ["blocks.2", "blocks.4"],
                                                  "pre_trained": True, "num_neighbors": 3}),
                     ("forward", True, 2), ("forward", True, 1), ("subsample", 0.25)]
    calls.clear()
    AnomalibPaDiM(n_features=7, device="cpu")._fit(batches)
    assert calls == [("build", "PadimModel", {"backbone": "tf_efficientnet_lite0", "layers": ["blocks.1", "blocks.2", "blocks.4"],
                                              "pre_trained": True, "n_features": 7}),
                     ("forward", True, 2), ("forward", True, 1), ("fit",)]
