"""scripts/multiview_ceiling.py: the per-photo fits (free map, the upsampler or a part of it) on a
tiny registered backbone, and the script's command line."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import featup_adapters
from featup_adapters.adapters import Layer, register_backbone
from featup_adapters.training.jitter import sample_jitter
from test_eval_command import TinyConvNet  # features [B, 6, H/8, W/8] at module 'body'

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "multiview_ceiling.py"


def _script():
    spec = importlib.util.spec_from_file_location("multiview_ceiling", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def setup(tmp_path):
    from featup_adapters.upsamplers import JBUStack

    name = "test_tiny_ceiling_net"
    register_backbone(name, TinyConvNet, layer=Layer("body"), mean=(0.5,) * 3, std=(0.5,) * 3,
                      patch_size=8, overwrite=True)
    torch.manual_seed(0)
    JBUStack(6).save_pretrained(tmp_path / "up")
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        img = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
        img[:, :, i] = 200
        Image.fromarray(img).save(photos / f"p{i}.png")
    yield name, tmp_path / "up", photos
    featup_adapters.adapters.registry._REGISTRY.pop(name, None)


def _neck_and_image(name, up):
    neck = featup_adapters.wrap(name, str(up)).eval()
    torch.manual_seed(1)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    return neck, x


@pytest.mark.parametrize("params", ["all", "fixup", "stages"])
def test_fit_upsampler_changes_only_the_chosen_parameters_and_lowers_the_fit_error(setup, params):
    mod = _script()
    name, up_dir, _ = setup
    neck, x = _neck_and_image(name, up_dir)
    before = {k: v.detach().clone() for k, v in neck.upsampler.named_parameters()}
    hr, curve, fitted = mod.fit_upsampler(neck, x, 2, fit_views=3, steps=8, lr=1e-2, seed=0,
                                          params=params)
    assert hr.shape == (6, 16, 16)
    assert curve[-1] < curve[0]
    for k, v in fitted.named_parameters():
        final = k.startswith("fixup_proj.")
        moved = not torch.equal(v.detach(), before[k])
        expect = params == "all" or (params == "fixup") == final
        if not expect:
            assert not moved, k
    moved = {k for k, v in fitted.named_parameters() if not torch.equal(v.detach(), before[k])}
    assert moved, "the fit changed nothing"
    if params == "fixup":
        assert moved <= {"fixup_proj.1.weight", "fixup_proj.1.bias"}
    # the neck's own upsampler is left as it was
    for k, v in neck.upsampler.named_parameters():
        assert torch.equal(v.detach(), before[k])
    neck.remove()


def test_fit_map_starts_from_bilinear_on_the_fit_views(setup):
    """The first point of the free map's curve is bilinear's error on the fit views, computed here
    independently: sum over views of |avgpool(t(bilinear)) - f(t(x))|^2 over the targets' spread."""
    mod = _script()
    name, up_dir, _ = setup
    neck, x = _neck_and_image(name, up_dir)
    _, curve = mod.fit_map(neck, x, 2, fit_views=3, steps=3, lr=0.05, seed=5)
    with torch.no_grad():
        src = neck.features(x).float()
        hr = F.interpolate(src, size=(16, 16), mode="bilinear", align_corners=False)
        g = torch.Generator().manual_seed(5)
        num = den = 0.0
        for _ in range(3):
            t = sample_jitter((16, 16), 10, 2.0, generator=g)
            target = neck.features(t.scaled(2)(x)).float()
            v = t(hr)
            h, w = target.shape[-2:]
            if tuple(v.shape[-2:]) != (4 * h, 4 * w):
                v = F.interpolate(v, size=(4 * h, 4 * w), mode="bilinear", align_corners=False)
            num += float((F.avg_pool2d(v, 4) - target).square().sum())
            den += float((target - target.mean(dim=(0, 2, 3), keepdim=True)).square().sum())
    assert curve[0] == pytest.approx(num / den, rel=1e-5)
    assert curve[-1] < curve[0]
    neck.remove()


