"""Every command, through ``featup_adapters.cli.main``: a value the user gave is used or refused
(never replaced by a default), bad outputs are refused before any work, checkpoints are read
weights-only, Ctrl-C while saving exits 130, and missing optional packages say what to install."""
from __future__ import annotations

import json
import os
import signal
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from featup_adapters import cli
from featup_adapters.adapters import register_backbone
from featup_adapters.adapters.registry import _REGISTRY


class Tiny(nn.Module):
    def __init__(self, pretrained: bool = True):
        super().__init__()
        self.stage = nn.Sequential(nn.Conv2d(3, 6, 4, stride=4), nn.Tanh())

    def forward(self, x):
        return self.stage(x)


@pytest.fixture
def tiny():
    register_backbone("test_cli_tiny", Tiny, layer="stage", patch_size=4, overwrite=True)
    yield "test_cli_tiny"
    _REGISTRY.pop("test_cli_tiny", None)


@pytest.fixture
def photo(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "x.png"
    Image.fromarray(rng.integers(0, 255, (32, 40, 3), dtype=np.uint8)).save(path)
    return path


def _one_line(capfd, *needles, code=None):
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("argv, needle", [
    (["finetune-seg", "--out", "o", "--steps", "0"], "--steps: expected an integer >= 1, got '0'"),
    (["finetune-seg", "--out", "o", "--lr", "0"], "--lr: expected a finite number > 0, got '0'"),
    (["finetune-seg", "--out", "o", "--batch-size", "0"], "--batch-size: expected an integer >= 1"),
    (["probe", "--steps", "0"], "--steps: expected an integer >= 1"),
    (["probe", "--lr", "0"], "--lr: expected a finite number > 0"),
    (["probe", "--lr", "nan"], "--lr: expected a finite number > 0"),
    (["probe", "--val-fraction", "0"], "--val-fraction: expected a number between 0 and 1"),
    (["probe", "--num-classes", "1"], "--num-classes: expected at least 2 classes"),
    (["train", "--out", "o", "--steps", "0"], "--steps: expected an integer >= 1"),
    (["train", "--out", "o", "--steps", "1.5"], "--steps: expected an integer >= 1, got '1.5'"),
    (["train", "--out", "o", "--log-every", "0"], "--log-every: expected an integer >= 1"),
    (["train", "--out", "o", "--checkpoint-every", "0"], "--checkpoint-every: expected an integer >= 1"),
    (["train", "--out", "o", "--max-zoom", "0.5"], "--max-zoom: expected a zoom factor >= 1"),
    (["fit-implicit", "x.png", "--out", "f.pt", "--steps", "0"], "--steps: expected an integer >= 1"),
    (["upsample", "x.png", "--out", "o", "--batch-size", "0"], "--batch-size: expected an integer >= 1"),
    (["cam", "--class", ""], "--class: expected a non-empty value, got ''"),
    (["cam", "--class", "  "], "--class: expected a non-empty value"),
])
def test_numbers_and_names_the_user_gave_are_refused_when_unusable(argv, needle, capfd):
    assert cli.main(argv) == 2
    _one_line(capfd, needle)


def test_probe_and_finetune_use_the_given_steps_and_lr(monkeypatch, capfd, tmp_path):
    import featup_adapters.tasks.cli as tasks_cli
    import featup_adapters.tasks.probe as probe
    import featup_adapters.tasks.segmentation as seg

    seen = {}
    monkeypatch.setattr(tasks_cli, "load_data", lambda args: ([0], [0], 3, ["a", "b", "c"]))
    monkeypatch.setattr(probe, "linear_probe", lambda *a, **k: seen.update(probe=k) or
                        {"lowres": {"miou": 0.5, "pixel_acc": 0.5}})
    monkeypatch.setattr(seg, "build_segmentation_model", lambda *a, **k: object())
    monkeypatch.setattr(seg, "finetune", lambda *a, **k: seen.update(finetune=k) or
                        {"val": [(k["steps"], {"miou": float("nan"), "pixel_acc": 1.0, "iou": [1.0, float("nan")]})],
                         "losses": [], "seconds": 0.0, "first_step": 1})
    assert cli.main(["probe", "--steps", "7", "--lr", "0.003", "--methods", "lowres"]) == 0
    assert seen["probe"]["steps"] == 7 and seen["probe"]["lr"] == 0.003
    assert cli.main(["probe"]) == 0
    assert seen["probe"]["steps"] == 300 and seen["probe"]["lr"] == 0.01     # the documented defaults
    capfd.readouterr()
    out = tmp_path / "seg"
    assert cli.main(["finetune-seg", "--steps", "3", "--lr", "0.5", "--out", str(out)]) == 0
    assert seen["finetune"]["steps"] == 3 and seen["finetune"]["lr"] == 0.5
    text = (out / "metrics.json").read_text()
    metrics = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in metrics.json"))
    assert metrics["val"][0]["miou"] is None and metrics["val"][0]["iou"] == [1.0, None]


def test_probe_with_upsampler_none_and_methods_jbu_says_why(capfd, monkeypatch):
    import featup_adapters.tasks.cli as tasks_cli

    monkeypatch.setattr(tasks_cli, "load_data", lambda args: pytest.fail("data loaded before the check"))
    assert cli.main(["probe", "--upsampler", "none", "--methods", "jbu"]) == 1
    _one_line(capfd, "--methods jbu includes jbu, but --upsampler none skips it")
    from featup_adapters.tasks.probe import linear_probe
    with pytest.raises(ValueError, match="include 'jbu' but upsampler=None"):
        linear_probe(nn.Identity(), [], [], 2, upsampler=None, methods=["jbu"])


@pytest.mark.parametrize("argv", [["demo", "--out", "{d}"], ["cam", "--out", "{d}"], ["probe", "--json", "{d}"],
                                  ["fit-implicit", "x.png", "--out", "{d}"], ["train", "--out", "{f}"],
                                  ["finetune-seg", "--out", "{f}"]])
def test_an_unusable_output_path_is_refused_before_any_work(argv, tmp_path, capfd, monkeypatch):
    import featup_adapters.adapters.registry as registry
    import featup_adapters.tasks.cli as tasks_cli

    monkeypatch.setattr(registry, "resolve_backbone", lambda *a, **k: pytest.fail("backbone built"))
    monkeypatch.setattr(tasks_cli, "load_data", lambda args: pytest.fail("data loaded"))
    (tmp_path / "file").write_text("x")
    argv = [a.format(d=tmp_path, f=tmp_path / "file") for a in argv]
    assert cli.main(argv) == 1
    _one_line(capfd, "expects a", str(tmp_path))


def test_resume_reads_weights_only_and_refuses_code(tmp_path, tiny, photo, capfd):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"format": "featup_adapters.train/1", "payload": Evil()}, tmp_path / "evil.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "text.pt").write_text("step 100\n")
    def train(steps):
        return ["train", "--backbone", tiny, "--data", str(photo), "--image-size", "32", "--steps", str(steps),
                "--batch-size", "1", "--n-jitters", "1", "--no-snapshots", "--no-progress",
                "--out", str(tmp_path / "run")]

    base = train(2)
    for name, needle in [("evil.pt", "refusing to load"), ("empty.pt", "is empty (0 bytes)"),
                         ("text.pt", "is not a PyTorch checkpoint")]:
        assert cli.main(base + ["--resume", str(tmp_path / name)]) == 1
        _one_line(capfd, needle, name)
    assert not marker.exists()                                    # nothing was executed
    assert cli.main(train(1)) == 0                                # a real run: 1 step
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["optimizer"]["state"] and ckpt["rng"]["torch"].dtype == torch.uint8
    assert cli.main(base + ["--resume", str(tmp_path / "run")]) == 0   # resumed weights-only, to step 2
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["step"] == 2
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["extra"]["backbone_pretrained"] is True and "untrained" not in config["extra"]


