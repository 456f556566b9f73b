"""featup_adapters::jbu_stage_keys and ::jbu_stage_filters: one JBU stage's padded keys and its
filters in eval mode, each in one pass on CPU (JBU's inference path), against an independent
float64 formulation written here with unfold and 1x1 convolutions (FeatUp's own form)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from featup_adapters.ops import jbu_stage_filters_available

OP = torch.ops.featup_adapters
pytestmark = pytest.mark.skipif(not jbu_stage_filters_available(), reason="needs the compiled CPU ops")


def _rand(*shape, seed, scale=1.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _pad(x, r):
    if r == 0:
        return x
    mode = "reflect" if min(x.shape[-2:]) > r else "replicate"
    return F.pad(x, [r] * 4, mode=mode)


def keys_oracle(g, w1, b1, w2, b2, r):
    h = F.gelu(F.conv2d(g, w1[:, :, None, None], b1))
    return _pad(F.conv2d(h, w2[:, :, None, None], b2), r)


def filters_oracle(q_pad, g, temp, sigma, w0, b0, w3, b3, r):
    """FeatUp's JBULearnedRange (eval) from padded keys: unfold, softmax, spatial product,
    normalization, then the fixup on cat([kernel, guidance]); -> [B, H, W, k*k]."""
    B, K, hp, wp = q_pad.shape
    H, W, k = hp - 2 * r, wp - 2 * r, 2 * r + 1
    q = q_pad[:, :, r:r + H, r:r + W]
    nb = F.unfold(q_pad, k).view(B, K, k * k, H, W)
    rng = torch.softmax(temp * torch.einsum("bcnhw,bchw->bnhw", nb, q), dim=1)
    d = torch.linspace(-1, 1, k, dtype=q_pad.dtype)
    sp = torch.exp(-(d[:, None] ** 2 + d[None, :] ** 2) / (2 * sigma ** 2)).reshape(1, -1, 1, 1)
    kern = rng * sp
    kern = kern / kern.sum(1, keepdim=True).clamp(min=1e-7)
    fix = F.conv2d(F.gelu(F.conv2d(torch.cat([kern, g], 1), w0[:, :, None, None], b0)),
                   w3[:, :, None, None], b3)
    return (kern + 0.1 * fix).permute(0, 2, 3, 1)


def make_stage(B, G, K, H, W, r, *, bias=True, seed=0):
    k2 = (2 * r + 1) ** 2
    g = _rand(B, G, H, W, seed=seed)
    w1, w2 = _rand(K, G, seed=seed + 1, scale=0.5), _rand(K, K, seed=seed + 2, scale=0.3)
    w0, w3 = _rand(k2, k2 + G, seed=seed + 3, scale=0.2), _rand(k2, k2, seed=seed + 4, scale=0.2)
    b = [_rand(n, seed=seed + 5 + i) if bias else None for i, n in enumerate((K, K, k2, k2))]
    return g, w1, b[0], w2, b[1], w0, b[2], w3, b[3]


def _cast(ts, dtype):
    return [None if t is None else t.to(dtype) for t in ts]


def _log_s(r, sigma, dtype):
    d = torch.linspace(-1, 1, 2 * r + 1, dtype=torch.float64)
    return ((d[:, None] ** 2 + d[None, :] ** 2).reshape(-1) * (-0.5 / sigma ** 2)).to(dtype)


SHAPES = [  # (B, G, K, H, W, r): strips of 32 pixels and partial ones, tiny maps, every radius kind
    (1, 3, 32, 12, 64, 3),
    (2, 3, 32, 9, 45, 3),
    (1, 4, 7, 5, 3, 2),        # a side <= r: replicate padding
    (1, 3, 16, 33, 70, 1),
    (1, 2, 5, 8, 9, 7),        # k = 15
    (1, 3, 8, 6, 19, 0),       # k = 1
]


@pytest.mark.parametrize("B,G,K,H,W,r", SHAPES)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_both_ops_match_featups_formulation(B, G, K, H, W, r, dtype, tol):
    temp, sigma = 1.7, 0.8
    for bias in (True, False):
        g, w1, b1, w2, b2, w0, b0, w3, b3 = make_stage(B, G, K, H, W, r, bias=bias)
        q_ref = keys_oracle(g, w1, b1, w2, b2, r)
        q = OP.jbu_stage_keys(*_cast([g, w1, b1, w2, b2], dtype), r)
        assert q.dtype == dtype and q.shape == q_ref.shape
        torch.testing.assert_close(q.double(), q_ref, atol=tol * (1 + q_ref.abs().max().item()), rtol=tol)
        f_ref = filters_oracle(q_ref, g, temp, sigma, w0, b0, w3, b3, r)
        qd, gd, w0d, b0d, w3d, b3d = _cast([q_ref, g, w0, b0, w3, b3], dtype)
        f = OP.jbu_stage_filters(qd, gd, temp, _log_s(r, sigma, dtype), w0d, b0d, w3d, b3d, r)
        assert f.dtype == dtype and f.shape == f_ref.shape
        torch.testing.assert_close(f.double(), f_ref, atol=tol, rtol=tol)


def test_a_nan_reaches_only_the_windows_that_hold_it():
    B, G, K, H, W, r = 1, 3, 8, 20, 40, 3
    g, w1, b1, w2, b2, w0, b0, w3, b3 = _cast(make_stage(B, G, K, H, W, r), torch.float32)
    q = OP.jbu_stage_keys(g, w1, b1, w2, b2, r)
    y, x = 9, 33
    q[0, 2, r + y, r + x] = float("nan")
    f = OP.jbu_stage_filters(q, g, 1.0, _log_s(r, 1.0, torch.float32), w0, b0, w3, b3, r)
    bad = f.isnan().any(-1)[0]
    want = torch.zeros(H, W, dtype=torch.bool)
    want[y - r:y + r + 1, x - r:x + r + 1] = True
    assert torch.equal(bad, want)
    g2 = g.clone()
    g2[0, 1, 4, 5] = float("nan")      # a guidance NaN away from the border: only its own key
    q2 = OP.jbu_stage_keys(g2, w1, b1, w2, b2, r)
    assert q2.isnan().any(1)[0].sum() == 1 and q2[0, :, r + 4, r + 5].isnan().all()
    g2[0, 1, 4, 5], g2[0, 0, 1, 0] = 0.0, float("nan")   # near the corner: mirrored into the border
    bad = OP.jbu_stage_keys(g2, w1, b1, w2, b2, r).isnan().any(1)[0]
    rows, cols = {r + 1, r - 1}, {r}         # reflect: row 1 -> padded rows r+1 and r-1
    assert {(int(a), int(b)) for a, b in bad.nonzero()} == {(a, b) for a in rows for b in cols}


@pytest.mark.parametrize("call,match", [
    (lambda s: OP.jbu_stage_keys(s[0][0], *s[1:5], 3), "expected guidance of shape"),
    (lambda s: OP.jbu_stage_keys(s[0].half(), *s[1:5], 3), "float32 or float64 guidance"),
    (lambda s: OP.jbu_stage_keys(s[0], s[1].float(), *s[2:5], 3), "expected w1 of dtype"),
    (lambda s: OP.jbu_stage_keys(s[0], s[1], s[2][:3], *s[3:5], 3), r"expected b1 of shape \[8\]"),
    (lambda s: OP.jbu_stage_keys(s[0], *s[1:5], 8), "radius in 0..7"),
    (lambda s: OP.jbu_stage_filters(torch.zeros(1, 8, 4, 4, dtype=torch.float64), s[0], 1.0,
                                    _log_s(3, 1, torch.float64), *s[5:], 3), "too small for radius 3"),
    (lambda s: OP.jbu_stage_filters(torch.zeros(1, 8, 16, 16, dtype=torch.float64), s[0], 1.0,
                                    _log_s(3, 1, torch.float64), *s[5:], 3), "expected guidance of shape"),
    (lambda s: OP.jbu_stage_filters(torch.zeros(1, 8, 16, 17, dtype=torch.float64), s[0], 1.0,
                                    _log_s(2, 1, torch.float64), *s[5:], 3), r"expected log_s of shape \[49\]"),
])
def test_bad_input_says_what_was_expected(call, match):
    stage = make_stage(1, 3, 8, 10, 11, 3)
    with pytest.raises(RuntimeError, match=match):
        call(stage)


def test_not_differentiable():
    g, w1, b1, w2, b2, *_ = make_stage(1, 3, 8, 6, 6, 1)
    with pytest.raises(RuntimeError, match="not implemented"):
        OP.jbu_stage_keys(g.requires_grad_(), w1, b1, w2, b2, 1).sum().backward()


def test_opcheck_and_compile():
    g, w1, b1, w2, b2, w0, b0, w3, b3 = _cast(make_stage(2, 3, 8, 10, 11, 3), torch.float32)
    q = OP.jbu_stage_keys(g, w1, b1, w2, b2, 3)
    ls = _log_s(3, 0.9, torch.float32)
    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(OP.jbu_stage_keys.default, (g, w1, b1, w2, b2, 3), test_utils=utils)
    torch.library.opcheck(OP.jbu_stage_filters.default, (q, g, 1.3, ls, w0, b0, w3, b3, 3), test_utils=utils)
    fn = torch.compile(lambda g: OP.jbu_stage_filters(OP.jbu_stage_keys(g, w1, b1, w2, b2, 3), g, 1.3, ls,
                                                      w0, b0, w3, b3, 3) * 2, fullgraph=True, backend="aot_eager")
    want = 2 * filters_oracle(keys_oracle(*_cast([g, w1, b1, w2, b2], torch.float64), 3), g.double(), 1.3, 0.9,
                              *_cast([w0, b0, w3, b3], torch.float64), 3)
    torch.testing.assert_close(fn(g).double(), want, atol=1e-4, rtol=1e-4)


def _ops_called(fn):
    """The featup_adapters ops that ``fn`` dispatches (through a dispatch mode)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "featup_adapters":
                seen.append(func._opname)
            return func(*args, **(kwargs or {}))

    with Record():
        out = fn()
    return out, seen


