"""featup_adapters::bicubic_pad_conv: bicubic_pad then adaptive_conv (+ bias) in bands of rows,
without the padded map (JBU's inference path on CPU)."""
import pytest
import torch

from featup_adapters.ops import adaptive_conv_reference, bicubic_pad_conv, bicubic_pad_conv_available

from test_resize_op import OP, SHAPES, make, oracle

MORE = [  # wider than one column strip, taller than one band, odd sizes, B > 1
    ((2, 7, 13, 40), (61, 300), 2),
    ((1, 19, 14, 14), (224, 224), 3),
    ((1, 5, 30, 8), (257, 17), 1),
]


def _expected(x, f, size, r, bias):
    out = adaptive_conv_reference(oracle(x, size, r), f)
    return out if bias is None else out + bias.view(1, -1, 1, 1)


@pytest.mark.parametrize("shape,size,r", SHAPES + MORE)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_matches_resize_then_convolution(shape, size, r, dtype, tol):
    x = make(shape)
    B, C = shape[:2]
    k = 2 * r + 1
    f = make((B, *size, k, k), seed=1)
    for bias in (None, make((C,), seed=2)):
        ref = _expected(x, f, size, r, bias)
        got = OP.bicubic_pad_conv(x.to(dtype), f.to(dtype), list(size), r,
                                  None if bias is None else bias.to(dtype))
        assert got.dtype == dtype and got.shape == ref.shape
        torch.testing.assert_close(got.double(), ref, atol=tol * (1 + ref.abs().max().item()), rtol=tol)


def test_wrapper_falls_back_to_the_two_ops_for_half_precision():
    x, f = make((1, 3, 5, 6)), make((1, 10, 12, 3, 3), seed=1)
    assert bicubic_pad_conv_available(x) and not bicubic_pad_conv_available(x.half())
    got = bicubic_pad_conv(x.bfloat16(), f.bfloat16(), (10, 12), 1)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), _expected(x, f, (10, 12), 1, None), atol=0.1, rtol=0.05)


def test_not_differentiable():
    x = make((1, 2, 4, 4)).requires_grad_()
    f = make((1, 8, 8, 3, 3), seed=1)
    with pytest.raises(RuntimeError, match="not implemented"):
        OP.bicubic_pad_conv(x, f, [8, 8], 1, None).sum().backward()


@pytest.mark.parametrize("args,match", [
    (lambda: (make((2, 3, 4)), make((2, 8, 8, 3, 3)), [8, 8], 1, None), "expected source of shape"),
    (lambda: (make((1, 3, 4, 4)), make((1, 8, 8, 5, 5)), [8, 8], 1, None), r"expected filters of shape \[1, 8, 8, 3, 3\]"),
    (lambda: (make((1, 3, 4, 4)), make((1, 8, 8, 3, 3)).float(), [8, 8], 1, None), "expected filters of dtype"),
    (lambda: (make((1, 3, 4, 4)).half(), make((1, 8, 8, 3, 3)).half(), [8, 8], 1, None), "float32 or float64"),
    (lambda: (make((1, 3, 4, 4)), make((1, 8, 8, 3, 3)), [8, 8], 1, make((4,))), r"expected bias of shape \[3\]"),
])
def test_bad_input_says_what_was_expected(args, match):
    with pytest.raises(RuntimeError, match=match):
        OP.bicubic_pad_conv(*args())


def test_opcheck_and_compile():
    x, f, b = make((2, 3, 6, 5), torch.float32), make((2, 12, 10, 3, 3), torch.float32, 1), make((3,), torch.float32, 2)
    torch.library.opcheck(OP.bicubic_pad_conv.default, (x, f, [12, 10], 1, b),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    fn = torch.compile(lambda s, t: OP.bicubic_pad_conv(s, t, [12, 10], 1, b) * 2, fullgraph=True,
                       backend="aot_eager")
    torch.testing.assert_close(fn(x, f).double(), 2 * _expected(x.double(), f.double(), (12, 10), 1, b.double()),
                               atol=1e-4, rtol=1e-4)


def test_jbu_inference_uses_it_and_matches_the_training_path():
    from featup_adapters.upsamplers.jbu import JBUStack

    torch.manual_seed(0)
    stack = JBUStack(6).eval()
    src, img = torch.randn(1, 6, 5, 7), torch.rand(1, 3, 80, 112)
    with torch.no_grad():
        fused = stack(src, img)
    calls = []
    import featup_adapters.upsamplers.jbu  # noqa: F401
    import sys
    mod = sys.modules["featup_adapters.upsamplers.jbu"]
    real = mod.bicubic_pad_conv
    mod.bicubic_pad_conv = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        with torch.no_grad():
            again = stack(src, img)
    finally:
        mod.bicubic_pad_conv = real
    assert len(calls) == 4 and torch.equal(again, fused)
    unfused = stack(src.requires_grad_(), img)      # with autograd: bicubic_pad + adaptive_conv
    torch.testing.assert_close(fused, unfused.detach(), atol=1e-5, rtol=1e-5)
