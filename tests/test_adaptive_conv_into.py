"""featup_adapters::adaptive_conv_into: the forward written in place (+ a per-channel bias), e.g.
into a band of rows of a larger result (JBUStack's row-band path)."""
import pytest
import torch

from featup_adapters import ops
from featup_adapters.ops import adaptive_conv_into, adaptive_conv_reference

OP = torch.ops.featup_adapters
pytestmark = pytest.mark.skipif(not ops.extension_loaded(), reason="the compiled ops are not built")


def make(B=2, C=11, H=9, W=21, k=7, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H + k - 1, W + k - 1, generator=g, dtype=dtype)
    f = torch.randn(B, H, W, k, k, generator=g, dtype=dtype)
    b = torch.randn(C, generator=g, dtype=dtype)
    return x, f, b


def expected(x, f, b):
    return adaptive_conv_reference(x, f) + (0 if b is None else b.view(1, -1, 1, 1))


@pytest.mark.parametrize("k", [1, 3, 7, 9])
@pytest.mark.parametrize("with_bias", [False, True])
def test_band_of_a_taller_map_in_float64(k, with_bias):
    """The kernel writes the band's rows of `full` only, with the bias, every other row kept."""
    x, f, b = make(k=k)
    b = b if with_bias else None
    full = torch.full((2, 11, 30, 21), 7.0, dtype=torch.float64)
    adaptive_conv_into(x, f, full[:, :, 4:13], b)
    torch.testing.assert_close(full[:, :, 4:13], expected(x, f, b), rtol=1e-12, atol=1e-12)
    assert torch.all(full[:, :, :4] == 7.0) and torch.all(full[:, :, 13:] == 7.0)


def test_contiguous_out_equals_the_functional_op():
    x, f, b = make(B=1, C=17, H=12, W=40, dtype=torch.float32)
    out = torch.empty(1, 17, 12, 40)
    adaptive_conv_into(x, f, out, b)
    torch.testing.assert_close(out, ops.adaptive_conv(x, f) + b.view(1, -1, 1, 1), rtol=0, atol=1e-5)


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_out_dtypes_get_the_result_cast(out_dtype):
    x, f, b = make(dtype=torch.float32)
    out = torch.empty(2, 11, 9, 21, dtype=out_dtype)
    adaptive_conv_into(x, f, out, b)
    want = expected(x.double(), f.double(), b.double()).to(out_dtype)
    torch.testing.assert_close(out, want, rtol=1e-2, atol=1e-2 if out_dtype != torch.float64 else 1e-4)


def test_non_row_contiguous_out_gets_the_result_copied():
    x, f, b = make()
    full = torch.zeros(2, 11, 21, 9, dtype=torch.float64)     # out is a transposed view
    out = full.transpose(2, 3)
    adaptive_conv_into(x, f, out, b)
    torch.testing.assert_close(out, expected(x, f, b), rtol=1e-12, atol=1e-12)


def test_half_precision_inputs():
    x, f, b = make(dtype=torch.bfloat16)
    out = torch.empty(2, 11, 9, 21)
    adaptive_conv_into(x, f, out, b)
    torch.testing.assert_close(out, expected(x.double(), f.double(), b.double()).float(),
                               rtol=2e-2, atol=5e-2)


def test_bad_arguments_are_refused_with_what_was_expected():
    x, f, b = make()
    with pytest.raises(ValueError, match=r"expected out of shape \[2, 11, 9, 21\], got \[2, 11, 9, 20\]"):
        adaptive_conv_into(x, f, torch.empty(2, 11, 9, 20, dtype=torch.float64), b)
    with pytest.raises(ValueError, match=r"expected bias of shape \[11\]"):
        adaptive_conv_into(x, f, torch.empty(2, 11, 9, 21, dtype=torch.float64), b[:5])
    with pytest.raises(TypeError, match="expected a floating out"):
        adaptive_conv_into(x, f, torch.empty(2, 11, 9, 21, dtype=torch.int32), b)
    with pytest.raises(RuntimeError, match="expected out of shape"):   # the op itself checks too
        OP.adaptive_conv_into(x, f, b, torch.empty(2, 11, 8, 21, dtype=torch.float64))


def test_refuses_autograd():
    x, f, b = make()
    with pytest.raises(RuntimeError, match="not differentiable"):
        adaptive_conv_into(x.requires_grad_(), f, torch.empty(2, 11, 9, 21, dtype=torch.float64), b)
    with torch.no_grad():      # under no_grad the same call is fine
        out = adaptive_conv_into(x, f, torch.empty(2, 11, 9, 21, dtype=torch.float64), b)
    torch.testing.assert_close(out, expected(x.detach(), f, b), rtol=1e-12, atol=1e-12)


def test_opcheck_and_compile():
    x, f, b = make(dtype=torch.float32)
    out = torch.zeros(2, 11, 9, 21)
    torch.library.opcheck(OP.adaptive_conv_into.default, (x, f, b, out),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))

    def fn(x, f, b):
        full = torch.zeros(2, 11, 20, 21)
        OP.adaptive_conv_into(x, f, b, full[:, :, 3:12])
        return full * 2

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    want = torch.zeros(2, 11, 20, 21)
    want[:, :, 3:12] = ops.adaptive_conv(x, f) + b.view(1, -1, 1, 1)
    torch.testing.assert_close(compiled(x, f, b), 2 * want, rtol=0, atol=2e-5)


def test_without_the_extension_the_reference_writes_the_band():
    from test_ops import _run

    res = _run("""
        import sys, warnings
        sys.modules["featup_adapters._C"] = None   # as if the extension was never built
        import torch, featup_adapters.ops as O
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, 3, 10, 12, generator=g, dtype=torch.float64)
        f = torch.randn(1, 4, 6, 7, 7, generator=g, dtype=torch.float64)
        b = torch.randn(3, generator=g, dtype=torch.float64)
        full = torch.full((1, 3, 9, 6), 5.0, dtype=torch.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            O.adaptive_conv_into(x, f, full[:, :, 2:6], b)
        want = O.adaptive_conv_reference(x, f) + b.view(1, -1, 1, 1)
        torch.testing.assert_close(full[:, :, 2:6], want, rtol=1e-12, atol=1e-12)
        assert bool((full[:, :, :2] == 5).all()) and bool((full[:, :, 6:] == 5).all())
        print(O.backend("cpu").name)
    """)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "reference"