def test_command_line_writes_the_table_as_json(setup, tmp_path, capsys):
    mod = _script()
    name, up_dir, photos = setup
    out = tmp_path / "ceiling.json"
    rc = mod.main(["--backbone", name, "--upsampler", str(up_dir), "--data", str(photos),
                   "--image-size", "32", "--factor", "4", "--views", "2", "--fit-views", "2",
                   "--steps", "3", "--fit", "upsampler", "--fit-params", "fixup",
                   "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    errs = res["multiview_error"]
    assert set(errs) == {"upsampler fitted", "upsampler", "bilinear"}
    assert all(np.isfinite(v) and v > 0 for v in errs.values())
    assert len(res["fit_view_error"]) == 2
    assert "upsampler fitted" in capsys.readouterr().out


def test_fit_params_without_such_parameters_is_refused(setup):
    from featup_adapters.upsamplers import UniversalJBUStack

    mod = _script()
    name, up_dir, _ = setup
    neck, x = _neck_and_image(name, up_dir)
    neck.upsampler = UniversalJBUStack()
    with pytest.raises(SystemExit, match="no such parameters"):
        mod.fit_upsampler(neck, x, 2, fit_views=1, steps=1, lr=1e-2, seed=0, params="fixup")
    neck.remove()


def test_shared_fit_is_one_upsampler_for_every_photo(setup, tmp_path, capsys):
    mod = _script()
    name, up_dir, photos = setup
    neck, x = _neck_and_image(name, up_dir)
    x2 = torch.flip(x, dims=[-1])
    before = {k: v.detach().clone() for k, v in neck.upsampler.named_parameters()}
    up, curve = mod.fit_upsampler_shared(neck, [x, x2], 2, fit_views=2, steps=8, lr=1e-2,
                                         seeds=[0, 1], params="stages")
    assert curve[-1] < curve[0]
    assert not up.training
    moved = {k for k, v in up.named_parameters() if not torch.equal(v.detach(), before[k])}
    assert moved and not any(k.startswith("fixup_proj.") for k in moved)
    neck.remove()
    out = tmp_path / "shared.json"
    rc = mod.main(["--backbone", name, "--upsampler", str(up_dir), "--data", str(photos),
                   "--image-size", "32", "--factor", "4", "--views", "2", "--fit-views", "2",
                   "--steps", "2", "--fit", "upsampler", "--shared", "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert set(res["multiview_error"]) == {"upsampler fitted (shared)", "upsampler", "bilinear"}
    assert len(res["fit_view_error"]) == 1


def test_shared_needs_an_upsampler_fit(setup, capsys):
    mod = _script()
    name, up_dir, photos = setup
    with pytest.raises(SystemExit) as e:
        mod.main(["--backbone", name, "--upsampler", str(up_dir), "--data", str(photos), "--shared"])
    assert e.value.code == 2
    assert "--fit upsampler" in capsys.readouterr().err


def test_fit_data_fits_on_other_photos_and_scores_the_evaluated_ones(setup, tmp_path):
    mod = _script()
    name, up_dir, photos = setup
    other = tmp_path / "other"
    other.mkdir()
    rng = np.random.default_rng(7)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(other / f"o{i}.png")
    out = tmp_path / "fitdata.json"
    rc = mod.main(["--backbone", name, "--upsampler", str(up_dir), "--data", str(photos),
                   "--fit-data", str(other), "--image-size", "32", "--factor", "4", "--views", "2",
                   "--fit-views", "2", "--steps", "2", "--fit", "upsampler", "--shared",
                   "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["args"]["fit_data"] == str(other)
    assert set(res["multiview_error"]) == {"upsampler fitted (shared)", "upsampler", "bilinear"}


def test_fit_data_needs_a_shared_fit(setup, capsys):
    mod = _script()
    name, up_dir, photos = setup
    with pytest.raises(SystemExit) as e:
        mod.main(["--backbone", name, "--upsampler", str(up_dir), "--data", str(photos),
                  "--fit", "upsampler", "--fit-data", str(photos)])
    assert e.value.code == 2
    assert "--shared" in capsys.readouterr().err
