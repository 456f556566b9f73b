"""The `train` and `fit-implicit` sub-commands (parsers the featup-adapters CLI mounts)."""
from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from PIL import Image

from featup_adapters.training.cli import add_fit_implicit_parser, add_train_parser


def _parser():
    p = argparse.ArgumentParser(prog="featup-adapters")
    sub = p.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    add_fit_implicit_parser(sub)
    return p


def test_train_parser_reads_every_option():
    a = _parser().parse_args(["train", "--backbone", "timm:resnet18", "--data", "imgs", "--out", "o",
                              "--steps", "7", "--image-size", "96x128", "--amp", "bf16",
                              "--downsampler", "simple", "--resume", "o"])
    assert (a.backbone, a.data, a.out, a.steps, a.image_size, a.amp, a.downsampler, a.resume) == \
        ("timm:resnet18", "imgs", "o", 7, (96, 128), "bf16", "simple", "o")
    assert callable(a.func) and a.batch_size == 4 and a.n_jitters == 5


def test_bad_sizes_are_parser_errors(capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["train", "--out", "o", "--image-size", "big"])
    assert "expected a size like 224 or 224x320" in capsys.readouterr().err


def test_train_command_reports_an_empty_folder_before_training(tmp_path):
    (tmp_path / "empty").mkdir()
    a = _parser().parse_args(["train", "--backbone", "timm:resnet10t", "--no-pretrained", "--data",
                              str(tmp_path / "empty"), "--out", str(tmp_path / "o"), "--steps", "1"])
    with pytest.raises(ValueError, match="no readable images"):
        a.func(a)


@pytest.mark.slow
def test_fit_implicit_command_saves_features(tmp_path):
    pytest.importorskip("timm")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    a = _parser().parse_args(["fit-implicit", str(tmp_path / "x.png"), "--backbone",
                              "timm:resnet10t", "--no-pretrained", "--out", str(tmp_path / "f.pt"), "--steps", "2",
                              "--pca-dim", "4", "--no-progress", "--output-size", "24x32"])
    assert a.func(a) == 0
    feats = torch.load(tmp_path / "f.pt")
    assert feats.shape == (1, 512, 24, 32)
