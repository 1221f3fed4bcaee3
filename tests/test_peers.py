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
