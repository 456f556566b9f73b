"""``featup-adapters upsample``: upsampled features for whole datasets, resumable, on N processes.

    featup-adapters upsample photos/ --out feats/                       # a folder, recursively
    featup-adapters upsample @train.txt --out feats/ --dtype float16    # a file list
    torchrun --nproc_per_node 8 -m featup_adapters upsample photos/ --out feats/

Inputs are image files, folders (searched recursively for image files) and ``@LIST`` files (one
path per line, relative paths taken from the list's folder, ``#`` comments).  Each image gives one
file ``OUT/<its path relative to the inputs' common folder>.pt`` (``torch.load(f, weights_only=
True)`` -> ``Tensor[C, H, W]``) or ``.safetensors`` (key ``features``, the settings as metadata),
written atomically, holding that image's tensor only (its own storage, never a view of the batch).

``OUT/manifest.jsonl`` lists what is done, one JSON object per feature file (its image, size and
mtime, the file's bytes, sha256, shape, dtype, the settings).  While running, each rank appends to
its own ``OUT/manifest.rank<R>.partial.jsonl`` (flushed and fsynced per file; a line cut by a kill
is ignored); rank 0 folds them into ``manifest.jsonl`` (written atomically) at the start and the
end of every run.  A rerun skips every image whose record matches (same image size and mtime,
same settings, the file present with the recorded size, plus its sha256 with ``--verify hash``)
and redoes the rest, so a killed run resumes where it stopped.  Under ``torchrun`` (gloo on CPU,
nccl on GPUs) rank 0 decides what is left and each rank takes every WORLD_SIZE-th image of it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from ._io import atomic_write, atomic_write_bytes
from ._cli_base import PROG, CLIError
from .images import check_min_size, read_rgb, resize_rgb, to_tensor

__all__ = ["IMAGE_EXTENSIONS", "Item", "collect_images", "run_upsample"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".gif")
MANIFEST = "manifest.jsonl"


@dataclasses.dataclass(frozen=True)
class Item:
    """One input image and the feature file it gives (``rel``: that file, relative to OUT)."""

    path: Path
    rel: str


# --------------------------------------------------------------------------------------------
# inputs -> unique, stable output names
# --------------------------------------------------------------------------------------------

def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _walk(folder: Path, skip: Path | None) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and (skip is None or (here / d).resolve() != skip))
        found += [here / f for f in sorted(filenames) if not f.startswith(".") and _is_image(Path(f))]
    return found


def _read_list(spec: str) -> list[Path]:
    path = Path(spec[1:])
    if not path.is_file():
        raise CLIError(f"expected a file list after '@', got {spec!r} (no such file)")
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            p = Path(line).expanduser()
            out.append(p if p.is_absolute() else path.parent / p)
    if not out:
        raise CLIError(f"the file list {path} names no images")
    return out


def collect_images(inputs, out_dir: str | os.PathLike, fmt: str) -> list[Item]:
    """The images named by ``inputs`` (files, folders, ``@list`` files) with their output names.

    Output names mirror each image's path relative to the common folder of the inputs (a folder
    argument counts as its own root, a file as its parent folder), with the format's suffix:
    ``a/x.png b/x.png x_1.png`` -> ``a/x.pt b/x.pt x_1.pt``.  Two images that would share a name
    (``x.png`` and ``x.jpg`` side by side) are refused, never overwritten.

    Raises:
        CLIError: a missing input, an empty folder, a name collision.
    """
    skip = Path(out_dir).resolve()
    files, roots = [], []
    for spec in inputs:
        spec = str(spec)
        if spec.startswith("@"):
            listed = _read_list(spec)
            files += listed
            roots += [p.parent for p in listed]
            continue
        path = Path(spec).expanduser()
        if path.is_dir():
            found = _walk(path, skip)
            if not found:
                raise CLIError(f"expected image files ({', '.join(IMAGE_EXTENSIONS)}) in {path}, found none")
            files += found
            roots.append(path)
        elif path.exists():
            files.append(path)
            roots.append(path.parent)
        else:
            raise CLIError(f"no such image file or folder: {path}")
    for f in files:
        if not f.is_file():
            raise CLIError(f"no such image file: {f}")
    base = Path(os.path.commonpath([str(r.resolve()) for r in roots]))
    items, seen, by_image = [], {}, set()
    for f in files:
        resolved = f.resolve()
        if resolved in by_image:  # the same image named twice: one output
            continue
        by_image.add(resolved)
        rel = resolved.relative_to(base).with_suffix(f".{fmt}").as_posix()
        if rel in seen:
            raise CLIError(f"two images would write the same feature file {rel}: {seen[rel]} and {f}; "
                           f"rename one or run them with different --out folders")
        seen[rel] = f
        items.append(Item(f, rel))
    return items


# --------------------------------------------------------------------------------------------
# manifest
# --------------------------------------------------------------------------------------------

def _read_jsonl(path: Path) -> list[dict]:
    """Records of a JSON-lines file; a line cut short by a kill (no newline, bad JSON) is ignored."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").split("\n"):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "file" in rec:
            records.append(rec)
    return records


