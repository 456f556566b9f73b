"""The ``featup-adapters`` command line (also ``python -m featup_adapters``).

    featup-adapters demo                              # embedded photo + default backbone -> demo.png
    featup-adapters upsample a.jpg b.jpg --out feats/ # upsampled features (.pt) + PCA pictures
    featup-adapters cam photo.jpg --class "tabby"     # class activation maps, low-res vs upsampled
    featup-adapters list                              # backbones, adapters, upsamplers, op backends
    featup-adapters bench --quick                     # the op and JBU benchmarks
    featup-adapters train / train-universal / fit-implicit / finetune-seg ...   (mounted from their packages)

Every failure exits with a non-zero code and ONE line on stderr (``featup-adapters CMD: error:
...``); ``--debug`` anywhere on the line adds the traceback.  ``main(argv) -> int`` never raises
for a user error.  The picture commands live in :mod:`featup_adapters._cli_pictures`.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
import warnings
from pathlib import Path

from ._cli_base import PROG, CLIError
from ._validate import memory_size, non_empty_str, non_negative_int, positive_int

# (module, function) pairs that register sub-commands owned by other parts of the package;
# a module that is missing or fails to import leaves its commands out, never the whole CLI.
_MOUNTED = (
    ("featup_adapters.training.cli", "add_train_parser"),
    ("featup_adapters.training.cli", "add_train_universal_parser"),
    ("featup_adapters.training.cli", "add_fit_implicit_parser"),
    ("featup_adapters.tasks.cli", "add_finetune_seg_parser"),
    ("featup_adapters.tasks.cli", "add_probe_parser"),
    ("featup_adapters.tasks.upsampler_eval", "add_eval_parser"),
)
_MOUNTED_EXAMPLES = {
    "train": f"{PROG} train --backbone timm:resnet18 --data photos/ --steps 2000 --out runs/r18",
    "train-universal": f"{PROG} train-universal --backbone efficientnet_lite0 --backbone efficientnet_lite1 "
                       f"--data photos/ --steps 4000 --out runs/universal",
    "fit-implicit": f"{PROG} fit-implicit cat.jpg --backbone efficientnet_lite0 --out feats.pt --steps 300",
    "finetune-seg": f"{PROG} finetune-seg --data mosaic --steps 200 --out runs/seg",
    "probe": f"{PROG} probe --data mosaic --methods lowres,bilinear,jbu",
    "eval": f"{PROG} eval --backbone efficientnet_lite0 --upsampler auto --data photos/val --json eval.json",
}


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit code 2) instead of usage + error."""

    def error(self, message):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _fmt():
    return argparse.RawDescriptionHelpFormatter


def _example(*lines: str) -> str:
    return "example:\n" + "\n".join(f"  {line}" for line in lines)


# --------------------------------------------------------------------------------------------
# parser
# --------------------------------------------------------------------------------------------

_SIZE_HELP = "expected a size like 448 (longer side), 224 320 or 224x320 (H W)"


def _size_arg(text: str) -> list:
    try:
        values = [int(v) for v in text.lower().replace("x", ",").split(",") if v.strip()]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{_SIZE_HELP}, got {text!r}")
    return values


class _SizeAction(argparse.Action):
    """``--size N`` (longer side), ``--size H W`` or ``--size HxW`` -> ``N`` or ``(H, W)``."""

    def __call__(self, parser, namespace, values, option_string=None):
        flat = [v for part in values for v in part]
        if len(flat) not in (1, 2):
            parser.error(f"argument {option_string}: {_SIZE_HELP}, got {' '.join(map(str, flat))}")
        setattr(namespace, self.dest, flat[0] if len(flat) == 1 else tuple(flat))


def _add_size(p: argparse.ArgumentParser, default, what: str) -> None:
    p.add_argument("--size", type=_size_arg, nargs="+", action=_SizeAction, default=default,
                   metavar="SIZE", help=f"resize: N (longer side), H W, or HxW (default: {what})")


def _add_model_args(p: argparse.ArgumentParser, *, upsampler_default: str = "auto") -> None:
    p.add_argument("--backbone", default="efficientnet_lite0", metavar="SPEC",
                   help="timm:NAME | hf:ID | open_clip:NAME | a registered name (default: %(default)s, "
                        "the embedded EfficientNet-Lite0 with ImageNet weights)")
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=None,
                   help="load the backbone's pretrained weights (the default: downloaded once, then "
                        "cached; --no-pretrained builds it at random init)")
    p.add_argument("--layer", default=None, help="module whose output is upsampled (default: the adapter's)")
    p.add_argument("--upsampler", default=upsampler_default, metavar="NAME|DIR",
                   help="'auto' (the one registered for the backbone), 'universal' (the shipped "
                        "upsampler for any backbone), a registered name, a saved directory, a FeatUp "
                        "checkpoint, or bilinear/bicubic (default: %(default)s)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")


