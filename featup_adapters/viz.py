"""Pictures of features: PCA to RGB, class activation maps, side-by-side panels (PIL only).

    lr_rgb, hr_rgb = pca_rgb(lowres[0], upsampled[0])      # one projection, fitted on lowres
    panel([image, lr_rgb, hr_rgb], ["image", "low-res", "JBU"], path="feats.png")

    logits = class_logit_map(features, head, classifier)   # per-pixel class scores
    heat = cam(features, classifier, class_idx, head=head)  # Tensor[B, H, W] in [0, 1]

matplotlib is never needed: colours and text are drawn with numpy and PIL.

**CAM for a backbone whose classifier is "pointwise layers -> global average pool -> linear"**
(timm EfficientNet: ``conv_head`` (1x1) -> ``bn2`` (BatchNorm + ReLU6) -> avg pool ->
``classifier``; ResNet: avg pool -> ``fc``).  Every layer before the pool acts on each pixel on its
own, so the logit of class k is exactly the spatial mean of the per-pixel score
``s_k(p) = w_k . head(F)(p) + b_k``.  ``class_logit_map`` returns that map and ``cam`` the
class-activation map ``relu(w_k . head(F))`` normalized to [0, 1] (Zhou et al. 2016).  The
upsampled CAM applies the same head to the *upsampled* features: the head is evaluated at every
output pixel, which is why FeatUp's sharper features give sharper CAMs (bilinear features through
a non-linear head are not the same as a bilinearly resized CAM, and the panel shows both).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._io import atomic_write

__all__ = ["pca_rgb", "class_logit_map", "cam", "classifier_head", "colorize", "overlay", "panel",
           "save_png"]


# --------------------------------------------------------------------------------------------
# PCA
# --------------------------------------------------------------------------------------------

def _as_chw(fmap: Tensor, i: int) -> Tensor:
    if not isinstance(fmap, Tensor):
        raise TypeError(f"pca_rgb: expected feature map {i} to be a Tensor[C, H, W], got {type(fmap).__name__}")
    if fmap.dim() == 4 and fmap.shape[0] == 1:
        fmap = fmap[0]
    if fmap.dim() != 3:
        raise ValueError(f"pca_rgb: expected feature map {i} of shape [C, H, W] or [1, C, H, W], "
                         f"got {list(fmap.shape)}")
    return fmap.detach().float().cpu()


def pca_rgb(*feature_maps: Tensor, fit_on: int = 0, quantile: float = 0.01,
            max_fit_pixels: int = 16384) -> list[np.ndarray]:
    """Project feature maps onto the first 3 principal components of one of them, as RGB.

    The projection (mean, components, colour range) is fitted ONCE on ``feature_maps[fit_on]``
    and applied unchanged to every map, so colours mean the same thing across maps (FeatUp's
    visualization protocol).  Component signs are fixed (largest loading positive), so the
    colours are deterministic.

    Args:
        *feature_maps: each ``Tensor[C, H_i, W_i]`` or ``Tensor[1, C, H_i, W_i]``, same C.
        fit_on: index of the map the projection is fitted on (usually the low-res one).
        quantile: each component is scaled so [quantile, 1 - quantile] of the fitted map's
            values span 0..255 (outliers clipped).
        max_fit_pixels: fit on an evenly strided subset of at most this many pixels.

    Returns:
        one ``np.uint8[H_i, W_i, 3]`` per map.
    """
    if not feature_maps:
        raise ValueError("pca_rgb: expected at least one feature map")
    maps = [_as_chw(m, i) for i, m in enumerate(feature_maps)]
    if not -len(maps) <= fit_on < len(maps):
        raise ValueError(f"pca_rgb: fit_on={fit_on} is out of range for {len(maps)} feature maps")
    channels = {m.shape[0] for m in maps}
    if len(channels) != 1:
        raise ValueError(f"pca_rgb: expected every map to have the same channel count, got "
                         f"{[m.shape[0] for m in maps]}")
    c = channels.pop()
    fit = maps[fit_on].reshape(c, -1).T.double()                      # [N, C]
    if fit.shape[0] > max_fit_pixels:
        fit = fit[:: -(-fit.shape[0] // max_fit_pixels)]
    mean = fit.mean(0, keepdim=True)
    centered = fit - mean
    cov = centered.T @ centered / max(1, centered.shape[0] - 1)       # [C, C]
    # numpy's eigh: torch's first LAPACK call in a process costs seconds of start-up
    evecs = torch.from_numpy(np.linalg.eigh(cov.numpy())[1])          # ascending eigenvalues
    k = min(3, c)
    comps = evecs[:, -k:].flip(-1)                                    # [C, k], largest first
    signs = torch.sign(comps.gather(0, comps.abs().argmax(0, keepdim=True)))
    comps = comps * torch.where(signs == 0, torch.ones_like(signs), signs)
    proj_fit = centered @ comps                                       # [N, k]
    lo = torch.quantile(proj_fit, quantile, dim=0)
    hi = torch.quantile(proj_fit, 1.0 - quantile, dim=0)
    span = torch.where(hi - lo > 1e-12, hi - lo, torch.ones_like(hi))
    out = []
    weight = (comps / span).T.float()                                 # [k, C], scaled to unit range
    offset = ((mean @ comps).reshape(-1) + lo) / span                 # [k]
    for m in maps:
        _, h, w = m.shape
        proj = weight @ m.reshape(c, -1)                              # [k, H*W], float32
        unit = (proj.T.double() - offset).clamp(0, 1)
        if k < 3:
            unit = torch.cat([unit, unit.new_zeros(unit.shape[0], 3 - k)], dim=1)
        out.append((unit * 255).round().to(torch.uint8).reshape(h, w, 3).numpy())
    return out


# --------------------------------------------------------------------------------------------
# Class activation maps
# --------------------------------------------------------------------------------------------

def _linear_parts(classifier: nn.Module | Tensor) -> tuple[Tensor, Tensor | None]:
    if isinstance(classifier, nn.Linear):
        return classifier.weight, classifier.bias
    if isinstance(classifier, Tensor) and classifier.dim() == 2:
        return classifier, None
    raise TypeError("expected the classifier as an nn.Linear or a weight Tensor[K, D], got "
                    f"{type(classifier).__name__}"
                    + (f" of shape {list(classifier.shape)}" if isinstance(classifier, Tensor) else ""))


def class_logit_map(features: Tensor, classifier: nn.Module | Tensor,
                    head: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Per-pixel class scores ``head(F)(p) . w_k + b_k`` whose spatial mean is the model's logit.

    Args:
        features: ``Tensor[B, C, H, W]`` (low-res or upsampled).
        classifier: ``nn.Linear(D, K)`` or its weight ``Tensor[K, D]``.
        head: the pointwise layers between ``features`` and the global pool, mapping
            ``Tensor[B, C, H, W]`` to ``Tensor[B, D, H, W]`` (``None``: identity, D = C).

    Returns:
        ``Tensor[B, K, H, W]``.
    """
    if features.dim() != 4:
        raise ValueError(f"expected features of shape [B, C, H, W], got {list(features.shape)}")
    x = head(features) if head is not None else features
    weight, bias = _linear_parts(classifier)
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"expected features with {weight.shape[1]} channels after the head (the "
                         f"classifier's input size), got {list(x.shape)}")
    logits = torch.einsum("bdhw,kd->bkhw", x, weight.to(x.dtype))
    if bias is not None:
        logits = logits + bias.to(x.dtype).view(1, -1, 1, 1)
    return logits


