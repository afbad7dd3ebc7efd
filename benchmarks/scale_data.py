"""Synthetic splits for ``scale.py``: many distinct small images, ~120 words each, cheaply.

Image ``i`` of a split depends only on (seed, i): a 128×128 JPEG with a smooth background
and one dark box per word (so every file has its own content hash), its words axis-aligned
integer quads inside the image. Written in chunks of ``CHUNK`` images, each ending with its
annotation fragment; a rerun skips the chunks already written (resumable), and the
annotation file is assembled last, so its presence means the split is complete.

    python benchmarks/scale_data.py /work/scale-data 100000      # synthesize one split
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

SIZE = 128
CHUNK = 1000
WORDS = (100, 140)  # words per image, inclusive


def split_paths(root: Path, n: int) -> tuple[Path, Path]:
    """(images dir, annotation file) of the ``n``-image split under ``root``."""
    base = Path(root) / f"split-{n}"
    return base / "images", base / "val.json"


def _image(i: int, seed: int) -> tuple[bytes, str]:
    """JPEG bytes of image ``i`` and its annotation entry (JSON text)."""
    import cv2

    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(i,)))
    gx = np.linspace(0, 1, SIZE, dtype=np.float32)
    base = rng.uniform(150, 240, 3).astype(np.float32)
    tilt = rng.uniform(-40, 40, 3).astype(np.float32)
    img = (base + tilt * gx[None, :, None] * gx[:, None, None]).astype(np.uint8)
    n = int(rng.integers(WORDS[0], WORDS[1] + 1))
    w = rng.integers(4, 14, n)
    h = rng.integers(3, 6, n)
    x0 = rng.integers(0, SIZE - w)
    y0 = rng.integers(0, SIZE - h)
    ink = rng.integers(10, 90, n)
    words = []
    for k in range(n):
        a, b, c, d = int(x0[k]), int(y0[k]), int(x0[k] + w[k]), int(y0[k] + h[k])
        img[b:d, a:c] = ink[k]
        words.append(f'"{k + 1:04d}":{{"points":[[{a},{b}],[{c},{b}],[{c},{d}],[{a},{d}]]}}')
    ok, jpg = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 85])
    assert ok
    return jpg.tobytes(), '{"words":{' + ",".join(words) + "}}"


def name(i: int) -> str:
    return f"img_{i:06d}.jpg"


def synthesize(root: Path, n: int, seed: int = 0, log=print) -> tuple[Path, Path]:
    """The ``n``-image split under ``root`` (written once; resumed where it stopped)."""
    images, ann = split_paths(root, n)
    if ann.exists():
        return images, ann
    parts = images.parent / "parts"
    images.mkdir(parents=True, exist_ok=True)
    parts.mkdir(exist_ok=True)
    for start in range(0, n, CHUNK):
        part = parts / f"{start:08d}.txt"
        if part.exists():
            continue
        entries = []
        for i in range(start, min(n, start + CHUNK)):
            data, entry = _image(i, seed)
            (images / name(i)).write_bytes(data)
            entries.append(f'"{name(i)}":{entry}')
        tmp = part.with_suffix(".tmp")
        tmp.write_text(",".join(entries))
        os.replace(tmp, part)
        if (start // CHUNK) % 10 == 0:
            log(f"  {min(n, start + CHUNK)}/{n} images")
    tmp = ann.with_suffix(".tmp")
    with open(tmp, "w") as out:
        out.write('{"images":{')
        for k, start in enumerate(range(0, n, CHUNK)):
            if k:
                out.write(",")
            out.write((parts / f"{start:08d}.txt").read_text())
        out.write("}}")
    os.replace(tmp, ann)
    for part in parts.iterdir():
        part.unlink()
    parts.rmdir()
    return images, ann


if __name__ == "__main__":
    synthesize(Path(sys.argv[1]), int(sys.argv[2]))