def build_parser() -> argparse.ArgumentParser:
    """The full parser, with the sub-commands of other modules mounted where importable."""
    parser = _Parser(prog=PROG, formatter_class=_fmt(),
                     description="FeatUp joint bilateral upsampling of any backbone's features.",
                     epilog=_example(f"{PROG} demo --out demo.png", f"{PROG} list"))
    parser.add_argument("--debug", action="store_true", help="show tracebacks (accepted anywhere on the line)")
    from ._version import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("demo", help="one picture: image, low-res, bilinear and JBU features (PCA)",
                       formatter_class=_fmt(),
                       description="Upsample one image's features and write a side-by-side PNG: the image, "
                                   "the low-res features, bilinear and JBU upsampling (first 3 principal "
                                   "components, fitted once on the low-res map). With no IMAGE, an "
                                   "embedded photo; with no options, the embedded backbone and its "
                                   "shipped upsampler. No network.",
                       epilog=_example(f"{PROG} demo", f"{PROG} demo cat.jpg --size 640 --out cat_feats.png"))
    p.add_argument("image", nargs="?", default=None, help="image file (default: an embedded photo)")
    _add_model_args(p)
    _add_size(p, 448, "448")
    p.add_argument("--out", default="demo.png", help="PNG to write (default: %(default)s)")
    p.set_defaults(func=_pictures("run_demo"))

    p = sub.add_parser("upsample", help="save upsampled features of images, folders or file lists (resumable, torchrun)",
                       formatter_class=_fmt(),
                       description="Upsample the features of each image and save them as Tensor[C, H, W], one "
                                   "file per image (.pt: torch.load gives the tensor; .safetensors: key "
                                   "'features'), named after the image's path relative to the inputs' common "
                                   "folder, with a PCA picture per image (--no-pca: none). OUT/manifest.jsonl "
                                   "records what is done: a rerun skips it (and checks it), a killed run "
                                   "resumes. Under torchrun each process takes its share of the images.",
                       epilog=_example(f"{PROG} upsample photos/ --size 224 320 --out feats/",
                                       f"{PROG} upsample @train.txt --format safetensors --dtype float16 "
                                       "--no-pca --out feats/",
                                       f"torchrun --nproc_per_node 8 -m featup_adapters upsample photos/ "
                                       "--out feats/ --no-pca"))
    p.add_argument("images", nargs="+", metavar="INPUT",
                   help="image files, folders (searched recursively) or @LIST (a file naming one image per line)")
    _add_model_args(p)
    _add_size(p, None, "as is")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--format", choices=("pt", "safetensors"), default="pt")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                   help="dtype of the saved features; a JBU upsampler computes its output in it "
                        "directly, halving its peak memory for 16-bit (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=4, help="images per forward (default: %(default)s)")
    p.add_argument("--max-memory", type=memory_size, default=None, metavar="SIZE",
                   help="memory budget of the JBU upsampler's forward, e.g. 4GB, 512MiB or bytes "
                        "(default: a fraction of the memory available; large outputs are computed "
                        "in row bands to fit, or refused up front; not for the bilinear/bicubic "
                        "baselines)")
    p.add_argument("--workers", type=non_negative_int, default=2,
                   help="DataLoader worker processes reading the images (default: %(default)s; 0: none)")
    p.add_argument("--verify", choices=("size", "hash"), default="size",
                   help="how a rerun checks the files it skips: recorded byte size, or also their "
                        "sha256 (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="redo every image, also those the manifest lists as done")
    p.add_argument("--no-pca", action="store_true", help="do not write the PCA pictures")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (also off when stderr is not a terminal)")
    p.add_argument("--quiet", action="store_true", help="no progress bar and only the final line")
    p.set_defaults(func=_run_extract)

    p = sub.add_parser("cam", help="class activation maps from low-res vs upsampled features",
                       formatter_class=_fmt(),
                       description="Class activation maps for a classification backbone (the embedded "
                                   "EfficientNet-Lite0 has its ImageNet head): the classifier applied to "
                                   "the low-res, bilinear and JBU-upsampled features, overlaid on the "
                                   "image side by side. Default class: the top-1 prediction.",
                       epilog=_example(f"{PROG} cam", f"{PROG} cam cat.jpg --class 281 --out cam.png",
                                       f"{PROG} cam dog.jpg --class 'golden retriever'"))
    p.add_argument("image", nargs="?", default=None, help="image file (default: an embedded photo)")
    _add_model_args(p)
    p.add_argument("--class", dest="class_", type=non_empty_str, default=None, metavar="IDX|NAME",
                   help="class index or ImageNet class name (default: the top-1 prediction)")
    _add_size(p, 448, "448")
    p.add_argument("--out", default="cam.png", help="PNG to write (default: %(default)s)")
    p.set_defaults(func=_pictures("run_cam"))

    p = sub.add_parser("list", help="backbones, adapters, registered upsamplers and op backends",
                       formatter_class=_fmt(), description="What featup_adapters knows on this machine.",
                       epilog=_example(f"{PROG} list"))
    p.set_defaults(func=run_list)

    p = sub.add_parser("bench", help="run the adaptive-conv and JBU benchmarks",
                       formatter_class=_fmt(),
                       description="Runs the benchmark scripts adaptive_conv.py and jbu.py (shipped in the "
                                   "package as featup_adapters/benchmarks, benchmarks/ in a clone) and "
                                   "prints their tables.",
                       epilog=_example(f"{PROG} bench --quick", f"{PROG} bench --only jbu"))
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    p.add_argument("--only", choices=("op", "jbu"), default=None, help="run one benchmark")
    p.set_defaults(func=run_bench)

    _mount(sub)
    return parser


def _run_extract(args):
    from .extract import run_upsample

    return run_upsample(args)


def _pictures(name: str):
    def run(args):
        from . import _cli_pictures

        args._necks = []
        try:
            return getattr(_cli_pictures, name)(args)
        finally:  # detach the hooks of every neck the command built, also on errors
            for neck in args._necks:
                neck.remove()

    run.__name__ = name
    return run


def _mount(sub) -> None:
    for module_name, func_name in _MOUNTED:
        try:
            add = getattr(importlib.import_module(module_name), func_name)
        except (ImportError, AttributeError):
            continue
        try:
            p = add(sub)
        except argparse.ArgumentError:  # already registered by another entry
            continue
        if isinstance(p, argparse.ArgumentParser) and not p.epilog:
            example = _MOUNTED_EXAMPLES.get(p.prog.rsplit(" ", 1)[-1])
            if example:
                p.epilog = _example(example)
                p.formatter_class = _fmt()


# --------------------------------------------------------------------------------------------
# list, bench
# --------------------------------------------------------------------------------------------

def _installed(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def run_list(args) -> int:
    from . import adapters, hub, ops
    from .adapters.registry import _REGISTRY as backbones

    out = []
    out.append("Backbones (--backbone SPEC):")
    for name in adapters.list_backbones():
        entry = backbones[name]
        extra = "  [default]" if name == "efficientnet_lite0" else ""
        out.append(f"  {name:<24} id {entry.backbone_id}, stride {entry.patch_size}{extra}")
    out.append("  timm:NAME | hf:ID | open_clip:NAME   any model of these ecosystems "
               "(pretrained weights; --no-pretrained = random init)")
    out.append("Adapters (ecosystems found automatically; any other nn.Module with --layer):")
    for eco, package in (("timm", "timm"), ("transformers", "transformers"), ("open_clip", "open_clip_torch")):
        out.append(f"  {eco:<14} {package} {_installed(package)}")
    out.append("Upsamplers (--upsampler NAME; baselines: bilinear, bicubic, nearest):")
    hub_dir = None
    for e in hub.list_upsamplers():
        src = str(e.get("source", ""))
        if src.startswith(("http://", "https://")):
            if hub_dir is None:
                import torch.hub

                hub_dir = Path(torch.hub.get_dir()) / "checkpoints"
            cached = e.get("file_name") and (hub_dir / e["file_name"]).is_file()
            where = "downloadable" + (", cached" if cached else "")
        else:
            where = "local"
        ids = ", ".join(e.get("backbone_ids") or []) or "-"
        out.append(f"  {e['name']:<24} {where:<20} dim {str(e.get('dim') or '?'):<5} "
                   f"norm {'yes' if e.get('use_norm') else 'no ':<3}  for {ids}")
        if where == "local":
            out.append(f"  {'':<24} {src}")
    universal = hub.universal_weights_dir()
    shipped = (universal / "config.json").is_file()
    out.append(f"  {hub.UNIVERSAL_NAME:<24} {'local' if shipped else 'not shipped':<20} dim any   "
               f"norm {'(config)' if shipped else '-'}  for any backbone")
    if shipped:
        out.append(f"  {'':<24} {universal}")
    out.append("Op backend (adaptive_conv) per device:")
    import torch

    for device in ("cpu", "cuda"):
        choice = ops.backend(device)
        note = ("" if device != "cuda" or torch.cuda.is_available() or choice.note
                else "  [no CUDA device on this machine]")
        out.append(f"  {choice}{note}")

    out.append(f"  (torch {torch.__version__}, CUDA available: {torch.cuda.is_available()})")
    print("\n".join(out))
    return 0


def _benchmarks_dir() -> Path:
    """The benchmark scripts: ``featup_adapters/benchmarks`` when installed (setup.py maps the
    repository's ``benchmarks/`` there), ``benchmarks/`` next to the package in a clone."""
    package = Path(__file__).resolve().parent
    candidates = [package / "benchmarks", package.parent / "benchmarks"]
    for here in candidates:
        if (here / "adaptive_conv.py").is_file() and (here / "jbu.py").is_file():
            return here
    raise CLIError(f"the benchmark scripts are missing: expected adaptive_conv.py and jbu.py in "
                   f"{' or '.join(map(str, candidates))}; reinstall featup_adapters")


def _load_script(path: Path):
    import importlib.util

    if not path.is_file():
        raise CLIError(f"benchmark script not found: {path}")
    spec = importlib.util.spec_from_file_location(f"_featup_bench_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_bench(args) -> int:
    root = _benchmarks_dir()
    scripts = {"op": root / "adaptive_conv.py", "jbu": root / "jbu.py"}
    for key, path in scripts.items():
        if args.only and key != args.only:
            continue
        print(f"== {path.name} {'--quick' if args.quick else ''}".rstrip(), flush=True)
        rc = _load_script(path).main(["--quick"] if args.quick else [])
        if isinstance(rc, int) and rc != 0:
            raise CLIError(f"{path.name} exited with code {rc}")
        print(flush=True)
    return 0


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------

def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if not text:
        text = type(exc).__name__
    elif not isinstance(exc, (CLIError, ValueError, LookupError, OSError, TypeError)):
        text = f"{type(exc).__name__}: {text}"
    if isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        text = exc.args[0]
    notes = [" ".join(n.split()) for n in getattr(exc, "__notes__", []) or []]
    return "; ".join([text, *notes])


def _interrupted(exc: BaseException) -> bool:
    """True if ``exc`` was caused by a KeyboardInterrupt (e.g. inside torch.save's writer)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def _show_warning(message, category, filename, lineno, file=None, line=None):
    stream = file or sys.stderr
    try:
        stream.write(f"{PROG}: warning: {' '.join(str(message).split())}\n")
    except OSError:
        pass


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush does not raise again."""
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, sys.stdout.fileno())
        os.close(fd)
    except (OSError, ValueError, AttributeError):   # stdout without a file descriptor
        pass


def main(argv=None) -> int:
    """Run the command line; returns the exit code (0 success, 1 failure, 2 usage error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    end = argv.index("--") if "--" in argv else len(argv)
    debug = "--debug" in argv[:end]
    argv = [a for i, a in enumerate(argv) if not (a == "--debug" and i < end)]
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version, usage errors
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)
    args.debug = debug
    old_showwarning = warnings.showwarning
    if not debug:
        warnings.showwarning = _show_warning
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except BrokenPipeError:  # the reader went away (`featup-adapters list | head`): stop quietly
        _silence_stdout()
        return 141            # 128 + SIGPIPE, what a shell tool killed by the pipe returns
    except Exception as exc:  # every failure: one line, traceback only with --debug
        if _interrupted(exc):  # a Ctrl-C that a C++ serializer turned into a RuntimeError
            if debug:
                traceback.print_exc()
            print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
            return 130
        if debug:
            traceback.print_exc()
        print(f"{PROG} {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    finally:
        warnings.showwarning = old_showwarning


if __name__ == "__main__":  # python -m featup_adapters.cli (e.g. under torchrun)
    raise SystemExit(main())
