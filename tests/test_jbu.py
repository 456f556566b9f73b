"""JBU stage and stack: FeatUp's numbers, any output size, baselines, bad input, dtypes, modes, grads."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from featup_adapters.upsamplers import (InterpolateUpsampler, JBUStack, JointBilateralUpsampler,
                                        jbu, make_upsampler, stage_sizes)
from test_featup_checkpoint import oracle_stack, oracle_stage, random_featup_state

warnings.filterwarnings("ignore", message=".*runs the pure PyTorch reference.*")


def _stack(dim=8, seed=0, **kw):
    stack = JBUStack(dim, **kw)
    stack.load_state_dict(random_featup_state(dim, seed=seed, stages=stack.num_stages))
    return stack.eval()


def _inputs(B=2, C=8, h=5, w=7, H=80, W=112, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, h, w, generator=g), torch.randn(B, 3, H, W, generator=g)


# --- FeatUp equivalence ----------------------------------------------------------------------------

@pytest.mark.parametrize("hw,HW", [((5, 7), (10, 14)), ((5, 7), (13, 20)), ((4, 4), (4, 9))])
def test_stage_matches_unfold_oracle_at_any_size(hw, HW):
    # in float64, so the comparison checks the maths, not float32 summation order (which moves
    # with the thread count)
    stack = _stack().double()
    p = {k: v.detach() for k, v in stack.state_dict().items()}
    src, img = (t.double() for t in _inputs(h=hw[0], w=hw[1], H=HW[0], W=HW[1]))
    with torch.no_grad():
        ours = stack.up2(src, img)
        want = oracle_stage(p, "up2.", src, img)
    assert ours.shape == (2, 8, *HW) and ours.dtype == torch.float64
    assert (ours - want).abs().max().item() <= 1e-10


def test_stack_matches_featup_at_16x_with_init_and_random_weights():
    src, img = _inputs(h=3, w=4, H=48, W=64)
    for stack in (JBUStack(8).eval(), _stack(seed=5)):
        p = {k: v.detach() for k, v in stack.state_dict().items()}
        with torch.no_grad():
            assert (stack(src, img) - oracle_stack(p, src, img)).abs().max().item() <= 1e-5


def test_functional_jbu_equals_module():
    up = _stack().up1
    src, img = _inputs(H=10, W=14)
    with torch.no_grad():
        a = up(src, img)
        b = jbu(src, img, range_temp=up.range_temp, range_proj=up.range_proj,
                fixup_proj=up.fixup_proj, sigma_spatial=up.sigma_spatial, radius=3)
    assert torch.equal(a, b)


def test_stage_is_configurable():
    up = JointBilateralUpsampler(guidance_dim=4, key_dim=8, radius=1).eval()
    assert up.fixup_proj[0].weight.shape == (9, 13, 1, 1)
    out = up(torch.randn(1, 5, 3, 4), torch.randn(1, 4, 6, 8))
    assert out.shape == (1, 5, 6, 8)


# --- any output size -------------------------------------------------------------------------------

@pytest.mark.parametrize("src_hw,out_hw,steps", [
    ((14, 14), (224, 224), 4), ((14, 14), (42, 42), 2), ((14, 14), (196, 196), 4),
    ((14, 14), (448, 448), 5), ((14, 20), (224, 320), 4), ((5, 7), (19, 100), 4),
    ((16, 16), (224, 224), 4), ((6, 6), (6, 6), 1)])
def test_stage_schedule(src_hw, out_hw, steps):
    sizes = stage_sizes(src_hw, out_hw)
    assert len(sizes) == steps and sizes[-1] == out_hw
    prev = src_hw
    for s in sizes:
        assert all(p <= a <= 2 * p for p, a in zip(prev, s)), sizes
        prev = s


def test_16x_schedule_is_featups_and_32x_reuses_last_stage():
    stack = JBUStack(4)
    assert stack.stage_plan((14, 14), (224, 224)) == [
        ("up1", (28, 28)), ("up2", (56, 56)), ("up3", (112, 112)), ("up4", (224, 224))]
    assert [n for n, _ in stack.stage_plan((7, 7), (224, 224))] == ["up1", "up2", "up3", "up4",
                                                                  "up4"]
    assert [n for n, _ in stack.stage_plan((14, 14), (42, 42))] == ["up1", "up2"]


@pytest.mark.parametrize("hw,out", [((5, 7), None), ((5, 7), (15, 21)), ((4, 4), (56, 56)),
                                    ((3, 2), (96, 64)), ((5, 7), (23, 50)), ((5, 7), (5, 7))])
def test_stack_reaches_any_output_size(hw, out):
    stack = _stack()
    src, img = _inputs(h=hw[0], w=hw[1], H=37, W=61)
    with torch.no_grad():
        y = stack(src, img, out)
    assert y.shape == (2, 8, *(out or (37, 61)))
    assert torch.isfinite(y).all()


def test_stack_output_equals_its_stages_plus_fixup():
    # the fused last stage + fixup equals running the stages then x + 0.1 * fixup(x)
    stack = _stack(seed=3)
    src, img = _inputs(h=5, w=7)
    with torch.no_grad():
        x = src
        for name, size in stack.stage_plan((5, 7), (23, 50)):
            x = getattr(stack, name)(x, F.adaptive_avg_pool2d(img, size))
        want = x + 0.1 * stack.fixup_proj(x)
        got = stack(src, img, (23, 50))
    assert (got - want).abs().max().item() <= 1e-5


def test_output_size_forms():
    stack = _stack()
    src, img = _inputs()
    with torch.no_grad():
        assert stack(src, img, 16).shape[-2:] == (16, 16)
        assert stack(src, img, torch.Size([12, 14])).shape[-2:] == (12, 14)


# --- baselines ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,mode", [("bilinear", "bilinear"), ("bicubic", "bicubic"),
                                       ("nearest", "nearest-exact")])
def test_baselines_resize_like_interpolate(kind, mode):
    up = make_upsampler(kind)
    assert isinstance(up, InterpolateUpsampler) and not list(up.parameters())
    src, img = _inputs()
    kw = {} if mode.startswith("nearest") else {"align_corners": False}
    assert torch.equal(up(src, img), F.interpolate(src, (80, 112), mode=mode, **kw))
    assert up(src, None, (9, 30)).shape[-2:] == (9, 30)


def test_make_upsampler_jbu_and_errors():
    assert isinstance(make_upsampler("jbu", dim=16), JBUStack)
    with pytest.raises(ValueError, match=r"needs the feature channel count"):
        make_upsampler("jbu")
    with pytest.raises(ValueError, match=r"unknown kind 'lanczos'"):
        make_upsampler("lanczos")


# --- bad input ---------------------------------------------------------------------------------------

def test_bad_inputs_say_what_was_expected_and_what_came():
    stack = _stack()
    src, img = _inputs()
    with pytest.raises(ValueError, match=r"expected guidance of shape \[B, 3, H, W\], got "
                                         r"\[2, 4, 32, 32\]"):
        stack(src, torch.randn(2, 4, 32, 32))
    with pytest.raises(ValueError, match=r"batch mismatch, source has B=2 .* guidance has B=3"):
        stack(src, torch.randn(3, 3, 32, 32))
    with pytest.raises(ValueError, match=r"output size 4x4 is smaller than the source 5x7"):
        stack(src, img, (4, 4))
    with pytest.raises(ValueError, match=r"expected source of shape \[B, C, h, w\] \(4-D\), got a "
                                         r"3-D tensor of shape \[8, 5, 7\]"):
        stack(src[0], img)
    with pytest.raises(ValueError, match=r"expected guidance of shape \[B, 3, H, W\] \(4-D\), got "
                                         r"a 3-D tensor"):
        stack(src, img[0])
    with pytest.raises(ValueError, match=r"expected source of shape \[B, 8, h, w\] \(8 channels\), "
                                         r"got \[2, 6, 5, 7\]"):
        stack(src[:, :6], img)
    with pytest.raises(TypeError, match=r"output_size as an int or an \(H, W\) pair"):
        stack(src, img, 2.5)
    with pytest.raises(ValueError, match=r"expected guidance of shape \[B, 3, H, W\], got "
                                         r"\[2, 1, 80, 112\]"):
        stack.up1(src, img[:, :1])
    with pytest.raises(ValueError, match=r"output size 4x4 is smaller"):
        make_upsampler("bilinear")(src, None, (4, 4))


# --- dtypes, modes, gradients ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_cpu(dtype):
    stack = _stack()
    src, img = _inputs(h=4, w=6, H=64, W=96)
    with torch.no_grad():
        ref = stack(src, img)
        with torch.autocast("cpu", dtype=dtype):
            low = stack(src, img)
    assert low.shape == ref.shape and torch.isfinite(low).all()
    assert (low.float() - ref).abs().max().item() < 0.1 * ref.abs().max().item()


def test_half_precision_features():
    stack = _stack().to(torch.bfloat16)
    src, img = _inputs(h=4, w=6, H=16, W=24)
    out = stack(src.bfloat16(), img.bfloat16())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_matches_cpu(dtype):
    stack = _stack()
    src, img = _inputs(h=6, w=9, H=96, W=144)
    with torch.no_grad():
        ref = stack(src, img)
        cu = stack.cuda()
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            out = cu(src.cuda(), img.cuda()).float().cpu()
    tol = 1e-4 if dtype == torch.float32 else 0.1 * ref.abs().max().item()
    assert (out - ref).abs().max().item() <= tol


def test_eval_is_deterministic_and_train_mode_drops_out():
    stack = _stack()
    src, img = _inputs(h=4, w=6, H=64, W=96)
    with torch.no_grad():
        a, b = stack(src, img), stack(src, img)
        assert torch.equal(a, b)
        stack.train()
        torch.manual_seed(0)
        t1 = stack(src, img)
        torch.manual_seed(1)
        t2 = stack(src, img)
    assert not torch.allclose(t1, t2) and not torch.allclose(t1, a)


def test_gradients_reach_every_parameter_and_both_inputs():
    stack = _stack()
    src, img = _inputs(h=4, w=6, H=64, W=96)
    src.requires_grad_(True)
    img.requires_grad_(True)
    (stack(src, img) ** 2).mean().backward()
    for name, p in stack.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert src.grad.abs().sum() > 0 and img.grad.abs().sum() > 0


def test_stage_gradcheck_float64():
    up = _stack(dim=2).up1.double()
    src = torch.randn(1, 2, 2, 3, dtype=torch.float64, requires_grad=True)
    img = torch.randn(1, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s, g: up(s, g), (src, img), atol=1e-6, fast_mode=True)


def test_range_logits_loop_matches_unfold_and_native_op(monkeypatch):
    from featup_adapters.upsamplers import _range
    q = torch.randn(2, 5, 7, 9, dtype=torch.float64, requires_grad=True)
    want = (F.unfold(F.pad(q, [3] * 4, mode="reflect"), 7).view(2, 5, 49, 7, 9) * q[:, :, None]).sum(1)
    want = want.permute(0, 2, 3, 1)
    native = _range.range_logits(q, 3)
    monkeypatch.setattr(_range, "_native", lambda device: False)
    loop = _range.range_logits(q, 3)
    assert (loop - want).abs().max().item() < 1e-12
    assert (native - want).abs().max().item() < 1e-12
    small = q[:1, :3, :4, :5].detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: _range.range_logits(t, 2), (small,), fast_mode=True)


def test_keys_as_matrix_products_equal_the_module_and_hooks_keep_the_module():
    from featup_adapters.upsamplers._kernel import project_keys
    up = JointBilateralUpsampler().double()
    with torch.no_grad():
        for t in up.parameters():
            t.add_(torch.randn_like(t) * 0.3)
    g = torch.randn(2, 3, 9, 11, dtype=torch.float64)
    for training in (False, True):
        up.train(training)
        torch.manual_seed(1)
        want = up.range_proj(g)
        torch.manual_seed(1)
        got = project_keys(up.range_proj, g)
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)     # same dropout draws too
    calls = []
    handle = up.range_proj[0].register_forward_hook(lambda m, i, o: calls.append(o.shape))
    up.eval()
    project_keys(up.range_proj, g)
    up(torch.randn(2, 4, 5, 6, dtype=torch.float64), g)
    handle.remove()
    assert len(calls) == 2          # hooked: the module itself ran, in both calls
