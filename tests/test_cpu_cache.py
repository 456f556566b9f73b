"""The CPU ops' buffer cache (csrc/cpu/large_alloc.cpp): freed large results are reused, a reused
buffer's old contents never show through, the limit and the switch work."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from featup_adapters import ops

OP = torch.ops.featup_adapters
pytestmark = pytest.mark.skipif(not ops.extension_loaded(), reason="needs the compiled extension")

C, H, W, K = 96, 120, 136, 5         # every result below is above the 4 MiB the cache starts at


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, C, H + K - 1, W + K - 1, generator=g)
    f = torch.randn(1, H, W, K, K, generator=g)
    grad = torch.randn(1, C, H, W, generator=g)
    src = torch.randn(1, C, H // 2, W // 2, generator=g)
    return x, f, grad, src


def _poisoned(shape, dtype=torch.float32) -> int:
    """Leave a NaN-filled buffer of ``shape`` in the cache; returns its address."""
    t = ops.empty_output(torch.empty(0, dtype=dtype), shape)
    t.fill_(float("nan"))
    ptr = t.data_ptr()
    del t
    return ptr


def _cases():
    x, f, grad, src = _inputs()
    r = K // 2
    band = src[:, :, 8:60]
    return {
        "adaptive_conv": (lambda: OP.adaptive_conv(x, f), lambda: ops.adaptive_conv_reference(x, f)),
        "grad_input": (lambda: OP.adaptive_conv_grad_input(grad, f),
                       lambda: ops.adaptive_conv_grad_input_reference(grad, f)),
        "bicubic_pad": (lambda: OP.bicubic_pad(src, [H, W], r),
                        lambda: ops.bicubic_pad_reference(src, (H, W), r)),
        "bicubic_pad_rows": (lambda: OP.bicubic_pad_rows(band, [H, W], r, H // 2, 8, 24, 110),
                             lambda: ops.bicubic_pad_reference(src, (H, W), r)[:, :, 24:110]),
        "bicubic_pad_conv": (lambda: OP.bicubic_pad_conv(src, f, [H, W], r, None),
                             lambda: ops.adaptive_conv_reference(ops.bicubic_pad_reference(src, (H, W), r), f)),
    }


@pytest.mark.parametrize("name", ["adaptive_conv", "grad_input", "bicubic_pad", "bicubic_pad_rows",
                                  "bicubic_pad_conv"])
def test_a_reused_buffer_is_written_in_full(name):
    run, reference = _cases()[name]
    want = reference()
    shape = tuple(run().shape)
    ops.empty_cpu_cache()
    ptr = _poisoned(shape)
    got = run()
    assert got.data_ptr() == ptr            # the NaN-filled buffer was the one reused
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_bicubic_pad_backward_reuses_and_overwrites():
    h, w, r = 104, 112, K // 2                           # a 4.5 MB gradient of the source
    src = torch.randn(1, C, h, w, requires_grad=True)
    g = torch.randn(1, C, 2 * h + 2 * r, 2 * w + 2 * r)
    (want,) = torch.autograd.grad(ops.bicubic_pad_reference(src, (2 * h, 2 * w), r), src, g)
    ops.empty_cpu_cache()
    ptr = _poisoned((1, C, h, w + 8))                   # a little larger: still taken (<= 1.25x)
    got = OP.bicubic_pad_backward(g, [h, w], r)
    assert got.data_ptr() == ptr and not got.isnan().any()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_freed_results_are_held_reused_and_freed_on_request():
    x, f, _, _ = _inputs()
    ops.empty_cpu_cache()
    assert ops.cpu_cache_bytes() == 0
    y = OP.adaptive_conv(x, f)
    want, ptr, nbytes = y.clone(), y.data_ptr(), y.nbytes
    del y
    assert ops.cpu_cache_bytes() >= nbytes
    y = OP.adaptive_conv(x, f)
    assert y.data_ptr() == ptr and torch.equal(y, want)
    assert ops.cpu_cache_bytes() == 0
    y.resize_(2, C, H, W)                    # the storage stays resizable like torch's own
    assert torch.equal(y[0], want[0])
    del y
    assert ops.cpu_cache_bytes() > 0
    ops.empty_cpu_cache()
    assert ops.cpu_cache_bytes() == 0
    # a much larger request does not take a small buffer, and small results are not cached
    small = OP.adaptive_conv(x[:, :2], f)
    del small
    assert ops.cpu_cache_bytes() == 0


def _run(code, **env):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env={**os.environ, **env}, timeout=120)


CHECK = """
    import torch, featup_adapters.ops as O
    x = torch.randn(1, 64, 132, 132); f = torch.randn(1, 128, 128, 5, 5)
    y = torch.ops.featup_adapters.adaptive_conv(x, f)    # 4 MiB
    del y
    print(O.cpu_cache_bytes())
