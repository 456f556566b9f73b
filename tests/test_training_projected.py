"""Training on projected features: ``JBUStack.forward_projected``, the downsamplers'
``forward_projected`` and ``MultiViewObjective``'s projected path give what the full-channel
computation gives (float64, same random draws), and the crop-only jitter equals pad + resize + crop."""
from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from featup_adapters.training.cli import add_train_parser
from featup_adapters.training.downsamplers import (AttentionDownsampler, SimpleDownsampler,
                                                   make_downsampler)
from featup_adapters.training.jitter import Jitter, apply_jitter, sample_jitter
from featup_adapters.training.losses import ScaleNet, random_projection
from featup_adapters.training.trainer import (MultiViewObjective, resolve_downsampler_dropout,
                                              train_upsampler)
from featup_adapters.upsamplers import JBUStack, UniversalJBUStack

from test_training import KW, PatchSource, _photo_folder


def _perturbed(module: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def _jitter_by_definition(x, t: Jitter):
    """Reflect pad the whole map, resize all of it, crop, flip (what ``apply_jitter`` stands for)."""
    H, W = t.size
    if t.pad > 0:
        x = F.pad(x, (t.pad,) * 4, mode="reflect")
    if tuple(x.shape[-2:]) != tuple(t.zoomed):
        x = F.interpolate(x, size=t.zoomed, mode="bilinear", align_corners=False)
    x = x[..., t.top:t.top + H, t.left:t.left + W]
    return x.flip(-1) if t.flip else x


@pytest.mark.parametrize("size", [(40, 56), (5, 9), (33, 17), (1, 7), (64, 64)])
def test_crop_only_jitter_equals_pad_resize_crop(size):
    torch.manual_seed(0)
    zoomed = flipped = 0
    for s in range(60):
        t = sample_jitter(size, 20, 2.0, generator=torch.Generator().manual_seed(s))
        x = torch.randn(2, 3, *size, dtype=torch.float64, requires_grad=True)
        y, ref = apply_jitter(x, t), _jitter_by_definition(x, t)
        torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)
        g = torch.randn_like(ref)
        ga, = torch.autograd.grad(y, x, g)
        gb, = torch.autograd.grad(ref, x, g)
        torch.testing.assert_close(ga, gb, rtol=0, atol=1e-12)
        zoomed += tuple(t.zoomed) != (size[0] + 2 * t.pad, size[1] + 2 * t.pad)
        flipped += t.flip
    assert zoomed and flipped                       # both routes (grid_sample, indexing) ran


def test_crop_only_jitter_in_float32_and_without_zoom_is_exact_indexing():
    x = torch.randn(2, 5, 24, 30)
    t = Jitter((24, 30), 6, (36, 42), 3, 11, True)          # pad, no zoom, flip
    assert torch.equal(apply_jitter(x, t), _jitter_by_definition(x, t))
    t = Jitter((24, 30), 6, (61, 77), 20, 9, False)         # zoomed: grid_sample in float32
    torch.testing.assert_close(apply_jitter(x, t), _jitter_by_definition(x, t), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [lambda: JBUStack(12), lambda: UniversalJBUStack()],
                         ids=["jbu", "universal"])
@pytest.mark.parametrize("training", [False, True])
def test_forward_projected_equals_projecting_the_output(make, training):
    torch.manual_seed(0)
    up = _perturbed(make().double()).train(training)
    src = torch.randn(2, 12, 5, 7, dtype=torch.float64, requires_grad=True)
    img = torch.randn(2, 3, 80, 112, dtype=torch.float64)
    weight = torch.randn(4, 12, dtype=torch.float64)
    bias = torch.randn(4, dtype=torch.float64)
    torch.manual_seed(3)                                    # the same dropout draws in both
    full = torch.einsum("nc,bchw->bnhw", weight, up(src, img)) + bias.view(1, -1, 1, 1)
    torch.manual_seed(3)
    proj = up.forward_projected(src, img, weight, bias)
    assert proj.shape == (2, 4, 80, 112)
    torch.testing.assert_close(proj, full, rtol=0, atol=1e-11)
    g = torch.randn_like(full)
    params = [src] + [p for p in up.parameters()]
    ga = torch.autograd.grad(full, params, g, allow_unused=True)
    gb = torch.autograd.grad(proj, params, g, allow_unused=True)
    for a, b in zip(ga, gb):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, rtol=0, atol=1e-10)
    # at another output size and without bias
    torch.manual_seed(3)
    full = torch.einsum("nc,bchw->bnhw", weight, up(src, img, (37, 50)))
    torch.manual_seed(3)
    torch.testing.assert_close(up.forward_projected(src, img, weight, output_size=(37, 50)), full,
                               rtol=0, atol=1e-11)


