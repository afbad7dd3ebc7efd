"""The read-through engine: look up a batch, compute the misses, write them back, fill buffers.

Every face goes through :class:`ReadThrough`: the torch Dataset, the batched loader, prebuild
and ``verify --recompute``. One batch is looked up in one read transaction (cached arrays are
copied straight from LMDB's map into the batch buffers while it lives), the misses are computed
by the pipeline outside it, and everything new is written in one write transaction.

The pipeline comes in as an object and is held as an
:class:`~diskcache_ocr.pipelines.EnginePipeline`: the engine asks it for kind versions, record
keys, batch buffers, decode, the records of a miss and the samples, never which kind of
pipeline it is, and computes nothing itself. What is read, written and returned comes from a
:class:`~diskcache_ocr.presets.CachePlan`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
from torch.utils.data import get_worker_info

from diskcache_ocr import batchmem
from diskcache_ocr.errors import CacheError, CacheFullError, SourceError
from diskcache_ocr.keys import content_hash
from diskcache_ocr.pipelines import (
    Buffers,
    EnginePipeline,
    RecordKeys,
    engine_pipeline,
    library_decode,
)
from diskcache_ocr.presets import CachePlan
from diskcache_ocr.samples import Catalog, Sample, finish_batch
from diskcache_ocr.schema import (
    KINDS,
    IndexEntry,
    KindVersion,
    format_hit_rates,
    index_key,
    name_kind,
)
from diskcache_ocr.store import CacheStore, ReadTxn, Record, WriteBatch
from diskcache_ocr.work import Copy, Work

log = logging.getLogger("diskcache_ocr.readthrough")

CopyRunner = Callable[[list[Copy]], None]


def pipeline_role(images_dir: str | os.PathLike[str], split: str, output: str,
                  convention: str) -> str:
    """The role of a pipeline in a cache (see :meth:`ReadThrough.role`)."""
    return (f"{os.path.realpath(images_dir)} split={split} output={output} "
            f"convention={convention}")


def plain_versions() -> dict[str, KindVersion]:
    """The version whose records are keyed by content alone: images decoded by the
    library's own decode (every pipeline's, unless its convention decodes otherwise)."""
    return {"images": library_decode()}


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

    def __init__(self, catalog: Catalog, pipeline: Any, plan: CachePlan,
                 store: CacheStore | None, *, check_source: bool = True,
                 item_keys: str = "db") -> None:
        self.catalog = catalog
        # (a Pipeline, a StagePipeline, or an EnginePipeline already: see pipelines.py)
        self.pipe: EnginePipeline = engine_pipeline(pipeline, item_keys)
        self.plan = plan
        self.store = store
        self.check_source = check_source
        self.item_keys = item_keys
        self._records = RecordKeys(self.pipe, catalog)
        # The plan, read once into plain flags for the per-sample path; a kind the
        # pipeline cannot version (an unversioned stage, a random transform) is never kept.
        self._versioned = frozenset(k for k in KINDS if self._records.versioned(k))
        self._keep = tuple(k for k in KINDS if plan.caches(k) and k in self._versioned)
        self._images, self._tensors, self._maps = (k in self._keep for k in KINDS)
        self._frozen: frozenset[str] = frozenset()  # kinds served as stored, never written
        self._init_runtime()

    def _init_runtime(self) -> None:
        self.write_seconds = 0.0  # time spent committing read-through writes, this process
        self._log = EngineLog()
        # The index knows a source by its path under the resolved root (see schema.source_id).
        self._root = os.path.realpath(self.catalog.images_dir)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for name in ("_log", "write_seconds", "_root"):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    # -- public surface -----------------------------------------------------------------
    @property
    def pipeline(self) -> Any:
        """The pipeline object this engine runs (its decode, transform and maps)."""
        return self.pipe.pipeline

    def role(self, split: str, output: str) -> str:
        """What this engine's pipeline replaces in a cache when it changes: the pipeline
        reading the same images directory, for the same split, in the same output form, by
        the same convention. Pipelines of other roles keep their records beside it."""
        return pipeline_role(self.catalog.images_dir, split, output, self.pipe.convention)

    def kind_versions(self) -> dict[str, KindVersion]:
        """Versions of the kinds this plan caches (what the store's header must agree with)."""
        versions = self.pipe.kind_versions()
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
                self._records.pin(kind, KindVersion.from_dict(have).fingerprint)
                frozen.append(kind)
        self._frozen = frozenset(frozen)
        return frozen

    def keys(self, index: int, content: bytes) -> dict[str, bytes]:
        """The record of every kind for image ``index`` whose file hashes to ``content``,
        by the name the index gives it (:func:`~diskcache_ocr.schema.record_name`)."""
        return self._records.of(index, content)

    def buffers(self, n: int, *, shared: bool = False, pin: bool = False,
                compact: bool = False, reuse: bool | None = None) -> Buffers:
        """Buffers for ``n`` samples; ``compact`` keeps a uint8 image and uint8 binary maps
        for :meth:`finish` to widen later (on a device)."""
        return self.pipe.buffers(
            n, return_maps=self.plan.return_maps, shared=shared, pin=pin, compact=compact,
            reuse=self.plan.reuse_batch_memory if reuse is None else reuse)

    def samples(self, indices: Sequence[int], buffers: Buffers,
                run_copies: CopyRunner | None = None) -> list[Sample]:
        """A batch of samples over ``buffers``; ``run_copies`` runs the copies made inside
        the read transaction (e.g. on a thread pool), in order, before it ends."""
        indices = list(indices)
        out: list[Sample] = []
        if buffers.needs_layout(len(indices)):
            # The shapes are not known yet in this process: one sample first teaches them,
            # so the rest of the batch is copied straight into its rows.
            out = self._samples(indices[:1], buffers, run_copies, 0)
            buffers.learn(out[0], len(indices))
            indices = indices[1:]
        out += self._samples(indices, buffers, run_copies, len(out))
        out = buffers.pack(out)
        self._log.progress(len(out), self.plan.log_every, self.store)
        return out

    def _samples(self, indices: Sequence[int], buffers: Buffers,
                 run_copies: CopyRunner | None, first_slot: int) -> list[Sample]:
        work = self.process(indices, want_maps=self.plan.return_maps, buffers=buffers,
                            run_copies=run_copies, keep=self.plan.serve_writes,
                            first_slot=first_slot)
        return [self._assemble(w, buffers) for w in work]

    def batch(self, indices: Sequence[int], buffers: Buffers,
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
                w.stat_source(self.catalog.images_dir)
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

    def recompute(self, index: int, data: bytes, *, want_maps: bool = True,
                  with_maps: bool | None = None
                  ) -> dict[str, tuple[bytes, dict[str, np.ndarray]]]:
        """Every kind's record for image ``index`` from its bytes alone, by the same code a
        miss runs (no cache involved): kind -> (key, arrays); the maps only with
        ``want_maps`` (``with_maps``: its former name)."""
        if with_maps is not None:
            want_maps = with_maps
        w = Work(index=index, source=self.catalog.source(index), content=data,
                 content_hash=content_hash(data))
        self._compute(w, want_maps=want_maps, want_tensor=True, keep=KINDS, flip=False)
        if w.error is not None:
            raise SourceError(w.source, w.error)
        return {kind: (key, arrays) for kind, key, arrays in w.writes}

    def process(self, indices: Sequence[int], *, want_maps: bool, want_tensor: bool = True,
                buffers: Buffers | None = None, run_copies: CopyRunner | None = None,
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
            w.stat_source(self.catalog.images_dir)
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
    def _id(self, w: Work) -> str:
        return os.path.join(self._root, w.source)

    def _matches(self, entry: IndexEntry, st: os.stat_result) -> bool:
        return not self.check_source or entry.matches(st)

    def _lookup(self, txn: ReadTxn, w: Work, want_maps: bool, buffers: Buffers | None,
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
        elif not w.read_source(self.catalog.images_dir, self.pipe.max_pixels):
            return
        h = w.content_hash
        assert h is not None
        for kind, wanted in (("tensors", self._tensors), ("maps", want_maps and self._maps)):
            rec = self._get(txn, kind, self._records.key(kind, w.index, h), w) if wanted else None
            if rec is not None:
                self.pipe.take(kind, rec, w, buffers, copies)
        if self._images and w.tensor is None:
            rec = self._get(txn, "images", self._records.key("images", w.index, h), w)
            if rec is not None:
                w.image = np.array(rec["image"])  # the transform needs it after the block
        elif (self._images and (w.entry is None or self._records.name("images") not in w.entry.keys)
              and txn.contains("images", self._records.key("images", w.index, h))):
            # Not needed now, but the new index entry must name it, or invalidating this
            # source later would leave the image record behind.
            w.hits[self._records.name("images")] = self._records.key("images", w.index, h)

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
        w.hits[self._records.name(kind)] = key
        return rec

    def _compute(self, w: Work, want_maps: bool, want_tensor: bool, keep: Sequence[str],
                 flip: bool | None = None) -> None:
        """Compute what the cache did not have; note the kinds in ``keep`` for writing. Maps
        the pipeline cannot cache (a random transform's) are made with the sample instead."""
        if w.error is not None:
            return
        p = self.pipe
        keep = [k for k in keep if k in self._versioned]
        maps = want_maps and "maps" in self._versioned  # (else made with the sample)
        try:
            for _ in range(2):  # (again after reading: a replaced file, see read_source)
                need_maps = maps and not w.maps_done
                need_tensor = w.tensor is None and (want_tensor or need_maps)
                need_image = w.image is None and w.tensor is None and (
                    need_tensor or "images" in keep)
                if w.content is not None or not (
                        need_image or (need_tensor and p.tensor_reads_source)):
                    break
                if not w.read_source(self.catalog.images_dir, p.max_pixels):
                    return
            if need_image:
                assert w.content is not None
                w.image = p.decode(w.content, w.source)
                self._note(w, "images", {"image": w.image}, keep)
            if need_tensor:
                w.tensor = p.make_tensor(w, self.catalog, flip)
                self._note(w, "tensors", w.tensor, keep)
            if need_maps:
                w.maps = p.make_maps(w, self.catalog)
                self._note(w, "maps", w.maps, keep)
        except SourceError as exc:
            w.error = exc.reason

    def _note(self, w: Work, kind: str, record: dict[str, np.ndarray], keep: Sequence[str]
              ) -> None:
        if kind in keep:
            assert w.content_hash is not None
            w.writes.append((kind, self._records.key(kind, w.index, w.content_hash), record))

    def _write_back(self, work: list[Work]) -> None:
        assert self.store is not None
        batch = WriteBatch()
        for w in work:
            if self._frozen:
                w.writes = [wr for wr in w.writes if wr[0] not in self._frozen]
            for kind, key, arrays in w.writes:
                batch.put(kind, key, arrays)
            if not w.has_news():
                continue
            if not w.unchanged_since_stat(self.catalog.images_dir):
                continue  # the file changed while we read it: serve, but do not index
            if len(index_key(self._id(w))) > self.store.max_key_size():
                self._log.once(f"{w.source}: name too long to index; its records are found "
                               "by content, at the cost of reading the file on every access")
                continue  # (one such key would fail the whole write)
            status = "ok" if w.error is None else f"failed: {w.error}"
            assert w.stat is not None and w.content_hash is not None
            keys = w.index_keys({self._records.name(kind): key for kind, key, _ in w.writes})
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

    def _assemble(self, w: Work, buffers: Buffers) -> Sample:
        if w.error is not None or w.tensor is None:
            self._log.error(w)
            return self.pipe.error_sample(w, self.catalog, buffers, self.plan.return_maps)
        return self.pipe.sample(w, self.catalog, buffers, self.plan.return_maps)


class EngineLog:
    """What an engine logs: each message once per process, and the hit rates now and then."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._served = 0
        self._logged: set[str] = set()

    def once(self, message: str) -> None:
        with self._lock:
            if message in self._logged:
                return
            self._logged.add(message)
        log.warning("%s", message)

    def error(self, w: Work) -> None:
        with self._lock:
            if w.source in self._logged:
                return
            self._logged.add(w.source)
        log.error("%s: skipped (%s)", w.source, w.error)

    def progress(self, n: int, every: int | None, store: CacheStore | None) -> None:
        if not every or store is None:
            return
        with self._lock:
            before, self._served = self._served, self._served + n
        if before // every != self._served // every:
            log.info("cache after %d samples (pid %d): %s", self._served, os.getpid(),
                     format_hit_rates(store.stats()))


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