def test_training_on_a_random_init_backbone_needs_no_pretrained(tmp_path, tiny, photo, capfd):
    from featup_adapters.adapters import create_backbone
    from featup_adapters.training import train_upsampler

    kw = dict(image_size=32, batch_size=1, n_jitters=1, snapshots=False, progress=False)
    with pytest.raises(ValueError, match="random-init.*pretrained=False"):
        train_upsampler(create_backbone(tiny, pretrained=False), photo, steps=1, **kw)
    with pytest.warns(RuntimeWarning, match="untrained"):
        train_upsampler(tiny, photo, steps=0, out_dir=tmp_path / "zero", pretrained=False, **kw)
    config = json.loads((tmp_path / "zero" / "config.json").read_text())
    assert config["extra"]["untrained"] is True and config["extra"]["backbone_pretrained"] is False
    for bad, error in [(1.5, TypeError), (-1, ValueError), (True, TypeError)]:
        with pytest.raises(error, match="steps"):
            train_upsampler(tiny, photo, steps=bad, **kw)
    assert cli.main(["train", "--backbone", tiny, "--no-pretrained", "--data", str(photo), "--image-size", "32",
                     "--steps", "1", "--batch-size", "1", "--n-jitters", "1", "--no-snapshots", "--no-progress",
                     "--out", str(tmp_path / "r")]) == 0
    assert json.loads((tmp_path / "r" / "config.json").read_text())["extra"]["backbone_pretrained"] is False


