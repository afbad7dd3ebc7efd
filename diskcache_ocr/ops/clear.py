"""Removing from a cache (everything, one kind, or stale entries) and copying it."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diskcache_ocr.errors import CacheError, CacheFormatError
from diskcache_ocr.ops.status import existing_cache, live_names
from diskcache_ocr.schema import (
    KINDS,
    dataset_root,
    name_kind,
    source_state,
)
from diskcache_ocr.store import CacheStore, WriteBatch

if TYPE_CHECKING:  # (the engine and torch load only for verify's recomputing)
    pass

def clear(
    cache_dir: str | os.PathLike[str], *, all: bool = False, kind: str | None = None,
    stale: bool = False, dry_run: bool = False, images_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Remove everything, one kind, or stale entries (and records nothing refers to)."""
    if sum([all, kind is not None, stale]) != 1:
        raise ValueError("choose exactly one of all, kind, stale")
    path = existing_cache(cache_dir)
    if all:
        return _clear_all(path, dry_run)
    with CacheStore(path) as store:
        if kind is not None:
            if kind not in KINDS:
                raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
            n = store.kind_stats(kind)["entries"]
            if not dry_run:
                store.drop(kind)
            return {"dry_run": dry_run, "removed": {kind: n}}
        return _clear_stale(store, images_dir, dry_run)


def _clear_all(path: Path, dry_run: bool) -> dict[str, Any]:
    try:
        with CacheStore(path) as store:
            counts = {k: store.kind_stats(k)["entries"] for k in KINDS}
            counts["index"] = len(list(store.iter_index()))
            if not dry_run:
                store.empty()
                store.update_header(kinds={}, build={}, pipelines={}, plain={})
        return {"dry_run": dry_run, "removed": counts}
    except CacheFormatError as exc:
        # A damaged or foreign file: remove the two LMDB files (nothing else) so the next
        # run starts clean.
        files = [p for p in (path / "data.mdb", path / "lock.mdb") if p.exists()]
        if not dry_run:
            for p in files:
                p.unlink()
        return {"dry_run": dry_run, "removed": {"files": [str(p) for p in files]},
                "reason": str(exc)}


def _clear_stale(store: CacheStore, images_dir: str | os.PathLike[str] | None, dry_run: bool
                 ) -> dict[str, Any]:
    header = store.header()
    root = dataset_root(header, images_dir)
    if root is None:
        raise CacheError(f"{store.path}: no dataset root recorded; pass the images directory")
    if not root.is_dir():  # a mistyped or unmounted root would make every entry "missing"
        raise CacheError(f"{root}: the images directory does not exist; nothing was removed")
    index = list(store.iter_index())
    # Each source is judged by its own path; with an images directory, only its sources.
    under = os.path.join(os.path.realpath(images_dir), "") if images_dir else ""
    stale = [(s, e) for s, e in index if s.startswith(under) and source_state(None, s, e)]
    gone = {s for s, _ in stale}
    # A record is live while a kept entry names it by a name some registered pipeline
    # reads (the records of a retired pipeline are not, nor names no pipeline holds).
    names = live_names(header)
    kept = [(s, e) for s, e in index if s not in gone]
    live = {(name_kind(n), key) for _, e in kept for n, key in e.keys.items() if n in names}
    if "images" in names:  # (images of the plain decode are found by content alone)
        live |= {("images", e.content_hash) for _, e in kept}
    orphans = {k: [key for key in store.keys(k) if (k, key) not in live] for k in KINDS}
    renamed = [(s, replace(e, keys={n: key for n, key in e.keys.items() if n in names}))
               for s, e in kept if any(n not in names for n in e.keys)]
    if not dry_run:
        batch = WriteBatch()
        for source, entry in renamed:
            batch.put_index(source, entry)
        for source, _ in stale:
            batch.delete_index(source)
        for kind, keys in orphans.items():
            for key in keys:
                batch.delete(kind, key)
        store.commit(batch)
    return {"dry_run": dry_run, "removed": {"index": len(stale),
                                             **{k: len(v) for k, v in orphans.items()}},
            "stale_sources": [s for s, _ in stale]}


def copy(cache_dir: str | os.PathLike[str], dest: str | os.PathLike[str]) -> dict[str, Any]:
    """A consistent copy of a cache without its free pages, safe while readers and writers
    run."""
    # Check the source first: a missing cache must not leave an empty destination behind.
    with CacheStore(existing_cache(cache_dir), readonly=True) as store:
        out = store.copy_to(dest, drop_free_pages=True)
    size = (out / "data.mdb").stat().st_size
    return {"source": str(Path(cache_dir)), "dest": str(out), "bytes": size}
