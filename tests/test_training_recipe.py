"""FeatUp's recipe items 7-8: the sampled CRF loss and the channel LayerNorm, in the trainer, the
saved config, ``wrap`` and the CLI."""
from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
import torch.nn.functional as F

from featup_adapters.training.cli import add_train_parser
from featup_adapters.training.losses import channel_norm, crf_loss
from featup_adapters.training.trainer import train_upsampler

from test_training import KW, GuidedUp, PatchSource, _photo_folder


def _crf_by_loops(feats, image, rows, cols, alpha=0.1, beta=0.15, gamma=0.005, w1=10.0, w2=3.0,
                  shift=0.0):
    """The spec's formula written out pair by pair in float64 (no vectorized distance tricks)."""
    B, _, H, W = feats.shape
    total, count = 0.0, 0
    for b in range(B):
        for i in range(len(rows)):
            for j in range(len(rows)):
                pi = (rows[i] / H, cols[i] / W)
                pj = (rows[j] / H, cols[j] / W)
                dp = (pi[0] - pj[0]) ** 2 + (pi[1] - pj[1]) ** 2
                xi, xj = image[b, :, rows[i], cols[i]], image[b, :, rows[j], cols[j]]
                dc = float(((xi - xj) ** 2).sum())
                fi, fj = feats[b, :, rows[i], cols[i]], feats[b, :, rows[j], cols[j]]
                df = float(((fi - fj) ** 2).sum())
                k = (w1 * math.exp(-dp / (2 * alpha) - dc / (2 * beta))
                     + w2 * math.exp(-dp / (2 * gamma)) - shift)
                total += df * k
                count += 1
    return total / count


