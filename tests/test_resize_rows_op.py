"""featup_adapters::bicubic_pad_rows: rows of bicubic_pad's output from a band of source rows
(the resize of JBUStack's row-band path)."""
import math

import pytest
import torch

from featup_adapters.ops import bicubic_pad
from featup_adapters.ops.resize import bicubic_pad_rows, bicubic_pad_rows_reference

from test_resize_op import OP, SHAPES, make, oracle


def _reflect(i, n, r, reflect):
    o = i - r
    if reflect:
        o = abs(o)
        return 2 * (n - 1) - o if o >= n else o
    return min(max(o, 0), n - 1)


def band_for(h, H, W, r, row0, row1):
    """A band of source rows holding every row that padded rows [row0, row1) read (conservative,
    from the bicubic definition: taps floor(x) - 1 .. floor(x) + 2 at x = (o + 0.5) h / H - 0.5)."""
    reflect = min(H, W) > r
    outs = [_reflect(P, H, r, reflect) for P in range(row0, row1)]
    xs = [(o + 0.5) * h / H - 0.5 for o in outs]
    return max(0, math.floor(min(xs)) - 1), min(h, math.floor(max(xs)) + 3)


def bands(H, r):
    n = H + 2 * r
    cuts = sorted({0, n, 1, n // 3, n // 2, n - 1} - {-1})
    out = [(a, b) for a, b in zip(cuts, cuts[1:]) if a < b]
    return out + [(0, n)]


@pytest.mark.parametrize("shape,size,r", SHAPES)
def test_bands_equal_the_rows_of_the_whole_map_in_float64(shape, size, r):
    x = make(shape)
    whole = oracle(x, size, r)
    for row0, row1 in bands(size[0], r):
        lo, hi = band_for(shape[2], *size, r, row0, row1)
        got = bicubic_pad_rows(x[:, :, lo:hi], size, r, src_rows=shape[2], src_row0=lo, row0=row0, row1=row1)
        ref = bicubic_pad_rows_reference(x[:, :, lo:hi], size, r, shape[2], lo, row0, row1)
        assert got.shape == (shape[0], shape[1], row1 - row0, size[1] + 2 * r)
        torch.testing.assert_close(got, whole[:, :, row0:row1], atol=1e-12, rtol=0)
        torch.testing.assert_close(ref, whole[:, :, row0:row1], atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_lower_precisions(dtype, tol):
    x = make((2, 3, 14, 14))
    whole = bicubic_pad(x.to(dtype), (28, 28), 3).double()
    lo, hi = band_for(14, 28, 28, 3, 10, 20)
    got = bicubic_pad_rows(x.to(dtype)[:, :, lo:hi], (28, 28), 3, src_rows=14, src_row0=lo, row0=10, row1=20)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), whole[:, :, 10:20], atol=tol, rtol=tol)


def test_band_sliced_from_a_taller_map_and_non_contiguous_inputs():
    x = make((2, 4, 20, 16), torch.float32)
    whole = bicubic_pad(x, (40, 32), 3)
    lo, hi = band_for(20, 40, 32, 3, 12, 30)
    views = [x[:, :, lo:hi], x[:, :, lo:hi].contiguous(), x.transpose(2, 3).contiguous().transpose(2, 3)[:, :, lo:hi],
             x[:, ::2][:, :, lo:hi]]
    wants = [whole, whole, whole, bicubic_pad(x[:, ::2].contiguous(), (40, 32), 3)]
    for v, want in zip(views, wants):
        got = bicubic_pad_rows(v, (40, 32), 3, src_rows=20, src_row0=lo, row0=12, row1=30)
        torch.testing.assert_close(got, want[:, :, 12:30], atol=1e-5, rtol=1e-5)


def test_a_band_missing_a_row_it_needs_is_refused():
    x = make((1, 2, 14, 14))
    lo, hi = band_for(14, 28, 28, 3, 10, 20)
    with pytest.raises(ValueError, match=r"read source rows .* not all inside the band"):
        bicubic_pad_rows(x[:, :, lo + 1:hi], (28, 28), 3, src_rows=14, src_row0=lo + 1, row0=10, row1=20)
    with pytest.raises(RuntimeError, match="outside the band's rows"):   # the C++ op checks too
        OP.bicubic_pad_rows(x[:, :, lo + 1:hi], [28, 28], 3, 14, lo + 1, 10, 20)
    with pytest.raises(ValueError, match=r"0 <= row0 < row1 <= 34"):
        bicubic_pad_rows(x, (28, 28), 3, src_rows=14, src_row0=0, row0=5, row1=35)
    with pytest.raises(ValueError, match="inside the source's 14 rows"):
        bicubic_pad_rows(x, (28, 28), 3, src_rows=14, src_row0=2, row0=5, row1=9)
    with pytest.raises(TypeError, match="expected an int row0"):
        bicubic_pad_rows(x, (28, 28), 3, src_rows=14, src_row0=0, row0=1.5, row1=9)


def test_no_backward():
    x = make((1, 2, 6, 6)).requires_grad_()
    out = bicubic_pad_rows(x, (12, 12), 3, src_rows=6, src_row0=0, row0=0, row1=18)
    with pytest.raises(RuntimeError, match="has no backward"):
        out.sum().backward()


def test_opcheck_and_compile():
    x = make((2, 3, 12, 9), torch.float32)
    lo, hi = band_for(12, 24, 18, 3, 6, 14)
    assert hi - lo < 12
    args = (x[:, :, lo:hi].contiguous(), [24, 18], 3, 12, lo, 6, 14)
    torch.library.opcheck(OP.bicubic_pad_rows.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    fn = torch.compile(lambda t: OP.bicubic_pad_rows(t, [24, 18], 3, 12, lo, 6, 14) * 2, fullgraph=True,
                       backend="aot_eager")
    torch.testing.assert_close(fn(args[0]), 2 * bicubic_pad(x, (24, 18), 3)[:, :, 6:14], atol=1e-5, rtol=1e-5)
