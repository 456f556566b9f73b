"""fit_implicit: the per-image implicit upsampler."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from featup_adapters.training.implicit import ImplicitUpsampler, fit_implicit


class PatchSource(nn.Module):
    def __init__(self, dim=12, stride=8):
        super().__init__()
        torch.manual_seed(5)
        self.conv = nn.Conv2d(3, dim, stride, stride)
        self.feature_dim, self.stride, self.backbone_id = dim, stride, "tiny-patch"
        self.mean = self.std = (0.5, 0.5, 0.5)

    def features(self, x):
        return torch.tanh(self.conv(x))


def _image(h=40, w=56):
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([(xx > w / 2), ((yy - h / 2) ** 2 + (xx - w / 3) ** 2 < 120), yy / h], 0)
    return torch.tensor(img, dtype=torch.float32)


@pytest.mark.slow
def test_fit_implicit_loss_falls_and_output_has_the_requested_size():
    hist = []
    out = fit_implicit(PatchSource(), _image(), steps=40, pca_dim=6, hidden=32, max_pad=6,
                       progress=False, history=hist, output_size=(50, 70))
    assert out.shape == (1, 12, 50, 70) and torch.isfinite(out).all()
    losses = [l for _, l in hist]
    assert len(losses) == 40
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


def test_fit_implicit_output_defaults_to_the_image_size():
    out = fit_implicit(PatchSource(), _image(32, 48)[None], steps=1, pca_dim=4, hidden=8,
                       progress=False)
    assert out.shape == (1, 12, 32, 48)


def test_implicit_upsampler_evaluates_at_any_resolution():
    m = ImplicitUpsampler(5, n_freqs=4, hidden=8)
    assert m(torch.rand(2, 3, 7, 13)).shape == (2, 5, 7, 13)
    with pytest.raises(ValueError, match=r"expected image of shape \[B, 3, H, W\]"):
        m(torch.rand(1, 4, 7, 7))


def test_fit_implicit_rejects_bad_images():
    with pytest.raises(ValueError, match=r"expected one image of shape \[3, H, W\]"):
        fit_implicit(PatchSource(), torch.rand(2, 3, 32, 32), steps=1, progress=False)
    with pytest.raises(ValueError, match=r"at least the backbone's stride \(8 px\), got 4x40"):
        fit_implicit(PatchSource(), torch.rand(3, 4, 40), steps=1, progress=False)
    with pytest.raises(TypeError, match="expected an image path or a Tensor"):
        fit_implicit(PatchSource(), [1, 2, 3], steps=1, progress=False)


def test_fit_implicit_converts_uint8_and_refuses_other_ranges_before_any_work(monkeypatch):
    import featup_adapters.training.implicit as implicit

    img = _image(32, 48)
    as_uint8 = (img * 255).round().to(torch.uint8)
    torch.testing.assert_close(implicit._as_image(as_uint8), (as_uint8.float() / 255)[None])
    built = []
    real = implicit.feature_source
    monkeypatch.setattr(implicit, "feature_source", lambda *a, **k: built.append(1) or real(*a, **k))
    with pytest.raises(ValueError, match=r"values in \[0, 1\].*0\.\.255: divide by 255"):
        fit_implicit(PatchSource(), img * 255, steps=1, progress=False)
    nan = img.clone()
    nan[1, 3, 4] = float("nan")
    with pytest.raises(ValueError, match="1 NaN/Inf"):
        fit_implicit(PatchSource(), nan, steps=1, progress=False)
    with pytest.raises(TypeError, match="int16"):
        fit_implicit(PatchSource(), img.to(torch.int16), steps=1, progress=False)
    for bad in (0, -3, 1.5, (32, 0), (32.0, 48), True):
        with pytest.raises(ValueError, match="output_size"):
            fit_implicit(PatchSource(), img, steps=1, output_size=bad, progress=False)
    for steps in (0, 1.5, -1):
        with pytest.raises((ValueError, TypeError), match="steps"):
            fit_implicit(PatchSource(), img, steps=steps, progress=False)
    assert built == []                                  # refused up front, nothing was built
    out = fit_implicit(PatchSource(), as_uint8, steps=1, pca_dim=4, hidden=8, progress=False)
    assert out.shape == (1, 12, 32, 48) and torch.isfinite(out).all()
