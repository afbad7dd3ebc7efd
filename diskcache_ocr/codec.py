"""Array record format: named numpy arrays in one byte string, no pickle.

Layout of a record::

    0   magic  b"DOCR"            4 bytes
    4   format version            u8
    5   flags (0)                 u8
    6   reserved (0)              u16
    8   header length H           u32 little-endian
    12  msgpack header            H bytes
    ..  zero padding
    P   payload: each array's raw C-order bytes, each at an aligned offset

The header is ``{"a": [[name, dtype, shape, offset, nbytes], ...], "c": checksum}``, where
``dtype`` is a numpy type string from a fixed whitelist, offsets are from the start of the
record and ``checksum`` is blake3 (16 bytes) of everything from ``P`` to the end.

NOTE: LMDB places a large value (one that spills into overflow pages) at a fixed distance
past a page boundary (16 bytes for the 0.9 engine). Offsets are chosen so that, at that
placement, every array starts on a 64-byte boundary in memory. A value placed elsewhere (a
small value inside a leaf page) may be misaligned; :func:`decode_record` then copies that
array into aligned memory, which for small values costs next to nothing.
"""

from __future__ import annotations

import reprlib
import struct
import threading
from collections.abc import Callable, Mapping
from typing import Any

import blake3
import msgpack
import numpy as np

from diskcache_ocr.errors import CacheFormatError

MAGIC = b"DOCR"
FORMAT_VERSION = 1
PREFIX = struct.Struct("<4sBBHI")
ALIGN = 64
MIN_ALIGN = 16
# Where LMDB 0.9 places an overflow value relative to a 64-byte boundary.
DEFAULT_BASE_MOD = 16
CHECKSUM_BYTES = 16
MAX_HEADER_BYTES = 64 * 1024
MAX_ARRAYS = 256
MAX_NDIM = 8
MAX_NAME_LEN = 128
# The largest byte count numpy accepts for one array (its sizes are signed 64-bit).
MAX_ARRAY_BYTES = (1 << 63) - 1
# Bounded repr for error messages: a hostile header may nest lists ~1000 deep, which the
# builtin repr cannot print (RecursionError).
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxstring, _SHORT.maxother = 3, 8, 40, 40

# Little-endian (or byte-order free) numeric types only: no object, string, void or datetime.
DTYPES: frozenset[str] = frozenset(
    ["|b1", "|u1", "|i1", "<u2", "<i2", "<u4", "<i4", "<u8", "<i8", "<f2", "<f4", "<f8"]
)

Arrays = Mapping[str, np.ndarray]


def _align_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


def _canonical_array(array: np.ndarray) -> np.ndarray:
    """C-contiguous, little-endian version of ``array`` (a copy only where needed)."""
    arr = np.asarray(array)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    if not arr.flags.c_contiguous:  # (np.ascontiguousarray would turn 0-d into 1-d)
        arr = arr.copy(order="C")
    if arr.dtype.str not in DTYPES:
        raise CacheFormatError(
            f"cannot store dtype {arr.dtype!s}: expected one of bool, int8-64, uint8-64, "
            "float16/32/64"
        )
    return arr


def _layout(
    arrays: list[tuple[str, np.ndarray]], base_mod: int
) -> tuple[bytes, list[int], int, int]:
    """Header bytes (with a zero checksum), array offsets, payload start and total size.

    The header's length depends on the offsets and the offsets on the header's length, so
    iterate until both agree (two rounds in practice).
    """
    payload_start = _align_up(PREFIX.size + 64, ALIGN)
    while True:
        offsets = []
        pos = payload_start
        for _, arr in arrays:
            # Offset so that (base_mod + offset) is a multiple of ALIGN.
            pos = _align_up(pos + base_mod, ALIGN) - base_mod
            offsets.append(pos)
            pos += arr.nbytes
        header = _pack_header(arrays, offsets, bytes(CHECKSUM_BYTES))
        needed = _align_up(PREFIX.size + len(header) + base_mod, ALIGN) - base_mod
        if needed <= payload_start:
            return header, offsets, payload_start, pos
        payload_start = needed


def _pack_header(
    arrays: list[tuple[str, np.ndarray]], offsets: list[int], checksum: bytes
) -> bytes:
    entries = [
        [name, arr.dtype.str, list(arr.shape), off, arr.nbytes]
        for (name, arr), off in zip(arrays, offsets, strict=True)
    ]
    return msgpack.packb({"a": entries, "c": checksum}, use_bin_type=True)


