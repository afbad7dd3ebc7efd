"""A dataset the origin project's Hydra tree can instantiate in place of its own.

Their dataset entries read ``{_target_: <their dataset>, config: {...}, transform: ...}``; with
``_target_: diskcache_ocr.origin.ValidatedOCRDataset`` (and nothing else changed) the split is
served from the cache. ``config`` is their dataset config as Hydra built it: a mapping, an
OmegaConf node, or an object with attributes (such as their pydantic ``DatasetConfig``), with
``image_path``, ``annotation_path`` and the preset keys their ``@package`` preset files merge in
(``preload_images``, ``load_maps``, ``cache_config: {...}``, ...).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from diskcache_ocr.dataset import CachedOCRDataset
from diskcache_ocr.errors import CacheError
from diskcache_ocr.ocr.transform import TransformConfig
from diskcache_ocr.paths import default_cache_dir
from diskcache_ocr.presets import Preset, load_preset, preset_keys

__all__ = ["ValidatedOCRDataset", "default_cache_dir", "config_mapping", "preset_from_config"]

_SPLITS = ("train", "val", "test", "predict")
_PRESET_GROUP = "data/performance_preset"


_MAX_DEPTH = 4  # config -> cache_config -> values: deeper objects are passed as they are


def _plain(value: Any, depth: int = 0) -> Any:
    """Mappings, OmegaConf nodes and attribute objects (pydantic models, namespaces) as
    plain dicts, a few levels down; everything else as it is."""
    if depth >= _MAX_DEPTH:
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v, depth + 1) for k, v in value.items()}
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
    data = config_mapping(config)
    name = data.get("preset_name") or (None if _split(data) == "train" else _hydra_choice())
    return load_preset(preset_keys(data), name=str(name or "custom"))


class ValidatedOCRDataset(CachedOCRDataset):
    """A CachedOCRDataset built from the origin project's ``config`` and ``transform``.

    The cache directory is ``config.cache_dir``, else ``$DISKCACHE_OCR_DIR``, else the
    command line's default (``~/.cache/diskcache-ocr``), so ``scripts/cache_manager.py status``
    without ``--cache`` looks where training wrote. ``annotation_path`` may be absent or null
    (a test split without annotations).

    >>> ds = ValidatedOCRDataset({"image_path": "data/images/val",
    ...                           "annotation_path": "data/jsons/val.json",
    ...                           "cache_config": {"cache_images": True}})  # doctest: +SKIP
    """

    def __init__(self, config: Any, transform: Any = None, **options: Any) -> None:
        data = config_mapping(config)
        image_path = data.get("image_path")
        if not image_path:
            raise CacheError("dataset config: image_path is missing")
        annotations = data.get("annotation_path") or None
        cache_dir = data.get("cache_dir") or default_cache_dir()
        self.origin_config = data
        self.user_transform = transform
        if transform is not None:
            options["transform"] = transform
        # Their pipeline's rules and item keys, unless the caller says otherwise (our own
        # TransformConfig asks for our built-in pipeline, which is the "db" convention's).
        if not isinstance(transform, TransformConfig):
            options.setdefault("convention", "origin")
        super().__init__(image_path, annotations, cache_dir, preset=preset_from_config(data),
                         split=options.pop("split", _split(data)), **options)
