"""Semantic segmentation metrics: confusion matrix, per-class IoU, mIoU, pixel accuracy."""
from __future__ import annotations

from typing import Dict

import torch
from torch import Tensor

__all__ = ["confusion_matrix", "scores_from_confusion", "SegMeter"]


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """Counts ``conf[t, p]`` of pixels with label ``t`` predicted as ``p``; ``ignore_index`` pixels skipped.

    Args:
        pred: ``LongTensor[...]`` predicted class per pixel (e.g. ``[B, H, W]``).
        target: ``LongTensor[...]`` same shape, labels in ``[0, num_classes)`` or ``ignore_index``.
    Returns:
        ``LongTensor[num_classes, num_classes]``.
    """
    if pred.shape != target.shape:
        raise ValueError(f"expected prediction and target of the same shape, got {list(pred.shape)} "
                         f"and {list(target.shape)}")
    valid = target != ignore_index
    t, p = target[valid].long(), pred[valid].long()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        raise ValueError(f"expected labels in [0, {num_classes}) or {ignore_index}, got values in "
                         f"[{int(t.min())}, {int(t.max())}]")
    if p.numel() and (int(p.min()) < 0 or int(p.max()) >= num_classes):
        raise ValueError(f"expected predictions in [0, {num_classes}), got values in [{int(p.min())}, {int(p.max())}]")
    return torch.bincount(t * num_classes + p, minlength=num_classes ** 2).view(num_classes, num_classes).cpu()


def scores_from_confusion(conf: Tensor) -> Dict[str, object]:
    """mIoU (mean over classes that occur in the labels or the predictions), pixel accuracy, per-class IoU.

    ``IoU_c = TP / (TP + FP + FN)``; a class absent from both labels and predictions has no IoU
    (``nan`` in ``"iou"``) and is left out of the mean.
    """
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))
    present = union > 0
    total = conf.sum()
    return {
        "miou": float(iou[present].mean()) if bool(present.any()) else float("nan"),
        "pixel_acc": float(tp.sum() / total) if total > 0 else float("nan"),
        "iou": iou.tolist(),
    }


class SegMeter:
    """Accumulates a confusion matrix over batches: ``update(logits_or_pred, target)``, then ``compute()``."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes, self.ignore_index = int(num_classes), int(ignore_index)
        self.conf = torch.zeros(self.num_classes, self.num_classes, dtype=torch.long)

    def update(self, pred: Tensor, target: Tensor) -> None:
        """``pred``: ``Tensor[B, K, H, W]`` logits or ``LongTensor[B, H, W]`` classes; ``target``: ``[B, H, W]``."""
        if pred.dim() == target.dim() + 1:
            pred = pred.argmax(1)
        self.conf += confusion_matrix(pred, target, self.num_classes, self.ignore_index)

    def compute(self) -> Dict[str, object]:
        return scores_from_confusion(self.conf)
