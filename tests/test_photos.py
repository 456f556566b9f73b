"""The photo filter rule, de-duplication, the fixed split and the fetch script's manifest, on
synthetic images (no network, no apt)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featup_adapters.training import photos as P

REPO = Path(__file__).resolve().parents[1]


def _gradient(h=256, w=384):
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx / w * 255, yy / h * 255, (xx + yy) / (h + w) * 255], -1)
    return img.round().astype(np.uint8)


def _vector_art(h=256, w=384):
    img = np.zeros((h, w, 3), np.uint8)
    img[:] = (30, 60, 140)
    yy, xx = np.mgrid[0:h, 0:w]
    img[(yy - 120) ** 2 + (xx - 150) ** 2 < 70 ** 2] = (240, 200, 40)
    img[(yy > 180) & (xx > 250)] = (200, 30, 90)
    img[yy < 0.3 * xx - 40] = (20, 160, 90)
    return img


def _photo_like(h=256, w=384, seed=0):
    rng = np.random.default_rng(seed)
    base = _gradient(h, w).astype(np.float64)
    yy, xx = np.mgrid[0:h, 0:w]
    base += 25 * np.sin(xx / 7.0 + seed)[..., None] * np.cos(yy / 11.0)[..., None]
    return (base + rng.normal(0, 4, base.shape)).clip(0, 255).astype(np.uint8)


def test_rule_drops_flat_gradients_and_vector_art_and_keeps_textured_photos():
    for img in (_gradient(), _vector_art()):
        m = P.measures(Image.fromarray(img))
        assert m["flat_fraction"] >= P.MAX_FLAT_FRACTION and not P.is_photo(m), m
    m = P.measures(Image.fromarray(_photo_like()))
    assert m["flat_fraction"] < 0.05 and m["colours"] >= P.MIN_COLOURS and P.is_photo(m), m
    assert m["size"] == [384, 256]


def test_rule_drops_textured_images_with_too_few_colours():
    rng = np.random.default_rng(1)
    binary = (rng.random((128, 128)) > 0.5).astype(np.uint8) * 255      # noise, 2 colours
    m = P.measures(Image.fromarray(binary).convert("RGB"))
    assert m["flat_fraction"] < 0.05 and m["colours"] == 2 and not P.is_photo(m)


def test_flat_fraction_counts_blocks_by_their_plane_residual():
    g = np.zeros((16, 32))
    g[:, :] = np.arange(32)[None, :] * 3.0          # a plane: every block flat
    assert P.flat_fraction(g) == 1.0
    g[:8, :8] += np.random.default_rng(0).normal(0, 5, (8, 8))   # one of 8 blocks textured
    assert P.flat_fraction(g) == pytest.approx(7 / 8)
    with pytest.raises(ValueError, match=r"at least 8x8, got \[4, 40\]"):
        P.flat_fraction(np.zeros((4, 40)))


def test_distinct_colours_quantizes_to_four_bits():
    img = np.zeros((2, 2, 3), np.uint8)
    img[0, 0] = (1, 2, 3)          # same 4-bit bin as black
    img[1, 1] = (16, 0, 0)         # a new bin
    assert P.distinct_colours(img) == 2


@pytest.mark.parametrize("rel, key", [
    ("usr/share/wallpapers/Kite/contents/images/1920x1080.jpg", "usr/share/wallpapers/Kite"),
    ("usr/share/wallpapers/Kite/contents/images_dark/800x600.png", "usr/share/wallpapers/Kite"),
    ("usr/share/wallpapers/Kite/contents/screenshot.jpg", "usr/share/wallpapers/Kite"),
    ("usr/share/backgrounds/mate/abstract/Elephants_3840x2160.jpg", "usr/share/backgrounds/mate/abstract/Elephants"),
    ("usr/share/backgrounds/mate/abstract/Elephants.jpg", "usr/share/backgrounds/mate/abstract/Elephants"),
    ("usr/share/backgrounds/gnome/wood-l.webp", "usr/share/backgrounds/gnome/wood"),
    ("usr/share/backgrounds/sizes/1024x768.png", "usr/share/backgrounds/sizes"),
    ("usr/share/backgrounds/calla.png", "usr/share/backgrounds/calla"),
])
def test_group_key_joins_the_sizes_of_one_wallpaper(rel, key):
    assert P.group_key(rel) == key


def test_dedupe_keeps_the_largest_size_and_drops_hash_twins():
    a = Image.fromarray(_photo_like(seed=0))
    b = Image.fromarray(_photo_like(seed=3)[::-1].copy())
    items = [
        {"id": "k/a_small", "key": "k/a", "pixels": 100, "dhash": P.dhash(a.resize((96, 64)))},
        {"id": "k/a_big", "key": "k/a", "pixels": 10_000, "dhash": P.dhash(a)},
        {"id": "other/a_copy", "key": "other/a", "pixels": 50, "dhash": P.dhash(a.resize((150, 100)))},
        {"id": "k/b", "key": "k/b", "pixels": 10_000, "dhash": P.dhash(b)},
    ]
    kept = P.dedupe(items)
    assert [k["id"] for k in kept] == ["k/a_big", "k/b"]
    dup = {it["id"]: it.get("duplicate_of") for it in items}
    assert dup == {"k/a_small": "k/a_big", "other/a_copy": "k/a_big", "k/a_big": None, "k/b": None}
    assert P.hamming(P.dhash(a), P.dhash(b)) > P.DUPLICATE_HAMMING


def test_split_is_fixed_per_id_and_near_the_fraction():
    ids = [f"pkg:usr/share/img{i}.jpg" for i in range(2000)]
    splits = [P.split_of(i) for i in ids]
    assert splits == [P.split_of(i) for i in reversed(ids)][::-1]     # order-independent
    frac = splits.count("val") / len(splits)
    assert 0.17 < frac < 0.23
    assert P.split_of("x", val_fraction=0.0) == "train" and P.split_of("x", val_fraction=1.0) == "val"
    assert P.safe_name("pkg:usr/share/a b.jpg") == "pkg_usr_share_a_b.jpg"


def _load_script():
    spec = importlib.util.spec_from_file_location("fetch_photos", REPO / "scripts" / "fetch_photos.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_fetch_script_writes_photos_and_a_manifest_with_the_split(tmp_path, monkeypatch):
    mod = _load_script()
    src = tmp_path / "src"
    src.mkdir()
    files = {
        "w/Photo/contents/images/800x600.png": _photo_like(300, 400, seed=1),
        "w/Photo/contents/images/400x300.png": _photo_like(150, 200, seed=1),
        "w/Art/contents/images/800x600.png": _vector_art(),
        "w/grad.png": _gradient(),
        "w/other_1600x900.png": _photo_like(256, 384, seed=7)[:, ::-1].copy(),
    }
    cands = []
    for rel, arr in files.items():
        p = src / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(p)
        cands.append({"id": f"pkg:{rel}", "source": "test", "path": p, "key": f"pkg:{P.group_key(rel)}",
                      "sha256": mod.sha256(p), "pixels": arr.shape[0] * arr.shape[1]})
    (src / "w" / "logo.svg").write_text("<svg/>")
    cands.append({"id": "pkg:w/logo.svg", "source": "test", "path": src / "w" / "logo.svg",
                  "key": "pkg:w/logo", "sha256": "0", "pixels": 0})
    monkeypatch.setattr(mod, "candidates", lambda args: cands)
    out, manifest = tmp_path / "photos", tmp_path / "manifest.json"
    assert mod.main(["--out", str(out), "--manifest", str(manifest), "--short-side", "64"]) == 0
    m = json.loads(manifest.read_text())
    dec = {f["id"]: f["decision"] for f in m["files"]}
    assert dec["pkg:w/Art/contents/images/800x600.png"] == "dropped: not a photograph by the rule"
    assert dec["pkg:w/grad.png"] == "dropped: not a photograph by the rule"
    assert dec["pkg:w/logo.svg"] == "dropped: vector file (svg)"
    photo = "pkg:w/Photo/contents/images/800x600.png"
    assert dec[photo].startswith("kept: ")
    assert "pkg:w/Photo/contents/images/400x300.png" not in dec           # listed as a size
    entry = next(f for f in m["files"] if f["id"] == photo)
    assert entry["other_sizes"] == ["400x300.png"]
    kept = [f for f in m["files"] if f["decision"].startswith("kept")]
    assert m["counts"]["kept"] == len(kept) == 2
    for f in kept:
        assert f["file"].split("/")[0] == P.split_of(f["id"]) == f["decision"][6:]
        with Image.open(out / f["file"]) as im:
            assert min(im.size) == 64
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.jpg")) == \
        sorted(f["file"] for f in kept)
