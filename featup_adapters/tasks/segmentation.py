"""End-to-end semantic segmentation on upsampled features: ``wrap(backbone)`` + a small head.

    model = build_segmentation_model("efficientnet_lite0", num_classes=21, upsampler="jbu")
    history = finetune(model, train_set, steps=2000, val_data=val_set, out_dir="runs/seg")
    print(evaluate(model, val_set))          # {"miou": ..., "pixel_acc": ..., "iou": [...]}

Cross-entropy at image resolution flows through the head, the upsampler (JBU parameters and the
adaptive-convolution op) and, unless frozen, the backbone. Datasets yield
``(Tensor[3, H, W] in [0, 1], LongTensor[H, W])`` with 255 = ignore (see ``seg_data``).
"""
from __future__ import annotations

import math
import os
import time
from typing import Callable, Dict, List, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .._io import atomic_torch_save as _atomic_torch_save
from .metrics import SegMeter
from .seg_data import IGNORE_INDEX

__all__ = ["SegmentationModel", "build_segmentation_model", "finetune", "evaluate", "save_checkpoint",
           "load_checkpoint", "HEADS"]

HEADS = ("linear", "conv")


class SegmentationModel(nn.Module):
    """A FeatUp neck (backbone + upsampler) and a per-pixel classifier.

    Args:
        neck: a ``featup_adapters.FeatUpNeck``.
        num_classes: K.
        head: "linear" (1x1 conv, FeatUp's probe head) or "conv" (3x3 conv + BN + ReLU, then 1x1).
        freeze_backbone: no gradients for the backbone; it stays in eval mode (BatchNorm statistics).
        hidden: channels of the "conv" head.

    ``forward(images: Tensor[B, 3, H, W] in [0, 1]) -> logits Tensor[B, K, H, W]``; the images are
    normalized with the backbone's own mean/std first (that normalized tensor is the JBU guidance).
    """

    def __init__(self, neck: nn.Module, num_classes: int, *, head: str = "linear", freeze_backbone: bool = True,
                 hidden: int = 128):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"expected head in {list(HEADS)}, got {head!r}")
        if int(num_classes) < 2:
            raise ValueError(f"expected num_classes >= 2, got {num_classes}")
        self.neck, self.num_classes, self.head_kind = neck, int(num_classes), head
        self.freeze_backbone = bool(freeze_backbone)
        dim = int(neck.feature_dim)
        if head == "linear":
            self.head = nn.Conv2d(dim, self.num_classes, 1)
        else:
            self.head = nn.Sequential(nn.Conv2d(dim, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden),
                                      nn.ReLU(inplace=True), nn.Conv2d(hidden, self.num_classes, 1))
        self.register_buffer("mean", torch.tensor([float(v) for v in neck.mean]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([float(v) for v in neck.std]).view(1, 3, 1, 1), persistent=False)
        if self.freeze_backbone:
            for p in neck.backbone.parameters():
                p.requires_grad_(False)
            neck.backbone.eval()

    def train(self, mode: bool = True) -> "SegmentationModel":
        super().train(mode)
        if self.freeze_backbone:
            self.neck.backbone.eval()
        return self

    def normalize(self, images: Tensor) -> Tensor:
        """``Tensor[B, 3, H, W]`` in [0, 1] -> normalized with the backbone's mean/std."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape [B, 3, H, W], got {list(images.shape)}")
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)

    def forward(self, images: Tensor) -> Tensor:
        feats = self.neck(self.normalize(images))
        logits = self.head(feats)
        if logits.shape[-2:] != images.shape[-2:]:
            logits = F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return logits

    def trainable_state_dict(self) -> Dict[str, Tensor]:
        """State of what training changes (head, upsampler, norm, and the backbone unless frozen)."""
        sd = self.state_dict()
        if self.freeze_backbone:
            sd = {k: v for k, v in sd.items() if not k.startswith("neck.backbone.")}
        return sd


def build_segmentation_model(backbone: Union[str, nn.Module] = "efficientnet_lite0", num_classes: int = 21, *,
                             upsampler: Union[str, nn.Module] = "jbu", head: str = "linear",
                             freeze_backbone: bool = True, layer: Optional[str] = None,
                             pretrained: Union[None, bool, str] = None, hidden: int = 128,
                             **backbone_kwargs) -> SegmentationModel:
    """``wrap(backbone, upsampler)`` + a head. ``backbone``: module or spec ("timm:NAME", "hf:ID",
    "open_clip:NAME", registered name); ``upsampler``: "jbu" (new, trainable), "bilinear", "auto",
    a directory / registered name, or a module. ``pretrained`` is passed to ``create_backbone``."""
    import featup_adapters
    from featup_adapters.adapters import create_backbone

    if isinstance(backbone, str):
        backbone = create_backbone(backbone, pretrained=pretrained, **backbone_kwargs)
    elif backbone_kwargs or pretrained is not None:
        raise TypeError("pretrained= and backbone kwargs apply to a backbone spec string, not to a module")
    neck = featup_adapters.wrap(backbone, upsampler, layer=layer)
    return SegmentationModel(neck, num_classes, head=head, freeze_backbone=freeze_backbone, hidden=hidden)


class _EpochBatches(torch.utils.data.Sampler):
    """Endless batches of a fresh seeded permutation per epoch, starting after ``skip`` batches.

    Batch ``n`` depends only on ``(seed, n)``, so a resumed run sees the batches an uninterrupted
    run would have seen."""

    def __init__(self, n: int, batch_size: int, drop_last: bool, seed: int, skip: int = 0):
        self.n, self.batch_size, self.seed, self.skip = n, batch_size, seed, skip
        self.per_epoch = n // batch_size if drop_last else -(-n // batch_size)

    def __iter__(self):
        epoch, first = divmod(self.skip, self.per_epoch)
        while True:
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
            for b in range(first, self.per_epoch):
                yield perm[b * self.batch_size:(b + 1) * self.batch_size].tolist()
            epoch, first = epoch + 1, 0


def save_checkpoint(model: SegmentationModel, path: str, *, step: int = 0, extra: Optional[dict] = None,
                    optimizer: Optional[torch.optim.Optimizer] = None, scheduler=None) -> str:
    """Write ``{"model": trainable state, "step", "config"}`` to ``path`` atomically; returns ``path``.

    With ``optimizer`` (and ``scheduler``) it also holds their states and the torch random state, so
    that ``finetune(..., resume=path)`` continues the run exactly."""
    config = {"num_classes": model.num_classes, "head": model.head_kind, "freeze_backbone": model.freeze_backbone,
              "backbone_id": getattr(model.neck, "backbone_id", None), "feature_dim": int(model.neck.feature_dim),
              "upsampler": type(model.neck.upsampler).__name__}
    config.update(extra or {})
    ckpt = {"model": model.trainable_state_dict(), "step": int(step), "config": config}
    if optimizer is not None:
        ckpt["optimizer"] = optimizer.state_dict()
        ckpt["scheduler"] = scheduler.state_dict() if scheduler is not None else None
        ckpt["rng"] = {"cpu": torch.get_rng_state(),
                       "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    _atomic_torch_save(ckpt, path)
    return path


def load_checkpoint(model: SegmentationModel, path: str) -> dict:
    """Load a checkpoint written by ``save_checkpoint`` into ``model`` (strict on the saved keys)."""
    from .._format import CheckpointError
    from ..hub import safe_torch_load

    try:
        ckpt = safe_torch_load(path, map_location="cpu", metadata_stand_ins=False)
    except CheckpointError as exc:
        raise CheckpointError(f"--resume: {exc}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError(f"expected a featup_adapters segmentation checkpoint at {path}, got "
                         f"{type(ckpt).__name__} without a 'model' entry")
    own = model.state_dict()
    unknown = [k for k in ckpt["model"] if k not in own]
    missing = [k for k in model.trainable_state_dict() if k not in ckpt["model"]]
    if unknown or missing:
        raise ValueError(f"checkpoint {path} does not match the model: unknown keys {unknown[:5]}, "
                         f"missing keys {missing[:5]}")
    model.load_state_dict(ckpt["model"], strict=False)
    return ckpt


@torch.no_grad()
def evaluate(model: SegmentationModel, data: Dataset, *, batch_size: int = 4, device: Union[str, torch.device] = "cpu",
             num_workers: int = 0, ignore_index: int = IGNORE_INDEX) -> Dict[str, object]:
    """mIoU, pixel accuracy and per-class IoU of ``model`` on ``data`` (at label resolution)."""
    was_training = model.training
    model.eval().to(device)
    meter = SegMeter(model.num_classes, ignore_index)
    # a private generator: creating the loader must not draw from the global random state
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        generator=torch.Generator().manual_seed(0))
    for images, masks in loader:
        logits = model(images.to(device))
        meter.update(logits.argmax(1).cpu(), masks)
    model.train(was_training)
    return meter.compute()


def finetune(model: SegmentationModel, train_data: Dataset, *, steps: int = 1000, batch_size: int = 4,
             lr: float = 1e-2, upsampler_lr_mult: float = 0.1, backbone_lr_mult: float = 0.01,
             weight_decay: float = 1e-4,
             val_data: Optional[Dataset] = None, eval_every: int = 0, out_dir: Optional[str] = None,
             save_every: int = 0, device: Union[str, torch.device] = "cpu", num_workers: int = 0,
             seed: int = 0, progress: bool = True, ignore_index: int = IGNORE_INDEX,
             log: Optional[Callable[[str], None]] = None, resume: Optional[str] = None) -> Dict[str, object]:
    """Train ``model`` with per-pixel cross-entropy (AdamW, cosine schedule) for ``steps`` batches.

    Gradients reach the head (at ``lr``), the upsampler (``lr * upsampler_lr_mult``; FeatUp trains its
    JBU at 1e-3) and, unless frozen, the backbone (``lr * backbone_lr_mult``).
    With ``out_dir``: ``checkpoint_last.pt`` every ``save_every`` steps and at the end, and the trained
    upsampler via its ``save_pretrained(out_dir/"upsampler")`` when it has one.
    ``resume``: a ``checkpoint_last.pt`` of an earlier call with the same data, ``seed`` and
    ``batch_size``; training continues after its step with the weights, optimizer, schedule,
    random state and data order of that run, so with the same ``steps`` the result equals an
    uninterrupted run (a larger ``steps`` extends it, the cosine schedule then spans the new total).
    Returns ``{"losses": [per step run here], "val": [(step, metrics), ...], "seconds": float,
    "first_step": int}``.
    """
    if steps < 1:
        raise ValueError(f"expected steps >= 1, got {steps}")
    if len(train_data) == 0:
        raise ValueError("expected a non-empty training dataset, got 0 samples")
    torch.manual_seed(seed)
    model.to(device).train()
    backbone_params = [p for p in model.neck.backbone.parameters() if p.requires_grad]
    up_params = [p for p in model.neck.upsampler.parameters() if p.requires_grad]
    taken = {id(p) for p in backbone_params + up_params}
    other = [p for p in model.parameters() if p.requires_grad and id(p) not in taken]
    groups = [{"params": other, "lr": lr}]
    if up_params:
        groups.append({"params": up_params, "lr": lr * upsampler_lr_mult})
    if backbone_params:
        groups.append({"params": backbone_params, "lr": lr * backbone_lr_mult})
    opt = torch.optim.AdamW(groups, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    done = 0
    if resume is not None:
        done = _resume(model, opt, sched, resume, steps)
    batches = iter(DataLoader(
        train_data, num_workers=num_workers, generator=torch.Generator().manual_seed(seed),
        batch_sampler=_EpochBatches(len(train_data), batch_size, len(train_data) >= batch_size, seed, skip=done)))
    losses: List[float] = []
    val: List[tuple] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="finetune-seg", unit="step")
    t0 = time.perf_counter()
    if bar is not None:
        bar.update(done)
    for step in range(done + 1, steps + 1):
        images, masks = next(batches)
        images, masks = images.to(device), masks.to(device)
        logits = model(images)
        loss = F.cross_entropy(logits, masks, ignore_index=ignore_index)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if val_data is not None and eval_every and step % eval_every == 0 and step != steps:
            m = evaluate(model, val_data, batch_size=batch_size, device=device, num_workers=num_workers)
            val.append((step, m))
            if log:
                log(f"step {step}: val mIoU {m['miou']:.4f} pixel acc {m['pixel_acc']:.4f}")
        if out_dir and save_every and step % save_every == 0:
            save_checkpoint(model, os.path.join(out_dir, "checkpoint_last.pt"), step=step, optimizer=opt,
                            scheduler=sched)
    if bar is not None:
        bar.close()
    if val_data is not None:
        m = evaluate(model, val_data, batch_size=batch_size, device=device, num_workers=num_workers)
        val.append((steps, m))
        if log:
            log(f"step {steps}: val mIoU {m['miou']:.4f} pixel acc {m['pixel_acc']:.4f}")
    if out_dir:
        save_checkpoint(model, os.path.join(out_dir, "checkpoint_last.pt"), step=steps, optimizer=opt,
                        scheduler=sched)
        up = model.neck.upsampler
        if hasattr(up, "save_pretrained") and any(True for _ in up.parameters()):
            up.save_pretrained(os.path.join(out_dir, "upsampler"), backbone_id=getattr(model.neck, "backbone_id", None),
                               layer=getattr(model.neck, "layer", None))
    return {"losses": losses, "val": val, "seconds": time.perf_counter() - t0, "first_step": done + 1}


def _resume(model: SegmentationModel, opt, sched, path: str, steps: int) -> int:
    """Load a finetune checkpoint into the model, optimizer, schedule and random state; its step."""
    ckpt = load_checkpoint(model, path)
    if ckpt.get("optimizer") is None:
        raise ValueError(f"cannot resume from {path}: it holds model weights only (expected a "
                         "checkpoint_last.pt written by finetune, with optimizer state)")
    done = int(ckpt["step"])
    if done > steps:
        raise ValueError(f"cannot resume from {path}: it is at step {done}, beyond steps={steps}")
    opt.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scheduler") is not None:
        sched.load_state_dict(ckpt["scheduler"])
    torch.set_rng_state(ckpt["rng"]["cpu"])
    if ckpt["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    return done
