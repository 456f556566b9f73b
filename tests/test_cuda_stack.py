"""The whole JBU stack on CUDA, as far as a machine without a GPU can prove it.

* every op of the ``featup_adapters`` namespace has a CUDA kernel and a fake (meta) kernel;
* ``JBUStack`` runs forward (eval, no grad), forward + backward (train) and under bf16 autocast on
  fake CUDA tensors (``FakeTensorMode``), and every op on the path, recorded by a dispatch mode,
  has a CUDA kernel: no CPU-only fallback is reachable from a CUDA input;
* the stack traces with ``make_fx`` (fake mode) and ``torch.export`` on fake CUDA inputs;
* the tiled (row band) path runs on fake CUDA tensors with an explicit ``max_memory``.

Fake tensors carry shapes, dtypes and devices but no data, so none of this checks values (the
CUDA kernels' arithmetic is checked in test_cuda_emulated.py and, on a GPU, the ``cuda`` tests).
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from featup_adapters import ops
from featup_adapters.ops import _loader
from featup_adapters.upsamplers import _kernel, _tiling
from featup_adapters.upsamplers.jbu import JBUStack

NS = "featup_adapters::"
# keys under which an op runs for a CUDA tensor without a CUDA-specific kernel of its own
_DEVICE_GENERIC = ("CompositeExplicitAutograd", "CompositeExplicitAutogradNonFunctional",
                   "CompositeImplicitAutograd")

needs_cuda_build = pytest.mark.skipif(
    not ops.has_kernel("CUDA"),
    reason=f"featup_adapters._C was built without CUDA kernels ({ops.backend('cuda')}; "
           f"_build_info.CUDA_SKIPPED={getattr(_loader._build_info(), 'CUDA_SKIPPED', 'n/a')!r})")


def _project_ops() -> list[str]:
    """Every op registered in the ``featup_adapters`` namespace (C++ or Python)."""
    if not ops.extension_loaded():
        pytest.skip(f"the extension is not loaded: {ops.backend('cpu')}")
    names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith(NS))
    assert names, "no featup_adapters ops are registered although the extension loaded"
    return names


def _tensor_args(name: str) -> bool:
    """True if some overload of ``name`` takes a tensor (only those dispatch on the device)."""
    packet = getattr(torch.ops.featup_adapters, name[len(NS):])
    return any("Tensor" in str(a.type) for o in packet.overloads()
               for a in getattr(packet, o)._schema.arguments)


def _qualified(op) -> str:
    name = op._schema.name
    return f"{name}.{op._overloadname}" if op._overloadname != "default" else name


def _has_cuda_path(op) -> bool:
    name = _qualified(op)
    if op.namespace == "prim":      # metadata queries (prim::device, prim::layout): no kernel
        return True
    keys = ("CUDA",) + _DEVICE_GENERIC
    return any(torch._C._dispatch_has_kernel_for_dispatch_key(name, k) for k in keys)


# ----------------------------------------------------------------------------------- 1. kernels
@needs_cuda_build
def test_every_project_op_has_cuda_and_fake_kernels():
    from torch._library.simple_registry import singleton

    names = _project_ops()
    # the ops the JBU stack calls must be among them (the enumeration itself is sound)
    for needed in ("adaptive_conv", "adaptive_conv_grad_input", "adaptive_conv_grad_filters",
                   "bicubic_pad", "bicubic_pad_backward"):
        assert NS + needed in names
    checked, missing = [], []
    for name in names:
        if not _tensor_args(name):   # e.g. _cpu_isa() -> str: no tensor, no device dispatch
            continue
        checked.append(name)
        if not torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA"):
            missing.append(f"{name}: no CUDA kernel")
        fake = singleton.find(name).fake_impl.kernel is not None
        if not (fake or torch._C._dispatch_has_kernel_for_dispatch_key(name, "Meta")):
            missing.append(f"{name}: no fake/meta kernel")
        if not torch._C._dispatch_has_kernel_for_dispatch_key(name, "Autograd"):
            missing.append(f"{name}: no autograd formula")
    assert not missing, "; ".join(missing)
    assert len(checked) >= 5


# --------------------------------------------------------------------------- fake CUDA helpers
class _Recorder(TorchDispatchMode):
    """Records every op that reaches the dispatcher below autograd."""

    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func)
        return func(*args, **(kwargs or {}))


def _no_cpu_only_ops(recorded) -> None:
    bad = sorted(_qualified(op) for op in recorded if not _has_cuda_path(op))
    assert not bad, f"ops on the CUDA path without a CUDA kernel: {bad}"


def _fake_stack(mode, dim=8, radius=3, **kw):
    with mode, torch.device("cuda"):
        torch.manual_seed(0)
        stack = JBUStack(dim, radius=radius, key_dim=8, **kw)
    for p in stack.parameters():
        assert isinstance(p, FakeTensor) and p.device.type == "cuda"
    return stack


def _inputs(mode, dim, src_hw, out_hw, dtype=torch.float32):
    with mode, torch.device("cuda"):
        src = torch.randn(2, dim, *src_hw, dtype=dtype)
        img = torch.randn(2, 3, *out_hw, dtype=dtype)
    return src, img


CASES = [  # radius, source size, output size
    (3, (4, 5), (64, 80)),       # 16x: FeatUp's 2x/4x/8x/16x schedule
    (3, (5, 7), (37, 61)),       # not a power of two, 6 steps
    (1, (4, 5), (64, 80)),
    (2, (5, 7), (37, 61)),
]


@needs_cuda_build
@pytest.mark.parametrize("radius,src_hw,out_hw", CASES)
def test_fake_cuda_forward_eval(radius, src_hw, out_hw):
    mode = FakeTensorMode()
    stack = _fake_stack(mode, radius=radius).eval()
    src, img = _inputs(mode, 8, src_hw, out_hw)
    rec = _Recorder()
    with mode, rec, torch.no_grad():
        out = stack(src, img, max_memory="1GB")
        half = stack(src, img, max_memory="1GB", out_dtype=torch.float16)
    assert isinstance(out, FakeTensor)
    assert tuple(out.shape) == (2, 8, *out_hw) and out.dtype == torch.float32
    assert out.device.type == "cuda" and half.dtype == torch.float16 and half.device.type == "cuda"
    names = {_qualified(op) for op in rec.ops}
    # the compiled ops serve the CUDA path (not the pure-PyTorch fallbacks)
    assert {NS + "adaptive_conv", NS + "bicubic_pad", NS + "adaptive_conv_grad_filters"} <= names
    _no_cpu_only_ops(rec.ops)


def _walk_backward(loss: torch.Tensor) -> int:
    """``loss.backward()`` node by node, without the autograd engine.

    The engine runs a CUDA graph's backward on a CUDA device thread, which needs a real device
    (``hasPrimaryContext expects a valid device index``); walking the same graph in Python calls
    the same backward formulas.  Like the engine, a gradient is summed to its input's shape (the
    broadcasting of an add) and cast to its dtype.  Returns the number of nodes run."""
    order, seen, todo = [], set(), [(loss.grad_fn, False)]
    while todo:                                  # post-order DFS over next_functions
        node, done = todo.pop()
        if done:
            order.append(node)
            continue
        if node is None or node in seen:
            continue
        seen.add(node)
        todo.append((node, True))
        todo.extend((nxt, False) for nxt, _ in node.next_functions if nxt is not None)
    pending = {loss.grad_fn: [torch.ones_like(loss)]}
    for node in reversed(order):                 # reverse post-order: a topological order
        slots = pending.pop(node, None)
        if slots is None:
            continue
        if type(node).__name__ == "AccumulateGrad":
            v = node.variable
            v.grad = slots[0] if v.grad is None else v.grad + slots[0]
            continue
        metas = node._input_metadata
        grads = [g if g is not None else torch.zeros(m.shape, dtype=m.dtype, device=m.device)
                 for g, m in zip(slots, metas)]
        outs = node.apply(*grads) if hasattr(node, "_forward_cls") else node(*grads)
        outs = outs if isinstance(outs, tuple) else (outs,)
        for (nxt, idx), g in zip(node.next_functions, outs):
            if nxt is None or g is None:
                continue
            m = nxt._input_metadata[idx]
            if tuple(g.shape) != tuple(m.shape):
                g = g.sum_to_size(m.shape)
            g = g.to(m.dtype)
            slot = pending.setdefault(nxt, [None] * len(nxt._input_metadata))
            slot[idx] = g if slot[idx] is None else slot[idx] + g
    return len(order)


def _backward(loss):
    if torch.cuda.is_available():
        loss.backward()
    else:
        assert _walk_backward(loss) > 10


def test_walk_backward_matches_the_engine():
    """The walker gives autograd's gradients (real CPU tensors, the same stack)."""
    torch.manual_seed(0)
    stack = JBUStack(4, radius=2, key_dim=4).train()
    src = torch.randn(1, 4, 3, 5, requires_grad=True)
    img = torch.randn(1, 3, 11, 19)

    def grads(run):
        torch.manual_seed(1)                     # the same dropout masks
        stack.zero_grad(set_to_none=True)
        src.grad = None
        run((stack(src, img) ** 2).mean())
        # 3x5 -> 11x19 takes two steps: up3, up4 are unused and get no gradient
        return [src.grad] + [p.grad for p in stack.parameters()]

    want = grads(lambda loss: loss.backward())
    got = grads(_walk_backward)
    assert [g is None for g in got] == [w is None for w in want]
    assert sum(w is not None for w in want) >= 10
    for g, w in zip(got, want):
        if w is not None:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    assert any(w.abs().sum() > 0 for w in want[1:] if w is not None)


