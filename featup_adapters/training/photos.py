"""Offline training photos: which files of the Debian wallpaper packages and scikit-learn count as
photographs, de-duplication of the sizes of one wallpaper, and the fixed held-out split.

``scripts/fetch_photos.py`` downloads and unpacks the packages and uses these pieces; the manifest
it writes (``scripts/photos_manifest.json``) records, for every candidate file, its SHA-256, the
measures below and the decision.

The rule (a photograph has fine texture almost everywhere; vector art and gradients are flat
between their edges)::

    flat_fraction = share of the 8x8 blocks of the grey image (long side at most 2048 px) whose
                    residual after a least-squares plane fit has std < FLAT_STD (0.75 grey levels)
    colours       = distinct colours at 4 bits per channel in a copy of at most 128 px
    photo         = flat_fraction < MAX_FLAT_FRACTION (0.65) and colours >= MIN_COLOURS (8)

A plane fit removes gradients, so a smooth gradient or a flat fill is "flat" however it is
coloured; sensor noise, grain and natural texture are not.  The rule is simple, not perfect:
a photograph that is mostly out-of-focus background can fail it, and rendered art with grain or
dense patterns can pass (the manifest shows the measures of each file).
"""
from __future__ import annotations

import hashlib
import re
from pathlib import PurePosixPath

import numpy as np

FLAT_STD = 0.75
MAX_FLAT_FRACTION = 0.65
MIN_COLOURS = 8
BLOCK = 8
MAX_SIDE = 2048
VAL_FRACTION = 0.2
DUPLICATE_HAMMING = 24   # of 256 bits (dhash at 16x16)


def flat_fraction(grey: np.ndarray, block: int = BLOCK, flat_std: float = FLAT_STD) -> float:
    """Share of ``block x block`` tiles of ``grey`` (``ndarray[H, W]``, values in 0..255) whose
    residual after a least-squares plane ``a + b*y + c*x`` has standard deviation < ``flat_std``."""
    g = np.asarray(grey, dtype=np.float64)
    if g.ndim != 2 or min(g.shape) < block:
        raise ValueError(f"expected a grey image [H, W] of at least {block}x{block}, got {list(g.shape)}")
    h, w = (g.shape[0] // block) * block, (g.shape[1] // block) * block
    tiles = g[:h, :w].reshape(h // block, block, w // block, block).transpose(0, 2, 1, 3)
    tiles = tiles.reshape(-1, block * block)                                   # [T, b*b]
    yy, xx = np.mgrid[0:block, 0:block]
    A = np.stack([np.ones(block * block), yy.ravel(), xx.ravel()], 1)         # [b*b, 3]
    coef = np.linalg.lstsq(A, tiles.T, rcond=None)[0]                          # [3, T]
    resid = tiles.T - A @ coef
    return float((resid.std(axis=0) < flat_std).mean())


def distinct_colours(rgb: np.ndarray, bits: int = 4) -> int:
    """Distinct colours of ``rgb`` (``ndarray[H, W, 3]`` uint8) quantized to ``bits`` per channel."""
    q = np.asarray(rgb, dtype=np.uint8) >> (8 - bits)
    q = q.astype(np.int64)
    return int(np.unique((q[..., 0] << (2 * bits)) | (q[..., 1] << bits) | q[..., 2]).size)


def measures(image) -> dict:
    """``{"flat_fraction", "colours", "size"}`` of a PIL image (any mode)."""
    from PIL import Image

    im = image.convert("RGB")
    size = list(im.size)
    big = im.copy()
    big.thumbnail((MAX_SIDE, MAX_SIDE), Image.BOX)
    small = im.copy()
    small.thumbnail((128, 128), Image.BOX)
    return {"flat_fraction": round(flat_fraction(np.asarray(big.convert("L"))), 4),
            "colours": distinct_colours(np.asarray(small)), "size": size}


def is_photo(m: dict) -> bool:
    """The rule of the module docstring applied to :func:`measures`' output."""
    return m["flat_fraction"] < MAX_FLAT_FRACTION and m["colours"] >= MIN_COLOURS


def dhash(image, size: int = 16) -> int:
    """``size * size``-bit difference hash of a PIL image: signs of horizontal grey differences of
    a ``(size + 1) x size`` copy (256 bits by default)."""
    from PIL import Image

    g = np.asarray(image.convert("L").resize((size + 1, size), Image.BOX), dtype=np.int16)
    bits = (g[:, 1:] > g[:, :-1]).ravel()
    return int(sum(1 << i for i, b in enumerate(bits) if b))


def hamming(a: int, b: int) -> int:
    return bin(a ^ b).count("1")


_SIZE_NAME = re.compile(r"^\d+x\d+$")
_SIZE_SUFFIX = re.compile(r"[_-]\d+x\d+$")
_VARIANT_SUFFIX = re.compile(r"-[ld]$")


def group_key(relpath: str) -> str:
    """The wallpaper a file belongs to, so its several sizes/variants share one key.

    ``.../wallpapers/Kite/contents/images/1920x1080.jpg`` -> ``.../wallpapers/Kite``;
    ``.../Elephants_3840x2160.jpg`` -> ``.../Elephants``; GNOME's light/dark pair
    ``.../wood-l.webp`` / ``wood-d.webp`` -> ``.../wood``.
    """
    p = PurePosixPath(relpath)
    parts = p.parts
    if "contents" in parts:   # KDE layout: NAME/contents/images[_dark]/WxH.ext, screenshot.ext
        return str(PurePosixPath(*parts[:parts.index("contents")]))
    stem = p.stem
    if _SIZE_NAME.match(stem):
        return str(p.parent)
    stem = _VARIANT_SUFFIX.sub("", _SIZE_SUFFIX.sub("", stem))
    return str(p.parent / stem)


def dedupe(items: list[dict]) -> list[dict]:
    """Keep one file per wallpaper: items are dicts with ``id``, ``key`` (:func:`group_key`),
    ``pixels`` (width * height) and ``dhash``.  Within a key the largest file wins; across keys,
    a file whose hash is within ``DUPLICATE_HAMMING`` bits of an already kept one is a duplicate.
    Returns the kept items, each other item gets ``duplicate_of`` set (in place)."""
    best: dict[str, dict] = {}
    for it in items:
        cur = best.get(it["key"])
        if cur is None or (it["pixels"], it["id"]) > (cur["pixels"], cur["id"]):
            best[it["key"]] = it
    kept: list[dict] = []
    for it in sorted(best.values(), key=lambda d: d["id"]):
        twin = next((k for k in kept if hamming(k["dhash"], it["dhash"]) <= DUPLICATE_HAMMING), None)
        if twin is None:
            kept.append(it)
        else:
            it["duplicate_of"] = twin["id"]
    kept_ids = {k["id"] for k in kept}
    for it in items:
        if it["id"] not in kept_ids and "duplicate_of" not in it:
            it["duplicate_of"] = best[it["key"]]["id"]
    return kept


def split_of(photo_id: str, val_fraction: float = VAL_FRACTION) -> str:
    """``"val"`` or ``"train"``, fixed by the SHA-256 of the id (independent of the other files)."""
    h = int.from_bytes(hashlib.sha256(photo_id.encode()).digest()[:8], "big")
    return "val" if h % 10_000 < round(val_fraction * 10_000) else "train"


def safe_name(photo_id: str) -> str:
    """A file name for an id: path separators and odd characters become ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", photo_id).strip("_")
