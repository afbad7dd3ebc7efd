"""What the read-through engine asks of a pipeline, and the two pipelines that answer it.

The engine (:mod:`diskcache_ocr.readthrough`) holds one :class:`EnginePipeline` and never asks
which kind it is, the way python-diskcache's ``Cache`` is handed a ``Disk`` strategy instead of
branching on how values are stored. An engine pipeline says, for its pipeline's records:

- which kinds it can cache and under which versions (:meth:`~EnginePipeline.kind_versions`),
  and the key of a derived record (:meth:`~EnginePipeline.record_key`);
- what memory a batch lands in (:meth:`~EnginePipeline.buffers`);
- how a cached record is taken into a sample's row while the read transaction lives
  (:meth:`~EnginePipeline.take`);
- how a miss is computed (:meth:`~EnginePipeline.make_tensor`,
  :meth:`~EnginePipeline.make_maps`; decoding is :meth:`~EnginePipeline.decode`);
- how a sample, or a bad source's sample, is assembled (:meth:`~EnginePipeline.sample`,
  :meth:`~EnginePipeline.error_sample`).

Two pipelines implement it: :class:`BuiltinSamples` (the library's transform and maps,
:class:`~diskcache_ocr.ocr.pipeline.Pipeline`: fixed-size records copied straight into the rows
of :class:`~diskcache_ocr.samples.BatchBuffers`) and :class:`StageSamples` (a convention's rules
and the user's stages, :class:`~diskcache_ocr.ocr.staged.StagePipeline`: records are the
stages' own outputs, :mod:`diskcache_ocr.staged_samples`). :func:`engine_pipeline` picks the one
for a pipeline object, once, when an engine is made.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, Protocol, cast

import numpy as np

from diskcache_ocr.ocr.maps import MAP_NAMES
from diskcache_ocr.ocr.pipeline import Pipeline
from diskcache_ocr.ocr.staged import StagePipeline, image_header
from diskcache_ocr.samples import (
    GEOMETRY,
    BatchBuffers,
    Catalog,
    Sample,
    assemble,
    empty_sample,
    put_image,
)
from diskcache_ocr.schema import (
    KINDS,
    KindVersion,
    derived_image_key,
    flat_polygons_bytes,
    maps_key,
    record_name,
    tensor_key,
)
from diskcache_ocr.staged_samples import (
    StageBuffers,
    StageLayout,
    assemble_staged,
    empty_staged,
    take_record,
)
from diskcache_ocr.store import Record
from diskcache_ocr.work import Copy, Work


class Buffers(Protocol):
    """Where one batch's arrays land (the engine pipeline's :meth:`EnginePipeline.buffers`)."""

    def needs_layout(self, n: int) -> bool:
        """Whether a batch of ``n`` needs one sample made first to learn its shapes."""

    def learn(self, sample: Sample, n: int) -> None:
        """Take the rows' shapes from ``sample``, one of ``n``."""

    def pack(self, samples: list[Sample]) -> list[Sample]:
        """The batch's samples, moved into rows of one block where they are not yet."""

    def batch(self, samples: Sequence[Sample]) -> dict[str, Any]:
        """The samples as one collated batch over these buffers."""


class EnginePipeline(Protocol):
    """What the read-through engine asks of a pipeline (see the module's docstring)."""

    pipeline: Any  # the pipeline object itself (decode, transform and maps)
    convention: str  # the annotation rules it follows (part of a cache role)
    max_pixels: int
    tensor_reads_source: bool  # making the tensors record needs the file's bytes

    def kind_versions(self) -> dict[str, KindVersion]: ...

    def record_key(self, kind: str, content: bytes, fingerprint: str,
                   words: Callable[[], bytes]) -> bytes:
        """The key of a ``tensors`` or ``maps`` record of the image hashing to ``content``;
        ``words()`` gives its annotation's bytes, for a record that depends on them."""

    def buffers(self, n: int, *, return_maps: bool, shared: bool, pin: bool, compact: bool,
                reuse: bool) -> Buffers: ...

    def take(self, kind: str, record: Record, w: Work, buffers: Any,
             copies: list[Copy]) -> None:
        """Take a cached ``tensors`` or ``maps`` record into ``w`` (and its row of
        ``buffers``, when given): copies that read the record's views either run now or are
        queued in ``copies``, which run before the read transaction ends."""

    def decode(self, data: bytes, source: str) -> np.ndarray: ...

    def make_tensor(self, w: Work, catalog: Catalog, flip: bool | None) -> dict[str, np.ndarray]:
        """The ``tensors`` record of ``w`` from its decoded image (and, when
        :attr:`tensor_reads_source`, its bytes)."""

    def make_maps(self, w: Work, catalog: Catalog) -> dict[str, np.ndarray]:
        """The ``maps`` record of ``w`` from its ``tensors`` record."""

    def sample(self, w: Work, catalog: Catalog, buffers: Any, return_maps: bool
               ) -> Sample:
        """The sample of ``w`` over its row of ``buffers`` (maps in it with
        ``return_maps``: taken, computed, or made now when the kind is not cached)."""

    def error_sample(self, w: Work, catalog: Catalog, buffers: Any, return_maps: bool
                     ) -> Sample:
        """What a bad source yields: the right shapes, no words, and ``w.error``."""


