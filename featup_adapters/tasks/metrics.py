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


def label_boundaries(labels: Tensor, ignore_index: int = 255) -> Tensor:
    """``BoolTensor[B, H, W]``: pixels whose right or lower neighbour has another label (pixels
    next to ``ignore_index`` are not boundaries). ``labels``: ``LongTensor[B, H, W]``."""
    b = torch.zeros_like(labels, dtype=torch.bool)
    valid = labels != ignore_index
    dx = (labels[:, :, 1:] != labels[:, :, :-1]) & valid[:, :, 1:] & valid[:, :, :-1]
    dy = (labels[:, 1:, :] != labels[:, :-1, :]) & valid[:, 1:, :] & valid[:, :-1, :]
    b[:, :, :-1] |= dx
    b[:, :-1, :] |= dy
    return b


class BoundaryMeter:
    """Boundary F-score with a tolerance: a predicted boundary pixel is correct if a true boundary
    lies within ``tolerance`` pixels (Chebyshev distance), and a true one is found if a predicted one
    does.  ``update(pred, target)`` with ``LongTensor[B, H, W]`` (or logits ``[B, K, H, W]``);
    ``compute() -> {"boundary_f", "boundary_precision", "boundary_recall"}``."""

    def __init__(self, tolerance: int = 2, ignore_index: int = 255):
        if tolerance < 0:
            raise ValueError(f"expected tolerance >= 0, got {tolerance}")
        self.tolerance, self.ignore_index = int(tolerance), int(ignore_index)
        self.matched_pred = self.n_pred = self.matched_true = self.n_true = 0

    def update(self, pred: Tensor, target: Tensor) -> None:
        import torch.nn.functional as F

        if pred.dim() == target.dim() + 1:
            pred = pred.argmax(1)
        if pred.shape != target.shape or target.dim() != 3:
            raise ValueError(f"expected pred and target of shape [B, H, W], got {list(pred.shape)} and "
                             f"{list(target.shape)}")
        pred = torch.where(target == self.ignore_index, torch.full_like(pred, self.ignore_index), pred)
        bp, bt = label_boundaries(pred, self.ignore_index), label_boundaries(target, self.ignore_index)
        k = 2 * self.tolerance + 1

        def dilate(b):
            return F.max_pool2d(b[:, None].float(), k, 1, self.tolerance)[:, 0] > 0

        self.matched_pred += int((bp & dilate(bt)).sum())
        self.n_pred += int(bp.sum())
        self.matched_true += int((bt & dilate(bp)).sum())
        self.n_true += int(bt.sum())

    def compute(self) -> Dict[str, float]:
        p = self.matched_pred / self.n_pred if self.n_pred else 0.0
        r = self.matched_true / self.n_true if self.n_true else float("nan")
        f = 2 * p * r / (p + r) if (p + r) > 0 else 0.0
        return {"boundary_f": f, "boundary_precision": p, "boundary_recall": r}
