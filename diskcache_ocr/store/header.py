"""The cache header and its rules: format version, per-kind versions, pipelines, the
unsynced marker; the sub-databases a cache has."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import lmdb
import msgpack

from diskcache_ocr._version import __version__
from diskcache_ocr.errors import (
    CacheFormatError,
    CacheNewerFormatError,
)
from diskcache_ocr.schema import KINDS, IndexEntry, record_name

log = logging.getLogger("diskcache_ocr.store")

# 2: index keyed by each source's path under its resolved images directory (format 1 keyed
# it by the name relative to the directory, so two datasets sharing a cache collided).
# 3: several pipelines per cache (``pipelines``: each role's kind versions; index entries
# name each record by its kind and version; ``plain``: the version whose images are keyed
# by content alone).
STORE_FORMAT = 3


# Formats whose records this library still reads, upgraded by a read-write open: format 1
# loses its index (records are keyed by content, found again after one re-hash per source);
# format 2's one set of kinds becomes one pipeline, of role LEGACY_ROLE.
_UPGRADABLE = (1, 2)

# The role of the one pipeline a format-2 cache held (its images directory was not recorded
# per pipeline); a pipeline whose versions equal it takes it over when it opens.
LEGACY_ROLE = "legacy"


HEADER_KEY = b"header"


Policy = Literal["error", "rebuild", "ignore"]


POLICIES: tuple[str, ...] = ("error", "rebuild", "ignore")


SUB_DATABASES: tuple[str, ...] = ("meta", "index", *KINDS, "stats")


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


def mark_unsynced(txn: lmdb.Transaction, db: Any, path: Path) -> None:
    """Note in the header that this boot wrote without fsync.

    NOTE: without fsync a killed process loses nothing (its pages are in the OS cache), but
    an OS crash or power loss can lose or damage recent pages. The boot id tells a later
    open whether such a crash can have happened since (see ``CacheStore.unsynced_reboot``).
    """
    raw = txn.get(HEADER_KEY, db=db)
    header = unpack_header(raw, path) if raw is not None else {}
    if header.get("unsynced_boot") != boot_id():
        header["unsynced_boot"] = boot_id()
        txn.put(HEADER_KEY, pack_header(header), db=db)


def merge_header(txn: lmdb.Transaction, db: Any, changes: Mapping[str, Any], path: Path
                 ) -> dict[str, Any]:
    """Merge top-level fields into the header, inside the write transaction ``txn``;
    returns the new header."""
    raw = txn.get(HEADER_KEY, db=db)
    header = unpack_header(raw, path) if raw is not None else {}
    header.update(changes)
    txn.put(HEADER_KEY, pack_header(header), db=db)
    return header


def pack_header(header: Mapping[str, Any]) -> bytes:
    return msgpack.packb(dict(header), use_bin_type=True)


def unpack_header(raw: bytes | memoryview, path: Path) -> dict[str, Any]:
    try:
        header = msgpack.unpackb(bytes(raw), raw=False, max_map_len=1024, max_array_len=1024)
    except Exception as exc:
        raise CacheFormatError(f"{path}: unreadable cache header ({exc})") from None
    if not isinstance(header, dict):
        raise CacheFormatError(f"{path}: cache header is not a map")
    check_not_newer(header, path)  # (a newer format may lay out its other fields otherwise)
    _check_kinds_field(header.get("kinds", {}), path)
    _check_kinds_field(header.get("plain", {}), path, "plain")
    pipelines = header.get("pipelines", {})
    if not isinstance(pipelines, dict):
        raise CacheFormatError(f"{path}: damaged cache header: 'pipelines' is not a map "
                               f"({type(pipelines).__name__}); clear it with "
                               "`diskcache-ocr clear --all`")
    for role, entry in pipelines.items():
        if not (isinstance(role, str) and isinstance(entry, dict)):
            raise CacheFormatError(f"{path}: damaged cache header: 'pipelines' entry "
                                   f"{role!r:.60} is {entry!r:.60}; clear it with "
                                   "`diskcache-ocr clear --all`")
        _check_kinds_field(entry.get("kinds", {}), path, f"pipelines[{role!r:.60}].kinds")
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


def _check_kinds_field(kinds: Any, path: Path, field: str = "kinds") -> None:
    """``kinds`` maps a kind to its {version, fingerprint} strings; anything else is damage."""
    if not isinstance(kinds, dict):
        raise CacheFormatError(f"{path}: damaged cache header: '{field}' is not a map "
                               f"({type(kinds).__name__}); clear it with "
                               "`diskcache-ocr clear --all`")
    for kind, version in kinds.items():
        if not (kind in KINDS and isinstance(version, dict)
                and all(isinstance(version.get(f), str) for f in ("version", "fingerprint"))):
            raise CacheFormatError(
                f"{path}: damaged cache header: '{field}' entry {kind!r} is {version!r:.60} "
                "(expected version and fingerprint strings); clear it with "
                "`diskcache-ocr clear --all`"
            )


def upgraded_header(header: Mapping[str, Any]) -> dict[str, Any]:
    """A format-1/2 header as format 3: its one set of kinds becomes the pipeline of role
    :data:`LEGACY_ROLE`, and its images (keyed by content alone, whatever their decode)
    the ``plain`` version, marked as coming from the upgrade."""
    out = dict(header)
    kinds = dict(header.get("kinds", {}))
    out["format"] = STORE_FORMAT
    out["pipelines"] = {LEGACY_ROLE: {
        "kinds": kinds, "described": _legacy_description(header),
        "first_used": header.get("created_at", time.time()), "last_used": time.time(),
    }} if kinds else {}
    out["plain"] = ({"images": {**kinds["images"], "upgraded": "true"}} if "images" in kinds
                    else {})
    return out


def _legacy_description(header: Mapping[str, Any]) -> dict[str, Any]:
    described: dict[str, Any] = {}
    for name in ("stage_pipeline", "pipeline", "dataset_root", "preset"):
        if header.get(name) is not None:
            described[name] = header[name]
    return described


def _rename_index(txn: lmdb.Transaction, db: Any, kinds: Mapping[str, Any], path: Path
                  ) -> None:
    """Format 2 named an entry's records by kind alone; format 3 by kind and version (the
    format-2 header's one version per kind). Images keep the plain name (keyed by content)."""
    names = {kind: record_name(kind, v["fingerprint"], plain=kind == "images")
             for kind, v in kinds.items()}
    rows = [(bytes(k), bytes(v)) for k, v in txn.cursor(db)]
    for key, raw in rows:
        try:
            entry = IndexEntry.unpack(raw, f"{path} index {key!r:.80}")
        except CacheFormatError:
            continue  # (a damaged entry is dropped where it is read, as before)
        renamed = {names[kind]: value for kind, value in entry.keys.items() if kind in names}
        txn.put(key, replace(entry, keys=renamed).pack(), db=db)


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
            "created_at": time.time(), "kinds": {}, "build": {}, "pipelines": {},
            "plain": {},
        }
        with env.begin(write=True) as txn:
            txn.put(HEADER_KEY, pack_header(header), db=handles["meta"])
        return
    header = unpack_header(raw, path)
    if header.get("format") in _UPGRADABLE:
        if readonly:
            raise CacheFormatError(
                f"{path}: cache format {header['format']}, this library reads format "
                f"{STORE_FORMAT}; open it read-write once (a dataset or `diskcache-ocr "
                "prebuild`) to upgrade it, keeping its records"
            )
        old = header["format"]
        with env.begin(write=True) as txn:
            if old == 1:
                txn.drop(handles["index"], delete=False)
            else:
                _rename_index(txn, handles["index"], header.get("kinds", {}), path)
            txn.put(HEADER_KEY, pack_header(upgraded_header(header)), db=handles["meta"])
        log.warning("%s: upgraded from cache format %s to %d (records are kept%s)", path, old,
                    STORE_FORMAT, "; the index is rebuilt as sources are read" if old == 1
                    else f"; its pipeline is now the one of role {LEGACY_ROLE!r}")
        return
    if header.get("format") != STORE_FORMAT:  # (a newer one was refused by unpack_header)
        raise CacheFormatError(
            f"{path}: cache format {header.get('format')!r:.40}, this library reads "
            f"format {STORE_FORMAT}; not a header this library ever wrote (damaged): clear it "
            "with `diskcache-ocr clear --all`"
        )
