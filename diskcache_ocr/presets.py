"""The five performance presets and custom preset files.

A preset file uses the origin project's keys::

    cache_config: {cache_images, cache_tensors, cache_maps, log_statistics_every_n}
    preload_images: bool
    preload_maps: bool
    load_maps: bool
    readahead: bool          # optional, this library's addition (default true)
    reuse_batch_memory: bool # optional, this library's addition (default true): keep batch
                             # buffers (shared-memory slabs in DataLoader workers) for reuse

Unknown keys are an error that names the key, so a typo never silently disables caching.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from diskcache_ocr.errors import PresetError

PRESET_NAMES: tuple[str, ...] = (
    "none", "minimal", "balanced", "validation_optimized", "memory_efficient",
)
DEFAULT_PRESET = "minimal"
_CACHE_KEYS = ("cache_images", "cache_tensors", "cache_maps", "log_statistics_every_n")
_TOP_KEYS = ("preload_images", "preload_maps", "load_maps", "readahead",
             "reuse_batch_memory")


@dataclass(frozen=True)
class Preset:
    """What a dataset caches, preloads and returns."""

    name: str = DEFAULT_PRESET
    cache_images: bool = False
    cache_tensors: bool = False
    cache_maps: bool = False
    log_statistics_every_n: int = 100
    preload_images: bool = False
    preload_maps: bool = False
    load_maps: bool = False
    readahead: bool = True
    reuse_batch_memory: bool = True

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "bool" and not isinstance(value, bool):
                raise PresetError(f"preset {self.name!r}: {f.name} must be true or false, "
                                  f"got {value!r}")
        n = self.log_statistics_every_n
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise PresetError(f"preset {self.name!r}: log_statistics_every_n must be an int >= 0 "
                              f"(0 = never), got {n!r}")

    @property
    def caches_anything(self) -> bool:
        return self.cache_images or self.cache_tensors or self.cache_maps

    @property
    def safe_for_training(self) -> bool:
        """Tensors and maps depend on the (random) training transform; images do not."""
        return not (self.cache_tensors or self.cache_maps)

    def to_dict(self) -> dict[str, Any]:
        """The preset in the origin project's YAML layout."""
        return {
            "cache_config": {k: getattr(self, k) for k in _CACHE_KEYS},
            **{k: getattr(self, k) for k in _TOP_KEYS},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], name: str = "custom") -> Preset:
        if not isinstance(data, Mapping):
            raise PresetError(f"preset {name!r}: expected a mapping, got {type(data).__name__}")
        unknown = sorted(set(data) - {"cache_config", *_TOP_KEYS})
        if unknown:
            raise PresetError(f"preset {name!r}: unknown key {unknown[0]!r}; allowed: "
                              f"cache_config, {', '.join(_TOP_KEYS)}")
        cache = data.get("cache_config", {}) or {}
        if not isinstance(cache, Mapping):
            raise PresetError(f"preset {name!r}: cache_config must be a mapping, got {cache!r}")
        unknown = sorted(set(cache) - set(_CACHE_KEYS))
        if unknown:
            raise PresetError(f"preset {name!r}: unknown key 'cache_config.{unknown[0]}'; "
                              f"allowed: {', '.join(_CACHE_KEYS)}")
        values = {k: cache[k] for k in _CACHE_KEYS if k in cache}
        values.update({k: data[k] for k in _TOP_KEYS if k in data})
        return cls(name=name, **values)


def preset_path(name: str) -> Path:
    """Where a built-in preset's YAML file lives (inside the installed package)."""
    if name not in PRESET_NAMES:
        raise PresetError(f"unknown preset {name!r}; built-in presets: {', '.join(PRESET_NAMES)} "
                          "(or give a path to a .yaml file)")
    return Path(str(importlib.resources.files("diskcache_ocr.preset_files") / f"{name}.yaml"))


def load_preset(preset: str | Path | Mapping[str, Any] | Preset | None = None) -> Preset:
    """A preset by built-in name, YAML path, mapping (e.g. a Hydra node) or Preset.

    >>> load_preset("balanced").cache_images
    True
    """
    if preset is None:
        preset = DEFAULT_PRESET
    if isinstance(preset, Preset):
        return preset
    if isinstance(preset, Mapping):
        return Preset.from_dict(preset)
    text = str(preset)
    if text in PRESET_NAMES:
        path, name = preset_path(text), text
    elif text.endswith((".yaml", ".yml")) or Path(text).exists():
        path, name = Path(text), Path(text).stem
    else:
        preset_path(text)  # raises the "unknown preset" error
        raise AssertionError("unreachable")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PresetError(f"{path}: preset file not found") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise PresetError(f"{path}: cannot read preset ({exc})") from None
    if data is None:
        data = {}
    try:
        return Preset.from_dict(data, name=name)
    except PresetError as exc:
        raise PresetError(f"{path}: {exc}") from None


# -- the cache plan: a preset resolved once, the only reader of its cache flags -----------
@dataclass(frozen=True)
class CachePlan:
    """Which kinds a reader looks up and writes back, what a sample returns, what is warmed.

    The read-through engine consults only this; no preset flag is read anywhere else.
    """

    name: str
    cached: frozenset[str]  # kinds read from and written back to the cache
    return_maps: bool  # samples carry the DBNet maps (computed when not cached)
    preload: bool  # build what is missing when a dataset opens
    warm: bool  # read-ahead on and the page cache warmed after a preload
    reuse_batch_memory: bool
    log_every: int  # 0 = never

    def caches(self, kind: str) -> bool:
        return kind in self.cached

    @property
    def caches_anything(self) -> bool:
        return bool(self.cached)

    @property
    def safe_for_training(self) -> bool:
        """Tensors and maps depend on the (random) training transform; images do not."""
        return not ({"tensors", "maps"} & self.cached)

    def build_kinds(self) -> tuple[bool, bool]:
        """(maps, tensor): what a build must produce so every cached kind exists."""
        return self.return_maps or self.caches("maps"), self.caches("tensors")


def cache_plan(preset: str | Path | Mapping[str, Any] | Preset | None = None) -> CachePlan:
    """The plan of a preset (by anything :func:`load_preset` takes)."""
    p = load_preset(preset)
    cached = frozenset(k for k, on in (("images", p.cache_images), ("tensors", p.cache_tensors),
                                       ("maps", p.cache_maps)) if on)
    return CachePlan(name=p.name, cached=cached, return_maps=p.load_maps,
                     preload=p.preload_images or p.preload_maps, warm=p.readahead,
                     reuse_batch_memory=p.reuse_batch_memory,
                     log_every=p.log_statistics_every_n)