def cam(features: Tensor, classifier: nn.Module | Tensor, class_idx: int | Sequence[int] | Tensor,
        *, head: Callable[[Tensor], Tensor] | None = None, output_size: tuple[int, int] | None = None,
        normalize: bool = True, chunk_pixels: int = 32768) -> Tensor:
    """Class activation map ``relu(w_k . head(F))`` for class ``class_idx``.

    Args:
        features: ``Tensor[B, C, H, W]``.
        classifier: ``nn.Linear(D, K)`` or ``Tensor[K, D]``.
        class_idx: one class for the whole batch, or one per image (length B).
        head: pointwise layers before the global pool (see :func:`class_logit_map`).
        output_size: resize the map (bilinear) to ``(H', W')``.
        normalize: divide each map by its maximum (maps in [0, 1]).
        chunk_pixels: the head runs on blocks of rows of about this many pixels (bounded memory
            for a large upsampled map through a wide head).

    Returns:
        ``Tensor[B, H, W]`` (or ``[B, H', W']``).
    """
    if features.dim() != 4:
        raise ValueError(f"expected features of shape [B, C, H, W], got {list(features.shape)}")
    weight, _ = _linear_parts(classifier)
    b, _, h, w_ = features.shape
    idx = torch.as_tensor(class_idx, dtype=torch.long).reshape(-1)
    if idx.numel() == 1:
        idx = idx.expand(b)
    if idx.numel() != b:
        raise ValueError(f"expected one class index or {b} (one per image), got {idx.numel()}")
    if int(idx.min()) < 0 or int(idx.max()) >= weight.shape[0]:
        raise ValueError(f"class index out of range: the classifier has {weight.shape[0]} classes, "
                         f"got {idx.tolist()}")
    w = weight[idx.to(weight.device)]                                 # [B, D]
    rows = max(1, chunk_pixels // max(1, w_))                         # the head runs on row blocks
    parts = []
    for r0 in range(0, h, rows):
        x = features[:, :, r0:r0 + rows]
        x = head(x) if head is not None else x
        if x.shape[1] != weight.shape[1]:
            raise ValueError(f"expected features of shape [B, {weight.shape[1]}, H, W] after the head, "
                             f"got {list(x.shape)}")
        parts.append(torch.relu(torch.einsum("bdhw,bd->bhw", x, w.to(x.dtype))))
    maps = torch.cat(parts, dim=1)
    if output_size is not None:
        maps = F.interpolate(maps[:, None], size=tuple(output_size), mode="bilinear",
                             align_corners=False)[:, 0].clamp_min(0)
    if normalize:
        maps = maps / maps.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)
    return maps


