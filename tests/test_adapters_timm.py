"""timm backbones behind wrap(): every row of the adapter table, random init, tiny configs."""
import pytest
import torch

timm = pytest.importorskip("timm")

import featup_adapters  # noqa: E402
from featup_adapters.adapters import adapter_for  # noqa: E402
from neck_contract import RecordingUpsampler, check_wrapped, tokens_to_map  # noqa: E402

pytestmark = pytest.mark.timm


def _vit(name, **kw):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, depth=1, dynamic_img_size=True, **kw)


# name, kwargs, image size, expected prefix tokens, patch, channels, backbone id (timm's default tag added)
VITS = [
    ("vit_small_patch16_224.dino", {}, (48, 80), 1, 16, 384, "timm/vit_small_patch16_224.dino"),
    ("deit_tiny_distilled_patch16_224", {}, (48, 64), 2, 16, 192, "timm/deit_tiny_distilled_patch16_224.fb_in1k"),
    ("vit_small_patch14_dinov2.lvd142m", {"img_size": 56}, (42, 70), 1, 14, 384,
     "timm/vit_small_patch14_dinov2.lvd142m"),
    ("vit_small_patch14_reg4_dinov2.lvd142m", {"img_size": 56}, (56, 42), 5, 14, 384,
     "timm/vit_small_patch14_reg4_dinov2.lvd142m"),
    ("eva02_tiny_patch14_224.mim_in22k", {}, (42, 56), 1, 14, 192, "timm/eva02_tiny_patch14_224.mim_in22k"),
]


@pytest.mark.parametrize("name,kw,size,prefix,patch,channels,bid", VITS, ids=[v[0] for v in VITS])
def test_vit_features_are_forward_features_without_prefix_tokens(name, kw, size, prefix, patch, channels, bid):
    model = _vit(name, **kw)
    images = torch.randn(2, 3, *size)
    h, w = size[0] // patch, size[1] // patch

    def reference(m, x):
        return tokens_to_map(m.forward_features(x), prefix, h, w)

    neck, _, lr = check_wrapped(model, images, reference, channels=channels, backbone_id=bid)
    assert tuple(lr.shape[-2:]) == (h, w)
    assert neck.stride == patch and neck.layer == "norm"
    assert neck.mean == tuple(model.pretrained_cfg["mean"])


def test_vit_input_not_a_multiple_of_the_patch_is_padded_when_the_model_pads():
    model = _vit("vit_small_patch16_224.dino", dynamic_img_pad=True)
    images = torch.randn(1, 3, 50, 71)  # padded by timm to 64 x 80: 4 x 5 patches

    def reference(m, x):
        return tokens_to_map(m.forward_features(x), 1, 4, 5)

    check_wrapped(model, images, reference, channels=384)


def test_vit_without_padding_rejects_sizes_not_a_multiple_of_the_patch_clearly():
    model = _vit("vit_small_patch16_224.dino")
    with featup_adapters.wrap(model, RecordingUpsampler(384)) as neck:
        with pytest.raises(ValueError, match=r"multiples of its 16x16 patch and got 50x71.*dynamic_img_pad=True"):
            neck(torch.randn(1, 3, 50, 71))


def test_swin_nhwc_features_are_permuted():
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, depths=(1, 1, 1, 1),
                              num_heads=(1, 1, 1, 1), embed_dim=16, window_size=2, img_size=64,
                              dynamic_img_size=True)
    images = torch.randn(2, 3, 64, 96)

    def reference(m, x):
        feats = m.forward_features(x)  # [B, h, w, C]
        assert feats.shape[1:3] == (2, 3)
        return feats.permute(0, 3, 1, 2)

    neck, _, _ = check_wrapped(model, images, reference, channels=128)
    assert neck.stride == 32


CNNS = [
    ("resnet10t", "layer4", 512),
    ("convnext_atto", "stages.3", 320),
    ("tf_efficientnet_lite0", "blocks.6", 320),
]


@pytest.mark.parametrize("name,module,channels", CNNS, ids=[c[0] for c in CNNS])
def test_cnn_features_are_the_last_feature_info_stage(name, module, channels):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False)
    images = torch.randn(2, 3, 64, 96)
    captured = {}

    def reference(m, x):
        handle = m.get_submodule(module).register_forward_hook(lambda _m, _a, out: captured.update(out=out))
        try:
            m(x)
        finally:
            handle.remove()
        return captured["out"]

    neck, _, lr = check_wrapped(model, images, reference, channels=channels)
    assert neck.layer == module and neck.stride == 32 and tuple(lr.shape[-2:]) == (2, 3)


def test_intermediate_layer_by_name():
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False)
    images = torch.randn(1, 3, 64, 64)

    def reference(m, x):
        return m.layer2(m.layer1(m.maxpool(m.act1(m.bn1(m.conv1(x))))))

    neck, _, _ = check_wrapped(model, images, reference, channels=128, layer="layer2")
    assert neck.stride == 8


def test_vit_intermediate_block_drops_prefix_tokens():
    model = _vit("vit_small_patch14_reg4_dinov2.lvd142m", img_size=56)
    images = torch.randn(1, 3, 56, 28)
    captured = {}

    def reference(m, x):
        handle = m.blocks[0].register_forward_hook(lambda _m, _a, out: captured.update(out=out))
        try:
            m(x)
        finally:
            handle.remove()
        return tokens_to_map(captured["out"], 5, 4, 2)

    check_wrapped(model, images, reference, channels=384, layer="blocks.0")


def test_fixed_size_vit_rejects_other_sizes_with_a_clear_error():
    model = timm.create_model("vit_small_patch16_224", pretrained=False, depth=1, img_size=32)
    neck = featup_adapters.wrap(model, RecordingUpsampler(384))
    with pytest.raises(ValueError, match=r"created for 32x32 images and got 32x48.*dynamic_img_size=True"):
        neck(torch.randn(1, 3, 32, 48))
    assert tuple(neck(torch.randn(1, 3, 32, 32)).shape) == (1, 384, 32, 32)
    neck.remove()


def test_model_without_feature_info_needs_a_layer():
    model = timm.create_model("resnet10t", pretrained=False)
    del model.feature_info
    with pytest.raises(ValueError, match="feature_info.*layer="):
        adapter_for(model)