@needs_cuda_build
@pytest.mark.parametrize("radius,src_hw,out_hw", CASES[:2] + CASES[3:])
def test_fake_cuda_forward_backward_train(radius, src_hw, out_hw):
    mode = FakeTensorMode()
    stack = _fake_stack(mode, radius=radius).train()
    src, img = _inputs(mode, 8, src_hw, out_hw)
    rec = _Recorder()
    with mode, rec:
        src.requires_grad_(True)
        out = stack(src, img, max_memory="1GB")
        _backward(out.square().mean())
    assert tuple(out.shape) == (2, 8, *out_hw) and out.device.type == "cuda"
    assert src.grad is not None and src.grad.shape == src.shape and src.grad.device.type == "cuda"
    for name, p in stack.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert p.grad.shape == p.shape and p.grad.device.type == "cuda", name
    names = {_qualified(op) for op in rec.ops}
    assert {NS + "adaptive_conv_grad_input", NS + "adaptive_conv_grad_filters",
            NS + "bicubic_pad_backward"} <= names
    _no_cpu_only_ops(rec.ops)


@contextlib.contextmanager
def _cuda_autocast(dtype):
    """``torch.autocast("cuda", dtype)``.  Without a device it disables itself ("CUDA is not
    available ... Disabling autocast"), so there the same dispatch state (AutocastCUDA on, with
    ``dtype``) is set directly, as ``autocast.__enter__`` does after that check, and restored."""
    if torch.cuda.is_available():
        with torch.autocast("cuda", dtype=dtype):
            yield
        return
    was, old = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", dtype)
    try:
        yield
    finally:
        torch.set_autocast_enabled("cuda", was)
        torch.set_autocast_dtype("cuda", old)
        torch.clear_autocast_cache()


