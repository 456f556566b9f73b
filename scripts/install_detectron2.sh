#!/usr/bin/env bash
# Install detectron2 into a Python >= 3.10 environment without network access to GitHub.
#
# Upstream detectron2 is installed from its git repository (where there is network):
#     pip install 'git+https://github.com/facebookresearch/detectron2.git'
# Where only PyPI is reachable, this script uses the PyPI wheel sal-detectron2==0.7.2, which is
# upstream detectron2 (commit a59f056, three one-line patches) plus a compiled `_C` for CPython
# 3.10 only. Without `_C` the package is pure Python; everything featup_adapters needs works
# (build_model, semantic FPN, Panoptic FPN, Mask R-CNN, DeepLab, BACKBONE_REGISTRY); rotated NMS
# and deformable convolution do not.
#
# Steps: download the wheel (no deps), check its sha256, rename it to a py3-none-any wheel,
# `pip install --no-deps` it, delete detectron2/_C.cpython-310-*.so and the stray top-level
# `tools/` package the wheel drops into site-packages, then install detectron2's real
# dependencies with the pins below. Idempotent: a second run finds it installed and does nothing.
#
# Usage: scripts/install_detectron2.sh [PYTHON]     (default: $PYTHON, else .venv/bin/python)
#        FORCE=1 scripts/install_detectron2.sh      reinstall even if already present
set -euo pipefail

PY="${1:-${PYTHON:-.venv/bin/python}}"
VERSION="0.7.2"
SHA256="491af0c7f79bdb2d178e46f6cb16a97c4ac968d45c41ea3f6b6435d59bbee561"
DEPS=(
    "fvcore>=0.1.5,<0.1.6" "iopath>=0.1.7,<0.1.10" "pycocotools" "omegaconf>=2.1,<2.4"
    "hydra-core" "yacs" "termcolor" "tabulate" "cloudpickle" "matplotlib" "tqdm" "packaging"
    "setuptools<81"
)
say() { echo ">> [detectron2] $*"; }

if ! command -v "$PY" >/dev/null 2>&1 && [ ! -x "$PY" ]; then
    echo "install_detectron2.sh: expected a python interpreter as argument or \$PYTHON, got '$PY'" >&2
    exit 2
fi
PIP=("$PY" -m pip --disable-pip-version-check)

# Installed and importable (with its dependencies) -> nothing to do.
if [ "${FORCE:-0}" != "1" ] && "$PY" - <<'PYEOF' 2>/dev/null
import importlib.metadata as md, importlib.util as iu, glob, os, sys
from packaging.version import Version
md.version("sal-detectron2")
for mod in ("detectron2", "fvcore", "iopath", "pycocotools", "omegaconf", "hydra", "yacs",
            "termcolor", "tabulate", "cloudpickle", "pkg_resources"):
    assert iu.find_spec(mod) is not None, mod
assert Version(md.version("setuptools")) < Version("81")
d2 = os.path.dirname(iu.find_spec("detectron2").origin)
assert not glob.glob(os.path.join(d2, "_C.cpython-310-*.so"))
sys.exit(0)
PYEOF
then
    say "sal-detectron2 $("$PY" -c 'import importlib.metadata as m; print(m.version("sal-detectron2"))') is already installed in $("$PY" -c 'import sys; print(sys.prefix)'); nothing to do (FORCE=1 to reinstall)"
    exit 0
fi

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

say "downloading sal-detectron2==$VERSION (cp310 wheel, no dependencies) from PyPI"
"${PIP[@]}" download -q --no-deps --only-binary=:all: --python-version 3.10 \
    -d "$TMP" "sal-detectron2==$VERSION"
WHEEL="$(ls "$TMP"/sal_detectron2-"$VERSION"-*.whl)"

say "checking sha256 of $(basename "$WHEEL")"
GOT="$(sha256sum "$WHEEL" | cut -d' ' -f1)"
if [ "$GOT" != "$SHA256" ]; then
    echo "install_detectron2.sh: expected sha256 $SHA256 for $(basename "$WHEEL"), got $GOT" >&2
    exit 1
fi

PURE="$TMP/sal_detectron2-$VERSION-py3-none-any.whl"
mv "$WHEEL" "$PURE"
say "installing $(basename "$PURE") with --no-deps"
"${PIP[@]}" install -q --no-deps --force-reinstall "$PURE"

SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
say "removing the CPython 3.10 extension detectron2/_C.cpython-310-*.so and the stray top-level tools/ package from $SITE"
rm -f "$SITE"/detectron2/_C.cpython-310-*.so
# Only the `tools` package that belongs to this wheel (it lists tools/ in its RECORD).
if grep -q '^tools/' "$SITE"/sal_detectron2-"$VERSION".dist-info/RECORD 2>/dev/null; then
    rm -rf "$SITE/tools"
fi

say "installing detectron2's dependencies: ${DEPS[*]}"
"${PIP[@]}" install -q "${DEPS[@]}"

"$PY" -c 'import detectron2.modeling, detectron2.projects.deeplab; print(">> [detectron2] import check ok:", detectron2.__version__)' 2>/dev/null
