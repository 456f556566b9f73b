"""adaptive_conv: numerics against the float64 reference, gradients, opcheck, compile, bad input."""
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from featup_adapters import ops
from featup_adapters.ops import adaptive_conv, adaptive_conv_reference

OP = torch.ops.featup_adapters


def make(B, C, H, W, k, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H + k - 1, W + k - 1, generator=g, dtype=torch.float64)
    f = torch.randn(B, H, W, k, k, generator=g, dtype=torch.float64)
    return x.to(dtype), f.to(dtype)


SHAPES = [  # B, C, H, W, k: non-square, odd channel counts, every k family
    (1, 1, 1, 1, 1), (2, 3, 5, 7, 3), (1, 13, 20, 37, 7), (3, 6, 9, 4, 5), (2, 19, 17, 33, 9),
    (1, 8, 6, 70, 15), (2, 7, 31, 3, 1), (1, 40, 12, 48, 7),
    (2, 24, 3, 16, 11),  # whole channel blocks, an unpaired last row, k larger than H
]


def test_extension_serves_cpu():
    assert ops.extension_loaded(), ops.backend("cpu")
    assert ops.backend("cpu").name.startswith("cpu_kernel"), str(ops.backend("cpu"))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-4)])
def test_forward_and_gradients_match_float64_reference(shape, dtype, tol):
    x, f = make(*shape)
    B, C, H, W, k = shape
    g = torch.randn(B, C, H, W, dtype=torch.float64)
    ref = adaptive_conv_reference(x, f)
    ref_gi = ops.adaptive_conv_grad_input_reference(g, f)
    ref_gf = ops.adaptive_conv_grad_filters_reference(g, x)
    out = adaptive_conv(x.to(dtype), f.to(dtype))
    assert out.dtype == dtype and out.shape == (B, C, H, W)
    scale = 1 + ref.abs().max().item()
    torch.testing.assert_close(out.double(), ref, atol=tol * scale, rtol=tol)
    gi = OP.adaptive_conv_grad_input(g.to(dtype), f.to(dtype))
    gf = OP.adaptive_conv_grad_filters(g.to(dtype), x.to(dtype))
    torch.testing.assert_close(gi.double(), ref_gi, atol=tol * (1 + ref_gi.abs().max().item()), rtol=tol)
    torch.testing.assert_close(gf.double(), ref_gf, atol=tol * (1 + ref_gf.abs().max().item()), rtol=tol)


@pytest.mark.parametrize("shape", [(2, 11, 37, 531, 7), (1, 9, 41, 257, 3), (1, 5, 4, 300, 5)])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-4)])
def test_forward_column_strips_and_row_bands(shape, dtype, tol):
    # Wider than one column strip (256 pixels) and taller than one band of row pairs: strips of
    # equal width and a narrower last one, a last band with fewer pairs, an unpaired last row.
    x, f = make(*shape)
    ref = adaptive_conv_reference(x, f)
    out = adaptive_conv(x.to(dtype), f.to(dtype))
    torch.testing.assert_close(out.double(), ref, atol=tol * (1 + ref.abs().max().item()), rtol=tol)


@pytest.mark.parametrize("k", [1, 3, 7, 15])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-4)])
def test_grad_input_at_tile_edges(k, dtype, tol):
    # grad_input's tiles over the zero-padded rows: widths below one tile, about one, and
    # several, each with a partial last tile, the taps wider than a tile (k = 15), and channel
    # counts with a tail below the channel block
    g = torch.Generator().manual_seed(k)
    for W in (1, 5, 15, 16, 17, 22, 31, 33, 47, 64, 230):
        for C in (1, 13):
            f = torch.randn(1, 3, W, k, k, generator=g, dtype=torch.float64)
            gr = torch.randn(1, C, 3, W, generator=g, dtype=torch.float64)
            ref = ops.adaptive_conv_grad_input_reference(gr, f)
            got = OP.adaptive_conv_grad_input(gr.to(dtype), f.to(dtype))
            torch.testing.assert_close(got.double(), ref, atol=tol * (1 + ref.abs().max().item()),
                                       rtol=tol, msg=lambda m: f"W={W} C={C}: {m}")


def test_reference_matches_definition_loop():
    x, f = make(1, 2, 3, 4, 3)
    out = adaptive_conv_reference(x, f)
    expect = torch.zeros_like(out)
    for c in range(2):
        for y in range(3):
            for xx in range(4):
                expect[0, c, y, xx] = (f[0, y, xx] * x[0, c, y:y + 3, xx:xx + 3]).sum()
    torch.testing.assert_close(out, expect)