def _partials(out_dir: Path) -> list[Path]:
    return sorted(out_dir.glob("manifest.rank*.partial.jsonl"))


def consolidate(out_dir: Path) -> dict[str, dict]:
    """Fold the partial manifests into ``manifest.jsonl`` (atomically); ``{file: record}``."""
    records: dict[str, dict] = {}
    for path in [out_dir / MANIFEST, *_partials(out_dir)]:
        for rec in _read_jsonl(path):
            records[rec["file"]] = rec  # later records (reruns) replace earlier ones
    with atomic_write(out_dir / MANIFEST, "w") as f:
        for key in sorted(records):
            f.write(json.dumps(records[key], sort_keys=True) + "\n")
    for path in _partials(out_dir):
        path.unlink()
    return records


def _image_stamp(path: Path) -> dict:
    st = path.stat()
    return {"image_bytes": st.st_size, "image_mtime_ns": st.st_mtime_ns}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _is_done(item: Item, rec: dict | None, out_dir: Path, settings: dict, verify: str) -> bool:
    if rec is None or rec.get("settings") != settings:
        return False
    if {k: rec.get(k) for k in ("image_bytes", "image_mtime_ns")} != _image_stamp(item.path):
        return False  # the image changed since
    target = out_dir / item.rel
    if not target.is_file() or target.stat().st_size != rec.get("bytes"):
        return False
    return verify != "hash" or _sha256(target) == rec.get("sha256")


def _other_settings(records: dict[str, dict], settings: dict) -> str | None:
    """A one-line description of how earlier outputs' settings differ, or None."""
    for rec in records.values():
        old = rec.get("settings") or {}
        diff = [f"{k} {old.get(k)!r} (now {v!r})" for k, v in settings.items() if old.get(k) != v]
        if diff:
            return f"{rec['file']} was made with " + ", ".join(diff)
    return None


def _remove_stale_temporaries(out_dir: Path, items: list[Item]) -> None:
    """Temporary files a killed run left behind (the atomic writes' ``.NAME.*.tmp``)."""
    names: dict[Path, set] = {}
    for it in items:
        target = out_dir / it.rel
        names.setdefault(target.parent, set()).update({f".{target.name}.", f".{target.stem}_pca.png."})
    for folder, prefixes in names.items():
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            n = entry.name
            if n.endswith(".tmp") and any(n.startswith(p) for p in prefixes):
                entry.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# data loading
# --------------------------------------------------------------------------------------------

class ImageFiles(Dataset):
    """``(index, Tensor[1, 3, H, W] or None, np.uint8[H, W, 3] or None, error or None)`` per image.

    A file that cannot be read (or is too small) gives its one-line error instead of raising, so
    the command can name it without a worker traceback.
    """

    def __init__(self, items, size, min_size: int, mean, std, keep_rgb: bool):
        self.items, self.size, self.min_size = list(items), size, min_size
        self.mean, self.std, self.keep_rgb = tuple(mean), tuple(std), keep_rgb

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        path = self.items[i].path
        try:
            rgb = resize_rgb(read_rgb(path), self.size)
            check_min_size(rgb, self.min_size, name=str(path))
            return i, to_tensor(rgb, self.mean, self.std), (rgb if self.keep_rgb else None), None
        except Exception as exc:  # reported by the main process with the file's name
            return i, None, None, " ".join(str(exc).split()) or type(exc).__name__


def _as_list(batch):
    return batch


# --------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------

def _serialize(feats: torch.Tensor, fmt: str, metadata: dict) -> bytes:
    if fmt == "pt":
        buf = io.BytesIO()
        torch.save(feats, buf)
        return buf.getvalue()
    from safetensors.torch import save

    return save({"features": feats}, metadata=metadata)


def _settings(args, neck, label) -> dict:
    return {"backbone": args.backbone, "backbone_id": str(neck.backbone_id), "layer": str(neck.layer),
            "upsampler": str(args.upsampler), "upsampler_label": str(label),
            "size": list(args.size) if isinstance(args.size, tuple) else args.size,
            "dtype": args.dtype, "format": args.format}


def _plan(args, out_dir: Path, settings: dict):
    """Rank 0: (items left to do, how many were already done) or raises CLIError."""
    items = collect_images(args.images, out_dir, args.format)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = consolidate(out_dir)
    if not args.overwrite:
        other = _other_settings({it.rel: records[it.rel] for it in items if it.rel in records}, settings)
        if other:
            raise CLIError(f"{out_dir} already holds features made with other settings ({other}); "
                           f"choose another --out or pass --overwrite")
    todo = [it for it in items
            if args.overwrite or not _is_done(it, records.get(it.rel), out_dir, settings, args.verify)]
    _remove_stale_temporaries(out_dir, todo)
    return todo, len(items) - len(todo)