def test_ctrl_c_while_a_file_is_saved_exits_130_and_keeps_the_file(tmp_path, tiny, photo, capfd, monkeypatch):
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT is not Python's default handler here")
    real_save = torch.save

    def save_with_ctrl_c(obj, f, *a, **k):   # Ctrl-C arrives in the middle of the write
        signal.raise_signal(signal.SIGINT)
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save_with_ctrl_c)
    out = tmp_path / "f.pt"
    assert cli.main(["fit-implicit", str(photo), "--backbone", tiny, "--out", str(out), "--steps", "1",
                     "--pca-dim", "2", "--no-progress"]) == 130
    assert capfd.readouterr().err.strip().endswith("fit-implicit: interrupted")
    assert torch.load(out, weights_only=True).shape == (1, 6, 32, 40)   # complete, not half-written


def test_an_interrupt_turned_into_a_runtime_error_still_exits_130(monkeypatch, capfd):
    def boom(args):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos") from None

    import featup_adapters.cli as cli_module

    monkeypatch.setattr(cli_module, "run_list", boom)
    assert cli.main(["list"]) == 130
    assert "interrupted" in capfd.readouterr().err


def test_missing_optional_packages_say_what_to_install(monkeypatch, capfd):
    import featup_adapters.tasks.seg_data as seg_data
    from featup_adapters.adapters import default_backbone

    monkeypatch.setitem(sys.modules, "skimage", None)
    monkeypatch.setitem(sys.modules, "skimage.data", None)
    monkeypatch.setattr(seg_data, "_TEXTURES", None)
    with pytest.raises(ImportError, match="pip install scikit-image"):
        seg_data.TextureMosaic(2, (32, 32))[0]
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ImportError, match="pip install timm"):
        default_backbone()
    with pytest.raises(ImportError, match="timm:resnet18 needs timm.*pip install timm"):
        from featup_adapters.adapters import create_backbone
        create_backbone("timm:resnet18")


class Mean4(nn.Module):
    """Fixed weights: each feature cell is the mean of its 4x4 patch (per channel)."""

    def __init__(self, pretrained: bool = True):
        super().__init__()
        self.stage = nn.Conv2d(3, 3, 4, stride=4, groups=3, bias=False)
        nn.init.constant_(self.stage.weight, 1 / 16)

    def forward(self, x):
        return self.stage(x)


def test_upsample_and_demo_read_a_16bit_png_scaled_not_clipped(tmp_path, capfd):
    register_backbone("test_cli_mean4", Mean4, layer="stage", mean=(0.0,) * 3, std=(1.0,) * 3, patch_size=4,
                      overwrite=True)
    try:
        ramp = (np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) * 65535 // (32 * 32 - 1)).astype(np.uint16)
        Image.fromarray(ramp).save(tmp_path / "g16.png")
        assert cli.main(["upsample", str(tmp_path / "g16.png"), "--backbone", "test_cli_mean4", "--upsampler",
                         "bilinear", "--out", str(tmp_path / "o"), "--no-pca", "--no-progress"]) == 0
        feats = torch.load(tmp_path / "o" / "g16.pt", weights_only=True)            # [3, 32, 32]
        grey = torch.from_numpy(np.round(ramp / 65535 * 255) / 255).float()
        patches = grey.view(8, 4, 8, 4).mean((1, 3))
        expected = torch.nn.functional.interpolate(patches[None, None], size=(32, 32), mode="bilinear",
                                                   align_corners=False)[0, 0]
        torch.testing.assert_close(feats[0], expected, atol=1e-4, rtol=0)
        assert float(feats.mean()) < 0.6                    # clipped to white it was 1.0
        capfd.readouterr()
        assert cli.main(["demo", str(tmp_path / "g16.png"), "--backbone", "test_cli_mean4", "--upsampler",
                         "bilinear", "--size", "32", "--out", str(tmp_path / "d.png")]) == 0
        with Image.open(tmp_path / "d.png") as pic:
            left = np.asarray(pic.convert("L"))[:, :40]      # the image column of the panel
        assert len(np.unique(left)) > 50                    # a ramp of grey levels, not a white square
    finally:
        _REGISTRY.pop("test_cli_mean4", None)


def test_missing_packages_through_the_command_line(tiny, capfd, monkeypatch):
    import featup_adapters.tasks.seg_data as seg_data

    monkeypatch.setitem(sys.modules, "skimage", None)
    monkeypatch.setitem(sys.modules, "skimage.data", None)
    monkeypatch.setattr(seg_data, "_TEXTURES", None)
    assert cli.main(["probe", "--backbone", tiny, "--upsampler", "none", "--image-size", "32",
                     "--mosaic-samples", "2", "--steps", "1"]) == 1
    _one_line(capfd, "pip install scikit-image")
    monkeypatch.setitem(sys.modules, "timm", None)
    assert cli.main(["demo", "--out", "never.png"]) == 1
    _one_line(capfd, "pip install timm")
