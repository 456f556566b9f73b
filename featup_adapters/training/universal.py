"""Train ONE channel-agnostic upsampler (``UniversalJBUStack``) across several backbones.

    from featup_adapters.training.universal import train_universal
    up = train_universal(["efficientnet_lite0", "efficientnet_lite1"], "photos/train",
                         steps=4000, out_dir="runs/universal")
    neck = featup_adapters.wrap("timm:resnet18", upsampler="runs/universal")   # any backbone

The JBU stages' kernels depend only on the image and the multi-view loss (random projections of
the features) does not depend on the channel count, so one upsampler is shared by every backbone;
each backbone gets its own downsampler and scale net (those are channel-specific).  The objective
is ``train_upsampler``'s (``trainer.MultiViewObjective``: multi-view likelihood, CRF prior at
``crf_weight`` 0.001, LayerNorm over channels with ``use_norm``), with the same conventions:
pretrained backbones unless ``pretrained=False`` is said, all randomness of a step seeded from
``(seed, step)``, ``out_dir/checkpoints/last.pt`` (written atomically; optimizer, rng state and
history) from which ``resume`` continues exactly (a checkpoint of another backbone list is
refused), ``metrics.csv``, PCA snapshots per backbone, and ``save_pretrained(out_dir,
backbone_id="universal", ...)`` at the end, the backbones and training config in its ``extra``.

Schedule: round robin, step ``s`` trains on backbone ``s % len(backbones)`` (all share the batch
order).  A step costs what a single-backbone step costs and holds one backbone's graph in memory,
and every backbone contributes the same number of steps; summing all backbones each step would
multiply the per-step cost by their number for the same number of upsampler updates.  One
process only (no torchrun).
"""
from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from . import checkpoint as ckpt_mod
from . import distributed as D
from .downsamplers import make_downsampler
from .losses import ScaleNet, channel_norm
from .source import feature_source, release, source_id, source_layer
from .trainer import (MultiViewObjective, TrainConfig, _BatchOrder, _describe, _normalize,
                      _snapshot, _step_loss, _step_seed, _write_csv, optimizer_step,
                      resolve_downsampler_dropout)

__all__ = ["train_universal", "FORMAT", "UNIVERSAL_ID"]

logger = logging.getLogger("featup_adapters.training")

FORMAT = "featup_adapters.train-universal/1"
UNIVERSAL_ID = "universal"


def _split(entry, i: int):
    if isinstance(entry, tuple):
        if len(entry) != 2 or not (entry[1] is None or isinstance(entry[1], str)):
            raise ValueError(f"train_universal: expected backbones[{i}] as a backbone or a "
                             f"(backbone, layer) pair with a layer name or None, got {entry!r}")
        return entry
    return entry, None


def _universal_upsampler(upsampler) -> nn.Module:
    from ..upsamplers import UniversalJBUStack

    if upsampler is None:
        return UniversalJBUStack()
    if isinstance(upsampler, nn.Module) and getattr(upsampler, "universal", False):
        return upsampler
    raise ValueError(f"train_universal: expected upsampler=None or a universal upsampler (e.g. "
                     f"UniversalJBUStack; UniversalJBUStack.from_jbu_stack(stack) converts a "
                     f"JBUStack), got {type(upsampler).__name__}")


