"""``max_memory=`` / ``out_dtype=`` from the user-facing entry points: ``wrap``, ``FeatUpNeck``, the
``upsample`` command's ``--max-memory``, and the ``memory_size`` argparse type."""
from __future__ import annotations

import argparse
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import featup_adapters
from featup_adapters import _validate, cli
from featup_adapters.adapters import registry
from featup_adapters.neck import FeatUpNeck
from featup_adapters.upsamplers import JBUStack, _tiling, make_upsampler

torch.set_num_threads(1)


# -------------------------------------------------------------------------- the argparse type
@pytest.mark.parametrize("text,want", [("512MB", 512 * 10 ** 6), ("8GB", 8 * 10 ** 9),
                                       ("1.5GiB", int(1.5 * 2 ** 30)), ("4096", 4096),
                                       ("2e9", 2 * 10 ** 9), ("64 MiB", 64 * 2 ** 20),
                                       ("3g", 3 * 2 ** 30), ("10kb", 10_000)])
def test_memory_size_parses_units_and_plain_bytes(text, want):
    assert _validate.memory_size(text) == want
    assert _tiling.parse_max_memory(text) == want        # one parser for the API and the CLI


@pytest.mark.parametrize("bad", ["0", "-1", "-2GB", "0MB", "0.5", "abc", "", "GB", "nan", "inf",
                                 "1.5XB", "1,5GB", "GB8"])
def test_memory_size_refuses_zero_negative_and_garbage(bad):
    with pytest.raises(argparse.ArgumentTypeError, match=r"expected a memory size > 0.*got"):
        _validate.memory_size(bad)