def test_jbu_inference_uses_them_and_matches_the_training_path():
    from featup_adapters.upsamplers.jbu import JBUStack

    torch.manual_seed(0)
    stack = JBUStack(6).eval()
    with torch.no_grad():
        for p in stack.parameters():
            p.add_(0.2 * torch.randn_like(p))
    src, img = torch.randn(1, 6, 5, 7), torch.rand(1, 3, 80, 112)
    with torch.no_grad():
        fused, seen = _ops_called(lambda: stack(src, img))
    assert seen.count("jbu_stage_keys") == 4 and seen.count("jbu_stage_filters") == 4
    unfused, seen = _ops_called(lambda: stack(src.requires_grad_(), img))    # autograd: step by step
    assert "jbu_stage_keys" not in seen and "jbu_stage_filters" not in seen
    torch.testing.assert_close(fused, unfused.detach(), atol=1e-5, rtol=1e-5)
    stack.train()        # dropout on: the ops (eval mode only) are not used
    with torch.no_grad():
        _, seen = _ops_called(lambda: stack(src.detach(), img))
    assert "jbu_stage_keys" not in seen and "jbu_stage_filters" not in seen


def test_small_spatial_width_keeps_the_clamped_formula():
    from featup_adapters.upsamplers.jbu import JointBilateralUpsampler

    st = JointBilateralUpsampler().eval()
    with torch.no_grad():
        st.sigma_spatial.fill_(0.1)               # below 0.25 the 1e-7 clamp can act
        _, seen = _ops_called(lambda: st(torch.randn(1, 4, 8, 8), torch.rand(1, 3, 16, 16)))
    assert "jbu_stage_filters" not in seen and "jbu_stage_keys" in seen


