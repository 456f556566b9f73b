"""``featup-adapters upsample`` at scale: output names, one tensor per file, the manifest, reruns,
a killed run resuming, and two processes under torchrun (gloo on CPU).

A tiny registered backbone (one strided conv) on 16x20 images keeps every run to seconds.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from featup_adapters import cli
from featup_adapters.adapters import registry

NAME = "tiny_extract_test"
_TINY = textwrap.dedent(f"""
    import os, sys, time
    import torch
    from torch import nn
    import featup_adapters

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.body = nn.Conv2d(3, 4, 4, stride=4)

        def forward(self, x):
            time.sleep(float(os.environ.get("TINY_DELAY", "0")))
            return self.body(x)

    featup_adapters.register_backbone({NAME!r}, lambda **kw: Tiny(), layer="body", mean=(0.5,) * 3,
                                      std=(0.5,) * 3, patch_size=4, overwrite=True)
""")
BASE = ["--backbone", NAME, "--upsampler", "bilinear", "--no-pca"]
ARGS = BASE + ["--workers", "0", "--quiet"]


@pytest.fixture()
def tiny():
    namespace: dict = {}
    exec(_TINY, namespace)
    yield
    registry._REGISTRY.pop(NAME, None)


def _images(root: Path, names, size=(16, 20)) -> list[Path]:
    rng = np.random.default_rng(0)
    out = []
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
        out.append(path)
    return out


def _manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def _script(tmp_path: Path) -> Path:
    script = tmp_path / "tiny_cli.py"
    script.write_text(_TINY + "\nfrom featup_adapters.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    return script


def _env(**extra) -> dict:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


# ---------------------------------------------------------------------------------------------
# in this process
# ---------------------------------------------------------------------------------------------

def test_same_file_names_in_different_folders_give_distinct_files_of_one_image_each(tiny, tmp_path, capsys):
    imgs = _images(tmp_path / "in", ["a/x.png", "b/x.png", "x_1.png"])
    out = tmp_path / "out"
    assert cli.main(["upsample", *map(str, imgs), "--out", str(out), "--batch-size", "3", *ARGS]) == 0
    assert "wrote 3 feature file(s)" in capsys.readouterr().out
    for rel in ("a/x.pt", "b/x.pt", "x_1.pt"):
        feats = torch.load(out / rel, weights_only=True)
        assert feats.shape == (4, 16, 20) and feats.dtype == torch.float32
        # the file holds this image's tensor only, not the batch of 3 it was computed in
        assert feats.untyped_storage().nbytes() == 4 * 16 * 20 * 4
        assert (out / rel).stat().st_size < 1.5 * 4 * 16 * 20 * 4
    assert sorted(r["file"] for r in _manifest(out)) == ["a/x.pt", "b/x.pt", "x_1.pt"]
    a, b = (torch.load(out / r, weights_only=True) for r in ("a/x.pt", "b/x.pt"))
    assert not torch.equal(a, b)  # two different images, two different maps


def test_folder_is_searched_recursively_and_a_list_file_names_images(tiny, tmp_path):
    imgs = _images(tmp_path / "data", ["one.png", "sub/two.jpg", "sub/deeper/three.png"])
    (tmp_path / "data" / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    assert cli.main(["upsample", str(tmp_path / "data"), "--out", str(out), "--format", "safetensors",
                     "--dtype", "float16", *ARGS]) == 0
    from safetensors import safe_open

    assert sorted(r["file"] for r in _manifest(out)) == [
        "one.safetensors", "sub/deeper/three.safetensors", "sub/two.safetensors"]
    with safe_open(str(out / "sub" / "two.safetensors"), "pt") as f:
        assert f.get_tensor("features").dtype == torch.float16
        assert f.metadata()["image"] == str(imgs[1])

    listing = tmp_path / "lists" / "some.txt"
    listing.parent.mkdir()
    listing.write_text("# two of them\n../data/one.png\n\n" + str(imgs[2]) + "\n")
    out2 = tmp_path / "out2"
    assert cli.main(["upsample", f"@{listing}", "--out", str(out2), *ARGS]) == 0
    assert sorted(r["file"] for r in _manifest(out2)) == ["one.pt", "sub/deeper/three.pt"]


def test_rerun_skips_what_is_done_and_redoes_a_damaged_or_changed_file(tiny, tmp_path, capsys):
    imgs = _images(tmp_path / "in", ["p.png", "q.png", "r.png"])
    out = tmp_path / "out"
    argv = ["upsample", str(tmp_path / "in"), "--out", str(out), *ARGS]
    assert cli.main(argv) == 0
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.pt")}
    capsys.readouterr()
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "wrote 0 feature file(s)" in text and "3 already done" in text
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.pt")} == stamps

    (out / "q.pt").write_bytes(b"truncated")                      # damaged output: redone
    _images(tmp_path / "in", ["r.png"], size=(20, 24))            # changed input: redone
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "wrote 2 feature file(s)" in text and "1 already done" in text
    assert (out / "p.pt").stat().st_mtime_ns == stamps["p.pt"]
    assert torch.load(out / "r.pt", weights_only=True).shape == (4, 20, 24)
    assert len(_manifest(out)) == 3

    # --verify hash notices a same-size corruption that the size check cannot
    data = bytearray((out / "p.pt").read_bytes())
    data[-100] ^= 0xFF
    (out / "p.pt").write_bytes(bytes(data))
    assert cli.main(argv + ["--verify", "hash"]) == 0
    assert "wrote 1 feature file(s)" in capsys.readouterr().out


def test_other_settings_into_the_same_folder_are_refused(tiny, tmp_path, capsys):
    _images(tmp_path / "in", ["p.png"])
    out = tmp_path / "out"
    assert cli.main(["upsample", str(tmp_path / "in"), "--out", str(out), *ARGS]) == 0
    capsys.readouterr()
    assert cli.main(["upsample", str(tmp_path / "in"), "--out", str(out), "--dtype", "float16", *ARGS]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "other settings" in err and "dtype 'float32' (now 'float16')" in err
    assert cli.main(["upsample", str(tmp_path / "in"), "--out", str(out), "--dtype", "float16", "--overwrite",
                     *ARGS]) == 0
    assert torch.load(out / "p.pt", weights_only=True).dtype == torch.float16


def test_bad_inputs_fail_with_one_line_naming_them(tiny, tmp_path, capsys):
    _images(tmp_path / "clash", ["x.png", "x.jpg"])
    bad = tmp_path / "bad" / "broken.png"
    bad.parent.mkdir()
    bad.write_bytes(b"\x00 not an image")
    (tmp_path / "empty").mkdir()
    cases = [
        ([str(tmp_path / "clash")], "two images would write the same feature file x.pt"),
        ([str(bad)], "cannot read"),
        ([str(tmp_path / "empty")], "found none"),
        ([str(tmp_path / "missing")], "no such image file or folder"),
        (["@" + str(tmp_path / "nolist.txt")], "expected a file list"),
    ]
    for inputs, needle in cases:
        assert cli.main(["upsample", *inputs, "--out", str(tmp_path / "o"), *ARGS]) == 1, inputs
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and needle in err, (inputs, err)
    assert cli.main(["upsample", str(tmp_path / "clash" / "x.png"), "--out", str(tmp_path / "o"),
                     "--workers", "-1", *BASE]) == 2                     # a usage error, like every bad number
    assert "--workers: expected an integer >= 0, got '-1'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# subprocesses: torchrun with 2 ranks, a killed run
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_two_processes_under_torchrun_write_every_image_exactly_once(tmp_path):
    _images(tmp_path / "in", [f"d{i % 3}/img{i}.png" for i in range(9)])
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(_script(tmp_path)), "upsample", str(tmp_path / "in"), "--out", str(out),
           *BASE, "--workers", "1", "--batch-size", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "on 2 processes" in proc.stdout and "wrote 9 feature file(s)" in proc.stdout
    records = _manifest(out)
    files = [r["file"] for r in records]
    assert sorted(files) == sorted(f"d{i % 3}/img{i}.pt" for i in range(9))  # each exactly once
    assert {r["rank"] for r in records} == {0, 1}
    assert not list(out.glob("manifest.rank*"))
    for r in records:
        assert torch.load(out / r["file"], weights_only=True).shape == (4, 16, 20)
    stamps = {f: (out / f).stat().st_mtime_ns for f in files}

    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "wrote 0 feature file(s)" in proc.stdout and "9 already done" in proc.stdout
    assert {f: (out / f).stat().st_mtime_ns for f in files} == stamps


@pytest.mark.slow
def test_a_killed_run_resumes_where_it_stopped(tmp_path):
    n = 10
    _images(tmp_path / "in", [f"img{i:02d}.png" for i in range(n)])
    out = tmp_path / "out"
    cmd = [sys.executable, str(_script(tmp_path)), "upsample", str(tmp_path / "in"), "--out", str(out),
           *BASE, "--workers", "1", "--batch-size", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(TINY_DELAY="0.5"), cwd=tmp_path)
    journal = out / "manifest.rank0.partial.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if journal.is_file() and journal.read_text().count("\n") >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    done = [json.loads(line)["file"] for line in journal.read_text().splitlines() if line.endswith("}")]
    assert 3 <= len(done) < n
    stamps = {f: (out / f).stat().st_mtime_ns for f in done}

    res = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"wrote {n - len(done)} feature file(s)" in res.stdout
    assert f"{len(done)} already done" in res.stdout
    assert {f: (out / f).stat().st_mtime_ns for f in done} == stamps  # not redone
    assert sorted(r["file"] for r in _manifest(out)) == [f"img{i:02d}.pt" for i in range(n)]
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp") or p.name.startswith("manifest.rank")]


def test_dtype_reaches_a_jbu_upsampler_as_out_dtype_and_others_convert_when_saved(tiny):
    """``upsample --dtype float16``: JBUStack computes its output in float16 directly (no float32
    full-size map first); bilinear takes no out_dtype and is left as it is (converted when saved)."""
    import featup_adapters
    from featup_adapters._cli_pictures import _upsample_in_dtype
    from featup_adapters.upsamplers import JBUStack

    backbone = featup_adapters.create_backbone(NAME)
    neck = featup_adapters.wrap(backbone, JBUStack(4).eval())
    _upsample_in_dtype(neck, "float16")
    with torch.no_grad():
        assert neck(torch.rand(1, 3, 16, 16)).dtype == torch.float16
    neck.remove()
    neck = featup_adapters.wrap(featup_adapters.create_backbone(NAME), "bilinear")
    _upsample_in_dtype(neck, "bfloat16")
    assert "out_dtype" not in neck.upsampler_options
    with torch.no_grad():
        assert neck(torch.rand(1, 3, 16, 16)).dtype == torch.float32
    neck.remove()