def test_forward_projected_with_a_hooked_fixup_keeps_the_hook_and_the_result():
    torch.manual_seed(0)
    up = _perturbed(JBUStack(6).double()).eval()
    calls = []
    up.fixup_proj.register_forward_hook(lambda m, i, o: calls.append(o.shape))
    src, img = torch.randn(1, 6, 4, 4, dtype=torch.float64), torch.randn(1, 3, 32, 32, dtype=torch.float64)
    w = torch.randn(2, 6, dtype=torch.float64)
    out = up.forward_projected(src, img, w)
    assert calls == [torch.Size([1, 6, 32, 32])]           # FeatUp's order: the fixup on the output
    torch.testing.assert_close(out, torch.einsum("nc,bchw->bnhw", w, up(src, img)))


def test_forward_projected_rejects_a_weight_of_the_wrong_width():
    up = JBUStack(6)
    with pytest.raises(ValueError, match=r"expected weight of shape \[n, 6\], got \[2, 5\]"):
        up.forward_projected(torch.randn(1, 6, 4, 4), torch.randn(1, 3, 16, 16), torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"expected bias of shape \[2\], got \[3\]"):
        up.forward_projected(torch.randn(1, 6, 4, 4), torch.randn(1, 3, 16, 16), torch.randn(2, 6),
                             torch.randn(3))


@pytest.mark.parametrize("kind", ["simple", "attention"])
@pytest.mark.parametrize("hw", [(16, 24), (13, 19)])            # exact patches, and a resize
def test_downsamplers_on_projections_equal_projected_downsampling(kind, hw):
    torch.manual_seed(0)
    C, k, out = 9, 4, (4, 6)
    ds = _perturbed(make_downsampler(kind, C, k, dropout=0.0).double()).train()
    hr = torch.randn(2, C, *hw, dtype=torch.float64)
    proj = torch.randn(5, C, dtype=torch.float64)
    full = torch.einsum("nc,bchw->bnhw", proj, ds(hr, out))
    lin = ds.linear_inputs()
    values = torch.einsum("nc,bchw->bnhw", proj, hr)
    extra = None
    if kind == "attention":
        w, b = lin
        extra = torch.einsum("nc,bchw->bnhw", w, hr) + b.view(1, -1, 1, 1)
    else:
        assert lin == ()
    torch.testing.assert_close(ds.forward_projected(values, extra, out), full, rtol=0, atol=1e-12)


def test_attention_downsampler_with_dropout_offers_no_projection_while_training():
    ds = AttentionDownsampler(8, 4, dropout=0.1)
    assert ds.linear_inputs() is None
    assert ds.eval().linear_inputs() is not None
    assert AttentionDownsampler(8, 4, dropout=0.0).linear_inputs() is not None
    with pytest.raises(ValueError, match=r"dropout in \[0, 1\), got 1.0"):
        AttentionDownsampler(8, 4, dropout=1.0)
    with pytest.raises(ValueError, match="expected values"):
        AttentionDownsampler(8, 4, dropout=0.0).forward_projected(torch.randn(1, 3, 8, 8), None, (2, 2))


@pytest.mark.parametrize("kind", ["simple", "attention"])
@pytest.mark.parametrize("make", [lambda: JBUStack(24), lambda: UniversalJBUStack()],
                         ids=["jbu", "universal"])
def test_objective_projected_path_gives_the_full_loss_and_gradients(kind, make):
    torch.manual_seed(0)
    C = 24
    obj = _perturbed(MultiViewObjective(make(), make_downsampler(kind, C, 8, 0.0), ScaleNet(C),
                                        crf_weight=0.01).double()).train()
    lowres = torch.randn(2, C, 5, 6, dtype=torch.float64)
    img = torch.randn(2, 3, 40, 48, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    views = [(sample_jitter((40, 48), 4, 2.0, generator=g),
              torch.randn(2, C, 5, 6, dtype=torch.float64)) for _ in range(4)]
    proj = random_projection(C, 5, generator=g, dtype=torch.float64)
    calls = []
    fp = obj.upsampler.forward_projected
    obj.upsampler.forward_projected = lambda *a, **k: calls.append(1) or fp(*a, **k)
    results = []
    for projected in (True, False):
        obj.projected = projected
        torch.manual_seed(5)
        loss = obj(lowres, img, views, proj, crf_generator=torch.Generator().manual_seed(3))
        results.append((loss, torch.autograd.grad(loss, list(obj.parameters()), allow_unused=True)))
    assert calls == [1]                                    # the projected path did run, once
    (la, ga), (lb, gb) = results
    torch.testing.assert_close(la, lb, rtol=1e-12, atol=0)
    for a, b in zip(ga, gb):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-14)


