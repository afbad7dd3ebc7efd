"""The presets as a Hydra config group, for a config tree that has no preset files.

A tree that keeps its own preset files in ``<config dir>/data/performance_preset/`` (the origin
project's layout) needs nothing from here: those files load as they are. ``register_presets``
steps aside for any name such a file provides (Hydra would otherwise merge the two, warn that
the behaviour is deprecated, and keep both sets of keys).

Layouts (the exact lines are in the README, "Presets" and "Coming from the origin project"):

* a plain ``data`` config: ``register_presets()``, ``- data/performance_preset: minimal`` in the
  primary config's defaults, then ``load_preset(cfg.data.performance_preset)``;
* the origin's ``# @package _global_`` data config, where a preset configures one dataset:
  ``register_presets(package="_global_.datasets.val_dataset.config")`` and the same defaults
  line in the primary config; ``ValidatedOCRDataset`` reads the merged keys from its config;
* one preset per dataset: one group per dataset, e.g.
  ``register_presets("data/train_performance_preset",
  package="_global_.datasets.train_dataset.config")`` beside the one above; each has its own
  short override (``data/train_performance_preset=balanced``).

In every layout ``data/performance_preset=NAME`` on the command line picks the preset.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from diskcache_ocr.presets import PRESET_NAMES, preset_path, read_preset_file

log = logging.getLogger("diskcache_ocr.hydra")

DEFAULT_GROUP = "data/performance_preset"
_CONFIG_DIR_NAMES = ("configs", "config", "conf")


def _candidate_dirs() -> list[Path]:
    """Where a Hydra app's config directory usually is: beside or above the script that runs,
    or under the working directory."""
    dirs: list[Path] = []
    script = Path(sys.argv[0]).resolve().parent if sys.argv and sys.argv[0] else None
    for base in (script, script.parent if script else None, Path.cwd()):
        if base is not None:
            dirs += [base / name for name in _CONFIG_DIR_NAMES]
    return dirs


def register_presets(group: str = DEFAULT_GROUP, package: str | None = None, *,
                     config_dirs: Iterable[str | os.PathLike[str]] | None = None) -> list[str]:
    """Store the built-in presets in Hydra's ConfigStore under ``group``; returns the names
    stored.

    A name that a file ``<config dir>/<group>/<name>.yaml`` already provides is not stored:
    the file wins alone. ``config_dirs`` lists the app's config directories (the
    ``config_path`` of ``@hydra.main``); by default ``configs/``, ``config/`` and ``conf/``
    beside and above the running script and in the working directory are looked at.
    """
    from hydra.core.config_store import ConfigStore  # optional dependency

    dirs = [Path(d) for d in config_dirs] if config_dirs is not None else _candidate_dirs()
    theirs = [f for d in dirs if (d / group).is_dir() for f in sorted((d / group).glob("*.yaml"))]
    if theirs and package is None:
        # Where their own files put a preset is where ours must go too.
        package = _package_header(theirs[0])
    store = ConfigStore.instance()
    stored = []
    for name in PRESET_NAMES:
        files = [f for f in theirs if f.name == f"{name}.yaml"]
        if files:
            log.debug("preset %r: %s provides it; not registered", name, files[0])
            continue
        node: dict[str, Any] = read_preset_file(preset_path(name))
        store.store(group=group, name=name, node=node, package=package)
        stored.append(name)
    return stored


def _package_header(path: Path) -> str | None:
    """The ``# @package X`` line of a Hydra config file, if it has one before any content."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    for line in lines:
        text = line.strip()
        if text.startswith("#"):
            words = text.lstrip("#").split()
            if len(words) == 2 and words[0] == "@package":
                return words[1]
        elif text:
            break
    return None
