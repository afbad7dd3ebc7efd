"""Deterministic inputs for the origin-conformance harness.

``generate(root)`` writes ``root/images/val/*`` and ``root/jsons/val.json`` in the origin
project's layout: synthesized receipts (this project's synthesizer, its own seed) and edge
images (an RGBA PNG, a grayscale JPEG, JPEGs with EXIF orientations 2, 3, 5, 6, 7 and 8
annotated once in the upright frame and once in the stored frame, two whose words fit both
frames, an image without words) listed in the JSON in a fixed order that is not alphabetical.

Run as a script: ``python conformance_data.py OUT_DIR``.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from diskcache_ocr.synth import split_paths, synthesize

SEED = 20261207
N_RECEIPTS = 16
RECEIPT_SIZE = (300, 400)
UPRIGHT = (240, 360)  # (width, height) of the EXIF pages as displayed
ORIENTATIONS = (2, 3, 5, 6, 7, 8)
_ORIENTATION_TAG = 0x0112
_T = Image.Transpose
# What to apply to the upright page to get the stored pixels (exif_transpose undoes it).
_STORE = {2: _T.FLIP_LEFT_RIGHT, 3: _T.ROTATE_180, 5: _T.TRANSPOSE, 6: _T.ROTATE_90,
          7: _T.TRANSVERSE, 8: _T.ROTATE_270}


def to_stored(points: np.ndarray, orientation: int, stored_w: int, stored_h: int) -> np.ndarray:
    """Upright-frame pixel coordinates -> stored-frame ones (pixel-index convention, the
    inverse of the EXIF rotation the upright page was made with)."""
    u, v = points[:, 0], points[:, 1]
    W, H = stored_w - 1, stored_h - 1
    x, y = {2: (W - u, v), 3: (W - u, H - v), 5: (v, u), 6: (v, H - u),
            7: (W - v, H - u), 8: (W - v, u)}[orientation]
    return np.stack([x, y], axis=1)


def _page(rng: np.random.Generator, w: int, h: int, n: int,
          region: tuple[int, int] | None = None, mode: str = "RGB"):
    """A page with ``n`` dark word boxes (with some text) inside ``region`` (w, h) from the
    top-left; returns the image and the boxes' quads (integer corners)."""
    bg = int(rng.integers(200, 250))
    img = Image.new("RGB", (w, h), (bg, bg - int(rng.integers(0, 20)), bg - 10))
    draw = ImageDraw.Draw(img)
    rw, rh = region or (w, h)
    quads = []
    for _ in range(n):
        bw, bh = int(rng.integers(20, 70)), int(rng.integers(8, 18))
        x0 = int(rng.integers(2, max(3, rw - bw - 2)))
        y0 = int(rng.integers(2, max(3, rh - bh - 2)))
        g = int(rng.integers(10, 90))
        draw.rectangle([x0, y0, x0 + bw, y0 + bh], outline=(g, g, g))
        draw.text((x0 + 2, y0 + 1), "AB12"[: max(1, bw // 12)], fill=(g, g, g + 20))
        quads.append(np.array([[x0, y0], [x0 + bw, y0], [x0 + bw, y0 + bh], [x0, y0 + bh]],
                              np.float64))
    return (img.convert(mode) if mode != "RGB" else img), quads


def _words(quads) -> dict:
    return {"words": {f"{k + 1:04d}": {"points": [[_num(x), _num(y)] for x, y in q]}
                      for k, q in enumerate(quads)}}


def _num(v: float) -> int | float:
    v = float(v)
    return int(v) if v.is_integer() else v


def _save_jpeg(img: Image.Image, path: Path, orientation: int | None = None) -> None:
    buf = io.BytesIO()
    kw = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[_ORIENTATION_TAG] = orientation
        kw["exif"] = exif.tobytes()
    img.save(buf, "JPEG", quality=90, **kw)
    path.write_bytes(buf.getvalue())


def _exif_case(rng, images: Path, o: int, frame: str, region=None) -> tuple[str, dict]:
    """One EXIF-tagged page; its words in the upright (``frame="up"``) or stored frame."""
    uw, uh = UPRIGHT
    upright, quads = _page(rng, uw, uh, int(rng.integers(5, 10)), region=region)
    stored = upright.transpose(_STORE[o])
    name = f"exif{o}_{frame}.jpg"
    _save_jpeg(stored, images / name, o)
    if frame == "st":
        quads = [to_stored(q, o, stored.width, stored.height) for q in quads]
    return name, _words(quads)


def generate(root: str | Path, seed: int = SEED) -> list[str]:
    """Write the inputs under ``root``; return the image names in the JSON's order."""
    root = Path(root)
    synthesize(root, N_RECEIPTS, seed=seed, min_words=4, max_words=14, size=RECEIPT_SIZE,
               exif_fraction=0.25)
    images, ann_path = split_paths(root)
    entries: dict[str, dict] = json.loads(ann_path.read_text())["images"]
    rng = np.random.default_rng(seed)

    # RGBA PNG: alpha varies (transparent stripes); one word pokes outside the page (the
    # origin clamps keypoints into the image).
    img, quads = _page(rng, 320, 240, 6)
    rgba = np.dstack([np.asarray(img), np.full((240, 320), 255, np.uint8)])
    rgba[::7, :, 3] = 0
    rgba[:, 100:140, 3] = 90
    Image.fromarray(rgba, "RGBA").save(images / "rgba_page.png")
    quads.append(np.array([[290, 200], [330, 200], [330, 246], [290, 246]], np.float64))
    entries["rgba_page.png"] = _words(quads)

    # Grayscale JPEG with half-pixel coordinates (the origin rounds half to even).
    img, quads = _page(rng, 280, 360, 7, mode="L")
    _save_jpeg(img, images / "gray_page.jpg")
    quads = [q + np.array([0.5, 1.5]) if k % 2 == 0 else q + np.array([2.5, -0.5])
             for k, q in enumerate(quads)]
    entries["gray_page.jpg"] = _words(quads)

    # EXIF pages: every orientation in both frames; two whose words fit both frames.
    for o in ORIENTATIONS:
        for frame in ("up", "st"):
            name, entry = _exif_case(rng, images, o, frame)
            entries[name] = entry
    for o in (6, 5):
        name, entry = _exif_case(rng, images, o, "both", region=(UPRIGHT[0], UPRIGHT[0]))
        entries[name] = entry

    # A page without words, and one whose entry has no "words" key.
    img, _ = _page(rng, 200, 260, 0)
    _save_jpeg(img, images / "blank_page.jpg")
    entries["blank_page.jpg"] = {"words": {}}
    _save_jpeg(img.rotate(180), images / "nowords_key.jpg")
    entries["nowords_key.jpg"] = {}

    # The JSON's order (the origin's sample order): a fixed shuffle, not alphabetical.
    names = sorted(entries)
    order = [names[i] for i in np.random.default_rng(seed + 1).permutation(len(names))]
    assert order != names
    ann_path.write_text(json.dumps({"images": {n: entries[n] for n in order}}, indent=None))
    return order


if __name__ == "__main__":
    out = generate(sys.argv[1])
    print(f"{len(out)} images under {sys.argv[1]}")