def test_crf_loss_matches_the_pairwise_formula_with_normalized_positions():
    torch.manual_seed(0)
    feats = torch.randn(2, 3, 6, 10, dtype=torch.float64)
    image = torch.randn(2, 3, 6, 10, dtype=torch.float64)
    n = 9
    got = crf_loss(feats, image, n_samples=n, generator=torch.Generator().manual_seed(5))
    idx = torch.randint(0, 60, (n,), generator=torch.Generator().manual_seed(5))
    rows, cols = (idx // 10).tolist(), (idx % 10).tolist()
    want = _crf_by_loops(feats, image, rows, cols)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(want, rel=1e-9)
    # other constants reach the formula too (shift lowers every pair's weight by the same amount)
    got2 = crf_loss(feats, image, n_samples=n, generator=torch.Generator().manual_seed(5),
                    alpha=0.3, beta=0.5, gamma=0.02, w1=2.0, w2=1.0, shift=0.5)
    assert got2.item() == pytest.approx(_crf_by_loops(feats, image, rows, cols, 0.3, 0.5, 0.02,
                                                      2.0, 1.0, 0.5), rel=1e-9)


def test_crf_loss_positions_are_normalized_by_height_and_width_separately():
    # two pixels at the same relative offset in a 4x40 and a 40x4 map weigh the same
    feats_a = torch.zeros(1, 1, 4, 40, dtype=torch.float64)
    feats_a[0, 0, 0, 20] = 1.0
    img_a = torch.zeros(1, 3, 4, 40, dtype=torch.float64)
    feats_b, img_b = feats_a.transpose(2, 3).contiguous(), img_a.transpose(2, 3).contiguous()
    g = torch.Generator().manual_seed(0)
    a = crf_loss(feats_a, img_a, n_samples=200, generator=g)
    idx = torch.randint(0, 160, (200,), generator=torch.Generator().manual_seed(0))
    rows, cols = (idx // 40).tolist(), (idx % 40).tolist()
    assert a.item() == pytest.approx(_crf_by_loops(feats_a, img_a, rows, cols), rel=1e-9)
    # the 40x4 map with the transposed samples gives the identical value
    want_b = _crf_by_loops(feats_b, img_b, cols, rows)
    assert want_b == pytest.approx(a.item(), rel=1e-12)


def test_crf_loss_rewards_features_that_follow_colour_edges():
    H = W = 16
    image = torch.zeros(1, 3, H, W)
    image[..., :, W // 2:] = 2.0                               # a sharp vertical colour edge
    follows = (image[:, :1] > 0).float()                       # features change at the edge
    blurred = F.avg_pool2d(F.pad(follows, (3, 3, 3, 3), mode="replicate"), 7, 1)
    g = lambda: torch.Generator().manual_seed(1)               # noqa: E731
    assert crf_loss(follows, image, generator=g()) < crf_loss(blurred, image, generator=g())
    assert crf_loss(torch.ones(1, 4, H, W), image, generator=g()).item() == pytest.approx(0.0, abs=1e-5)


def test_crf_loss_pools_a_larger_guidance_and_has_finite_gradients():
    feats = torch.randn(2, 5, 8, 8, requires_grad=True)
    image = torch.randn(2, 3, 16, 16)
    loss = crf_loss(feats, image, n_samples=50, generator=torch.Generator().manual_seed(0))
    same = crf_loss(feats, F.adaptive_avg_pool2d(image, (8, 8)), n_samples=50,
                    generator=torch.Generator().manual_seed(0))
    assert torch.equal(loss, same)
    loss.backward()
    assert torch.isfinite(feats.grad).all() and feats.grad.abs().sum() > 0


def test_crf_loss_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"expected features \[B, n, H, W\].*got \[2, 5, 8\]"):
        crf_loss(torch.randn(2, 5, 8), torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="same B"):
        crf_loss(torch.randn(2, 5, 8, 8), torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="n_samples >= 1, got 0"):
        crf_loss(torch.randn(1, 5, 8, 8), torch.randn(1, 3, 8, 8), n_samples=0)


def test_channel_norm_is_a_fresh_layernorm_over_channels():
    x = torch.randn(2, 6, 3, 5)
    ln = torch.nn.LayerNorm(6)
    want = ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    assert torch.allclose(channel_norm(x), want, atol=1e-6)
    y = channel_norm(x)
    assert torch.allclose(y.mean(1), torch.zeros(2, 3, 5), atol=1e-5)


def test_trainer_uses_the_norm_and_crf_and_records_them(tmp_path):
    data = _photo_folder(tmp_path / "data", n=2)
    seen = []

    class Spy(GuidedUp):
        def forward(self, source, guidance, output_size=None):
            seen.append(source.detach())
            return super().forward(source, guidance, output_size)

    from featup_adapters.upsamplers import JBUStack
    run = tmp_path / "run"
    train_upsampler(PatchSource(), data, steps=1, upsampler=Spy(), **KW)
    assert torch.allclose(seen[-1].mean(1), torch.zeros_like(seen[-1][:, 0]), atol=1e-5)
    seen.clear()
    train_upsampler(PatchSource(), data, steps=1, upsampler=Spy(), use_norm=False, **KW)
    assert not torch.allclose(seen[-1].mean(1), torch.zeros_like(seen[-1][:, 0]), atol=1e-3)
    # CRF on/off changes the loss of the very same step
    h_on, h_off = [], []
    train_upsampler(PatchSource(), data, steps=1, upsampler=GuidedUp(), history=h_on, **KW)
    train_upsampler(PatchSource(), data, steps=1, upsampler=GuidedUp(), history=h_off,
                    crf_weight=0.0, **KW)
    assert h_on[0]["loss"] > h_off[0]["loss"]
    with pytest.raises(ValueError, match="crf_weight >= 0"):
        train_upsampler(PatchSource(), data, steps=1, upsampler=GuidedUp(), crf_weight=-1, **KW)
    # the saved config says use_norm; a resume with the other setting is refused
    train_upsampler(PatchSource(), data, steps=1, upsampler=JBUStack(8), out_dir=run, **KW)
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["use_norm"] is True
    assert cfg["extra"]["training"]["crf_weight"] == 0.001 and cfg["extra"]["training"]["use_norm"] is True
    with pytest.raises(ValueError, match="use_norm=True as in the checkpoint"):
        train_upsampler(PatchSource(), data, steps=2, upsampler=JBUStack(8), out_dir=run,
                        resume=run, use_norm=False, **KW)


def test_cli_switches_reach_the_trainer(monkeypatch):
    import featup_adapters.training.trainer as T

    got = {}
    monkeypatch.setattr(T, "train_upsampler", lambda *a, **k: got.update(k))
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    a = p.parse_args(["train", "--out", "o"])
    assert a.func(a) == 0 and got["crf_weight"] == 0.001 and got["use_norm"] is True
    a = p.parse_args(["train", "--out", "o", "--crf-weight", "0", "--no-norm"])
    assert a.func(a) == 0 and got["crf_weight"] == 0.0 and got["use_norm"] is False


def test_cli_init_starts_from_a_saved_upsampler(monkeypatch, tmp_path):
    import featup_adapters.training.trainer as T
    from featup_adapters.upsamplers import JBUStack

    torch.manual_seed(0)
    saved = JBUStack(8)
    saved.save_pretrained(tmp_path / "up")
    got = {}
    monkeypatch.setattr(T, "train_upsampler", lambda *a, **k: got.update(k))
    p = argparse.ArgumentParser()
    add_train_parser(p.add_subparsers(dest="command", required=True))
    a = p.parse_args(["train", "--out", "o", "--init", str(tmp_path / "up")])
    assert a.func(a) == 0
    for k, v in saved.state_dict().items():
        assert torch.equal(got["upsampler"].state_dict()[k], v), k
    a = p.parse_args(["train", "--out", "o", "--init", str(tmp_path / "missing")])
    with pytest.raises(Exception, match="missing"):
        a.func(a)
