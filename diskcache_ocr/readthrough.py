"""The read-through engine: look up a batch, compute the misses, write them back, fill buffers.

Every face goes through :class:`ReadThrough`: the torch Dataset, the batched loader, prebuild
and ``verify --recompute``. One batch is looked up in one read transaction (cached arrays are
copied straight from LMDB's map into the batch buffers while it lives), the misses are computed
by the pipeline outside it, and everything new is written in one write transaction.

The pipeline stages come in as an object (:class:`~diskcache_ocr.ocr.pipeline.Pipeline`): the
engine asks it for kind versions, decode, transform, record layouts and maps, and never
computes anything itself. What is read, written and returned comes from a
:class:`~diskcache_ocr.presets.CachePlan`.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from torch.utils.data import get_worker_info

from diskcache_ocr import batchmem
from diskcache_ocr.errors import CacheError, CacheFullError, ImageDecodeError, SourceError
from diskcache_ocr.keys import content_hash, derive_key
from diskcache_ocr.ocr.annotations import safe_source_path
from diskcache_ocr.ocr.decode import read_image_file
from diskcache_ocr.ocr.maps import MAP_NAMES
from diskcache_ocr.ocr.pipeline import Pipeline
from diskcache_ocr.ocr.staged import StagePipeline, image_header
from diskcache_ocr.presets import CachePlan
from diskcache_ocr.samples import (
    GEOMETRY,
    BatchBuffers,
    Catalog,
    Sample,
    assemble,
    empty_sample,
    finish_batch,
    put_image,
)
from diskcache_ocr.schema import (
    KINDS,
    MAX_NAMES,
    IndexEntry,
    KindVersion,
    derived_image_key,
    flat_polygons_bytes,
    format_hit_rates,
    index_key,
    maps_key,
    name_kind,
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
from diskcache_ocr.store import CacheStore, ReadTxn, Record, WriteBatch

log = logging.getLogger("diskcache_ocr.readthrough")

Copy = tuple[Callable[..., Any], tuple[Any, ...]]
CopyRunner = Callable[[list[Copy]], None]


@dataclass
class Work:
    """One sample of a batch on its way through the engine."""

    index: int
    source: str
    slot: int = 0  # row in the batch buffers
    path: Path | None = None  # the checked path, resolved afresh for every batch
    stat: os.stat_result | None = None
    entry: IndexEntry | None = None  # the index entry, when it matches the file's stat
    content: bytes | None = None  # file bytes, when they had to be read
    content_hash: bytes | None = None
    image: np.ndarray | None = None  # decoded image, when needed and available
    geometry: dict[str, np.ndarray] | None = None  # matrix, inverse_matrix, orig_size
    tensor: dict[str, np.ndarray] | None = None  # a computed tensors-kind record
    maps: dict[str, np.ndarray] | None = None  # a computed maps-kind record
    image_done: bool = False  # the image already sits in the batch buffer
    maps_done: bool = False  # the maps were found (and, when reading, copied)
    error: str | None = None
    not_cached: CacheError | None = None  # why the write-back failed (the sample is fine)
    hits: dict[str, bytes] = field(default_factory=dict)  # kind -> key found in the cache
    writes: list[tuple[str, bytes, dict[str, np.ndarray]]] = field(default_factory=list)


def pipeline_role(images_dir: str | os.PathLike[str], split: str, output: str,
                  convention: str) -> str:
    """The role of a pipeline in a cache (see :meth:`ReadThrough.role`)."""
    return (f"{os.path.realpath(images_dir)} split={split} output={output} "
            f"convention={convention}")


def plain_versions() -> dict[str, KindVersion]:
    """The version whose records are keyed by content alone: images decoded by the
    library's own decode (every pipeline's, unless its convention decodes otherwise)."""
    return {"images": _library_decode()}


@functools.cache
def _library_decode() -> KindVersion:
    return Pipeline().kind_versions()["images"]


class BuildResult(NamedTuple):
    """What building one source did: its error (None when fine), whether anything new was
    computed."""

    source: str
    error: str | None
    computed: bool


class ReadThrough:
    """Samples of a :class:`Catalog` through a cache (or none), by a plan and a pipeline.

    Holds no open LMDB handle of its own: the store opens lazily in the process that reads,
    so the engine pickles (for DataLoader workers) as its parts.
    """

    def __init__(self, catalog: Catalog, pipeline: Pipeline | StagePipeline, plan: CachePlan,
                 store: CacheStore | None, *, check_source: bool = True,
                 item_keys: str = "db") -> None:
        self.catalog = catalog
        self.pipeline = pipeline
        self.plan = plan
        self.store = store
        self.check_source = check_source
        self.item_keys = item_keys
        # A stage pipeline's records are whole stage outputs: no zero-copy buffer layout.
        self._staged = isinstance(pipeline, StagePipeline)
        self._fingerprints = {k: v.fingerprint for k, v in pipeline.kind_versions().items()}
        # The plan, read once into plain flags for the per-sample path; a kind the
        # pipeline cannot version (an unversioned stage, a random transform) is never kept.
        self._keep = tuple(k for k in KINDS if plan.caches(k) and k in self._fingerprints)
        self._images, self._tensors, self._maps = (k in self._keep for k in KINDS)
        self._frozen: frozenset[str] = frozenset()  # kinds served as stored, never written
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._lock = threading.Lock()
        self.write_seconds = 0.0  # time spent committing read-through writes, this process
        self._served = 0
        self._logged: set[str] = set()
        self._layout = StageLayout()  # a stage pipeline's sample shapes, this process
        # The index knows a source by its path under the resolved root (see schema.source_id).
        self._root = os.path.realpath(self.catalog.images_dir)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for name in ("_lock", "_served", "_logged", "write_seconds", "_root", "_layout"):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    # -- public surface -----------------------------------------------------------------
    def role(self, split: str, output: str) -> str:
        """What this engine's pipeline replaces in a cache when it changes: the pipeline
        reading the same images directory, for the same split, in the same output form, by
        the same convention. Pipelines of other roles keep their records beside it."""
        return pipeline_role(self.catalog.images_dir, split, output,
                             getattr(self.pipeline, "convention", "db"))

    def kind_versions(self) -> dict[str, KindVersion]:
        """Versions of the kinds this plan caches (what the store's header must agree with)."""
        versions = self.pipeline.kind_versions()
        return {k: versions[k] for k in self._keep}

    def serve_stored(self, stored: Mapping[str, Any]) -> list[str]:
        """``on_mismatch="ignore"``: each kind whose stored version (``stored``, the
        header's ``kinds``) differs from this pipeline's is looked up by the stored version's
        keys, so what is stored is served, and nothing of it is written: its stamp stays
        true of every record under it. Returns those kinds."""
        frozen = []
        for kind, want in self.kind_versions().items():
            have = stored.get(kind)
            if have is not None and KindVersion.from_dict(have) != want:
                self._fingerprints[kind] = KindVersion.from_dict(have).fingerprint
                frozen.append(kind)
        self._frozen = frozenset(frozen)
        return frozen

    def keys(self, index: int, content: bytes) -> dict[str, bytes]:
        """The record of every kind for image ``index`` whose file hashes to ``content``,
        by the name the index gives it (:func:`~diskcache_ocr.schema.record_name`)."""
        out = {self._name("images"): self._image_key(content)}
        if "tensors" in self._fingerprints:
            out[self._name("tensors")] = self._tensor_key(index, content)
        if "maps" in self._fingerprints:
            out[self._name("maps")] = self._maps_key(index, content)
        return out

    def _plain_images(self) -> bool:
        return self._fingerprints.get("images") == _library_decode().fingerprint

    def _name(self, kind: str) -> str:
        return record_name(kind, self._fingerprints.get(kind, ""),
                           plain=kind == "images" and self._plain_images())

    def _image_key(self, h: bytes) -> bytes:
        """Images of the library's decode are keyed by content; another decode's (a
        convention that drops alpha) by content and decode, so the two never collide."""
        if self._plain_images():
            return h
        return derived_image_key(h, self._fingerprints["images"])

    def buffers(self, n: int, *, shared: bool = False, pin: bool = False,
                compact: bool = False, reuse: bool | None = None) -> BatchBuffers:
        """Buffers for ``n`` samples; ``compact`` keeps a uint8 image and uint8 binary maps
        for :meth:`finish` to widen later (on a device)."""
        if self._staged:  # stage outputs have the stage's shapes, known once a sample is made
            assert isinstance(self.pipeline, StagePipeline)
            # A deterministic stage's samples all have one shape: rows of one block. (Pinned
            # memory is not pooled: a pinning caller gets samples owning their arrays.)
            pack = (self.pipeline.deterministic and not pin
                    and (self.plan.reuse_batch_memory if reuse is None else reuse))
            return StageBuffers(self.item_keys, shared=shared,  # type: ignore[return-value]
                                pack=pack, layout=self._layout, n=n)
        return BatchBuffers(n, self.pipeline.transform.size, self.plan.return_maps,
                            shared=shared, pin=pin,
                            raw_image=compact and self.pipeline.transform.output == "compact",
                            raw_maps=compact,
                            reuse=self.plan.reuse_batch_memory if reuse is None else reuse)

    def samples(self, indices: Sequence[int], buffers: BatchBuffers,
                run_copies: CopyRunner | None = None) -> list[Sample]:
        """A batch of samples over ``buffers``; ``run_copies`` runs the copies made inside
        the read transaction (e.g. on a thread pool), in order, before it ends."""
        indices = list(indices)
        out: list[Sample] = []
        if isinstance(buffers, StageBuffers) and buffers.needs_layout(len(indices)):
            # The shapes are not known yet in this process: one sample first teaches them,
            # so the rest of the batch is copied straight into its rows.
            out = self._samples(indices[:1], buffers, run_copies, 0)
            buffers.learn(out[0], len(indices))
            indices = indices[1:]
        out += self._samples(indices, buffers, run_copies, len(out))
        if self._staged:
            assert isinstance(buffers, StageBuffers)
            out = buffers.pack(out)
        self._log_progress(len(out))
        return out

    def _samples(self, indices: Sequence[int], buffers: BatchBuffers,
                 run_copies: CopyRunner | None, first_slot: int) -> list[Sample]:
        work = self.process(indices, want_maps=self.plan.return_maps, buffers=buffers,
                            run_copies=run_copies, keep=self.plan.serve_writes,
                            first_slot=first_slot)
        return [self._assemble(w, buffers) for w in work]

    def batch(self, indices: Sequence[int], buffers: BatchBuffers,
              run_copies: CopyRunner | None = None) -> dict[str, Any]:
        """A batch in :func:`~diskcache_ocr.samples.collate`'s structure, over the buffers
        (compact when they are)."""
        return buffers.batch(self.samples(indices, buffers, run_copies))

    def finish(self, batch: dict[str, Any]) -> dict[str, Any]:
        """A compact batch as float32, exactly what the uncached path returns."""
        return finish_batch(batch)

    def build(self, indices: Sequence[int]) -> list[BuildResult]:
        """Make sure every kind the plan caches exists for ``indices``."""
        want_maps, want_tensor = self.plan.build_kinds()
        work = self.process(indices, want_maps=want_maps, want_tensor=want_tensor)
        for w in work:
            if isinstance(w.not_cached, CacheFullError):
                raise w.not_cached  # nothing more can be stored: stop the build, cache intact
        return [BuildResult(w.source, w.error or (f"not cached: {w.not_cached}"
                                                  if w.not_cached else None), bool(w.writes))
                for w in work]

    def missing(self, indices: Sequence[int]) -> tuple[list[int], list[tuple[str, str]]]:
        """Which of ``indices`` lack a cached kind (to build), and which are known to fail
        (source unchanged since it failed: not retried). One read transaction."""
        todo: list[int] = []
        failed: list[tuple[str, str]] = []
        if self.store is None:
            return list(indices), failed
        with self.store.lookups(), self.store.reader() as txn:
            for i in indices:
                w = Work(index=int(i), source=self.catalog.source(int(i)))
                self._stat(w)
                entry = None if w.stat is None else _index_entry(txn, self._id(w))
                if entry is None or w.stat is None or not self._matches(entry, w.stat):
                    todo.append(w.index)
                    continue
                if not entry.ok:
                    failed.append((w.source, entry.status))
                    continue
                needed = [(name_kind(n), key)
                          for n, key in self.keys(w.index, entry.content_hash).items()
                          if name_kind(n) in self._keep]
                if not all(txn.contains(kind, key) for kind, key in needed):
                    todo.append(w.index)
        return todo, failed

    def recompute(self, index: int, data: bytes, *, with_maps: bool = True
                  ) -> dict[str, tuple[bytes, dict[str, np.ndarray]]]:
        """Every kind's record for image ``index`` from its bytes alone, by the same code a
        miss runs (no cache involved): kind -> (key, arrays)."""
        w = Work(index=index, source=self.catalog.source(index), content=data,
                 content_hash=content_hash(data))
        self._compute(w, want_maps=with_maps, want_tensor=True, keep=KINDS, flip=False)
        if w.error is not None:
            raise SourceError(w.source, w.error)
        return {kind: (key, arrays) for kind, key, arrays in w.writes}

    def process(self, indices: Sequence[int], *, want_maps: bool, want_tensor: bool = True,
                buffers: BatchBuffers | None = None, run_copies: CopyRunner | None = None,
                keep: Sequence[str] | None = None, first_slot: int = 0) -> list[Work]:
        """Look up, compute and write back one batch (``keep``: the kinds to write back,
        default every cached kind; ``first_slot``: the buffer row of the first index)."""
        n = len(self.catalog)
        work = []
        for slot, i in enumerate(indices, start=first_slot):
            i = int(i)
            if not -n <= i < n:
                raise IndexError(f"index {i} out of range for a dataset of {n} images")
            work.append(Work(index=i % n, source=self.catalog.source(i % n), slot=slot))
        for w in work:
            self._stat(w)
        if self.store is not None:
            copies: list[Copy] = []
            with self.store.reader() as txn:
                for w in work:
                    self._lookup(txn, w, want_maps, buffers, copies)
                if copies:
                    # NOTE: the copies read views on the map: they must finish inside the block.
                    (run_copies or _run_inline)(copies)
        for w in work:
            self._compute(w, want_maps, want_tensor, self._keep if keep is None else keep)
        if self.store is not None and not self.store.readonly:
            self._write_back(work)
        return work

    # -- one batch, step by step ------------------------------------------------------------
    def _path(self, w: Work) -> Path:
        # NOTE: never kept beyond one batch: a symlink may be re-pointed at any time.
        if w.path is None:
            w.path = safe_source_path(self.catalog.images_dir, w.source)
        return w.path

    def _id(self, w: Work) -> str:
        return os.path.join(self._root, w.source)

    def _stat(self, w: Work) -> None:
        try:
            w.stat = os.stat(self._path(w))
        except (OSError, SourceError) as exc:
            w.error = f"cannot read source: {exc}"

    def _matches(self, entry: IndexEntry, st: os.stat_result) -> bool:
        return not self.check_source or entry.matches(st)

    def _lookup(self, txn: ReadTxn, w: Work, want_maps: bool, buffers: BatchBuffers | None,
                copies: list[Copy]) -> None:
        """Take what the cache holds for ``w``: queued as copies into the batch buffers,
        run while the read transaction (and so the views) is alive."""
        if w.error is not None:
            return
        assert w.stat is not None
        entry = _index_entry(txn, self._id(w))
        if entry is not None and self._matches(entry, w.stat):
            if not entry.ok:
                w.error = entry.status
                return
            w.entry = entry
            w.content_hash = entry.content_hash
        elif not self._read_source(w):
            return
        h = w.content_hash
        assert h is not None
        if self._tensors:
            rec = self._get(txn, "tensors", self._tensor_key(w.index, h), w)
            if rec is not None and self._staged:
                w.tensor = take_record(rec, buffers, w.slot)
                w.geometry = {}
            elif rec is not None:
                w.geometry = {k: np.array(rec[k]) for k in GEOMETRY}
                if buffers is not None:
                    copies.append((put_image, (self.pipeline, rec["image"], buffers, w.slot)))
                    w.image_done = True
        if want_maps and self._maps:
            rec = self._get(txn, "maps", self._maps_key(w.index, h), w)
            if rec is not None and self._staged:
                w.maps = take_record(rec, buffers, w.slot)
                w.maps_done = True
            elif rec is not None:
                if buffers is not None:
                    for name in MAP_NAMES:
                        copies.append((np.copyto, (buffers.maps[name][w.slot], rec[name])))
                w.maps_done = True
        if self._images and w.geometry is None:
            rec = self._get(txn, "images", self._image_key(h), w)
            if rec is not None:
                w.image = np.array(rec["image"])  # the transform needs it after the block
        elif (self._images and (w.entry is None or self._name("images") not in w.entry.keys)
              and txn.contains("images", self._image_key(h))):
            # Not needed now, but the new index entry must name it, or invalidating this
            # source later would leave the image record behind.
            w.hits[self._name("images")] = self._image_key(h)

    def _get(self, txn: ReadTxn, kind: str, key: bytes, w: Work) -> Record | None:
        assert self.store is not None
        try:
            rec = txn.get(kind, key)
        except CacheError as exc:  # a damaged record: recompute (and overwrite) it
            log.warning("%s", exc)
            rec = None
        if rec is None:
            self.store.count(kind, misses=1)
            return None
        self.store.count(kind, hits=1, bytes_read=rec.nbytes)
        w.hits[self._name(kind)] = key
        return rec

    def _read_source(self, w: Work) -> bool:
        try:
            data = read_image_file(self._path(w), w.source, max_pixels=self.pipeline.max_pixels)
        except ImageDecodeError as exc:
            # Refused from its first bytes or its size, unread: the failure is indexed
            # under a hash of the refusal (it is never a record key), so the unchanged file
            # is not retried.
            w.error = exc.reason
            w.content_hash = derive_key("refused", exc.reason)
            return False
        except (OSError, SourceError) as exc:
            w.error = f"cannot read source: {exc}"
            return False
        h = content_hash(data)
        if w.content_hash is not None and h != w.content_hash:
            # The file was replaced after its stat matched the index: what was taken from
            # the cache belongs to the old content. Every part comes from these bytes.
            self._forget_cached(w)
        w.content = data
        w.content_hash = h
        return True

    @staticmethod
    def _forget_cached(w: Work) -> None:
        w.entry, w.geometry, w.image = None, None, None
        w.image_done = w.maps_done = False
        w.hits.clear()

    def _tensor_key(self, index: int, h: bytes) -> bytes:
        if self._staged:  # the record holds the moved polygons: the annotation is in the key
            return maps_key(h, flat_polygons_bytes(*self.catalog.flat_words(index)),
                            self._fingerprints["tensors"])
        return tensor_key(h, self._fingerprints["tensors"])

    def _maps_key(self, index: int, h: bytes) -> bytes:
        return maps_key(h, flat_polygons_bytes(*self.catalog.flat_words(index)),
                        self._fingerprints["maps"])

    def _compute(self, w: Work, want_maps: bool, want_tensor: bool, keep: Sequence[str],
                 flip: bool | None = None) -> None:
        """Compute what the cache did not have; note the kinds in ``keep`` for writing."""
        if w.error is not None:
            return
        if self._staged:
            self._compute_staged(w, want_maps, want_tensor, keep)
            return
        need_maps = want_maps and not w.maps_done
        need_tensor = w.geometry is None and (want_tensor or need_maps)
        need_image = w.image is None and w.geometry is None and (need_tensor or "images" in keep)
        p = self.pipeline
        try:
            if need_image:
                if w.content is None and not self._read_source(w):
                    return
                need_maps = want_maps and not w.maps_done  # (a replaced file: see _read_source)
                assert w.content is not None and w.content_hash is not None
                w.image = p.decode(w.content, w.source)
                if "images" in keep:
                    w.writes.append(("images", self._image_key(w.content_hash),
                                     {"image": w.image}))
            if need_tensor:
                assert w.image is not None and w.content_hash is not None
                polys, _ = self.catalog.words(w.index)
                w.tensor = p.tensor_record(p.apply_transform(w.image, polys, flip=flip))
                w.geometry = {k: w.tensor[k] for k in GEOMETRY}
                if "tensors" in keep:
                    w.writes.append(("tensors", self._tensor_key(w.index, w.content_hash),
                                     w.tensor))
            if need_maps:
                assert w.geometry is not None and w.content_hash is not None
                polys, ignore = self.catalog.words(w.index)
                moved = p.transform_polygons(polys, w.geometry["matrix"])
                w.maps = p.maps_record(p.make_maps(moved, ignore))
                if "maps" in keep:
                    w.writes.append(("maps", self._maps_key(w.index, w.content_hash), w.maps))
        except SourceError as exc:
            w.error = exc.reason

    def _compute_staged(self, w: Work, want_maps: bool, want_tensor: bool,
                        keep: Sequence[str]) -> None:
        """The stage pipeline's compute: the ``tensors`` record (the transform's output, or its
        deterministic prefix's) and, for a deterministic transform, the maps from it. Maps of
        a random transform are made live in :meth:`_assemble`, after the random rest."""
        p = self.pipeline
        assert isinstance(p, StagePipeline)
        keep = [k for k in keep if k in self._fingerprints]
        cache_maps = "maps" in self._fingerprints
        need_maps = want_maps and cache_maps and not w.maps_done
        try:
            if w.tensor is None:
                if w.content is None and not self._read_source(w):
                    return
                assert w.content is not None and w.content_hash is not None
                if w.image is None:
                    w.image = p.decode(w.content, w.source)
                    if "images" in keep:
                        w.writes.append(("images", self._image_key(w.content_hash),
                                     {"image": w.image}))
                raw_size, orientation = image_header(w.content)
                polys, _ = self.catalog.words(w.index)
                w.tensor = p.front(w.image, polys, raw_size, orientation)
                w.geometry = {}
                if "tensors" in keep:
                    w.writes.append(("tensors", self._tensor_key(w.index, w.content_hash),
                                     w.tensor))
            if need_maps:
                assert w.content_hash is not None
                image, moved, _ = p.finish_sample(w.tensor)
                w.maps = p.make_maps(moved, image, self.catalog.words(w.index)[1])
                if "maps" in keep:
                    w.writes.append(("maps", self._maps_key(w.index, w.content_hash), w.maps))
        except SourceError as exc:
            w.error = exc.reason

    def _write_back(self, work: list[Work]) -> None:
        assert self.store is not None
        batch = WriteBatch()
        for w in work:
            if self._frozen:
                w.writes = [wr for wr in w.writes if wr[0] not in self._frozen]
            for kind, key, arrays in w.writes:
                batch.put(kind, key, arrays)
            if w.stat is None or w.content_hash is None:
                continue
            if w.entry is not None and not w.writes and w.hits.items() <= w.entry.keys.items():
                continue  # nothing new to say about this source
            if w.entry is None and not (w.writes or w.hits or w.error):
                continue  # nothing cached for it (e.g. only maps cached, maps not read)
            if not self._unchanged_since_stat(w):
                continue  # the file changed while we read it: serve, but do not index
            if len(index_key(self._id(w))) > self.store.max_key_size():
                self._log_once(f"{w.source}: name too long to index; its records are found "
                               "by content, at the cost of reading the file on every access")
                continue  # (one such key would fail the whole write)
            status = "ok" if w.error is None else f"failed: {w.error}"
            keys = dict(w.entry.keys) if w.entry is not None else {}
            keys.update(w.hits)  # records found by content (e.g. the file was touched)
            mine = {self._name(kind): key for kind, key, _ in w.writes}
            keys.update(mine)
            others = [n for n in keys if n not in mine and n not in w.hits]
            for name in others[:max(0, len(keys) - MAX_NAMES)]:
                del keys[name]  # (the oldest other names go: their records become orphans)
            batch.put_index(self._id(w), IndexEntry.of_stat(
                w.stat, w.content_hash, status=status, keys=keys, updated_ns=time.time_ns()))
        if len(batch):
            if get_worker_info() is not None:
                batchmem.keep_freed_memory()  # a DataLoader worker that writes
            started = time.perf_counter()
            try:
                self.store.commit(batch)
            except CacheError as exc:  # e.g. disk full: the sample is still served
                log.warning("not cached: %s", exc)
                for w in work:
                    w.not_cached = exc
            self.write_seconds += time.perf_counter() - started

    def _unchanged_since_stat(self, w: Work) -> bool:
        try:
            st = os.stat(self._path(w))
        except (OSError, SourceError):
            return False
        assert w.stat is not None
        return IndexEntry.of_stat(w.stat, b"").matches(st)

    def _assemble(self, w: Work, buffers: BatchBuffers) -> Sample:
        with_maps = self.plan.return_maps
        if self._staged:
            assert isinstance(self.pipeline, StagePipeline)
            if w.error is not None or w.tensor is None:
                self._log_error(w)
                return empty_staged(self.pipeline, self.catalog, w.index,
                                    w.error or "unknown error", with_maps, self.item_keys)
            return assemble_staged(self.pipeline, self.catalog, w.index, w.tensor,
                                   w.maps if with_maps else None, with_maps, self.item_keys)
        if w.error is not None or w.geometry is None:
            self._log_error(w)
            return empty_sample(self.pipeline, self.catalog, w.index,
                                w.error or "unknown error", buffers, w.slot, with_maps)
        if not w.image_done:
            assert w.tensor is not None
            put_image(self.pipeline, w.tensor["image"], buffers, w.slot)
        maps = None
        if with_maps and not w.maps_done:
            assert w.maps is not None
            maps = w.maps
        return assemble(self.pipeline, self.catalog, w.index, w.geometry, buffers, w.slot,
                        maps, with_maps)

    # -- logging ----------------------------------------------------------------------------
    def _log_once(self, message: str) -> None:
        with self._lock:
            if message in self._logged:
                return
            self._logged.add(message)
        log.warning("%s", message)

    def _log_error(self, w: Work) -> None:
        with self._lock:
            if w.source in self._logged:
                return
            self._logged.add(w.source)
        log.error("%s: skipped (%s)", w.source, w.error)

    def _log_progress(self, n: int) -> None:
        every = self.plan.log_every
        if not every or self.store is None:
            return
        with self._lock:
            before, self._served = self._served, self._served + n
        if before // every != self._served // every:
            log.info("cache after %d samples (pid %d): %s", self._served, os.getpid(),
                     format_hit_rates(self.store.stats()))


def _index_entry(txn: ReadTxn, source: str) -> IndexEntry | None:
    """The source's index entry; a damaged one counts as absent (recomputed, rewritten)."""
    try:
        return txn.get_index(source)
    except CacheError as exc:
        log.warning("%s", exc)
        return None


def _run_inline(copies: list[Copy]) -> None:
    for fn, args in copies:
        fn(*args)


__all__ = ["BuildResult", "ReadThrough", "Work", "pipeline_role", "plain_versions"]