class RecordPlan:
    """A validated record waiting to be written: its arrays, their offsets and its size.

    :func:`plan_record` does every check and fixes the layout; :meth:`write_into` then
    writes the record into any buffer of at least ``nbytes``, so a writer can reuse one
    buffer for many records instead of allocating (and first-touching) a new one each time.
    The arrays are referenced, not copied: they must not change until the record is written.
    """

    __slots__ = ("_items", "_offsets", "_header", "nbytes")

    def __init__(self, items: list[tuple[str, np.ndarray]], offsets: list[int], header: bytes,
                 nbytes: int) -> None:
        self._items = items
        self._offsets = offsets
        self._header = header
        self.nbytes = nbytes

    def write_into(self, out: bytearray | memoryview) -> memoryview:
        """Write the record into ``out[:nbytes]`` (every byte of it, padding included) and
        return that slice: the same bytes :func:`encode_record` gives."""
        view = memoryview(out)[: self.nbytes]
        if len(view) < self.nbytes:
            raise ValueError(f"buffer of {len(view)} bytes, the record needs {self.nbytes}")
        # NOTE: a reused buffer holds an older record's bytes: zero every gap (the padding
        # after the header and between arrays) so the record does not depend on its history.
        pos = PREFIX.size + len(self._header)
        for (_, arr), off in zip(self._items, self._offsets, strict=True):
            view[pos:off] = bytes(off - pos)
            if arr.nbytes:
                dst = np.frombuffer(view, dtype=arr.dtype, count=arr.size, offset=off)
                np.copyto(dst, arr.reshape(-1))
            pos = off + arr.nbytes
        checksum = blake3.blake3(view[self._offsets[0] :]).digest(CHECKSUM_BYTES)
        header = _pack_header(self._items, self._offsets, checksum)
        if len(header) != len(self._header):  # (the checksum is fixed-size bin)
            raise AssertionError("record header changed length with its checksum")
        PREFIX.pack_into(view, 0, MAGIC, FORMAT_VERSION, 0, 0, len(header))
        view[PREFIX.size : PREFIX.size + len(header)] = header
        return view


def plan_record(arrays: Arrays, *, base_mod: int = DEFAULT_BASE_MOD) -> RecordPlan:
    """Validate named arrays and lay them out as a record, without writing it yet."""
    if not arrays:
        raise CacheFormatError("a record needs at least one array, got none")
    if len(arrays) > MAX_ARRAYS:
        raise CacheFormatError(f"a record holds at most {MAX_ARRAYS} arrays, got {len(arrays)}")
    items: list[tuple[str, np.ndarray]] = []
    for name, value in arrays.items():
        if not isinstance(name, str) or not name or len(name) > MAX_NAME_LEN:
            raise CacheFormatError(f"array names must be non-empty str, got {name!r}")
        arr = _canonical_array(value)
        if arr.ndim > MAX_NDIM:
            raise CacheFormatError(f"array {name!r} has {arr.ndim} dims, at most {MAX_NDIM}")
        items.append((name, arr))
    header, offsets, _, total = _layout(items, base_mod)
    return RecordPlan(items, offsets, header, total)


def encode_record(arrays: Arrays, *, base_mod: int = DEFAULT_BASE_MOD) -> bytearray:
    """Serialize named arrays into one record (one copy of each array's bytes).

    >>> rec = encode_record({"image": np.zeros((2, 3), np.uint8)})
    >>> decode_record(rec)["image"].shape
    (2, 3)
    """
    plan = plan_record(arrays, base_mod=base_mod)
    out = bytearray(plan.nbytes)
    plan.write_into(out)
    # NOTE: the bytearray itself, not bytes(out): that would copy every payload once more.
    return out


class RecordHeader:
    """The parsed, validated header of a record."""

    __slots__ = ("entries", "checksum", "payload_start")

    def __init__(
        self, entries: list[tuple[str, np.dtype, tuple[int, ...], int, int]], checksum: bytes,
        payload_start: int,
    ) -> None:
        self.entries = entries
        self.checksum = checksum
        self.payload_start = payload_start


def _short(value: Any) -> str:
    return _SHORT.repr(value)


