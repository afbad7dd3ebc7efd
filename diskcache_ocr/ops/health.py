"""Health findings about a cache: values in a list (codes from :data:`HEALTH_CODES`), never
prints."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from diskcache_ocr.codec import parse_header
from diskcache_ocr.errors import CacheError, CacheFormatError
from diskcache_ocr.ops.status import existing_cache, incomplete_build, kind_versions
from diskcache_ocr.presets import cache_plan
from diskcache_ocr.schema import (
    KINDS,
    reads,
    source_state,
)
from diskcache_ocr.store import CacheStore

if TYPE_CHECKING:  # (the engine and torch load only for verify's recomputing)
    pass

HEALTH_CODES = ("version_mismatch", "stale_entries", "old_entries", "low_hit_rate",
                "failed_sources", "stale_readers", "corrupt", "incomplete_build")


def read_kinds(header: dict[str, Any]) -> set[str]:
    """The kinds the readers of a cache look up, by the preset each of its pipelines was
    opened with: a kind cached alongside tensors is read only to build them (the images of
    ``validation_optimized``). Every kind where a preset is unknown here."""
    names = [(p.get("described") or {}).get("preset")
             for p in header.get("pipelines", {}).values()] or [header.get("preset")]
    kinds: set[str] = set()
    for name in names:
        try:
            cached = set(cache_plan(name).cached) if isinstance(name, str) else None
        except (CacheError, OSError, ValueError):
            cached = None
        if cached is None:
            return set(KINDS)
        kinds |= cached - {"images"} if "tensors" in cached else cached
    return kinds


@dataclass
class Finding:
    """One health finding: a code from HEALTH_CODES and what was found."""
    code: str
    detail: str

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "detail": self.detail}


def health(
    cache_dir: str | os.PathLike[str], *, images_dir: str | os.PathLike[str] | None = None,
    max_age_days: float = 7.0, min_hit_rate: float = 0.5, min_reads: int = 20,
    records: bool = False,
) -> dict[str, Any]:
    """Findings about a cache; ``ok`` is False when any problem was found.

    It reads the header, the index and the trees' own counts, not the records
    (``records=True`` also parses every record's header, which reads the whole cache;
    :func:`verify` checks their payloads too).
    """
    problems: list[Finding] = []
    try:
        store = CacheStore(existing_cache(cache_dir))
        header = store.header()
    except CacheFormatError as exc:
        return {"ok": False, "problems": [Finding("corrupt", str(exc)).to_dict()]}
    with store:
        stored, current = kind_versions(header)
        for kind, have in stored.items():
            if kind in current and have != current[kind]:
                problems.append(Finding("version_mismatch",
                                        f"{kind}: stored {have}, current {current[kind]}"))
        incomplete = incomplete_build(header)
        if incomplete:
            problems.append(Finding("incomplete_build", incomplete))
        if store.unsynced_reboot():
            problems.append(Finding("corrupt", "written without fsync before the last reboot: "
                                    "an OS crash may have damaged it; run verify or rebuild"))
        stale, failed, old = [], [], 0
        cutoff = time.time_ns() - int(max_age_days * 86400e9)
        try:
            index = list(store.iter_index())
        except CacheFormatError as exc:
            problems.append(Finding("corrupt", str(exc)))
            index = []
        for source, entry in index:
            # (each source is known by its own path: every dataset sharing the cache is judged)
            state = source_state(None, source, entry)
            if state:
                stale.append(f"{source} ({state})")
            if not entry.ok:
                failed.append(f"{source}: {entry.status.removeprefix('failed: ')}")
            if entry.updated_ns and entry.updated_ns < cutoff:
                old += 1
        if stale:
            problems.append(Finding("stale_entries", f"{len(stale)} sources changed or missing: "
                                    + _some(stale)))
        if failed:
            problems.append(Finding("failed_sources", f"{len(failed)} sources failed: "
                                    + _some(failed)))
        if old:
            problems.append(Finding("old_entries",
                                    f"{old} entries older than {max_age_days:g} days"))
        try:
            stats = store.stats()
        except CacheFormatError as exc:  # a damaged file: report it, keep looking
            problems.append(Finding("corrupt", str(exc)))
            stats = {}
        for kind in sorted(read_kinds(header), key=KINDS.index):
            hits, total = reads(stats, kind)
            # (a miss that wrote a record still here is the cache being filled: a prebuild's
            # own lookups, or a first epoch; what misses beyond that is recomputed again)
            fills = min(total - hits, store.kind_stats(kind)["entries"])
            judged = total - fills
            if judged >= min_reads and hits / judged < min_hit_rate:
                problems.append(Finding("low_hit_rate", f"{kind}: {hits}/{judged} reads "
                                        f"hit ({100 * hits / judged:.0f}%), not counting the "
                                        f"{fills} that first wrote its records"))
        freed = store.reader_check()
        if freed:
            problems.append(Finding("stale_readers",
                                    f"{freed} reader slots of dead processes (now freed)"))
        corrupt = []
        for kind in KINDS:
            try:
                if records:
                    corrupt += [f"{kind}/{key.hex()[:16]}: {exc}"
                                for key, exc in _check_headers(store, kind) if exc]
                else:
                    _check_tree_ends(store, kind)
            except CacheFormatError as exc:  # the kind's tree itself is damaged
                corrupt.append(f"{kind}: {exc}")
        if corrupt:
            problems.append(Finding("corrupt", f"{len(corrupt)} damaged records: "
                                    + _some(corrupt)))
    return {"ok": not problems, "problems": [p.to_dict() for p in problems]}


def _some(items: list[str], n: int = 5) -> str:
    return "; ".join(items[:n]) + (f"; … {len(items) - n} more" if len(items) > n else "")


def _check_tree_ends(store: CacheStore, kind: str) -> None:
    """Walk a kind's tree to its first and last key: its root and the pages on those two
    paths are read (a damaged one raises CacheFormatError), no record is."""
    with store.lookups(), store.reader() as r:
        cursor = r.cursor(kind)
        cursor.first()
        cursor.last()


def _check_headers(store: CacheStore, kind: str) -> Iterable[tuple[bytes, Exception | None]]:
    """Parse each record's header (cheap: no payload is read)."""
    for key, value in store.iter_raw(kind):
        try:
            parse_header(value, f"{kind}/{key.hex()}")
        except CacheFormatError as exc:
            yield key, exc
        else:
            yield key, None

