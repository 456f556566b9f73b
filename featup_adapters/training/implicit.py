"""The implicit upsampler (spec section 6): a per-image MLP fitted by multi-view consistency.

    feats = fit_implicit("timm:resnet18", "cat.jpg", steps=1500, output_size=(448, 448))
    # Tensor[1, C, 448, 448]

A 1x1-conv MLP maps Fourier features of every pixel's coordinates (in [-1, 1]) and colour to the
image's features, reduced by PCA to ``pca_dim`` dimensions.  It is fitted to ONE image with the
multi-view loss of the trainer (jittered views, learned downsampler, Gaussian likelihood with a
learned scale), then evaluated at any resolution and mapped back to the backbone's channels.
Slow (thousands of steps) but the sharpest.
"""
from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .downsamplers import SimpleDownsampler
from .jitter import sample_jitter
from .losses import ScaleNet, gaussian_nll, project, random_projection
from .source import feature_source, release


class ImplicitUpsampler(nn.Module):
    """MLP over Fourier features of (y, x, r, g, b).

    Args:
        out_dim: output channels (the PCA dimension).
        n_freqs: frequencies ``exp(linspace(-2, 10, n_freqs))`` per input, with learned phases.
        hidden: width of the two hidden 1x1 convolutions.

    Shape:
        ``forward(image: Tensor[B, 3, H, W]) -> Tensor[B, out_dim, H, W]`` (the image is the
        normalized colour guidance; coordinates are generated for its size).
    """

    def __init__(self, out_dim: int, n_freqs: int = 30, hidden: int = 256):
        super().__init__()
        self.register_buffer("freqs", torch.exp(torch.linspace(-2, 10, n_freqs)), persistent=False)
        self.phases = nn.Parameter(torch.zeros(1, 5 * n_freqs, 1, 1))
        in_dim = 5 + 2 * 5 * n_freqs
        self.mlp = nn.Sequential(
            nn.Conv2d(in_dim, hidden, 1), nn.ReLU(inplace=True), nn.Dropout2d(0.1),
            nn.Conv2d(hidden, hidden, 1), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_dim, 1))

    @staticmethod
    def coordinates(b: int, h: int, w: int, device=None, dtype=torch.float32) -> Tensor:
        """``Tensor[b, 2, h, w]``: (y, x) of pixel centres in [-1, 1]."""
        ys = torch.linspace(-1, 1, h, device=device, dtype=dtype)
        xs = torch.linspace(-1, 1, w, device=device, dtype=dtype)
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        return torch.stack([yy, xx])[None].expand(b, -1, -1, -1)

    def forward(self, image: Tensor) -> Tensor:
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"expected image of shape [B, 3, H, W], got {list(image.shape)}")
        B, _, H, W = image.shape
        inp = torch.cat([self.coordinates(B, H, W, image.device, image.dtype), image], 1)  # [B,5,H,W]
        z = (inp[:, :, None] * self.freqs.to(inp.dtype)[None, None, :, None, None]).flatten(1, 2)
        z = z + self.phases
        return self.mlp(torch.cat([inp, torch.sin(z), torch.cos(z)], 1))


