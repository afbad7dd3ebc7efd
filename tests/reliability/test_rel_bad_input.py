"""Bad input through the dataset and prebuild: every broken image or annotation gets a clear
error naming the file and the problem, is recorded, and stops neither the epoch nor the build;
nothing outside the dataset root is ever opened or stat'ed."""

from __future__ import annotations

import io
import json
import os
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from relhelp import Child, run_cli, sample_digest

SENTINEL = "sentinel_outside_root.jpg"
# name -> what its error must say
BAD_IMAGES = {
    "trunc.jpg": "truncated",
    "zero.jpg": "empty file",
    "text.jpg": "not a recognised image",
    "corrupt.png": "",  # (Pillow's words vary: any clear reason)
    "bomb.png": "pixels",
}
GOOD_WORD = {"points": [[2, 2], [40, 2], [40, 14], [2, 14]]}
# word id -> reason it is skipped with
BAD_WORDS = {
    "nan": ("points", [[float("nan"), 1], [50, 1], [50, 20], [1, 20]], "finite"),
    "inf": ("points", [[float("inf"), 1], [50, 1], [50, 20], [1, 20]], "finite"),
    "negative": ("points", [[-5, 1], [50, 1], [50, 20], [1, 20]], "negative"),
    "three_points": ("points", [[1, 1], [50, 1], [50, 20]], "at least 4 points"),
    "string": ("points", "1,1,50,1,50,20,1,20", "must be a list"),
    "string_coords": ("points", [["a", "b"], [1, 2], [3, 4], [5, 6]], "non-numeric"),
    "bool_coords": ("points", [[True, 1], [50, 1], [50, 20], [1, 20]], "non-numeric"),
    "nested": ("points", [[[1, 2]], [1, 2], [3, 4], [5, 6]], "not an [x, y] pair"),
    "huge": ("points", [[1e300, 1], [50, 1], [50, 20], [1, 20]], "exceed"),
    "bad_ignore": ("ignore", "yes", '"ignore" must be true or false'),
}
# kept (valid numbers) but unusable as text: the maps mask them like ignored words
DEGENERATE_WORDS = {
    "self_intersecting": [[1, 1], [50, 20], [50, 1], [1, 20]],
    "zero_area": [[1, 1], [10, 1], [20, 1], [30, 1]],
    "outside": [[1000, 1000], [5000, 1000], [5000, 2000], [1000, 2000]],
}
BAD_NAMES = {  # image entry name -> reason
    f"../{SENTINEL}": "..",
    "ABSOLUTE": "must be relative",
    "missing.jpg": "not found",
    "dir.jpg": "not found",
    "back\\slash.jpg": "backslash",
    "escape.jpg": "symlink points outside",
}


def _png(array: np.ndarray, mode: str | None = None, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, "PNG", **kw)
    return buf.getvalue()


