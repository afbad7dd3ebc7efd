"""Tests for the synthetic receipt dataset writer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter, ImageOps

from diskcache_ocr.synth import SynthSummary, synthesize

SMALL = dict(size=(240, 320), min_words=5, max_words=20)


def _load(root: Path, split: str = "val") -> dict:
    return json.loads((root / "jsons" / f"{split}.json").read_text())["images"]


def _files(root: Path) -> dict[str, bytes]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def _text_stats(img: Image.Image, words: dict) -> tuple[float, float, float, float]:
    """(share of dark pixels inside the polygons, mean darkness inside, outside,
    smallest share of dark pixels over the word polygons)."""
    gray = np.asarray(img.convert("L"), np.float32)
    mask_img = Image.new("L", img.size, 0)
    draw = ImageDraw.Draw(mask_img)
    per_word = []
    for w in words.values():
        one = Image.new("L", img.size, 0)
        ImageDraw.Draw(one).polygon([tuple(p) for p in w["points"]], fill=1)
        m = np.asarray(one, bool)
        per_word.append(float((gray[m] < 128).mean()) if m.any() else 0.0)
        draw.polygon([tuple(p) for p in w["points"]], fill=1)
    mask = np.asarray(mask_img, bool)
    # One pixel of dilation absorbs anti-aliasing and JPEG ringing at the box edges.
    grown = np.asarray(mask_img.filter(ImageFilter.MaxFilter(3)), bool)
    dark = gray < 128
    inside_share = float(dark[grown].sum() / max(1, dark.sum()))
    darkness = 255.0 - gray
    return inside_share, float(darkness[mask].mean()), float(darkness[~grown].mean()), min(per_word)


def test_layout_and_counts(tmp_path: Path) -> None:
    s = synthesize(tmp_path / "ds", 5, split="train-a_1", seed=3, **SMALL)
    root = tmp_path / "ds"
    assert isinstance(s, SynthSummary)
    assert s.root == root and s.split == "train-a_1" and s.images == 5
    assert s.annotation_file == root / "jsons" / "train-a_1.json"
    names = sorted(p.name for p in (root / "images" / "train-a_1").iterdir())
    assert names == [f"receipt_{i:05d}.jpg" for i in range(5)]
    ann = _load(root, "train-a_1")
    assert sorted(ann) == names
    assert s.words == sum(len(e["words"]) for e in ann.values())
    assert not [p for p in root.rglob("*") if p.name.endswith(".tmp")]


def test_json_structure_and_polygons(tmp_path: Path) -> None:
    synthesize(tmp_path, 12, seed=1, exif_fraction=0.5, **SMALL)
    ann = _load(tmp_path)
    rotated = 0
    for name, entry in ann.items():
        assert set(entry) == {"words"}
        words = entry["words"]
        assert 5 <= len(words) <= 20
        assert list(words) == [f"{k:04d}" for k in range(1, len(words) + 1)]
        with Image.open(tmp_path / "images" / "val" / name) as im:
            W, H = ImageOps.exif_transpose(im).size
        for w in words.values():
            pts = w["points"]
            assert len(pts) == 4 and all(len(p) == 2 for p in pts)
            coords = [v for p in pts for v in p]
            assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in coords)
            a = np.array(pts, float)
            assert (a[:, 0] >= 0).all() and (a[:, 0] <= W).all()
            assert (a[:, 1] >= 0).all() and (a[:, 1] <= H).all()
            assert np.ptp(a[:, 1]) >= 4 and np.ptp(a[:, 0]) >= 4
            # Shoelace sum is positive for clockwise order when y grows downwards.
            area = sum(a[i, 0] * a[(i + 1) % 4, 1] - a[(i + 1) % 4, 0] * a[i, 1] for i in range(4))
            assert area > 0
            rotated += int(a[0, 1] != a[1, 1])
    assert rotated > 0  # some words are placed at an angle


def test_size_variety(tmp_path: Path) -> None:
    synthesize(tmp_path, 40, seed=0, exif_fraction=0.0, size=(120, 160), min_words=1, max_words=3)
    sizes = []
    for p in sorted((tmp_path / "images" / "val").iterdir()):
        with Image.open(p) as im:
            sizes.append(im.size)
    assert set(sizes) <= {(120, 160), (160, 120), (90, 160)}
    assert sizes.count((120, 160)) > len(sizes) / 2
    assert len(set(sizes)) >= 2


def test_default_size_jpeg_is_realistic(tmp_path: Path) -> None:
    synthesize(tmp_path, 2, seed=0, exif_fraction=0.0)
    for p in (tmp_path / "images" / "val").iterdir():
        assert 100_000 < p.stat().st_size < 1_000_000
        with Image.open(p) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            assert min(im.size) >= 720 and max(im.size) == 1280


def test_deterministic(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    synthesize(a, 4, seed=7, exif_fraction=0.5, **SMALL)
    synthesize(b, 4, seed=7, exif_fraction=0.5, **SMALL)
    synthesize(c, 4, seed=8, exif_fraction=0.5, **SMALL)
    fa, fb, fc = _files(a), _files(b), _files(c)
    assert fa == fb
    assert fa.keys() == fc.keys()
    assert all(fa[k] != fc[k] for k in fa)


def test_image_does_not_depend_on_n_or_workers(tmp_path: Path) -> None:
    synthesize(tmp_path / "few", 2, seed=5, **SMALL)
    synthesize(tmp_path / "many", 5, seed=5, **SMALL)
    synthesize(tmp_path / "pool", 5, seed=5, workers=2, **SMALL)
    few, many, pool = _files(tmp_path / "few"), _files(tmp_path / "many"), _files(tmp_path / "pool")
    for k in few:
        if k.endswith(".jpg"):
            assert few[k] == many[k]
    assert many == pool
    assert _load(tmp_path / "few").items() <= _load(tmp_path / "many").items()


def test_exif_tagged_text_inside_polygons(tmp_path: Path) -> None:
    s = synthesize(tmp_path, 10, seed=2, exif_fraction=1.0, size=(360, 480),
                   min_words=10, max_words=40)
    assert s.exif_rotated == 10
    ann = _load(tmp_path)
    seen = set()
    for name, entry in ann.items():
        with Image.open(tmp_path / "images" / "val" / name) as im:
            orient = im.getexif().get(0x0112)
            assert orient in {2, 3, 4, 5, 6, 7, 8}
            seen.add(orient)
            im.load()
            shown = ImageOps.exif_transpose(im)
            share, inside, outside, worst = _text_stats(shown, entry["words"])
            assert share > 0.98 and inside > 2 * outside and worst > 0.02, name
            # The raw stored pixels must NOT match the polygons: the tag carries meaning.
            if im.size == shown.size:
                raw_share, *_ = _text_stats(im, entry["words"])
                assert raw_share < 0.9, name
    assert len(seen) >= 2


def test_untagged_text_inside_polygons(tmp_path: Path) -> None:
    s = synthesize(tmp_path, 4, seed=4, exif_fraction=0.0, size=(360, 480),
                   min_words=10, max_words=60)
    assert s.exif_rotated == 0
    for name, entry in _load(tmp_path).items():
        with Image.open(tmp_path / "images" / "val" / name) as im:
            assert 0x0112 not in im.getexif()
            share, inside, outside, worst = _text_stats(im, entry["words"])
        assert share > 0.98 and inside > 2 * outside and worst > 0.02, name


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"n": 0}, "n"),
        ({"n": 1.5}, "n"),
        ({"n": True}, "n"),
        ({"split": "../x"}, "split"),
        ({"split": ""}, "split"),
        ({"split": "a b"}, "split"),
        ({"seed": -1}, "seed"),
        ({"min_words": 0}, "min_words"),
        ({"min_words": 10, "max_words": 5}, "max_words"),
        ({"size": (10, 10)}, "size"),
        ({"size": (960,)}, "size"),
        ({"size": (960.0, 1280)}, "size"),
        ({"exif_fraction": 1.5}, "exif_fraction"),
        ({"exif_fraction": -0.1}, "exif_fraction"),
        ({"quality": 0}, "quality"),
        ({"quality": 101}, "quality"),
        ({"workers": 0}, "workers"),
    ],
)
def test_argument_validation(tmp_path: Path, kwargs: dict, name: str) -> None:
    args = {"n": 1, **kwargs}
    n = args.pop("n")
    with pytest.raises(ValueError, match=rf"^{name}\b") as info:
        synthesize(tmp_path, n, **args)
    assert repr(kwargs[name]) in str(info.value)  # the message names the bad value
    assert not (tmp_path / "jsons").exists()


def test_too_many_words_for_page(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="size"):
        synthesize(tmp_path, 1, size=(64, 64), min_words=500, max_words=500)
