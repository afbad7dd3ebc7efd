"""The cache header and its rules: format version, per-kind versions, the unsynced marker,
and the persisted counters' encoding."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import lmdb
import msgpack

from diskcache_ocr._version import __version__
from diskcache_ocr.errors import (
    CacheFormatError,
    CacheNewerFormatError,
)
from diskcache_ocr.schema import KINDS

log = logging.getLogger("diskcache_ocr.store")

# 2: index keyed by each source's path under its resolved images directory (format 1 keyed
# it by the name relative to the directory, so two datasets sharing a cache collided).
STORE_FORMAT = 2


# Formats whose records this library still reads: opening one read-write drops its index
# (records are keyed by content, so they are found again after one re-hash per source).
_UPGRADABLE = (1,)


HEADER_KEY = b"header"


Policy = Literal["error", "rebuild", "ignore"]


POLICIES: tuple[str, ...] = ("error", "rebuild", "ignore")


_DBS: tuple[str, ...] = ("meta", "index", *KINDS, "stats")


def boot_id() -> str:
    """This boot of the machine ('' where the system does not say)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def written_unsynced_before_reboot(header: Mapping[str, Any]) -> bool:
    """The header says writes made without fsync predate the machine's last reboot."""
    marked = header.get("unsynced_boot")
    return bool(marked) and marked != boot_id()


def _mark_unsynced(txn: lmdb.Transaction, db: Any, path: Path) -> None:
    """Note in the header that this boot wrote without fsync.

    NOTE: without fsync a killed process loses nothing (its pages are in the OS cache), but
    an OS crash or power loss can lose or damage recent pages. The boot id tells a later
    open whether such a crash can have happened since (see ``CacheStore.unsynced_reboot``).
    """
    raw = txn.get(HEADER_KEY, db=db)
    header = _unpack_header(raw, path) if raw is not None else {}
    if header.get("unsynced_boot") != boot_id():
        header["unsynced_boot"] = boot_id()
        txn.put(HEADER_KEY, _pack(header), db=db)


def _pack(header: Mapping[str, Any]) -> bytes:
    return msgpack.packb(dict(header), use_bin_type=True)


def _unpack_header(raw: bytes | memoryview, path: Path) -> dict[str, Any]:
    try:
        header = msgpack.unpackb(bytes(raw), raw=False, max_map_len=1024, max_array_len=1024)
    except Exception as exc:
        raise CacheFormatError(f"{path}: unreadable cache header ({exc})") from None
    if not isinstance(header, dict):
        raise CacheFormatError(f"{path}: cache header is not a map")
    check_not_newer(header, path)  # (a newer format may lay out its other fields otherwise)
    _check_kinds_field(header.get("kinds", {}), path)
    return header


def check_not_newer(header: Mapping[str, Any], path: Path) -> None:
    """Refuse a header of a format newer than this library's: the cache is intact, written
    by a newer version, and the way to read it is to upgrade, never to delete it."""
    fmt = header.get("format")
    if type(fmt) is int and fmt > STORE_FORMAT:
        by = header.get("library")
        by = f" {by}" if isinstance(by, str) and len(by) < 40 else ""
        raise CacheNewerFormatError(
            f"{path}: written by a newer version of diskcache-ocr{by} (cache format {fmt}); "
            f"this version ({__version__}) reads cache format {STORE_FORMAT}. Upgrade "
            "diskcache-ocr to use this cache (its data is intact and kept), or point "
            "this version at another cache directory")


def _check_kinds_field(kinds: Any, path: Path) -> None:
    """``kinds`` maps a kind to its {version, fingerprint} strings; anything else is damage."""
    if not isinstance(kinds, dict):
        raise CacheFormatError(f"{path}: damaged cache header: 'kinds' is not a map "
                               f"({type(kinds).__name__}); clear it with "
                               "`diskcache-ocr clear --all`")
    for kind, version in kinds.items():
        if not (kind in KINDS and isinstance(version, dict)
                and all(isinstance(version.get(f), str) for f in ("version", "fingerprint"))):
            raise CacheFormatError(
                f"{path}: damaged cache header: 'kinds' entry {kind!r} is {version!r:.60} "
                "(expected version and fingerprint strings); clear it with "
                "`diskcache-ocr clear --all`"
            )


def _merge_counters(txn: lmdb.Transaction, db: Any, pending: Mapping[str, int]) -> None:
    for name, delta in pending.items():
        key = name.encode()
        raw = txn.get(key, db=db)
        value = _counter(raw) if raw is not None else 0
        txn.put(key, msgpack.packb(value + delta), db=db)


def _counter(raw: bytes | memoryview) -> int:
    """A persisted counter; a damaged one counts as 0 (counters only feed reports)."""
    try:
        value = msgpack.unpackb(bytes(raw))
    except Exception:  # msgpack raises several unrelated types on bad input
        return 0
    return value if type(value) is int and 0 <= value < 1 << 63 else 0



def check_header(env: lmdb.Environment, handles: dict[str, Any], path: Path, readonly: bool
                 ) -> None:
    """Refuse a header of another format; write a fresh one into a new cache."""
    with env.begin() as txn:
        raw = txn.get(HEADER_KEY, db=handles["meta"])
    if raw is None:
        if readonly:
            raise CacheFormatError(f"{path}: the cache has no header")
        header = {
            "format": STORE_FORMAT, "library": __version__,
            "engine": ".".join(map(str, env.lib_version())),
            "created_at": time.time(), "kinds": {}, "build": {},
        }
        with env.begin(write=True) as txn:
            txn.put(HEADER_KEY, _pack(header), db=handles["meta"])
        return
    header = _unpack_header(raw, path)
    if header.get("format") in _UPGRADABLE:
        if readonly:
            raise CacheFormatError(
                f"{path}: cache format {header['format']}, this library reads format "
                f"{STORE_FORMAT}; open it read-write once (a dataset or `diskcache-ocr "
                "prebuild`) to upgrade it, keeping its records"
            )
        old, header["format"] = header["format"], STORE_FORMAT
        with env.begin(write=True) as txn:
            txn.drop(handles["index"], delete=False)
            txn.put(HEADER_KEY, _pack(header), db=handles["meta"])
        log.warning("%s: upgraded from cache format %s to %d: the index is rebuilt as "
                    "sources are read (records are kept)", path, old, STORE_FORMAT)
        return
    if header.get("format") != STORE_FORMAT:  # (a newer one was refused by _unpack_header)
        raise CacheFormatError(
            f"{path}: cache format {header.get('format')!r:.40}, this library reads "
            f"format {STORE_FORMAT}; not a header this library ever wrote (damaged): clear it "
            "with `diskcache-ocr clear --all`"
        )
