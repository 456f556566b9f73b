"""How low can ANY upsampler push the held-out multi-view error?  An empirical floor.

For each held-out photo, a free high-resolution feature map (``C x H/d x W/d``, one value per pixel
and channel, no upsampler at all) is optimized directly to predict the backbone's features of
``--fit-views`` jittered views (the same jitters, fixed area-average downsampler and loss as
``training.evaluate.multiview_error``), starting from bilinear.  It is then scored by
``multiview_error`` itself on the evaluation's own views (seed 0), which the fit never saw.

Any upsampler's output is one such map.  On the views it was fitted to, the free map's error is
(up to the optimizer's convergence) the least any map reaches on them; the script prints it next
to bilinear's on the same views, and the held-out score next to the upsampler's and bilinear's:

    python scripts/multiview_ceiling.py --data ~/.cache/featup_adapters/photos/val --json out.json

``--fit upsampler`` fits a copy of the upsampler per photo instead of a free map (the same views
and loss): how low that architecture gets when it may specialize to each photo.  With
``--fit-params fixup`` only the stack's final C x C map is fitted, with ``--fit-params stages``
everything but it (the image-guided spatial kernels), which separates what spatial detail buys
from what a per-photo recalibration of the channels buys.  ``--shared`` fits one copy to all the
photos together, and ``--fit-data DIR`` fits that one copy on other photos (a training run with the
evaluation's own downsampler and loss) before scoring it on ``--data``.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F
from torch import nn

import featup_adapters
from featup_adapters.data import as_dataset
from featup_adapters.training.evaluate import multiview_error, target_spread, view_error, view_target
from featup_adapters.training.jitter import sample_jitter
from featup_adapters.training.trainer import _normalize
from featup_adapters.upsamplers import make_upsampler


class _Lookup(nn.Module):
    """An 'upsampler' that returns the fitted map of the guidance image it is given."""

    def __init__(self):
        super().__init__()
        self.maps = {}

    @staticmethod
    def key(x):
        return hash(x.detach().contiguous().numpy().tobytes())

    def forward(self, source, guidance, output_size):
        return torch.stack([self.maps[self.key(g)] for g in guidance])


def _trainable_copy(upsampler, params, lr):
    """A train-mode copy of ``upsampler`` whose ``params`` ("all", "fixup": the stack's final
    C x C map, "stages": everything else) require grad, and an Adam optimizer over them."""
    import copy

    up = copy.deepcopy(upsampler).train()
    chosen = []
    for name, q in up.named_parameters():
        final = name.startswith("fixup_proj.")
        q.requires_grad_(params == "all" or (params == "fixup") == final)
        if q.requires_grad:
            chosen.append(q)
    if not chosen:
        raise SystemExit(f"--fit-params {params}: the upsampler has no such parameters")
    return up, torch.optim.Adam(chosen, lr=lr)


def _fit_targets(neck, x, d, fit_views, seed):
    H, W = x.shape[-2] // d, x.shape[-1] // d
    with torch.no_grad():
        src = neck.features(x).float()
        g = torch.Generator().manual_seed(seed)
        views = [sample_jitter((H, W), 20 // d, 2.0, generator=g) for _ in range(fit_views)]
        targets = [view_target(neck, x, t, d) for t in views]
    den = sum(float(target_spread(t)) for t in targets)
    return src, views, targets, den


def _views_loss(hr, views, targets, k):
    """The evaluation's own per-view error (``view_error``), summed over the fit's views."""
    return sum(view_error(hr, t, target, k) for t, target in zip(views, targets))


def fit_upsampler(neck, x, d, fit_views, steps, lr, seed, params="all"):
    """Fit a copy of ``neck.upsampler`` to one photo's views; returns (its map, fit-error curve,
    the fitted copy).

    ``fit_upsampler_shared`` with the one photo: the same fit as ``fit_map``, but the map is
    constrained to what the upsampler's architecture can produce from ``F(x)`` and the image:
    how low THIS architecture gets when it may specialize to the photo (a per-image bound for a
    feed-forward upsampler of that design).
    """
    up, curve = fit_upsampler_shared(neck, [x], d, fit_views, steps, lr, [seed], params)
    H, W = x.shape[-2] // d, x.shape[-1] // d
    with torch.no_grad():
        hr = up(neck.features(x).float(), x, output_size=(H, W)).float()
    return hr[0], curve, up


def fit_upsampler_shared(neck, xs, d, fit_views, steps, lr, seeds, params="all"):
    """Fit ONE copy of ``neck.upsampler`` to the views of all the photos ``xs`` at once; returns
    (the fitted copy, fit-error curve).  Scored on the evaluation's other views of the same photos,
    it is what one set of weights (a released upsampler) could reach on them at best: it has been
    trained on views of the very photos it is tested on."""
    k = int(neck.stride) // d
    H, W = xs[0].shape[-2] // d, xs[0].shape[-1] // d
    fits = [_fit_targets(neck, x, d, fit_views, seed) for x, seed in zip(xs, seeds)]
    den = sum(f[3] for f in fits)
    up, opt = _trainable_copy(neck.upsampler, params, lr)
    curve = []
    for _ in range(steps):
        opt.zero_grad()
        total = 0.0
        for x, (src, views, targets, _) in zip(xs, fits):   # one photo's graph at a time
            loss = _views_loss(up(src, x, output_size=(H, W)), views, targets, k) / den
            loss.backward()
            total += float(loss.detach())
        curve.append(total)
        opt.step()
    return up.eval(), curve


def fit_map(neck, x, d, fit_views, steps, lr, seed):
    """Fit one free map for the normalized image ``x[1, 3, H, W]``; returns (map, fit error)."""
    k = int(neck.stride) // d
    H, W = x.shape[-2] // d, x.shape[-1] // d
    src, views, targets, den = _fit_targets(neck, x, d, fit_views, seed)
    hr = F.interpolate(src, size=(H, W), mode="bilinear", align_corners=False).clone().requires_grad_(True)
    opt = torch.optim.Adam([hr], lr=lr)
    curve = []
    for _ in range(steps):
        opt.zero_grad()
        loss = _views_loss(hr, views, targets, k)
        (loss / den).backward()
        curve.append(float(loss.detach()) / den)
        opt.step()
    return hr.detach()[0], curve


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--upsampler", default="auto", help="whose use_norm the features follow")
    p.add_argument("--data", default="embedded:val")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--factor", type=int, default=16)
    p.add_argument("--views", type=int, default=8, help="evaluation views (as eval)")
    p.add_argument("--fit-views", type=int, default=64)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--fit", choices=("map", "upsampler"), default="map",
                   help="fit a free map per photo, or a copy of the upsampler per photo")
    p.add_argument("--fit-params", choices=("all", "fixup", "stages"), default="all",
                   help="with --fit upsampler: which of its parameters the fit may change "
                        "(fixup = the final C x C map, stages = everything else)")
    p.add_argument("--shared", action="store_true",
                   help="with --fit upsampler: one copy fitted to all the photos' views together "
                        "(the best one set of weights could do on them), not one per photo")
    p.add_argument("--fit-data", default=None,
                   help="with --shared: fit on these photos instead of the evaluated ones (then "
                        "the score is on photos the fit never saw: a training run with the "
                        "evaluation's own downsampler and loss)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if a.fit_data and not a.shared:
        p.error("--fit-data: fits one upsampler on other photos; add --fit upsampler --shared")
    if a.shared and a.fit != "upsampler":
        p.error("--shared: fits an upsampler; add --fit upsampler")
    torch.manual_seed(0)
    neck = featup_adapters.wrap(a.backbone, a.upsampler).eval()
    d = int(neck.stride) // a.factor
    ds = as_dataset(a.data, a.image_size, min_size=int(neck.stride))
    images = torch.stack([ds[i] for i in range(len(ds))])
    oracle = _Lookup()
    fit_errs = []
    start = "bilinear" if a.fit == "map" else "the upsampler"
    if a.shared:
        fit_images = images
        if a.fit_data:
            fds = as_dataset(a.fit_data, a.image_size, min_size=int(neck.stride))
            fit_images = torch.stack([fds[i] for i in range(len(fds))])
        xs = [_normalize(fit_images[i:i + 1].float(), neck.mean, neck.std)
              for i in range(len(fit_images))]
        oracle, curve = fit_upsampler_shared(neck, xs, d, a.fit_views, a.steps, a.lr,
                                             [1000 + i for i in range(len(xs))], params=a.fit_params)
        fit_errs.append({"start": curve[0], "fitted": curve[-1], "curve": curve[::10]})
        print(f"all {len(xs)} photos: fit-view error {start} {curve[0]:.4f} -> {curve[-1]:.4f} "
              f"({curve[-1] / curve[0]:.3f}x; every 10 steps {[round(c, 4) for c in curve[::10]]})",
              file=sys.stderr, flush=True)
    for i in range(0 if a.shared else images.shape[0]):
        x = _normalize(images[i:i + 1].float(), neck.mean, neck.std)
        if a.fit == "map":
            m, curve = fit_map(neck, x, d, a.fit_views, a.steps, a.lr, seed=1000 + i)
        else:
            m, curve, _ = fit_upsampler(neck, x, d, a.fit_views, a.steps, a.lr, seed=1000 + i,
                                        params=a.fit_params)
        oracle.maps[_Lookup.key(x[0])] = m
        fit_errs.append({"start": curve[0], "fitted": curve[-1], "curve": curve[::10]})
        print(f"photo {i + 1}/{len(ds)}: fit-view error {start} {curve[0]:.4f} -> {curve[-1]:.4f} "
              f"({curve[-1] / curve[0]:.3f}x; every 10 steps {[round(c, 4) for c in curve[::10]]})",
              file=sys.stderr, flush=True)
    res = {}
    fitted = ("free map (fitted)" if a.fit == "map" else
              "upsampler fitted (shared)" if a.shared else "upsampler fitted")
    for name, m in ((fitted, oracle), ("upsampler", neck.upsampler),
                    ("bilinear", make_upsampler("bilinear"))):
        res[name] = multiview_error(neck, m, images, n_views=a.views, seed=0, hr_downscale=d)
    print(f"{'method':<26} {'mv error':>9} {'x bilinear':>10}")
    for name, v in res.items():
        print(f"{name:<26} {v:9.4f} {v / res['bilinear']:10.3f}")
    fb = sum(e["start"] for e in fit_errs) / len(fit_errs)
    ff = sum(e["fitted"] for e in fit_errs) / len(fit_errs)
    print(f"on the fitted views themselves (mean over fits): {start} {fb:.4f}, {fitted} {ff:.4f} "
          f"({ff / fb:.3f}x)")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"multiview_error": res, "fit_view_error": fit_errs, "args": vars(a)}, fh, indent=1)
    neck.remove()
    return 0


if __name__ == "__main__":
    sys.exit(main())
