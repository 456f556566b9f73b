"""JBU stack speed and peak memory: featup_adapters.JBUStack vs an unfold implementation of the spec.

    python benchmarks/jbu.py                 # CPU, the table of issue 3
    python benchmarks/jbu.py --device cuda   # same cases on a GPU
    python benchmarks/jbu.py --quick         # smaller maps, for a smoke test

Every (implementation, case) runs in its own child process, so peak memory is that case's alone:
on CPU the child's peak resident set (``ru_maxrss``) minus its resident set just before the first
forward ("extra"), on CUDA ``torch.cuda.max_memory_allocated`` minus what was allocated before.
Times are the median of ``--repeats`` runs after one warm-up run.

"unfold" is spec sections 2-3 written the way FeatUp's code does it without its CUDA op: the key
projection unfolded into [B, 32, 49, H, W] for the range kernel and the upsampled features into
[B, C, 49, H, W] for the adaptive convolution.  Both implementations share the same weights, and
the parent checks that their outputs agree.
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

CASES = {
    # name: (C, source size, output size, backward?)
    "fwd 14->224": (384, 14, 224, False),
    "fwd+bwd 28->448": (384, 28, 448, True),
}
QUICK = {
    "fwd 14->224": (64, 7, 112, False),
    "fwd+bwd 28->448": (64, 14, 224, True),
}


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
def _rss_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def child(impl: str, case: str, device: str, repeats: int, quick: bool, out_path: str) -> dict:
    import warnings
    warnings.filterwarnings("ignore")
    from featup_adapters import ops
    from featup_adapters.upsamplers import JBUStack
    C, h, H, backward = (QUICK if quick else CASES)[case]
    torch.manual_seed(0)
    stack = JBUStack(C).to(device)
    with torch.no_grad():                      # non-trivial weights, the same for both impls
        for name, t in stack.named_parameters():
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

    def run():
        if impl == "ours":
            out = stack(source, image)
        else:
            out = unfold_stack(params, source, image)
        if backward:
            out.backward(grad_out)
        return out

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    if device.startswith("cuda"):
        sync()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_kb() * 1024
    ctx = torch.enable_grad() if backward else torch.no_grad()
    times = []
    with ctx:
        for i in range(repeats + 1):
            stack.zero_grad(set_to_none=True)
            source.grad = None
            t0 = time.perf_counter()
            out = run()
            sync()
            if i:
                times.append(time.perf_counter() - t0)
            if i < repeats:
                del out
    if device.startswith("cuda"):
        peak_total = torch.cuda.max_memory_allocated()
    else:
        peak_total = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if out_path:
        torch.save(out.detach().float().cpu(), out_path)
    return {"impl": impl, "case": case, "median_s": statistics.median(times), "min_s": min(times),
            "peak_extra": peak_total - base, "peak_total": peak_total,
            "backend": str(ops.backend(device)), "threads": torch.get_num_threads()}


# ---------------------------------------------------------------------------------------- parent
def _run_child(impl, case, args, out_path) -> dict:
    cmd = [sys.executable, __file__, "--child", impl, case, "--device", args.device,
           "--repeats", str(args.repeats), "--out", out_path] + (["--quick"] if args.quick else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        why = "killed (out of memory?)" if proc.returncode < 0 else tail[0]
        return {"impl": impl, "case": case, "error": f"exit {proc.returncode}: {why}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _gb(n: float) -> str:
    return f"{n / 2 ** 30:.2f} GB" if n >= 2 ** 29 else f"{n / 2 ** 20:.0f} MB"


def _loadavg() -> str:
    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="smaller maps (smoke test)")
    ap.add_argument("--unfold-backward", action="store_true",
                    help="also run the unfold implementation forward+backward at 448 (needs ~40 GB)")
    ap.add_argument("--child", nargs=2, metavar=("IMPL", "CASE"), help=argparse.SUPPRESS)
    ap.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child, args.device, args.repeats, args.quick, args.out)))
        return 0

    from featup_adapters import ops
    print(f"# JBU stack benchmark: torch {torch.__version__}, {platform.machine()}, "
          f"{os.cpu_count()} CPUs, {torch.get_num_threads()} threads, device {args.device}")
    print(f"# adaptive_conv backend: {ops.backend(args.device)}")
    print(f"# load average before: {_loadavg()}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case, (C, h, H, backward) in (QUICK if args.quick else CASES).items():
            res = {}
            for impl in ("ours", "unfold"):
                if impl == "unfold" and backward and not args.unfold_backward:
                    res[impl] = {"impl": impl, "case": case, "error": "skipped: the unfold "
                                 "forward+backward at this size needs far more memory than the "
                                 "machine (run with --unfold-backward to try)"}
                    continue
                res[impl] = _run_child(impl, case, args, os.path.join(tmp, f"{impl}.pt"))
            if "error" not in res["ours"] and "error" not in res["unfold"]:
                a = torch.load(os.path.join(tmp, "ours.pt"))
                b = torch.load(os.path.join(tmp, "unfold.pt"))
                res["ours"]["max_abs_diff"] = (a - b).abs().max().item()
            rows.append((case, C, h, H, res))
    print(f"# load average after: {_loadavg()}\n")
    print("| case | impl | time (median) | peak memory (extra) | peak process | vs unfold |")
    print("|---|---|---|---|---|---|")
    for case, C, h, H, res in rows:
        label = f"{case} (C={C}, {h}x{h} -> {H}x{H}, B=1)"
        for impl in ("ours", "unfold"):
            r = res[impl]
            if "error" in r:
                print(f"| {label} | {impl} | {r['error']} | | | |")
                continue
            cmp = ""
            u = res["unfold"]
            if impl == "ours" and "error" not in u:
                cmp = (f"{u['median_s'] / r['median_s']:.1f}x faster, "
                       f"{r['peak_extra'] / max(u['peak_extra'], 1):.3f}x memory, "
                       f"max |diff| {r.get('max_abs_diff', float('nan')):.1e}")
            print(f"| {label} | {impl} | {r['median_s'] * 1e3:.0f} ms | {_gb(r['peak_extra'])} | "
                  f"{_gb(r['peak_total'])} | {cmp} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
