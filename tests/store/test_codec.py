from __future__ import annotations

import struct

import msgpack
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from diskcache_ocr import codec
from diskcache_ocr.codec import (
    MAGIC,
    PREFIX,
    decode_record,
    encode_record,
    parse_header,
    plan_record,
    verify_checksum,
)
from diskcache_ocr.errors import CacheError, CacheFormatError

DTYPES = [np.bool_, np.uint8, np.int16, np.int32, np.int64, np.float16, np.float32, np.float64]


@st.composite
def arrays(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6))
    arr = draw(hnp.arrays(dtype, shape))
    layout = draw(st.sampled_from(["c", "f", "strided", "bigendian"]))
    if layout == "f":
        arr = np.asfortranarray(arr)
    elif layout == "strided" and arr.ndim:
        arr = np.repeat(arr, 2, axis=0)[::2]
    elif layout == "bigendian" and arr.dtype.itemsize > 1:
        arr = arr.astype(arr.dtype.newbyteorder(">"))
    return arr


@given(st.dictionaries(st.text(min_size=1, max_size=12), arrays(), min_size=1, max_size=4))
def test_round_trip_bit_exact(named):
    record = encode_record(named)
    out = decode_record(record)
    assert list(out) == list(named)
    for name, arr in named.items():
        got = out[name]
        assert got.shape == arr.shape
        assert got.dtype == arr.dtype.newbyteorder("<") or got.dtype == arr.dtype
        assert np.asarray(arr).astype(got.dtype).tobytes() == got.tobytes()
        assert not got.flags.writeable
        assert got.ctypes.data % 16 == 0 or got.nbytes == 0
    verify_checksum(record)


@given(st.lists(st.dictionaries(st.text(min_size=1, max_size=12), arrays(), min_size=1,
                                max_size=4), min_size=1, max_size=3))
def test_a_plan_written_into_a_reused_dirty_buffer_equals_encode_record(records):
    scratch = bytearray(b"\xa5" * 4096)  # what an earlier, larger record left behind
    for named in records:
        plan = plan_record(named)
        if plan.nbytes > len(scratch):
            scratch = bytearray(b"\x5a" * plan.nbytes)
        written = plan.write_into(scratch)
        assert bytes(written) == bytes(encode_record(named))
        verify_checksum(written)
        scratch[: len(written)] = b"\xff" * len(written)  # the next record meets garbage


def test_plan_validates_before_anything_is_written():
    with pytest.raises(CacheFormatError, match="cannot store dtype"):
        plan_record({"a": np.array(["x"])})
    with pytest.raises(CacheFormatError, match="at least one array"):
        plan_record({})
    plan = plan_record({"a": np.arange(10, dtype=np.float32)})
    with pytest.raises(ValueError, match="buffer of 8 bytes"):
        plan.write_into(bytearray(8))


def test_views_share_memory_with_value():
    arr = np.arange(100000, dtype=np.float32)
    record = encode_record({"a": arr}, base_mod=0)
    buf = np.frombuffer(record, np.uint8)
    out = decode_record(record)["a"]
    # Zero-copy: the view lies inside the record's buffer.
    assert buf.ctypes.data <= out.ctypes.data < buf.ctypes.data + len(record)


def test_writeable_decode_gives_owned_copies():
    record = encode_record({"a": np.ones(5, np.int32)})
    out = decode_record(record, writeable=True)["a"]
    out += 1
    assert decode_record(record)["a"].tolist() == [1] * 5


def _rewrite_header(record: bytes, mutate) -> bytes:
    _, _, _, _, hlen = PREFIX.unpack_from(record, 0)
    header = msgpack.unpackb(record[PREFIX.size : PREFIX.size + hlen])
    mutate(header)
    packed = msgpack.packb(header, use_bin_type=True)
    return PREFIX.pack(MAGIC, 1, 0, 0, len(packed)) + packed + record[PREFIX.size + hlen :]


GOOD = encode_record({"img": np.arange(12, dtype=np.float32).reshape(3, 4)})


@pytest.mark.parametrize(
    "bad, message",
    [
        (b"", "truncated"),
        (b"XXXX" + GOOD[4:], "wrong magic"),
        (GOOD[:40], "truncated"),
        (GOOD[:-4], "outside the payload"),
        (_rewrite_header(GOOD, lambda h: h["a"][0].__setitem__(1, "|O")), "not an allowed"),
        (_rewrite_header(GOOD, lambda h: h["a"][0].__setitem__(1, "<U4")), "not an allowed"),
        (_rewrite_header(GOOD, lambda h: h["a"][0].__setitem__(1, "weird")), "not an allowed"),
        (_rewrite_header(GOOD, lambda h: h["a"][0].__setitem__(2, [3, 5])), "!= stored length"),
        (_rewrite_header(GOOD, lambda h: h["a"][0].__setitem__(2, [2**62, 2**62])), "!= stored"),
        (_rewrite_header(GOOD, lambda h: h["a"][0].__setitem__(2, [-1, 4])), "shape"),
        (_rewrite_header(GOOD, lambda h: h["a"][0].__setitem__(3, 10**9)), "outside the payload"),
        (_rewrite_header(GOOD, lambda h: h["a"][0].__setitem__(3, 2)), "outside the payload"),
        (_rewrite_header(GOOD, lambda h: h.__setitem__("a", [])), "no arrays"),
        (_rewrite_header(GOOD, lambda h: h.__setitem__("x", 1)), "keys"),
        (_rewrite_header(GOOD, lambda h: h["a"].append(h["a"][0])), "repeated"),
        (PREFIX.pack(MAGIC, 1, 0, 0, 5) + b"\xc1\xc1\xc1\xc1\xc1", "unreadable header"),
        (PREFIX.pack(MAGIC, 1, 0, 0, 2**31), "exceeds"),
        (PREFIX.pack(MAGIC, 9, 0, 0, 0), "format 9"),
    ],
)
def test_malformed_records_raise_clear_errors(bad, message):
    with pytest.raises(CacheFormatError, match=message) as info:
        decode_record(bad, "images/abcd")
    assert "images/abcd" in str(info.value)
    assert isinstance(info.value, CacheError) and isinstance(info.value, ValueError)


