"""What a cache holds: its status, the pipelines that wrote it, how complete its last build
is, and the report ``export`` writes."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diskcache_ocr.errors import CacheError
from diskcache_ocr.ocr.conventions import conventions
from diskcache_ocr.ocr.pipeline import Pipeline
from diskcache_ocr.ocr.staged import images_version
from diskcache_ocr.schema import (
    KINDS,
    IndexEntry,
    KindVersion,
    format_hit_rates,
    pipeline_id,
    reads,
    record_name,
)
from diskcache_ocr.store import CacheStore
from diskcache_ocr.store.remove import has_cache

if TYPE_CHECKING:  # (the engine and torch load only for verify's recomputing)
    pass

def existing_cache(cache_dir: str | os.PathLike[str]) -> Path:
    path = Path(cache_dir)
    if not (path / "data.mdb").exists():
        raise CacheError(f"{path}: no cache here (no data.mdb)")
    return path


def stored_pipeline(header: dict[str, Any]) -> Pipeline:
    """The pipeline a cache was built with (from its header), else the default one."""
    return Pipeline.from_params(header.get("pipeline") or {})


# The version a user pipeline's stages stamp on the tensors and maps kinds they write.
STAGES_VERSION = "stage"


def kind_versions(header: dict[str, Any]) -> tuple[dict[str, KindVersion], dict[str, KindVersion]]:
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
        stored, current = kind_versions(header)
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


def live_names(header: dict[str, Any]) -> set[str]:
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