@pytest.mark.slow
@pytest.mark.parametrize("isa", ["generic", "avx2"])
def test_narrower_cpu_instruction_sets_agree(isa):
    code = textwrap.dedent("""
        import sys, torch, featup_adapters.ops as O
        sys.path.insert(0, %r)
        import test_stage_ops as T
        print(O.cpu_isa())
        for shape in T.SHAPES:
            for dtype, tol in [(torch.float64, 1e-12), (torch.float32, 2e-5)]:
                T.test_both_ops_match_featups_formulation(*shape, dtype, tol)
        print("ok")
    """ % os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "FEATUP_CPU_ISA": isa})
    assert res.returncode == 0, res.stderr
    chosen, status = res.stdout.split()
    if chosen != isa:
        pytest.skip(f"this CPU cannot run the {isa} kernels (chose {chosen})")
    assert status == "ok"


def test_the_cuda_kernels_compute_the_same_steps():
    """On CUDA the two ops are torch ops in a row (``_registration``); run on CPU tensors here."""
    from featup_adapters.ops._registration import _cuda_stage_filters, _cuda_stage_keys

    for shape in [(2, 3, 8, 9, 45, 3), (1, 4, 7, 5, 3, 2)]:
        g, w1, b1, w2, b2, w0, b0, w3, b3 = make_stage(*shape)
        r = shape[-1]
        q = _cuda_stage_keys(g, w1, b1, w2, b2, r)
        torch.testing.assert_close(q, keys_oracle(g, w1, b1, w2, b2, r), atol=1e-12, rtol=1e-12)
        f = _cuda_stage_filters(q, g, 1.7, _log_s(r, 0.8, torch.float64), w0, b0, w3, b3, r)
        torch.testing.assert_close(f, filters_oracle(q, g, 1.7, 0.8, w0, b0, w3, b3, r), atol=1e-12, rtol=1e-12)
