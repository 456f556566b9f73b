"""The compiled CPU kernels treat subnormal numbers as zero while they run (csrc/cpu/denormals.h),
and leave the floating-point mode of the calling thread and of PyTorch's worker threads as it was."""
from __future__ import annotations

import platform

import pytest
import torch

from featup_adapters import ops
from featup_adapters.ops import adaptive_conv, adaptive_conv_reference, bicubic_pad

pytestmark = pytest.mark.skipif(not ops.extension_loaded(), reason="the C++ extension is not built")
x86 = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64", "i686"),
                         reason="the flush mode is set on x86 only")

TINY = 1e-39          # a float32 subnormal (the smallest normal float32 is 1.18e-38)


def _subnormals_survive() -> bool:
    """True when PyTorch's own multi-threaded kernels, on every worker thread, keep subnormals."""
    x = torch.full((1 << 21,), TINY, dtype=torch.float32)
    y = x * 1.0
    return bool((y == x).all()) and bool((y > 0).all())


def _ops_calls():
    torch.manual_seed(0)
    x = torch.randn(1, 16, 40, 70)
    f = torch.rand(1, 34, 64, 7, 7) * 1e-30          # products 1e-30 * N(0,1) * 1e-30: subnormal
    g = torch.randn(1, 16, 34, 64)
    s = torch.randn(1, 16, 9, 17)
    return [
        lambda: adaptive_conv(x, f),
        lambda: torch.ops.featup_adapters.adaptive_conv_grad_input(g, f),
        lambda: torch.ops.featup_adapters.adaptive_conv_grad_filters(g, x),
        lambda: bicubic_pad(s, (34, 64), 3),
        lambda: torch.ops.featup_adapters.bicubic_pad_backward(torch.randn(1, 16, 40, 70), [17, 32], 3),
    ]


def test_pytorch_keeps_subnormals_after_our_kernels_ran():
    assert _subnormals_survive(), "this host flushes subnormals before our kernels ran"
    for call in _ops_calls():
        call()
        assert _subnormals_survive(), "a kernel left the flush-to-zero mode set on some thread"


def test_a_flush_mode_set_by_the_user_stays_set():
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush subnormals")
    try:
        for call in _ops_calls():
            call()
            assert not _subnormals_survive(), "a kernel cleared the caller's flush-to-zero mode"
    finally:
        torch.set_flush_denormal(False)
    assert _subnormals_survive()


@x86
def test_subnormal_products_are_read_and_written_as_zero():
    """Every product here is about 1e-40: the kernels' sums are exactly zero, where exact float32
    arithmetic (the reference, run by PyTorch with subnormals kept) gives about 1e-39."""
    torch.manual_seed(0)
    x = torch.rand(1, 8, 38, 70) * 1e-20 + 1e-20
    f = torch.rand(1, 32, 64, 7, 7) * 1e-20 + 1e-20
    ref = adaptive_conv_reference(x, f)
    assert (ref > 0).all() and (ref < 1e-37).all()           # the reference keeps them
    assert (adaptive_conv(x, f) == 0).all()
    # subnormal inputs are read as zero, normal ones are not affected
    xs = torch.full((1, 8, 38, 70), TINY)
    xs[0, 0, 10, 10] = 1.0
    out = adaptive_conv(xs, torch.ones(1, 32, 64, 7, 7))
    expect = torch.zeros(1, 8, 32, 64)
    expect[0, 0, 4:11, 4:11] = 1.0
    torch.testing.assert_close(out, expect, rtol=0, atol=0)


def test_results_on_normal_numbers_are_unchanged_by_subnormal_neighbours():
    """Subnormal filter taps next to normal ones (a sharp softmax): the result equals the float64
    reference with those taps zeroed, to float32 rounding."""
    torch.manual_seed(1)
    x = torch.randn(2, 12, 30, 41)
    f = torch.rand(2, 24, 35, 7, 7)
    far = torch.rand_like(f) < 0.6
    f[far] = TINY
    out = adaptive_conv(x, f)
    ref = adaptive_conv_reference(x.double(), torch.where(far, 0.0, f.double()))
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