# Where a record is, for its error messages: a name, or a callable that makes one (called
# only when there is an error to report; building names costs on the read path).
Where = str | Callable[[], str]


def _fail(where: Where, problem: str) -> CacheFormatError:
    return CacheFormatError(f"{where() if callable(where) else where}: {problem}")


def parse_header(value: bytes | memoryview, where: Where = "record") -> RecordHeader:
    """Validate the prefix and header of ``value`` against its length; raise on anything odd."""
    size = len(value)
    if size < PREFIX.size:
        raise _fail(where, f"truncated: {size} bytes is shorter than the {PREFIX.size}-byte prefix")
    magic, version, _flags, _reserved, header_len = PREFIX.unpack_from(value, 0)
    if magic != MAGIC:
        raise _fail(where, f"wrong magic {bytes(magic)!r}, expected {MAGIC!r}: not a record")
    if version != FORMAT_VERSION:
        raise _fail(where, f"record format {version}, this library reads format {FORMAT_VERSION}")
    if header_len > MAX_HEADER_BYTES:
        raise _fail(where, f"header of {header_len} bytes exceeds the {MAX_HEADER_BYTES} limit")
    end = PREFIX.size + header_len
    if end > size:
        raise _fail(where, f"truncated: header needs {end} bytes, value has {size}")
    try:
        header = msgpack.unpackb(
            bytes(value[PREFIX.size : end]), raw=False, strict_map_key=True,
            max_str_len=MAX_NAME_LEN * 4, max_bin_len=CHECKSUM_BYTES,
            max_array_len=MAX_ARRAYS, max_map_len=8, use_list=True,
        )
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise _fail(where, f"unreadable header ({type(exc).__name__}: {exc})") from None
    if not isinstance(header, dict) or set(header) != {"a", "c"}:
        raise _fail(where, "header is not a map with keys 'a' and 'c'")
    checksum, raw_entries = header["c"], header["a"]
    if not isinstance(checksum, bytes) or len(checksum) != CHECKSUM_BYTES:
        raise _fail(where, "header checksum is not 16 bytes")
    if not isinstance(raw_entries, list) or not raw_entries:
        raise _fail(where, "header lists no arrays")
    entries = []
    names: set[str] = set()
    prev_end = end
    payload_start = None
    for raw in raw_entries:
        entry = _check_entry(raw, where, names, prev_end, size)
        names.add(entry[0])
        prev_end = entry[3] + entry[4]
        if payload_start is None:
            payload_start = entry[3]
        entries.append(entry)
    return RecordHeader(entries, checksum, payload_start if payload_start is not None else end)


def _check_entry(
    raw: Any, where: Where, names: set[str], min_offset: int, size: int
) -> tuple[str, np.dtype, tuple[int, ...], int, int]:
    if not isinstance(raw, list) or len(raw) != 5:
        raise _fail(where, f"array entry {_short(raw)} is not [name, dtype, shape, offset, nbytes]")
    name, dtype_str, shape, offset, nbytes = raw
    if not isinstance(name, str) or not name or name in names:
        raise _fail(where, f"array name {_short(name)} is empty, not a string or repeated")
    label = f"array {name!r}"
    if not isinstance(dtype_str, str) or dtype_str not in DTYPES:
        raise _fail(where, f"{label} has dtype {_short(dtype_str)}, not an allowed numeric dtype")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_NDIM
        or not all(type(d) is int and d >= 0 for d in shape)
    ):
        raise _fail(where, f"{label} has shape {_short(shape)}: expected up to {MAX_NDIM} dims "
                    ">= 0")
    for field, val in (("offset", offset), ("nbytes", nbytes)):
        if type(val) is not int or val < 0:
            raise _fail(where, f"{label} has {field} {_short(val)}: expected an int >= 0")
    dtype = np.dtype(dtype_str)
    count = extent = 1
    for dim in shape:  # Python ints: a huge shape cannot overflow silently
        count *= dim
        extent *= max(dim, 1)
    if count * dtype.itemsize != nbytes:
        raise _fail(
            where, f"{label}: shape {tuple(shape)} × {dtype.itemsize} bytes != stored length "
            f"{nbytes}"
        )
    # numpy refuses a shape whose non-zero dims overflow even when another dim is 0
    if extent * dtype.itemsize > MAX_ARRAY_BYTES:
        raise _fail(where, f"{label}: shape {_short(shape)} is too large for an array")
    if offset < min_offset or offset + nbytes > size:
        raise _fail(
            where, f"{label}: bytes {offset}..{offset + nbytes} fall outside the payload "
            f"{min_offset}..{size}"
        )
    return name, dtype, tuple(shape), offset, nbytes


