"""featup_adapters.viz (PCA pictures, CAM, panels) and featup_adapters.images (loading images)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from featup_adapters import images, viz


# ---------------------------------------------------------------------------------------------
# pca_rgb
# ---------------------------------------------------------------------------------------------

def test_pca_rgb_returns_one_uint8_image_per_map_at_its_own_size():
    g = torch.Generator().manual_seed(0)
    lr = torch.randn(16, 5, 7, generator=g)
    hr = torch.randn(1, 16, 40, 56, generator=g)
    out = viz.pca_rgb(lr, hr)
    assert [o.shape for o in out] == [(5, 7, 3), (40, 56, 3)]
    assert all(o.dtype == np.uint8 for o in out)


def test_pca_rgb_applies_the_projection_fitted_on_one_map_to_all():
    g = torch.Generator().manual_seed(1)
    lr = torch.randn(1, 24, 6, 9, generator=g)
    up = F.interpolate(lr, scale_factor=4, mode="nearest")  # same vectors, repeated
    lr_rgb, up_rgb = viz.pca_rgb(lr, up, fit_on=0)
    assert np.array_equal(up_rgb, np.repeat(np.repeat(lr_rgb, 4, axis=0), 4, axis=1))
    # fitted on the other map: the map order does not change the colours
    up_rgb2, lr_rgb2 = viz.pca_rgb(up, lr, fit_on=1)
    assert np.array_equal(lr_rgb2, lr_rgb) and np.array_equal(up_rgb2, up_rgb)


def test_pca_rgb_first_component_follows_the_dominant_direction_of_variation():
    g = torch.Generator().manual_seed(2)
    ramp = torch.linspace(-1, 1, 32).view(1, 1, 32).expand(1, 20, 32)
    direction = torch.randn(10, 1, 1, generator=g)
    feats = direction * 5 * ramp + 0.05 * torch.randn(10, 20, 32, generator=g)
    (rgb,) = viz.pca_rgb(feats, quantile=0.0)
    red = rgb[..., 0].astype(np.float64)
    corr = np.corrcoef(red.ravel(), ramp[0].numpy().ravel())[0, 1]
    assert abs(corr) > 0.99
    assert red.min() == 0 and red.max() == 255  # scaled to the full range of the fitted map


def test_pca_rgb_rejects_maps_with_different_channel_counts():
    with pytest.raises(ValueError, match=r"same channel count, got \[8, 9\]"):
        viz.pca_rgb(torch.randn(8, 4, 4), torch.randn(9, 4, 4))
    with pytest.raises(ValueError, match=r"\[C, H, W\] or \[1, C, H, W\], got \[2, 8, 4, 4\]"):
        viz.pca_rgb(torch.randn(2, 8, 4, 4))
    with pytest.raises(ValueError, match="fit_on=3 is out of range"):
        viz.pca_rgb(torch.randn(8, 4, 4), fit_on=3)


# ---------------------------------------------------------------------------------------------
# CAM
# ---------------------------------------------------------------------------------------------

def _random_efficientnet():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=10).eval()
    for m in model.modules():  # non-trivial BatchNorm statistics, so bn2 + ReLU6 matter
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_(1, 0.3)
            m.bias.data.normal_(0, 0.5)
    return model


@pytest.mark.timm
def test_class_logit_map_averages_to_the_models_logits_for_efficientnet():
    model = _random_efficientnet()
    store = {}
    handle = model.blocks[-1].register_forward_hook(lambda m, i, o: store.__setitem__("f", o))
    x = torch.randn(2, 3, 96, 160)
    with torch.no_grad():
        logits = model(x)
        head, classifier = viz.classifier_head(model, "blocks.6")
        per_pixel = viz.class_logit_map(store["f"], classifier, head)
    handle.remove()
    assert per_pixel.shape == (2, 10, 3, 5)
    torch.testing.assert_close(per_pixel.mean((2, 3)), logits, atol=1e-4, rtol=1e-4)
    # the CAM of class k is relu of that map without the bias, max-normalized
    top = logits.argmax(1)
    cam = viz.cam(store["f"], classifier, top, head=head)
    expected = torch.relu(per_pixel[[0, 1], top] - classifier.bias[top].view(2, 1, 1))
    assert expected.flatten(1).amax(1).min() > 0
    expected = expected / expected.flatten(1).amax(1).view(2, 1, 1)
    torch.testing.assert_close(cam, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.timm
def test_classifier_head_names_supported_layers_and_models():
    model = _random_efficientnet()
    head, _ = viz.classifier_head(model, "bn2")
    assert head is None
    with pytest.raises(ValueError, match=r"layer 'blocks.3'.*supported layers: blocks.6"):
        viz.classifier_head(model, "blocks.3")
    with pytest.raises(ValueError, match="global average pooling plus a linear layer.*got Sequential"):
        viz.classifier_head(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1)), "0")


def test_cam_in_row_blocks_equals_cam_in_one_piece_and_is_normalized():
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(2, 6, 13, 11, generator=g)
    head = torch.nn.Sequential(torch.nn.Conv2d(6, 8, 1), torch.nn.ReLU6())
    clf = torch.nn.Linear(8, 4)
    with torch.no_grad():
        whole = viz.cam(feats, clf, 2, head=head, chunk_pixels=10 ** 6)
        blocks = viz.cam(feats, clf, 2, head=head, chunk_pixels=11)  # one row per block
    torch.testing.assert_close(whole, blocks)
    assert whole.shape == (2, 13, 11)
    assert torch.allclose(whole.flatten(1).amax(1), torch.ones(2)) and whole.min() >= 0
    resized = viz.cam(feats, clf, 2, head=head, output_size=(26, 22))
    assert resized.shape == (2, 26, 22)


def test_cam_rejects_bad_class_indices_and_channel_mismatch():
    clf = torch.nn.Linear(6, 4)
    with pytest.raises(ValueError, match=r"the classifier has 4 classes, got \[4, 4\]"):
        viz.cam(torch.randn(2, 6, 3, 3), clf, 4)
    with pytest.raises(ValueError, match="one class index or 2"):
        viz.cam(torch.randn(2, 6, 3, 3), clf, [0, 1, 2])
    with pytest.raises(ValueError, match=r"\[B, 6, H, W\] after the head, got \[1, 5, 3, 3\]"):
        viz.cam(torch.randn(1, 5, 3, 3), clf, 0)


# ---------------------------------------------------------------------------------------------
# colours, overlays, panels
# ---------------------------------------------------------------------------------------------

def test_colorize_runs_from_blue_to_red_and_overlay_blends():
    lo, hi = viz.colorize(np.array([[0.0, 1.0]]))[0]
    assert lo[2] > 100 and lo[0] == 0 and hi[0] > 100 and hi[2] == 0
    rgb = np.full((8, 10, 3), 200, np.uint8)
    assert np.array_equal(viz.overlay(rgb, np.zeros((2, 2)), alpha=0.0), rgb)
    blended = viz.overlay(rgb, torch.ones(2, 2), alpha=1.0, resample="nearest")
    assert blended.shape == (8, 10, 3) and np.all(blended == hi)


def test_panel_scales_cells_to_one_height_and_writes_the_png(tmp_path):
    big = np.zeros((60, 90, 3), np.uint8)
    small = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [255, 255, 255]]], np.uint8)  # 2x2
    path = tmp_path / "sub" / "p.png"
    img = viz.panel([big, small], ["big", "small"], path=path, pad=8, title_size=16)
    with Image.open(path) as saved:
        assert saved.format == "PNG" and saved.size == img.size
        arr = np.asarray(saved.convert("RGB"))
    # widths: 90 + 60 (the 2x2 map scaled to height 60) + 3 pads; height: title + cell + pads
    assert img.size == (90 + 60 + 3 * 8, 8 + (16 + 4) + 8 + 60 + 8)
    cell = arr[8 + 20 + 8:8 + 20 + 8 + 60, 8 + 90 + 8:8 + 90 + 8 + 60]
    colours = {tuple(c) for c in cell.reshape(-1, 3)}
    assert colours == {tuple(c) for c in small.reshape(-1, 3)}  # nearest: real pixels, no blending
    assert [p.name for p in path.parent.iterdir()] == ["p.png"]  # no temp file left behind


def test_panel_rejects_mismatched_titles_and_float_images():
    with pytest.raises(ValueError, match=r"one title per image \(2\), got 1"):
        viz.panel([np.zeros((4, 4, 3), np.uint8)] * 2, ["a"])
    with pytest.raises(TypeError, match="expected uint8 images"):
        viz.panel([np.zeros((4, 4, 3), np.float32)])


# ---------------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------------

def test_read_rgb_converts_grey_and_rgba_and_names_bad_files(tmp_path):
    Image.fromarray(np.full((5, 7), 9, np.uint8)).save(tmp_path / "g.png")
    Image.fromarray(np.zeros((5, 7, 4), np.uint8)).save(tmp_path / "a.png")
    assert images.read_rgb(tmp_path / "g.png").shape == (5, 7, 3)
    assert images.read_rgb(tmp_path / "a.png").shape == (5, 7, 3)
    (tmp_path / "bad.jpg").write_bytes(b"not an image at all")
    with pytest.raises(images.ImageError, match=r"cannot read .*bad.jpg as an image"):
        images.read_rgb(tmp_path / "bad.jpg")
    with pytest.raises(images.ImageError, match=r"no such image file: .*missing.png"):
        images.read_rgb(tmp_path / "missing.png")
    with pytest.raises(images.ImageError, match="got a directory"):
        images.read_rgb(tmp_path)


def test_resize_normalize_and_min_size():
    rgb = np.zeros((30, 60, 3), np.uint8)
    assert images.resize_rgb(rgb, 120).shape == (60, 120, 3)
    assert images.resize_rgb(rgb, (10, 20)).shape == (10, 20, 3)
    x = images.to_tensor(np.full((2, 3, 3), 255, np.uint8), mean=(0.5, 0.5, 0.0), std=(0.5, 0.25, 1.0))
    assert x.shape == (1, 3, 2, 3)
    assert x[0, :, 0, 0].tolist() == [1.0, 2.0, 1.0]
    with pytest.raises(images.ImageError, match=r"photo is 30x60 pixels, too small: .* at least 32x32"):
        images.check_min_size(rgb, 32, name="photo")


def test_default_image_is_an_embedded_photo():
    pytest.importorskip("skimage")
    rgb, label = images.default_image()
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3 and min(rgb.shape[:2]) >= 200
    assert "coffee" in label
    with pytest.raises(images.ImageError, match="unknown embedded image 'nope'"):
        images.default_image("nope")