def test_every_filter_tap_gets_a_gradient():
    # FeatUp's CUDA kernel gave a gradient to only 7 of 49 taps.
    x, f = make(1, 4, 6, 6, 7)
    f.requires_grad_(True)
    adaptive_conv(x, f).sum().backward()
    assert (f.grad.abs().sum(dim=(0, 1, 2)) > 0).all()


@pytest.mark.parametrize("shape", [(2, 3, 4, 5, 3), (1, 2, 3, 6, 5), (2, 1, 2, 2, 1)])
def test_gradcheck_both_inputs(shape):
    x, f = make(*shape)
    x.requires_grad_(True)
    f.requires_grad_(True)
    assert torch.autograd.gradcheck(adaptive_conv, (x, f))
    assert torch.autograd.gradgradcheck(adaptive_conv, (x, f))
    # the reference is the fallback: it must be differentiable on its own (it accumulates in place)
    assert torch.autograd.gradcheck(adaptive_conv_reference, (x, f))


@pytest.mark.parametrize("shape", [(2, 3, 4, 5, 3), (1, 5, 6, 3, 7), (0, 3, 4, 4, 3)])
def test_opcheck_all_ops(shape):
    x, f = make(*shape, dtype=torch.float32)
    B, C, H, W, k = shape
    g = torch.randn(B, C, H, W)
    for requires_grad in (False, True):
        args = (x.clone().requires_grad_(requires_grad), f.clone().requires_grad_(requires_grad))
        torch.library.opcheck(OP.adaptive_conv.default, args)
    torch.library.opcheck(OP.adaptive_conv_grad_input.default, (g, f))
    torch.library.opcheck(OP.adaptive_conv_grad_filters.default, (g, x))


def test_torch_compile_fullgraph_forward_and_backward():
    x, f = make(2, 5, 9, 11, 7, dtype=torch.float32)
    x.requires_grad_(True)
    f.requires_grad_(True)

    def fn(a, b):
        return (adaptive_conv(a, b) * 2).sin()

    compiled = torch.compile(fn, fullgraph=True, backend="inductor")
    out = compiled(x, f)
    torch.testing.assert_close(out, fn(x, f))
    gx, gf = torch.autograd.grad(out.sum(), (x, f))
    ex, ef = torch.autograd.grad(fn(x, f).sum(), (x, f))
    torch.testing.assert_close(gx, ex)
    torch.testing.assert_close(gf, ef)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_half_precision_accumulates_in_float32(dtype, tol):
    x, f = make(2, 16, 12, 10, 7)
    f = torch.softmax(f.flatten(3), -1).view_as(f)  # JBU-like normalized filters
    xh, fh = x.to(dtype), f.to(dtype)
    out = adaptive_conv(xh, fh)
    assert out.dtype == dtype
    ref = adaptive_conv_reference(xh.double(), fh.double())
    torch.testing.assert_close(out.double(), ref, atol=tol * ref.abs().max().item(), rtol=tol)
    g = torch.randn_like(out)
    gi = OP.adaptive_conv_grad_input(g, fh)
    gf = OP.adaptive_conv_grad_filters(g, xh)
    ref_gi = ops.adaptive_conv_grad_input_reference(g.double(), fh.double())
    ref_gf = ops.adaptive_conv_grad_filters_reference(g.double(), xh.double())
    torch.testing.assert_close(gi.double(), ref_gi, atol=tol * ref_gi.abs().max().item(), rtol=tol)
    torch.testing.assert_close(gf.double(), ref_gf, atol=tol * ref_gf.abs().max().item(), rtol=tol)


@pytest.mark.parametrize("shape", [(0, 3, 4, 5, 3), (2, 0, 4, 5, 3), (2, 3, 0, 5, 3), (2, 3, 4, 0, 3)])
def test_empty_tensors(shape):
    x, f = make(*shape, dtype=torch.float32)
    x.requires_grad_(True)
    f.requires_grad_(True)
    out = adaptive_conv(x, f)
    assert out.shape == shape[:2] + shape[2:4]
    out.sum().backward()
    assert x.grad.shape == x.shape and f.grad.shape == f.shape
    assert not x.grad.abs().sum() and not f.grad.abs().sum()