@needs_cuda_build
@pytest.mark.parametrize("train", [False, True])
def test_fake_cuda_bf16_autocast(train):
    mode = FakeTensorMode()
    stack = _fake_stack(mode, radius=3).train(train)
    src, img = _inputs(mode, 8, (5, 7), (37, 61))
    rec = _Recorder()
    with mode, rec, torch.set_grad_enabled(train):
        with _cuda_autocast(torch.bfloat16):
            out = stack(src, img, max_memory="1GB")
            conv = stack.up1.range_proj[0](img)
        if train:
            _backward(out.float().mean())
    assert conv.dtype == torch.bfloat16, "autocast did not act on the fake CUDA tensors"
    assert tuple(out.shape) == (2, 8, 37, 61) and out.device.type == "cuda"
    assert out.dtype == torch.float32          # the stack keeps the source's dtype
    assert torch.ops.aten.convolution.default in rec.ops
    if train:
        for name, p in stack.named_parameters():
            assert p.grad is not None and p.grad.dtype == torch.float32, name
    _no_cpu_only_ops(rec.ops)


# ------------------------------------------------------------------------ 3. tracing, compiling
def _eval_case(mode):
    stack = _fake_stack(mode, radius=3).eval()
    src, img = _inputs(mode, 8, (5, 7), (37, 61))
    return stack, src, img