def test_deeply_nested_header_is_rejected():
    # {"a": [[[[...1...]]]], "c": ...} nested 5000 deep, written by hand (packb refuses).
    raw = b"\x82\xa1a" + b"\x91" * 5000 + b"\x01" + b"\xa1c\xc4\x10" + b"0" * 16
    with pytest.raises(CacheFormatError):
        decode_record(PREFIX.pack(MAGIC, 1, 0, 0, len(raw)) + raw)


def test_flipped_payload_byte_is_caught_by_checksum():
    damaged = bytearray(GOOD)
    damaged[-3] ^= 0x40
    decode_record(bytes(damaged))  # decodes: only the checksum can tell
    with pytest.raises(CacheFormatError, match="checksum"):
        verify_checksum(bytes(damaged))


def test_object_arrays_cannot_be_stored():
    with pytest.raises(CacheFormatError, match="cannot store dtype"):
        encode_record({"x": np.array([{"a": 1}], dtype=object)})


def test_header_lists_names_dtypes_shapes():
    header = parse_header(GOOD)
    (name, dtype, shape, offset, nbytes), = header.entries
    assert (name, dtype.str, shape, nbytes) == ("img", "<f4", (3, 4), 48)
    assert offset % 16 == 0 and offset >= PREFIX.size + struct.calcsize("<I")


@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_crash(data):
    try:
        decode_record(data)
    except CacheFormatError:
        pass


@given(st.binary(min_size=1, max_size=64), st.integers(min_value=0))
def test_mutated_records_raise_only_cache_errors(patch, pos):
    record = bytearray(GOOD)
    pos %= len(record)
    record[pos : pos + len(patch)] = patch
    try:
        decode_record(bytes(record))
    except CacheFormatError:
        pass


# -- the cache of validated header layouts ------------------------------------------------
def _outcome(value):
    """What decode_record makes of ``value``: its arrays' metadata and bytes, or the error."""
    try:
        out = decode_record(value, "r")
    except CacheFormatError as exc:
        return ("error", str(exc))
    return {n: (a.dtype.str, a.shape, a.flags.writeable, a.tobytes()) for n, a in out.items()}


def test_a_cached_layout_never_hides_header_damage():
    """Every single-byte change and truncation of prefix and header decodes exactly as it
    would with nothing cached (a parse of the good record is cached before each try)."""
    record = encode_record({"a": np.arange(6, dtype=np.int32).reshape(2, 3),
                            "b": np.ones(4, np.float64)})
    end = PREFIX.size + PREFIX.unpack_from(record, 0)[4]
    variants = [bytes(record[:n]) for n in range(0, len(record), 7)]
    for pos in range(end):
        for flip in (0x01, 0x10, 0x80, 0xFF):
            damaged = bytearray(record)
            damaged[pos] ^= flip
            variants.append(bytes(damaged))
    for value in variants:
        codec.clear_layout_cache()
        cold = _outcome(value)
        decode_record(record)  # caches the good layout
        assert codec._layouts, "the good record's layout is cached"
        assert _outcome(value) == cold
        assert _outcome(value) == cold  # (and after any caching of ``value`` itself)


def test_records_that_differ_only_in_checksum_share_one_layout():
    codec.clear_layout_cache()
    a = encode_record({"x": np.zeros((2, 3), np.uint8)})
    b = encode_record({"x": np.ones((2, 3), np.uint8)})
    assert a[:40] != b[:40] or a != b
    assert decode_record(a)["x"].sum() == 0
    assert decode_record(b)["x"].sum() == 6
    assert len(codec._layouts) == 1


def test_records_with_different_layouts_never_share_a_parse():
    codec.clear_layout_cache()
    records = {
        shape: encode_record({"x": np.arange(6, dtype=np.uint8).reshape(shape)})
        for shape in [(2, 3), (3, 2), (6,), (1, 6), (6, 1)]
    }
    other_dtype = encode_record({"x": np.arange(6, dtype=np.int8).reshape(2, 3)})
    other_name = encode_record({"y": np.arange(6, dtype=np.uint8).reshape(2, 3)})
    for _ in range(2):  # cold, then warm
        for shape, rec in records.items():
            assert decode_record(rec)["x"].shape == shape
        assert decode_record(other_dtype)["x"].dtype == np.int8
        assert list(decode_record(other_name)) == ["y"]
    assert len(codec._layouts) == len(records) + 2


