"""The commands of ``diskcache-ocr``: each calls the library once and prints its result as a
table for people or JSON (``--json``) for machines."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from diskcache_ocr.store.remove import has_cache

EXIT_PROBLEMS = 1
EXIT_ERROR = 2


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [list(map(str, header))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _emit(args: argparse.Namespace, data: dict[str, Any], human: Callable[[], str]) -> None:
    print(json.dumps(data, indent=2, default=str) if args.json else human())


# -- commands -------------------------------------------------------------------------------
def cmd_status(args: argparse.Namespace) -> int:
    from diskcache_ocr.ops import report
    from diskcache_ocr.schema import format_hit_rates

    data = report(args.cache)["status"]

    def human() -> str:
        if data.get("empty"):
            return f"cache {data['path']}: empty (no cache written here yet)"
        rows = [(k, v["entries"], _human_bytes(v["bytes"]), v["stored_version"] or "-",
                 v["current_version"] or "(the pipeline's own)",
                 {True: "yes", False: "NO", None: "checked on open"}[v["up_to_date"]])
                for k, v in data["kinds"].items()]
        m, h = data["map"], data["header"]
        build = h.get("build") or {}
        return "\n".join([
            f"cache {data['path']}  (format {h.get('format')}, library {h.get('library')}, "
            f"engine {h.get('engine')}, preset {h.get('preset', '-')})",
            f"pipeline: {data['pipeline']['line']}",
            _table(rows, ["kind", "entries", "bytes", "stored version", "current version",
                          "up to date"]),
            f"sources indexed: {data['index']['sources']} ({data['index']['failed']} failed)",
            f"map: {_human_bytes(m['used_bytes'])} used of {_human_bytes(m['map_size'])}, "
            f"{m['readers']} readers of {m['max_readers']}",
            f"last build: {_last_build(build, data.get('completeness'))}",
            f"reads: {format_hit_rates(data['stats'])}",
        ])

    _emit(args, data, human)
    return 0


def _last_build(build: dict[str, Any], done: dict[str, Any] | None) -> str:
    """The status line of the last prebuild: finished, and whether its split is whole."""
    if done is None or not done["finished"]:
        return "unfinished (run the same prebuild again)" if build else "none"
    nodes = f" on {done['nodes']} nodes" if (done.get("nodes") or 1) > 1 else ""
    if done["complete"] is None:
        return f"clean{nodes}"
    if done["complete"]:
        return f"clean{nodes}, complete ({done['images']} images of its split)"
    return (f"clean{nodes}, INCOMPLETE: {done['missing']} of {done['images']} images of its "
            "split missing (run the same prebuild again)")


def cmd_health(args: argparse.Namespace) -> int:
    from diskcache_ocr.ops import health

    if has_cache(args.cache):
        data = health(args.cache, images_dir=args.images, max_age_days=args.max_age_days,
                      records=args.records)
    else:
        data = {"ok": True, "empty": True, "problems": []}

    def human() -> str:
        if data.get("empty"):
            return f"healthy: {args.cache} (empty: no cache written here yet)"
        if data["ok"]:
            return f"healthy: {args.cache}"
        return "\n".join([f"problems in {args.cache}:",
                          _table([(p["code"], p["detail"]) for p in data["problems"]],
                                 ["code", "detail"])])

    _emit(args, data, human)
    return 0 if data["ok"] else EXIT_PROBLEMS


def cmd_clear(args: argparse.Namespace) -> int:
    from diskcache_ocr.ops import clear
    from diskcache_ocr.store.remove import remove_cache

    if args.all:  # the origin's meaning: the cache goes, and its disk space with it
        data = remove_cache(args.cache, dry_run=args.dry_run)
    else:
        data = clear(args.cache, kind=args.kind, stale=args.stale, dry_run=args.dry_run,
                     images_dir=args.images)

    def human() -> str:
        verb = "would remove" if data["dry_run"] else "removed"
        parts = [f"{v if not isinstance(v, list) else len(v)} {k}"
                 for k, v in data["removed"].items()]
        if data.get("files"):
            parts.append(f"{len(data['files'])} files ({_human_bytes(data['freed_bytes'])} "
                         f"{'to free' if data['dry_run'] else 'freed'})")
        where = f" at {args.cache}" if args.all else ""
        return f"{verb}: {', '.join(parts) or 'nothing'}{where}"

    _emit(args, data, human)
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    from diskcache_ocr.configcheck import check_config_file

    data = check_config_file(args.config)

    def human() -> str:
        lines = [f"{'valid' if data['ok'] else 'problems in'}: {data['path']}"
                 + (f" (package {data['package']})" if data["package"] else "")]
        lines += [f"  {node}: caches {', '.join(p['caches']) or 'nothing'}; load_maps "
                  f"{'on' if p['load_maps'] else 'off'}" for node, p in data["presets"].items()]
        if data["problems"]:
            lines.append(_table([(p["code"], p["node"], p["detail"]) for p in data["problems"]],
                                ["problem", "node", "detail"]))
        lines += [f"  note ({n['code']}) {n['node']}: {n['detail']}" for n in data["notes"]]
        return "\n".join(lines)

    _emit(args, data, human)
    return 0 if data["ok"] else EXIT_PROBLEMS


def cmd_verify(args: argparse.Namespace) -> int:
    from diskcache_ocr.ops import verify

    if args.config is not None:
        return cmd_check_config(args)
    if args.config_name is not None:
        from diskcache_ocr.hydra_app import DEFAULT_NODE
        from diskcache_ocr.ops import verify_config_dataset

        data = verify_config_dataset(args.config_dir, args.config_name, args.overrides,
                                     node=args.node or DEFAULT_NODE, cache_dir=args.cache,
                                     sample=args.sample, recompute=args.recompute)
    elif args.overrides:
        raise ValueError(f"unexpected arguments {' '.join(args.overrides)} (Hydra overrides "
                         "go with --config-name)")
    else:
        data = verify(args.cache, sample=args.sample, recompute=args.recompute,
                      images_dir=args.images, annotations=args.annotations)

    def human() -> str:
        lines = [f"checked {data['checked']} records: {len(data['corrupt'])} corrupt, "
                 f"{len(data['mismatched'])} differ from a fresh computation "
                 f"({data['recomputed']} sources recomputed)"]
        lines += [f"  corrupt: {c}" for c in data["corrupt"]]
        lines += [f"  mismatch: {m}" for m in data["mismatched"]]
        return "\n".join(lines)

    _emit(args, data, human)
    return EXIT_PROBLEMS if data["corrupt"] or data["mismatched"] else 0


def cmd_export(args: argparse.Namespace) -> int:
    from diskcache_ocr.ops import report

    if args.output and args.path and args.output != args.path:
        raise ValueError(f"two output files given ({args.path} and --output {args.output}); "
                         "give one")
    path = args.output or args.path or Path("cache_stats.json")
    out = report(args.cache)
    path.write_text(json.dumps(out, indent=2, default=str) + "\n", encoding="utf-8")
    _emit(args, {"path": str(path)}, lambda: f"wrote status and statistics to {path}")
    return 0


def cmd_copy(args: argparse.Namespace) -> int:
    from diskcache_ocr.ops import copy

    data = copy(args.cache, args.dest)
    _emit(args, data, lambda: f"copied {data['source']} -> {data['dest']} "
                              f"({_human_bytes(data['bytes'])}, free pages left out)")
    return 0


def _build_lines(summary: Any) -> list[str]:
    lines = [summary.line()]
    if summary.nodes > 1 and summary.rank == 0:  # (every rank's share of the job, once)
        lines += [f"  rank {r['rank']} (node {r['node_index']}): {r['built']} built, "
                  f"{r['received']} received ({r['received_records']} records)"
                  for r in summary.ranks]
    lines += [f"  failed: {s}: {r}" for s, r in summary.failed[:20]]
    if len(summary.failed) > 20:
        lines.append(f"  … {len(summary.failed) - 20} more (see `health`)")
    return lines


def cmd_prebuild(args: argparse.Namespace) -> int:
    if args.config_name is not None:
        return _prebuild_hydra(args)
    if args.images is None or args.overrides:
        raise ValueError("give --images DIR (and --annotations FILE), or --config-name NAME "
                         "(and Hydra overrides) to build what a config's dataset reads")
    from diskcache_ocr.prebuild import prebuild

    summary = prebuild(args.images, args.annotations, args.cache,
                       preset=args.preset or "validation_optimized", workers=args.workers,
                       split=args.split or "val", progress=not args.json,
                       allow_random_tensor_cache=args.allow_random_tensor_cache, dedicated=True)
    _emit(args, summary.to_dict(), lambda: "\n".join(_build_lines(summary)))
    return 0


def _prebuild_hydra(args: argparse.Namespace) -> int:
    given = [f for f, v in (("--images", args.images), ("--annotations", args.annotations),
                            ("--preset", args.preset), ("--split", args.split)) if v]
    if given:
        raise ValueError(f"{', '.join(given)}: with --config-name the config says where the "
                         "images are and what is cached (change it with overrides, e.g. "
                         "data/performance_preset=validation_optimized)")
    from diskcache_ocr.prebuild import DEFAULT_NODE, prebuild_hydra

    built = prebuild_hydra(args.config_dir, args.config_name, args.overrides,
                           nodes=args.node or [DEFAULT_NODE], workers=args.workers,
                           rebuild=args.rebuild, progress=not args.json, cache_dir=args.cache)
    data = [{"node": node, "cache": str(cache), **summary.to_dict()}
            for node, cache, summary in built]

    def human() -> str:
        lines = []
        for node, cache, summary in built:
            lines.append(f"{node} -> {cache}:")
            lines += ["  " + line for line in _build_lines(summary)]
        return "\n".join(lines)

    _emit(args, {"nodes": data}, human)
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    import signal
    import threading

    from diskcache_ocr.watch import Watcher, run

    stop = threading.Event()

    def say(line: str) -> None:
        print(line, flush=True)  # a supervisor reading a pipe should see it now

    def started(w: Watcher) -> None:
        extra = f" and {w.annotations}" if w.annotations is not None else ""
        say(f"watch: {w.mode}, watching {w.images_dir}{extra} for {w.store.path}; "
            f"{w.summary.reconciled} stale at start; Ctrl-C to stop")

    # NOTE: signal handlers can only be installed from the main thread (ValueError otherwise).
    previous = {s: signal.signal(s, lambda *_: stop.set())
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        summary = run(args.cache, args.images, args.annotations, stop=stop, started=started,
                      polling=True if args.polling else None, debounce_s=args.debounce)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    say(summary.line())
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from diskcache_ocr.synth import synthesize

    s = synthesize(args.out, args.n, split=args.split, seed=args.seed, workers=args.workers)
    data = {"root": str(s.root), "split": s.split, "images": s.images, "words": s.words,
            "exif_rotated": s.exif_rotated, "annotation_file": str(s.annotation_file)}
    _emit(args, data, lambda: f"wrote {s.images} images ({s.words} words, {s.exif_rotated} with "
                              f"an EXIF orientation) to {s.root}/images/{s.split} and "
                              f"{s.annotation_file}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from diskcache_ocr.demo import run_demo

    run_demo(Path(args.dir), n=args.n, workers=args.workers)
    return 0

