"""A dataset the origin project's Hydra tree can instantiate in place of its own.

Their dataset entries read ``{_target_: <their dataset>, config: {...}, transform: ...}``; with
``_target_: diskcache_ocr.origin.ValidatedOCRDataset`` (and nothing else changed) the split is
served from the cache. ``config`` is their dataset config as Hydra built it: a mapping, an
OmegaConf node, or an object with attributes (such as their pydantic ``DatasetConfig``), with
``image_path``, ``annotation_path`` and the preset keys their ``@package`` preset files merge in
(``preload_images``, ``load_maps``, ``cache_config: {...}``, ...).
"""

from __future__ import annotations

import copy
import difflib
import logging
import os
import types
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from diskcache_ocr.dataset import CachedOCRDataset
from diskcache_ocr.errors import CacheError
from diskcache_ocr.ocr.anns import OrderedDict as LazyAnns
from diskcache_ocr.ocr.transform import TransformConfig
from diskcache_ocr.paths import default_cache_dir
from diskcache_ocr.presets import Preset, load_preset, preset_keys
from diskcache_ocr.schema import format_hit_rates

__all__ = ["ValidatedOCRDataset", "default_cache_dir", "config_mapping", "preset_from_config",
           "resolved_config"]

log = logging.getLogger("diskcache_ocr.origin")

_SPLITS = ("train", "val", "test", "predict")
_PRESET_GROUP = "data/performance_preset"
# Keys Hydra reads itself (``_target_`` names the config class that builds the node).
_HYDRA_KEYS = frozenset({"_target_", "_recursive_", "_convert_", "_partial_", "_args_"})
# The origin's dataset config, field by field, with its defaults: what its config class
# fills in for a key the node leaves out.
ORIGIN_DEFAULTS: dict[str, Any] = {
    "annotation_path": None,
    "image_extensions": [".jpg", ".jpeg", ".png"],
    "preload_maps": False, "load_maps": False, "preload_images": False,
    "prenormalize_images": False,
    "cache_config": {"cache_images": True, "cache_maps": True,
                     "cache_transformed_tensors": False, "log_statistics_every_n": None},
    "image_loading_config": {"use_turbojpeg": False, "turbojpeg_fallback": False},
}
# This library's own keys a dataset config may carry.
_OUR_KEYS = frozenset({"image_path", "cache_dir", "preset_name", "split", "readahead",
                       "reuse_batch_memory", "read_through_images", "output"})

_MAX_DEPTH = 4  # config -> cache_config -> values: deeper objects are passed as they are


def _plain(value: Any, depth: int = 0) -> Any:
    """Mappings, OmegaConf nodes and attribute objects (pydantic models, namespaces) as
    plain dicts, a few levels down, without Hydra's own keys; everything else as it is."""
    if depth >= _MAX_DEPTH:
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v, depth + 1) for k, v in value.items()
                if str(k) not in _HYDRA_KEYS}
    dump = getattr(value, "model_dump", None)  # a pydantic v2 model
    if callable(dump) and not isinstance(value, type):
        return _plain(dump(), depth)
    if hasattr(value, "__dict__") and not isinstance(value, (str, bytes, os.PathLike, type)):
        return {k: _plain(v, depth + 1) for k, v in vars(value).items()
                if not k.startswith("_")}
    return value


def config_mapping(config: Any) -> dict[str, Any]:
    """Their dataset config (mapping, OmegaConf node or attribute object) as a plain dict."""
    data = _plain(config)
    if not isinstance(data, dict):
        raise CacheError(f"dataset config: expected a mapping or an object with attributes, "
                         f"got {type(config).__name__}")
    return data


