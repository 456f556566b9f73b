"""JBU stack speed and peak memory at every resolution, measured side by side in one run.

    python benchmarks/jbu.py                  # CPU: C=384 at 16x, outputs 224, 448, 1024, 2048
    python benchmarks/jbu.py --sizes 224 448  # a subset
    python benchmarks/jbu.py --device cuda    # the same cases on a GPU
    python benchmarks/jbu.py --quick          # C=64, small maps: a smoke test

For each output size, ``JBUStack(C).eval()`` forward under ``torch.no_grad()`` (random weights,
source at 1/16 of the output) reports:

* first call (a fresh process's first forward) and warm forward (median of ``--repeats`` calls
  after it, default 5);
* ms per megapixel of output;
* the rate counting the adaptive-convolution FLOPs alone (``2 C H W k^2`` per stage), and that
  rate over the fp32 matmul rate (2048x2048 ``torch.mm``) measured in the same process just
  before the case, so the ratio holds even when the machine's speed drifts;
* peak extra memory (peak resident set minus the resident set before the first forward, on CUDA
  ``max_memory_allocated`` minus what was allocated) over the output's bytes.

Then forward+backward (training mode, dropout off, gradients for every parameter and the source)
at 224 and 448 over the inference forward timed in the same process, one call of each in turn
(so a change in the machine's load hits both sides of the ratio): the ratio of the medians, and of
the fastest call of each (the least disturbed by other jobs); and the same steps over their own
training forward (autograd on, the untiled path: the forward the backward belongs to, which
takes the two-op resize + convolution instead of inference's fused one), and FeatUp's unfold formulation
(below) at 224 for the ratio; the parent checks the two implementations agree.  Every case runs
in its own child process, so its peak memory is its own.  Targets (issue 11): conv-FLOP rate
>= 35% of matmul at every size; ms/MP at 2048 <= 1.25x that at 224; peak extra <= 1.5x the
output at 448 and above; first call <= 1.5x warm; forward+backward <= 3x forward; >= 10x faster
than unfold.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

SIZES = (224, 448, 1024, 2048)
BACKWARD_SIZES = (224, 448)
UNFOLD_SIZE = 224
C_FULL, C_QUICK = 384, 64
QUICK_SIZES = (64, 128)


# ---------------------------------------------------------------------------------------- unfold
def _conv1x1(x, p, name):
    return F.conv2d(x, p[name + ".weight"], p[name + ".bias"])


def unfold_stage(p, pre, source, guidance, r=3):
    B, _, H, W = guidance.shape
    C, k = source.shape[1], 2 * r + 1
    q = _conv1x1(F.gelu(_conv1x1(guidance, p, pre + "range_proj.0")), p, pre + "range_proj.3")
    K = q.shape[1]
    keys = F.unfold(F.pad(q, [r] * 4, mode="reflect"), k).view(B, K, k * k, H, W)
    temp = p[pre + "range_temp"].exp().clamp(1e-4, 1e4)
    rng = torch.softmax(temp * torch.einsum("bcnhw,bchw->bnhw", keys, q), dim=1)
    d = torch.linspace(-1, 1, k, device=q.device)
    dy, dx = torch.meshgrid(d, d, indexing="ij")
    spatial = torch.exp(-(dx ** 2 + dy ** 2) / (2 * p[pre + "sigma_spatial"] ** 2))
    kern = rng * spatial.reshape(1, k * k, 1, 1)
    kern = kern / kern.sum(1, keepdim=True).clamp(min=1e-7)
    fix = _conv1x1(F.gelu(_conv1x1(torch.cat([kern, guidance], 1), p, pre + "fixup_proj.0")), p,
                   pre + "fixup_proj.3")
    kern = kern + 0.1 * fix
    hr = F.interpolate(source, (H, W), mode="bicubic", align_corners=False)
    patches = F.unfold(F.pad(hr, [r] * 4, mode="reflect"), k).view(B, C, k * k, H, W)
    return (patches * kern[:, None]).sum(2)


def unfold_stack(p, source, image):
    x = source
    for i in range(1, 5):
        h, w = x.shape[-2:]
        x = unfold_stage(p, f"up{i}.", x, F.adaptive_avg_pool2d(image, (2 * h, 2 * w)))
    return x + 0.1 * _conv1x1(x, p, "fixup_proj.1")


# ----------------------------------------------------------------------------------------- child
def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def matmul_gflops(device: str, repeats: int = 5) -> float:
    n = 2048
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    a @ b
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        sync()
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / min(times) / 1e9


def conv_flops(stack, C: int, h: int, H: int) -> int:
    k = 2 * stack.radius + 1
    return sum(2 * C * s[0] * s[1] * k * k for _, s in stack.stage_plan((h, h), (H, H)))


def child(impl: str, mode: str, C: int, H: int, device: str, repeats: int, out_path: str) -> dict:
    import warnings
    warnings.filterwarnings("ignore")
    from featup_adapters import ops
    from featup_adapters.upsamplers import JBUStack
    backward = mode == "fwd+bwd"
    h = H // 16
    torch.manual_seed(0)
    stack = JBUStack(C).to(device)
    with torch.no_grad():                      # non-trivial weights, the same for both impls
        for _, t in stack.named_parameters():
            t.add_(torch.randn_like(t) * (0.3 if t.dim() else 0.2))
    stack.train(backward).requires_grad_(backward)
    if backward:                                # dropout off so both impls compute the same thing
        for m in stack.modules():
            if isinstance(m, torch.nn.Dropout2d):
                m.p = 0.0
    params = dict(stack.named_parameters())
    source = torch.randn(1, C, h, h, device=device, requires_grad=backward)
    image = torch.randn(1, 3, H, H, device=device)
    grad_out = torch.randn(1, C, H, H, device=device) if backward else None
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    mm = matmul_gflops(device)

    train_fwd_times = []

    def run():
        t0 = time.perf_counter()
        out = stack(source, image) if impl == "ours" else unfold_stack(params, source, image)
        if backward:
            sync()
            train_fwd_times.append(time.perf_counter() - t0)   # the forward the backward is of
            out.backward(grad_out)
        sync()
        return out

    if cuda:
        sync()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss()
    times, fwd_times = [], []
    with torch.enable_grad() if backward else torch.no_grad():
        for i in range(repeats + 1):
            if backward:
                # the inference forward, interleaved with the timed steps in this process, so
                # that the ratio compares calls made under the same machine load
                stack.eval()
                with torch.no_grad():
                    t0 = time.perf_counter()
                    fwd_out = stack(source.detach(), image)
                    sync()
                    fwd_times.append(time.perf_counter() - t0)
                del fwd_out
                stack.train()
            stack.zero_grad(set_to_none=True)
            source.grad = None
            t0 = time.perf_counter()
            out = run()
            times.append(time.perf_counter() - t0)
            if i < repeats:
                del out
    if cuda:
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if out_path:
        torch.save(out.detach().float().cpu(), out_path)
    warm = times[1:] or times
    fwd_warm = fwd_times[1:] or fwd_times
    train_fwd = train_fwd_times[1:] or train_fwd_times
    extra = ({"fwd_warm_s": statistics.median(fwd_warm), "fwd_min_s": min(fwd_warm),
              "train_fwd_warm_s": statistics.median(train_fwd)}
             if backward else {})
    return {"impl": impl, "mode": mode, "C": C, "H": H, "first_s": times[0],
            "warm_s": statistics.median(warm), "min_s": min(warm), **extra,
            "conv_flops": conv_flops(stack, C, h, H), "matmul_gflops": mm,
            "peak_extra": peak - base, "out_bytes": out.numel() * out.element_size(),
            "backend": str(ops.backend(device)), "threads": torch.get_num_threads()}


# ---------------------------------------------------------------------------------------- parent
def _run_child(impl, mode, C, H, args, out_path) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", impl, mode, str(C), str(H),
           "--device", args.device, "--repeats", str(args.repeats), "--out", out_path]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        why = "killed (out of memory?)" if proc.returncode < 0 else tail[0]
        return {"impl": impl, "mode": mode, "C": C, "H": H, "error": f"exit {proc.returncode}: {why}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _gb(n: float) -> str:
    return f"{n / 2 ** 30:.2f} GB" if n >= 2 ** 29 else f"{n / 2 ** 20:.0f} MB"


def _loadavg() -> str:
    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def _machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return name


def render(rows: list[dict], backward: list[dict], unfold: dict | None, ours_unfold: dict | None) -> str:
    out = ["| output | first call | warm | first / warm | ms per MP | conv GFLOP/s | % of matmul "
           "| peak extra | extra / output |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    base_mp = None
    for r in rows:
        label = f"{r['H']}x{r['H']}"
        if "error" in r:
            out.append(f"| {label} | {r['error']} | | | | | | | |")
            continue
        mp = r["H"] ** 2 / 1e6
        ms_mp = r["warm_s"] * 1e3 / mp
        base_mp = base_mp or ms_mp
        rate = r["conv_flops"] / r["warm_s"] / 1e9
        out.append(f"| {label} | {r['first_s']:.2f} s | {r['warm_s'] * 1e3:.0f} ms | "
                   f"{r['first_s'] / r['warm_s']:.2f}x | {ms_mp:.0f} ({ms_mp / base_mp:.2f}x) | "
                   f"{rate:.1f} | {100 * rate / r['matmul_gflops']:.0f}% of "
                   f"{r['matmul_gflops']:.0f} | {_gb(r['peak_extra'])} | "
                   f"{r['peak_extra'] / r['out_bytes']:.2f}x |")
    if backward:
        out += ["", "| output | inference forward (interleaved) | forward+backward | ratio | ratio of "
                "the fastest calls | its training forward | forward+backward / training forward "
                "| peak extra (fwd+bwd) |",
                "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for b in backward:
            label = f"{b['H']}x{b['H']}"
            if "error" in b:
                out.append(f"| {label} | | {b['error']} | | | | | |")
                continue
            f, tf = b["fwd_warm_s"], b.get("train_fwd_warm_s", float("nan"))
            out.append(f"| {label} | {f * 1e3:.0f} ms | {b['warm_s'] * 1e3:.0f} ms | "
                       f"{b['warm_s'] / f:.2f}x | {b['min_s'] / b['fwd_min_s']:.2f}x | "
                       f"{tf * 1e3:.0f} ms | {b['warm_s'] / tf:.2f}x | {_gb(b['peak_extra'])} |")
    if unfold is not None:
        out.append("")
        if "error" in unfold or ours_unfold is None or "error" in ours_unfold:
            out.append(f"unfold implementation at {UNFOLD_SIZE}: {unfold.get('error', 'n/a')}")
        else:
            out.append(f"unfold implementation (FeatUp's formulation) at {unfold['H']}x{unfold['H']}: "
                       f"{unfold['warm_s'] * 1e3:.0f} ms, peak extra {_gb(unfold['peak_extra'])}; "
                       f"ours {unfold['warm_s'] / ours_unfold['warm_s']:.1f}x faster with "
                       f"{ours_unfold['peak_extra'] / max(unfold['peak_extra'], 1):.3f}x the memory, "
                       f"max |diff| {unfold.get('max_abs_diff', float('nan')):.1e}")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=5,
                    help="warm calls timed after the first (median; the first few calls after the "
                         "first still fault in fresh pages, so fewer than 5 reads high)")
    ap.add_argument("--sizes", type=int, nargs="+", default=None,
                    help=f"output sizes (default {' '.join(map(str, SIZES))})")
    ap.add_argument("--channels", type=int, default=None, help=f"C (default {C_FULL})")
    ap.add_argument("--no-backward", action="store_true", help="skip the forward+backward rows")
    ap.add_argument("--no-unfold", action="store_true", help="skip the unfold comparison")
    ap.add_argument("--quick", action="store_true", help="C=64, outputs 64 and 128 (smoke test)")
    ap.add_argument("--json", default="", help="also write the raw results here")
    ap.add_argument("--child", nargs=4, metavar=("IMPL", "MODE", "C", "H"), help=argparse.SUPPRESS)
    ap.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error(f"--repeats: expected at least 1, got {args.repeats}")
    if args.child:
        impl, mode, C, H = args.child
        print(json.dumps(child(impl, mode, int(C), int(H), args.device, args.repeats, args.out)))
        return 0
    C = args.channels or (C_QUICK if args.quick else C_FULL)
    sizes = args.sizes or (QUICK_SIZES if args.quick else SIZES)
    bad = [s for s in sizes if s < 16 or s % 16]
    if bad:
        ap.error(f"--sizes: expected multiples of 16 (the source is 1/16 of the output), got {bad}")
    bwd_sizes = [] if args.no_backward else [s for s in sizes if s in BACKWARD_SIZES or args.quick]
    unfold_size = None if args.no_unfold else (min(sizes) if args.quick else
                                               UNFOLD_SIZE if UNFOLD_SIZE in sizes else None)

    from featup_adapters import ops
    print(f"# JBU stack benchmark, {time.strftime('%Y-%m-%d')}: torch {torch.__version__}, "
          f"{_machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads, "
          f"device {args.device}, C={C}, 16x, B=1, float32")
    print(f"# adaptive_conv backend: {ops.backend(args.device)}")
    print(f"# load average before: {_loadavg()}", flush=True)
    rows, backward, unfold, ours_unfold = [], [], None, None
    with tempfile.TemporaryDirectory() as tmp:
        for H in sizes:
            keep = os.path.join(tmp, "ours.pt") if H == unfold_size else ""
            rows.append(_run_child("ours", "fwd", C, H, args, keep))
            if H == unfold_size and "error" not in rows[-1]:
                ours_unfold = rows[-1]
                unfold = _run_child("unfold", "fwd", C, H, args, os.path.join(tmp, "unfold.pt"))
                if "error" not in unfold:
                    a = torch.load(os.path.join(tmp, "ours.pt"))
                    b = torch.load(os.path.join(tmp, "unfold.pt"))
                    unfold["max_abs_diff"] = (a - b).abs().max().item()
            if H in bwd_sizes:
                backward.append(_run_child("ours", "fwd+bwd", C, H, args, ""))
    print(f"# load average after: {_loadavg()}\n")
    print(render(rows, backward, unfold, ours_unfold))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"forward": rows, "backward": backward, "unfold": unfold}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
