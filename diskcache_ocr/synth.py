"""Synthetic receipt-like OCR detection data in the origin project's on-disk layout.

``out_dir/images/<split>/receipt_NNNNN.jpg`` plus ``out_dir/jsons/<split>.json`` holding
``{"images": {name: {"words": {"0001": {"points": [[x, y], ...4]}}}}}`` where points are in
the coordinates of the image as displayed (after its EXIF orientation is applied).
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["SynthSummary", "split_paths", "synthesize"]

_SPLIT_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_ORIENTATION_TAG = 0x0112
# Pixels are stored with the inverse of what exif_transpose applies for each tag, so that
# decoding with exif_transpose yields the displayed page the polygons refer to.
_T = Image.Transpose
_STORE_TRANSPOSE = {2: _T.FLIP_LEFT_RIGHT, 3: _T.ROTATE_180, 4: _T.FLIP_TOP_BOTTOM,
                    5: _T.TRANSPOSE, 6: _T.ROTATE_90, 7: _T.TRANSVERSE, 8: _T.ROTATE_270}
# Phone photos mostly carry 3/6/8; the mirrored tags are rare but exercise decoders.
_ORIENTATIONS = (3, 6, 8, 2, 4, 5, 7)
_ORIENT_P = (0.25, 0.25, 0.25, 0.0625, 0.0625, 0.0625, 0.0625)
_UPPER = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
_ALNUM = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"))
_MIN_FONT = 8
_Placed = tuple[str, float, float, float, float]  # text, x, y, angle, line centre


@dataclass(frozen=True)
class SynthSummary:
    """What :func:`synthesize` wrote."""

    root: Path
    split: str
    images: int
    words: int
    exif_rotated: int
    annotation_file: Path


@dataclass(frozen=True)
class _Params:
    images_dir: str
    seed: int
    min_words: int
    max_words: int
    size: tuple[int, int]
    exif_fraction: float
    quality: int


@functools.lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled scalable font; the fixed bitmap font where FreeType is missing."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def _mid(font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> float:
    """Vertical middle of typical glyphs below the draw origin, to share one baseline."""
    _, t, _, b = font.getbbox("Ag")
    return (t + b) / 2


def _word(rng: np.random.Generator) -> str:
    """One receipt-ish token: item word, code, quantity, price, date or time."""
    kind = rng.choice(6, p=(0.4, 0.15, 0.08, 0.25, 0.06, 0.06))
    if kind == 0:
        w = "".join(rng.choice(_UPPER, rng.integers(2, 10)))
        return w.capitalize() if rng.random() < 0.3 else w
    if kind == 1:
        return "".join(rng.choice(_ALNUM, rng.integers(3, 11)))
    if kind == 2:
        return f"{rng.integers(1, 13)}x"
    if kind == 3:
        cur = "$" if rng.random() < 0.3 else ""
        return f"{cur}{rng.integers(0, 500)}.{rng.integers(0, 100):02d}"
    if kind == 4:
        return f"{rng.integers(1, 29):02d}/{rng.integers(1, 13):02d}/{rng.integers(10, 30)}"
    return f"{rng.integers(0, 24):02d}:{rng.integers(0, 60):02d}"


def _rotated_quad(w: float, h: float, deg: float) -> np.ndarray:
    """Corners (TL, TR, BR, BL) of a w x h box rotated ``deg`` counter-clockwise on screen,
    relative to the box centre (y grows downwards, as in PIL's ``rotate``)."""
    a = math.radians(deg)
    c, s = math.cos(a), math.sin(a)
    pts = np.array([[-w / 2, -h / 2], [w / 2, -h / 2], [w / 2, h / 2], [-w / 2, h / 2]])
    return np.stack([pts[:, 0] * c + pts[:, 1] * s, -pts[:, 0] * s + pts[:, 1] * c], axis=1)


def _layout(rng: np.random.Generator, words: list[str], angles: list[float],
            W: int, H: int, fs: int, kmax: int) -> list[_Placed] | None:
    """Flow words into receipt lines; ``(text, x, y, angle, line_centre)`` per word, with
    (x, y) the top-left of its axis-aligned envelope, or None when the page is too small."""
    font = _font(fs)
    boxes = [font.getbbox(t) for t in words]
    mid = _mid(font)
    env = []  # envelope size of each word; rotated ones reserve their rotated extent
    for (left, t, r, b), ang in zip(boxes, angles, strict=True):
        if ang == 0.0:  # baseline-aligned: reserve symmetric room around the line centre
            env.append((r - left + 2.0, 2.0 * max(mid - t, b - mid) + 2.0))
        else:
            q = _rotated_quad(r - left + 2, b - t + 2, ang)
            env.append((float(np.ptp(q[:, 0])), float(np.ptp(q[:, 1]))))
    mx, my = W * rng.uniform(0.04, 0.09), H * rng.uniform(0.03, 0.06)
    space = max(fs * 0.5, 3.0)
    out: list[_Placed] = []
    y, i = my, 0
    while i < len(words):
        line: list[int] = []
        want, width = int(rng.integers(1, kmax + 1)), 0.0
        while i + len(line) < len(words) and len(line) < want:
            # Reserve the widest gap used below so no line overflows its margins.
            extra = env[i + len(line)][0] + (space * 2.5 if line else 0)
            if width + extra > W - 2 * mx:
                break
            width += extra
            line.append(i + len(line))
        if not line:
            return None  # a single word wider than the page
        height = max(env[j][1] for j in line)
        if y + height > H - my:
            return None
        centre = y + height / 2
        align = rng.choice(3, p=(0.6, 0.1, 0.3)) if len(line) > 1 else rng.choice(2, p=(0.85, 0.15))
        x = mx if align != 1 else (W - width) / 2
        for k, j in enumerate(line):
            if align == 2 and k == len(line) - 1:
                x = W - mx - env[j][0]  # price column flush right
            out.append((words[j], x, centre - env[j][1] / 2, angles[j], centre))
            x += env[j][0] + space * rng.uniform(1.5, 2.5)
        i += len(line)
        y += height + fs * rng.uniform(0.3, 0.9) + (fs * 1.5 if rng.random() < 0.08 else 0)
    return out


def _background(rng: np.random.Generator, W: int, H: int) -> np.ndarray:
    """Off-white paper: a tint, a smooth low-frequency shading and fine grain."""
    base = np.array([243, 239, 229], np.float32) + rng.uniform(-6, 6, 3).astype(np.float32)
    low = rng.standard_normal((H // 32 + 2, W // 32 + 2), dtype=np.float32)
    low = np.asarray(Image.fromarray(low).resize((W, H), Image.Resampling.BILINEAR))
    # Fine grain is what makes the JPEG a realistic few hundred KB rather than ~60 KB.
    grain = rng.standard_normal((H, W), dtype=np.float32) * rng.uniform(3.0, 5.5) + low * 3
    return np.clip(base + grain[..., None], 0, 255).astype(np.uint8)


def _render_one(p: _Params, i: int) -> tuple[str, dict, bool]:
    """Render, encode and write image ``i``; return its name, words and whether it's tagged."""
    # The seed of image i depends only on (seed, i), never on n or the worker layout.
    rng = np.random.default_rng(np.random.SeedSequence(p.seed, spawn_key=(i,)))
    w0, h0 = p.size
    W, H = [(w0, h0), (h0, w0), (round(w0 * 0.75), h0)][rng.choice(3, p=(0.8, 0.1, 0.1))]
    n_words = int(rng.integers(p.min_words, p.max_words + 1))
    words = [_word(rng) for _ in range(n_words)]
    angles = [float(rng.choice((-1, 1)) * rng.uniform(5, 25)) if rng.random() < 0.1 else 0.0
              for _ in words]
    fs = max(_MIN_FONT, int(min(H, W) * rng.uniform(0.018, 0.032)))
    kmax = 6  # most words on one line; dense pages get smaller type and fuller lines
    while (placed := _layout(rng, words, angles, W, H, fs, kmax)) is None:
        if fs <= _MIN_FONT and kmax >= 40:
            raise ValueError(f"size={p.size!r} is too small for max_words={p.max_words}")
        fs, kmax = max(_MIN_FONT, int(fs * 0.85)), kmax + 1
    img = Image.fromarray(_background(rng, W, H))
    draw, font = ImageDraw.Draw(img), _font(fs)
    mid = _mid(font)
    g = int(rng.integers(10, 60))
    ink = (g, g, g + int(rng.integers(0, 25)))
    polys: dict[str, dict] = {}
    for k, (text, x, y, ang, centre) in enumerate(placed):
        left, t, r, b = font.getbbox(text)
        if ang == 0.0:
            ox, oy = round(x + 1 - left), round(centre - mid)  # draw origin, shared baseline
            draw.text((ox, oy), text, font=font, fill=ink)
            # One pixel of slack: anti-aliased edges and JPEG ringing stay inside the box.
            x0, y0, x1, y1 = ox + left - 1, oy + t - 1, ox + r + 1, oy + b + 1
            quad = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float64)
        else:
            pad = 4
            patch = Image.new("L", (int(r - left + 2 * pad), int(b - t + 2 * pad)), 0)
            ImageDraw.Draw(patch).text((pad - left, pad - t), text, font=font, fill=255)
            rot = patch.rotate(ang, resample=Image.Resampling.BICUBIC, expand=True)
            q = _rotated_quad(r - left + 2, b - t + 2, ang)
            # Centre the rotated patch on the word's envelope centre; PIL keeps the
            # patch centre at the centre of the expanded canvas.
            cx, cy = x + np.ptp(q[:, 0]) / 2, y + np.ptp(q[:, 1]) / 2
            px, py = round(cx - rot.width / 2), round(cy - rot.height / 2)
            img.paste(ink, (px, py, px + rot.width, py + rot.height), rot)
            quad = np.round(q + [px + rot.width / 2, py + rot.height / 2], 2)
        quad = np.clip(quad, 0, [W, H])
        pts = [[int(a), int(c)] if ang == 0.0 else [float(a), float(c)] for a, c in quad]
        polys[f"{k + 1:04d}"] = {"points": pts}
    buf, exif = io.BytesIO(), Image.Exif()
    if rng.random() < p.exif_fraction:
        exif[_ORIENTATION_TAG] = orient = int(rng.choice(_ORIENTATIONS, p=_ORIENT_P))
        img = img.transpose(_STORE_TRANSPOSE[orient])
    # Fixed encoder settings (no optimize/progressive) keep the bytes reproducible.
    img.save(buf, "JPEG", quality=p.quality, **({"exif": exif.tobytes()} if exif else {}))
    name = f"receipt_{i:05d}.jpg"
    _atomic_write(Path(p.images_dir) / name, buf.getvalue())
    return name, {"words": polys}, bool(exif)


def _atomic_write(path: Path, data: bytes) -> None:
    """Write via a sibling temp file and os.replace, so readers never see a torn file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _check_int(name: str, value: object, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
            or value < lo or (hi is not None and value > hi):
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be an integer {rng}, got {value!r}")
    return int(value)


def split_paths(root: str | os.PathLike, split: str = "val") -> tuple[Path, Path]:
    """Where :func:`synthesize` puts a split under ``root``: (images dir, annotation file)."""
    root = Path(root)
    return root / "images" / split, root / "jsons" / f"{split}.json"


def synthesize(out_dir: str | os.PathLike, n: int, *, split: str = "val", seed: int = 0,
               min_words: int = 40, max_words: int = 200, size: tuple[int, int] = (960, 1280),
               exif_fraction: float = 0.1, quality: int = 90, workers: int = 1) -> SynthSummary:
    """Write ``n`` synthetic receipt images and their word polygons; deterministic per seed.

    ``size`` is (width, height) of most pages; ~10% are landscape and ~10% narrower.
    ``workers`` > 1 renders in a process pool with byte-identical results.
    """
    n = _check_int("n", n, 1)
    seed = _check_int("seed", seed, 0)
    min_words = _check_int("min_words", min_words, 1)
    max_words = _check_int("max_words", max_words, min_words)
    quality = _check_int("quality", quality, 1, 100)
    workers = _check_int("workers", workers, 1)
    if not isinstance(split, str) or not _SPLIT_RE.match(split):
        raise ValueError(f"split must be a simple name (letters, digits, _ or -), got {split!r}")
    if not (isinstance(size, (tuple, list)) and len(size) == 2
            and all(not isinstance(v, bool) and isinstance(v, (int, np.integer)) and v >= 64
                    for v in size)):
        raise ValueError(f"size must be (width, height) integers >= 64, got {size!r}")
    if isinstance(exif_fraction, bool) or not isinstance(exif_fraction, (int, float)) \
            or not 0.0 <= exif_fraction <= 1.0:
        raise ValueError(f"exif_fraction must be a number in [0, 1], got {exif_fraction!r}")
    root = Path(out_dir)
    images_dir, ann_path = split_paths(root, split)
    for d in (images_dir, ann_path.parent):
        d.mkdir(parents=True, exist_ok=True)
    p = _Params(str(images_dir), seed, min_words, max_words, (int(size[0]), int(size[1])),
                float(exif_fraction), quality)
    if workers == 1:
        results = [_render_one(p, i) for i in range(n)]
    else:
        with ProcessPoolExecutor(max_workers=min(workers, n)) as pool:
            results = list(pool.map(_render_one, [p] * n, range(n), chunksize=4))
    ann = {"images": {name: entry for name, entry, _ in results}}
    # The annotation file is written last so that its presence means every image is there.
    _atomic_write(ann_path, json.dumps(ann, separators=(",", ":")).encode())
    return SynthSummary(root=root, split=split, images=n,
                        words=sum(len(e["words"]) for _, e, _ in results),
                        exif_rotated=sum(tagged for _, _, tagged in results),
                        annotation_file=ann_path)