def test_non_contiguous_and_channels_last_inputs():
    x, f = make(2, 6, 10, 12, 5, dtype=torch.float32)
    ref = adaptive_conv(x, f)
    torch.testing.assert_close(adaptive_conv(x.contiguous(memory_format=torch.channels_last), f), ref)
    xt = x.transpose(2, 3).contiguous().transpose(2, 3)   # same values, strided
    ft = f.permute(0, 2, 1, 3, 4).contiguous().permute(0, 2, 1, 3, 4)
    assert not xt.is_contiguous() and not ft.is_contiguous()
    torch.testing.assert_close(adaptive_conv(xt, ft), ref)
    big = torch.randn(2, 12, 14, 16)
    torch.testing.assert_close(adaptive_conv(big[:, ::2], f), adaptive_conv(big[:, ::2].contiguous(), f))


BAD = [
    (lambda: (torch.randn(3, 6, 6), torch.randn(1, 4, 4, 3, 3)), ValueError, r"expected input of shape \[B, C, H\+k-1, W\+k-1\] \(4-D\), got 3-D"),
    (lambda: (torch.randn(1, 3, 6, 6), torch.randn(1, 4, 4, 9)), ValueError, r"expected filters of shape \[B, H, W, k, k\] \(5-D\), got 4-D"),
    (lambda: (torch.randn(2, 3, 6, 6), torch.randn(1, 4, 4, 3, 3)), ValueError, r"batch mismatch, input has B=2 .* filters have B=1"),
    (lambda: (torch.randn(1, 3, 7, 6), torch.randn(1, 4, 4, 3, 3)), ValueError, r"expected input of spatial size H\+k-1 x W\+k-1 = 6x6 .* got input of shape \[1, 3, 7, 6\]"),
    (lambda: (torch.randn(1, 3, 7, 7), torch.randn(1, 4, 4, 4, 4)), ValueError, r"expected an odd filter size k, got k=4"),
    (lambda: (torch.randn(1, 3, 6, 6), torch.randn(1, 4, 4, 3, 5)), ValueError, r"expected square filters .* got 3x5"),
    (lambda: (torch.randn(1, 3, 6, 6), torch.randn(1, 4, 4, 3, 3, dtype=torch.float64)), TypeError, r"same dtype, got input torch.float32 and filters torch.float64"),
    (lambda: (torch.randn(1, 3, 6, 6, device="meta"), torch.randn(1, 4, 4, 3, 3)), ValueError, r"same device, got input on meta and filters on cpu"),
    (lambda: (torch.ones(1, 3, 6, 6, dtype=torch.int32), torch.ones(1, 4, 4, 3, 3, dtype=torch.int32)), TypeError, r"expected a floating dtype"),
]


@pytest.mark.parametrize("make_args,exc,match", BAD)
def test_bad_input_errors_name_expected_and_received(make_args, exc, match):
    with pytest.raises(exc, match=match):
        adaptive_conv(*make_args())


def test_raw_op_checks_in_cpp():
    with pytest.raises(RuntimeError, match=r"batch mismatch, input has B=2 but filters have B=1"):
        OP.adaptive_conv(torch.randn(2, 3, 6, 6), torch.randn(1, 4, 4, 3, 3))
    with pytest.raises(RuntimeError, match=r"expected input of spatial size H\+k-1 x W\+k-1 = 6x6"):
        OP.adaptive_conv(torch.randn(1, 3, 7, 6), torch.randn(1, 4, 4, 3, 3))
    with pytest.raises(RuntimeError, match=r"is not grad_out .* padded by an odd k-1"):
        OP.adaptive_conv_grad_filters(torch.randn(1, 3, 4, 4), torch.randn(1, 3, 7, 6))


def _run(code, **env):
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=full_env, timeout=300)


ISA_CHECK = """
    import torch, featup_adapters.ops as O
    print(O.cpu_isa())
    g = torch.Generator().manual_seed(1)
    for dtype, tol in [(torch.float32, 1e-4), (torch.float64, 1e-10)]:
        for (B, C, H, W, k) in [(2, 7, 9, 37, 7), (1, 13, 5, 19, 3), (1, 3, 4, 67, 15), (1, 12, 6, 21, 5),
                                (1, 5, 37, 300, 7), (1, 9, 3, 17, 7), (1, 9, 3, 33, 15), (1, 2, 3, 5, 7)]:
            x = torch.randn(B, C, H + k - 1, W + k - 1, generator=g, dtype=torch.float64)
            f = torch.randn(B, H, W, k, k, generator=g, dtype=torch.float64)
            gr = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
            xd, fd, grd = x.to(dtype), f.to(dtype), gr.to(dtype)
            pairs = [(O.adaptive_conv(xd, fd), O.adaptive_conv_reference(x, f)),
                     (torch.ops.featup_adapters.adaptive_conv_grad_input(grd, fd), O.adaptive_conv_grad_input_reference(gr, f)),
                     (torch.ops.featup_adapters.adaptive_conv_grad_filters(grd, xd), O.adaptive_conv_grad_filters_reference(gr, x))]
            for got, ref in pairs:
                assert got.dtype == dtype
                torch.testing.assert_close(got.double(), ref, atol=tol * (1 + ref.abs().max().item()), rtol=tol)
    print("ok")
"""