def _aligned_copy(src: np.ndarray) -> np.ndarray:
    raw = np.empty(src.nbytes + ALIGN, dtype=np.uint8)
    start = (-raw.ctypes.data) % ALIGN
    out = raw[start : start + src.nbytes].view(src.dtype).reshape(src.shape)
    np.copyto(out, src)
    return out


class _Layout:
    """What :func:`decode_record` needs of a validated header: per array its name, dtype,
    shape, offset, byte length and required alignment; the least value length for which
    every array lies inside the value; and ``probe_at``, a position whose 16-byte alignment
    in memory means every array is aligned (-1 where no single position tells)."""

    __slots__ = ("entries", "min_size", "probe_at")

    def __init__(
        self, entries: tuple[tuple[str, np.dtype, tuple[int, ...], int, int, int], ...],
        min_size: int,
    ) -> None:
        self.entries = entries
        self.min_size = min_size
        # Every array needs max(MIN_ALIGN, itemsize) == MIN_ALIGN (itemsizes are <= 8): if
        # all offsets agree modulo MIN_ALIGN, one test of the value's address settles all.
        mods = {off % MIN_ALIGN for _, _, _, off, nb, _ in entries if nb}
        self.probe_at = (
            mods.pop() if len(mods) == 1 and all(a == MIN_ALIGN for *_, a in entries)
            and min_size >= 2 * MIN_ALIGN else -1
        )


def _find_probe_dtype() -> np.dtype | None:
    """A dtype that numpy requires to be MIN_ALIGN-aligned, if this platform has one.

    numpy flags an array "aligned" when its address is a multiple of its dtype's alignment,
    so a one-element view of such a dtype tells whether an address is MIN_ALIGN-aligned
    for a third of the cost of asking for the address. (long double on x86-64 and aarch64
    Linux; checked here against real addresses, else None and addresses are used.)
    """
    dtype = np.dtype(np.longdouble)
    if dtype.alignment != MIN_ALIGN or dtype.itemsize != MIN_ALIGN:
        return None
    buf = bytearray(4 * MIN_ALIGN)
    view = memoryview(buf).toreadonly()
    base = np.frombuffer(buf, np.uint8).ctypes.data
    for off in range(2 * MIN_ALIGN):
        probe = np.ndarray((1,), dtype, view, off)
        if bool(probe.flags.aligned) != ((base + off) % MIN_ALIGN == 0):
            return None
    return dtype


_PROBE_DTYPE = _find_probe_dtype()


# Validated layouts, keyed by the record's bytes from its start up to (not including) the
# 16 checksum bytes that end a canonical header. Records of one kind and shape differ only
# in those bytes, so most reads skip msgpack and the per-array checks.
#
# NOTE on soundness: a header is cached only when it is byte for byte the canonical msgpack
# encoding of what it was parsed into (`_canonical_header`), which ends with the checksum as
# a fixed-size bin. Any value whose bytes before its last 16 header bytes equal the key
# therefore parses to the same arrays (only the checksum differs, and no check reads it),
# and every check that depends on the value's length is the single inequality
# ``len(value) >= min_size``, re-tested on every read. A header in any other encoding is
# never cached and always takes the full parse.
LAYOUT_CACHE_SIZE = 1024
_layouts: dict[bytes, _Layout] = {}
_layouts_lock = threading.Lock()
_HEADER_LEN = struct.Struct("<I")
_CHECKSUM_TAIL = b"\xa1c\xc4" + bytes([CHECKSUM_BYTES])  # "c": bin8 of 16 bytes


def _canonical_header(header: RecordHeader) -> bytes:
    entries = [[n, dt.str, list(shape), off, nb] for n, dt, shape, off, nb in header.entries]
    return msgpack.packb({"a": entries, "c": header.checksum}, use_bin_type=True)


