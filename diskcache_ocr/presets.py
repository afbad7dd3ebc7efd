"""The five performance presets and custom preset files.

A preset file uses the origin project's keys, so its own preset files load unchanged::

    preload_images: bool
    preload_maps: bool
    prenormalize_images: bool   # accepted; no effect here (see NO_EFFECT)
    load_maps: bool
    cache_config:
      cache_images: bool
      cache_transformed_tensors: bool   # ``cache_tensors`` is accepted as the same setting
      cache_maps: bool
      log_statistics_every_n: int | null   # null or 0: never
    image_loading_config:       # accepted; no effect here (see NO_EFFECT)
      use_turbojpeg: bool
      turbojpeg_fallback: bool
    readahead: bool             # optional, this library's addition (default true)
    reuse_batch_memory: bool    # optional, this library's addition (default true): keep batch
                                # buffers (shared-memory slabs in DataLoader workers) for reuse
    read_through_images: bool   # optional, this library's addition (default true): false
                                # leaves the decoded image out of what a read-through miss
                                # writes when tensors are cached too (builds still store it)
    output: float32 | compact   # optional, this library's addition (default float32): what a
                                # sample holds; compact = the stored uint8 image and binary
                                # maps, made float32 by ``finish_batch`` (e.g. on the GPU)

Unknown keys are an error that names the key, so a typo never silently disables caching.
A preset is named after its file (``custom.yaml`` -> ``custom``), and that name goes into the
cache header and every error message.
"""

from __future__ import annotations

import importlib.resources
import logging
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from diskcache_ocr.errors import PresetError

log = logging.getLogger("diskcache_ocr.presets")

PRESET_NAMES: tuple[str, ...] = (
    "none", "minimal", "balanced", "validation_optimized", "memory_efficient",
)
DEFAULT_PRESET = "minimal"
# The origin's spelling first: it is what our files and to_dict() write.
_TENSORS_KEYS = ("cache_transformed_tensors", "cache_tensors")
_CACHE_KEYS = ("cache_images", "cache_transformed_tensors", "cache_maps",
               "log_statistics_every_n")
_TOP_KEYS = ("preload_images", "preload_maps", "prenormalize_images", "load_maps", "readahead",
             "reuse_batch_memory", "read_through_images", "output")
OUTPUTS = ("float32", "compact")
_IMAGE_LOADING_KEYS = ("use_turbojpeg", "turbojpeg_fallback")
# Origin settings this library accepts but does not act on, and why. This is the one place
# that says so: ``Preset.no_effect()`` reads it, ``load_preset`` logs it.
NO_EFFECT: dict[str, str] = {
    "prenormalize_images": "a cached tensor already is the normalized transform output, and an "
                           "uncached image is normalized by the transform as before",
    "use_turbojpeg": "images are decoded by Pillow (itself built on libjpeg-turbo); a second "
                     "JPEG decoder is not guaranteed to produce the same pixels, and a cached "
                     "image must equal a fresh decode bit for bit",
    "turbojpeg_fallback": "follows use_turbojpeg, which has no effect here",
}
_MAX_FILE_BYTES = 1 << 20


