"""Benchmark of featup_adapters.ops.bicubic_pad (bicubic resize + reflect pad) on the CPU.

Side by side in one run, at the JBU stack's stage sizes (C=384, 2x per stage, r=3): the op,
``F.interpolate`` + ``F.pad``, and the dense-matrix formulation the stack used before the op
(two matrix products with precomputed interpolation matrices whose rows follow the padding).
Forward and backward; the largest size is skipped when its tensors do not fit in free memory.

    python benchmarks/bicubic_pad.py [--sizes 112 224 512 1024] [--channels 384] [--repeats N]
"""
from __future__ import annotations

import argparse
import math
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from featup_adapters import ops
from featup_adapters.ops.resize import pad2d, pad_mode

_A = -0.75


def _dense_matrix(n_in, n_out, r, mode):
    """[n_out + 2r, n_in]: row i interpolates padded output position i - r (the old path)."""
    def near(t):
        return ((_A + 2) * t - (_A + 3)) * t * t + 1

    def far(t):
        return ((_A * t - 5 * _A) * t + 8 * _A) * t - 4 * _A

    scale = n_in / n_out
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for o in range(n_out):
        x = (o + 0.5) * scale - 0.5
        f = math.floor(x)
        t = x - f
        for k, wk in enumerate((far(t + 1), near(t), near(1 - t), far(2 - t))):
            m[o, min(max(f - 1 + k, 0), n_in - 1)] += wk
    if mode == "reflect":
        rows = [*range(r, 0, -1), *range(n_out), *range(n_out - 2, n_out - 2 - r, -1)]
    else:
        rows = [0] * r + list(range(n_out)) + [n_out - 1] * r
    return m[rows]


def dense_bicubic_pad(x, size, r, mats=None):
    B, C, h, w = x.shape
    H, W = size
    if mats is None:
        mode = pad_mode(H, W, r)
        mats = (_dense_matrix(h, H, r, mode).to(x.dtype), _dense_matrix(w, W, r, mode).to(x.dtype))
    mh, mw = mats
    y = torch.matmul(x.reshape(B * C * h, w), mw.t())
    return torch.matmul(mh, y.view(B, C, h, W + 2 * r))


def interpolate_pad(x, size, r):
    return pad2d(F.interpolate(x, size, mode="bicubic", align_corners=False), r)


def timeit(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def free_bytes():
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info["MemAvailable"]
    except (OSError, KeyError, ValueError):
        return None


def bench(h, C, r, repeats, with_dense):
    H = W = 2 * h
    x = torch.randn(1, C, h, h)
    row = {"h": h}
    row["op"] = timeit(lambda: ops.bicubic_pad(x, (H, W), r), repeats)
    row["ref"] = timeit(lambda: interpolate_pad(x, (H, W), r), repeats)
    if with_dense:
        t = time.perf_counter()
        mats = (_dense_matrix(h, H, r, "reflect"), _dense_matrix(h, H, r, "reflect"))
        row["dense_tables"] = time.perf_counter() - t
        mats = tuple(m.float() for m in mats)
        row["dense"] = timeit(lambda: dense_bicubic_pad(x, (H, W), r, mats), repeats)
    g = torch.randn(1, C, H + 2 * r, W + 2 * r)
    xr = x.clone().requires_grad_()
    row["op_bwd"] = timeit(lambda: torch.ops.featup_adapters.bicubic_pad_backward(g, [h, h], r), repeats)
    out_ref = interpolate_pad(xr, (H, W), r)
    row["ref_bwd"] = timeit(lambda: torch.autograd.grad(out_ref, xr, g, retain_graph=True), repeats)
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[112, 224, 512, 1024], help="source sides")
    p.add_argument("--channels", type=int, default=384)
    p.add_argument("--r", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dense-max", type=int, default=512, help="largest source side for the dense path")
    args = p.parse_args(argv)
    print(f"bicubic_pad benchmark: B=1, C={args.channels}, 2x, r={args.r}, float32, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, torch {torch.__version__}")
    print(f"{'source -> output':>18} | {'op ms':>8} {'interp+pad':>10} {'dense ms':>9} {'(tables)':>9} | "
          f"{'op bwd':>8} {'autograd':>9} | {'x interp':>8} {'x dense':>8}")
    for h in args.sizes:
        out_bytes = args.channels * (2 * h + 2 * args.r) ** 2 * 4
        free = free_bytes()
        if free is not None and 4.5 * out_bytes > free:
            print(f"{h:>6} -> {2 * h:<9} | skipped: needs ~{4.5 * out_bytes / 2**30:.1f} GiB, "
                  f"{free / 2**30:.1f} GiB available")
            continue
        r = bench(h, args.channels, args.r, args.repeats, h <= args.dense_max)
        dense = f"{r['dense'] * 1e3:9.1f} {r['dense_tables'] * 1e3:9.1f}" if "dense" in r else f"{'-':>9} {'-':>9}"
        xd = f"{r['dense'] / r['op']:7.2f}x" if "dense" in r else f"{'-':>8}"
        print(f"{h:>6} -> {2 * h:<9} | {r['op'] * 1e3:8.1f} {r['ref'] * 1e3:10.1f} {dense} | "
              f"{r['op_bwd'] * 1e3:8.1f} {r['ref_bwd'] * 1e3:9.1f} | {r['ref'] / r['op']:7.2f}x {xd}")


if __name__ == "__main__":
    main()
