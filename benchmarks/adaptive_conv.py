"""Benchmark of featup_adapters.ops.adaptive_conv on the CPU, measured side by side in one run.

Compares the compiled CPU kernel, the pure PyTorch reference (loop over taps) and an unfold
implementation (the [B, C, k*k, H, W] formulation FeatUp uses without its CUDA op), forward and
backward (both gradients), for B=1, k=7, C=384 at 56x56, 112x112 and 224x224, and reports the
kernel's GFLOP/s next to this machine's fp32 matmul GFLOP/s measured in the same run.

    python benchmarks/adaptive_conv.py [--quick] [--sizes 56 112 224] [--repeats N]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from featup_adapters import ops


def unfold_adaptive_conv(x, filters):
    B, C = x.shape[:2]
    _, H, W, k, _ = filters.shape
    cols = F.unfold(x, k).view(B, C, k * k, H, W)
    return torch.einsum("bcthw,bhwt->bchw", cols, filters.reshape(B, H, W, k * k))


def timeit(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_gflops(repeats):
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n ** 3 / timeit(lambda: a @ b, repeats) / 1e9


def bench_size(size, C, k, repeats, slow_repeats):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, C, size + k - 1, size + k - 1, generator=g)
    f = torch.softmax(torch.randn(1, size, size, k * k, generator=g), -1).view(1, size, size, k, k)
    grad = torch.randn(1, C, size, size, generator=g)
    flops = 2 * C * size * size * k * k

    def backward(impl):
        xr, fr = x.clone().requires_grad_(), f.clone().requires_grad_()
        out = impl(xr, fr)

        def run():
            torch.autograd.grad(out, (xr, fr), grad, retain_graph=True)
        return run

    row = {"size": size, "flops": flops}
    row["op_fwd"] = timeit(lambda: ops.adaptive_conv(x, f), repeats)
    row["ref_fwd"] = timeit(lambda: ops.adaptive_conv_reference(x, f), slow_repeats)
    row["unf_fwd"] = timeit(lambda: unfold_adaptive_conv(x, f), slow_repeats)
    row["op_bwd"] = timeit(backward(ops.adaptive_conv), repeats)
    row["ref_bwd"] = timeit(backward(ops.adaptive_conv_reference), slow_repeats)
    row["unf_bwd"] = timeit(backward(unfold_adaptive_conv), slow_repeats)
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[56, 112, 224])
    p.add_argument("--channels", type=int, default=384)
    p.add_argument("--k", type=int, default=7)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="56x56 only, fewer repeats")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats = [56], 3
    slow_repeats = max(1, args.repeats // 2)

    print(f"adaptive_conv benchmark: B=1, C={args.channels}, k={args.k}, float32, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, torch {torch.__version__}")
    print(f"backend: {ops.backend('cpu')}")
    mm = matmul_gflops(args.repeats)
    rows = [bench_size(s, args.channels, args.k, args.repeats, slow_repeats) for s in args.sizes]
    mm_after = matmul_gflops(args.repeats)
    mm = max(mm, mm_after)
    hdr = (f"{'size':>9} | {'op fwd ms':>9} {'ref fwd ms':>10} {'unfold fwd':>10} {'fwd x ref':>9} | "
           f"{'op bwd ms':>9} {'ref bwd ms':>10} {'unfold bwd':>10} {'bwd x ref':>9} | {'op GFLOP/s':>10} {'% matmul':>8}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        gf = r["flops"] / r["op_fwd"] / 1e9
        print(f"{r['size']:>4}x{r['size']:<4} | {r['op_fwd'] * 1e3:9.1f} {r['ref_fwd'] * 1e3:10.1f} "
              f"{r['unf_fwd'] * 1e3:10.1f} {r['ref_fwd'] / r['op_fwd']:8.1f}x | {r['op_bwd'] * 1e3:9.1f} "
              f"{r['ref_bwd'] * 1e3:10.1f} {r['unf_bwd'] * 1e3:10.1f} {r['ref_bwd'] / r['op_bwd']:8.1f}x | "
              f"{gf:10.1f} {100 * gf / mm:7.1f}%")
    print(f"fp32 matmul (2048x2048, same run, best of before/after): {mm:.1f} GFLOP/s")
    print("targets at 224x224: fwd >= 25x reference, bwd >= 10x autograd through reference, "
          "fwd >= 40% of matmul GFLOP/s")
    return rows


if __name__ == "__main__":
    main()