def resolved_config(config: Any) -> dict[str, Any]:
    """Their dataset config as their config class resolves it: its defaults for what is left
    out, and, as their dataset does on construction, maps not cached unless they are loaded.
    A key neither they nor this library know is reported (a misspelling reads as unset)."""
    data = config_mapping(config)
    for key in sorted(set(data) - set(ORIGIN_DEFAULTS) - _OUR_KEYS):
        near = difflib.get_close_matches(key, [*ORIGIN_DEFAULTS, *_OUR_KEYS], n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        log.warning("dataset config: unknown key %r is ignored%s", key, hint)
    out = copy.deepcopy(ORIGIN_DEFAULTS)
    for key, value in data.items():
        if key not in out and key not in _OUR_KEYS:
            continue
        if isinstance(out.get(key), dict) and isinstance(value, Mapping):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    # The first epoch's reads write the tensors and maps they serve, not the decoded images as
    # well when tensors are cached (nothing reads those again): the first epoch then costs what
    # the origin's uncached one does. A build still stores them; ``read_through_images: true``
    # writes them on reads too.
    out.setdefault("read_through_images", False)
    cache = out["cache_config"]
    if isinstance(cache, dict) and cache.get("cache_maps") and not out.get("load_maps"):
        log.info("dataset config: maps are not cached because load_maps is false (as the "
                 "origin's dataset does)")
        cache["cache_maps"] = False
    return out


def _namespace(value: Any) -> Any:
    if isinstance(value, Mapping):
        return types.SimpleNamespace(**{k: _namespace(v) for k, v in value.items()})
    return value


def _hydra_choice() -> str | None:
    """The preset picked on the Hydra command line or in the defaults, inside a Hydra app."""
    try:
        from hydra.core.hydra_config import HydraConfig
    except ImportError:
        return None
    if not HydraConfig.initialized():
        return None
    choice = HydraConfig.get().runtime.choices.get(_PRESET_GROUP)
    return str(choice) if choice else None


def _split(data: Mapping[str, Any]) -> str:
    if data.get("split"):
        return str(data["split"])
    name = Path(str(data.get("image_path", ""))).name
    return name if name in _SPLITS else "val"


def preset_from_config(config: Any) -> Preset:
    """The preset a dataset config carries, named by ``preset_name`` in the config, else by
    the Hydra choice of ``data/performance_preset`` (not for a training split, which the
    origin's presets never reach), else ``custom``."""
    return _preset(resolved_config(config))


def _preset(data: Mapping[str, Any]) -> Preset:
    """:func:`preset_from_config` of a config already resolved (:func:`resolved_config`)."""
    name = data.get("preset_name") or (None if _split(data) == "train" else _hydra_choice())
    keys = preset_keys(data)
    if keys.get("image_loading_config") is None:
        keys.pop("image_loading_config", None)
    return load_preset(keys, name=str(name or "custom"))


class ValidatedOCRDataset(CachedOCRDataset):
    """A CachedOCRDataset built from the origin project's ``config`` and ``transform``.

    The cache directory is ``config.cache_dir``, else ``$DISKCACHE_OCR_DIR``, else the
    command line's default (``~/.cache/diskcache-ocr``), so ``scripts/cache_manager.py status``
    without ``--cache`` looks where training wrote. ``annotation_path`` may be absent or null
    (a test split without annotations). Keys the config leaves out take the origin's
    defaults (its dataset config class's). ``transform`` is theirs as their Hydra tree
    builds it (an object holding an albumentations ``Compose`` in ``.transform``), an
    albumentations ``Compose``, a callable, or None for the origin's validation transform.

    The dataset answers what the origin's code reads of its own: ``anns`` (file name → the
    image's polygons as rounded int32 arrays, or None), ``config`` (the resolved config, as
    attributes), ``image_path`` and the other compatibility properties; items are the
    origin's, in the annotation file's order.

    >>> ds = ValidatedOCRDataset({"image_path": "data/images/val",
    ...                           "annotation_path": "data/jsons/val.json",
    ...                           "cache_config": {"cache_images": True}})  # doctest: +SKIP
    """

    def __init__(self, config: Any, transform: Any = None, **options: Any) -> None:
        data = resolved_config(config)
        image_path = data.get("image_path")
        if not image_path:
            raise CacheError("dataset config: image_path is missing")
        for key in ("image_path", "annotation_path", "cache_dir"):
            value = data.get(key)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise CacheError(f"dataset config: {key} must be a path, got "
                                 f"{type(value).__name__} {value!r}")
        annotations = data.get("annotation_path")
        cache_dir = data.get("cache_dir") or default_cache_dir()
        self.origin_config = data
        self.config = _namespace({**data, "image_path": Path(str(image_path)),
                                  "annotation_path": None if annotations is None
                                  else Path(str(annotations))})
        self.user_transform = transform
        if transform is not None:
            options["transform"] = transform
        # Their pipeline's rules and item keys, unless the caller says otherwise (our own
        # TransformConfig asks for our built-in pipeline, which is the "db" convention's).
        if not isinstance(transform, TransformConfig):
            options.setdefault("convention", "origin")
        # A preset's preload is built by the first epoch's reads, in the DataLoader's workers:
        # constructing the dataset stays as quick as the origin's (``prebuild`` builds ahead).
        options.setdefault("preload", "first-epoch")
        super().__init__(image_path, None if annotations is None else str(annotations),
                         cache_dir, preset=_preset(data),
                         split=options.pop("split", _split(data)), **options)
        self._anns: OrderedDict[str, list[np.ndarray] | None] | None = None

    # -- what the origin's own code reads of its dataset -------------------------------------
    @property
    def anns(self) -> OrderedDict[str, list[np.ndarray] | None]:
        """File name → that image's annotated polygons, each rounded to int32 (k, 2), or None
        for an image without words; in the annotation file's order. An OrderedDict that
        builds an image's arrays when they are read (:mod:`diskcache_ocr.ocr.anns`)."""
        if self._anns is None:
            self._anns = LazyAnns(self.catalog)
        return self._anns

    @property
    def image_path(self) -> Path:
        return Path(self.config.image_path)

    @property
    def annotation_path(self) -> Path | None:
        return self.config.annotation_path

    @property
    def image_extensions(self) -> list[str]:
        return list(self.config.image_extensions)

    @property
    def preload_images(self) -> bool:
        return bool(self.config.preload_images)

    @property
    def preload_maps(self) -> bool:
        return bool(self.config.preload_maps)

    @property
    def prenormalize_images(self) -> bool:
        return bool(self.config.prenormalize_images)

    @property
    def cache_transformed_tensors(self) -> bool:
        return bool(self.config.cache_config.cache_transformed_tensors)

    @property
    def cache_config(self) -> Any:
        return self.config.cache_config

    @property
    def image_loading_config(self) -> Any:
        return self.config.image_loading_config

    def log_cache_statistics(self) -> None:
        """Log the cache's hit rates (the origin's Lightning module calls this, when a
        dataset has it, at the end of a training epoch)."""
        log.info("cache %s: %s", self.store.path if self.store else "off",
                 format_hit_rates(self.stats()))