@dataclass(frozen=True)
class Preset:
    """What a dataset caches, preloads and returns."""

    name: str = DEFAULT_PRESET
    cache_images: bool = False
    cache_tensors: bool = False
    cache_maps: bool = False
    log_statistics_every_n: int = 100  # 0 = never (a file's null becomes 0)
    preload_images: bool = False
    preload_maps: bool = False
    load_maps: bool = False
    readahead: bool = True
    reuse_batch_memory: bool = True
    read_through_images: bool = True
    output: str = "float32"
    prenormalize_images: bool = False
    use_turbojpeg: bool = False
    turbojpeg_fallback: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise PresetError(f"a preset's name must be a non-empty string, got {self.name!r}")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "bool" and not isinstance(value, bool):
                raise PresetError(f"preset {self.name!r}: {f.name} must be true or false, "
                                  f"got {value!r}")
        if self.output not in OUTPUTS:
            raise PresetError(f"preset {self.name!r}: output must be one of "
                              f"{', '.join(OUTPUTS)}, got {self.output!r}")
        n = self.log_statistics_every_n
        if n is None:
            object.__setattr__(self, "log_statistics_every_n", 0)
        elif isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise PresetError(f"preset {self.name!r}: log_statistics_every_n must be an int >= 0 "
                              f"or null (0 or null = never), got {n!r}")

    @property
    def caches_anything(self) -> bool:
        return self.cache_images or self.cache_tensors or self.cache_maps

    @property
    def safe_for_training(self) -> bool:
        """Tensors and maps depend on the (random) training transform; images do not."""
        return not (self.cache_tensors or self.cache_maps)

    def no_effect(self) -> dict[str, str]:
        """The origin settings this preset turns on that do nothing here, with the reason."""
        return {k: why for k, why in NO_EFFECT.items() if getattr(self, k)}

    def to_dict(self) -> dict[str, Any]:
        """The preset in the origin project's YAML layout (and key names)."""
        cache = {k: getattr(self, k) for k in _CACHE_KEYS if k != "cache_transformed_tensors"}
        cache["cache_transformed_tensors"] = self.cache_tensors
        return {
            "cache_config": {k: cache[k] for k in _CACHE_KEYS},
            **{k: getattr(self, k) for k in _TOP_KEYS},
            "image_loading_config": {k: getattr(self, k) for k in _IMAGE_LOADING_KEYS},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], name: str = "custom") -> Preset:
        """A preset from the YAML layout; a mapping holding more than a preset is an error
        (``preset_keys`` picks a preset out of a larger config)."""
        if not isinstance(data, Mapping):
            raise PresetError(f"preset {name!r}: expected a mapping, got {type(data).__name__}")
        allowed = ("cache_config", "image_loading_config", *_TOP_KEYS)
        unknown = sorted(map(str, set(data) - set(allowed)))
        if unknown:
            raise PresetError(f"preset {name!r}: unknown key {unknown[0]!r}; allowed: "
                              f"{', '.join(allowed)}")
        cache = _section(data, "cache_config", (*_CACHE_KEYS, "cache_tensors"), name)
        loading = _section(data, "image_loading_config", _IMAGE_LOADING_KEYS, name)
        given = [k for k in _TENSORS_KEYS if k in cache]
        if len(given) == 2 and cache[given[0]] != cache[given[1]]:
            raise PresetError(
                f"preset {name!r}: cache_config.cache_transformed_tensors "
                f"({cache[given[0]]!r}) and cache_config.cache_tensors ({cache[given[1]]!r}) "
                "are the same setting and disagree; keep one")
        values: dict[str, Any] = {k: cache[k] for k in _CACHE_KEYS
                                  if k in cache and k != "cache_transformed_tensors"}
        if given:
            values["cache_tensors"] = cache[given[0]]
        values.update({k: data[k] for k in _TOP_KEYS if k in data})
        values.update(loading)
        return cls(name=name, **values)


def _section(data: Mapping[str, Any], section: str, keys: tuple[str, ...], name: str
             ) -> dict[str, Any]:
    value = data.get(section, {})
    value = {} if value is None else value
    if not isinstance(value, Mapping):
        raise PresetError(f"preset {name!r}: {section} must be a mapping, got {value!r}")
    unknown = sorted(map(str, set(value) - set(keys)))
    if unknown:
        raise PresetError(f"preset {name!r}: unknown key '{section}.{unknown[0]}'; "
                          f"allowed: {', '.join(keys)}")
    return dict(value)


def preset_keys(config: Mapping[str, Any]) -> dict[str, Any]:
    """The preset settings within a larger config (e.g. a dataset config a Hydra preset was
    merged into): the top-level preset keys and the preset sections, other keys left out."""
    return {k: config[k] for k in ("cache_config", "image_loading_config", *_TOP_KEYS)
            if k in config}


