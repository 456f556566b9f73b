"""Correct by default: the neck follows the backbone's mode, bad images and sizes are refused up
front, JBU stacks check radius and dtypes when built / called, and an upsampler is never paired
with the other kind (pretrained vs random-init) of backbone."""
import math
import warnings

import pytest
import torch
from torch import nn

import featup_adapters
from featup_adapters import JBUStack, JointBilateralUpsampler
from featup_adapters.adapters import create_backbone, register_backbone
from featup_adapters.adapters.registry import _REGISTRY


class Net(nn.Module):
    """Stride-4, 8-channel features; a BatchNorm to see that the neck leaves its mode alone."""

    def __init__(self, pretrained: bool = True):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.stage = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU())

    def forward(self, x):
        return self.stage(self.bn(self.stem(x)))


@pytest.fixture
def net_name():
    register_backbone("test_kind_net", Net, layer="stage", patch_size=4, overwrite=True)
    yield "test_kind_net"
    _REGISTRY.pop("test_kind_net", None)


def _net():
    torch.manual_seed(0)
    return Net()


def test_wrap_puts_the_neck_in_the_backbones_eval_mode_so_calls_agree():
    neck = featup_adapters.wrap(_net().eval(), "jbu", layer="stage")
    assert not neck.training and not neck.upsampler.training
    assert not any(m.training for m in neck.modules())
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        assert torch.equal(neck(x), neck(x))                    # dropout off


def test_wrap_of_a_training_backbone_keeps_its_own_module_modes():
    model = _net().train()
    model.bn.eval()                                            # a frozen part of a training model
    neck = featup_adapters.wrap(model, "jbu", layer="stage")
    assert neck.training and neck.upsampler.training
    assert model.training and not model.bn.training           # left as the user set it
    neck.eval()
    assert not model.training and not neck.upsampler.training


def test_a_new_jbu_stack_is_an_ordinary_module_in_training_mode():
    assert JBUStack(8).training                               # nn.Module convention; .eval() for inference


def test_neck_refuses_small_integer_and_mismatched_images_before_the_backbone_runs():
    neck = featup_adapters.wrap(_net().eval(), "bilinear", layer="stage")
    with pytest.raises(ValueError, match=r"at least 4x4 pixels.*got 3x40"):
        neck(torch.randn(1, 3, 3, 40))
    with pytest.raises(TypeError, match=r"expected float images.*torch.uint8.*to_tensor"):
        neck(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(TypeError, match=r"images are torch.float16 but the backbone's weights are torch.float32"):
        neck(torch.zeros(1, 3, 32, 32, dtype=torch.float16))
    with pytest.raises(TypeError) as err:
        neck(torch.zeros(1, 3, 32, 32, dtype=torch.float64))
    assert "resize" not in str(err.value) and not getattr(err.value, "__notes__", None)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, float("nan")])
def test_wrap_refuses_a_non_finite_output_size(bad):
    with pytest.raises(ValueError, match="finite"):
        featup_adapters.wrap(_net(), "bilinear", layer="stage", output_size=bad)


@pytest.mark.parametrize("radius, error, match", [
    (2.5, TypeError, "integer radius"), (8, ValueError, r"radius in 0..7.*k = 17"),
    (-1, ValueError, "radius in 0..7"), (True, TypeError, "integer radius")])
def test_radius_is_checked_when_the_stack_is_built(radius, error, match):
    with pytest.raises(error, match=match):
        JBUStack(16, radius=radius)
    with pytest.raises(error, match=match):
        JointBilateralUpsampler(radius=radius)


def test_the_largest_radius_the_op_takes_builds_and_runs():
    stack = JBUStack(4, radius=7, num_stages=1).eval()
    with torch.no_grad():
        assert stack(torch.randn(1, 4, 8, 8), torch.randn(1, 3, 16, 16)).shape == (1, 4, 16, 16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.uint8])
@pytest.mark.parametrize("which", ["source", "guidance"])
def test_wrong_dtypes_into_a_float32_stack_say_what_is_accepted(dtype, which):
    stack = JBUStack(4, num_stages=1).eval()
    inputs = {"source": torch.randn(1, 4, 4, 4), "guidance": torch.randn(1, 3, 8, 8)}
    inputs[which] = inputs[which].to(dtype)
    floating = dtype.is_floating_point
    with pytest.raises(TypeError, match=(f"{which} is {dtype} but the weights are torch.float32" if floating
                                         else f"expected a floating-point {which}.*got {dtype}")):
        stack(inputs["source"], inputs["guidance"])


def test_mixed_dtypes_run_under_autocast():
    stack = JBUStack(4, num_stages=1).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = stack(torch.randn(1, 4, 4, 4).bfloat16(), torch.randn(1, 3, 8, 8))
    assert torch.isfinite(out.float()).all()


def test_stage_takes_dim_first_like_the_stack_and_keeps_the_old_positional_form():
    up = JointBilateralUpsampler(4, guidance_dim=3, key_dim=8, radius=1).eval()
    assert up.dim == 4 and up.init_kwargs()["dim"] == 4
    with pytest.raises(ValueError, match=r"\[B, 4, h, w\]"):
        up(torch.randn(1, 5, 4, 4), torch.randn(1, 3, 8, 8))
    with pytest.warns(DeprecationWarning, match="positional"):
        old = JointBilateralUpsampler(4, 8, 1)                  # (guidance_dim, key_dim, radius)
    assert (old.dim, old.guidance_dim, old.key_dim, old.radius) == (None, 4, 8, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert JointBilateralUpsampler(guidance_dim=4, key_dim=8, radius=1).guidance_dim == 4


def test_an_upsampler_is_not_paired_with_the_other_kind_of_backbone(net_name, tmp_path):
    from featup_adapters.hub import IncompatibleUpsamplerError, load_upsampler

    up = JBUStack(8, num_stages=1)
    up.save_pretrained(tmp_path / "pre", backbone_id=net_name, extra={"backbone_pretrained": True})
    up.save_pretrained(tmp_path / "rand", backbone_id=net_name, extra={"backbone_pretrained": False})
    random_init = create_backbone(net_name, pretrained=False)
    with pytest.raises(IncompatibleUpsamplerError, match="trained on a pretrained backbone.*is random-init"):
        featup_adapters.wrap(random_init, str(tmp_path / "pre"))
    with pytest.raises(IncompatibleUpsamplerError, match="random-init backbone.*is pretrained"):
        featup_adapters.wrap(net_name, load_upsampler(tmp_path / "rand"))
    assert featup_adapters.wrap(random_init, str(tmp_path / "rand")).backbone_pretrained is False
    assert featup_adapters.wrap(net_name, str(tmp_path / "pre")).backbone_pretrained is True
    # a model of unknown origin: nothing to compare, accepted
    assert featup_adapters.wrap(_net(), str(tmp_path / "pre"), layer="stage",
                                backbone_id=net_name).backbone_pretrained is None


def test_auto_never_gives_a_random_init_backbone_the_registered_pretrained_upsampler(net_name, tmp_path):
    from featup_adapters import hub

    JBUStack(8, num_stages=1).save_pretrained(tmp_path / "reg", backbone_id=net_name)
    hub.register_upsampler("test_kind_up", tmp_path / "reg", backbone_id=net_name, overwrite=True)
    try:
        assert isinstance(featup_adapters.wrap(net_name).upsampler, JBUStack)
        with pytest.raises(LookupError, match=r"random-init \(pretrained=False\).*trained on the pretrained"):
            featup_adapters.wrap(net_name, pretrained=False)
    finally:
        hub.unregister_upsampler("test_kind_up")