def train_universal(backbones, data=None, *, steps: int = 2000, batch_size: int = 4,
                    image_size=224, lr: float = 1e-3, out_dir: str | os.PathLike | None = None,
                    upsampler=None, n_jitters: int = 5, max_pad: int = 20, max_zoom: float = 2.0,
                    random_projection: int = 30, downsampler: str = "attention",
                    downsampler_dropout: float | None = None,
                    tv_weight: float = 0.0, crf_weight: float = 0.001, use_norm: bool = True,
                    seed: int = 0, checkpoint_every: int = 500, log_every: int = 50,
                    snapshots: bool = True, resume: str | os.PathLike | None = None,
                    amp: str | None = None, device=None, progress: bool = True,
                    clip_warmup_steps: int = 10, clip_warmup_norm: float = 1e-4,
                    hr_downscale: int = 1, history: list | None = None,
                    pretrained: bool | None = None) -> nn.Module:
    """Train one ``UniversalJBUStack`` on the features of every backbone in ``backbones``.

    Args:
        backbones: at least two distinct entries, each what ``train_upsampler`` takes as its
            backbone (a spec string, registered name, model or neck) or a ``(backbone, layer)``
            pair (layer None = the adapter's choice).
        upsampler: None for a fresh ``UniversalJBUStack()``, or a universal module to fine-tune.
        pretrained: applies to every spec string, as in ``train_upsampler`` (random-init
            backbones need ``pretrained=False`` said explicitly).
        Every other argument is ``train_upsampler``'s; ``image_size`` must be at least every
        backbone's stride, and ``hr_downscale`` divide every stride.

    Returns:
        The trained upsampler (eval mode); with ``out_dir`` also saved there
        (``featup_adapters.wrap(backbone, out_dir)`` for a backbone of any channel count).

    Raises:
        ValueError: before any training, for fewer than two backbones, the same backbone and
        layer twice, a backbone whose features cannot be found, bad sizes, or a ``resume``
        checkpoint of another backbone list.
    """
    from .._validate import check_float, check_int
    from ..data import _size_tuple, as_dataset

    if isinstance(backbones, (str, nn.Module)) or not isinstance(backbones, (list, tuple)):
        raise TypeError(f"train_universal: expected a list of backbones (specs, models or (backbone, "
                        f"layer) pairs), got {type(backbones).__name__}")
    entries = [_split(b, i) for i, b in enumerate(backbones)]
    if len(entries) < 2:
        raise ValueError(f"train_universal: expected at least 2 backbones (the universal upsampler "
                         f"learns from several), got {len(entries)}; for one backbone use "
                         f"train_upsampler (`featup-adapters train`)")
    steps = check_int("steps", steps, min=0)
    batch_size = check_int("batch_size", batch_size, min=1)
    n_jitters = check_int("n_jitters", n_jitters, min=1)
    checkpoint_every = check_int("checkpoint_every", checkpoint_every, min=1)
    log_every = check_int("log_every", log_every, min=1)
    d = hr_downscale = check_int("hr_downscale", hr_downscale, min=1)
    lr = check_float("lr", lr, positive=True)
    check_float("crf_weight", crf_weight, min=0)
    check_float("tv_weight", tv_weight, min=0)
    resolve_downsampler_dropout(downsampler_dropout, None)     # refused here if out of range
    if amp not in (None, "bf16"):
        raise ValueError(f"expected amp=None or 'bf16', got {amp!r}")
    if steps == 0:
        warnings.warn("train_universal: steps=0 trains nothing; the saved upsampler is untrained (marked "
                      "\"untrained\": true in its config)", RuntimeWarning, stacklevel=2)
    size = _size_tuple(image_size)
    cfg = TrainConfig(steps=steps, batch_size=batch_size, hr_downscale=hr_downscale,
                      image_size=size, lr=lr, n_jitters=n_jitters, max_pad=max_pad,
                      max_zoom=max_zoom, random_projection=random_projection,
                      downsampler=downsampler, tv_weight=tv_weight, crf_weight=float(crf_weight),
                      use_norm=bool(use_norm), clip_warmup_steps=clip_warmup_steps,
                      clip_warmup_norm=clip_warmup_norm, seed=seed, amp=amp)

    dist = D.setup(device)
    dev = dist.device
    srcs: list = []
    try:
        if dist.enabled:
            raise RuntimeError("train_universal runs in one process; start it without torchrun")
        # ---- everything that can be wrong is checked before the first step ----
        for b, layer in entries:
            srcs.append(feature_source(b, layer, pretrained=pretrained))
        info = []
        for (b, layer), src in zip(entries, srcs):
            bid = source_id(src)
            if getattr(src, "norm", None) is not None:
                raise ValueError(f"expected feature sources without their own LayerNorm (the trainer "
                                 f"applies it when use_norm=True), got a neck built with use_norm for {bid}")
            bp = getattr(src, "backbone_pretrained", None)
            if bp is False and pretrained is not False:
                raise ValueError(f"backbone {bid} is random-init; pass pretrained=False (--no-pretrained) "
                                 "to train on it anyway, or load it with its pretrained weights")
            stride = int(src.stride)
            if min(size) < stride:
                raise ValueError(f"expected image_size of at least every backbone's stride ({bid}: "
                                 f"{stride} px), got {size[0]}x{size[1]}")
            if size[0] % d or size[1] % d or stride % d:
                raise ValueError(f"expected hr_downscale to divide the image size {size[0]}x{size[1]} "
                                 f"and every stride ({bid}: {stride}), got {hr_downscale}")
            info.append({"backbone": b if isinstance(b, str) else type(b).__name__,
                         "backbone_id": bid, "layer": source_layer(src, layer),
                         "feature_dim": int(src.feature_dim), "stride": stride,
                         "backbone_pretrained": bp})
        keys = [(e["backbone_id"], e["layer"], e["feature_dim"]) for e in info]
        dup = next((k for i, k in enumerate(keys) if k in keys[:i]), None)
        if dup is not None:
            raise ValueError(f"train_universal: backbone {dup[0]} (layer {dup[1]!r}) is listed twice")
        kinds = {e["backbone_pretrained"] for e in info}
        backbone_pretrained = kinds.pop() if len(kinds) == 1 else None
        hr_size = (size[0] // d, size[1] // d)
        dataset = as_dataset(data, size, min_size=max(e["stride"] for e in info))
        start = _load_resume(resume, keys) if resume is not None else None
        cfg.downsampler_dropout = resolve_downsampler_dropout(
            downsampler_dropout, None if start is None else (start.get("config") or {}), resume)
        for src in srcs:
            if isinstance(src, nn.Module):
                src.to(dev)

        torch.manual_seed(seed)  # same initial weights for the same seed
        up = _universal_upsampler(upsampler)
        objective = nn.ModuleDict({
            "upsampler": up,
            "downsamplers": nn.ModuleList(make_downsampler(downsampler, e["feature_dim"],
                                                           e["stride"] // d,
                                                           cfg.downsampler_dropout)
                                          for e in info),
            "scale_nets": nn.ModuleList(ScaleNet(e["feature_dim"]) for e in info)}).to(dev)
        heads = [MultiViewObjective(up, ds, sn, tv_weight, crf_weight) for ds, sn in
                 zip(objective["downsamplers"], objective["scale_nets"])]
        optim = torch.optim.NAdam(objective.parameters(), lr=lr)
        step, rows = 0, []
        if start is not None:
            theirs = bool((start.get("config") or {}).get("use_norm", False))
            if theirs != bool(use_norm):
                raise ValueError(f"expected use_norm={theirs} as in the checkpoint being resumed "
                                 f"({resume}), got use_norm={bool(use_norm)}")
            objective.load_state_dict(start["model"])
            optim.load_state_dict(start["optimizer"])
            step, rows = int(start["step"]), list(start.get("history", []))
            ckpt_mod.set_rng_state(start["rng"])

        def feats_of(src):
            def feats(images):
                f = src.features(images).float()
                return channel_norm(f) if use_norm else f
            return feats

        feats = [feats_of(src) for src in srcs]
        out = Path(out_dir) if out_dir is not None else None
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
        order = _BatchOrder(len(dataset), seed)
        k = len(srcs)
        bar = None
        if progress and step < steps:
            from tqdm.auto import tqdm
            bar = tqdm(total=steps, initial=step, desc="train universal", unit="step",
                       dynamic_ncols=True)
        logger.info("training a universal upsampler on %s, %d images, %s, steps %d -> %d",
                    ", ".join(e["backbone_id"] for e in info), len(dataset),
                    f"{size[0]}x{size[1]}", step, steps)

        def save(at_step: int) -> None:
            state = {"format": FORMAT, "step": at_step, "backbones": info, "config": asdict(cfg),
                     "model": objective.state_dict(), "optimizer": optim.state_dict(),
                     "rng": ckpt_mod.rng_state(), "history": rows}
            ckpt_mod.atomic_save(state, out / "checkpoints" / "last.pt")
            _write_csv(out / "metrics.csv", rows)
            if snapshots:
                for i, src in enumerate(srcs):
                    _snapshot(feats[i], up, dataset, src.mean, src.std, dev,
                              out / "snapshots" / f"step_{at_step:06d}_{i}.png")

        objective.train()
        t_last, sums = time.perf_counter(), [[0.0, 0] for _ in range(k)]
        while step < steps:
            t0 = time.perf_counter()
            i = step % k
            s = _step_seed(seed, step, 0)
            g = torch.Generator().manual_seed(s)
            torch.manual_seed(s)  # dropout
            imgs = torch.stack([dataset.get(j, g) for j in order.batch(step, 0, 1, batch_size)])
            x = _normalize(imgs.to(dev), srcs[i].mean, srcs[i].std)
            loss = _step_loss(heads[i], feats[i], x, dim=info[i]["feature_dim"], hr_size=hr_size,
                              d=d, n_jitters=n_jitters, max_pad=max_pad, max_zoom=max_zoom,
                              random_projection=random_projection, amp=amp, generator=g)
            optimizer_step(loss, optim, objective.parameters(), step, clip_warmup_steps,
                           clip_warmup_norm, where=f" (backbone {info[i]['backbone_id']})")
            step += 1
            lv = float(loss.detach())
            sums[i][0] += lv
            sums[i][1] += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{lv:.4f}", backbone=i, s_per_step=f"{time.perf_counter() - t0:.2f}")
            if step % log_every == 0 or step == steps:
                n = sum(c for _, c in sums)
                row = {"step": step, "loss": round(sum(v for v, _ in sums) / n, 6),
                       "sec_per_step": round((time.perf_counter() - t_last) / n, 4),
                       **{f"loss_{j}": round(v / c, 6) if c else "" for j, (v, c) in enumerate(sums)}}
                rows.append(row)
                if history is not None:
                    history.append(dict(row))
                logger.info("step %d/%d  loss %.5f  %.2f s/step", step, steps, row["loss"],
                            row["sec_per_step"])
                if out is not None:
                    _write_csv(out / "metrics.csv", rows)
                t_last, sums = time.perf_counter(), [[0.0, 0] for _ in range(k)]
            if out is not None and (step % checkpoint_every == 0 or step == steps):
                save(step)
        if bar is not None:
            bar.close()
        up.eval()
        if out is not None:
            up.save_pretrained(out, backbone_id=UNIVERSAL_ID, use_norm=bool(use_norm), extra={
                "backbone_pretrained": backbone_pretrained, "backbones": info,
                **({"untrained": True} if step == 0 else {}),
                "training": {**asdict(cfg), "image_size": list(size), "final_step": step,
                             "schedule": "round-robin", "data": _describe(data),
                             "num_images": len(dataset)}})
        return up
    finally:
        for src in srcs:
            release(src)
        D.teardown(dist)


def _load_resume(resume, keys: list[tuple]) -> dict:
    path, ckpt = ckpt_mod.read_checkpoint(resume, FORMAT)
    theirs = [(e.get("backbone_id"), e.get("layer"), e.get("feature_dim"))
              for e in ckpt.get("backbones") or []]
    if theirs != keys:
        def fmt(ks):
            return ", ".join(f"{b} (layer {lyr!r}, {c} ch)" for b, lyr, c in ks) or "none"
        raise ValueError(f"--resume: checkpoint {str(path)!r} was trained on the backbones "
                         f"[{fmt(theirs)}], but this run uses [{fmt(keys)}] (same list, same order "
                         f"expected)")
    return ckpt