"""


def test_cache_limit_and_switch_from_the_environment():
    for env, held in (("0", 0), ("3", 0), ("64", 4 << 20)):
        res = _run(CHECK, FEATUP_CPU_CACHE_MB=env)
        assert res.returncode == 0, res.stderr
        assert int(res.stdout.split()[-1]) == held, (env, res.stdout)


def test_a_miss_frees_idle_buffers_to_stay_within_the_limit():
    res = _run("""
        import torch, featup_adapters.ops as O
        f = torch.randn(1, 128, 128, 5, 5)
        def result(c):                 # c * 64 KiB
            return torch.ops.featup_adapters.adaptive_conv(torch.randn(1, c, 132, 132), f)
        y = result(128); del y         # 8 MiB idle
        a = O.cpu_cache_bytes()
        y = result(96); del y          # 6 MiB: the 8 MiB one is too large (> 1.25x), a miss
        b = O.cpu_cache_bytes()
        y = result(160)                # 10 MiB, a miss: 8 + 6 + 10 > 16, the 8 MiB one freed
        c = O.cpu_cache_bytes(); del y
        print(a >> 20, b >> 20, c >> 20, O.cpu_cache_bytes() >> 20)
    """, FEATUP_CPU_CACHE_MB="16")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["8", "14", "6", "16"], res.stdout


def test_a_forked_child_allocates_and_frees():
    res = _run("""
        import os, torch, featup_adapters.ops as O
        x = torch.randn(1, 64, 132, 132); f = torch.randn(1, 128, 128, 5, 5)
        y = torch.ops.featup_adapters.adaptive_conv(x, f); del y        # a cached buffer
        pid = os.fork()
        if pid == 0:           # the child; one thread, as in a DataLoader worker (OpenMP's
            torch.set_num_threads(1)   # pool does not survive a fork, with or without the cache)
            z = torch.ops.featup_adapters.adaptive_conv(x, f)
            ok = torch.allclose(z, O.adaptive_conv_reference(x, f), atol=1e-4)
            del z
            os._exit(0 if ok and O.cpu_cache_bytes() > 0 else 1)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status))
    """)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[-1] == "0"


@pytest.mark.parametrize("bad", ["lots", "17592186044416"])   # not a number; 2^44 MiB overflows
def test_bad_cache_size_is_refused_clearly(bad):
    res = _run(CHECK, FEATUP_CPU_CACHE_MB=bad)
    assert res.returncode != 0
    assert "FEATUP_CPU_CACHE_MB" in res.stderr and f"'{bad}'" in res.stderr


def test_lazy_clone_of_a_cached_buffer_keeps_it_and_gives_it_back():
    x, f, _, _ = _inputs()
    ops.empty_cpu_cache()
    y = OP.adaptive_conv(x, f)
    want, nbytes = y.clone(), y.nbytes
    z = y._lazy_clone()                      # copy-on-write: shares y's buffer
    del y
    assert ops.cpu_cache_bytes() == 0        # still in use by z
    assert torch.equal(z, want)
    del z
    assert ops.cpu_cache_bytes() >= nbytes


# --- torch's own large tensors from the cache (ops.set_torch_cpu_cache) ----------------------

def test_torch_tensors_come_from_the_cache_only_while_switched_on():
    n = 2_500_000                                        # 10 MB: above the 4 MiB threshold
    assert not ops.torch_cpu_cache_enabled()
    ops.empty_cpu_cache()
    with ops.torch_cpu_cache():
        assert ops.torch_cpu_cache_enabled()
        a = torch.empty(n)
        ptr = a.data_ptr()
        del a
        assert ops.cpu_cache_bytes() >= 4 * n            # back in the cache, not to the system
        b = torch.full((n,), 3.0)
        assert b.data_ptr() == ptr                       # reused, and written in full
        assert bool((b == 3.0).all())
        small = torch.arange(10.0)                       # small: torch's allocator, as before
        assert small.sum().item() == 45.0
        kept = torch.ones(n)                             # freed after the switch is off
    assert not ops.torch_cpu_cache_enabled()
    held = ops.cpu_cache_bytes()
    del b, kept                                          # made by the cache: given back to it
    assert ops.cpu_cache_bytes() >= held + 8 * n
    ops.empty_cpu_cache()
    c = torch.empty(n)
    del c
    assert ops.cpu_cache_bytes() == 0                    # off: torch's allocator frees it


def test_switch_returns_the_previous_state_and_nests():
    assert ops.set_torch_cpu_cache(True) is False
    try:
        assert ops.set_torch_cpu_cache(True) is True     # already on: unchanged
        with ops.torch_cpu_cache(False):
            assert not ops.torch_cpu_cache_enabled()
        assert ops.torch_cpu_cache_enabled()             # the block restored what was there
    finally:
        assert ops.set_torch_cpu_cache(False) is True
    assert not ops.torch_cpu_cache_enabled()


def test_onednn_convolutions_and_their_backward_run_on_the_cache():
    # oneDNN takes its scratch through torch's raw_allocate / raw_deallocate: both must work
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 32, 112, 112, generator=g, requires_grad=True)
    conv = torch.nn.Conv2d(32, 64, 3, padding=1)

    def step():
        x.grad = None
        conv.zero_grad()
        out = conv(x)
        out.square().mean().backward()
        return out.detach(), x.grad.clone(), conv.weight.grad.clone()

    want = step()
    with ops.torch_cpu_cache():
        for _ in range(2):                               # the second from reused buffers
            got = step()
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert not ops.torch_cpu_cache_enabled()


def test_training_turns_the_cache_on_for_its_run_only(monkeypatch):
    from featup_adapters.training import trainer

    seen = []
    real = trainer.feature_source

    def spy(*a, **k):
        seen.append(ops.torch_cpu_cache_enabled())
        return real(*a, **k)

    monkeypatch.setattr(trainer, "feature_source", spy)
    with pytest.raises(Exception):
        trainer.train_upsampler("no_such_backbone_xyz", steps=1, progress=False)
    assert seen == [True]
    assert not ops.torch_cpu_cache_enabled()             # restored, even after a failure
