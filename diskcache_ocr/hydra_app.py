"""Datasets as a Hydra app makes them: compose its config tree, instantiate dataset nodes.

For the commands that act on what an app's dataset reads (``prebuild --config-name``,
``verify --config-name``): the tree is composed as the app's ``@hydra.main`` would compose it
(``${hydra:runtime.cwd}`` and the preset choice resolve), and each node must be a diskcache-ocr
dataset (e.g. ``diskcache_ocr.origin.ValidatedOCRDataset``), made without preloading.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from diskcache_ocr.errors import CacheError, CacheVersionError

DEFAULT_NODE = "datasets.val_dataset"
_CACHE_ENV = "DISKCACHE_OCR_DIR"
_VERSION_BASE = "1.2"  # what the origin project's runners declare
# (named, not imported: this module sits below the dataset's layer)
_DATASET_CLASS = ("diskcache_ocr.dataset", "CachedOCRDataset")


def _is_dataset_class(cls: Any) -> bool:
    """``cls`` is :class:`~diskcache_ocr.dataset.CachedOCRDataset` or a subclass."""
    return isinstance(cls, type) and any((c.__module__, c.__qualname__) == _DATASET_CLASS
                                         for c in cls.__mro__)


@contextlib.contextmanager
def config_datasets(config_dir: str | os.PathLike[str], config_name: str,
                    overrides: Sequence[str] = (), *, nodes: Sequence[str] = (DEFAULT_NODE,),
                    cache_dir: str | os.PathLike[str] | None = None,
                    **options: Any) -> Iterator[list[tuple[str, Any]]]:
    """(node, dataset) for each of ``nodes`` of the composed config, made with ``options``
    (e.g. ``on_mismatch``, ``readonly``) and ``preload=False``.

    While it is open, the config directory's parent and the working directory are on the
    import path (the project's own ``_target_`` classes, its transforms, import as in its
    runs), Hydra's runtime config is this one, and ``cache_dir`` (when given) is the cache of
    a dataset whose config names none, as ``$DISKCACHE_OCR_DIR`` is in the app's run.
    """
    try:
        from hydra import compose, initialize_config_dir
        from hydra.core.hydra_config import HydraConfig
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException
    except ImportError:
        raise CacheError("a Hydra config needs hydra-core (pip install hydra-core)") from None
    config_dir = Path(config_dir).resolve()
    if not config_dir.is_dir():
        raise CacheError(f"{config_dir}: no such config directory")
    added = [p for p in (str(Path.cwd()), str(config_dir.parent)) if p not in sys.path]
    sys.path[:0] = added
    runtime = HydraConfig.instance()
    runtime_before, env_before = runtime.cfg, os.environ.get(_CACHE_ENV)
    if cache_dir is not None:
        os.environ[_CACHE_ENV] = str(cache_dir)
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base=_VERSION_BASE):
            try:
                cfg = compose(config_name=config_name, overrides=list(overrides),
                              return_hydra_config=True)
            except (HydraException, OmegaConfBaseException) as exc:
                raise CacheError(f"{config_dir}/{config_name}: {exc}") from None
            runtime.set_config(cfg)
            yield [(node, _instantiate(cfg, node, {**options, "preload": False}))
                   for node in nodes]
    finally:
        runtime.cfg = runtime_before
        if env_before is None:
            os.environ.pop(_CACHE_ENV, None)
        else:
            os.environ[_CACHE_ENV] = env_before
        for path in added:
            if path in sys.path:
                sys.path.remove(path)


def _instantiate(cfg: Any, node_path: str, options: Mapping[str, Any]) -> Any:
    from hydra.errors import HydraException
    from hydra.utils import get_class, instantiate
    from omegaconf import OmegaConf

    node = OmegaConf.select(cfg, node_path)
    if node is None or not OmegaConf.is_dict(node):
        found = OmegaConf.select(cfg, "datasets")
        names = ", ".join(f"datasets.{k}" for k in found) if OmegaConf.is_dict(found) else "none"
        raise CacheError(f"no dataset node {node_path!r} in the config (dataset nodes: "
                         f"{names}); choose one with --node")
    target = node.get("_target_")
    try:
        cls = get_class(str(target))
    except Exception as exc:  # noqa: BLE001 - Hydra raises several types for a bad target
        raise CacheError(f"{node_path}: cannot import its _target_ {target!r} ({exc})"
                         ) from None
    if not _is_dataset_class(cls):
        raise CacheError(f"{node_path}: its dataset is {target}, not a diskcache-ocr dataset; "
                         "set `_target_: diskcache_ocr.origin.ValidatedOCRDataset` there")
    try:
        ds = instantiate(node, **options)
    except HydraException as exc:
        cause = exc.__cause__
        if isinstance(cause, CacheVersionError):
            found = str(cause).split("; open with")[0]  # (its advice is not this command's)
            raise CacheError(f"{node_path}: its cache holds records of another pipeline or "
                             f"version ({found}); nothing was changed. `prebuild "
                             "--config-name ... --rebuild` replaces them with this dataset's; "
                             "or give this dataset its own cache_dir") from None
        if isinstance(cause, CacheError):
            raise CacheError(f"{node_path}: {cause}") from None
        raise CacheError(f"{node_path}: cannot make its dataset: {cause or exc}") from None
    if not _is_dataset_class(type(ds)):
        raise CacheError(f"{node_path}: made a {type(ds).__name__}, not a diskcache-ocr dataset")
    return ds


__all__ = ["DEFAULT_NODE", "config_datasets"]
