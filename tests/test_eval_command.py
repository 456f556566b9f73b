"""`featup-adapters eval` through the CLI entry point, on a tiny registered backbone and tiny photos;
the boundary F-score and photo-textured mosaics it builds on."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import featup_adapters
from featup_adapters import cli
from featup_adapters.adapters import Layer, register_backbone
from featup_adapters.tasks.metrics import BoundaryMeter, label_boundaries
from featup_adapters.tasks.seg_data import TextureMosaic


class TinyConvNet(nn.Module):
    """A 'backbone': two strided convs, features [B, 6, H/8, W/8] at module 'body'."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 6, 4, 4), nn.Tanh(), nn.Conv2d(6, 6, 2, 2))

    def forward(self, x):
        return self.body(x)


@pytest.fixture
def tiny_backbone():
    name = "test_tiny_eval_net"
    register_backbone(name, TinyConvNet, layer=Layer("body"), mean=(0.5,) * 3, std=(0.5,) * 3,
                      patch_size=8, overwrite=True)
    yield name
    featup_adapters.adapters.registry._REGISTRY.pop(name, None)


def _photos(path, n=3):
    path.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        img = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
        img[:, :, i % 3] = 200          # each photo has its own colour cast
        Image.fromarray(img).save(path / f"p{i}.png")
    return path


ARGS = ["--image-size", "32", "--factor", "4", "--views", "1", "--probe-train", "3",
        "--probe-val", "2", "--probe-steps", "3"]


def test_eval_prints_a_table_and_writes_valid_json(tiny_backbone, tmp_path, capsys):
    from featup_adapters.upsamplers import JBUStack

    torch.manual_seed(0)
    JBUStack(6).save_pretrained(tmp_path / "up", use_norm=True)
    data = _photos(tmp_path / "photos")
    out = tmp_path / "e.json"
    assert cli.main(["eval", "--backbone", tiny_backbone, "--upsampler", str(tmp_path / "up"),
                     "--data", str(data), "--json", str(out), *ARGS]) == 0
    text = capsys.readouterr().out
    assert "mv error" in text and "x bilinear" in text and "probe mIoU" in text
    assert "range temperatures exp(range_temp): 1, 1" in text      # fresh stages: exp(0)
    raw = out.read_text()
    assert "NaN" not in raw and "Infinity" not in raw
    res = json.loads(raw)
    assert res["use_norm"] is True and res["output_size"] == [16, 16] and res["factor"] == 4
    assert res["held_out"] == ["p0.png", "p1.png", "p2.png"]
    assert set(res["multiview_error"]) == {"upsampler", "bilinear", "bicubic"}
    assert res["multiview_ratio"]["bilinear"] == 1.0
    assert all(v > 0 for v in res["multiview_error"].values())
    assert set(res["probe"]) == {"lowres", "bilinear", "upsampler"}
    for r in res["probe"].values():
        assert 0 <= r["miou"] <= 1 and 0 <= r["boundary_f"] <= 1
    assert res["probe_miou_gain_over_bilinear"] == pytest.approx(
        res["probe"]["upsampler"]["miou"] - res["probe"]["bilinear"]["miou"])
    assert len(res["range_temperatures"]) == 4      # one per stage of the stack


def test_eval_of_a_baseline_has_no_range_temperatures(tiny_backbone, tmp_path, capsys):
    data = _photos(tmp_path / "photos")
    assert cli.main(["eval", "--backbone", tiny_backbone, "--upsampler", "bicubic", "--data",
                     str(data), "--json", str(tmp_path / "e.json"), *ARGS]) == 0
    res = json.loads((tmp_path / "e.json").read_text())
    assert res["range_temperatures"] is None
    assert res["multiview_ratio"]["upsampler"] == pytest.approx(res["multiview_ratio"]["bicubic"])


@pytest.mark.parametrize("extra, message", [
    (["--factor", "3"], "expected a factor that divides the backbone's stride 8 (e.g. 4), got 3"),
    (["--factor", "16"], "expected a factor that divides the backbone's stride 8"),
    (["--image-size", "4"], "expected an image size of at least the stride 8"),
    (["--views", "0"], "expected factor, views, probe_train, probe_val, probe_steps >= 1"),
])
def test_eval_rejects_bad_options_with_one_line(tiny_backbone, tmp_path, capsys, extra, message):
    data = _photos(tmp_path / "photos")
    assert cli.main(["eval", "--backbone", tiny_backbone, "--upsampler", "bilinear", "--data",
                     str(data), *ARGS, *extra]) == 1
    err = capsys.readouterr().err
    assert "featup-adapters eval: error:" in err and message in err


def test_eval_needs_two_photos_and_an_existing_folder(tiny_backbone, tmp_path, capsys):
    data = _photos(tmp_path / "one", n=1)
    assert cli.main(["eval", "--backbone", tiny_backbone, "--upsampler", "bilinear", "--data",
                     str(data), *ARGS]) == 1
    assert "expected at least 2 held-out photos" in capsys.readouterr().err
    assert cli.main(["eval", "--backbone", tiny_backbone, "--upsampler", "bilinear", "--data",
                     str(tmp_path / "missing"), *ARGS]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["eval", "--backbone", tiny_backbone, "--upsampler", str(tmp_path / "no_up"),
                     "--data", str(data), *ARGS]) == 1
    assert cli.main(["eval", "--views", "x"]) == 2


def test_boundary_meter_counts_edges_within_the_tolerance():
    t = torch.zeros(1, 12, 12, dtype=torch.long)
    t[:, :, 6:] = 1                                  # true edge between columns 5 and 6
    shifted = torch.zeros_like(t)
    shifted[:, :, 8:] = 1                            # predicted edge 2 px to the right
    m = BoundaryMeter(tolerance=2)
    m.update(shifted, t)
    assert m.compute()["boundary_f"] == 1.0
    m = BoundaryMeter(tolerance=1)
    m.update(shifted, t)
    assert m.compute()["boundary_f"] == 0.0
    m = BoundaryMeter(tolerance=0)
    m.update(t, t)
    assert m.compute() == {"boundary_f": 1.0, "boundary_precision": 1.0, "boundary_recall": 1.0}
    m = BoundaryMeter()
    m.update(torch.zeros_like(t), t)                 # no predicted edge at all
    r = m.compute()
    assert r["boundary_f"] == 0.0 and r["boundary_recall"] == 0.0
    assert label_boundaries(t)[0, :, 5].all() and label_boundaries(t).sum() == 12
    ignored = t.clone()
    ignored[:, :, 6:] = 255
    assert not label_boundaries(ignored).any()
    with pytest.raises(ValueError, match="tolerance >= 0"):
        BoundaryMeter(-1)


def test_mosaic_from_given_textures_labels_each_region_by_its_source():
    red, blue = torch.zeros(3, 20, 30), torch.zeros(3, 20, 30)
    red[0], blue[2] = 1.0, 1.0
    ds = TextureMosaic(4, (24, 24), 2, textures=[red, blue], class_names=["red", "blue"], seed=3)
    assert ds.class_names == ["red", "blue"]
    for i in range(4):
        image, mask = ds[i]
        assert torch.equal(image[0] > 0.5, mask == 0) and torch.equal(image[2] > 0.5, mask == 1)
    with pytest.raises(ValueError, match=r"num_classes in \[2, 2\], got 3"):
        TextureMosaic(4, (24, 24), 3, textures=[red, blue])
    with pytest.raises(ValueError, match=r"textures of shape \[3, h, w\]"):
        TextureMosaic(4, (24, 24), 2, textures=[red, torch.zeros(20, 30)])
