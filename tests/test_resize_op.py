"""bicubic_pad op: float64 vs F.interpolate + F.pad, gradients, opcheck, compile, NaN locality, bad input."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from featup_adapters import ops
from featup_adapters.ops import bicubic_pad, bicubic_pad_reference
from featup_adapters.ops import _resize_cuda as reg
from featup_adapters.upsamplers import _resize

OP = torch.ops.featup_adapters


def oracle(x, size, r):
    """Written out here, independent of the module: torch's bicubic, then reflect/replicate pad."""
    y = F.interpolate(x, size=size, mode="bicubic", align_corners=False)
    if r == 0:
        return y
    mode = "reflect" if min(size) > r else "replicate"
    return F.pad(y, [r, r, r, r], mode=mode)


SHAPES = [  # (B, C, h, w), (H, W), r
    ((2, 3, 5, 7), (10, 14), 3),       # 2x, non-square
    ((1, 2, 14, 14), (28, 28), 3),
    ((1, 1, 1, 1), (4, 5), 3),         # 1x1 source, outputs <= r: replicate
    ((2, 2, 1, 6), (3, 12), 2),        # h = 1
    ((1, 3, 6, 1), (11, 2), 1),        # w = 1
    ((1, 2, 9, 5), (4, 3), 1),         # downscale
    ((2, 2, 8, 8), (8, 8), 0),         # same size, no padding (identity)
    ((1, 2, 3, 4), (2, 2), 3),         # output smaller than r
    ((1, 2, 7, 9), (13, 17), 3),       # less than 2x, odd ratio
    ((1, 1, 20, 30), (70, 90), 3),     # few planes: each plane split in row chunks over threads
    ((3, 5, 4, 6), (9, 11), 4),        # r = 4 < min side
    ((1, 2, 5, 5), (4, 4), 4),         # r = output side: replicate
    ((1, 2, 12, 16), (48, 32), 3),     # integer factors 4 and 2: periodic interior columns
    ((1, 1, 3, 40), (5, 200), 2),      # 5x along x, one long periodic run between the borders
]


