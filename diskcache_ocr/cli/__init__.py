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

from diskcache_ocr.cli.commands import (
    EXIT_ERROR,
    EXIT_PROBLEMS,
    cmd_check_config,
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
from diskcache_ocr.cli.parser import build_parser, main

__all__ = ["EXIT_ERROR", "EXIT_PROBLEMS", "build_parser", "cmd_check_config", "cmd_clear",
           "cmd_copy", "cmd_demo", "cmd_export", "cmd_health", "cmd_prebuild", "cmd_status",
           "cmd_synth", "cmd_verify", "cmd_watch", "main"]