def test_a_short_value_with_a_cached_header_is_refused():
    record = encode_record({"x": np.arange(100, dtype=np.float32)})
    decode_record(record)
    for cut in (1, 4, 399):
        with pytest.raises(CacheFormatError, match="outside the payload"):
            decode_record(record[:-cut], "r")


def test_a_header_in_another_encoding_decodes_but_is_not_cached():
    record = encode_record({"x": np.arange(6, dtype=np.uint8)})
    header = parse_header(record)
    # Same content, keys in the other order: a valid header, but not the canonical bytes.
    entries = [[n, dt.str, list(s), off, nb] for n, dt, s, off, nb in header.entries]
    packed = msgpack.packb({"c": header.checksum, "a": entries}, use_bin_type=True)
    assert len(packed) == PREFIX.unpack_from(record, 0)[4]
    other = PREFIX.pack(MAGIC, 1, 0, 0, len(packed)) + packed + bytes(record[PREFIX.size
                                                                             + len(packed) :])
    codec.clear_layout_cache()
    for _ in range(3):
        assert decode_record(other)["x"].tolist() == list(range(6))
    assert not codec._layouts


def test_the_layout_cache_stays_bounded(monkeypatch):
    monkeypatch.setattr(codec, "LAYOUT_CACHE_SIZE", 8)
    codec.clear_layout_cache()
    for n in range(1, 50):
        rec = encode_record({"x": np.zeros(n, np.uint8)})
        assert decode_record(rec)["x"].shape == (n,)
        assert len(codec._layouts) <= 8
    assert len(codec._layouts) == 8
    assert decode_record(encode_record({"x": np.zeros(1, np.uint8)}))["x"].shape == (1,)


@pytest.mark.parametrize("probe", [True, False])
@pytest.mark.parametrize("shift", [0, 1, 8, 16, 48])
def test_aligned_views_and_misaligned_copies(monkeypatch, probe, shift):
    """Views where the arrays land 16-byte aligned in memory, aligned copies elsewhere,
    with or without the dtype-based alignment probe."""
    if not probe:
        monkeypatch.setattr(codec, "_PROBE_DTYPE", None)
    arrays = {"a": np.arange(40, dtype=np.float64), "b": np.arange(7, dtype=np.uint8),
              "e": np.zeros((0, 3), np.float32), "c": np.arange(5, dtype=np.int16)}
    record = encode_record(arrays, base_mod=0)
    raw = np.zeros(len(record) + 128, np.uint8)
    start = (-raw.ctypes.data) % 64 + shift
    raw[start : start + len(record)] = np.frombuffer(record, np.uint8)
    value = memoryview(raw[start : start + len(record)]).toreadonly()
    base = raw.ctypes.data + start
    for _ in range(2):  # cold, then cached
        out = decode_record(value)
        for name, arr in arrays.items():
            got = out[name]
            assert got.dtype == arr.dtype and got.shape == arr.shape
            assert np.array_equal(got, arr) and not got.flags.writeable
            assert got.ctypes.data % 16 == 0 or got.size == 0
            inside = base <= got.ctypes.data < base + len(record)
            if got.size:
                assert inside == (shift % 16 == 0), (name, shift)


def test_a_writeable_value_gives_read_only_views():
    record = encode_record({"x": np.arange(6, dtype=np.uint8)})
    assert isinstance(record, bytearray)
    out = decode_record(record)["x"]
    assert not out.flags.writeable


def test_the_probe_dtype_agrees_with_addresses():
    dtype = codec._find_probe_dtype()
    if dtype is None:
        pytest.skip("no 16-byte-aligned dtype on this platform")
    buf = np.zeros(256, np.uint8)
    view = memoryview(buf).toreadonly()
    for off in range(64):
        aligned = np.ndarray((1,), dtype, view, off).flags.aligned
        assert aligned == ((buf.ctypes.data + off) % 16 == 0)


def test_a_record_name_is_made_only_for_an_error():
    calls = []

    def where():
        calls.append(1)
        return "cache/tensors/ab12"

    rec = encode_record({"x": np.arange(6, dtype=np.float32)})
    codec.clear_layout_cache()
    assert decode_record(rec, where)["x"].tolist() == list(range(6))  # full parse
    assert decode_record(rec, where)["x"].tolist() == list(range(6))  # remembered layout
    assert calls == []
    damaged = bytearray(rec)
    damaged[:4] = b"NOPE"
    with pytest.raises(CacheFormatError, match=r"^cache/tensors/ab12: wrong magic"):
        decode_record(damaged, where)
    with pytest.raises(CacheFormatError, match=r"^cache/tensors/ab12: not a byte string"):
        decode_record(12345, where)  # type: ignore[arg-type]
    assert calls == [1, 1]
