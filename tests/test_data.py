"""featup_adapters.data: image folders (recursive, any size, corrupt files) and embedded photos."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from featup_adapters.data import ImageFolder, as_dataset, embedded_photos, list_images


def _save(path, h, w, fmt=None, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path, format=fmt)
    return path


def test_folder_is_listed_recursively_with_all_image_extensions(tmp_path):
    _save(tmp_path / "a.jpg", 40, 50, "JPEG")
    _save(tmp_path / "sub" / "b.PNG", 30, 70, "PNG")
    _save(tmp_path / "sub" / "deeper" / "c.webp", 64, 32, "WEBP")
    (tmp_path / "notes.txt").write_text("not an image")
    names = sorted(p.name for p in list_images(tmp_path))
    assert names == ["a.jpg", "b.PNG", "c.webp"]


def test_images_of_any_size_come_out_at_image_size_in_unit_range(tmp_path):
    _save(tmp_path / "wide.png", 30, 90)
    _save(tmp_path / "tall.png", 100, 20)
    ds = ImageFolder(tmp_path, image_size=(24, 40))
    for i in range(len(ds)):
        x = ds[i]
        assert x.shape == (3, 24, 40) and x.dtype == torch.float32
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    g = torch.Generator().manual_seed(0)
    assert ds.get(0, g).shape == (3, 24, 40)


def test_random_crops_follow_the_generator(tmp_path):
    _save(tmp_path / "wide.png", 32, 128)
    ds = ImageFolder(tmp_path, image_size=32)
    a = ds.get(0, torch.Generator().manual_seed(3))
    b = ds.get(0, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    crops = {tuple(ds.get(0, torch.Generator().manual_seed(s)).flatten()[:8].tolist()) for s in range(8)}
    assert len(crops) > 1


def test_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no readable images"):
        ImageFolder(tmp_path)


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolder(tmp_path / "nope")


def test_corrupt_header_is_skipped_with_a_warning_naming_the_file(tmp_path):
    _save(tmp_path / "good.png", 40, 40)
    (tmp_path / "broken.jpg").write_bytes(b"this is not a jpeg")
    with pytest.warns(RuntimeWarning, match="broken.jpg"):
        ds = ImageFolder(tmp_path, image_size=16)
    assert [p.name for p in ds.files] == ["good.png"]


def test_truncated_file_is_skipped_during_use_not_a_crash(tmp_path):
    _save(tmp_path / "a_ok.png", 40, 40, seed=1)
    full = _save(tmp_path / "b_truncated.png", 64, 64, seed=2).read_bytes()
    (tmp_path / "b_truncated.png").write_bytes(full[: len(full) // 3])   # header fine, data cut
    ds = ImageFolder(tmp_path, image_size=16)
    assert len(ds) == 2
    with pytest.warns(RuntimeWarning, match="b_truncated.png"):
        x = ds[1]
    assert torch.equal(x, ds[0])          # replaced by the next readable image
    with warnings.catch_warnings():
        warnings.simplefilter("error")    # known bad: no second decode attempt, no second warning
        ds[1]


def test_image_smaller_than_min_size_is_an_error_naming_it(tmp_path):
    _save(tmp_path / "big.png", 64, 64)
    _save(tmp_path / "tiny.png", 8, 40)
    with pytest.raises(ValueError, match=r"tiny\.png \(40x8\)"):
        ImageFolder(tmp_path, image_size=32, min_size=16)


def test_embedded_photos_are_real_files_and_split_disjointly():
    pytest.importorskip("skimage")
    photos = embedded_photos()
    assert len(photos) >= 10 and all(p.is_file() for p in photos)
    assert not any("chessboard" in p.name for p in photos)
    train, val = embedded_photos("train"), embedded_photos("val")
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(photos) and val
    with pytest.raises(ValueError, match="split"):
        embedded_photos("test")


def test_as_dataset_accepts_embedded_and_folders(tmp_path):
    pytest.importorskip("skimage")
    ds = as_dataset("embedded:val", 32)
    assert len(ds) == len(embedded_photos("val")) and ds[0].shape == (3, 32, 32)
    _save(tmp_path / "x.png", 20, 20)
    assert len(as_dataset(str(tmp_path), 16)) == 1
