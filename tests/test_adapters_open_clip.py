"""open_clip image towers behind wrap(): random init from tiny custom vision configs."""
import pytest
import torch

open_clip = pytest.importorskip("open_clip")

import featup_adapters  # noqa: E402
from open_clip.model import CLIPTextCfg, CLIPVisionCfg, _build_vision_tower  # noqa: E402
from neck_contract import RecordingUpsampler, check_wrapped, tokens_to_map  # noqa: E402

pytestmark = pytest.mark.open_clip


def _vit_tower(image_size=(32, 48)):
    torch.manual_seed(0)
    return _build_vision_tower(embed_dim=16, vision_cfg=CLIPVisionCfg(layers=1, width=32, head_width=16,
                                                                     image_size=image_size, patch_size=8))


def _tokens_after_ln_post(visual, x):
    visual.output_tokens = True
    try:
        _, tokens = visual(x)  # open_clip's own patch tokens: after ln_post, class token dropped, before proj
    finally:
        visual.output_tokens = False
    return tokens


def test_vit_tower_features_are_tokens_after_ln_post_before_proj():
    visual = _vit_tower()
    images = torch.randn(2, 3, 32, 48)

    def reference(m, x):
        return tokens_to_map(_tokens_after_ln_post(m, x), 0, 4, 6)

    neck, _, _ = check_wrapped(visual, images, reference, channels=32)
    assert neck.layer == "ln_post" and neck.stride == 8
    assert neck.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))


def test_full_clip_model_runs_only_the_visual_tower():
    torch.manual_seed(0)
    model = open_clip.CLIP(embed_dim=16,
                           vision_cfg=CLIPVisionCfg(layers=1, width=32, head_width=16, image_size=32, patch_size=8),
                           text_cfg=CLIPTextCfg(context_length=8, vocab_size=64, width=32, heads=2, layers=1))
    images = torch.randn(1, 3, 32, 32)

    def reference(m, x):
        return tokens_to_map(_tokens_after_ln_post(m.visual, x), 0, 4, 4)

    neck, _, _ = check_wrapped(model, images, reference, channels=32, call=lambda m, x: m.encode_image(x))
    assert neck.layer == "visual.ln_post"


def test_vit_tower_rejects_other_sizes_with_a_clear_error():
    with featup_adapters.wrap(_vit_tower(), RecordingUpsampler(32)) as neck:
        with pytest.raises(ValueError, match=r"accepts only 32x48 images.*got 32x32"):
            neck(torch.randn(1, 3, 32, 32))


def test_modified_resnet_features_are_layer4_at_any_size():
    torch.manual_seed(0)
    visual = _build_vision_tower(embed_dim=16, vision_cfg=CLIPVisionCfg(layers=(1, 1, 1, 1), width=8,
                                                                       head_width=8, image_size=64))
    images = torch.randn(2, 3, 64, 96)  # the attention pool only takes 64x64; layer4 takes any size

    def reference(m, x):
        return m.layer4(m.layer3(m.layer2(m.layer1(m.stem(x)))))

    neck, _, lr = check_wrapped(visual, images, reference, channels=256,
                                call=lambda m, x: m(torch.nn.functional.interpolate(x, size=(64, 64))))
    assert tuple(lr.shape[-2:]) == (2, 3) and neck.stride == 32


def test_timm_trunk_tower_is_read_like_timm():
    torch.manual_seed(0)
    visual = _build_vision_tower(embed_dim=16, vision_cfg=CLIPVisionCfg(
        timm_model_name="resnet10t", timm_model_pretrained=False, timm_pool="", timm_proj="linear", image_size=64))
    images = torch.randn(1, 3, 64, 96)
    captured = {}

    def reference(m, x):
        handle = m.trunk.layer4.register_forward_hook(lambda _m, _a, out: captured.update(out=out))
        try:
            m(x)
        finally:
            handle.remove()
        return captured["out"]

    neck, _, _ = check_wrapped(visual, images, reference, channels=512)
    assert neck.layer == "trunk.layer4"


def test_proj_layer_gives_tokens_projected_to_the_embedding():
    visual = _vit_tower()
    images = torch.randn(1, 3, 32, 48)

    def reference(m, x):
        return tokens_to_map(_tokens_after_ln_post(m, x) @ m.proj, 0, 4, 6)

    neck, _, _ = check_wrapped(visual, images, reference, channels=16, layer="proj")
    assert neck.layer == "ln_post"


def test_auto_with_featup_clip_upsampler_and_unprojected_tokens_fails_before_any_download():
    pytest.importorskip("featup_adapters.hub")
    # FeatUp's CLIP upsampler is registered for open_clip/ViT-B-16 and expects 512 channels
    with pytest.raises(ValueError, match=r"featup/clip.*512-channel.*gives 32 channels"):
        featup_adapters.wrap(_vit_tower(), "auto", backbone_id="open_clip/ViT-B-16")