class BuiltinSamples:
    """The library's own pipeline: records of fixed shapes, copied straight from the cache's
    map into the rows of :class:`~diskcache_ocr.samples.BatchBuffers`."""

    tensor_reads_source = False
    convention = "db"

    def __init__(self, pipeline: Pipeline, item_keys: str = "db") -> None:
        self.pipeline = pipeline  # (its samples have the "db" keys, whatever ``item_keys``)
        self.max_pixels = pipeline.max_pixels

    def kind_versions(self) -> dict[str, KindVersion]:
        return self.pipeline.kind_versions()

    def record_key(self, kind: str, content: bytes, fingerprint: str,
                   words: Callable[[], bytes]) -> bytes:
        if kind == "tensors":  # the record holds the geometry, not the moved polygons
            return tensor_key(content, fingerprint)
        return maps_key(content, words(), fingerprint)

    def buffers(self, n: int, *, return_maps: bool, shared: bool, pin: bool, compact: bool,
                reuse: bool) -> BatchBuffers:
        transform = self.pipeline.transform
        return BatchBuffers(n, transform.size, return_maps, shared=shared, pin=pin,
                            raw_image=compact and transform.output == "compact",
                            raw_maps=compact, reuse=reuse)

    def take(self, kind: str, record: Record, w: Work, buffers: BatchBuffers | None,
             copies: list[Copy]) -> None:
        if kind == "tensors":
            w.tensor = {k: np.array(record[k]) for k in GEOMETRY}
            if buffers is not None:
                copies.append((put_image, (self.pipeline, record["image"], buffers, w.slot)))
                w.image_done = True
        else:
            if buffers is not None:
                for name in MAP_NAMES:
                    copies.append((np.copyto, (buffers.maps[name][w.slot], record[name])))
            w.maps_done = True

    def decode(self, data: bytes, source: str) -> np.ndarray:
        return self.pipeline.decode(data, source)

    def make_tensor(self, w: Work, catalog: Catalog, flip: bool | None) -> dict[str, np.ndarray]:
        assert w.image is not None
        p = self.pipeline
        polys, _ = catalog.words(w.index)
        return p.tensor_record(p.apply_transform(w.image, polys, flip=flip))

    def make_maps(self, w: Work, catalog: Catalog) -> dict[str, np.ndarray]:
        assert w.tensor is not None
        p = self.pipeline
        polys, ignore = catalog.words(w.index)
        moved = p.transform_polygons(polys, w.tensor["matrix"])
        return p.maps_record(p.make_maps(moved, ignore))

    def sample(self, w: Work, catalog: Catalog, buffers: BatchBuffers, return_maps: bool) -> Sample:
        assert w.tensor is not None
        if not w.image_done:
            put_image(self.pipeline, w.tensor["image"], buffers, w.slot)
        computed = w.maps if return_maps and not w.maps_done else None
        return assemble(self.pipeline, catalog, w.index, w.tensor, buffers, w.slot, computed,
                        return_maps)

    def error_sample(self, w: Work, catalog: Catalog, buffers: BatchBuffers, return_maps: bool
                     ) -> Sample:
        return empty_sample(self.pipeline, catalog, w.index, w.error or "unknown error",
                            buffers, w.slot, return_maps)


