"""The ``diskcache-ocr`` command line: thin wrappers over the library.

Each command parses its arguments, makes one library call, and prints a table for people or
JSON (``--json``) for machines. A ``CacheError`` becomes one readable line and exit code 2
(``--debug`` shows the traceback); ``health`` exits 1 when it finds problems.

The origin project's ``scripts/cache_manager.py`` habits work too: ``--cache`` before or after
the command, ``-v``, ``validate`` for ``verify``, ``validate --config FILE`` (checks a preset or
dataset config YAML), ``clear --type tensor`` for ``--kind``, ``export --output FILE`` (or
``export FILE``; default ``cache_stats.json``), and ``status`` / ``health`` on a directory with
no cache yet (an empty, healthy report, exit 0, nothing created).

Every command works on every cache, whichever pipeline wrote it (the built-in one or a user's
stages); ``prebuild`` and ``verify`` also take a Hydra app's config (``--config-name NAME
[--config-dir DIR] [--node NODE] [OVERRIDE ...]``) to build or recompute exactly what its
dataset node reads.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from diskcache_ocr.errors import CacheError
from diskcache_ocr.store import KINDS
from diskcache_ocr.store.wipe import has_cache

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
    from diskcache_ocr.store.wipe import wipe

    if args.all:  # the origin's meaning: the cache goes, and its disk space with it
        data = wipe(args.cache, dry_run=args.dry_run)
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
                              f"({_human_bytes(data['bytes'])}, compacted)")
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


# -- parser ---------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (what was wrong, with the value) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see --help)\n")


class _TopParser(_Parser):
    """Fills the cache directory's default after parsing: a default set by the command's own
    parser would replace a ``--cache`` given before the command."""

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        from diskcache_ocr.ops import default_cache_dir

        ns, rest = super().parse_known_args(args, namespace)
        if getattr(ns, "uses_cache", False) and ns.cache is None:
            ns.cache = default_cache_dir()
        return ns, rest


def _finite_at_least_zero(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _kind_name(text: str) -> str:
    """``images|tensors|maps``; the origin's singular ``image|tensor|map`` too."""
    return text if text in KINDS or text + "s" not in KINDS else text + "s"


def _preset_arg(text: str) -> str:
    """A preset checked where it is given, so a bad file is one error line before any work
    (the command loads it again once logging is set up, to report what it ignores)."""
    from diskcache_ocr.presets import load_preset

    try:
        load_preset(text)
    except CacheError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _hydra_arguments(p: argparse.ArgumentParser, node_help: str, repeat: bool) -> None:
    """--config-name, --config-dir, --node and the overrides: a Hydra app's dataset node."""
    p.add_argument("--config-name", metavar="NAME",
                   help="Hydra primary config (e.g. train) whose dataset node to use")
    p.add_argument("--config-dir", type=Path, default=Path("configs"), metavar="DIR",
                   help="Hydra config directory (default: configs)")
    p.add_argument("--node", action="append" if repeat else "store", metavar="NODE",
                   help=node_help)
    p.add_argument("overrides", nargs="*", metavar="OVERRIDE",
                   help="Hydra overrides, as on your training command line")


_CACHE_HELP = "cache directory (default: $DISKCACHE_OCR_DIR or ~/.cache/diskcache-ocr)"


