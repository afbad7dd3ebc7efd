"""Tests for diskcache_ocr.ocr.annotations."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypkit import fuzz
from hypothesis import HealthCheck, given
from hypothesis import strategies as st

from diskcache_ocr.errors import AnnotationError, SourceError
from diskcache_ocr.ocr.annotations import (
    AnnotationSet,
    ImageAnnotation,
    Problem,
    load_annotations,
    safe_source_path,
)

SQUARE = [[0, 0], [10, 0], [10, 10], [0, 10]]


def make_images(root: Path, *names: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"not decoded by the loader")
    return root


def write_json(path: Path, images: Any) -> Path:
    path.write_text(json.dumps({"images": images}), encoding="utf-8")
    return path


def by_file(ann: AnnotationSet) -> dict[str, ImageAnnotation]:
    return {item.file: item for item in ann.items}


def only_problem(ann: AnnotationSet) -> Problem:
    assert len(ann.problems) == 1, ann.problems
    return ann.problems[0]


# -- JSON ---------------------------------------------------------------------------------


def test_json_happy_path(tmp_path: Path) -> None:
    images = make_images(tmp_path / "img", "b.jpg", "a.png", "sub/c.jpg", "unlisted.jpg")
    ann_file = write_json(
        tmp_path / "val.json",
        {
            "b.jpg": {
                "words": {
                    "0001": {"points": SQUARE, "transcription": "TOTAL"},
                    "0002": {"points": [[1.5, 2], [3, 2], [3, 4], [2, 5], [1.5, 4]]},
                    "0003": {"points": SQUARE, "transcription": "###"},
                    "0004": {"points": SQUARE, "ignore": True},
                    "0005": {"points": SQUARE, "ignore": False, "transcription": "ok"},
                }
            },
            "a.png": {},
            "sub/c.jpg": {"words": {}},
        },
    )
    ann = load_annotations(images, ann_file)
    assert ann.problems == ()
    assert ann.images_dir == images.resolve()
    # the file's order, unlisted images out
    assert [i.file for i in ann.items] == ["b.jpg", "a.png", "sub/c.jpg"]
    b = by_file(ann)["b.jpg"]
    assert b.word_ids == ("0001", "0002", "0003", "0004", "0005")
    assert b.ignore == (False, False, True, True, False)
    assert all(p.dtype == np.float64 and p.shape[1] == 2 for p in b.polygons)
    np.testing.assert_array_equal(b.polygons[0], np.array(SQUARE, dtype=np.float64))
    assert b.polygons[1].shape == (5, 2)
    for other in ("a.png", "sub/c.jpg"):
        assert by_file(ann)[other].polygons == () and by_file(ann)[other].word_ids == ()


def test_polygons_are_read_only_and_loads_are_equal(tmp_path: Path) -> None:
    images = make_images(tmp_path / "img", "a.jpg")
    ann_file = write_json(tmp_path / "a.json", {"a.jpg": {"words": {"1": {"points": SQUARE}}}})
    first, second = load_annotations(images, ann_file), load_annotations(images, ann_file)
    assert first == second and hash(first) == hash(second)
    poly = first.items[0].polygons[0]
    assert not poly.flags.writeable
    with pytest.raises(ValueError):
        poly[0, 0] = 99.0


def test_no_annotation_file_lists_images(tmp_path: Path) -> None:
    images = make_images(tmp_path / "test", "b.JPG", "a.png", "x.webp", "notes.txt", "d/e.jpg")
    ann = load_annotations(images)
    assert [i.file for i in ann.items] == ["a.png", "b.JPG", "x.webp"]
    assert all(i.polygons == () and i.ignore == () for i in ann.items)
    assert ann.problems == ()


@pytest.mark.parametrize(
    ("word", "reason"),
    [
        ({"points": SQUARE[:3]}, "needs at least 4 points, got 3"),
        ({"points": [[0, 0], [1, float("nan")], [1, 1], [0, 1]]}, "finite"),
        ({"points": [[0, 0], [1, -0.5], [1, 1], [0, 1]]}, "negative"),
        ({"points": [[0, 0], [1, "2"], [1, 1], [0, 1]]}, "non-numeric"),
        ({"points": [[0, 0], [1, True], [1, 1], [0, 1]]}, "non-numeric"),
        ({"points": [0, 0, 1, 0, 1, 1, 0, 1]}, "not an [x, y] pair"),
        ({"points": [[0, 0, 0], [1, 0], [1, 1], [0, 1]]}, "not an [x, y] pair"),
        ({"points": "0,0,1,0,1,1,0,1"}, "must be a list"),
        ({"points": {"x": 1}}, "must be a list"),
        ({"points": [[0, 0], [10**400, 0], [1, 1], [0, 1]]}, "too large"),
        ({}, "must be a list"),
        ({"points": SQUARE, "ignore": "yes"}, '"ignore" must be true or false'),
        ([SQUARE], "word must be an object"),
    ],
)
def test_bad_word_is_skipped_with_problem(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, word: Any, reason: str
) -> None:
    images = make_images(tmp_path / "img", "receipt_3.jpg", "other.jpg")
    words = {"0006": {"points": SQUARE}, "0007": word, "0008": {"points": SQUARE}}
    other = {"words": {"1": {"points": SQUARE}}}
    # json.dumps writes float("nan") as the NaN literal, the way a careless exporter would.
    ann_file = write_json(
        tmp_path / "val.json", {"receipt_3.jpg": {"words": words}, "other.jpg": other}
    )
    with caplog.at_level(logging.WARNING, logger="diskcache_ocr.annotations"):
        ann = load_annotations(images, ann_file)
    problem = only_problem(ann)
    assert (problem.source, problem.image, problem.word) == (str(ann_file), "receipt_3.jpg", "0007")
    assert reason in problem.reason
    assert str(problem).startswith(f"{ann_file}: receipt_3.jpg word 0007: ")
    assert by_file(ann)["receipt_3.jpg"].word_ids == ("0006", "0008")
    assert by_file(ann)["other.jpg"].word_ids == ("1",)
    assert any("receipt_3.jpg word 0007" in r.getMessage() for r in caplog.records)
    assert all(r.levelno == logging.WARNING for r in caplog.records)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_json_literals_are_per_word(tmp_path: Path, literal: str) -> None:
    images = make_images(tmp_path / "img", "a.jpg")
    ann_file = tmp_path / "a.json"
    ann_file.write_text(
        '{"images": {"a.jpg": {"words": {'
        '"1": {"points": [[0, 0], [1, 0], [1, 1], [0, 1]]}, '
        f'"2": {{"points": [[0, 0], [{literal}, 0], [1, 1], [0, 1]]}}}}}}}}}}',
        encoding="utf-8",
    )
    ann = load_annotations(images, ann_file)
    problem = only_problem(ann)
    assert problem.word == "2" and "finite" in problem.reason
    assert ann.items[0].word_ids == ("1",)


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        (["not", "a", "dict"], "image entry must be an object"),
        ({"words": [{"points": SQUARE}]}, '"words" must be an object'),
        ({"words": None}, '"words" must be an object'),
    ],
)
def test_bad_image_entry_is_skipped(tmp_path: Path, entry: Any, reason: str) -> None:
    images = make_images(tmp_path / "img", "bad.jpg", "good.jpg")
    ann_file = write_json(tmp_path / "a.json", {"bad.jpg": entry, "good.jpg": {}})
    ann = load_annotations(images, ann_file)
    problem = only_problem(ann)
    assert (problem.image, problem.word, problem.reason) == ("bad.jpg", None, reason)
    assert [i.file for i in ann.items] == ["good.jpg"]


def test_missing_image_is_a_problem(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    images = make_images(tmp_path / "img", "here.jpg")
    (images / "folder.jpg").mkdir()
    ann_file = write_json(tmp_path / "a.json", {"gone.jpg": {}, "here.jpg": {}, "folder.jpg": {}})
    with caplog.at_level(logging.WARNING):
        ann = load_annotations(images, ann_file)
    assert [i.file for i in ann.items] == ["here.jpg"]
    assert {(p.image, p.reason) for p in ann.problems} == {
        ("gone.jpg", "image file not found"),
        ("folder.jpg", "image file not found"),
    }
    assert "gone.jpg: image file not found" in caplog.text


def test_duplicate_after_normalisation(tmp_path: Path) -> None:
    images = make_images(tmp_path / "img", "a.jpg")
    ann = load_annotations(images, write_json(tmp_path / "a.json", {"a.jpg": {}, "./a.jpg": {}}))
    assert [i.file for i in ann.items] == ["a.jpg"]
    assert only_problem(ann).reason == "duplicate image entry"


# -- path safety --------------------------------------------------------------------------


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(b"outside the root")
    return secret


@pytest.mark.parametrize(
    "name",
    [
        "../secret.jpg",
        "sub/../../secret.jpg",
        "ABSOLUTE",
        "..\\secret.jpg",
        "a\0.jpg",
        "C:/x.jpg",
        ".",
        "",
    ],
)
def test_escaping_names_are_problems(tmp_path: Path, outside: Path, name: str) -> None:
    images = make_images(tmp_path / "img", "ok.jpg", "sub/x.jpg")
    name = str(outside) if name == "ABSOLUTE" else name
    ann = load_annotations(images, write_json(tmp_path / "a.json", {name: {}, "ok.jpg": {}}))
    assert [i.file for i in ann.items] == ["ok.jpg"]
    assert only_problem(ann).image is not None
    with pytest.raises(SourceError):
        safe_source_path(images, name)


def test_symlink_escape_is_refused_without_touching_outside(
    tmp_path: Path, outside: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = make_images(tmp_path / "img", "ok.jpg", "real/in.jpg")
    (images / "abs.jpg").symlink_to(outside)
    (images / "rel.jpg").symlink_to("../secret.jpg")
    (images / "dirlink").symlink_to(tmp_path)
    (images / "inside.jpg").symlink_to("real/in.jpg")  # stays inside: fine
    (images / "loop.jpg").symlink_to("loop.jpg")
    touched: list[str] = []
    for fn in ("stat", "lstat", "open"):
        real = getattr(os, fn)

        def spy(path: Any, *args: Any, _real: Any = real, **kw: Any) -> Any:
            touched.append(os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else "")
            return _real(path, *args, **kw)

        monkeypatch.setattr(os, fn, spy)
    names = ["abs.jpg", "rel.jpg", "dirlink/secret.jpg", "inside.jpg", "loop.jpg", "ok.jpg"]
    ann = load_annotations(images, write_json(tmp_path / "a.json", dict.fromkeys(names, {})))
    monkeypatch.undo()
    assert [i.file for i in ann.items] == ["inside.jpg", "ok.jpg"]
    assert {p.image for p in ann.problems} == set(names) - {"inside.jpg", "ok.jpg"}
    root = str(images.resolve())
    # Ancestors of the root are stat'ed while resolving the (trusted) root itself.
    stray = [
        t
        for t in touched
        if not (t.startswith(root) or root.startswith(t) or t.endswith("a.json"))
    ]
    assert stray == []
    assert safe_source_path(images, "inside.jpg") == images.resolve() / "real" / "in.jpg"


def test_symlinked_root_is_fine(tmp_path: Path) -> None:
    images = make_images(tmp_path / "img", "a.jpg")
    (tmp_path / "link").symlink_to(images)
    ann = load_annotations(tmp_path / "link", write_json(tmp_path / "a.json", {"a.jpg": {}}))
    assert [i.file for i in ann.items] == ["a.jpg"] and ann.problems == ()


def test_listing_skips_escaping_symlinks(tmp_path: Path, outside: Path) -> None:
    images = make_images(tmp_path / "img", "a.jpg")
    (images / "evil.jpg").symlink_to(outside)
    ann = load_annotations(images)
    assert [i.file for i in ann.items] == ["a.jpg"]
    assert only_problem(ann).source == "evil.jpg"


# -- whole-file failures ------------------------------------------------------------------


def test_malformed_json_names_file_and_position(tmp_path: Path) -> None:
    images = make_images(tmp_path / "img", "a.jpg")
    ann_file = tmp_path / "broken.json"
    ann_file.write_text('{"images": {\n  "a.jpg": {,}\n}}', encoding="utf-8")
    with pytest.raises(AnnotationError) as info:
        load_annotations(images, ann_file)
    assert info.value.source == str(ann_file)
    assert str(ann_file) in str(info.value)
    assert "line 2 column 13" in str(info.value)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"[1, 2]", '"images" object'),
        (b'{"images": []}', '"images" object'),
        (b'{"other": {}}', '"images" object'),
        (b"\xff\xfe{}", "UTF-8"),
        (b"", "invalid JSON"),
        (b"[" * 100_000, "invalid JSON"),
    ],
)
def test_unusable_json_file_raises(tmp_path: Path, content: bytes, reason: str) -> None:
    images = make_images(tmp_path / "img")
    ann_file = tmp_path / "x.json"
    ann_file.write_bytes(content)
    with pytest.raises(AnnotationError, match=reason) as info:
        load_annotations(images, ann_file)
    assert str(ann_file) in str(info.value)


def test_json_with_bom_is_accepted(tmp_path: Path) -> None:
    images = make_images(tmp_path / "img", "a.jpg")
    ann_file = tmp_path / "a.json"
    ann_file.write_bytes(b"\xef\xbb\xbf" + json.dumps({"images": {"a.jpg": {}}}).encode())
    assert [i.file for i in load_annotations(images, ann_file).items] == ["a.jpg"]


def test_missing_paths(tmp_path: Path) -> None:
    images = make_images(tmp_path / "img")
    with pytest.raises(AnnotationError, match="nope.json"):
        load_annotations(images, tmp_path / "nope.json")
    (tmp_path / "labels.csv").write_text("x")
    with pytest.raises(AnnotationError, match="labels.csv"):
        load_annotations(images, tmp_path / "labels.csv")
    with pytest.raises(SourceError, match="no_such_dir"):
        load_annotations(tmp_path / "no_such_dir")
    with pytest.raises(SourceError):
        load_annotations(tmp_path / "labels.csv")


# -- ICDAR-2015 ---------------------------------------------------------------------------


def test_icdar_directory(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    images = make_images(tmp_path / "img", "img_1.jpg", "img_2.png", "img_3.jpg", "img_4.jpg")
    gt = tmp_path / "gt"
    gt.mkdir()
    (gt / "gt_img_1.txt").write_bytes(
        "\ufeff377,117,463,117,465,130,378,130,Genaxis Theatre\r\n"
        "\n"
        "493,115,519,115,519,131,493,131,###\n"
        "1,2,3,4,5,6,7,8,Hello, world, again\n"
        "1,2,3,4,5,6,7\n"
        "1,2,3,4,5,-6,7,8,neg\n"
        "a,2,3,4,5,6,7,8,text\n".encode("utf-8")
    )
    (gt / "img_2.txt").write_text("0,0,5,0,5,5,0,5,plain\n", encoding="utf-8")
    (gt / "gt_orphan.txt").write_text("0,0,5,0,5,5,0,5,x\n", encoding="utf-8")
    (gt / "gt_img_3.txt").write_bytes(b"0,0,5,0,5,5,0,5,\xff\xfe\n")  # not UTF-8
    with caplog.at_level(logging.WARNING):
        ann = load_annotations(images, gt)
    items = by_file(ann)
    assert sorted(items) == ["img_1.jpg", "img_2.png", "img_4.jpg"]
    one = items["img_1.jpg"]
    assert one.word_ids == ("0001", "0003", "0004")  # physical line numbers; blank line 2 skipped
    # Word 0004's points are collinear: kept, as a don't-care word, and recorded.
    assert one.ignore == (False, True, True)
    assert any(p.word == "0004" and "zero-area" in p.reason for p in ann.problems)
    np.testing.assert_array_equal(one.polygons[0], [[377, 117], [463, 117], [465, 130], [378, 130]])
    np.testing.assert_array_equal(one.polygons[2], [[1, 2], [3, 4], [5, 6], [7, 8]])
    assert items["img_2.png"].word_ids == ("0001",)
    assert items["img_4.jpg"].polygons == ()  # no ground truth: no text, no problem
    problems = {(Path(p.source).name, p.word) for p in ann.problems}
    assert problems == {
        ("gt_img_1.txt", "0004"),  # collinear: recorded, kept as don't-care
        ("gt_img_1.txt", "0005"),
        ("gt_img_1.txt", "0006"),
        ("gt_img_1.txt", "0007"),
        ("gt_orphan.txt", None),
        ("gt_img_3.txt", None),
    }
    assert "gt_orphan.txt: no matching image" in caplog.text
    messages = [str(p) for p in ann.problems]
    assert any("gt_img_1.txt: img_1.jpg word 0006: " in m and "negative" in m for m in messages)


def test_icdar_ambiguous_stem(tmp_path: Path) -> None:
    images = make_images(tmp_path / "img", "a.jpg", "a.png", "b.jpg")
    gt = tmp_path / "gt"
    gt.mkdir()
    (gt / "gt_a.txt").write_text("0,0,5,0,5,5,0,5,x\n", encoding="utf-8")
    (gt / "gt_b.txt").write_text("0,0,5,0,5,5,0,5,x\n", encoding="utf-8")
    (gt / "b.txt").write_text("0,0,5,0,5,5,0,5,y\n", encoding="utf-8")
    ann = load_annotations(images, gt)
    assert [i.file for i in ann.items] == ["b.jpg"]  # a.* skipped: which one is labelled?
    assert {Path(p.source).name for p in ann.problems} == {"gt_a.txt", "b.txt"}


# -- fuzzing ------------------------------------------------------------------------------

json_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=30,
)
names = st.sampled_from(["a.jpg", "b.png", "../a.jpg", "/etc/passwd", "sub", "", "a\\b.jpg"])
word = st.fixed_dictionaries(
    {"points": json_like | st.lists(st.lists(json_like, max_size=3), max_size=6)},
    optional={"ignore": json_like, "transcription": json_like},
)
image_entry = json_like | st.fixed_dictionaries(
    {}, optional={"words": json_like | st.dictionaries(st.text(max_size=4), word | json_like)}
)
document = (
    json_like
    | st.fixed_dictionaries({"images": json_like})
    | st.fixed_dictionaries({"images": st.dictionaries(names | st.text(max_size=6), image_entry)})
)


@fuzz(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=document)
def test_fuzz_json_parser(tmp_path: Path, doc: Any) -> None:
    images = make_images(tmp_path / "img", "a.jpg", "b.png")
    (images / "sub").mkdir(exist_ok=True)
    ann_file = tmp_path / "fuzz.json"
    ann_file.write_text(json.dumps(doc), encoding="utf-8")  # NaN/Infinity become literals
    try:
        result = load_annotations(images, ann_file)
    except AnnotationError:
        return  # any other exception fails the test
    assert isinstance(result, AnnotationSet)
    for item in result.items:
        assert item.file in {"a.jpg", "b.png"}
        for poly in item.polygons:
            assert poly.dtype == np.float64 and poly.shape[0] >= 4 and not poly.flags.writeable
            assert np.isfinite(poly).all() and (poly >= 0).all()


# -- bounded work per polygon -------------------------------------------------------------


def zigzag(n: int) -> list[list[float]]:
    """A simple, non-convex outline of `n` points (a comb), so no fast path applies."""
    top = [[float(i), 10.0 + (i % 2) * 5.0] for i in range(n - 2)]
    return [*top, [float(n - 3), 0.0], [0.0, 0.0]]


def test_word_with_too_many_points_is_a_named_problem(tmp_path: Path) -> None:
    from diskcache_ocr.ocr.annotations import MAX_POLYGON_POINTS

    images = make_images(tmp_path / "img", "a.jpg")
    too_many = zigzag(MAX_POLYGON_POINTS + 1)
    ann = load_annotations(images, write_json(tmp_path / "a.json", {
        "a.jpg": {"words": {"big": {"points": too_many}, "ok": {"points": SQUARE}}}}))
    p = only_problem(ann)
    assert (p.source, p.image, p.word) == (str(tmp_path / "a.json"), "a.jpg", "big")
    limit = MAX_POLYGON_POINTS
    assert p.reason == f"has {limit + 1} points; at most {limit} are allowed"
    assert by_file(ann)["a.jpg"].word_ids == ("ok",)


def test_word_at_the_point_limit_is_kept_and_checked(tmp_path: Path) -> None:
    from diskcache_ocr.ocr.annotations import MAX_POLYGON_POINTS

    images = make_images(tmp_path / "img", "a.jpg")
    ann = load_annotations(images, write_json(tmp_path / "a.json", {
        "a.jpg": {"words": {"comb": {"points": zigzag(MAX_POLYGON_POINTS)}}}}))
    assert ann.problems == ()
    (poly,) = by_file(ann)["a.jpg"].polygons
    assert poly.shape == (MAX_POLYGON_POINTS, 2)


# -- the file's order, repeated names, the origin's reading of words -----------------------

def test_json_order_is_kept(tmp_path):
    images = make_images(tmp_path / "img", "z.jpg", "a.jpg", "m.jpg")
    ann = load_annotations(images, write_json(tmp_path / "v.json", {
        "z.jpg": {}, "a.jpg": {}, "m.jpg": {}}))
    assert [i.file for i in ann.items] == ["z.jpg", "a.jpg", "m.jpg"]


def test_origin_rules_keep_every_non_empty_word(tmp_path):
    images = make_images(tmp_path / "img", "a.jpg")
    ann = load_annotations(images, write_json(tmp_path / "v.json", {"a.jpg": {"words": {
        "1": {"points": [[1.4, 2.6], [5, 2], [5, 6]]},  # a triangle
        "2": {"points": [[-3, 4], [9, 4]]},  # two points, one negative
        "3": {"points": []},  # skipped, as the origin skips it
        "4": {"points": SQUARE, "transcription": "###"},  # no don't-care words there
        "5": {"points": [[1, "x"]]},  # unusable: a Problem
    }}}), rules="origin")
    a = by_file(ann)["a.jpg"]
    assert a.word_ids == ("1", "2", "4") and a.ignore == (False, False, False)
    assert [len(p) for p in a.polygons] == [3, 2, 4]
    assert [p.word for p in ann.problems] == ["5"]
    # the db rules refuse the triangle and the two-point word
    db = by_file(load_annotations(images, tmp_path / "v.json"))["a.jpg"]
    assert db.word_ids == ("4",)