def classifier_head(model: nn.Module, layer: str) -> tuple[nn.Module | None, nn.Linear]:
    """The pointwise head and linear classifier that turn ``layer``'s output into class scores.

    Supported (the logit is then exactly the spatial mean of :func:`class_logit_map`):

    * timm ``EfficientNet`` (the default backbone, tf_efficientnet_lite0): ``layer`` = the last
      block (``blocks.6`` / ``blocks``) -> head ``conv_head, bn2``; ``conv_head`` -> head ``bn2``;
      ``bn2`` -> no head.
    * timm / torchvision ``ResNet``: ``layer4`` -> no head, classifier ``fc``.

    Raises:
        ValueError: any other model or layer (the message says what is supported).
    """
    name = type(model).__name__
    pool = getattr(model, "global_pool", None)
    pool_type = getattr(pool, "pool_type", "avg") if pool is not None else "avg"
    if name == "EfficientNet" and all(hasattr(model, a) for a in ("conv_head", "bn2", "classifier")):
        last_block = f"blocks.{len(model.blocks) - 1}"
        heads = {last_block: nn.Sequential(model.conv_head, model.bn2), "blocks": None,
                 "conv_head": model.bn2, "bn2": None}
        heads["blocks"] = heads[last_block]
        if layer in heads and isinstance(model.classifier, nn.Linear) and pool_type == "avg":
            return heads[layer], model.classifier
        supported = ", ".join(heads)
    elif name == "ResNet" and isinstance(getattr(model, "fc", None), nn.Linear):
        if layer == "layer4" and pool_type == "avg":
            return None, model.fc
        supported = "layer4"
    else:
        raise ValueError(f"cam needs a classification backbone whose classifier is global average "
                         f"pooling plus a linear layer (timm EfficientNet, ResNet); got {name}")
    raise ValueError(f"cam: cannot map the output of layer {layer!r} of {name} to class scores; "
                     f"supported layers: {supported}")


# --------------------------------------------------------------------------------------------
# Colours, overlays, panels
# --------------------------------------------------------------------------------------------

def colorize(values: np.ndarray | Tensor) -> np.ndarray:
    """``float[H, W]`` in [0, 1] -> ``np.uint8[H, W, 3]`` with the jet colour map (blue -> red)."""
    v = values.detach().float().cpu().numpy() if isinstance(values, Tensor) else np.asarray(values, np.float32)
    v = np.clip(v, 0.0, 1.0)[..., None]
    centers = np.array([0.75, 0.5, 0.25], dtype=np.float32)         # r, g, b
    rgb = np.clip(1.5 - np.abs(4.0 * (v - centers)), 0.0, 1.0)
    return (rgb * 255).round().astype(np.uint8)