def build_parser() -> argparse.ArgumentParser:
    from diskcache_ocr import __version__

    parser = _TopParser(
        prog="diskcache-ocr",
        description="A persistent, crash-safe LMDB disk cache for OCR text-detection datasets.",
    )
    parser.add_argument("--version", action="version", version=f"diskcache-ocr {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("-v", "--verbose", action="store_true", help="show progress logs")
    parser.add_argument("--cache", type=Path, default=None, help=_CACHE_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=_Parser)

    def add(name: str, func: Callable[[argparse.Namespace], int], help: str,
            cache: bool = True, json_flag: bool = True, aliases: Sequence[str] = ()
            ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, aliases=list(aliases))
        if cache:
            # SUPPRESS: a --cache given before the command stays unless repeated after it.
            p.add_argument("--cache", type=Path, default=argparse.SUPPRESS, help=_CACHE_HELP)
        if json_flag:
            p.add_argument("--json", action="store_true", help="print JSON for machines")
        # Also accepted after the command; SUPPRESS keeps a flag given before it.
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show tracebacks and debug logs")
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="show progress logs")
        p.set_defaults(func=func, uses_cache=cache)
        return p

    p = add("prebuild", cmd_prebuild,
            "build the cache for a split, in parallel, resumable: the built-in pipeline "
            "(--images, --annotations, --preset), or exactly what a Hydra config's dataset "
            "reads, its own transform included (--config-name, overrides)")
    p.epilog = ("In your Hydra project's root: `diskcache-ocr prebuild --config-name train "
                "data/performance_preset=validation_optimized --workers 8` builds what "
                "datasets.val_dataset reads (a diskcache-ocr dataset's node), into its cache, "
                "with your transforms (the config directory's parent is importable). Records "
                "of another pipeline or version are never replaced silently.")
    p.add_argument("--images", type=Path, help="directory of the split's images")
    p.add_argument("--annotations", type=Path, help="JSON file or ICDAR-2015 gt directory")
    p.add_argument("--preset", default=None, type=_preset_arg,
                   help="preset name or YAML path (default: validation_optimized)")
    p.add_argument("--workers", type=int, default=1, help="build processes (default: 1)")
    p.add_argument("--split", default=None, help="split name; 'train' uses the training "
                                                 "transform (default: val)")
    p.add_argument("--allow-random-tensor-cache", action="store_true",
                   help="cache tensors even though the transform is random (not advised)")
    _hydra_arguments(p, "dataset node to build, repeatable (default: datasets.val_dataset)",
                     repeat=True)
    p.add_argument("--rebuild", action="store_true",
                   help="with --config-name: replace records another version or pipeline "
                        "wrote in the dataset's cache (default: refuse, change nothing)")

    p = add("status", cmd_status, "entries and bytes per kind, header, versions, map usage")
    p = add("health", cmd_health, "find problems; exit 1 when there are any")
    p.add_argument("--images", type=Path, help="images directory (default: from the header)")
    p.add_argument("--max-age-days", type=_finite_at_least_zero, default=7.0,
                   help="entries older than this are reported (default: 7)")
    p.add_argument("--records", action="store_true",
                   help="also parse every record's header (reads the whole cache; `verify` "
                        "checks the payloads too)")

    p = add("clear", cmd_clear, "remove cached data")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--all", action="store_true", help="everything (also a damaged cache)")
    what.add_argument("--kind", "--type", dest="kind", type=_kind_name, choices=KINDS,
                      help="one kind of record (--type and image|tensor|map also accepted)")
    what.add_argument("--stale", action="store_true",
                      help="entries whose source changed or vanished, and unreferenced records")
    p.add_argument("--dry-run", action="store_true", help="say what would go, remove nothing")
    p.add_argument("--images", type=Path, help="images directory (default: from the header)")

    p = add("verify", cmd_verify, "decode and checksum every record; optionally recompute",
            aliases=["validate"])
    p.add_argument("--sample", type=int, help="check only this many records per kind")
    p.add_argument("--recompute", type=int, default=0,
                   help="compare this many sources with a fresh computation")
    p.add_argument("--images", type=Path, help="images directory (default: from the header)")
    p.add_argument("--annotations", type=Path, help="annotations, to recompute maps too")
    p.add_argument("--config", type=Path, metavar="FILE",
                   help="check a preset or dataset config YAML instead (a preset file, or a "
                        "data config whose dataset nodes hold preset keys; `# @package` "
                        "headers and `_target_` keys as Hydra has them): exit 1 on problems")
    _hydra_arguments(p, "the dataset node whose cache to verify, recomputing through its "
                        "pipeline (default: datasets.val_dataset)", repeat=False)

    p = add("export", cmd_export, "write the status and read statistics to a JSON file")
    p.add_argument("path", type=Path, nargs="?", help="JSON file to write")
    p.add_argument("--output", "-o", type=Path,
                   help="JSON file to write (the same; default: cache_stats.json)")

    p = add("copy", cmd_copy, "compact hot copy of a cache (safe while it is in use)")
    p.add_argument("dest", type=Path, help="empty destination directory")

    p = add("watch", cmd_watch, "service: invalidate entries whose sources change",
            json_flag=False)
    p.add_argument("--images", type=Path, required=True, help="directory of the images")
    p.add_argument("--annotations", type=Path, help="annotation file or directory")
    p.add_argument("--polling", action="store_true", help="poll instead of inotify")
    p.add_argument("--debounce", type=_finite_at_least_zero, default=0.5,
                   help="seconds of quiet before an event is applied (default: 0.5)")

    p = add("synth", cmd_synth, "write a synthetic OCR dataset (receipts) for demos and tests",
            cache=False)
    p.add_argument("--out", type=Path, required=True, help="dataset root to write")
    p.add_argument("--n", type=int, default=200, help="number of images (default: 200)")
    p.add_argument("--split", default="val", help="split name (default: val)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--workers", type=int, default=1, help="processes (default: 1)")

    p = add("demo", cmd_demo, "synthesize, prebuild, read with a 2-worker DataLoader, report",
            cache=False, json_flag=False)
    p.add_argument("--dir", default="demo-data", help="working directory (default: demo-data)")
    p.add_argument("--n", type=int, default=64, help="images to synthesize (default: 64)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (default: 2)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except (CacheError, ValueError, OSError) as exc:
        if args.debug:
            traceback.print_exc(file=sys.stderr)  # still exit 2: 1 means "problems found"
        else:
            # (one line: a YAML parser's message spans several)
            text = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
            print(f"diskcache-ocr {args.command}: error: {text}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"diskcache-ocr {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