def _project_targets(gm) -> set:
    return {str(n.target) for n in gm.graph.nodes if str(n.target).startswith("featup_adapters.")}


@needs_cuda_build
def test_make_fx_fake_trace_on_cuda():
    from torch.fx.experimental.proxy_tensor import make_fx

    mode = FakeTensorMode()
    stack, src, img = _eval_case(mode)
    params = dict(stack.named_parameters())

    def fn(params, src, img):
        with torch.no_grad():
            return torch.func.functional_call(stack, params, (src, img), {"max_memory": "1GB"})

    gm = make_fx(fn, tracing_mode="fake")(params, src, img)
    assert {"featup_adapters.adaptive_conv.default", "featup_adapters.bicubic_pad.default",
            "featup_adapters.adaptive_conv_grad_filters.default"} <= _project_targets(gm)
    devices = {n.meta["val"].device.type for n in gm.graph.nodes
               if isinstance(n.meta.get("val"), torch.Tensor)}
    assert devices == {"cuda"}, devices


@needs_cuda_build
def test_torch_export_on_fake_cuda_inputs():
    mode = FakeTensorMode()
    stack, src, img = _eval_case(mode)
    ep = torch.export.export(stack, (src, img), {"max_memory": "1GB"})
    assert {"featup_adapters.adaptive_conv.default",
            "featup_adapters.bicubic_pad.default"} <= _project_targets(ep.graph_module)
    out = [n for n in ep.graph.nodes if n.op == "output"][0].args[0][0].meta["val"]
    assert tuple(out.shape) == (2, 8, 37, 61) and out.device.type == "cuda"


@needs_cuda_build
def test_compile_fullgraph_aot_eager_on_fake_cuda():
    """One graph, no break: nothing on the path reads a tensor's value on the host."""
    mode = FakeTensorMode()
    stack, src, img = _eval_case(mode)
    torch._dynamo.reset()
    try:
        with mode, torch.no_grad():
            out = torch.compile(stack, backend="aot_eager", fullgraph=True)(src, img,
                                                                           max_memory="1GB")
    finally:
        torch._dynamo.reset()
    assert tuple(out.shape) == (2, 8, 37, 61) and out.device.type == "cuda"


@needs_cuda_build
def test_compile_training_on_fake_cuda():
    mode = FakeTensorMode()
    stack = _fake_stack(mode, radius=3).train()
    src, img = _inputs(mode, 8, (5, 7), (37, 61))
    torch._dynamo.reset()
    try:
        with mode:
            try:
                out = torch.compile(stack, backend="aot_eager")(src.requires_grad_(), img,
                                                                max_memory="1GB")
                out.mean().backward()
            except RuntimeError as exc:  # BackendCompilerFailed is a RuntimeError
                if torch.cuda.is_available() or "hasPrimaryContext" not in str(exc):
                    raise
                pytest.skip("AOT autograd traces the joint forward+backward graph through the "
                            "autograd engine, which needs a real CUDA device for CUDA tensors "
                            "('hasPrimaryContext expects a valid device index'); the eager "
                            "backward is covered by test_fake_cuda_forward_backward_train")
    finally:
        torch._dynamo.reset()
    assert tuple(out.shape) == (2, 8, 37, 61) and out.device.type == "cuda"
    assert src.grad is not None and src.grad.device.type == "cuda"


