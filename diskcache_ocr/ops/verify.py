"""Checking a cache's records: decode and checksum each, and compare some with a fresh
computation."""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from diskcache_ocr.errors import CacheError, CacheFormatError, SourceError
from diskcache_ocr.hashing import content_hash
from diskcache_ocr.hydra_app import DEFAULT_NODE
from diskcache_ocr.ocr.annotations import (
    AnnotationSet,
    ImageAnnotation,
    load_annotations,
)
from diskcache_ocr.ocr.conventions import annotation_rules
from diskcache_ocr.ocr.decode import read_image_file
from diskcache_ocr.schema import (
    KINDS,
    IndexEntry,
    dataset_root,
    source_id,
)
from diskcache_ocr.store import CacheStore

if TYPE_CHECKING:  # (the engine and torch load only for verify's recomputing)
    from diskcache_ocr.readthrough import ReadThrough

def verify(
    cache_dir: str | os.PathLike[str], *, sample: int | None = None, recompute: int = 0,
    images_dir: str | os.PathLike[str] | None = None,
    annotations: str | os.PathLike[str] | None = None, seed: int = 0, dataset: Any = None,
) -> dict[str, Any]:
    """Decode (and checksum) every record, or ``sample`` of them per kind; with
    ``recompute``, compare that many sources' records with a fresh computation: by
    ``dataset``'s pipeline when given (a dataset, or its read-through engine: any pipeline,
    a user's own included), else by the built-in pipeline the header records."""
    rng = random.Random(seed)
    checked, corrupt, mismatched = 0, [], []
    with CacheStore(cache_dir, readonly=True) as store:
        header = store.header()
        for kind in KINDS:
            keys = store.keys(kind)
            if sample is not None and sample < len(keys):
                keys = rng.sample(keys, sample)
            checked += len(keys)
            corrupt += [f"{kind}/{key.hex()}: {exc}" for key, exc in store.verify(kind, keys)
                        if exc is not None]
        if recompute and dataset is not None:
            engine = getattr(dataset, "engine", dataset)
            mismatched = _compare(store, engine, _chosen_of(store, engine, recompute, rng),
                                  corrupt)
        elif recompute:
            mismatched = _recompute(store, header, recompute, images_dir, annotations, rng,
                                    corrupt)
    return {"checked": checked, "corrupt": corrupt, "mismatched": mismatched,
            "recomputed": recompute}


def verify_config_dataset(config_dir: str | os.PathLike[str], config_name: str,
                          overrides: Sequence[str] = (), *, node: str = DEFAULT_NODE,
                          cache_dir: str | os.PathLike[str] | None = None,
                          sample: int | None = None, recompute: int = 0) -> dict[str, Any]:
    """:func:`verify` of the cache a Hydra config's dataset node reads, recomputing through
    that dataset's pipeline (see :func:`~diskcache_ocr.hydra_app.config_datasets`; the
    dataset is opened read-only). Adds ``node`` and ``cache`` to the report."""
    from diskcache_ocr.hydra_app import config_datasets

    with config_datasets(config_dir, config_name, overrides, nodes=[node],
                         cache_dir=cache_dir, readonly=True) as made:
        ((_, ds),) = made
        if ds.store is None:
            raise CacheError(f"{node}: its preset {ds.plan.name!r} caches nothing: there is "
                             "no cache to verify")
        return {"node": node, "cache": str(ds.store.path),
                **verify(ds.store.path, sample=sample, recompute=recompute, dataset=ds)}


Chosen = list[tuple[int, str, IndexEntry, bool]]  # (engine index, source, entry, with maps)


def _chosen_of(store: CacheStore, engine: ReadThrough, n: int, rng: random.Random) -> Chosen:
    """``n`` of the dataset's sources that the index holds, at random."""
    catalog = engine.catalog
    ids = {source_id(catalog.images_dir, catalog.source(i)): i for i in range(len(catalog))}
    entries = [(s, e) for s, e in store.iter_index() if e.ok and s in ids]
    return [(ids[s], s, e, True) for s, e in rng.sample(entries, min(n, len(entries)))]


def _recompute(store: CacheStore, header: dict[str, Any], n: int,
               images_dir: str | os.PathLike[str] | None,
               annotations: str | os.PathLike[str] | None, rng: random.Random,
               corrupt: list[str]) -> list[str]:
    stage = header.get("stage_pipeline")
    convention = stage.get("convention") if isinstance(stage, dict) else None
    root = dataset_root(header, images_dir) or Path(".")
    words = {}
    if annotations is not None:  # (read by the rules of the convention that built the cache)
        words = {source_id(root, it.file): it for it in
                 load_annotations(root, annotations, annotation_rules(convention)).items}
    entries = [(s, e) for s, e in store.iter_index() if e.ok]
    chosen = rng.sample(entries, min(n, len(entries)))
    # Sources without an annotation are checked without words (and without maps).
    items = tuple(words.get(s) or ImageAnnotation(os.path.basename(s), (), (), ())
                  for s, _ in chosen)
    from diskcache_ocr.engine_setup import engine_from_header
    from diskcache_ocr.samples import Catalog

    # The pipeline the header records (the built-in one, or a convention's own stages); a
    # user's transform or maps cannot be made from it: a CacheError says what to do instead.
    engine = engine_from_header(header, Catalog(AnnotationSet(root, items, ())),
                                where=store.path)
    return _compare(store, engine, [(i, s, e, s in words) for i, (s, e) in enumerate(chosen)],
                    corrupt)


def _compare(store: CacheStore, engine: ReadThrough, chosen: Chosen, corrupt: list[str]
             ) -> list[str]:
    """Each chosen source's records, computed afresh by ``engine``, against the cached ones:
    the fields that differ (a damaged record is added to ``corrupt`` instead)."""
    mismatched = []
    for index, source, entry, with_maps in chosen:
        try:
            data = read_image_file(source, source)
        except (OSError, SourceError):
            continue  # a missing source is health's business, not a mismatch
        if content_hash(data) != entry.content_hash:
            continue  # changed since it was cached: stale, not wrong
        fresh = engine.recompute(index, data, with_maps=with_maps)
        for kind, (key, arrays) in fresh.items():
            try:
                cached = store.get(kind, key)
            except CacheFormatError as exc:  # damaged: report it, do not stop the check
                label = f"{kind}/{key.hex()}"
                if not any(c.startswith(label + ":") for c in corrupt):
                    corrupt.append(f"{label}: {exc}")
                continue
            if cached is None:
                continue
            for name, arr in arrays.items():
                if name not in cached or cached[name].tobytes() != np.ascontiguousarray(
                        arr).tobytes() or cached[name].dtype != arr.dtype:
                    mismatched.append(f"{source} {kind}.{name}")
    return mismatched

