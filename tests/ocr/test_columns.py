"""The columnar reading of an annotation JSON file (diskcache_ocr.ocr.columns): the fast
reading (msgspec, one vectorized check of all words) equals the general one (the standard
library, word by word, with the rules and messages of diskcache_ocr.ocr.annotations)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from diskcache_ocr.ocr import columns
from diskcache_ocr.ocr.annotations import load_annotations

SQUARE = [[0, 0], [10, 0], [10, 10], [0, 10]]


def same_columns(a: columns.Columns, b: columns.Columns) -> None:
    for name in columns.Columns.ARRAYS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert x.tobytes() == y.tobytes(), name
    assert a.word_problems == b.word_problems
    assert a.plain == b.plain


@pytest.fixture
def general_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How often the fast reading gave the whole file to the general one."""
    calls: list[int] = []
    real = columns._parse_general

    def spy(*args: Any) -> Any:
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(columns, "_parse_general", spy)
    return calls


coordinate = st.one_of(
    st.integers(0, 2000), st.floats(0, 2000, allow_nan=False),
    st.sampled_from([-1, -0.5, 2.0**31, 2.0**31 + 1, 10**30, 1e-300]))
point = st.lists(coordinate, min_size=2, max_size=2)
# a rectangle, a bow tie, one point repeated (zero area), collinear points, or any list
shape = st.one_of(
    st.builds(lambda x, y, w, h: [[x, y], [x + w, y], [x + w, y + h], [x, y + h]],
              st.integers(0, 900), st.integers(0, 900), st.integers(0, 90),
              st.integers(0, 90)),
    st.just([[0, 0], [10, 10], [10, 0], [0, 10]]),
    st.just([[5, 5]] * 4),
    st.just([[0, 0], [1, 1], [2, 2], [3, 3]]),
    st.lists(point, max_size=7),
)
word = st.fixed_dictionaries(
    {"points": shape},
    optional={"ignore": st.booleans(), "transcription": st.sampled_from(["###", "ok", None])})
odd_word = st.one_of(  # what only the general reading takes: the image goes there alone
    st.just({"points": [[0, 0], ["1", 0], [1, 1], [0, 1]]}),
    st.just({"points": SQUARE, "ignore": "yes"}),
    st.just({"points": SQUARE, "extra": 1}),
    st.just([SQUARE]),
)
entry = st.one_of(
    st.fixed_dictionaries({}, optional={"words": st.dictionaries(
        st.text("0123456789", min_size=1, max_size=4), word, max_size=6)}),
    st.fixed_dictionaries({"words": st.dictionaries(
        st.text("0123456789", min_size=1, max_size=4), st.one_of(word, odd_word),
        max_size=4)}),
    st.just([]), st.just({"words": None}),
)
names = st.sampled_from(["a.jpg", "b.png", "c.jpg", "./a.jpg", "sub/d.jpg", "../x.jpg", ""])


@given(images=st.dictionaries(names, entry, max_size=6),
       rules=st.sampled_from(["db", "origin"]))
def test_the_fast_reading_equals_the_general_reading(images: dict[str, Any], rules: str
                                                     ) -> None:
    data = json.dumps({"images": images}).encode()
    fast = columns.parse_json(data, "v.json", rules)
    same_columns(fast, columns._parse_general(data, "v.json", rules))


def test_a_plain_file_takes_the_fast_reading(general_calls: list[int]) -> None:
    images = {f"{i}.jpg": {"words": {"1": {"points": SQUARE}, "2": {"points": SQUARE,
                                                                   "transcription": "###"}}}
              for i in range(3)}
    cols = columns.parse_json(json.dumps({"images": images}, indent=2).encode(), "v", "db")
    assert general_calls == []
    assert len(cols) == 3 and cols.ignore.tolist() == [False, True] * 3
    assert cols.points.tobytes() == np.array([SQUARE] * 6, np.float64).tobytes()
    assert cols.word_ids_of(1) == ["1", "2"] and cols.plain


