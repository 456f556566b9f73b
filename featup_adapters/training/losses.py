"""Multi-view reconstruction losses (spec section 5).

- :func:`random_projection`: ``n`` random unit directions in feature space, fresh per batch.
- :class:`ScaleNet`: the learned uncertainty ``s = exp(conv1x1(F_t) + 0.1).clamp_min(1e-4)``.
- :func:`gaussian_nll`: ``mean(|P pred - P target|^2 / (2 s^2) + log s)``, where ``|.|^2`` is the
  mean square over the projected channels.
- :func:`tv_loss`: total variation of the upsampled features (optional smoothness term).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


def random_projection(dim: int, n: int = 30, *, generator: torch.Generator | None = None,
                      device=None, dtype=torch.float32) -> Tensor:
    """``Tensor[n, dim]`` with unit-norm rows drawn from a Gaussian (random directions); ``n <= 0``
    gives the identity ``Tensor[dim, dim]`` (compare all channels)."""
    if n is None or n <= 0:
        return torch.eye(dim, device=device, dtype=dtype)
    p = torch.randn(n, dim, generator=generator, dtype=torch.float32)
    p = p / p.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return p.to(device=device, dtype=dtype)


def project(x: Tensor, proj: Tensor) -> Tensor:
    """``Tensor[B, C, H, W]`` onto the rows of ``proj: Tensor[n, C]`` -> ``Tensor[B, n, H, W]``."""
    if x.dim() != 4 or x.shape[1] != proj.shape[1]:
        raise ValueError(f"expected features of shape [B, {proj.shape[1]}, H, W], got {list(x.shape)}")
    return torch.einsum("bchw,nc->bnhw", x, proj.to(x.dtype))


class ScaleNet(nn.Module):
    """Per-pixel uncertainty from the target features.

    Shape:
        ``forward(target: Tensor[B, C, h, w]) -> Tensor[B, 1, h, w]`` (positive).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Conv2d(dim, 1, 1)
        with torch.no_grad():
            self.net.weight.mul_(0.1)
            self.net.bias.mul_(0.1)

    def forward(self, target: Tensor) -> Tensor:
        return torch.exp(self.net(target) + 0.1).clamp_min(1e-4)


def gaussian_nll(pred: Tensor, target: Tensor, scale: Tensor | None = None) -> Tensor:
    """Gaussian negative log-likelihood with per-pixel ``scale``; plain MSE when ``scale`` is None.

    Args:
        pred, target: ``Tensor[B, n, h, w]``.
        scale: ``Tensor[B, 1, h, w]`` > 0, or None.
    """
    if pred.shape != target.shape:
        raise ValueError(f"expected pred and target of the same shape, got {list(pred.shape)} and "
                         f"{list(target.shape)}")
    err = (pred - target).square().mean(dim=1, keepdim=True)
    if scale is None:
        return err.mean()
    return (err / (2 * scale.square()) + torch.log(scale)).mean()


def tv_loss(x: Tensor) -> Tensor:
    """Mean absolute difference between neighbouring pixels of ``Tensor[B, C, H, W]``."""
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean() if x.shape[-2] > 1 else x.new_zeros(())
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean() if x.shape[-1] > 1 else x.new_zeros(())
    return dx + dy
