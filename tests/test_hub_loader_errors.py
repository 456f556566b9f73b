"""Bad files given to the hub's loaders: each is named in one clear error, nothing is executed,
and every loader returns eval mode."""
from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

from featup_adapters import cli, hub
from featup_adapters.hub import CheckpointError
from featup_adapters.upsamplers import JBUStack, make_upsampler
from test_featup_checkpoint import random_featup_state, write_featup_checkpoint

warnings.filterwarnings("ignore", message=".*runs the pure PyTorch reference.*")


def _saved(tmp_path, name="up"):
    stack = JBUStack(8)
    stack.load_state_dict(random_featup_state(8))
    return stack.save_pretrained(tmp_path / name)


def _edit_config(directory, change):
    path = directory / "config.json"
    cfg = json.loads(path.read_text())
    change(cfg)
    path.write_text(json.dumps(cfg))
    return path


def test_an_empty_file_is_named_empty(tmp_path):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    for load in (hub.load_upsampler, hub.load_featup_checkpoint, hub.safe_torch_load):
        with pytest.raises(CheckpointError, match=r"empty\.pt is empty \(0 bytes\): not a checkpoint"):
            load(empty)


@pytest.mark.parametrize("content, says", [
    (b"step,loss\n1,0.5\n", r"notes\.pt is not a PyTorch checkpoint .*first bytes are b'step,los'"),
    (b"PK\x03\x04 truncated zip", r"notes\.pt is not a PyTorch checkpoint"),
    (b"\x80\x04K\x01.", r"notes\.pt is not a readable PyTorch checkpoint"),   # a bare pickle
])
def test_a_file_that_is_not_a_checkpoint_says_so(tmp_path, content, says):
    path = tmp_path / "notes.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=says):
        hub.load_upsampler(path)


def test_a_torch_file_without_a_state_dict_says_what_it_holds(tmp_path):
    torch.save(3, tmp_path / "three.pt")
    with pytest.raises(CheckpointError, match=r"three\.pt is not a FeatUp checkpoint: it holds a int"):
        hub.load_upsampler(tmp_path / "three.pt")


def test_a_safetensors_file_alone_points_to_its_folder(tmp_path):
    from safetensors.torch import save_file
    path = tmp_path / "weights.bin"
    save_file({"a": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match="is a safetensors file: pass the folder"):
        hub.load_featup_checkpoint(path)


def test_a_legacy_pickle_that_runs_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "legacy.pt"
    torch.save({"state_dict": Evil()}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="weights_only=True failed"):
        hub.load_upsampler(path)
    assert not marker.exists()


def test_the_cli_says_empty_in_one_line(tmp_path, capfd):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    assert cli.main(["demo", "--upsampler", str(empty), "--out", str(tmp_path / "d.png")]) == 1
    lines = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("featup-adapters demo: error:"), lines
    assert "empty.pt is empty (0 bytes): not a checkpoint" in lines[0]


@pytest.mark.parametrize("change, says", [
    (lambda c: c.pop("init"), r"config\.json: missing key 'init'"),
    (lambda c: c.update(colour="red"), r"config\.json: unknown key 'colour'.*under \"extra\""),
    (lambda c: c.update(init=[8, 4]), r"config\.json: key 'init' must be an object, got a list"),
    (lambda c: c.update(format_version="abc"),
     r"config\.json: key 'format_version' must be an integer, got a string \(\"abc\"\)"),
    (lambda c: c.update(format_version=99), r"format_version 99 .* upgrade featup_adapters"),
    (lambda c: c.update(use_norm="yes"), r"key 'use_norm' must be true/false, got a string"),
    (lambda c: c.update(dim=True), r"key 'dim' must be an integer or null, got a boolean"),
    (lambda c: c["init"].update(colour=3), r"key 'init' does not build a JBUStack: .*colour"),
    (lambda c: c.update({"class": "Nope"}), r"unknown upsampler class 'Nope'"),
])
def test_a_bad_config_names_the_file_and_the_key(tmp_path, change, says):
    d = _saved(tmp_path)
    path = _edit_config(d, change)
    with pytest.raises(CheckpointError, match=says) as info:
        hub.load_upsampler(d)
    assert str(path) in str(info.value)


def test_a_config_that_is_not_an_object_is_named(tmp_path):
    d = _saved(tmp_path)
    (d / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"config\.json: expected a JSON object, got a list"):
        hub.load_upsampler(d)


def test_an_empty_name_is_refused_not_taken_as_the_current_folder(tmp_path, monkeypatch):
    _saved(tmp_path, ".")                       # a saved upsampler in the current folder
    monkeypatch.chdir(tmp_path)
    assert isinstance(hub.load_upsampler("."), JBUStack)
    for empty in ("", "  "):
        with pytest.raises(CheckpointError, match="got an empty string"):
            hub.load_upsampler(empty)
    with pytest.raises(CheckpointError, match="got an empty string"):
        hub.load_featup_checkpoint("")
    with pytest.raises(ValueError, match="got an empty string"):
        hub.register_upsampler("mine/empty", "")


def test_every_loader_returns_eval_mode(tmp_path, monkeypatch):
    d = _saved(tmp_path)
    ckpt = write_featup_checkpoint(tmp_path / "f.ckpt", random_featup_state(8), monkeypatch)
    loaded = [hub.load_upsampler(d), hub.load_upsampler(d / "config.json"),
              hub.load_upsampler(ckpt), hub.load_featup_checkpoint(ckpt),
              hub.load_upsampler("bilinear"), hub.load_saved_upsampler(d)]
    for up in loaded:
        assert not up.training and not any(m.training for m in up.modules()), type(up)
    # and a module passed in is left as it is
    fresh = make_upsampler("bicubic")
    assert hub.load_upsampler(fresh) is fresh and fresh.training
