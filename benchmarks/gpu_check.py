"""The prepared GPU check: build for this GPU, run the CUDA tests, benchmark the op and the JBU stack.

    bash scripts/gpu_check.sh OUTDIR               # the whole check (what the README table needs)
    python benchmarks/gpu_check.py OUTDIR --no-build --no-tests --sizes 224 --dtypes float32

Steps, each recorded in OUTDIR/gpu.json and summed up in OUTDIR/gpu.md:
1. build ``featup_adapters._C`` in place for this GPU's architecture only (TORCH_CUDA_ARCH_LIST
   from ``torch.cuda.get_device_capability()``);
2. ``pytest -m "cuda or cuda_emulated"`` (the kernels on the device, and under the CPU emulation);
3. in a fresh process (so the new build is the one loaded): the op (forward, grad_input,
   grad_filters; B=1, C=384, k=7) at 224^2, 448^2, 1024^2 in float32 and bfloat16 beside the
   FeatUp-style unfold formulation and a depthwise ``F.conv2d`` with the same FLOPs (the roofline
   proxy), then the JBU stack (forward, forward+backward; 16x upsampling to the same sizes; float32
   and bfloat16 autocast) beside the unfold stack of benchmarks/jbu.py, and ``torch.compile`` of
   the stack. Times are medians of CUDA-event timings after warm-up; memory is
   ``torch.cuda.max_memory_allocated`` above what was allocated before the case.
The run keeps within --budget seconds (default 330: six minutes with margin); a case that no
longer fits, or whose unfold tensors would not fit in memory, is recorded as skipped with why.

Exit status: 0 every step ran and the tests passed; 1 a step failed; 2 bad arguments;
77 no CUDA GPU visible (nothing measured; OUTDIR/gpu.json says so).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_GPU = 0, 1, 2, 77
DTYPES = ("float32", "bfloat16")
OP_CASES = ("forward", "grad_input", "grad_filters")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("outdir", type=Path, help="folder for gpu.json and gpu.md (created)")
    ap.add_argument("--sizes", default="224,448,1024", help="output sizes, comma separated (default %(default)s)")
    ap.add_argument("--channels", type=int, default=384, help="feature channels C (default %(default)s)")
    ap.add_argument("--dtypes", default=",".join(DTYPES), help="float32 and/or bfloat16 (default %(default)s)")
    ap.add_argument("--repeats", type=int, default=10, help="timed runs per case (default %(default)s)")
    ap.add_argument("--budget", type=float, default=330.0, help="seconds for the whole check (default %(default)s)")
    ap.add_argument("--no-build", action="store_true", help="use the extension as built")
    ap.add_argument("--no-tests", action="store_true", help="skip the pytest step")
    ap.add_argument("--bench-child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # "cpu": smoke test of the code
    args = ap.parse_args(argv)
    try:
        args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        ap.error(f"--sizes: expected comma-separated integers such as 224,448, got {args.sizes!r}")
    if not args.sizes or any(s < 16 or s % 16 for s in args.sizes):
        ap.error(f"--sizes: expected multiples of 16 (the stack upsamples 16x), got {args.sizes}")
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [d for d in args.dtypes if d not in DTYPES]
    if bad or not args.dtypes:
        ap.error(f"--dtypes: expected a subset of {','.join(DTYPES)}, got {bad or args.dtypes}")
    if args.channels < 1 or args.repeats < 1 or args.budget <= 0:
        ap.error(f"--channels, --repeats and --budget must be positive, got {args.channels}, "
                 f"{args.repeats}, {args.budget}")
    return args


def gpu_info() -> dict | None:
    """The visible GPU, or None."""
    import torch
    if not torch.cuda.is_available():
        return None
    p = torch.cuda.get_device_properties(0)
    major, minor = torch.cuda.get_device_capability(0)
    return {"name": p.name, "capability": f"{major}.{minor}", "sms": p.multi_processor_count,
            "memory_gb": round(p.total_memory / 2 ** 30, 1), "torch": torch.__version__,
            "cuda": torch.version.cuda}


def _tail(text: str, n: int = 30) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


def _run(cmd, timeout, env=None) -> dict:
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(timeout, 1),
                           env=env)
        ok, rc, out = p.returncode == 0, p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        ok, rc = False, None
        out = f"timed out after {timeout:.0f} s\n" + ((e.stdout or b"").decode(errors="replace")
                                                         if isinstance(e.stdout, bytes) else (e.stdout or ""))
    return {"ok": ok, "returncode": rc, "seconds": round(time.monotonic() - t0, 1), "tail": _tail(out),
            "command": " ".join(map(str, cmd))}


def build(capability: str, timeout: float) -> dict:
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST=capability, FEATUP_REQUIRE_EXT="1",
               MAX_JOBS=os.environ.get("MAX_JOBS", str(os.cpu_count() or 4)))
    res = _run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], timeout, env)
    res["arch"] = capability
    return res


def run_tests(timeout: float) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda or cuda_emulated", "tests"]
    try:
        import xdist  # noqa: F401  (the emulation builds are compiler-bound: spread them)
        cmd[4:4] = ["-n", str(min(8, os.cpu_count() or 1))]
    except ImportError:
        pass
    res = _run(cmd, timeout)
    res["summary"] = res["tail"].splitlines()[-1] if res["tail"] else ""
    return res


# ------------------------------------------------------------------------------ benchmarks (child)
def _timer(fn, repeats: int, device: str = "cuda") -> dict:
    """Median milliseconds (CUDA events) and peak memory above the baseline."""
    import torch
    for _ in range(2):
        fn()
    if device != "cuda":  # the CPU smoke test of this script: wall clock, no memory figure
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        times.sort()
        return {"ms": times[len(times) // 2], "min_ms": times[0]}
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return {"ms": times[len(times) // 2], "min_ms": times[0],
            "peak_mb": (torch.cuda.max_memory_allocated() - base) / 2 ** 20}


def _case(results: list, name: str, deadline: float, fn, repeats: int, need_bytes: float = 0,
          device: str = "cuda", **meta):
    import torch
    row = {"case": name, **meta}
    free = torch.cuda.mem_get_info()[0] if device == "cuda" else float("inf")
    if time.monotonic() > deadline:
        row["skipped"] = "time budget spent"
    elif need_bytes > 0.8 * free:
        row["skipped"] = f"needs ~{need_bytes / 2 ** 30:.0f} GB, {free / 2 ** 30:.0f} GB free"
    else:
        try:
            row.update(_timer(fn, repeats, device))
        except torch.cuda.OutOfMemoryError as e:
            row["skipped"] = f"out of memory: {str(e).splitlines()[0]}"
        except Exception as e:  # a failing case is a result, not the end of the check
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if device == "cuda":
        torch.cuda.empty_cache()
    results.append(row)
    print(json.dumps(row), flush=True)
    return row


def _load_unfold_stack():
    import importlib.util
    spec = importlib.util.spec_from_file_location("_bench_jbu", ROOT / "benchmarks" / "jbu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.unfold_stack


def bench_child(args) -> dict:
    import torch
    import torch.nn.functional as F
    from featup_adapters import ops
    from featup_adapters.upsamplers import JBUStack
    deadline = time.monotonic() + args.budget
    OP = torch.ops.featup_adapters
    dev, C, k, kk = args.device, args.channels, 7, 49
    op_rows, stack_rows = [], []
    for dname in args.dtypes:
        dtype = getattr(torch, dname)
        elt = torch.finfo(dtype).bits // 8
        for S in args.sizes:
            torch.manual_seed(0)
            x = torch.randn(1, C, S + k - 1, S + k - 1, device=dev, dtype=dtype)
            f = torch.softmax(torch.randn(1, S, S, kk, device=dev), -1).to(dtype).view(1, S, S, k, k)
            g = torch.randn(1, C, S, S, device=dev, dtype=dtype)
            w = torch.randn(C, 1, k, k, device=dev, dtype=dtype)
            meta = {"dtype": dname, "size": S, "C": C, "k": k, "gflop": 2 * C * S * S * kk / 1e9,
                    "mb_moved": ((x.numel() + g.numel()) * elt + f.numel() * elt) / 2 ** 20}
            unfold_bytes = C * kk * S * S * elt

            def unfold_fwd(x=x, f=f, S=S):
                cols = F.unfold(x, k).view(1, C, kk, S * S)
                return (cols * f.reshape(1, 1, S * S, kk).transpose(2, 3)).sum(2).view(1, C, S, S)

            xg, fg = x.detach().requires_grad_(), f.detach().requires_grad_()

            def unfold_bwd(xg=xg, fg=fg, g=g, S=S):
                cols = F.unfold(xg, k).view(1, C, kk, S * S)
                out = (cols * fg.reshape(1, 1, S * S, kk).transpose(2, 3)).sum(2).view(1, C, S, S)
                torch.autograd.grad(out, (xg, fg), g)

            cases = [("forward", lambda x=x, f=f: OP.adaptive_conv(x, f), 0),
                     ("grad_input", lambda g=g, f=f: OP.adaptive_conv_grad_input(g, f), 0),
                     ("grad_filters", lambda g=g, x=x: OP.adaptive_conv_grad_filters(g, x), 0),
                     ("conv2d depthwise (same FLOPs)", lambda x=x, w=w: F.conv2d(x, w, groups=C), 0),
                     ("unfold forward", unfold_fwd, 2 * unfold_bytes),
                     ("unfold forward+backward", unfold_bwd, 5 * unfold_bytes)]
            for name, fn, need in cases:
                _case(op_rows, name, deadline, fn, args.repeats, need, dev, **meta)
            del x, f, g, w, xg, fg
    unfold_stack = _load_unfold_stack()
    for dname in args.dtypes:
        dtype = getattr(torch, dname)
        for S in args.sizes:
            torch.manual_seed(0)
            stack = JBUStack(C).to(dev)
            params = dict(stack.named_parameters())
            src = torch.randn(1, C, S // 16, S // 16, device=dev)
            img = torch.randn(1, 3, S, S, device=dev)
            gout = torch.randn(1, C, S, S, device=dev)
            auto = torch.autocast(dev, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
            meta = {"dtype": dname + (" autocast" if dtype == torch.bfloat16 else ""), "size": S, "C": C}
            need = C * kk * S * S * 4

            def fwd(impl, stack=stack, params=params, src=src, img=img, auto=auto):
                with torch.no_grad(), auto:
                    return stack(src, img) if impl == "ours" else unfold_stack(params, src, img)

            def fwd_bwd(impl, stack=stack, params=params, src=src, img=img, gout=gout, auto=auto):
                s = src.detach().requires_grad_()
                with auto:
                    out = stack(s, img) if impl == "ours" else unfold_stack(params, s, img)
                out.float().backward(gout)

            stack.eval()
            _case(stack_rows, "forward", deadline, lambda: fwd("ours"), args.repeats, 0, dev, impl="ours", **meta)
            _case(stack_rows, "forward", deadline, lambda: fwd("unfold"), args.repeats, 3 * need, dev,
                  impl="unfold", **meta)
            stack.train()
            for m in stack.modules():
                if isinstance(m, torch.nn.Dropout2d):
                    m.p = 0.0
            _case(stack_rows, "forward+backward", deadline, lambda: fwd_bwd("ours"), args.repeats, 0, dev,
                  impl="ours", **meta)
            _case(stack_rows, "forward+backward", deadline, lambda: fwd_bwd("unfold"), args.repeats, 8 * need, dev,
                  impl="unfold", **meta)
    compiled = {"case": "torch.compile(JBUStack) forward, 224", "size": 224}
    if dev != "cuda":
        compiled["skipped"] = "compiling is measured on the device only"
    elif time.monotonic() < deadline - 60:
        try:
            torch.manual_seed(0)
            stack = JBUStack(C).to(dev).eval()
            src, img = torch.randn(1, C, 14, 14, device=dev), torch.randn(1, 3, 224, 224, device=dev)
            t0 = time.monotonic()
            cstack = torch.compile(stack, fullgraph=True)
            with torch.no_grad():
                got, want = cstack(src, img), stack(src, img)
            compiled["compile_s"] = round(time.monotonic() - t0, 1)
            compiled["max_abs_diff"] = (got - want).abs().max().item()
            with torch.no_grad():
                compiled.update(_timer(lambda: cstack(src, img), args.repeats, dev))
        except Exception as e:
            compiled["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    else:
        compiled["skipped"] = "time budget spent"
    return {"op": op_rows, "stack": stack_rows, "compile": compiled, "backend": str(ops.backend(dev))}


# ----------------------------------------------------------------------------------------- report
def _fmt(row: dict) -> str:
    if "skipped" in row:
        return f"skipped: {row['skipped']}"
    if "error" in row:
        return f"error: {row['error']}"
    return f"{row['ms']:.3f} ms"


def _mem(row: dict) -> str:
    return f"{row['peak_mb']:.0f} MB" if "peak_mb" in row else ""


def render_markdown(result: dict) -> str:
    """gpu.md from a gpu.json-shaped result."""
    lines = ["# GPU check", ""]
    gpu = result.get("gpu")
    if not gpu:
        lines += [f"Not measured: {result.get('reason', 'no GPU')}.", ""]
        return "\n".join(lines)
    lines += [f"{gpu['name']} (sm_{gpu['capability'].replace('.', '')}, {gpu['sms']} SMs, {gpu['memory_gb']} GB), "
              f"torch {gpu['torch']}, CUDA {gpu['cuda']}; {result.get('date', '')}; total {result.get('seconds', '?')} s.", ""]
    for step in ("build", "tests"):
        s = result.get(step)
        if s:
            state = "ok" if s.get("ok") else ("skipped" if s.get("skipped") else "FAILED")
            extra = s.get("summary") or s.get("arch") or s.get("skipped") or ""
            lines.append(f"- {step}: {state} ({s.get('seconds', 0)} s) {extra}".rstrip())
    bench = result.get("bench") or {}
    if bench.get("error"):
        lines.append(f"- benchmarks: FAILED: {bench['error']}")
    lines.append("")
    ops_rows = bench.get("op", [])
    if ops_rows:
        lines += ["## adaptive_conv (B=1, k=7)", "",
                  "| dtype | size | C | case | time | GFLOP/s | GB/s | vs conv2d | peak memory |",
                  "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
        conv = {(r["dtype"], r["size"]): r for r in ops_rows if r["case"].startswith("conv2d") and "ms" in r}
        for r in ops_rows:
            ok = "ms" in r
            gf = f"{r['gflop'] / r['ms'] * 1e3:.0f}" if ok else ""
            gb = f"{r['mb_moved'] / 1024 / r['ms'] * 1e3:.0f}" if ok and r["case"] in OP_CASES else ""
            c = conv.get((r["dtype"], r["size"]))
            vs = f"{c['ms'] / r['ms']:.2f}x" if ok and c and r is not c else ""
            lines.append(f"| {r['dtype']} | {r['size']} | {r['C']} | {r['case']} | {_fmt(r)} | {gf} | {gb} | {vs} | {_mem(r)} |")
        lines.append("")
        lines.append("GB/s counts input, grad_out and filters once (the DRAM minimum of each kernel); "
                     "\"vs conv2d\" is the depthwise conv2d's time over the case's time (1.00x = as fast as cuDNN "
                     "on the same FLOPs).")
        lines.append("")
    st = bench.get("stack", [])
    if st:
        lines += ["## JBU stack (16x upsampling, B=1)", "", "| dtype | size | C | case | ours | unfold | ratio | ours memory | unfold memory |",
                  "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
        pairs = {}
        for r in st:
            pairs.setdefault((r["dtype"], r["size"], r["case"]), {})[r["impl"]] = r
        for (dt, size, case), p in pairs.items():
            o, u = p.get("ours", {}), p.get("unfold", {})
            ratio = f"{u['ms'] / o['ms']:.1f}x" if "ms" in o and "ms" in u else ""
            lines.append(f"| {dt} | {size} | {o.get('C', u.get('C', ''))} | {case} | {_fmt(o) if o else ''} | "
                         f"{_fmt(u) if u else ''} | {ratio} | {_mem(o)} | {_mem(u)} |")
        lines.append("")
    comp = bench.get("compile")
    if comp:
        if "ms" in comp:
            lines.append(f"torch.compile(JBUStack, fullgraph=True) forward at 224: {comp['ms']:.3f} ms after "
                         f"{comp['compile_s']} s compiling; max |compiled - eager| = {comp['max_abs_diff']:.1e}.")
        else:
            lines.append(f"torch.compile(JBUStack): {_fmt(comp)}")
        lines.append("")
    return "\n".join(lines)


def write_reports(outdir: Path, result: dict) -> tuple[Path, Path]:
    from featup_adapters._io import atomic_write
    outdir.mkdir(parents=True, exist_ok=True)
    with atomic_write(outdir / "gpu.json", "w") as f:
        json.dump(result, f, indent=1)
    with atomic_write(outdir / "gpu.md", "w") as f:
        f.write(render_markdown(result))
    return outdir / "gpu.json", outdir / "gpu.md"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.bench_child:
        res = bench_child(args)
        with open(args.bench_child, "w") as f:
            json.dump(res, f)
        return 0
    t0 = time.monotonic()
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "host": platform.node(),
              "args": {"sizes": args.sizes, "channels": args.channels, "dtypes": args.dtypes,
                       "repeats": args.repeats, "budget": args.budget}}
    gpu = gpu_info()
    if gpu is None:
        result.update(status="skipped", reason="no CUDA GPU visible (torch.cuda.is_available() is False)")
        write_reports(args.outdir, result)
        print(f"gpu_check: skipped, nothing measured: {result['reason']}; wrote {args.outdir}/gpu.json",
              file=sys.stderr)
        return EXIT_NO_GPU
    result["gpu"] = gpu
    left = lambda: args.budget - (time.monotonic() - t0)  # noqa: E731
    ok = True
    if args.no_build:
        result["build"] = {"skipped": "--no-build", "ok": True, "seconds": 0}
    else:
        print(f"gpu_check: building for sm_{gpu['capability']} ...", file=sys.stderr, flush=True)
        result["build"] = build(gpu["capability"], left() * 0.6)
        ok &= result["build"]["ok"]
    if args.no_tests or not ok:
        result["tests"] = {"skipped": "--no-tests" if args.no_tests else "build failed", "ok": args.no_tests, "seconds": 0}
    else:
        print("gpu_check: pytest -m 'cuda or cuda_emulated' ...", file=sys.stderr, flush=True)
        result["tests"] = run_tests(max(left() * 0.5, 30))
        ok &= result["tests"]["ok"]
    if result["build"]["ok"]:
        print("gpu_check: benchmarks ...", file=sys.stderr, flush=True)
        child_json = args.outdir / "bench_raw.json"
        args.outdir.mkdir(parents=True, exist_ok=True)
        budget = max(left() - 20, 10)
        cmd = [sys.executable, str(Path(__file__).resolve()), str(args.outdir), "--bench-child", str(child_json),
               "--sizes", ",".join(map(str, args.sizes)), "--channels", str(args.channels),
               "--dtypes", ",".join(args.dtypes), "--repeats", str(args.repeats), "--budget", str(budget * 0.85)]
        run = _run(cmd, budget)
        if run["ok"] and child_json.exists():
            result["bench"] = json.loads(child_json.read_text())
        else:
            result["bench"] = {"error": run["tail"][-2000:]}
            ok = False
    result["status"] = "ok" if ok else "failed"
    result["seconds"] = round(time.monotonic() - t0, 1)
    js, md = write_reports(args.outdir, result)
    print(f"gpu_check: {result['status']} in {result['seconds']} s; wrote {js} and {md}", file=sys.stderr)
    return EXIT_OK if ok else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
