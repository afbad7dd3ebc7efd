"""The kind versions of the pipelines in one cache: registering a pipeline (its role and the
versions of the kinds it caches) and applying the version policy to what it finds, without
touching other pipelines' records."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import lmdb

from diskcache_ocr.errors import CacheFormatError, CacheVersionError
from diskcache_ocr.schema import IndexEntry, KindVersion, name_kind, record_name
from diskcache_ocr.store.header import (
    HEADER_KEY,
    LEGACY_ROLE,
    POLICIES,
    Policy,
    pack_header,
    unpack_header,
)
from diskcache_ocr.store.txn import check_kind


class VersionedStore(Protocol):
    """What this module needs of a store (the store itself calls in here, so it is named
    by what it offers rather than imported)."""

    path: Path

    @property
    def readonly(self) -> bool: ...

    def header(self) -> dict[str, Any]: ...

    def write_raw(self, body: Callable[[lmdb.Transaction, Mapping[str, Any]], None]) -> None:
        ...

log = logging.getLogger("diskcache_ocr.store")

# The role of a cache opened by :meth:`CacheStore.check_kinds` (one pipeline per cache).
DEFAULT_ROLE = "default"


class PipelineOpen(NamedTuple):
    """What :meth:`CacheStore.open_pipeline` did: the kinds rebuilt empty, and (policy
    ``ignore``) the stored version of each kind served as it is."""

    rebuilt: list[str]
    stored: dict[str, KindVersion]


def _forget_records(txn: lmdb.Transaction, db: Mapping[str, Any], whole: set[str],
                    retired: set[str], path: Path) -> None:
    """Delete the records the index names by a ``retired`` name and by no other name, and
    take those names (and every name of a ``whole`` kind, already dropped) out of the
    entries."""
    index = db["index"]
    rows = [(bytes(k), bytes(v)) for k, v in txn.cursor(index)]
    doomed: dict[str, set[bytes]] = {}
    live: set[tuple[str, bytes]] = set()
    changed = []
    for source, raw in rows:
        try:
            entry = IndexEntry.unpack(raw, f"{path} index {source!r:.80}")
        except CacheFormatError:
            continue
        kept = {}
        for name, key in entry.keys.items():
            kind = name_kind(name)
            if name in retired:
                doomed.setdefault(kind, set()).add(key)
            elif kind not in whole:
                kept[name] = key
                live.add((kind, key))
        if len(kept) != len(entry.keys):
            changed.append((source, replace(entry, keys=kept)))
    for source, entry in changed:
        txn.put(source, entry.pack(), db=index)
    for kind, keys in doomed.items():
        for key in keys - {k for c, k in live if c == kind}:
            txn.delete(key, db=db[kind])



def open_pipeline(
    store: VersionedStore, role: str, expected: Mapping[str, KindVersion],
    policy: Policy = "error", *,
    plain: Mapping[str, KindVersion] | None = None,
    described: Mapping[str, Any] | None = None,
) -> PipelineOpen:
    """Register the pipeline of ``role`` (what it replaces when it changes: the caller's
    business) with the versions of the kinds it caches, and apply ``policy`` to a kind
    whose version differs from the one this role holds: ``error`` raises
    :class:`CacheVersionError`; ``rebuild`` drops only that role's old records (every
    record of the kind when no other role holds the kind; else the records the index
    names for the old version and for no version another role holds); ``ignore`` logs
    and keeps the stored versions (returned in ``stored``, to look records up by).

    Other roles' pipelines are left alone: records of several pipelines live side by
    side, named in the index by kind and version. A kind new to the role is stamped.
    ``plain``: the version whose records of a kind are keyed by content alone (the
    same for every pipeline); another version recorded there is a mismatch of that
    kind's plain records, by the same policy (a cache upgraded from format 2 has them
    dropped whatever the policy: they were keyed by content whatever made them).
    ``described``: plain data about the pipeline, recorded with it.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    for kind in expected:
        check_kind(kind)
    header = store.header()
    pipelines = header.get("pipelines", {})
    held = {k: KindVersion.from_dict(v)
            for k, v in pipelines.get(role, {}).get("kinds", {}).items()}
    if not held and LEGACY_ROLE in pipelines and role != LEGACY_ROLE:
        legacy = {k: KindVersion.from_dict(v)
                  for k, v in pipelines[LEGACY_ROLE].get("kinds", {}).items()}
        if all(legacy.get(k, v) == v for k, v in expected.items()):
            held = legacy  # the upgraded cache's pipeline is this one: it takes it over
    mismatched = {k: (held[k], want) for k, want in expected.items()
                  if k in held and held[k] != want}
    plain_stored = header.get("plain", {})
    plain_changed = {k: v for k, v in (plain or {}).items()
                     if k in plain_stored and KindVersion.from_dict(plain_stored[k]) != v}
    upgraded = {k for k in plain_changed if plain_stored[k].get("upgraded")}
    if policy == "error" and (mismatched or set(plain_changed) - upgraded):
        if mismatched:
            kind, (have, want) = next(iter(mismatched.items()))
            what = f"kind {kind!r} of the pipeline of role {role!r} was built by {have}"
        else:
            kind = next(k for k in plain_changed if k not in upgraded)
            have, want = KindVersion.from_dict(plain_stored[kind]), plain_changed[kind]
            what = f"kind {kind!r} (records keyed by content) was built by {have}"
        raise CacheVersionError(
            f"{store.path}: {what}, this code expects {want}; open with "
            "on_mismatch='rebuild' or run prebuild to rebuild it (the records of other "
            "pipelines in this cache are kept)"
        )
    stored = {k: held[k] for k in mismatched} if policy == "ignore" else {}
    if policy == "ignore":
        for kind, (have, want) in mismatched.items():
            log.warning("%s: serving %s built by %s (expected %s): policy 'ignore'",
                        store.path, kind, have, want)
        for kind in set(plain_changed) - upgraded:
            log.warning("%s: serving %s keyed by content, built by %s (expected %s): "
                        "policy 'ignore'", store.path, kind, plain_stored[kind]["version"],
                        plain_changed[kind])
        served = set(plain_changed) - upgraded
        mismatched, plain_changed = {}, {k: plain_changed[k] for k in upgraded}
    else:
        served = set()
    if store.readonly:
        if plain_changed:
            kind = next(iter(plain_changed))
            raise CacheVersionError(
                f"{store.path}: kind {kind!r} (records keyed by content, from a cache of "
                "an earlier format) was built by another version; open it read-write "
                "once to rebuild them")
        return PipelineOpen([], stored)
    rebuilt = list(dict.fromkeys([*mismatched, *plain_changed]))
    now = time.time()

    def body(txn: lmdb.Transaction, dbs: Mapping[str, Any]) -> None:
        meta = dbs["meta"]
        raw = txn.get(HEADER_KEY, db=meta)
        header = unpack_header(raw, store.path) if raw is not None else {}
        pipelines = {r: dict(p) for r, p in header.get("pipelines", {}).items()}
        entry = pipelines.get(role) or {"first_used": now}
        if not entry.get("kinds") and LEGACY_ROLE in pipelines and held:
            taken = pipelines.pop(LEGACY_ROLE)
            entry = {**entry, "first_used": taken.get("first_used", now)}
        kinds = {**{k: v.to_dict() for k, v in held.items()}, **entry.get("kinds", {})}
        others = {r: p.get("kinds", {}) for r, p in pipelines.items() if r != role}
        plain_now = dict(header.get("plain", {}))
        whole = set(plain_changed)
        retired: set[str] = set()
        for kind, (have, _) in mismatched.items():
            if not any(kind in k for k in others.values()):
                whole.add(kind)
            elif not any(KindVersion.from_dict(k[kind]) == have
                         for k in others.values() if kind in k):
                retired.add(record_name(kind, have.fingerprint))
        for kind in whole:
            txn.drop(dbs[kind], delete=False)
        if whole or retired:
            _forget_records(txn, dbs, whole, retired, store.path)
        for kind in expected:
            if kind in mismatched or kind not in kinds or kind in whole:
                kinds[kind] = expected[kind].to_dict()
            if kind in stored:
                kinds[kind] = stored[kind].to_dict()
        for kind, version in (plain or {}).items():
            if kind not in served:  # (also takes off the mark of an upgrade)
                plain_now[kind] = version.to_dict()
        entry.update(kinds=kinds, last_used=now)
        if described is not None and not stored:
            entry["described"] = dict(described)
        pipelines[role] = entry
        header.update(pipelines=pipelines, plain=plain_now, kinds=kinds)
        txn.put(HEADER_KEY, pack_header(header), db=meta)

    store.write_raw(body)
    for kind in rebuilt:
        log.warning("%s: kind %s of role %r rebuilt for version %s", store.path, kind, role,
                    expected.get(kind) or (plain or {}).get(kind))
    return PipelineOpen(rebuilt, stored)


__all__ = ["DEFAULT_ROLE", "PipelineOpen", "open_pipeline"]