def run_upsample(args) -> int:
    """The ``upsample`` command (see the module docstring); returns the exit code."""
    from ._cli_pictures import _backbone, _describe, _device, _neck
    from .training import distributed

    for name in ("batch_size", "workers"):
        value = getattr(args, name)
        if value < (1 if name == "batch_size" else 0):
            raise CLIError(f"expected --{name.replace('_', '-')} >= {1 if name == 'batch_size' else 0}, "
                           f"got {value}")
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise CLIError(f"--out must be a folder, got an existing file: {out_dir}")
    if args.device is not None:
        _device(args)  # a device that does not exist fails here, before anything runs
    info = distributed.setup(args.device)
    necks = []
    try:
        if info.is_main:  # fail on bad inputs before any model is built
            collect_images(args.images, out_dir, args.format)
        model = _backbone(args)
        neck, label = _neck(args, model, info.device)
        necks.append(neck)
        settings = _settings(args, neck, label)
        plan, error = None, None
        if info.is_main:
            try:
                plan = _plan(args, out_dir, settings)
            except CLIError as exc:
                error = str(exc)
        plan, error = distributed.broadcast_object((plan, error), info)
        if error:
            raise CLIError(error)
        todo, done_before = plan
        shard = todo[info.rank::info.world_size]
        if info.is_main and not args.quiet:
            where = f" on {info.world_size} processes" if info.enabled else ""
            print(f"{PROG} upsample: {_describe(neck)}; upsampler {label}; {len(todo)} image(s) to do"
                  f"{where}, {done_before} already done", flush=True)
        written, failure = 0, None
        try:
            written = _process(args, neck, label, shard, out_dir, settings, info)
        except (CLIError, OSError, RuntimeError, ValueError, MemoryError) as exc:
            failure = exc
        failed = distributed.mean_scalar(float(failure is not None), info) * info.world_size
        total = round(distributed.mean_scalar(float(written), info) * info.world_size)
        distributed.barrier(info)
        if info.is_main:
            consolidate(out_dir)  # what was written is kept, also after a failure
        if failure is not None:
            raise failure
        if failed:
            raise CLIError(f"{round(failed)} of {info.world_size} processes failed (see their errors above)")
        if info.is_main:
            print(f"wrote {total} feature file(s) to {out_dir} ({done_before} already done, skipped); "
                  f"manifest {out_dir / MANIFEST}", flush=True)
        return 0
    finally:
        for neck in necks:
            neck.remove()
        distributed.teardown(info)


def _process(args, neck, label, shard, out_dir: Path, settings: dict, info) -> int:
    from tqdm import tqdm

    from . import viz

    dtype = getattr(torch, args.dtype)
    data = ImageFiles(shard, args.size, neck.stride, neck.mean, neck.std, keep_rgb=not args.no_pca)
    loader = DataLoader(data, batch_size=args.batch_size, num_workers=args.workers, collate_fn=_as_list,
                        pin_memory=info.device.type == "cuda")
    quiet = args.quiet or args.no_progress or not sys.stderr.isatty()
    bar = tqdm(total=len(shard), desc=f"upsampling (rank {info.rank})" if info.enabled else "upsampling",
               unit="img", disable=quiet or not info.is_main, file=sys.stderr)
    journal = out_dir / f"manifest.rank{info.rank}.partial.jsonl"
    written = 0
    t0 = time.perf_counter()
    with open(journal, "a", encoding="utf-8") as log, torch.inference_mode():
        for batch in loader:
            for _, x, _, error in batch:
                if error is not None:
                    raise CLIError(error)
            groups: dict[tuple, list] = {}
            for entry in batch:  # images of one size run together
                groups.setdefault(tuple(entry[1].shape[-2:]), []).append(entry)
            for group in groups.values():
                x = torch.cat([entry[1] for entry in group]).to(info.device, non_blocking=True)
                hr, lr = neck(x, return_lowres=True)
                for i, (index, _, rgb, _) in enumerate(group):
                    item = shard[index]
                    target = out_dir / item.rel
                    # one image's own tensor: a clone, never a view of the batch's storage
                    feats = hr[i].to("cpu", dtype).clone(memory_format=torch.contiguous_format)
                    if rgb is not None:
                        lr_rgb, hr_rgb = viz.pca_rgb(lr[i].float(), hr[i].float(), fit_on=0)
                        viz.panel([rgb, lr_rgb, hr_rgb],
                                  [f"image {rgb.shape[0]}x{rgb.shape[1]}",
                                   f"low-res {lr.shape[-2]}x{lr.shape[-1]}",
                                   f"{label} {hr.shape[-2]}x{hr.shape[-1]}"],
                                  path=target.with_name(target.stem + "_pca.png"))
                    meta = {k: str(v) for k, v in settings.items()} | {"image": str(item.path)}
                    blob = _serialize(feats, args.format, meta)
                    atomic_write_bytes(target, blob)
                    record = {"file": item.rel, "image": str(item.path), **_image_stamp(item.path),
                              "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest(),
                              "shape": list(feats.shape), "dtype": args.dtype, "settings": settings,
                              "rank": info.rank}
                    log.write(json.dumps(record, sort_keys=True) + "\n")
                    log.flush()
                    os.fsync(log.fileno())
                    written += 1
                    bar.update(1)
    bar.close()
    if info.enabled and not args.quiet:
        print(f"  rank {info.rank}: {written} file(s) in {time.perf_counter() - t0:.1f} s", flush=True)
    return written