class StageSamples:
    """A stage pipeline: records are the stages' own outputs (shapes known once made), taken
    into the rows of :class:`~diskcache_ocr.staged_samples.StageBuffers` when they fit."""

    tensor_reads_source = True  # the record carries the source's raw size and orientation

    def __init__(self, pipeline: StagePipeline, item_keys: str = "db") -> None:
        self.pipeline = pipeline
        self.item_keys = item_keys
        self.convention = pipeline.convention
        self.max_pixels = pipeline.max_pixels
        self.layout = StageLayout()  # the sample shapes this process packed last

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "layout"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.layout = StageLayout()

    def kind_versions(self) -> dict[str, KindVersion]:
        return self.pipeline.kind_versions()

    def record_key(self, kind: str, content: bytes, fingerprint: str,
                   words: Callable[[], bytes]) -> bytes:
        # both records hold (or follow) the moved polygons: the annotation is in the key
        return maps_key(content, words(), fingerprint)

    def buffers(self, n: int, *, return_maps: bool, shared: bool, pin: bool, compact: bool,
                reuse: bool) -> StageBuffers:
        # A deterministic stage's samples all have one shape: rows of one block. (Pinned
        # memory is not pooled: a pinning caller gets samples owning their arrays.)
        pack = self.pipeline.deterministic and not pin and reuse
        return StageBuffers(self.item_keys, shared=shared, pack=pack, layout=self.layout, n=n)

    def take(self, kind: str, record: Record, w: Work, buffers: StageBuffers | None,
             copies: list[Copy]) -> None:
        taken = take_record(record, buffers, w.slot)
        if kind == "tensors":
            w.tensor = taken
        else:
            w.maps = taken
            w.maps_done = True

    def decode(self, data: bytes, source: str) -> np.ndarray:
        return self.pipeline.decode(data, source)

    def make_tensor(self, w: Work, catalog: Catalog, flip: bool | None) -> dict[str, np.ndarray]:
        assert w.image is not None and w.content is not None
        raw_size, orientation = image_header(w.content)
        polys, _ = catalog.words(w.index)
        return self.pipeline.front(w.image, polys, raw_size, orientation)

    def make_maps(self, w: Work, catalog: Catalog) -> dict[str, np.ndarray]:
        assert w.tensor is not None
        image, moved, _ = self.pipeline.run_rest(w.tensor)
        return self.pipeline.make_maps(moved, image, catalog.words(w.index)[1])

    def sample(self, w: Work, catalog: Catalog, buffers: StageBuffers, return_maps: bool) -> Sample:
        assert w.tensor is not None
        return assemble_staged(self.pipeline, catalog, w.index, w.tensor,
                               w.maps if return_maps else None, return_maps, self.item_keys)

    def error_sample(self, w: Work, catalog: Catalog, buffers: StageBuffers, return_maps: bool
                     ) -> Sample:
        return empty_staged(self.pipeline, catalog, w.index, w.error or "unknown error",
                            return_maps, self.item_keys)


# The engine pipeline of each pipeline class: the one place that knows there are two.
ENGINE_PIPELINES: dict[type, Callable[..., EnginePipeline]] = {
    Pipeline: BuiltinSamples,
    StagePipeline: StageSamples,
}


def engine_pipeline(pipeline: Any, item_keys: str = "db") -> EnginePipeline:
    """The engine pipeline for ``pipeline``: a :class:`~diskcache_ocr.ocr.pipeline.Pipeline`,
    a :class:`~diskcache_ocr.ocr.staged.StagePipeline`, or an object that already is one."""
    for cls in type(pipeline).__mro__:
        make = ENGINE_PIPELINES.get(cls)
        if make is not None:
            return make(pipeline, item_keys)
    return cast(EnginePipeline, pipeline)


class RecordKeys:
    """The name and key of each record an engine's pipeline caches, by kind.

    A kind is keyed by its fingerprint: the pipeline's, or the stored one a kind is pinned
    to (:meth:`pin`, ``on_mismatch="ignore"``). A kind the pipeline cannot version has none,
    and is never read or written. Images of the library's decode are keyed by content alone;
    another decode's (a convention that drops alpha) by content and decode, so the two never
    collide.
    """

    def __init__(self, pipe: EnginePipeline, catalog: Catalog) -> None:
        self.pipe = pipe
        self.catalog = catalog
        self.fingerprints = {k: v.fingerprint for k, v in pipe.kind_versions().items()}
        self._named()

    def _named(self) -> None:
        # (read once: the names and the images rule are asked for every record of a batch)
        self._plain = self.fingerprints.get("images") == library_decode().fingerprint
        self._names = {kind: record_name(kind, self.fingerprints.get(kind, ""),
                                         plain=kind == "images" and self._plain)
                       for kind in KINDS}

    def versioned(self, kind: str) -> bool:
        return kind in self.fingerprints

    def pin(self, kind: str, fingerprint: str) -> None:
        """Key ``kind`` by ``fingerprint`` (a stored version's) instead of the pipeline's."""
        self.fingerprints[kind] = fingerprint
        self._named()

    def name(self, kind: str) -> str:
        """The name an index entry gives the ``kind`` record (:func:`record_name`)."""
        return self._names[kind]

    def key(self, kind: str, index: int, h: bytes) -> bytes:
        """The key of image ``index``'s ``kind`` record, its file hashing to ``h``."""
        if kind == "images":
            return h if self._plain else derived_image_key(h, self.fingerprints[kind])
        return self.pipe.record_key(
            kind, h, self.fingerprints[kind],
            lambda: flat_polygons_bytes(*self.catalog.flat_words(index)))

    def of(self, index: int, h: bytes) -> dict[str, bytes]:
        """Every versioned kind's record of image ``index``: name -> key."""
        return {self.name(kind): self.key(kind, index, h)
                for kind in KINDS if kind in self.fingerprints}


@functools.cache
def library_decode() -> KindVersion:
    """The ``images`` version of the library's own decode (every pipeline's, unless its
    convention decodes otherwise): its records are keyed by content alone."""
    return Pipeline().kind_versions()["images"]


__all__ = ["BuiltinSamples", "Buffers", "EnginePipeline", "RecordKeys", "StageSamples",
           "engine_pipeline", "library_decode"]
