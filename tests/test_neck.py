"""FeatUpNeck and wrap(): generic/torchvision backbones, hook hygiene, output sizes, norm, upsampler choice."""
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import featup_adapters
from featup_adapters.adapters import Layer, UnsupportedBackboneError
from neck_contract import RecordingUpsampler, check_wrapped, hook_counts, tokens_to_map


class TinyCNN(nn.Module):
    """A backbone from no supported ecosystem: stride-4 features with 8 channels."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.stage = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.stage(self.stem(x)).mean((2, 3)))


def _cnn():
    torch.manual_seed(0)
    return TinyCNN().eval()


def test_torchvision_resnet_by_explicit_layer():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    images = torch.randn(2, 3, 64, 96)

    def reference(m, x):
        x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        return m.layer4(m.layer3(m.layer2(m.layer1(x))))

    neck, _, lr = check_wrapped(model, images, reference, channels=512, layer="layer4")
    assert neck.stride == 32 and tuple(lr.shape[-2:]) == (2, 3)


def test_torchvision_vit_by_layer_with_token_layout():
    tv = pytest.importorskip("torchvision.models.vision_transformer")
    torch.manual_seed(0)
    model = tv.VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64)
    images = torch.randn(2, 3, 32, 32)

    def reference(m, x):
        tokens = m.encoder(torch.cat([m.class_token.expand(x.shape[0], -1, -1), m._process_input(x)], dim=1))
        return tokens_to_map(tokens, 1, 4, 4)

    layer = Layer("encoder.ln", layout="tokens", num_prefix_tokens=1, patch_size=8)
    neck, _, _ = check_wrapped(model, images, reference, channels=32, layer=layer)
    assert neck.stride == 8


def test_any_module_by_layer_name_and_probed_dims():
    model = _cnn()
    images = torch.randn(2, 3, 40, 24)
    neck, _, lr = check_wrapped(model, images, lambda m, x: m.stage(m.stem(x)), channels=8, layer="stage")
    assert neck.stride == 4 and tuple(lr.shape[-2:]) == (10, 6)


def test_unsupported_model_without_layer_lists_ecosystems_and_how_to_pass_layer():
    with pytest.raises(UnsupportedBackboneError) as err:
        featup_adapters.wrap(_cnn(), RecordingUpsampler(8))
    message = str(err.value)
    for word in ("timm", "transformers", "open_clip", "layer=", "'stem'", "'stage'"):
        assert word in message


def test_unknown_layer_name_lists_modules_that_exist():
    with pytest.raises(ValueError, match=r"no module 'stage.9'.*stage"):
        featup_adapters.wrap(_cnn(), RecordingUpsampler(8), layer="stage.9")


def test_tokens_without_patch_size_say_what_is_missing():
    class Tokens(nn.Module):
        def forward(self, x):
            return x.flatten(2).transpose(1, 2)  # [B, H*W, 3]

    with pytest.raises(RuntimeError, match="patch_size"):
        featup_adapters.wrap(Tokens(), RecordingUpsampler(3), layer="")


def test_remove_detaches_every_hook_and_is_idempotent():
    model = _cnn()
    before = hook_counts(model)
    neck = featup_adapters.wrap(model, RecordingUpsampler(8), layer="stage")
    assert hook_counts(model) != before
    neck.remove()
    neck.remove()
    assert hook_counts(model) == before and not neck.attached
    with pytest.raises(RuntimeError, match="removed"):
        neck(torch.randn(1, 3, 16, 16))


def test_context_manager_removes_hooks_even_on_error():
    model = _cnn()
    before = hook_counts(model)
    with pytest.raises(ZeroDivisionError):
        with featup_adapters.wrap(model, RecordingUpsampler(8), layer="stage") as neck:
            assert neck(torch.randn(1, 3, 16, 16)).shape == (1, 8, 16, 16)
            1 / 0
    assert hook_counts(model) == before


def test_exception_inside_the_backbone_releases_stored_outputs():
    model = _cnn()
    neck = featup_adapters.wrap(model, RecordingUpsampler(8), layer="stage")

    def fail(*_):
        raise RuntimeError("head exploded")

    handle = model.head.register_forward_hook(fail)  # runs after the hooked stage stored its output
    with pytest.raises(RuntimeError, match="head exploded") as err:
        neck(torch.randn(1, 3, 16, 16))
    assert "images of shape [1, 3, 16, 16]" in "".join(err.value.__notes__)
    assert neck._store == {}
    handle.remove()
    assert neck(torch.randn(1, 3, 16, 16)).shape == (1, 8, 16, 16)
    neck.remove()


def test_concurrent_forwards_from_threads_keep_their_own_features():
    model = _cnn()
    neck = featup_adapters.wrap(model, RecordingUpsampler(8), layer="stage")
    inputs = [torch.randn(1, 3, 16 + 8 * i, 16) for i in range(4)]
    expected = [neck.features(x) for x in inputs]
    results = [None] * len(inputs)
    start = threading.Barrier(len(inputs))

    def run(i):
        start.wait()
        for _ in range(5):
            results[i] = neck.features(inputs[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(r, e) for r, e in zip(results, expected))
    neck.remove()


def test_data_parallel_wrapper_runs_the_neck():
    neck = featup_adapters.wrap(_cnn(), RecordingUpsampler(8), layer="stage")
    out = nn.DataParallel(neck)(torch.randn(2, 3, 16, 24))
    assert out.shape == (2, 8, 16, 24)
    neck.remove()


@pytest.mark.cuda
def test_data_parallel_on_cuda_matches_the_plain_neck():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    neck = featup_adapters.wrap(_cnn().cuda(), RecordingUpsampler(8).cuda(), layer="stage")
    images = torch.randn(4, 3, 32, 32, device="cuda")
    plain = neck(images)
    parallel = nn.DataParallel(neck, device_ids=list(range(torch.cuda.device_count())))(images)
    torch.testing.assert_close(parallel, plain)
    assert neck._store == {}
    neck.remove()


@pytest.mark.parametrize("output_size,expected", [(None, (40, 24)), ((13, 7), (13, 7)), (0.5, (20, 12)),
                                                   (2, (80, 48))])
def test_output_size_is_the_image_size_a_pair_or_a_scale(output_size, expected):
    neck = featup_adapters.wrap(_cnn(), RecordingUpsampler(8), layer="stage", output_size=output_size)
    hr = neck(torch.randn(1, 3, 40, 24))
    assert tuple(hr.shape) == (1, 8, *expected)
    neck.remove()


@pytest.mark.parametrize("bad", [(3,), (0, 4), "big", True, -1.0])
def test_bad_output_size_is_rejected(bad):
    with pytest.raises((TypeError, ValueError), match="output_size"):
        featup_adapters.wrap(_cnn(), RecordingUpsampler(8), layer="stage", output_size=bad)


def test_upsampler_without_output_size_argument_is_resized():
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(()))

        def forward(self, source, guidance):
            return self.scale * F.interpolate(source, scale_factor=2)

    with featup_adapters.wrap(_cnn(), Plain(), layer="stage") as neck:
        hr = neck(torch.randn(1, 3, 40, 24))
    assert tuple(hr.shape) == (1, 8, 40, 24)


def test_use_norm_applies_a_layernorm_over_channels():
    model = _cnn()
    images = torch.randn(2, 3, 32, 16)
    raw = model.stage(model.stem(images))
    with featup_adapters.wrap(model, RecordingUpsampler(8), layer="stage", use_norm=True) as neck:
        _, lr = neck(images, return_lowres=True)
        assert isinstance(neck.norm, nn.LayerNorm) and neck.norm.normalized_shape == (8,)
    expected = F.layer_norm(raw.permute(0, 2, 3, 1), (8,)).permute(0, 3, 1, 2)
    torch.testing.assert_close(lr, expected)
    assert lr.mean(1).abs().max() < 1e-5  # zero mean over channels at every pixel


def test_images_must_be_rgb_batches():
    with featup_adapters.wrap(_cnn(), RecordingUpsampler(8), layer="stage") as neck:
        with pytest.raises(ValueError, match=r"expected images of shape \[B, 3, H, W\], got \[1, 4, 16, 16\]"):
            neck(torch.randn(1, 4, 16, 16))


def test_neck_exposes_what_the_trainer_needs():
    with featup_adapters.wrap(_cnn(), RecordingUpsampler(8), layer="stage") as neck:
        assert neck.feature_dim == 8 and neck.stride == 4 and neck.layer == "stage"
        assert neck.mean == (0.485, 0.456, 0.406) and neck.std == (0.229, 0.224, 0.225)
        up = neck.upsampler
        lr = neck.features(torch.randn(1, 3, 16, 16))
        assert lr.shape == (1, 8, 4, 4) and up.seen == []  # features() does not upsample


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_baseline_upsamplers_by_name(mode):
    with featup_adapters.wrap(_cnn(), mode, layer="stage") as neck:
        hr, lr = neck(torch.randn(1, 3, 40, 24), return_lowres=True)
    assert tuple(hr.shape) == (1, 8, 40, 24)
    torch.testing.assert_close(hr, F.interpolate(lr, size=(40, 24), mode=mode, align_corners=False))


def test_jbu_upsampler_by_name_is_trainable():
    # stride-4 features of a 32x16 image (8x4) upsampled to 4x the image: 16x, all four JBU stages
    with featup_adapters.wrap(_cnn(), "jbu", layer="stage", output_size=4) as neck:
        hr = neck(torch.randn(1, 3, 32, 16))
        hr.square().mean().backward()
        assert tuple(hr.shape) == (1, 8, 128, 64)
        missing = [n for n, p in neck.upsampler.named_parameters() if p.grad is None]
        assert not missing, missing


def test_auto_without_a_registered_upsampler_says_how_to_train_one():
    with pytest.raises(LookupError, match=r"featup-adapters train --backbone"):
        featup_adapters.wrap(_cnn(), "auto", layer="stage", backbone_id="my/tiny_cnn")


def test_auto_loads_the_upsampler_registered_for_the_backbone(tmp_path):
    hub = pytest.importorskip("featup_adapters.hub")
    from featup_adapters.upsamplers import JBUStack

    trained = JBUStack(8)
    trained.save_pretrained(tmp_path / "up", backbone_id="my/tiny_cnn", layer="stage", use_norm=True)
    hub.register_upsampler("test/tiny_cnn", tmp_path / "up", overwrite=True)
    try:
        with featup_adapters.wrap(_cnn(), "auto", layer="stage", backbone_id="my/tiny_cnn") as neck:
            assert isinstance(neck.upsampler, JBUStack) and isinstance(neck.norm, nn.LayerNorm)
            for a, b in zip(neck.upsampler.state_dict().values(), trained.state_dict().values()):
                assert torch.equal(a, b)
            assert neck(torch.randn(1, 3, 32, 16)).shape == (1, 8, 32, 16)
        with pytest.raises(ValueError, match=r"trained for backbone my/tiny_cnn.*other/net"):
            featup_adapters.wrap(_cnn(), str(tmp_path / "up"), layer="stage", backbone_id="other/net")
    finally:
        hub.unregister_upsampler("test/tiny_cnn")


def test_upsampler_for_another_channel_count_is_rejected_naming_both():
    from featup_adapters.upsamplers import JBUStack

    with pytest.raises(ValueError, match=r"16-channel.*8 channels"):
        featup_adapters.wrap(_cnn(), JBUStack(16), layer="stage")
