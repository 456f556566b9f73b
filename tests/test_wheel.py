"""The built wheel, installed outside the clone: what a ``pip install`` user gets.

One real build (``pip wheel --no-deps --no-build-isolation``, CPU kernels only with
``FEATUP_NO_CUDA=1`` to keep it short) of a copy of the source tree, installed with
``pip install --target`` into a fresh folder; every check imports from that folder, from a working
directory outside the clone.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
_SKIP = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "outputs",
                               "*.so", "_build_info.py", ".pytest_cache", ".d2wheel", "tests")

pytestmark = pytest.mark.slow


def _run(cmd, cwd, env=None, timeout=900):
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """(wheel path, pip's verbose build log, folder it is installed in)."""
    pytest.importorskip("wheel")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=_SKIP)
    env = {k: v for k, v in os.environ.items() if k not in ("FEATUP_SKIP_EXT", "PYTHONPATH")}
    # CPU kernels only, without debug info (-g0 after Python's -g): the build is most of the test
    env.update(FEATUP_NO_CUDA="1", FEATUP_REQUIRE_EXT="1", MAX_JOBS=env.get("MAX_JOBS", "2"),
               CFLAGS=(env.get("CFLAGS", "") + " -g0").strip())
    built = _run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation",
                  "--disable-pip-version-check", "-w", str(tmp / "dist"), "."], cwd=src, env=env)
    log = built.stdout + built.stderr
    assert built.returncode == 0, log[-3000:]
    (whl,) = (tmp / "dist").glob("featup_adapters-*.whl")
    target = tmp / "site"
    inst = _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index",
                 "--disable-pip-version-check", "--target", str(target), str(whl)], cwd=tmp, env=env)
    assert inst.returncode == 0, inst.stdout + inst.stderr
    return whl, log, target, src


# A user's environment has no editable install of the project; this one may (`make install`), and
# its import hook would serve featup_adapters submodules (even _C) from that checkout: drop it.
_NO_EDITABLE = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path "
                "if '__editable__' not in str(getattr(f, '__module__', ''))]\n")


def _installed_python(target, code, cwd):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEATUP_")}
    env["PYTHONPATH"] = str(target)
    return _run([sys.executable, "-c", _NO_EDITABLE + code], cwd=cwd, env=env, timeout=300)


def test_build_prints_one_summary_line_of_what_it_compiled(wheel):
    _, log, _, _ = wheel
    lines = [line for line in log.splitlines() if "build summary:" in line]
    assert len(lines) == 1, lines
    assert f"for torch {torch.__version__}" in lines[0]
    assert "CPU kernels generic" in lines[0] and "no CUDA kernels: FEATUP_NO_CUDA=1" in lines[0]


def test_wheel_pins_the_torch_it_was_compiled_against_and_ships_license(wheel):
    whl, _, _, _ = wheel
    with zipfile.ZipFile(whl) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        info = z.read("featup_adapters/_build_info.py").decode()
        license_ = [n for n in names if re.search(r"\.dist-info/(licenses/)?LICENSE$", n)]
        assert license_, names
        assert "MIT License" in z.read(license_[0]).decode()
    requires = re.findall(r"^Requires-Dist: (torch\S*)$", meta, flags=re.M)
    assert requires == [f"torch=={Version(torch.__version__).public}"], requires
    assert f"TORCH_VERSION = {torch.__version__!r}" in info
    assert any(n.startswith("featup_adapters/_C.") for n in names)
    for extra in ("open-clip", "demo", "detectron2", "all"):
        assert f"Provides-Extra: {extra}\n" in meta
    assert "featup_adapters/integrations/detectron2/configs/semantic_R_50_FeatUp_JBU_1x.yaml" in names
    assert "featup_adapters/benchmarks/jbu.py" in names


def test_installed_package_loads_its_extension_integrations_and_benchmarks(wheel, tmp_path):
    _, _, target, _ = wheel
    res = _installed_python(target, """
import importlib.util, os
import featup_adapters, featup_adapters.ops as ops
from featup_adapters import cli
print(featup_adapters.__file__)
print(ops.backend("cpu").name)
print(cli._benchmarks_dir())
spec = importlib.util.find_spec("featup_adapters.integrations.detectron2")
print(spec.origin)
if importlib.util.find_spec("detectron2") is not None:
    from featup_adapters.integrations.detectron2 import add_featup_config, config_file
    from detectron2.config import get_cfg
    cfg = get_cfg(); add_featup_config(cfg); cfg.merge_from_file(config_file("semantic_R_50_FeatUp_JBU_1x.yaml"))
    print("detectron2", cfg.MODEL.BACKBONE.NAME)
else:
    print("detectron2 not installed")
""", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    file, name, bench, d2, d2cfg = res.stdout.strip().splitlines()
    assert Path(file).is_relative_to(target) and Path(bench).is_relative_to(target)
    assert Path(d2).is_relative_to(target)
    assert name.startswith("cpu_kernel"), res.stdout + res.stderr
    assert d2cfg in ("detectron2 build_featup_backbone", "detectron2 not installed"), d2cfg

    script = target / "bin" / "featup-adapters"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEATUP_")}
    env["PYTHONPATH"] = str(target)
    res = _run([str(script), "bench", "--help"], cwd=tmp_path, env=env, timeout=300)
    assert res.returncode == 0 and "featup_adapters/benchmarks" in res.stdout, res.stdout + res.stderr


def test_other_torch_gets_one_line_with_both_versions_and_the_rebuild_command(wheel, tmp_path):
    _, _, target, _ = wheel
    info = target / "featup_adapters" / "_build_info.py"
    original = info.read_text()
    info.write_text(original.replace(f"TORCH_VERSION = {torch.__version__!r}", "TORCH_VERSION = '2.0.0'"))
    try:
        res = _installed_python(target, "import featup_adapters.ops as o; print(o.backend('cpu').name)",
                                cwd=tmp_path)
    finally:
        info.write_text(original)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "reference"
    lines = [line for line in res.stderr.splitlines() if "compiled against torch" in line]
    assert len(lines) == 1, res.stderr
    assert f"compiled against torch 2.0.0 but torch {torch.__version__} is installed" in lines[0]
    assert "rebuild it for this torch: pip install --no-build-isolation" in lines[0]
    assert "not built" not in res.stderr


def test_clone_shadowing_the_installed_copy_says_so(wheel):
    _, _, target, src = wheel  # src: the copied clone, whose featup_adapters has no extension
    res = _installed_python(target, "import featup_adapters, featup_adapters.ops as o; "
                                    "print(featup_adapters.__file__); print(o.backend('cpu').name)", cwd=src)
    assert res.returncode == 0, res.stderr
    file, name = res.stdout.strip().splitlines()
    assert Path(file).is_relative_to(src) and name == "reference"
    assert "shadows the installed copy in" in res.stderr and str(target) in res.stderr, res.stderr
