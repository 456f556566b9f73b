"""Training pieces: jitter, downsamplers, losses, and the trainer on a tiny stand-in backbone."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from featup_adapters.training import checkpoint as ckpt_mod
from featup_adapters.training.downsamplers import (AttentionDownsampler, SimpleDownsampler,
                                                   make_downsampler)
from featup_adapters.training.jitter import apply_jitter, sample_jitter
from featup_adapters.training.losses import (ScaleNet, gaussian_nll, project, random_projection,
                                             tv_loss)
from featup_adapters.training.trainer import train_upsampler


# ---------------------------------------------------------------- stand-ins (tiny, random init)
class PatchSource(nn.Module):
    """A frozen 'backbone': one strided conv, features Tensor[B, dim, H/stride, W/stride]."""

    def __init__(self, dim=8, stride=8, backbone_id="tiny-patch"):
        super().__init__()
        torch.manual_seed(123)
        self.conv = nn.Conv2d(3, dim, stride, stride)
        self.feature_dim, self.stride = dim, stride
        self.mean, self.std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
        self.backbone_id, self.layer = backbone_id, None

    def features(self, x):
        return torch.tanh(self.conv(x))


class GuidedUp(nn.Module):
    """A small learnable guided upsampler with the JBUStack call signature (and dropout)."""

    def __init__(self, dim=8):
        super().__init__()
        torch.manual_seed(7)
        self.guide = nn.Conv2d(3 + dim, dim, 3, padding=1)
        self.drop = nn.Dropout2d(0.1)

    def forward(self, source, guidance, output_size=None):
        hr = F.interpolate(source, size=output_size, mode="bilinear", align_corners=False)
        g = F.adaptive_avg_pool2d(guidance, output_size)
        return hr + self.drop(self.guide(torch.cat([g, hr], 1)))


def _photo_folder(path, n=4, size=(40, 56)):
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size[0], 0:size[1]]
    for i in range(n):   # smooth blobs and edges: structure the guidance can explain
        img = np.zeros((*size, 3))
        for c in range(3):
            cy, cx = rng.uniform(0, size[0]), rng.uniform(0, size[1])
            img[..., c] = ((yy - cy) ** 2 + (xx - cx) ** 2 < rng.uniform(60, 300)).astype(float)
        img = (img * 200 + rng.uniform(0, 40, img.shape)).clip(0, 255).astype(np.uint8)
        Image.fromarray(img).save(path / f"img{i}.png")
    return path


KW = dict(batch_size=2, image_size=(32, 48), n_jitters=2, max_pad=6, progress=False,
          snapshots=False, log_every=1)


# ---------------------------------------------------------------- jitter
def test_jitter_applies_identically_to_image_and_features():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 40, 56, dtype=torch.float64)
    pointwise = nn.Conv2d(3, 5, 1).double()    # features that commute with any spatial warp
    for s in range(10):
        t = sample_jitter((40, 56), max_pad=12, max_zoom=2.0, generator=torch.Generator().manual_seed(s))
        with torch.no_grad():
            torch.testing.assert_close(pointwise(t(x)), t(pointwise(x)))
        assert t(x).shape == x.shape


def test_jitter_samples_pads_zooms_and_flips():
    ts = [sample_jitter((30, 50), 10, 2.0, generator=torch.Generator().manual_seed(s)) for s in range(40)]
    assert any(t.flip for t in ts) and not all(t.flip for t in ts)
    assert any(t.zoomed != (50, 70) for t in ts) and any(t.zoomed == (50, 70) for t in ts)
    assert all(t.pad == 10 for t in ts)


def test_jitter_without_pad_zoom_or_flip_is_identity():
    x = torch.randn(1, 4, 17, 23)
    t = sample_jitter((17, 23), max_pad=0, max_zoom=1.0, flip_prob=0.0)
    assert torch.equal(apply_jitter(x, t), x)


def test_jitter_on_tiny_inputs_clamps_the_reflect_pad():
    t = sample_jitter((5, 9), max_pad=20, generator=torch.Generator().manual_seed(0))
    assert t.pad == 4 and t(torch.randn(1, 2, 5, 9)).shape == (1, 2, 5, 9)


def test_scaled_jitter_is_the_same_transform_at_twice_the_resolution():
    yy, xx = torch.meshgrid(torch.linspace(0, 3, 64), torch.linspace(0, 5, 96), indexing="ij")
    big = torch.stack([torch.sin(yy), torch.cos(xx), torch.sin(xx + yy)])[None]   # smooth field
    small = F.avg_pool2d(big, 2)
    for s in range(8):
        t = sample_jitter((32, 48), 6, 1.8, generator=torch.Generator().manual_seed(s))
        err = (F.avg_pool2d(t.scaled(2)(big), 2) - t(small)).abs()
        # reflect padding mirrors about a pixel centre, half a fine pixel apart at the two scales
        assert float(err.mean()) < 0.02 and float(err.max()) < 0.15
    assert t.scaled(2).size == (64, 96) and t.scaled(1) == t


def test_jitter_rejects_a_tensor_of_another_size():
    t = sample_jitter((16, 16))
    with pytest.raises(ValueError, match=r"sampled for spatial size \[16, 16\]"):
        t(torch.randn(1, 3, 16, 20))


# ---------------------------------------------------------------- downsamplers
@pytest.mark.parametrize("kind", ["simple", "attention"])
@pytest.mark.parametrize("hr_size,out_size,stride", [((70, 110), (5, 8), 14), ((64, 32), (4, 2), 16),
                                                     ((45, 61), (3, 4), 7), ((33, 33), (33, 33), 1)])
def test_downsampler_gives_the_backbone_grid_for_any_shape_and_stride(kind, hr_size, out_size, stride):
    d = make_downsampler(kind, 6, stride)
    out = d(torch.randn(2, 6, *hr_size), out_size)
    assert out.shape == (2, 6, *out_size)


@pytest.mark.parametrize("kind", ["simple", "attention"])
def test_downsampler_keeps_constant_features_constant(kind):
    d = make_downsampler(kind, 3, 8).eval()
    x = torch.ones(1, 3, 24, 40) * torch.tensor([1.0, -2.0, 3.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(d(x, (3, 5)), x[..., :3, :5])


def test_simple_downsampler_starts_as_area_average():
    x = torch.randn(2, 4, 24, 32)
    torch.testing.assert_close(SimpleDownsampler(8)(x, (3, 4)), F.avg_pool2d(x, 8))


def test_attention_downsampler_rejects_wrong_channel_count():
    with pytest.raises(ValueError, match=r"expected features of shape \[B, 6, H, W\]"):
        AttentionDownsampler(6, 4)(torch.randn(1, 5, 8, 8), (2, 2))


# ---------------------------------------------------------------- losses
def test_random_projection_rows_are_unit_vectors_and_seeded():
    p = random_projection(64, 30, generator=torch.Generator().manual_seed(1))
    assert p.shape == (30, 64)
    torch.testing.assert_close(p.norm(dim=1), torch.ones(30))
    assert torch.equal(p, random_projection(64, 30, generator=torch.Generator().manual_seed(1)))
    assert project(torch.randn(2, 64, 3, 5), p).shape == (2, 30, 3, 5)
    assert torch.equal(random_projection(4, 0), torch.eye(4))     # 0: compare all channels


def test_gaussian_nll_is_half_mse_at_unit_scale_and_rewards_calibrated_scale():
    a, b = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    mse = (a - b).square().mean()
    torch.testing.assert_close(gaussian_nll(a, b, torch.ones(2, 1, 3, 3)), mse / 2)
    torch.testing.assert_close(gaussian_nll(a, b), mse)
    err = (a - b).square().mean(1, keepdim=True)
    best = gaussian_nll(a, b, err.sqrt())            # s^2 = error minimizes the likelihood
    assert best < gaussian_nll(a, b, err.sqrt() * 1.5) and best < gaussian_nll(a, b, err.sqrt() / 1.5)


def test_scale_net_is_positive_and_starts_near_exp_point_one():
    s = ScaleNet(16)(torch.randn(2, 16, 4, 4))
    assert s.shape == (2, 1, 4, 4) and bool((s > 0).all())
    assert float((s.detach().log() - 0.1).abs().max()) < 0.5


def test_tv_loss_is_zero_for_constant_and_positive_for_edges():
    assert float(tv_loss(torch.ones(1, 2, 5, 5))) == 0.0
    x = torch.zeros(1, 1, 4, 4)
    x[..., 2:] = 1
    assert float(tv_loss(x)) > 0


# ---------------------------------------------------------------- checkpoints
def test_checkpoint_write_is_atomic_when_saving_fails(tmp_path, monkeypatch):
    path = tmp_path / "ck" / "last.pt"
    ckpt_mod.atomic_save({"step": 1}, path)

    def broken_save(obj, f, *a, **k):
        f.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt_mod.atomic_save({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=False) == {"step": 1}
    assert os.listdir(path.parent) == ["last.pt"]      # no temp file left behind


# ---------------------------------------------------------------- trainer
@pytest.mark.slow
def test_training_loss_decreases_on_a_tiny_run(tmp_path):
    data = _photo_folder(tmp_path / "data")
    hist = []
    train_upsampler(PatchSource(), data, steps=30, upsampler=GuidedUp(), history=hist, **KW)
    losses = [r["loss"] for r in hist]
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path):
    data = _photo_folder(tmp_path / "data")
    straight = train_upsampler(PatchSource(), data, steps=20, upsampler=GuidedUp(),
                               out_dir=tmp_path / "a", **KW)
    train_upsampler(PatchSource(), data, steps=10, upsampler=GuidedUp(), out_dir=tmp_path / "b",
                    checkpoint_every=10, **KW)
    resumed = train_upsampler(PatchSource(), data, steps=20, upsampler=GuidedUp(),
                              out_dir=tmp_path / "b", resume=tmp_path / "b", **KW)
    sa, sb = straight.state_dict(), resumed.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    first = GuidedUp().state_dict()
    assert any(not torch.equal(first[k], sa[k]) for k in sa)          # it did train
    a = torch.load(tmp_path / "a" / "checkpoints" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "checkpoints" / "last.pt", weights_only=False)
    assert a["step"] == b["step"] == 20
    assert [r["loss"] for r in a["history"]] == [r["loss"] for r in b["history"]]
    assert (tmp_path / "b" / "metrics.csv").read_text().count("\n") == 21


def test_training_at_half_resolution_features(tmp_path):
    data = _photo_folder(tmp_path / "data", n=2)
    hist = []
    up = train_upsampler(PatchSource(), data, steps=2, upsampler=GuidedUp(), hr_downscale=2,
                         history=hist, **KW)
    assert len(hist) == 2 and all(np.isfinite(r["loss"]) for r in hist)
    with pytest.raises(ValueError, match="hr_downscale .* got 3"):
        train_upsampler(PatchSource(), data, steps=1, upsampler=up, hr_downscale=3, **KW)


def test_bf16_autocast_trains_with_finite_loss(tmp_path):
    data = _photo_folder(tmp_path / "data", n=2)
    hist = []
    up = train_upsampler(PatchSource(), data, steps=2, upsampler=GuidedUp(), amp="bf16",
                         history=hist, **KW)
    assert len(hist) == 2 and all(np.isfinite(r["loss"]) for r in hist)
    assert all(p.dtype == torch.float32 for p in up.parameters())


def test_run_writes_metrics_and_pca_snapshots(tmp_path):
    data = _photo_folder(tmp_path / "data")
    kw = {**KW, "snapshots": True, "log_every": 2}
    train_upsampler(PatchSource(), data, steps=4, upsampler=GuidedUp(), out_dir=tmp_path / "run",
                    checkpoint_every=2, **kw)
    snaps = sorted(p.name for p in (tmp_path / "run" / "snapshots").iterdir())
    assert snaps == ["step_000002.png", "step_000004.png"]
    with Image.open(tmp_path / "run" / "snapshots" / snaps[0]) as im:
        assert im.size == (3 * 48, 32)
    lines = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert lines[0] == "step,loss,sec_per_step" and len(lines) == 3


# ---------------------------------------------------------------- errors before training
def test_empty_data_folder_is_an_error_before_training(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no readable images"):
        train_upsampler(PatchSource(), tmp_path / "empty", steps=1, upsampler=GuidedUp(), **KW)


def test_image_smaller_than_stride_is_an_error(tmp_path):
    data = _photo_folder(tmp_path / "data", n=1)
    Image.fromarray(np.zeros((5, 30, 3), np.uint8)).save(data / "sliver.png")
    with pytest.raises(ValueError, match=r"at least 8 px.*sliver\.png"):
        train_upsampler(PatchSource(), data, steps=1, upsampler=GuidedUp(), **KW)
    with pytest.raises(ValueError, match=r"image_size of at least the backbone's stride \(8 px\)"):
        train_upsampler(PatchSource(), data, steps=1, upsampler=GuidedUp(),
                        **{**KW, "image_size": (4, 40)})


def test_resume_from_another_backbone_is_an_error(tmp_path):
    data = _photo_folder(tmp_path / "data", n=2)
    train_upsampler(PatchSource(backbone_id="first"), data, steps=1, upsampler=GuidedUp(),
                    out_dir=tmp_path / "run", **KW)
    with pytest.raises(ValueError, match="trained for backbone 'first'.*uses backbone 'second'"):
        train_upsampler(PatchSource(backbone_id="second"), data, steps=2, upsampler=GuidedUp(),
                        resume=tmp_path / "run", **KW)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train_upsampler(PatchSource(), data, steps=2, upsampler=GuidedUp(),
                        resume=tmp_path / "nowhere", **KW)


def test_backbone_without_findable_features_is_an_error(tmp_path):
    data = _photo_folder(tmp_path / "data", n=1)
    with pytest.raises(ValueError, match="cannot find features for backbone 'Sequential'"):
        train_upsampler(nn.Sequential(nn.Linear(3, 3)), data, steps=1, **KW)


def test_bad_arguments_are_errors():
    with pytest.raises(ValueError, match="amp=None or 'bf16'"):
        train_upsampler(PatchSource(), None, steps=1, amp="fp8")
    with pytest.raises(ValueError, match="batch_size >= 1"):
        train_upsampler(PatchSource(), None, steps=1, batch_size=0)