def _as_image(image) -> Tensor:
    """A path, ``Tensor[3, H, W]`` or ``Tensor[1, 3, H, W]`` -> float32 ``Tensor[1, 3, H, W]`` in [0, 1].

    A uint8 tensor is converted (divided by 255, as ``torchvision``'s ``to_dtype(scale=True)``
    does); other integer dtypes, float values outside [0, 1] (e.g. 0..255) and NaN/Inf pixels are
    refused with a ValueError/TypeError that says so.
    """
    if isinstance(image, (str, os.PathLike)):
        from ..data import load_image
        image = load_image(image)
    if not isinstance(image, Tensor):
        raise TypeError(f"expected an image path or a Tensor[3, H, W] in [0, 1], got "
                        f"{type(image).__name__}")
    if image.dim() == 3:
        image = image[None]
    if image.dim() != 4 or image.shape[:2] != (1, 3):
        raise ValueError(f"expected one image of shape [3, H, W] or [1, 3, H, W], got "
                         f"{list(image.shape)}")
    if image.dtype == torch.uint8:
        return image.float().div_(255.0)                 # converted: 0..255 -> 0..1
    if not image.is_floating_point():
        raise TypeError(f"expected a float image in [0, 1] (or uint8 in 0..255, converted), got dtype "
                        f"{image.dtype}")
    image = image.float()
    bad = ~torch.isfinite(image)
    if bool(bad.any()):
        raise ValueError(f"expected a finite image, got {int(bad.sum())} NaN/Inf value(s)")
    lo, hi = float(image.min()), float(image.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        hint = " (it looks like 0..255: divide by 255, or pass a uint8 tensor)" if hi > 1.5 else ""
        raise ValueError(f"expected a float image with values in [0, 1], got values in [{lo:g}, {hi:g}]{hint}")
    return image.clamp_(0.0, 1.0)


def _check_size(output_size):
    """None, an int >= 1 or an (H, W) pair of ints >= 1 -> None or (H, W)."""
    if output_size is None:
        return None
    if isinstance(output_size, torch.Size):
        output_size = tuple(output_size)
    values = (output_size,) if not isinstance(output_size, (tuple, list)) else tuple(output_size)
    if (len(values) not in (1, 2) or any(isinstance(v, bool) or not isinstance(v, int) for v in values)
            or any(v < 1 for v in values)):
        raise ValueError(f"expected output_size as an int >= 1 or an (H, W) pair of ints >= 1, got "
                         f"{output_size!r}")
    return (values[0], values[-1])


def _pca(samples: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``samples: Tensor[N, C]`` -> mean ``Tensor[C]`` and orthonormal basis ``Tensor[C, k]``."""
    mean = samples.mean(0)
    _, _, v = torch.linalg.svd(samples - mean, full_matrices=False)
    return mean, v[:k].T.contiguous()


def fit_implicit(backbone_or_neck, image, *, steps: int = 1500, output_size=None,
                 layer: str | None = None, pca_dim: int = 128, n_jitters: int = 2,
                 max_pad: int = 30, max_zoom: float = 1.8, lr: float = 1e-3,
                 random_projection_dim: int = 30, n_freqs: int = 30, hidden: int = 256,
                 seed: int = 0, device=None, progress: bool = True,
                 history: list | None = None, pretrained: bool | None = None) -> Tensor:
    """Fit an :class:`ImplicitUpsampler` to one image and return its features at ``output_size``.

    Args:
        backbone_or_neck: what ``featup_adapters.wrap`` accepts, or a wrapped neck.
        image: a path, or ``Tensor[3, H, W]`` / ``Tensor[1, 3, H, W]`` with float values in [0, 1];
            a uint8 tensor is converted (divided by 255); other dtypes, float values outside [0, 1]
            and NaN/Inf pixels are refused.
        steps: optimizer steps (>= 1); each sees ``n_jitters`` jittered views.
        output_size: (H, W) or int of the result; default the image's size.
        pca_dim: target features are reduced to this many principal components.
        history: if a list, ``(step, loss)`` pairs are appended every step.
        pretrained: for a spec string (see ``featup_adapters.wrap``).

    Returns:
        ``Tensor[1, C, H_out, W_out]`` (C = the backbone's channels), on CPU.
    """
    from .._validate import check_float, check_int

    if isinstance(steps, int) and not isinstance(steps, bool) and steps == 0:
        raise ValueError("expected steps >= 1, got 0: with no step the result is the untrained MLP's output")
    steps = check_int("steps", steps, min=1)
    n_jitters = check_int("n_jitters", n_jitters, min=1)
    pca_dim = check_int("pca_dim", pca_dim, min=1)
    lr = check_float("lr", lr, positive=True)
    output_size = _check_size(output_size)
    image = _as_image(image)                 # every check before the backbone is built
    src = feature_source(backbone_or_neck, layer, pretrained=pretrained)
    try:
        return _fit(src, image, steps, output_size, pca_dim, n_jitters, max_pad, max_zoom, lr,
                    random_projection_dim, n_freqs, hidden, seed, device, progress, history)
    finally:
        release(src)


def _fit(src, image, steps, output_size, pca_dim, n_jitters, max_pad, max_zoom, lr,
         random_projection_dim, n_freqs, hidden, seed, device, progress, history) -> Tensor:
    stride = int(src.stride)
    dev = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    img = _as_image(image).to(dev)
    H, W = img.shape[-2:]
    if min(H, W) < stride:
        raise ValueError(f"expected an image of at least the backbone's stride ({stride} px), got "
                         f"{H}x{W}")
    if output_size is None:
        output_size = (H, W)
    if isinstance(src, nn.Module):
        src.to(dev)
    m = torch.as_tensor(src.mean, dtype=torch.float32, device=dev).view(1, 3, 1, 1)
    s = torch.as_tensor(src.std, dtype=torch.float32, device=dev).view(1, 3, 1, 1)
    x = (img - m) / s
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)

    with torch.no_grad():
        lowres = src.features(x).float()
        C = lowres.shape[1]
        samples = [lowres]
        for _ in range(8):
            samples.append(src.features(sample_jitter((H, W), max_pad, max_zoom, generator=g)(x)).float())
        flat = torch.cat([t.permute(0, 2, 3, 1).reshape(-1, C) for t in samples])
        if not bool(torch.isfinite(flat).all()):
            raise FloatingPointError("fit_implicit: the backbone's features of this image contain NaN/Inf; "
                                     "check the model and the image normalization")
        k = min(pca_dim, C, flat.shape[0])
        mean, basis = _pca(flat, k)

    def reduce(feats: Tensor) -> Tensor:
        return torch.einsum("bchw,ck->bkhw", feats - mean.view(1, C, 1, 1), basis)

    model = ImplicitUpsampler(k, n_freqs, hidden).to(dev)
    down = SimpleDownsampler(stride).to(dev)
    scale_net = ScaleNet(k).to(dev)
    params = [*model.parameters(), *down.parameters(), *scale_net.parameters()]
    optim = torch.optim.NAdam(params, lr=lr)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, desc="fit_implicit", unit="step", dynamic_ncols=True)
    model.train()
    for step in range(steps):
        with torch.no_grad():
            views = []
            for _ in range(n_jitters):
                t = sample_jitter((H, W), max_pad, max_zoom, generator=g)
                views.append((t, reduce(src.features(t(x)).float())))
            proj = random_projection(k, min(random_projection_dim, k), generator=g, device=dev)
        hr = model(x)
        loss = hr.new_zeros(())
        for t, target in views:
            pred = down(t(hr), target.shape[-2:])
            loss = loss + gaussian_nll(project(pred, proj), project(target, proj), scale_net(target))
        loss = loss / n_jitters
        if not torch.isfinite(loss):
            raise FloatingPointError(f"fit_implicit: loss became {loss.item()} at step {step}")
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        if history is not None:
            history.append((step, float(loss.detach())))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
    if bar is not None:
        bar.close()

    model.eval()
    with torch.no_grad():
        guide = x if tuple(output_size) == (H, W) else F.interpolate(
            x, size=tuple(output_size), mode="bilinear", align_corners=False)
        z = model(guide)                                         # [1, k, Ho, Wo]
        out = torch.einsum("bkhw,ck->bchw", z, basis) + mean.view(1, C, 1, 1)
    if k < C and k < pca_dim:
        warnings.warn(f"fit_implicit: only {k} principal components available (features have "
                      f"{C} channels, {flat.shape[0]} samples)", RuntimeWarning, stacklevel=2)
    return out.cpu()