@pytest.mark.parametrize("text", [
    '{"images": {"a.jpg": {}, "a.jpg": {"words": {"1": {"points": S}}}}}',
    '{"images": {"a.jpg": {"words": {"1": {"points": S}, "1": {"points": T}}}}}',
    '{"images": {"a.jpg": {"words": {"1": {"points": S, "points": T}}}}}',
    '{"images": {"a.jpg": {"words": {"1": {"points": S}}, "words" : {}}}}',
])
def test_a_repeated_key_is_read_as_json_reads_it_and_said(text: str, general_calls: list[int],
                                                         caplog: pytest.LogCaptureFixture,
                                                         tmp_path: Path) -> None:
    other = [[1, 1], [9, 1], [9, 9], [1, 9]]
    text = text.replace("S", json.dumps(SQUARE)).replace("T", json.dumps(other))
    cols = columns.parse_json(text.encode(), "v.json", "db")
    assert general_calls == [1]
    assert any("more than once" in n for n in cols.notes)
    (tmp_path / "a.jpg").write_bytes(b"")
    (tmp_path / "v.json").write_text(text)
    with caplog.at_level(logging.WARNING, logger="diskcache_ocr.annotations"):
        items = load_annotations(tmp_path, tmp_path / "v.json").items
    assert "more than once" in caplog.text
    expected = json.loads(text)["images"]["a.jpg"].get("words", {})
    assert [p.tolist() for p in items[0].polygons] == [
        np.array(w["points"], float).tolist() for w in expected.values()]


def test_a_string_holding_a_key_mark_only_costs_the_fast_reading(general_calls: list[int]
                                                                 ) -> None:
    doc = {"images": {"a.jpg": {"words": {"1": {"points": SQUARE, "transcription": 'x":y'}}}}}
    data = json.dumps(doc).encode()
    same_columns(columns.parse_json(data, "v", "db"), columns._parse_general(data, "v", "db"))
    assert general_calls == [1, 1]


def test_degenerate_words_are_kept_as_dont_care_with_the_same_messages() -> None:
    bow_tie = [[0, 0], [10, 10], [10, 0], [0, 10]]
    flat = [[0, 0], [5, 0], [10, 0], [5, 0]]
    huge = [[2.0**31, 0], [2.0**31, 1e-3], [2.0**31 - 1e-3, 1e-3], [2.0**31 - 1e-3, 0]]
    words = {"1": {"points": bow_tie}, "2": {"points": flat}, "3": {"points": SQUARE},
             "4": {"points": huge}}
    data = json.dumps({"images": {"a.jpg": {"words": words}}}).encode()
    cols = columns.parse_json(data, "v", "db")
    same_columns(cols, columns._parse_general(data, "v", "db"))
    assert cols.word_problems[:2] == [
        (0, "1", "self-intersecting polygon; kept as a don't-care word"),
        (0, "2", "self-intersecting polygon; kept as a don't-care word")
        if not _simple(flat) else (0, "2", "zero-area polygon; kept as a don't-care word")]
    assert cols.ignore.tolist()[:3] == [True, True, False]


def _simple(points: list[list[float]]) -> bool:
    from diskcache_ocr.ocr.maps import polygon_is_simple

    return polygon_is_simple(np.array(points, float))


def test_words_are_read_exactly_as_floats() -> None:
    rng = np.random.default_rng(0)
    pts = rng.uniform(0, 5000, (50, 4, 2))
    pts[:, 1:3, 0] += 6000  # keep every quadrilateral convex: x0 < x1, x3 < x2
    pts[:, 2:, 1] += 6000
    pts[:, 1, 0], pts[:, 3, 0] = pts[:, 1, 0], pts[:, 0, 0]
    words = {f"{i:04d}": {"points": p.tolist()} for i, p in enumerate(pts)}
    data = json.dumps({"images": {"a.jpg": {"words": words}}}).encode()
    cols = columns.parse_json(data, "v", "db")
    read = json.loads(data)["images"]["a.jpg"]["words"]
    want = np.array([w["points"] for w in read.values()], np.float64).reshape(-1, 2)
    assert cols.points.tobytes() == want.tobytes()
    assert cols.word_ids_of(0) == list(read)
