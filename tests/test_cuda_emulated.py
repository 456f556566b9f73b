"""The CUDA kernels, run on the CPU: the project's own kernel source compiled with a shim (tests/cuda_emu).

Every op is launched with exactly the geometry its CUDA host driver plans and compared with the
float64 reference; every element of every result must be written exactly once; shared-memory
races, out-of-range shared accesses and divergent barriers fail the launch. Needs only g++.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from featup_adapters import ops

sys.path.insert(0, str(Path(__file__).resolve().parent / "cuda_emu"))
import harness  # noqa: E402

pytestmark = pytest.mark.cuda_emulated

if harness.compiler() is None:
    pytest.skip("no C++ compiler (g++) on PATH: the CUDA emulation needs one", allow_module_level=True)

TOL = {torch.float64: 1e-12, torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = list(TOL)

SHAPES = [  # B, C, H, W, k
    (1, 1, 1, 1, 1),
    (2, 3, 5, 7, 3),      # W, H below one block
    (1, 13, 9, 37, 7),    # W past one warp, C not a multiple of 8, odd H (unpaired last row)
    (3, 6, 4, 4, 5),
    (2, 19, 7, 33, 9),
    (1, 8, 6, 40, 15),    # k = 15: one staged row (forward), shared memory above 48 KB in float64
    (1, 72, 3, 40, 5),    # 8 warps per block plus a partial channel group
    (2, 5, 3, 2, 11),     # k larger than H and W
    (1, 9, 2, 65, 13),    # three column blocks
]
EMPTY = [(0, 3, 4, 5, 3), (2, 3, 0, 5, 3), (2, 3, 4, 0, 3), (2, 0, 4, 5, 3), (0, 0, 0, 0, 1)]
SMS = [1, 132]  # multiprocessors the plans assume: 132 splits small maps over many blocks


@pytest.fixture(scope="session")
def emu():
    return harness.Emulator(harness.build())


def make(shape, dtype, seed=0):
    B, C, H, W, k = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H + k - 1, W + k - 1, generator=g, dtype=torch.float64).to(dtype)
    f = torch.randn(B, H, W, k, k, generator=g, dtype=torch.float64).to(dtype)
    go = torch.randn(B, C, H, W, generator=g, dtype=torch.float64).to(dtype)
    return x, f, go


def references(x, f, go):
    """float64 references from the same (rounded) inputs."""
    x, f, go = x.double(), f.double(), go.double()
    return {"forward": ops.adaptive_conv_reference(x, f),
            "grad_input": ops.adaptive_conv_grad_input_reference(go, f),
            "grad_filters": ops.adaptive_conv_grad_filters_reference(go, x)}


def run_all(emu, shape, dtype, sms):
    x, f, go = make(shape, dtype)
    args = {"forward": (x, f), "grad_input": (go, f), "grad_filters": (go, x)}
    return {op: emu.run(op, *args[op], shape, sms) for op in args}, references(x, f, go)


def check(results, refs, dtype, shape):
    tol = TOL[dtype]
    for op, (got, counts) in results.items():
        ref = refs[op]
        assert got.shape == ref.shape, (op, got.shape, ref.shape)
        bad = (counts != 1).nonzero()
        assert bad.numel() == 0, (f"{op} {shape} {dtype}: {bad.shape[0]} elements written other than once, "
                                  f"first at {bad[0].tolist()} ({counts[tuple(bad[0])].item()} times)")
        if ref.numel():
            torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol * (1 + ref.abs().max().item()),
                                       msg=lambda m: f"{op} {shape} {dtype}: {m}")


@pytest.mark.parametrize("sms", SMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kernels_match_float64_reference(emu, shape, dtype, sms):
    results, refs = run_all(emu, shape, dtype, sms)
    check(results, refs, dtype, shape)


@pytest.mark.parametrize("k", range(1, 16, 2))
def test_every_filter_size(emu, k):
    shape = (1, 10, 3, 35, k)
    for dtype in (torch.float32, torch.bfloat16):
        results, refs = run_all(emu, shape, dtype, sms=8)
        check(results, refs, dtype, shape)


@pytest.mark.parametrize("shape", EMPTY, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_empty_batches_and_maps(emu, shape, dtype):
    """B=0, C=0 or empty maps: nothing launched, or zeros written where the math gives zeros."""
    results, refs = run_all(emu, shape, dtype, sms=132)
    check(results, refs, dtype, shape)


def test_test_shapes_reach_every_plan_branch(emu):
    """The shapes above cover both row counts, split and unsplit channels, 1-8 warps, opt-in smem."""
    seen = {op: set() for op in harness.OPS_IDS}
    for shape in SHAPES:
        for sms in SMS:
            for acc in (4, 8):
                for op in seen:
                    p = emu.plan(op, shape, sms, acc)
                    seen[op].add(("rows", p["rows"]))
                    seen[op].add(("split", p["splits"] > 1))
                    seen[op].add(("warps", p["by"]))
                    seen[op].add(("big_smem", p["smem"] > 48 * 1024))
    for op in ("forward", "grad_input"):
        assert {("rows", 1), ("rows", 2), ("split", True), ("split", False), ("big_smem", True),
                ("warps", 1), ("warps", 8)} <= seen[op], seen[op]
    assert {("split", True), ("split", False), ("rows", 1), ("rows", 15)} <= seen["grad_filters"]


def test_plans_cap_grid_y_and_z_at_65535(emu):
    """More rows than grid y holds, more (batch, split) work than grid z holds: the plans cap both."""
    tall = (1, 1, 2 * 65535 + 3, 1, 1)
    deep = (65537, 1, 1, 1, 1)
    for shape, axis in ((tall, "gy"), (deep, "gz")):
        for op in ("forward", "grad_input", "grad_filters"):
            p = emu.plan(op, shape, 1)
            assert p[axis] == 65535, (op, shape, p)


GRID_LIMIT = 3  # stands in for 65535: the same kernels, walking their rows and work items


@pytest.fixture(scope="session")
def walking_emu():
    return harness.Emulator(harness.build(grid_limit=GRID_LIMIT))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_work_beyond_the_grid_is_walked(walking_emu, dtype):
    """Grid y / z capped at 3 (FA_GRID_YZ_LIMIT): every block loops over several rows and items."""
    for shape in [(3, 13, 9, 37, 7), (2, 72, 7, 5, 3), (4, 3, 8, 2, 15)]:
        for sms in SMS:
            plans = [walking_emu.plan(op, shape, sms) for op in harness.OPS_IDS]
            assert any(p["gy"] == GRID_LIMIT for p in plans) and any(p["gz"] == GRID_LIMIT for p in plans)
            results, refs = run_all(walking_emu, shape, dtype, sms)
            check(results, refs, dtype, shape)


def test_grad_filters_splits_are_summed_in_a_fixed_order(emu):
    """Channel splits: two launches (partials, then their sum), the same bits on every run."""
    shape = (1, 40, 2, 5, 3)
    assert emu.plan("grad_filters", shape, 132)["splits"] > 1
    x, f, go = make(shape, torch.float32)
    first, _ = emu.run("grad_filters", go, x, shape, 132)
    assert emu.launches() == 2
    again, _ = emu.run("grad_filters", go, x, shape, 132)
    assert torch.equal(first, again)


def test_half_conversions_are_bit_exact(emu):
    vals = torch.cat([torch.randn(20000) * s for s in (1e-6, 1e-3, 1.0, 1e3, 6e4)] +
                     [torch.tensor([0.0, -0.0, 65504.0, 65519.0, 65520.0, 1e9, -1e9, 5.96e-8, 2.98e-8,
                                    6.1e-5, float("inf"), -float("inf"), 3.3e38])])
    for kind, dtype in ((0, torch.float16), (2, torch.bfloat16)):
        bits = emu.convert(kind, vals)
        assert torch.equal(bits, vals.to(dtype).view(torch.int16)), dtype
        back = emu.convert(kind + 1, bits)
        assert torch.equal(back, vals.to(dtype).float())


@pytest.mark.slow
def test_kernels_clean_under_address_and_undefined_behaviour_sanitizers():
    exe = harness.build_sanitized()
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:halt_on_error=1", UBSAN_OPTIONS="print_stacktrace=1")
    res = subprocess.run([str(exe)], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.strip().startswith("ok "), res.stdout[-3000:]
    assert "ERROR: AddressSanitizer" not in res.stderr and "runtime error" not in res.stderr, res.stderr[-3000:]


# ---- the suite catches planted bugs ---------------------------------------------------------
# Each is a text replacement in a copy of the kernel source, switched on at run time by
# emu.set_plant(n) (::emu::plant == n), so one build holds them all; the copy is built with the
# small grid cap so that blocks loop (a barrier missing between loop iterations shows only then).
PLANTED = {
    1: ("forward: the barrier that keeps the next staging from overwriting filters still being read",
        "      __syncthreads();  // the previous iteration's readers are done with `staged`\n",
        "      if (::emu::plant != 1) __syncthreads();\n", "race on shared word"),
    2: ("forward: the barrier between staging the filters and reading them",
        "      __syncthreads();\n      if (x >= s.W) continue;  // no barrier below",
        "      if (::emu::plant != 2) __syncthreads();\n      if (x >= s.W) continue;  // no barrier below",
        "race on shared word"),
    3: ("grad_input: the last tap row never staged, so its contributions are lost",
        "if (y >= 0 && y < s.H && x >= 0 && x < s.W && i >= 0 && i < k && r < rows)",
        "if (y >= 0 && y < s.H && x >= 0 && x < s.W && i >= 0 && i < k - (::emu::plant == 3) && r < rows)",
        "Mismatched elements"),
    4: ("grad_filters: the last pixel of each 32-pixel row segment never written back",
        "for (int e = tid; e < static_cast<int>(npx) * KK; e += nthreads) {",
        "for (int e = tid; e < static_cast<int>(npx - (::emu::plant == 4)) * KK; e += nthreads) {",
        "written other than once"),
    5: ("grad_filters: 32-bit pixel index (blockIdx.x * 32 + threadIdx.x wraps), here off by one warp",
        "const int64_t x0 = static_cast<int64_t>(blockIdx.x) * kWarp, x = x0 + tx;\n  const int64_t npx = s.W - x0 < kWarp ? s.W - x0 : kWarp;\n  const int64_t pixels",
        "const int64_t x0 = static_cast<int64_t>(blockIdx.x + (::emu::plant == 5 && blockIdx.x > 0)) * kWarp, x = x0 + tx;\n  const int64_t npx = s.W - x0 < kWarp ? s.W - x0 : kWarp;\n  const int64_t pixels",
        "written other than once"),
}


@pytest.fixture(scope="session")
def planted_emu(tmp_path_factory):
    csrc = harness.copy_csrc(tmp_path_factory.mktemp("planted") / "csrc")
    path = csrc / "cuda" / harness.KERNELS.name
    text = path.read_text()
    for n, (_, old, new, _) in PLANTED.items():
        assert text.count(old) == 1, f"planted bug {n} no longer matches the kernel source: {old!r}"
        text = text.replace(old, new)
    path.write_text(text)
    return harness.Emulator(harness.build(csrc, grid_limit=GRID_LIMIT))


@pytest.mark.slow
@pytest.mark.parametrize("n", list(PLANTED))
def test_planted_bug_is_caught(planted_emu, n):
    what, _, _, symptom = PLANTED[n]
    shape = (2, 20, 7, 37, 7)
    planted_emu.set_plant(0)
    check(*run_all(planted_emu, shape, torch.float32, sms=1), torch.float32, shape)  # inert when off
    planted_emu.set_plant(n)
    try:
        with pytest.raises((AssertionError, harness.EmulationError)) as info:
            for dtype in (torch.float32, torch.float64):
                check(*run_all(planted_emu, shape, dtype, sms=1), dtype, shape)
    finally:
        planted_emu.set_plant(0)
    assert symptom in str(info.value), f"{what}: {info.value}"
