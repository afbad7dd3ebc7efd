"""Operations on a built cache: status, health, clear, verify, copy.

Each returns plain data (dicts and lists) for the command line to print as a table or JSON;
findings are values, never prints.
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from diskcache_ocr.codec import decode_record, parse_header, verify_checksum
from diskcache_ocr.errors import CacheError, CacheFormatError, SourceError
from diskcache_ocr.hydra_app import DEFAULT_NODE
from diskcache_ocr.keys import content_hash
from diskcache_ocr.ocr.annotations import (
    AnnotationSet,
    ImageAnnotation,
    load_annotations,
)
from diskcache_ocr.ocr.conventions import conventions
from diskcache_ocr.ocr.decode import read_image_file
from diskcache_ocr.ocr.maps import MapConfig
from diskcache_ocr.ocr.pipeline import Pipeline
from diskcache_ocr.ocr.staged import images_version
from diskcache_ocr.ocr.transform import TransformConfig
from diskcache_ocr.paths import default_cache_dir  # noqa: F401 - its home before paths.py
from diskcache_ocr.presets import cache_plan
from diskcache_ocr.schema import (
    KINDS,
    IndexEntry,
    KindVersion,
    dataset_root,
    format_hit_rates,
    name_kind,
    pipeline_id,
    reads,
    record_name,
    source_id,
    source_state,
)
from diskcache_ocr.store import CacheStore, WriteBatch
from diskcache_ocr.store.wipe import has_cache

if TYPE_CHECKING:  # (the engine and torch load only for verify's recomputing)
    from diskcache_ocr.readthrough import ReadThrough

HEALTH_CODES = ("version_mismatch", "stale_entries", "old_entries", "low_hit_rate",
                "failed_sources", "stale_readers", "corrupt", "incomplete_build")


def _existing(cache_dir: str | os.PathLike[str]) -> Path:
    path = Path(cache_dir)
    if not (path / "data.mdb").exists():
        raise CacheError(f"{path}: no cache here (no data.mdb)")
    return path


def stored_pipeline(header: dict[str, Any]) -> Pipeline:
    """The pipeline a cache was built with (from its header), else the default one."""
    params = header.get("pipeline") or {}
    transform = TransformConfig.from_dict(params["transform"]) if "transform" in params else None
    maps = MapConfig.from_dict(params["maps"]) if "maps" in params else MapConfig()
    return Pipeline(transform=transform or TransformConfig(), maps=maps)


# The version a user pipeline's stages stamp on the tensors and maps kinds they write.
STAGES_VERSION = "stage"


def _versions(header: dict[str, Any]) -> tuple[dict[str, KindVersion], dict[str, KindVersion]]:
    """(stored, current) versions of each kind. A kind whose current version the command line
    cannot know is absent from ``current``: tensors and maps a user pipeline wrote (only that
    pipeline knows its versions; its dataset checks them when it opens)."""
    stored = {k: KindVersion.from_dict(v) for k, v in header.get("kinds", {}).items()}
    current = stored_pipeline(header).kind_versions()
    stage = header.get("stage_pipeline")
    if isinstance(stage, dict) and stage.get("convention") in conventions():
        # (a convention decodes by its own rules: the origin's drops alpha)
        current["images"] = images_version(stage["convention"])
    for kind in ("tensors", "maps"):
        if header.get("stage_pipeline") or (
                kind in stored and stored[kind].version == STAGES_VERSION):
            current.pop(kind)
    return stored, current


def pipeline_of(header: dict[str, Any]) -> dict[str, Any]:
    """Which pipeline wrote a cache's tensors and maps, from its header: ``name`` is
    ``"user"`` (the user's stages, with their descriptions where the header still has them),
    ``"built-in"`` (with its parameters) or None (nothing recorded yet)."""
    stage = header.get("stage_pipeline")
    kinds = header.get("kinds", {})
    if isinstance(stage, dict) and stage:
        out = {"name": "user", **stage,
               "summary": {k: stage_summary(stage.get(k)) for k in ("transform", "maps")}}
    elif any(kinds.get(k, {}).get("version") == STAGES_VERSION for k in ("tensors", "maps")):
        # (a build of the built-in pipeline that cached images only restamped the header)
        unknown = "not recorded (a later build of the built-in pipeline shared its images)"
        out = {"name": "user", "summary": {"transform": unknown, "maps": unknown}}
    elif header.get("pipeline"):
        return {"name": "built-in", **header["pipeline"],
                "line": "built-in (transform and maps of the db convention)"}
    else:
        return {"name": None, "line": "none recorded yet"}
    convention = f"convention {out['convention']}; " if out.get("convention") else ""
    out["line"] = (f"yours ({convention}transform: {out['summary']['transform']}; "
                   f"maps: {out['summary']['maps']})")
    return out


def status(cache_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Entries and bytes per kind, their stored and current versions, the pipeline that
    wrote them, the index, the map and the read counters. ``up_to_date`` is None where the
    current version is the writing pipeline's own business (a user pipeline's kinds)."""
    with CacheStore(cache_dir, readonly=True) as store:
        header = store.header()
        stored, current = _versions(header)
        kinds = {}
        for kind in KINDS:
            entry: dict[str, Any] = dict(store.kind_stats(kind))
            have, want = stored.get(kind), current.get(kind)
            entry["stored_version"] = None if have is None else str(have)
            entry["current_version"] = None if want is None else str(want)
            entry["up_to_date"] = (True if have is None else None if want is None
                                   else have == want)
            kinds[kind] = entry
        index = list(store.iter_index())
        pipelines = pipelines_of(header, index)
        pipeline = pipeline_of(header)
        if len(pipelines) > 1:
            pipeline["line"] = "\n".join([f"{pipeline['line']} (the last opened of "
                                          f"{len(pipelines)} pipelines:)",
                                          *(f"  {p['line']}" for p in pipelines)])
        return {
            "path": str(store.path),
            "header": {k: v for k, v in header.items() if k not in ("kinds", "pipelines")},
            "pipeline": pipeline,
            "pipelines": pipelines,
            "kinds": kinds,
            "index": {"sources": len(index), "failed": sum(not e.ok for _, e in index)},
            "completeness": completeness(header),
            "map": store.info(),
            "stats": store.stats(),
        }


def pipelines_of(header: dict[str, Any], index: Sequence[tuple[str, IndexEntry]]
                 ) -> list[dict[str, Any]]:
    """The pipelines a cache holds, one per role (what a pipeline replaces when it changes:
    images directory, split, output form, convention): its id, the version of each kind it
    caches with the entries the index names for it, when it was first and last used, and a
    ``line`` saying all that in one line."""
    names = Counter(name for _, e in index for name in e.keys)
    out = []
    for role, p in sorted(header.get("pipelines", {}).items()):
        kinds = {k: KindVersion.from_dict(v) for k, v in p.get("kinds", {}).items()}
        per_kind = {kind: {"version": str(v),
                           "entries": names[_name(header, kind, v)]}
                    for kind, v in kinds.items()}
        described = p.get("described") or {}
        what = ("yours" if described.get("stage_pipeline") else
                "built-in" if described.get("pipeline") else "not recorded")
        counts = ", ".join(f"{k} {v['entries']}" for k, v in per_kind.items())
        out.append({"role": role, "id": pipeline_id(kinds), "kinds": per_kind,
                    "pipeline": what, "preset": described.get("preset"),
                    "first_used": p.get("first_used"), "last_used": p.get("last_used"),
                    "line": f"{role}: {what} pipeline {pipeline_id(kinds)} ({counts})"})
    return out


def _name(header: dict[str, Any], kind: str, version: KindVersion) -> str:
    """The index's name of a kind version's records (images of the version keyed by content
    alone keep the plain name)."""
    plain = header.get("plain", {}).get(kind)
    return record_name(kind, version.fingerprint,
                       plain=plain is not None and KindVersion.from_dict(plain) == version)


def _live_names(header: dict[str, Any]) -> set[str]:
    """The names of every record a registered pipeline reaches."""
    live = {_name(header, kind, KindVersion.from_dict(v))
            for p in header.get("pipelines", {}).values()
            for kind, v in p.get("kinds", {}).items()}
    return live | set(header.get("plain", {}))


def completeness(header: dict[str, Any]) -> dict[str, Any] | None:
    """Whether the cache holds its whole split, from what the last prebuild recorded in the
    header (None where no prebuild ran): ``finished`` (the build ended on every rank that
    wrote here), ``complete`` (finished, and no image of the split lacks a record; None for
    a build that predates this record), ``images`` of the split, ``missing`` (a few of them
    in ``missing_some``), and the build's ``world_size`` and ``nodes`` (cache directories)."""
    builds = header.get("builds")
    records = [b for b in builds.values() if isinstance(b, dict) and b] if isinstance(
        builds, dict) else []
    if not records:
        records = [header.get("build")] if isinstance(header.get("build"), dict) else []
    summaries = [_completeness(b) for b in records if b]
    if not summaries:
        return None
    # the builds of every images directory here: an incomplete one is what matters
    return next((c for c in summaries if c["complete"] is False), summaries[-1])


def _completeness(build: dict[str, Any]) -> dict[str, Any]:
    finished = build.get("clean") is True
    missing = build.get("missing") if finished else None
    missing = missing if type(missing) is int else None
    some = build.get("missing_some")
    return {
        "finished": finished,
        "complete": (missing == 0) if finished and missing is not None else (
            False if not finished else None),
        "images": build.get("images"), "missing": missing,
        "missing_some": [str(s) for s in some] if isinstance(some, list) else [],
        "world_size": build.get("world_size"), "nodes": build.get("nodes"),
    }


_REBUILD_HINT = ("run the same prebuild command again (under torchrun: on every node) to "
                 "complete it; it skips what is built")


def incomplete_build(header: dict[str, Any]) -> str | None:
    """A health detail where the last prebuild did not finish or left images of its split
    without records here; None when it is complete (or no prebuild is recorded)."""
    c = completeness(header)
    if c is None or c["complete"] is not False:
        return None
    world = c["world_size"] if type(c["world_size"]) is int else 1
    nodes = c["nodes"] if type(c["nodes"]) is int else 1
    of = f"a build of {world} ranks" + (f" on {nodes} nodes" if nodes > 1 else "")
    if not c["finished"]:
        images = f" of {c['images']} images" if c["images"] is not None else ""
        return (f"the last prebuild ({of}) did not finish: images of its split{images} may "
                f"have no records here; {_REBUILD_HINT}")
    some = f" (e.g. {', '.join(c['missing_some'])})" if c["missing_some"] else ""
    return (f"{c['missing']} of {c['images']} images of the split have no records here"
            f"{some} after {of}; {_REBUILD_HINT}")


def stage_summary(description: Any) -> str:
    """One stage of a user pipeline, as its header describes it, in a few words."""
    if description is None:
        return "not versioned (computed live, never cached)"
    if not isinstance(description, dict):
        return str(description)[:60]
    stage = description.get("stage")
    if stage == "albumentations":
        return f"albumentations Compose ({', '.join(_compose_steps(description))})"
    if stage == "compose-holder":
        inner = description.get("compose") or {}
        name = str(description.get("class", "?")).rsplit(".", 1)[-1]
        return f"{name} holding an albumentations Compose ({', '.join(_compose_steps(inner))})"
    if stage == "callable":
        return f"callable {description.get('name')}, version {description.get('version')!r:.40}"
    if stage == "builtin":
        maker = description.get("maker")
        return f"built-in, {description.get('convention')} convention" + (
            f" ({maker})" if maker else "")
    return f"{stage}"


def _compose_steps(description: dict[str, Any]) -> list[str]:
    """The class names of a Compose's transforms, from its stage fingerprint (the described
    Compose, ``{"class", "state": {"mapping": [[name, value], ...]}}``)."""
    compose = description.get("compose")
    state = compose.get("state", {}) if isinstance(compose, dict) else {}
    fields = dict(state.get("mapping", [])) if isinstance(state, dict) else {}
    steps = fields.get("transforms", [])
    return [str(t.get("class", "?")).rsplit(".", 1)[-1] for t in steps if isinstance(t, dict)]


def empty_status(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What :func:`status` reports where no cache was written yet (its shape, all zero)."""
    current = stored_pipeline({}).kind_versions()
    return {
        "path": str(path), "empty": True, "header": {},
        "pipeline": {"name": None, "line": "none recorded yet"}, "pipelines": [],
        "kinds": {k: {"entries": 0, "bytes": 0, "stored_version": None,
                      "current_version": str(current[k]), "up_to_date": True} for k in KINDS},
        "index": {"sources": 0, "failed": 0},
        "completeness": None,
        "map": {"used_bytes": 0, "map_size": 0, "readers": 0, "max_readers": 0},
        "stats": {},
    }


def report(cache_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The status (:func:`status`, or :func:`empty_status` where there is no cache yet) and
    the read statistics per kind: what ``export`` writes."""
    data = status(cache_dir) if has_cache(cache_dir) else empty_status(cache_dir)
    stats = data["stats"]
    per_kind = {}
    for kind in KINDS:
        hits, total = reads(stats, kind)
        per_kind[kind] = {"hits": hits, "misses": total - hits,
                          "hit_rate": hits / total if total else None}
    return {"status": data, "statistics": {"per_kind": per_kind, "counters": stats,
                                           "summary": format_hit_rates(stats)}}


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
        store = CacheStore(_existing(cache_dir))
        header = store.header()
    except CacheFormatError as exc:
        return {"ok": False, "problems": [Finding("corrupt", str(exc)).to_dict()]}
    with store:
        stored, current = _versions(header)
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
        cursor = r._txn.cursor(r._handles[kind])
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


def clear(
    cache_dir: str | os.PathLike[str], *, all: bool = False, kind: str | None = None,
    stale: bool = False, dry_run: bool = False, images_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Remove everything, one kind, or stale entries (and records nothing refers to)."""
    if sum([all, kind is not None, stale]) != 1:
        raise ValueError("choose exactly one of all, kind, stale")
    path = _existing(cache_dir)
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
                store.wipe()
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
    names = _live_names(header)
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


def verify(
    cache_dir: str | os.PathLike[str], *, sample: int | None = None, recompute: int = 0,
    images_dir: str | os.PathLike[str] | None = None,
    annotations: str | os.PathLike[str] | None = None, seed: int = 0, dataset: Any = None,
) -> dict[str, Any]:
    """Decode (and checksum) every record, or ``sample`` of them per kind; with
    ``recompute``, compare that many sources' records with a fresh computation: by
    ``dataset``'s pipeline when given (a dataset, or its read-through engine: any pipeline,
    a user's own included), else by the built-in pipeline the header records."""
    rng = random.Random(seed)
    checked, corrupt, mismatched = 0, [], []
    with CacheStore(cache_dir, readonly=True) as store:
        header = store.header()
        for kind in KINDS:
            keys = store.keys(kind)
            if sample is not None and sample < len(keys):
                keys = rng.sample(keys, sample)
            for key in keys:
                checked += 1
                with store.reader() as r:
                    value = r.get_raw(kind, key)
                    if value is None:
                        continue
                    try:
                        verify_checksum(value, f"{kind}/{key.hex()}")
                        decode_record(value, f"{kind}/{key.hex()}")
                    except CacheFormatError as exc:
                        corrupt.append(f"{kind}/{key.hex()}: {exc}")
        if recompute and dataset is not None:
            engine = getattr(dataset, "engine", dataset)
            mismatched = _compare(store, engine, _chosen_of(store, engine, recompute, rng),
                                  corrupt)
        elif recompute:
            mismatched = _recompute(store, header, recompute, images_dir, annotations, rng,
                                    corrupt)
    return {"checked": checked, "corrupt": corrupt, "mismatched": mismatched,
            "recomputed": recompute}


def verify_config_dataset(config_dir: str | os.PathLike[str], config_name: str,
                          overrides: Sequence[str] = (), *, node: str = DEFAULT_NODE,
                          cache_dir: str | os.PathLike[str] | None = None,
                          sample: int | None = None, recompute: int = 0) -> dict[str, Any]:
    """:func:`verify` of the cache a Hydra config's dataset node reads, recomputing through
    that dataset's pipeline (see :func:`~diskcache_ocr.hydra_app.config_datasets`; the
    dataset is opened read-only). Adds ``node`` and ``cache`` to the report."""
    from diskcache_ocr.hydra_app import config_datasets

    with config_datasets(config_dir, config_name, overrides, nodes=[node],
                         cache_dir=cache_dir, readonly=True) as made:
        ((_, ds),) = made
        if ds.store is None:
            raise CacheError(f"{node}: its preset {ds.plan.name!r} caches nothing: there is "
                             "no cache to verify")
        return {"node": node, "cache": str(ds.store.path),
                **verify(ds.store.path, sample=sample, recompute=recompute, dataset=ds)}


Chosen = list[tuple[int, str, IndexEntry, bool]]  # (engine index, source, entry, with maps)


def _chosen_of(store: CacheStore, engine: ReadThrough, n: int, rng: random.Random) -> Chosen:
    """``n`` of the dataset's sources that the index holds, at random."""
    catalog = engine.catalog
    ids = {source_id(catalog.images_dir, catalog.source(i)): i for i in range(len(catalog))}
    entries = [(s, e) for s, e in store.iter_index() if e.ok and s in ids]
    return [(ids[s], s, e, True) for s, e in rng.sample(entries, min(n, len(entries)))]


def _recompute(store: CacheStore, header: dict[str, Any], n: int,
               images_dir: str | os.PathLike[str] | None,
               annotations: str | os.PathLike[str] | None, rng: random.Random,
               corrupt: list[str]) -> list[str]:
    if header.get("stage_pipeline"):
        raise CacheError(f"{store.path}: built by a user pipeline (convention/transform/maps "
                         "stages) that the header alone cannot rebuild; recompute through its "
                         "dataset: `verify --recompute N --config-name NAME` from its Hydra "
                         "tree, or `ops.verify(cache, recompute=N, dataset=ds)` (verify "
                         "without --recompute checks every record)")
    root = dataset_root(header, images_dir) or Path(".")
    words = {}
    if annotations is not None:
        words = {source_id(root, it.file): it for it in load_annotations(root, annotations).items}
    entries = [(s, e) for s, e in store.iter_index() if e.ok]
    chosen = rng.sample(entries, min(n, len(entries)))
    # Sources without an annotation are checked without words (and without maps).
    items = tuple(words.get(s) or ImageAnnotation(os.path.basename(s), (), (), ())
                  for s, _ in chosen)
    from diskcache_ocr.readthrough import ReadThrough
    from diskcache_ocr.samples import Catalog

    engine = ReadThrough(Catalog(AnnotationSet(root, items, ())), stored_pipeline(header),
                         cache_plan("none"), None)
    return _compare(store, engine, [(i, s, e, s in words) for i, (s, e) in enumerate(chosen)],
                    corrupt)


def _compare(store: CacheStore, engine: ReadThrough, chosen: Chosen, corrupt: list[str]
             ) -> list[str]:
    """Each chosen source's records, computed afresh by ``engine``, against the cached ones:
    the fields that differ (a damaged record is added to ``corrupt`` instead)."""
    mismatched = []
    for index, source, entry, with_maps in chosen:
        try:
            data = read_image_file(source, source)
        except (OSError, SourceError):
            continue  # a missing source is health's business, not a mismatch
        if content_hash(data) != entry.content_hash:
            continue  # changed since it was cached: stale, not wrong
        fresh = engine.recompute(index, data, with_maps=with_maps)
        for kind, (key, arrays) in fresh.items():
            try:
                cached = store.get(kind, key)
            except CacheFormatError as exc:  # damaged: report it, do not stop the check
                label = f"{kind}/{key.hex()}"
                if not any(c.startswith(label + ":") for c in corrupt):
                    corrupt.append(f"{label}: {exc}")
                continue
            if cached is None:
                continue
            for name, arr in arrays.items():
                if name not in cached or cached[name].tobytes() != np.ascontiguousarray(
                        arr).tobytes() or cached[name].dtype != arr.dtype:
                    mismatched.append(f"{source} {kind}.{name}")
    return mismatched


def copy(cache_dir: str | os.PathLike[str], dest: str | os.PathLike[str]) -> dict[str, Any]:
    """A compact, consistent copy of a cache, safe while readers and writers run."""
    # Check the source first: a missing cache must not leave an empty destination behind.
    with CacheStore(_existing(cache_dir), readonly=True) as store:
        out = store.copy_to(dest, compact=True)
    size = (out / "data.mdb").stat().st_size
    return {"source": str(Path(cache_dir)), "dest": str(out), "bytes": size}
