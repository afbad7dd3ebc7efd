"""The argument parser of ``diskcache-ocr`` and its entry point (``main``): usage errors and
``CacheError`` as one readable line and exit code 2."""

from __future__ import annotations

import argparse
import logging
import math
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from diskcache_ocr.cli.commands import (
    EXIT_ERROR,
    cmd_clear,
    cmd_copy,
    cmd_demo,
    cmd_export,
    cmd_health,
    cmd_prebuild,
    cmd_status,
    cmd_synth,
    cmd_verify,
    cmd_watch,
)
from diskcache_ocr.errors import CacheError
from diskcache_ocr.store import KINDS


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

    p = add("copy", cmd_copy, "hot copy of a cache, free pages left out (safe while it is in use)")
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
