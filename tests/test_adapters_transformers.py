"""Hugging Face transformers backbones behind wrap(): random init from tiny configs (hidden 32, 1 layer)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

import featup_adapters  # noqa: E402
from neck_contract import RecordingUpsampler, check_wrapped, tokens_to_map  # noqa: E402

pytestmark = pytest.mark.transformers

TINY = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)


def _hf_call(model, images):
    kwargs = {"interpolate_pos_encoding": True} if model.config.model_type in ("vit", "siglip_vision_model",
                                                                                 "clip_vision_model") else {}
    return model(pixel_values=images, **kwargs)


# builder, expected prefix tokens, patch size
TOKEN_MODELS = {
    "vit": (lambda: transformers.ViTModel(transformers.ViTConfig(image_size=32, patch_size=8, **TINY),
                                          add_pooling_layer=False), 1),
    "dinov2": (lambda: transformers.Dinov2Model(transformers.Dinov2Config(image_size=32, patch_size=8, **TINY)), 1),
    "dinov2_with_registers": (lambda: transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(
        image_size=32, patch_size=8, num_register_tokens=4, **TINY)), 5),
    "siglip_vision": (lambda: transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        image_size=32, patch_size=8, **TINY)), 0),
    "clip_vision": (lambda: transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        image_size=32, patch_size=8, **TINY)), 1),
}


@pytest.mark.parametrize("kind", list(TOKEN_MODELS))
def test_token_model_features_are_last_hidden_state_without_prefix_tokens(kind):
    build, prefix = TOKEN_MODELS[kind]
    torch.manual_seed(0)
    model = build()
    images = torch.randn(2, 3, 40, 24)  # non-square, not the config's 32x32

    def reference(m, x):
        return tokens_to_map(_hf_call(m, x).last_hidden_state, prefix, 5, 3)

    neck, _, lr = check_wrapped(model, images, reference, channels=32, call=_hf_call)
    assert neck.stride == 8
    assert neck.backbone_id == f"hf/{model.config.model_type}"  # no hub id: built from a bare config


def test_clip_features_are_taken_before_post_layernorm():
    torch.manual_seed(0)
    model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(image_size=32, patch_size=8, **TINY)).eval()
    images = torch.randn(1, 3, 32, 32)
    with featup_adapters.wrap(model, RecordingUpsampler(32)) as neck:
        lr = neck.features(images)
        with torch.no_grad():
            tokens = model(pixel_values=images).last_hidden_state
            normed = model.get_submodule(neck.layer.replace("encoder", "post_layernorm"))(tokens)
        assert torch.equal(lr, tokens_to_map(tokens, 1, 4, 4))
        assert not torch.allclose(lr, tokens_to_map(normed, 1, 4, 4))


def test_input_not_a_multiple_of_the_patch_uses_the_floor_grid():
    torch.manual_seed(0)
    model = TOKEN_MODELS["dinov2"][0]()
    images = torch.randn(1, 3, 37, 30)  # 4 x 3 patches of 8 px

    def reference(m, x):
        return tokens_to_map(m(pixel_values=x).last_hidden_state, 1, 4, 3)

    check_wrapped(model, images, reference, channels=32, call=lambda m, x: m(pixel_values=x))


def _convnext_config(**kw):
    return transformers.ConvNextConfig(depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 24, 32], **kw)


def test_convnext_features_are_last_hidden_state():
    torch.manual_seed(0)
    model = transformers.ConvNextModel(_convnext_config())
    images = torch.randn(2, 3, 64, 96)

    def reference(m, x):
        return m(pixel_values=x).last_hidden_state

    neck, _, lr = check_wrapped(model, images, reference, channels=32, call=lambda m, x: m(pixel_values=x))
    assert tuple(lr.shape[-2:]) == (2, 3) and neck.stride == 32


@pytest.mark.parametrize("kind", ["convnext", "dinov2"])
def test_auto_backbone_features_are_the_last_feature_map(kind):
    torch.manual_seed(0)
    if kind == "convnext":
        config, size, grid, stride = _convnext_config(out_features=["stage3"]), (64, 96), (4, 6), 16
    else:
        config = transformers.Dinov2Config(image_size=32, patch_size=8, out_features=["stage1"], **TINY)
        size, grid, stride = (32, 48), (4, 6), 8
    model = transformers.AutoBackbone.from_config(config)
    images = torch.randn(2, 3, *size)

    def reference(m, x):
        return m(pixel_values=x).feature_maps[-1]

    channels = 24 if kind == "convnext" else 32
    neck, _, lr = check_wrapped(model, images, reference, channels=channels, call=lambda m, x: m(pixel_values=x))
    assert tuple(lr.shape[-2:]) == grid and neck.stride == stride


def test_full_clip_model_is_read_through_its_vision_tower():
    torch.manual_seed(0)
    config = transformers.CLIPConfig(vision_config=dict(image_size=32, patch_size=8, **TINY),
                                     text_config=dict(vocab_size=64, **TINY), projection_dim=16)
    model = transformers.CLIPModel(config)
    images = torch.randn(1, 3, 32, 40)

    def reference(m, x):
        return tokens_to_map(m.vision_model(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state,
                             1, 4, 5)

    check_wrapped(model, images, reference, channels=32, call=lambda m, x: m.get_image_features(pixel_values=x,
                                                                                              interpolate_pos_encoding=True))


def test_intermediate_layer_by_name():
    torch.manual_seed(0)
    model = transformers.ViTModel(transformers.ViTConfig(image_size=32, patch_size=8, **{**TINY, "num_hidden_layers": 2}),
                                  add_pooling_layer=False)
    name = [n for n, _ in model.named_modules() if n.endswith("layers.0") or n.endswith("layer.0")][0]
    images = torch.randn(1, 3, 32, 32)

    def reference(m, x):
        out = m(pixel_values=x, output_hidden_states=True).hidden_states[1]  # after the first layer
        return tokens_to_map(out, 1, 4, 4)

    check_wrapped(model, images, reference, channels=32, layer=name, call=lambda m, x: m(pixel_values=x))


def test_unknown_model_type_without_layer_says_how_to_pass_one():
    model = transformers.BertModel(transformers.BertConfig(vocab_size=32, **TINY))
    with pytest.raises(ValueError, match="model type 'bert'.*layer="):
        featup_adapters.wrap(model, RecordingUpsampler(32))