def _bomb() -> bytes:
    """A 10 kB PNG that declares 100000 × 100000 pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 10_000_000, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) \
        + chunk(b"IEND", b"")


# The stored pixels of each EXIF orientation: the inverse of what exif_transpose applies.
_T = Image.Transpose
STORE = {1: None, 2: _T.FLIP_LEFT_RIGHT, 3: _T.ROTATE_180, 4: _T.FLIP_TOP_BOTTOM,
         5: _T.TRANSPOSE, 6: _T.ROTATE_90, 7: _T.TRANSVERSE, 8: _T.ROTATE_270}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    base = tmp_path_factory.mktemp("zoo")
    root = base / "images"
    root.mkdir()
    rng = np.random.default_rng(7)
    display = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    jpeg = io.BytesIO()
    Image.fromarray(display).save(jpeg, "JPEG")
    files = {
        "good_0.png": _png(display),
        "good_1.jpg": jpeg.getvalue(),
        "trunc.jpg": jpeg.getvalue()[: len(jpeg.getvalue()) // 2],
        "zero.jpg": b"",
        "text.jpg": b"this is not an image\n" * 20,
        "corrupt.png": b"\x89PNG\r\n\x1a\n" + rng.bytes(600),
        "bomb.png": _bomb(),
        "gray.png": _png(display[..., 0]),
        "rgba.png": _png(np.dstack([display, np.where(display[..., :1] > 127, 255, 0)
                                    .astype(np.uint8)])),
        "g16.png": _png(display[..., 0].astype(np.uint16) * 257),
    }
    for orientation, op in STORE.items():
        stored = display if op is None else np.asarray(Image.fromarray(display).transpose(op))
        exif = Image.Exif()
        exif[0x0112] = orientation
        files[f"exif{orientation}.png"] = _png(np.ascontiguousarray(stored),
                                              exif=exif.tobytes())
    for name, data in files.items():
        (root / name).write_bytes(data)
    pal = Image.fromarray(display).convert("P")
    pal.save(root / "palette.png")
    pal.save(root / "palette_transparent.png", transparency=0)
    Image.fromarray(display).convert("CMYK").save(root / "cmyk.jpg")
    (root / "dir.jpg").mkdir()
    long_dir = root / "/".join(["d" * 200] * 3)
    long_dir.mkdir(parents=True)
    long_name = str((long_dir / ("x" * 150 + ".png")).relative_to(root))
    (root / long_name).write_bytes(files["good_0.png"])
    sentinel = base / SENTINEL
    sentinel.write_bytes(jpeg.getvalue())
    (root / "escape.jpg").symlink_to(sentinel)

    words = {"good": GOOD_WORD}
    words.update({k: {"points": pts} for k, pts in DEGENERATE_WORDS.items()})
    for wid, (field, value, _) in BAD_WORDS.items():
        words[wid] = dict(GOOD_WORD, **{field: value})
    words["not_an_object"] = 5
    images: dict[str, object] = {n: {"words": {"0001": GOOD_WORD}} for n in files}
    images.update({n: {"words": {"0001": GOOD_WORD}}
                   for n in ("palette.png", "palette_transparent.png", "cmyk.jpg", long_name)})
    images["good_0.png"] = {"words": words}
    for name in BAD_NAMES:
        images[str(sentinel) if name == "ABSOLUTE" else name] = {"words": {}}
    images["exif1.png"] = 5  # an image entry that is not an object
    images["exif2.png"] = {"words": [GOOD_WORD]}  # words that are not an object
    ann = base / "ann.json"
    ann.write_text(json.dumps({"images": images}))  # NaN / Infinity as JS literals
    return {"root": root, "ann": ann, "sentinel": sentinel, "display": display,
            "long_name": long_name}


class OutsideSpy:
    """Records every open (audit hook), stat and lstat; ``hits()`` says which of them reached
    the sentinel outside the root (an lstat of a symlink inside the root that points at it
    reads the link, not the sentinel, and does not count)."""

    seen: list[tuple[str, str]] = []
    active = False
    target = ""

    @classmethod
    def _audit(cls, event: str, args: tuple) -> None:
        if cls.active and event == "open" and args and isinstance(args[0], (str, bytes, Path)):
            cls.seen.append(("open", os.fsdecode(args[0])))

    @classmethod
    def hits(cls) -> list[str]:
        active, cls.active = cls.active, False
        try:
            out = []
            for what, path in cls.seen:
                resolved = (os.path.abspath(path) if what == "lstat"
                            else os.path.realpath(path))
                if resolved == cls.target:
                    out.append(f"{what} {path}")
            return out
        finally:
            cls.active = active


sys.addaudithook(OutsideSpy._audit)


@pytest.fixture
def spy(zoo, monkeypatch):
    OutsideSpy.target = os.path.realpath(zoo["sentinel"])
    OutsideSpy.seen = []
    for name in ("stat", "lstat"):
        real = getattr(os, name)

        def fake(path, *a, _real=real, _name=name, **kw):
            if OutsideSpy.active and isinstance(path, (str, bytes, os.PathLike)):
                follows = _name == "stat" and kw.get("follow_symlinks", True)
                OutsideSpy.seen.append(("stat" if follows else "lstat", os.fsdecode(path)))
            return _real(path, *a, **kw)
        monkeypatch.setattr(os, name, fake)
    OutsideSpy.active = True
    yield OutsideSpy
    OutsideSpy.active = False


def test_annotation_problems_name_the_file_image_word_and_reason(zoo, spy):
    from diskcache_ocr.ocr.annotations import load_annotations

    ann = load_annotations(zoo["root"], zoo["ann"])
    problems = {(p.image, p.word): p for p in ann.problems}
    for wid, (_, _, reason) in BAD_WORDS.items():
        p = problems[("good_0.png", wid)]
        assert reason in p.reason and str(zoo["ann"]) in str(p) and "good_0.png" in str(p)
    assert "must be an object" in problems[("good_0.png", "not_an_object")].reason
    for name, reason in BAD_NAMES.items():
        key = str(zoo["sentinel"]) if name == "ABSOLUTE" else name
        assert reason in problems[(key, None)].reason, (name, problems.get((key, None)))
    assert "must be an object" in problems[("exif1.png", None)].reason
    assert "must be an object" in problems[("exif2.png", None)].reason
    good = {it.file: it for it in ann.items}["good_0.png"]
    assert set(good.word_ids) == {"good", *DEGENERATE_WORDS}
    # + 2 degenerate words (zero-area, self-intersecting) recorded and kept as don't-care
    assert len(ann.problems) == len(BAD_WORDS) + 1 + len(BAD_NAMES) + 2 + 2
    assert spy.seen and spy.hits() == []


@pytest.mark.parametrize("content, reason", [
    ("{", "invalid JSON"),
    ("", "invalid JSON"),
    ("[]", "top level"),
    ('{"images": []}', "top level"),
    ('{"images": {"a.jpg": {"words": {"1": {"points": [[0, 0]]}}}}}', None),
    ("[" * 100_000 + "]" * 100_000, "invalid JSON"),
    ('{"images": {}, "x": 1' + "0" * 5000 + "}", "invalid JSON"),
    (b"\xff\xfe\x00\x01", "UTF-8"),
])
def test_malformed_annotation_files_are_clear_errors(tmp_path, content, reason):
    from diskcache_ocr.errors import AnnotationError
    from diskcache_ocr.ocr.annotations import load_annotations

    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.jpg").write_bytes(b"x")
    path = tmp_path / "bad.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    if reason is None:  # parses: the word is a recorded problem
        ann = load_annotations(tmp_path / "img", path)
        assert [p.word for p in ann.problems] == ["1"]
        return
    with pytest.raises(AnnotationError, match=reason) as info:
        load_annotations(tmp_path / "img", path)
    assert str(path) in str(info.value)


def test_epoch_over_bad_images_serves_the_rest_and_records_each_failure(zoo, spy, tmp_path):
    from diskcache_ocr.dataset import CachedOCRDataset
    from diskcache_ocr.store import CacheStore

    fresh = CachedOCRDataset(zoo["root"], zoo["ann"], None, preset={"load_maps": True})
    refs = {fresh.source(i): fresh[i] for i in range(len(fresh))}
    ds = CachedOCRDataset(zoo["root"], zoo["ann"], tmp_path / "cache",
                          preset="validation_optimized", preload=False)
    for _epoch in range(2):  # the second from the cache (failures from the index)
        for i in range(len(ds)):
            sample, name = ds[i], ds.source(i)
            error = sample["meta"]["error"]
            if name in BAD_IMAGES:
                assert error and BAD_IMAGES[name] in error, (name, error)
                assert sample["meta"]["file"] == name and sample["polygons"] == []
                assert float(sample["prob_mask"].sum()) == 0.0  # nothing to learn from it
            else:
                assert error is None, (name, error)
                assert sample_digest(sample) == sample_digest(refs[name]), name
    with CacheStore(tmp_path / "cache") as store:  # (keyed by each source's path)
        index = {os.path.relpath(s, os.path.realpath(zoo["root"])): e
                 for s, e in store.iter_index()}
    for name, reason in BAD_IMAGES.items():
        assert index[name].status.startswith("failed: ") and reason in index[name].status
    assert zoo["long_name"] not in index  # too long a key to index: served, not indexed
    ds.close()
    assert spy.seen and spy.hits() == []


def test_decoding_conventions_of_odd_images(zoo):
    from diskcache_ocr.ocr.decode import decode_image

    root, display = zoo["root"], zoo["display"]

    def dec(name: str) -> np.ndarray:
        out = decode_image((root / name).read_bytes(), name)
        assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
        return out

    for orientation in STORE:  # every EXIF orientation gives the displayed page
        assert np.array_equal(dec(f"exif{orientation}.png"), display), orientation
    assert np.array_equal(dec("gray.png"), np.repeat(display[..., :1], 3, axis=2))
    rgba = dec("rgba.png")
    transparent = display[..., 0] <= 127
    assert (rgba[transparent] == 255).all()  # composited over white
    assert np.array_equal(rgba[~transparent], display[~transparent])
    assert np.array_equal(dec("g16.png"), np.repeat(display[..., :1], 3, axis=2))  # high byte
    assert dec("palette.png").shape == display.shape
    assert dec("palette_transparent.png").shape == display.shape
    assert dec("cmyk.jpg").shape == display.shape


def test_degenerate_words_are_masked_not_fatal(zoo):
    """Self-intersecting, zero-area and outside-the-image words are valid numbers: they are
    kept and masked in the maps exactly like ignored words; the first two are recorded."""
    from diskcache_ocr.dataset import CachedOCRDataset
    from diskcache_ocr.ocr.maps import make_maps

    ds = CachedOCRDataset(zoo["root"], zoo["ann"], None, preset={"load_maps": True})
    i = [ds.source(k) for k in range(len(ds))].index("good_0.png")
    sample = ds[i]
    assert sample["meta"]["error"] is None and len(sample["polygons"]) == 4
    recorded = {p.word: p.reason for p in ds.annotations.problems if p.image == "good_0.png"}
    assert "zero-area" in recorded["zero_area"]
    assert "self-intersecting" in recorded["self_intersecting"]
    assert "outside" not in recorded  # needs the image's size: masked by the maps instead
    polys = sample["polygons"]
    as_is = make_maps(polys, sample["ignore"], 640, 640, ds.pipeline.maps)
    degenerate = [w in DEGENERATE_WORDS for w in ds.annotations.items[i].word_ids]
    ignored = make_maps(polys, np.array(degenerate) | sample["ignore"], 640, 640,
                        ds.pipeline.maps)
    for name, arr in as_is.items():
        assert np.array_equal(arr, ignored[name]), name
        assert np.array_equal(sample[name].numpy(), arr), name


def test_prebuild_records_failures_and_keeps_going(zoo, tmp_path):
    cache = tmp_path / "cache"
    argv = ["prebuild", "--images", str(zoo["root"]), "--annotations", str(zoo["ann"]),
            "--cache", str(cache), "--workers", "2", "--json"]
    for run in range(2):
        child = Child(run_cli, argv, log=tmp_path / f"prebuild-{run}.log")
        assert child.join(180) == 0, child.log_text()
        text = child.log_text()
        summary = json.loads(text[text.index("{"):text.rindex("}") + 1])
        failed = {f["source"]: f["reason"] for f in summary["failed"]}
        assert set(failed) == set(BAD_IMAGES), failed
        for name, reason in BAD_IMAGES.items():
            assert reason in failed[name]
        good = summary["total"] - len(BAD_IMAGES)
        assert summary["built"] == (good if run == 0 else 1)  # 1: the unindexable long name


def test_prebuild_in_process_never_touches_outside_the_root(zoo, spy, tmp_path):
    from diskcache_ocr.prebuild import prebuild

    summary = prebuild(zoo["root"], zoo["ann"], tmp_path / "cache", workers=1, progress=False)
    assert {s for s, _ in summary.failed} == set(BAD_IMAGES)
    assert spy.seen and spy.hits() == []


def test_the_spy_sees_a_read_outside(zoo, spy):
    """(The spy itself works: the tests above would notice an escape.)"""
    (zoo["root"] / "escape.jpg").read_bytes()
    assert spy.hits() == [f"open {zoo['root'] / 'escape.jpg'}"]