def overlay(rgb: np.ndarray, heat: np.ndarray | Tensor, *, alpha: float = 0.5,
            resample: str = "bilinear") -> np.ndarray:
    """Blend a heat map (``float[h, w]`` in [0, 1], resized to the image) over ``np.uint8[H, W, 3]``.

    ``resample="nearest"`` keeps a low-res map's true pixels visible; ``"bilinear"`` smooths it.
    """
    from PIL import Image

    heat = heat.detach().float().cpu().numpy() if isinstance(heat, Tensor) else np.asarray(heat, np.float32)
    if heat.ndim != 2:
        raise ValueError(f"expected a heat map of shape [H, W], got {list(heat.shape)}")
    h, w = rgb.shape[:2]
    if heat.shape != (h, w):
        mode = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR}[resample]
        heat = np.asarray(Image.fromarray(heat.astype(np.float32), mode="F").resize((w, h), mode))
    colour = colorize(heat).astype(np.float32)
    return (rgb.astype(np.float32) * (1 - alpha) + colour * alpha).round().clip(0, 255).astype(np.uint8)


def _to_pil(img):
    from PIL import Image

    if isinstance(img, Image.Image):
        return img.convert("RGB")
    if isinstance(img, Tensor):
        img = img.detach().cpu().numpy()
    arr = np.asarray(img)
    if arr.dtype != np.uint8:
        raise TypeError(f"panel: expected uint8 images (np.uint8[H, W, 3] or [H, W]), got {arr.dtype}")
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"panel: expected images of shape [H, W, 3] or [H, W], got {list(arr.shape)}")
    return Image.fromarray(arr)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def panel(images: Sequence, titles: Sequence[str] | None = None, *, path: str | os.PathLike | None = None,
          height: int | None = None, cols: int | None = None, pad: int = 8, title_size: int = 16):
    """Images side by side with a title above each; optionally written as a PNG (atomically).

    Every image is scaled to the same height (``height``, default: the tallest image), aspect
    kept.  Images smaller than that are enlarged with nearest-neighbour sampling so a low-res
    map shows its real pixels; larger ones are reduced smoothly.

    Args:
        images: ``np.uint8[H, W, 3]`` / ``[H, W]`` arrays or PIL images.
        titles: one line per image (may contain ``\\n`` for a second line).
        path: where to write the picture (format from the suffix, PNG by default).
        cols: images per row (default: all in one row).

    Returns:
        the ``PIL.Image.Image``.
    """
    from PIL import Image, ImageDraw

    pics = [_to_pil(im) for im in images]
    if not pics:
        raise ValueError("panel: expected at least one image")
    titles = list(titles) if titles is not None else [""] * len(pics)
    if len(titles) != len(pics):
        raise ValueError(f"panel: expected one title per image ({len(pics)}), got {len(titles)}")
    if height is not None and (isinstance(height, bool) or not isinstance(height, int) or height < 1):
        raise ValueError(f"panel: expected height as an int >= 1 or None, got {height!r}")
    if cols is not None and (isinstance(cols, bool) or not isinstance(cols, int) or cols < 1):
        raise ValueError(f"panel: expected cols as an int >= 1 or None, got {cols!r}")
    height = int(height if height is not None else max(p.height for p in pics))
    cells = []
    for p in pics:
        width = max(1, round(p.width * height / p.height))
        resample = Image.NEAREST if p.height < height else Image.BICUBIC
        cells.append(p if p.size == (width, height) else p.resize((width, height), resample))
    cols = min(cols if cols is not None else len(cells), len(cells))
    font = _font(title_size)
    lines = max(t.count("\n") + 1 for t in titles) if any(titles) else 0
    title_h = lines * (title_size + 4) + (pad if lines else 0)
    rows = [cells[i:i + cols] for i in range(0, len(cells), cols)]
    row_w = [sum(c.width for c in r) + pad * (len(r) + 1) for r in rows]
    canvas = Image.new("RGB", (max(row_w), len(rows) * (height + title_h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    k = 0
    for r, row in enumerate(rows):
        y = pad + r * (height + title_h + pad)
        x = pad
        for cell in row:
            for j, line in enumerate(titles[k].split("\n") if titles[k] else []):
                tw = draw.textlength(line, font=font)
                draw.text((x + max(0, (cell.width - tw) / 2), y + j * (title_size + 4)), line,
                          fill="black", font=font)
            canvas.paste(cell, (x, y + title_h))
            x += cell.width + pad
            k += 1
    if path is not None:
        save_png(canvas, path)
    return canvas


def save_png(image, path: str | os.PathLike) -> Path:
    """Write a PIL image atomically (temp file in the same folder, then ``os.replace``)."""
    path = Path(path)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(path.suffix.lower(), "PNG")
    with atomic_write(path, "wb") as fh:
        image.save(fh, format=fmt)
    return path
