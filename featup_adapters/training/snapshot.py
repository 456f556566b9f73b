"""PCA snapshots for training logs: image | low-res features | upsampled features, as one PNG.

The first three principal components of the low-res features are fitted once and applied to both
maps, so colours are comparable across the two.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .._io import atomic_write


def _pca_basis(feats: Tensor, k: int = 3) -> tuple[Tensor, Tensor]:
    x = feats.permute(1, 0, 2, 3).reshape(feats.shape[1], -1).T.float()    # [N, C]
    mean = x.mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(x - mean, full_matrices=False)
    return mean, v[:k].T                                                   # [1, C], [C, k]


def _apply(feats: Tensor, mean: Tensor, basis: Tensor, lo: Tensor, hi: Tensor) -> np.ndarray:
    C, H, W = feats.shape[1:]
    x = feats[0].reshape(C, -1).T.float()
    y = (x - mean) @ basis
    y = ((y - lo) / (hi - lo).clamp_min(1e-8)).clamp(0, 1)
    if y.shape[1] < 3:
        y = torch.cat([y, y.new_zeros(y.shape[0], 3 - y.shape[1])], 1)
    return (y.T.reshape(3, H, W).permute(1, 2, 0).numpy() * 255).astype(np.uint8)


def pca_snapshot(image: Tensor, lowres: Tensor, hires: Tensor, path: str | os.PathLike,
                 mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)) -> Path:
    """Write ``[image | PCA(lowres) | PCA(hires)]`` for the first batch item to ``path`` (PNG).

    Args:
        image: ``Tensor[B, 3, H, W]`` normalized with ``mean``/``std``.
        lowres: ``Tensor[B, C, h, w]``; hires: ``Tensor[B, C, H', W']``.
    """
    from PIL import Image

    image, lowres, hires = (t.detach().cpu()[:1].float() for t in (image, lowres, hires))
    H, W = image.shape[-2:]
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    rgb = ((image * s + m).clamp(0, 1)[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    mean_, basis = _pca_basis(lowres)
    proj = (lowres[0].reshape(lowres.shape[1], -1).T - mean_) @ basis
    lo, hi = proj.quantile(0.01, dim=0), proj.quantile(0.99, dim=0)
    lr = F.interpolate(lowres, size=(H, W), mode="nearest")
    hr = F.interpolate(hires, size=(H, W), mode="bilinear", align_corners=False)
    panel = np.concatenate([rgb, _apply(lr, mean_, basis, lo, hi), _apply(hr, mean_, basis, lo, hi)],
                           axis=1)
    with atomic_write(path, "wb") as f:
        Image.fromarray(panel).save(f, format="PNG")
    return Path(path)
