"""The presets as a Hydra config group.

One line in a Hydra app makes ``data/performance_preset=balanced`` work on its command line::

    from diskcache_ocr.hydra import register_presets; register_presets()

Then ``load_preset(cfg.data.performance_preset)`` turns the composed node into a Preset.
"""

from __future__ import annotations

from typing import Any

import yaml

from diskcache_ocr.presets import PRESET_NAMES, preset_path

DEFAULT_GROUP = "data/performance_preset"


def register_presets(group: str = DEFAULT_GROUP, package: str | None = None) -> list[str]:
    """Store the built-in presets in Hydra's ConfigStore under ``group``; returns the names."""
    from hydra.core.config_store import ConfigStore  # optional dependency

    store = ConfigStore.instance()
    for name in PRESET_NAMES:
        node: dict[str, Any] = yaml.safe_load(preset_path(name).read_text(encoding="utf-8"))
        store.store(group=group, name=name, node=node, package=package)
    return list(PRESET_NAMES)
