"""Fuzzing the two parsers of untrusted bytes: the record decoder (structured mutations of
valid records) and the annotation parser (generated JSON)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import msgpack
import numpy as np
import pytest
from hypkit import fuzz
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diskcache_ocr.codec import (
    DTYPES,
    PREFIX,
    decode_record,
    encode_record,
    parse_header,
    verify_checksum,
)
from diskcache_ocr.errors import AnnotationError, CacheFormatError

dtypes = st.sampled_from(sorted(DTYPES))
shapes = st.lists(st.integers(0, 5), min_size=0, max_size=4)


@st.composite
def records(draw):
    n = draw(st.integers(1, 4))
    arrays = {}
    for i in range(n):
        dt = np.dtype(draw(dtypes))
        shape = tuple(draw(shapes))
        raw = draw(st.binary(min_size=int(np.prod(shape)) * dt.itemsize,
                             max_size=int(np.prod(shape)) * dt.itemsize))
        arrays[f"a{i}"] = np.frombuffer(raw, dt).reshape(shape) if raw else np.zeros(shape, dt)
    return arrays


def _header(value: bytes) -> tuple[dict, int]:
    n = PREFIX.unpack_from(value, 0)[4]
    return msgpack.unpackb(value[12:12 + n], raw=False), n


field_values = st.one_of(
    st.integers(-2**64 + 1, 2**64 - 1), st.floats(allow_nan=True), st.text(max_size=8),
    st.binary(max_size=20), st.none(), st.booleans(),
    st.lists(st.integers(-2**63, 2**64 - 1), max_size=10),
    st.recursive(st.integers(0, 9), lambda c: st.lists(c, max_size=3), max_leaves=20))


@st.composite
def mutations(draw, value: bytes):
    kind = draw(st.sampled_from(["flip", "truncate", "insert", "field", "prefix", "splice"]))
    data = bytearray(value)
    if kind == "flip":
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
        return bytes(data)
    if kind == "truncate":
        return bytes(data[:draw(st.integers(0, len(data) - 1))])
    if kind == "insert":
        i = draw(st.integers(0, len(data)))
        return bytes(data[:i]) + draw(st.binary(min_size=1, max_size=64)) + bytes(data[i:])
    if kind == "prefix":
        PREFIX.pack_into(data, 0, draw(st.sampled_from([b"DOCR", b"XXXX"])),
                         draw(st.integers(0, 255)), 0, 0, draw(st.integers(0, 2**32 - 1)))
        return bytes(data)
    header, n = _header(value)
    if kind == "splice":  # a whole new entry list
        header["a"] = draw(st.lists(st.lists(field_values, max_size=6), max_size=4))
    else:
        entry = draw(st.integers(0, len(header["a"]) - 1))
        field = draw(st.integers(0, 4))
        header["a"][entry][field] = draw(field_values)
    try:
        packed = msgpack.packb(header, use_bin_type=True)
    except (OverflowError, ValueError, TypeError):
        return value
    return PREFIX.pack(b"DOCR", 1, 0, 0, len(packed)) + packed + value[12 + n:]


@fuzz(suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_record_decoder(data):
    arrays = data.draw(records())
    value = encode_record(arrays)
    decoded = decode_record(value)
    for name, arr in arrays.items():  # a valid record round-trips bit for bit
        assert decoded[name].dtype == arr.dtype and decoded[name].tobytes() == arr.tobytes()
    mutated = data.draw(mutations(value))
    for fn in (parse_header, decode_record, verify_checksum):
        try:
            out = fn(mutated)
        except CacheFormatError:
            continue  # the only acceptable failure
        if fn is decode_record:
            for arr in out.values():  # what decodes is within bounds and readable
                assert arr.nbytes <= len(mutated)
                arr.tobytes()


coordinate = st.one_of(st.integers(-10, 10**12), st.floats(allow_nan=True, allow_infinity=True),
                       st.booleans(), st.text(max_size=3), st.none())
point = st.one_of(st.lists(coordinate, min_size=0, max_size=3), coordinate)
word = st.one_of(
    st.fixed_dictionaries({"points": st.one_of(st.lists(point, max_size=7), coordinate)},
                          optional={"ignore": st.one_of(st.booleans(), coordinate),
                                    "transcription": st.one_of(st.just("###"),
                                                               st.text(max_size=4))}),
    coordinate)
names = st.sampled_from(["a.jpg", "b.png", "../a.jpg", "/etc/passwd", "", "a\\b.jpg",
                         "x/../a.jpg", "missing.jpg", "a.jpg\x00"])


@fuzz(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(doc=st.dictionaries(names, st.one_of(
    st.fixed_dictionaries({"words": st.dictionaries(st.text(max_size=4), word, max_size=6)}),
    coordinate), max_size=5))
def test_fuzz_annotation_parser(tmp_path: Path, doc):
    from diskcache_ocr.ocr.annotations import MAX_COORDINATE, load_annotations

    images = tmp_path / "img"
    images.mkdir(exist_ok=True)
    for name in ("a.jpg", "b.png"):
        (images / name).write_bytes(b"x")
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"images": doc}))
    try:
        ann = load_annotations(images, path)
    except AnnotationError as exc:
        assert str(path) in str(exc)
        return
    words_in = sum(len(e["words"]) for n, e in doc.items()
                   if isinstance(e, dict) and n in ("a.jpg", "b.png"))
    kept = sum(len(it.polygons) for it in ann.items)
    word_problems = sum(p.word is not None for p in ann.problems)
    assert kept + word_problems == words_in  # every word is kept or recorded
    for item in ann.items:
        assert item.file in ("a.jpg", "b.png")
        for poly in item.polygons:
            assert poly.shape[0] >= 4 and poly.shape[1] == 2 and not poly.flags.writeable
            assert all(math.isfinite(v) and 0 <= v <= MAX_COORDINATE for v in poly.ravel())
    for p in ann.problems:
        assert p.source == str(path) and p.reason


@pytest.mark.slow
@settings(max_examples=20_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_record_decoder_soak(data):
    test_fuzz_record_decoder.hypothesis.inner_test(data)