def _parse_layout(value: memoryview, where: Where) -> _Layout:
    """Full parse and validation of ``value``'s header; remembers it when canonical."""
    header = parse_header(value, where)
    layout = _Layout(
        tuple((n, dt, shape, off, nb, max(MIN_ALIGN, dt.itemsize))
              for n, dt, shape, off, nb in header.entries),
        max(off + nb for _, _, _, off, nb in header.entries),
    )
    end = PREFIX.size + _HEADER_LEN.unpack_from(value, 8)[0]
    canonical = _canonical_header(header)
    if (
        canonical[-CHECKSUM_BYTES - 4 : -CHECKSUM_BYTES] == _CHECKSUM_TAIL
        and value[PREFIX.size : end].tobytes() == canonical
    ):
        key = value[: end - CHECKSUM_BYTES].tobytes()
        with _layouts_lock:
            while len(_layouts) >= LAYOUT_CACHE_SIZE:  # drop the oldest
                _layouts.pop(next(iter(_layouts)), None)
            _layouts[key] = layout
    return layout


def _cached_layout(value: memoryview) -> _Layout | None:
    """The remembered layout of ``value``'s header, if any and if ``value`` is long enough."""
    size = len(value)
    if size < PREFIX.size:
        return None
    key_end = PREFIX.size + _HEADER_LEN.unpack_from(value, 8)[0] - CHECKSUM_BYTES
    if key_end <= PREFIX.size or key_end + CHECKSUM_BYTES > size:
        return None
    layout = _layouts.get(value[:key_end].tobytes())
    if layout is None or size < layout.min_size:
        return None
    return layout


def clear_layout_cache() -> None:
    """Forget every remembered header layout (for tests and benchmarks)."""
    with _layouts_lock:
        _layouts.clear()


def decode_record(
    value: bytes | bytearray | memoryview, where: Where = "record", *,
    writeable: bool = False,
) -> dict[str, np.ndarray]:
    """Arrays of a record as views on ``value`` (zero-copy where aligned).

    Views are read-only (whatever ``value`` is). With ``writeable`` every array is an
    owned, aligned copy. ``where`` names the record in errors; a callable is called only
    when there is an error to report.
    """
    try:
        view = memoryview(value)
    except TypeError:
        raise _fail(where, f"not a byte string: {type(value).__name__}") from None
    if view.itemsize != 1 or view.ndim != 1:
        try:
            view = view.cast("B")
        except TypeError:
            raise _fail(where, "not a contiguous byte string") from None
    if not view.readonly:
        view = view.toreadonly()
    layout = _cached_layout(view) or _parse_layout(view, where)
    # (bounds were checked: offset + nbytes <= min_size <= len(view) for every array)
    if (
        not writeable and layout.probe_at >= 0 and _PROBE_DTYPE is not None
        and np.ndarray((1,), _PROBE_DTYPE, view, layout.probe_at).flags.aligned
    ):  # every array is aligned: views only, one call each
        return {
            name: np.ndarray(shape, dtype, view, offset) if nbytes else _empty(shape, dtype)
            for name, dtype, shape, offset, nbytes, _ in layout.entries
        }
    out: dict[str, np.ndarray] = {}
    base = -1
    for name, dtype, shape, offset, nbytes, align in layout.entries:
        if nbytes == 0:
            arr = _empty(shape, dtype, writeable)
        else:
            arr = np.ndarray(shape, dtype, view, offset)
            if base < 0:
                base = arr.__array_interface__["data"][0] - offset
            if writeable or (base + offset) % align:
                arr = _aligned_copy(arr)
                arr.flags.writeable = writeable
        out[name] = arr
    return out


def _empty(shape: tuple[int, ...], dtype: np.dtype, writeable: bool = False) -> np.ndarray:
    arr = np.zeros(shape, dtype)
    arr.flags.writeable = writeable
    return arr


def verify_checksum(value: bytes | memoryview, where: str = "record") -> None:
    """Raise :class:`CacheFormatError` if the payload does not match its stored checksum."""
    header = parse_header(value, where)
    digest = blake3.blake3(memoryview(value)[header.payload_start :]).digest(CHECKSUM_BYTES)
    if digest != header.checksum:
        raise _fail(where, "payload checksum mismatch: the record's bytes were damaged")


def record_nbytes(value: bytes | memoryview, where: str = "record") -> dict[str, int]:
    """Bytes per array of a record, without touching the payload."""
    return {e[0]: e[4] for e in parse_header(value, where).entries}
