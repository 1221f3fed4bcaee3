"""adlib.backbones: the offline weights are the real ImageNet weights; one feature API by stride."""

from __future__ import annotations

import urllib.error

import pytest
import skimage.data
import torch
import torch.nn.functional as F

from adlib.backbones import FeatureExtractor, WeightsUnavailableError, fold_batchnorm, imagenet_categories, load_efficientnet_lite
from adlib.data import normalize


@pytest.fixture(scope="module")
def lite0() -> FeatureExtractor:
    return FeatureExtractor("efficientnet_lite0", strides=(4, 8, 16, 32), device="cpu")


def _imagenet_batch(photo) -> torch.Tensor:
    x = torch.from_numpy(photo).permute(2, 0, 1).float()[None] / 255
    return normalize(F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True, align_corners=False))


def _top5(model: FeatureExtractor, photo) -> list[str]:
    names = imagenet_categories()
    return [names[i] for i in model.classify(_imagenet_batch(photo))[0].topk(5).indices]


def test_lite0_sees_a_cat(lite0):
    top5 = _top5(lite0, skimage.data.chelsea())
    assert {"tabby", "tiger cat", "Egyptian cat", "Persian cat", "Siamese cat"} & set(top5), top5


def test_lite0_sees_an_espresso(lite0):
    top5 = _top5(lite0, skimage.data.coffee())
    assert {"espresso", "cup", "coffee mug"} & set(top5), top5


def test_feature_shapes_by_stride(lite0):
    feats = lite0(torch.zeros(2, 3, 224, 224))
    assert {s: tuple(f.shape) for s, f in feats.items()} == {
        4: (2, 24, 56, 56), 8: (2, 40, 28, 28), 16: (2, 112, 14, 14), 32: (2, 320, 7, 7)}
    assert lite0.channels == {4: 24, 8: 40, 16: 112, 32: 320}


@pytest.mark.parametrize("size", [224, 250])     # 250: odd sizes exercise the asymmetric 'SAME' padding
def test_folded_batchnorm_gives_the_same_features_and_logits(size):
    unfolded = load_efficientnet_lite("efficientnet_lite0").eval()
    folded = fold_batchnorm(load_efficientnet_lite("efficientnet_lite0").eval())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = unfolded.stage_features(x), folded.stage_features(x)
        for stride in ref:
            torch.testing.assert_close(got[stride], ref[stride], rtol=1e-4, atol=1e-4 * float(ref[stride].abs().max()))
        torch.testing.assert_close(folded(x), unfolded(x), rtol=1e-4, atol=1e-3)


def test_extractor_is_frozen_and_stays_in_eval(lite0):
    lite0.train()
    assert not lite0.model.training
    assert not any(p.requires_grad for p in lite0.parameters())


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown backbone"):
        FeatureExtractor("vgg11")
    with pytest.raises(ValueError, match="strides"):
        FeatureExtractor(strides=(3,))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        FeatureExtractor(strides=(8,), device="cpu")(torch.zeros(3, 32, 32))


def test_torchvision_offline_error_names_the_alternative(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    with pytest.raises(WeightsUnavailableError, match="efficientnet_lite0"):
        FeatureExtractor("resnet18", device="cpu")


def test_weights_available_looks_in_torchvision_cache(monkeypatch, tmp_path):
    import torchvision

    from adlib.backbones import weights_available

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    assert weights_available("efficientnet_lite0")
    assert not weights_available("resnet50")
    url = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / url.rsplit("/", 1)[-1]).write_bytes(b"")
    assert weights_available("resnet50")
    with pytest.raises(ValueError, match="unknown backbone"):
        weights_available("vgg16")