@pytest.mark.slow
@pytest.mark.parametrize("isa", ["generic", "avx2"])
def test_narrower_cpu_instruction_sets_agree_with_reference(isa):
    res = _run(ISA_CHECK, FEATUP_CPU_ISA=isa)
    assert res.returncode == 0, res.stderr
    chosen, status = res.stdout.split()
    if chosen != isa:
        pytest.skip(f"this CPU cannot run the {isa} kernels (chose {chosen})")
    assert status == "ok"


def test_fallback_to_reference_warns_once_and_says_why():
    res = _run("""
        import sys, warnings
        sys.modules["featup_adapters._C"] = None   # as if the extension was never built
        import torch, featup_adapters.ops as O
        x = torch.randn(1, 2, 6, 6); f = torch.randn(1, 4, 4, 3, 3)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            a = O.adaptive_conv(x, f); b = O.adaptive_conv(x, f)
        torch.testing.assert_close(a, O.adaptive_conv_reference(x, f))
        msgs = [str(m.message) for m in w if issubclass(m.category, RuntimeWarning)]
        assert len(msgs) == 1, msgs
        print(O.backend("cpu").name)
        print(msgs[0])
    """)
    assert res.returncode == 0, res.stderr
    name, message = res.stdout.split("\n", 1)
    assert name == "reference"
    assert "extension is not built" in message and "pip install --no-build-isolation" in message


def test_cuda_kernel_compiled_when_toolchain_present():
    toolchain = os.environ.get("CUDA_HOME") or shutil.which("nvcc")
    if not toolchain or os.environ.get("FEATUP_NO_CUDA") == "1":
        pytest.skip("no CUDA toolchain on this machine: the extension is CPU-only by design")
    assert ops.has_kernel("CUDA"), ("a CUDA toolchain is present but the extension has no CUDA kernel: "
                                   f"{ops.backend('cuda')}")
    assert ops.backend("cuda").name == "cuda_kernel"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-12), (torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_cuda_matches_cpu_reference(dtype, tol):
    x, f = make(2, 19, 13, 37, 7)
    g = torch.randn(2, 19, 13, 37, dtype=torch.float64)
    xd, fd, gd = (t.to("cuda", dtype) for t in (x, f, g))
    pairs = [(adaptive_conv(xd, fd), adaptive_conv_reference(x, f)),
             (OP.adaptive_conv_grad_input(gd, fd), ops.adaptive_conv_grad_input_reference(g, f)),
             (OP.adaptive_conv_grad_filters(gd, xd), ops.adaptive_conv_grad_filters_reference(g, x))]
    for got, ref in pairs:
        torch.testing.assert_close(got.cpu().double(), ref, atol=tol * (1 + ref.abs().max().item()), rtol=tol)
    xg, fg = x.cuda().requires_grad_(), f.cuda().requires_grad_()
    assert torch.autograd.gradcheck(adaptive_conv, (xg[:, :3, :9, :9].detach().requires_grad_(), fg[:, :3, :3].detach().requires_grad_()))


def test_empty_output_shape_dtype_and_fallbacks():
    like = torch.zeros(2, dtype=torch.float64)
    t = ops.empty_output(like, (3, 5, 4096))          # large enough for 2 MB pages to be asked for
    assert t.shape == (3, 5, 4096) and t.dtype == torch.float64 and t.device.type == "cpu"
    t.fill_(1.5)
    assert t.sum().item() == 1.5 * 3 * 5 * 4096
    assert ops.empty_output(like, [2, 3], dtype=torch.bfloat16).dtype == torch.bfloat16
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(like)
        out = ops.empty_output(fake, (4, 4), dtype=torch.float16)
    assert out.shape == (4, 4) and out.dtype == torch.float16
    from torch._subclasses.fake_tensor import is_fake
    assert is_fake(out)
    compiled = torch.compile(lambda x: ops.empty_output(x, (2, 3)).fill_(2.0) + x.sum(), fullgraph=True)
    torch.testing.assert_close(compiled(torch.ones(3)), torch.full((2, 3), 5.0))