def test_traced_kernel_equals_the_branching_one():
    """``normalized_kernel`` under tracing (no host read of sigma) equals the eager branches, at a
    normal sigma (the softmax path) and at a tiny one (the clamp acts)."""
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 6, 25, dtype=torch.float64) * 3
    far = logits.clone()
    far[..., 12] = -40          # almost no range weight at the centre: with a tiny sigma the
    for sigma, temp, lg in [(s, t, lg) for s in (1.0, 0.3, 0.1, 0.02) for t in (0.0, 2.0)
                            for lg in (logits, far)]:   # sum falls under 1e-7: the clamp acts
        if True:
            want = _kernel.normalized_kernel(lg.clone(), torch.tensor(temp),
                                              torch.tensor(sigma, dtype=lg.dtype), 2)
            t = _kernel.range_temperature(torch.tensor(temp), device="cpu", dtype=lg.dtype)
            got = _kernel._traced_kernel(lg, t, torch.tensor(sigma, dtype=lg.dtype),
                                         _kernel.spatial_dist2(2, dtype=lg.dtype))
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-300)
            if sigma == 0.02 and lg is far:    # the clamp acted: the kernel sums to < 1
                assert (want.sum(-1) < 0.5).all() and (got.sum(-1) < 0.5).all()
            if sigma >= 0.3:
                torch.testing.assert_close(got.sum(-1), torch.ones_like(got.sum(-1)))


# ------------------------------------------------------------------------------- 4. the tiled path
@needs_cuda_build
@pytest.mark.parametrize("radius,src_hw,out_hw", [CASES[0], CASES[1], CASES[3]])
def test_tiled_path_on_fake_cuda(monkeypatch, radius, src_hw, out_hw):
    mode = FakeTensorMode()
    stack = _fake_stack(mode, radius=radius).eval()
    src, img = _inputs(mode, 8, src_hw, out_hw)
    sizes = [s for _, s in stack.plan_sizes(src_hw, out_hw)] if hasattr(stack, "plan_sizes") else \
        [s for _, s in stack.stage_plan(src_hw, out_hw)]
    est = _tiling.estimate_bytes(2, 8, sizes, src_hw, radius=radius, key_dim=8, guidance_dim=3,
                                 elem=4, out_elem=4, grad=False)
    budget = est.tiled_min + 4 * est.per_row      # fits only in bands of a few rows
    assert budget < est.untiled
    bands = []
    real = _tiling.tiled_forward
    monkeypatch.setattr(_tiling, "tiled_forward",
                        lambda *a, **k: bands.append(k["band_rows"]) or real(*a, **k))

    def no_query(*a, **k):
        raise AssertionError("an explicit max_memory must not query the device's free memory")

    monkeypatch.setattr(_tiling, "available_memory", no_query)
    rec = _Recorder()
    with mode, rec, torch.no_grad():
        out = stack(src, img, max_memory=budget)
    assert len(bands) == 1 and 1 <= bands[0] < out_hw[0]
    assert tuple(out.shape) == (2, 8, *out_hw) and out.device.type == "cuda"
    assert NS + "adaptive_conv_into" in {_qualified(op) for op in rec.ops}  # bands written in place
    _no_cpu_only_ops(rec.ops)
    with mode, torch.no_grad(), pytest.raises(_tiling.MemoryBudgetError, match="max_memory"):
        stack(src, img, max_memory=est.tiled_min // 2)


def test_default_budget_without_a_cuda_device_says_what_to_do(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"no CUDA device is available.*pass max_memory="):
        _tiling.available_memory("cuda")
    assert _tiling.available_memory("cpu") > 0


@needs_cuda_build
def test_default_budget_on_fake_cuda():
    mode = FakeTensorMode()
    stack, src, img = _eval_case(mode)
    with mode, torch.no_grad():
        if torch.cuda.is_available():           # the real device's free memory is the budget
            assert stack(src, img).shape == (2, 8, 37, 61)
        else:
            with pytest.raises(RuntimeError, match="pass max_memory="):
                stack(src, img)
