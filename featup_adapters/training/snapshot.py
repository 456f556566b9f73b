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
from ..viz import pca_rgb


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
    lr = F.interpolate(lowres, size=(H, W), mode="nearest")
    hr = F.interpolate(hires, size=(H, W), mode="bilinear", align_corners=False)
    # the projection is fitted once on the low-res map and applied to both (viz.pca_rgb)
    _, lr_rgb, hr_rgb = pca_rgb(lowres, lr, hr, fit_on=0)
    panel = np.concatenate([rgb, lr_rgb, hr_rgb], axis=1)
    with atomic_write(path, "wb") as f:
        Image.fromarray(panel).save(f, format="PNG")
    return Path(path)
