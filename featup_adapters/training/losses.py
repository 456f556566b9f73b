"""Multi-view reconstruction losses (spec section 5).

- :func:`random_projection`: ``n`` random unit directions in feature space, fresh per batch.
- :class:`ScaleNet`: the learned uncertainty ``s = exp(conv1x1(F_t) + 0.1).clamp_min(1e-4)``.
- :func:`gaussian_nll`: ``mean(|P pred - P target|^2 / (2 s^2) + log s)``, where ``|.|^2`` is the
  mean square over the projected channels.
- :func:`tv_loss`: total variation of the upsampled features (optional smoothness term).
- :func:`crf_loss`: FeatUp's sampled CRF prior (spec section 5, item 8): nearby pixels of similar
  colour should have similar upsampled features.
- :func:`channel_norm`: LayerNorm over channels at init values (FeatUp's "ChannelNorm", item 7).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
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


def channel_norm(x: Tensor, eps: float = 1e-5) -> Tensor:
    """LayerNorm over the channels of ``Tensor[B, C, h, w]`` with weight 1 and bias 0 (FeatUp's
    "ChannelNorm" at its init values; the same as ``nn.LayerNorm(C)`` freshly built) -> same shape."""
    if x.dim() != 4:
        raise ValueError(f"expected features of shape [B, C, h, w], got {list(x.shape)}")
    return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), eps=eps).permute(0, 3, 1, 2)


def _sq_dist(a: Tensor, b: Tensor) -> Tensor:
    """``|a_i - b_j|^2`` for ``a: Tensor[..., N, D]``, ``b: Tensor[..., M, D]`` -> ``Tensor[..., N, M]``
    (smooth everywhere, unlike ``cdist``'s square root at 0)."""
    d = (a.square().sum(-1)[..., :, None] + b.square().sum(-1)[..., None, :]
         - 2 * a @ b.transpose(-1, -2))
    return d.clamp_min(0)


def crf_loss(features: Tensor, guidance: Tensor, *, n_samples: int = 1000, alpha: float = 0.1,
             beta: float = 0.15, gamma: float = 0.005, w1: float = 10.0, w2: float = 3.0,
             shift: float = 0.0, generator: torch.Generator | None = None) -> Tensor:
    """FeatUp's sampled CRF loss: a dense-CRF energy on ``n_samples`` random pixels.

    With pixel positions ``p`` normalized to [0, 1) by (H, W) (``p = (row / H, col / W)``), the
    colours ``x`` of ``guidance`` and the features ``f`` at ``n_samples`` positions drawn uniformly
    (with replacement, the same positions for every image of the batch)::

        k_ij = w1 exp(-|p_i - p_j|^2 / (2 alpha) - |x_i - x_j|^2 / (2 beta))
             + w2 exp(-|p_i - p_j|^2 / (2 gamma)) - shift
        loss = mean over (b, i, j) of |f_i - f_j|^2 k_ij        (|.|^2 summed over channels)

    Args:
        features: ``Tensor[B, n, H, W]``, e.g. the randomly projected upsampled features.
        guidance: ``Tensor[B, G, H', W']``, the (normalized) image; area-averaged to (H, W) when
            its size differs.
        generator: draws the positions (None: the global generator).

    Returns:
        A scalar ``Tensor`` (float32 or the features' dtype if wider).
    """
    if features.dim() != 4 or guidance.dim() != 4 or features.shape[0] != guidance.shape[0]:
        raise ValueError(f"expected features [B, n, H, W] and guidance [B, G, H', W'] with the same B, "
                         f"got {list(features.shape)} and {list(guidance.shape)}")
    if n_samples < 1:
        raise ValueError(f"expected n_samples >= 1, got {n_samples}")
    B, _, H, W = features.shape
    if tuple(guidance.shape[-2:]) != (H, W):
        guidance = F.adaptive_avg_pool2d(guidance, (H, W))
    dtype = torch.promote_types(features.dtype, torch.float32)
    idx = torch.randint(0, H * W, (n_samples,), generator=generator).to(features.device)
    rows, cols = idx // W, idx % W
    pos = torch.stack([rows.to(dtype) / H, cols.to(dtype) / W], dim=1)          # [N, 2]
    f = features.flatten(2)[:, :, idx].to(dtype).transpose(1, 2)                # [B, N, n]
    x = guidance.flatten(2)[:, :, idx].to(dtype).transpose(1, 2)                # [B, N, G]
    d_pos = _sq_dist(pos, pos)                                                  # [N, N]
    d_col = _sq_dist(x, x)                                                      # [B, N, N]
    d_feat = _sq_dist(f, f)                                                     # [B, N, N]
    k = (w1 * torch.exp(-d_pos / (2 * alpha) - d_col / (2 * beta))
         + w2 * torch.exp(-d_pos / (2 * gamma)) - shift)
    return (d_feat * k).mean()