def test_cli_refuses_a_bad_max_memory_in_one_line(capsys):
    assert cli.main(["upsample", "x.png", "--out", "o", "--max-memory", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "argument --max-memory: expected a memory size > 0" in err


# ------------------------------------------------------------------------------ wrap / the neck
class TinyCNN(nn.Module):
    """Stride-4, 8-channel features."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.stage = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU())

    def forward(self, x):
        return self.stage(self.stem(x))


class PlainUpsampler(nn.Module):
    """A user's module without max_memory/out_dtype (``**kwargs`` could drop them silently)."""

    def forward(self, source, guidance, output_size=None, **kwargs):
        return nn.functional.interpolate(source, size=output_size, mode="bilinear")


def _tiny_timm():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1,
                             dynamic_img_size=True).eval()


def _jbu(dim):
    torch.manual_seed(1)
    stack = JBUStack(dim, key_dim=8)
    with torch.no_grad():                       # not the identity-like init: kernels matter
        for p in stack.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return stack


def _spy(monkeypatch):
    calls = []
    real = _tiling.tiled_forward

    def spy(*args, **kwargs):
        calls.append(kwargs["band_rows"])
        return real(*args, **kwargs)

    monkeypatch.setattr(_tiling, "tiled_forward", spy)
    return calls


def test_wrap_max_memory_routes_a_timm_vit_to_the_tiled_path_with_equal_output(monkeypatch):
    model = _tiny_timm()
    images = torch.randn(2, 3, 64, 96)
    up = _jbu(192)
    calls = _spy(monkeypatch)
    with torch.no_grad():
        with featup_adapters.wrap(model, up) as neck:
            default, lowres = neck(images, return_lowres=True)
        assert calls == [], "a small output with the default budget is computed whole"
        plan = [s for _, s in up.stage_plan((4, 6), (64, 96))]
        est = _tiling.estimate_bytes(2, 192, plan, (4, 6), radius=3, key_dim=8, guidance_dim=3,
                                     elem=4, out_elem=4, grad=False)
        budget = est.tiled(8)                  # room for bands of a few rows only
        assert budget < est.untiled
        with featup_adapters.wrap(model, up, max_memory=budget) as neck:
            assert neck.upsampler_options == {"max_memory": budget}
            tiled = neck(images)
    assert len(calls) == 1 and 1 <= calls[0] < 64
    assert tiled.shape == default.shape == (2, 192, 64, 96)
    torch.testing.assert_close(tiled, default, rtol=1e-4, atol=1e-5)
    bilinear = nn.functional.interpolate(lowres, size=(64, 96), mode="bilinear")
    assert (default - bilinear).abs().max() > 1e-3, "the stack did more than a bilinear resize"


def test_wrap_max_memory_string_and_a_too_small_budget_is_refused_before_running():
    with featup_adapters.wrap(TinyCNN().eval(), "jbu", layer="stage", max_memory="2KB") as neck:
        assert neck.upsampler_options == {"max_memory": 2000}
        with torch.no_grad(), pytest.raises(_tiling.MemoryBudgetError,
                                            match=r"needs about .* but max_memory is"):
            neck(torch.randn(1, 3, 32, 48))


def test_wrap_out_dtype_reaches_the_stack():
    with featup_adapters.wrap(TinyCNN().eval(), "jbu", layer="stage",
                              out_dtype=torch.bfloat16) as neck, torch.no_grad():
        hr = neck(torch.randn(1, 3, 32, 48))
        ref = neck.upsampler(neck.features(torch.randn(1, 3, 32, 48)), torch.randn(1, 3, 32, 48))
    assert hr.dtype == torch.bfloat16 and ref.dtype == torch.float32


@pytest.mark.parametrize("upsampler", ["bilinear", "bicubic", PlainUpsampler()])
@pytest.mark.parametrize("option", [{"max_memory": "1GB"}, {"out_dtype": torch.float16}])
def test_an_explicit_option_for_an_upsampler_that_cannot_honour_it_is_refused(upsampler, option):
    name = next(iter(option))
    model = TinyCNN().eval()
    with pytest.raises(TypeError, match=rf"{name}= was given, but the upsampler \w+ cannot honour"):
        featup_adapters.wrap(model, upsampler, layer="stage", **option)
    assert not model._forward_hooks and not model._forward_pre_hooks   # the neck was removed
    # the same upsampler without the option works
    with featup_adapters.wrap(model, upsampler, layer="stage") as neck:
        assert neck(torch.randn(1, 3, 16, 20)).shape == (1, 8, 16, 20)


def test_a_replaced_upsampler_is_checked_at_forward():
    with featup_adapters.wrap(TinyCNN().eval(), "jbu", layer="stage", max_memory="1GB") as neck:
        neck.upsampler = make_upsampler("bilinear")
        with pytest.raises(TypeError, match="max_memory= was given"):
            neck(torch.randn(1, 3, 16, 20))


@pytest.mark.parametrize("kwargs,error,match", [
    ({"max_memory": "lots"}, ValueError, r"expected max_memory like 8GB"),
    ({"max_memory": 0}, ValueError, r"expected a positive max_memory"),
    ({"max_memory": -5}, ValueError, r"expected a positive max_memory"),
    ({"max_memory": True}, TypeError, r"expected max_memory as bytes"),
    ({"max_memory": [1]}, TypeError, r"expected max_memory as bytes"),
    ({"out_dtype": torch.int8}, TypeError, r"expected out_dtype as a floating torch.dtype"),
    ({"out_dtype": "float16"}, TypeError, r"expected out_dtype as a floating torch.dtype"),
])
def test_malformed_values_are_refused_at_wrap_time(monkeypatch, kwargs, error, match):
    from featup_adapters import neck as neck_module

    def no_backbone(*a, **k):
        raise AssertionError("the backbone must not be built for a malformed option")

    monkeypatch.setattr(neck_module, "resolve_backbone", no_backbone)
    with pytest.raises(error, match=match):
        featup_adapters.wrap("timm:resnet18", "jbu", **kwargs)


def test_the_neck_constructor_checks_the_options_too():
    from featup_adapters.adapters import adapter_for

    model = TinyCNN().eval()
    adapter = adapter_for(model, "stage")
    with pytest.raises(TypeError, match="cannot honour"):
        FeatUpNeck(model, make_upsampler("bilinear"), adapter, max_memory="1GB")
    neck = FeatUpNeck(model, JBUStack(8), adapter, max_memory="1GB", out_dtype=torch.float16)
    assert neck.upsampler_options == {"max_memory": 10 ** 9, "out_dtype": torch.float16}
    neck.remove()


# --------------------------------------------------------------------------------- the CLI flag
NAME = "tiny_max_memory_test"


@pytest.fixture()
def tiny(tmp_path):
    exec(textwrap.dedent(f"""
        import torch
        from torch import nn
        import featup_adapters

        class Tiny(nn.Module):
            def __init__(self):
                super().__init__()
                torch.manual_seed(0)
                self.body = nn.Conv2d(3, 4, 4, stride=4)

            def forward(self, x):
                return self.body(x)

        featup_adapters.register_backbone({NAME!r}, lambda **kw: Tiny(), layer="body",
                                          mean=(0.5,) * 3, std=(0.5,) * 3, patch_size=4,
                                          overwrite=True)
    """), {})
    rng = np.random.default_rng(0)
    path = tmp_path / "in" / "a.png"
    path.parent.mkdir()
    Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(path)
    yield path
    registry._REGISTRY.pop(NAME, None)


def _upsample(image, out, *extra):
    return cli.main(["upsample", str(image), "--out", str(out), "--backbone", NAME, "--no-pca",
                     "--workers", "0", "--quiet", *extra])


def test_cli_max_memory_too_small_is_one_line_and_exit_1(tiny, tmp_path, capsys):
    assert _upsample(tiny, tmp_path / "o", "--upsampler", "jbu", "--max-memory", "1KB") == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert err.startswith("featup-adapters upsample: error:") and "but max_memory is" in err
    assert not list((tmp_path / "o").glob("**/*.pt"))


def test_cli_max_memory_that_fits_writes_the_same_features(tiny, tmp_path, monkeypatch, capsys):
    calls = _spy(monkeypatch)
    assert _upsample(tiny, tmp_path / "a", "--upsampler", "jbu") == 0
    assert calls == []
    plan = [s for _, s in JBUStack(4).stage_plan((8, 10), (32, 40))]
    est = _tiling.estimate_bytes(1, 4, plan, (8, 10), radius=3, key_dim=32, guidance_dim=3,
                                 elem=4, out_elem=4, grad=False)
    assert est.tiled(8) < est.untiled
    assert _upsample(tiny, tmp_path / "b", "--upsampler", "jbu", "--max-memory",
                     str(est.tiled(8))) == 0
    assert len(calls) == 1, "the budget does not hold the untiled forward: the tiled path runs"
    a = torch.load(tmp_path / "a" / "a.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "a.pt", weights_only=True)
    assert a.shape == (4, 32, 40)
    # the backbone seeds torch when built, so both runs build the same fresh JBU stack
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_cli_max_memory_with_a_baseline_upsampler_is_refused(tiny, tmp_path, capsys):
    assert _upsample(tiny, tmp_path / "o", "--upsampler", "bilinear", "--max-memory", "4GB") == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "max_memory= was given" in err and "cannot honour" in err