def _preset_dir() -> Path:
    """The built-in preset files: inside the installed package, else (a source checkout on
    ``sys.path`` without installing) the repository's ``presets/`` beside the package."""
    try:
        root = importlib.resources.files("diskcache_ocr.preset_files")
        path = Path(str(root))
        if (path / f"{DEFAULT_PRESET}.yaml").is_file():
            return path
    except (ModuleNotFoundError, TypeError):
        pass
    return Path(__file__).resolve().parents[1] / "presets"


def preset_path(name: str) -> Path:
    """Where a built-in preset's YAML file lives."""
    if name not in PRESET_NAMES:
        raise PresetError(f"unknown preset {name!r}; built-in presets: {', '.join(PRESET_NAMES)} "
                          "(or give a path to a .yaml file)")
    return _preset_dir() / f"{name}.yaml"


def read_preset_file(path: str | Path) -> dict[str, Any]:
    """A preset file's mapping (empty for an empty file); PresetError naming the file on
    anything unreadable, including YAML nested too deeply to parse."""
    path = Path(path)
    try:
        if path.stat().st_size > _MAX_FILE_BYTES:
            raise PresetError(f"{path}: a preset file over {_MAX_FILE_BYTES} bytes; not read")
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PresetError(f"{path}: preset file not found") from None
    except RecursionError:
        raise PresetError(f"{path}: cannot read preset (nested too deeply)") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise PresetError(f"{path}: cannot read preset ({exc})") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise PresetError(f"{path}: preset {path.stem!r}: expected a mapping, "
                          f"got {type(data).__name__}")
    return dict(data)


def load_preset(preset: str | Path | Mapping[str, Any] | Preset | None = None, *,
                name: str | None = None) -> Preset:
    """A preset by built-in name, YAML path, mapping (e.g. a Hydra node) or Preset.

    ``name`` names a preset given as a mapping (default ``custom``); a file's preset is named
    after the file.

    >>> load_preset("balanced").cache_images
    True
    """
    if preset is None:
        preset = DEFAULT_PRESET
    if isinstance(preset, Preset):
        return preset
    if isinstance(preset, Mapping):
        return _report(Preset.from_dict(preset, name=name or "custom"))
    text = str(preset)
    if text in PRESET_NAMES:
        path, stem = preset_path(text), text
    elif text.endswith((".yaml", ".yml")) or Path(text).exists():
        path, stem = Path(text), Path(text).stem
    else:
        preset_path(text)  # raises the "unknown preset" error
        raise AssertionError("unreachable")
    data = read_preset_file(path)
    try:
        return _report(Preset.from_dict(data, name=name or stem))
    except PresetError as exc:
        raise PresetError(f"{path}: {exc}") from None


def _report(preset: Preset) -> Preset:
    for key, why in preset.no_effect().items():
        log.info("preset %r: %s has no effect here: %s", preset.name, key, why)
    return preset


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
    output: str = "float32"  # what samples hold: "float32", or "compact" (finish_batch later)
    read_through_images: bool = True  # a read-through miss writes the image (see serve_writes)

    def caches(self, kind: str) -> bool:
        return kind in self.cached

    @property
    def caches_anything(self) -> bool:
        return bool(self.cached)

    @property
    def safe_for_training(self) -> bool:
        """Tensors and maps depend on the (random) training transform; images do not."""
        return not ({"tensors", "maps"} & self.cached)

    @property
    def serve_writes(self) -> tuple[str, ...]:
        """The kinds a read-through pass (serving samples) writes back for a miss.

        With ``read_through_images`` off, the decoded image is left out when the tensors are
        cached too: it is then read again only if the tensors are lost (e.g. the transform
        changed), while it is the largest record and the bulk of what the first epoch
        writes. A build (prebuild, preload) still writes every cached kind, and an image
        record already there is used.
        """
        kinds = tuple(k for k in ("images", "tensors", "maps") if k in self.cached)
        if "tensors" in self.cached and not self.read_through_images:
            kinds = tuple(k for k in kinds if k != "images")
        return kinds

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
                     log_every=p.log_statistics_every_n, output=p.output,
                     read_through_images=p.read_through_images)