def test_objective_keeps_the_full_path_when_projection_cannot_apply():
    C = 8
    up = JBUStack(C)
    called = []
    up.forward_projected = lambda *a, **k: called.append(1)
    img, lowres = torch.randn(1, 3, 32, 32), torch.randn(1, C, 4, 4)
    views = [(sample_jitter((32, 32), 2, 1.5), torch.randn(1, C, 4, 4))]
    for obj in (MultiViewObjective(up, AttentionDownsampler(C, 8, dropout=0.1), ScaleNet(C)).train(),
                MultiViewObjective(up, SimpleDownsampler(8), ScaleNet(C), tv_weight=0.1),
                MultiViewObjective(up, SimpleDownsampler(8), ScaleNet(C), projected=False)):
        assert torch.isfinite(obj(lowres, img, views, random_projection(C, 3)))
    # as many projections as channels: nothing to save, the full path runs
    obj = MultiViewObjective(up, SimpleDownsampler(8), ScaleNet(C))
    assert torch.isfinite(obj(lowres, img, views, random_projection(C, 0)))
    assert called == []


def test_downsampler_dropout_default_follows_the_resumed_run():
    assert resolve_downsampler_dropout(None, None) == 0.0
    assert resolve_downsampler_dropout(0.2, None) == 0.2
    assert resolve_downsampler_dropout(None, {"downsampler_dropout": 0.3}) == 0.3
    assert resolve_downsampler_dropout(None, {"use_norm": True}) == 0.1    # older runs: 0.1
    with pytest.raises(ValueError, match=r"downsampler_dropout=0.1 as in the checkpoint"):
        resolve_downsampler_dropout(0.0, {}, "run")
    with pytest.raises(ValueError, match=r"downsampler_dropout in \[0, 1\)"):
        resolve_downsampler_dropout(1.5, None)


def test_trainer_records_the_downsampler_dropout_and_refuses_a_changed_resume(tmp_path):
    data = _photo_folder(tmp_path / "data", n=2)
    run = tmp_path / "run"
    kw = {**KW, "downsampler": "attention"}
    train_upsampler(PatchSource(), data, steps=1, upsampler=JBUStack(8), out_dir=run, **kw)
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert ckpt["config"]["downsampler_dropout"] == 0.0
    assert ckpt["model"]["downsampler.attention_net.1.weight"].shape == (1, 8, 1, 1)
    with pytest.raises(ValueError, match="downsampler_dropout=0.0 as in the checkpoint"):
        train_upsampler(PatchSource(), data, steps=2, upsampler=JBUStack(8), out_dir=run,
                        resume=run, downsampler_dropout=0.1, **kw)
    with pytest.raises(ValueError, match=r"downsampler_dropout in \[0, 1\)"):
        train_upsampler(PatchSource(), data, steps=1, downsampler_dropout=2.0, **kw)
    train_upsampler(PatchSource(), data, steps=2, upsampler=JBUStack(8), out_dir=run, resume=run, **kw)


def test_cli_downsampler_dropout_reaches_the_trainer(monkeypatch, capsys):
    import featup_adapters.training.trainer as T

    got = {}
    monkeypatch.setattr(T, "train_upsampler", lambda *a, **k: got.update(k))
    p = argparse.ArgumentParser()
    add_train_parser(p.add_subparsers(dest="command", required=True))
    a = p.parse_args(["train", "--out", "o"])
    assert a.func(a) == 0 and got["downsampler_dropout"] is None
    a = p.parse_args(["train", "--out", "o", "--downsampler-dropout", "0.2"])
    assert a.func(a) == 0 and got["downsampler_dropout"] == 0.2
    with pytest.raises(SystemExit):
        p.parse_args(["train", "--out", "o", "--downsampler-dropout", "1"])
    assert "expected a probability in [0, 1), got '1'" in capsys.readouterr().err


def test_take_columns_equals_index_select_for_any_index_vector():
    from featup_adapters.training.jitter import _take_columns

    x = torch.randn(2, 3, 4, 11, dtype=torch.float64, requires_grad=True)
    cases = [[3, 2, 1, 0, 1, 2, 3, 4, 5, 6, 7], [10, 9, 8, 7], [4, 5, 6, 7, 8, 9, 10, 9, 8],
             [5], [0, 2, 4, 6, 8, 10], [1, 1, 2, 3], [7, 3, 9, 0, 2, 2]]   # last 3: other gathers
    for idx in cases:
        idx = torch.tensor(idx)
        y, ref = _take_columns(x, idx), x.index_select(-1, idx)
        assert torch.equal(y, ref)
        g = torch.randn_like(ref)
        torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(ref, x, g)[0],
                                   rtol=0, atol=1e-12)