def make(shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def test_op_has_cpu_kernel():
    assert ops.extension_loaded(), ops.backend("cpu")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("featup_adapters::bicubic_pad", "CPU")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("featup_adapters::bicubic_pad_backward", "CPU")


@pytest.mark.parametrize("shape,size,r", SHAPES)
def test_forward_and_backward_match_interpolate_and_pad_in_float64(shape, size, r):
    x = make(shape).requires_grad_(True)
    want = oracle(x, size, r)
    got = OP.bicubic_pad(x.detach(), list(size), r)
    assert got.shape == want.shape and got.dtype == torch.float64
    torch.testing.assert_close(got, want.detach(), atol=1e-12, rtol=1e-12)
    g = make(want.shape, seed=1)
    (want_gx,) = torch.autograd.grad(want, x, g)
    got_gx = OP.bicubic_pad_backward(g, list(shape[-2:]), r)
    torch.testing.assert_close(got_gx, want_gx, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(bicubic_pad_reference(x.detach(), size, r), want.detach())


# Wide rows at integer factors: the backward sums the interior columns as shifted contiguous
# combinations of the row's phases (one per period position) and gathers only the borders; a
# non-integer factor and a factor of 1 gather every column.
@pytest.mark.parametrize("w,W,r", [(56, 112, 3), (37, 111, 3), (16, 64, 2), (12, 96, 5), (40, 40, 3),
                                   (25, 60, 3), (30, 60, 0)])
def test_backward_of_wide_rows_matches_autograd_in_float64(w, W, r):
    x = make((2, 3, 4, w)).requires_grad_(True)
    want = oracle(x, (8, W), r)
    g = make(want.shape, seed=2)
    (want_gx,) = torch.autograd.grad(want, x, g)
    got_gx = OP.bicubic_pad_backward(g, [4, w], r)
    torch.testing.assert_close(got_gx, want_gx, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
@pytest.mark.parametrize("shape,size,r", SHAPES[:4] + SHAPES[8:10])
def test_lower_precisions_compute_in_float32(shape, size, r, dtype, tol):
    x = make(shape)
    want = oracle(x, size, r)
    got = bicubic_pad(x.to(dtype), size, r)
    assert got.dtype == dtype
    scale = 1 + want.abs().max().item()
    torch.testing.assert_close(got.double(), want, atol=tol * scale, rtol=tol)
    g = make(want.shape, seed=1)
    (want_gx,) = torch.autograd.grad(oracle(x.requires_grad_(), size, r), x, g)
    got_gx = OP.bicubic_pad_backward(g.to(dtype), list(shape[-2:]), r)
    assert got_gx.dtype == dtype
    torch.testing.assert_close(got_gx.double(), want_gx, atol=tol * (1 + want_gx.abs().max().item()), rtol=tol)


@pytest.mark.parametrize("shape,size,r", [((2, 2, 3, 4), (6, 9), 2), ((1, 1, 1, 3), (2, 5), 3),
                                          ((1, 2, 5, 4), (3, 3), 1)])
def test_gradcheck_and_gradgradcheck(shape, size, r):
    x = make(shape).requires_grad_(True)
    fn = lambda t: bicubic_pad(t, size, r)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


@pytest.mark.parametrize("shape,size,r", [((2, 3, 5, 7), (10, 14), 3), ((1, 2, 1, 1), (3, 2), 3),
                                          ((0, 3, 4, 4), (8, 8), 3)])
def test_opcheck_forward_and_backward_ops(shape, size, r):
    x = make(shape, dtype=torch.float32)
    for requires_grad in (False, True):
        torch.library.opcheck(OP.bicubic_pad.default, (x.clone().requires_grad_(requires_grad), list(size), r))
    g = torch.randn(shape[0], shape[1], size[0] + 2 * r, size[1] + 2 * r)
    for requires_grad in (False, True):
        torch.library.opcheck(OP.bicubic_pad_backward.default,
                              (g.clone().requires_grad_(requires_grad), list(shape[-2:]), r))


def test_torch_compile_fullgraph_forward_and_backward():
    x = make((2, 3, 6, 5), dtype=torch.float32).requires_grad_(True)

    def fn(t):
        return (bicubic_pad(t, (12, 10), 3) * 2).sin()

    compiled = torch.compile(fn, fullgraph=True, backend="inductor")
    out = compiled(x)
    torch.testing.assert_close(out, fn(x))
    (got,) = torch.autograd.grad(out.sum(), x)
    (want,) = torch.autograd.grad(fn(x).sum(), x)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", [(0, 0), (3, 4), (7, 9), (0, 9)])
def test_nan_and_inf_stay_where_interpolate_puts_them(bad, where):
    x = make((1, 2, 8, 10))
    x[0, 1, where[0], where[1]] = bad
    got = bicubic_pad(x, (16, 20), 3)
    want = oracle(x, (16, 20), 3)
    assert torch.equal(~torch.isfinite(got), ~torch.isfinite(want))
    assert torch.isfinite(got[0, 0]).all()                 # the other channel is untouched
    bad_frac = (~torch.isfinite(got[0, 1])).float().mean().item()
    assert 0 < bad_frac < 0.25                             # local: a few rows x a few columns
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite], want[finite], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("shape", [(0, 3, 4, 5), (2, 0, 4, 5)])
def test_empty_batch_or_channels(shape):
    x = make(shape, dtype=torch.float32).requires_grad_(True)
    out = bicubic_pad(x, (8, 10), 3)
    assert out.shape == (*shape[:2], 14, 16)
    out.sum().backward()
    assert x.grad.shape == x.shape


def test_non_contiguous_inputs():
    x = make((2, 6, 9, 11), dtype=torch.float32)
    want = bicubic_pad(x, (18, 22), 3)
    cl = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(bicubic_pad(cl, (18, 22), 3), want)
    xt = x.transpose(2, 3).contiguous().transpose(2, 3)
    assert not xt.is_contiguous()
    torch.testing.assert_close(bicubic_pad(xt, (18, 22), 3), want)
    big = make((2, 12, 9, 11), dtype=torch.float32)
    torch.testing.assert_close(bicubic_pad(big[:, ::2], (18, 22), 3),
                               bicubic_pad(big[:, ::2].contiguous(), (18, 22), 3))
    g = make((2, 6, 24, 28), dtype=torch.float32)
    torch.testing.assert_close(OP.bicubic_pad_backward(g.transpose(2, 3).contiguous().transpose(2, 3), [9, 11], 3),
                               OP.bicubic_pad_backward(g, [9, 11], 3))


BAD = [
    (lambda: (torch.randn(3, 6, 6), (8, 8), 1), ValueError, r"expected input of shape \[B, C, h, w\] \(4-D\), got 3-D"),
    (lambda: (torch.ones(1, 1, 4, 4, dtype=torch.int64), (8, 8), 1), TypeError, r"expected a floating dtype .* got torch.int64"),
    (lambda: (torch.randn(1, 1, 4, 4), (0, 8), 1), ValueError, r"expected an output size of at least 1x1, got 0x8"),
    (lambda: (torch.randn(1, 1, 4, 4), (8,), 1), ValueError, r"expected size \(H, W\) of two ints, got \(8,\)"),
    (lambda: (torch.randn(1, 1, 0, 4), (8, 8), 1), ValueError, r"expected a source of at least 1x1 pixels, got input of shape \[1, 1, 0, 4\]"),
    (lambda: (torch.randn(1, 1, 4, 4), (8, 8), -1), ValueError, r"expected an int padding r >= 0, got -1"),
    (lambda: (torch.randn(1, 1, 4, 4), (8, 8), 1.5), ValueError, r"expected an int padding r >= 0, got 1.5"),
]


@pytest.mark.parametrize("make_args,exc,match", BAD)
def test_bad_input_errors_name_expected_and_received(make_args, exc, match):
    with pytest.raises(exc, match=match):
        bicubic_pad(*make_args())


def test_raw_op_checks_in_cpp():
    with pytest.raises(RuntimeError, match=r"bicubic_pad: expected input of shape \[B, C, h, w\] \(4-D\), got 2-D"):
        OP.bicubic_pad(torch.randn(4, 4), [8, 8], 1)
    with pytest.raises(RuntimeError, match=r"bicubic_pad: expected a source of at least 1x1 pixels, got 0x4"):
        OP.bicubic_pad(torch.randn(1, 1, 0, 4), [8, 8], 1)
    with pytest.raises(RuntimeError, match=r"bicubic_pad: expected a padding r >= 0, got -2"):
        OP.bicubic_pad(torch.randn(1, 1, 4, 4), [8, 8], -2)
    with pytest.raises(RuntimeError, match=r"bicubic_pad_backward: expected an output size of at least 1x1, got 0x2"):
        OP.bicubic_pad_backward(torch.randn(1, 1, 6, 8), [4, 4], 3)


@pytest.mark.parametrize("shape,size,r", [SHAPES[0], SHAPES[2], SHAPES[5], SHAPES[7]])
def test_cuda_kernels_torch_path_agrees_with_cpu_kernel(shape, size, r):
    # the CUDA key runs these functions; they are device-agnostic, so check them here too
    x = make(shape)
    torch.testing.assert_close(reg.cuda_bicubic_pad(x, list(size), r), OP.bicubic_pad(x, list(size), r))
    g = make((shape[0], shape[1], size[0] + 2 * r, size[1] + 2 * r), seed=3)
    torch.testing.assert_close(reg.cuda_bicubic_pad_backward(g, list(shape[-2:]), r),
                               OP.bicubic_pad_backward(g, list(shape[-2:]), r))


def test_upsamplers_resize_is_the_op():
    x = make((1, 3, 6, 7), dtype=torch.float32)
    torch.testing.assert_close(_resize.bicubic_pad(x, (12, 14), 3), OP.bicubic_pad(x, [12, 14], 3),
                               atol=0, rtol=0)
    assert _resize.pad_mode(4, 9, 3) == "reflect" and _resize.pad_mode(3, 9, 3) == "replicate"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    x = make((2, 3, 7, 9)).requires_grad_(True)
    out = bicubic_pad(x.cuda(), (14, 18), 3)
    torch.testing.assert_close(out.cpu(), oracle(x, (14, 18), 3))
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, g)
    (want,) = torch.autograd.grad(oracle(x, (14, 18), 3), x, g.cpu())
    torch.testing.assert_close(gx, want)


def _run(code, **env):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


def test_without_extension_falls_back_to_reference():
    res = _run("""
        import sys
        sys.modules["featup_adapters._C"] = None   # as if the extension was never built
        import torch, torch.nn.functional as F
        from featup_adapters.upsamplers._resize import bicubic_pad
        x = torch.randn(1, 2, 5, 6, dtype=torch.float64, requires_grad=True)
        y = bicubic_pad(x, (10, 12), 3)
        want = F.pad(F.interpolate(x, (10, 12), mode="bicubic", align_corners=False), [3] * 4, mode="reflect")
        assert torch.equal(y, want)
        y.sum().backward()
        print("ok")
    """)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


@pytest.mark.parametrize("isa", ["generic", "avx2"])
def test_narrower_cpu_instruction_sets_agree_with_interpolate(isa):
    res = _run("""
        import torch, torch.nn.functional as F, featup_adapters.ops as O
        print(O.cpu_isa())
        for dtype, tol in [(torch.float32, 1e-5), (torch.float64, 1e-12)]:
            x = torch.randn(2, 3, 7, 37, dtype=torch.float64)
            want = F.pad(F.interpolate(x, (13, 75), mode="bicubic", align_corners=False), [3] * 4, mode="reflect")
            got = torch.ops.featup_adapters.bicubic_pad(x.to(dtype), [13, 75], 3)
            torch.testing.assert_close(got.double(), want, atol=tol * 10, rtol=tol)
            g = torch.randn(want.shape, dtype=torch.float64)
            xr = x.clone().requires_grad_()
            want_g, = torch.autograd.grad(F.pad(F.interpolate(xr, (13, 75), mode="bicubic", align_corners=False), [3] * 4, mode="reflect"), xr, g)
            got_g = torch.ops.featup_adapters.bicubic_pad_backward(g.to(dtype), [7, 37], 3)
            torch.testing.assert_close(got_g.double(), want_g, atol=tol * 100, rtol=tol)
        print("ok")
    """, FEATUP_CPU_ISA=isa)
    assert res.returncode == 0, res.stderr
    chosen, status = res.stdout.split()
    if chosen != isa:
        pytest.skip(f"this CPU cannot run the {isa} kernels (chose {chosen})")
    assert status == "ok"
