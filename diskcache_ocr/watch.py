"""The watchdog service: invalidate cache entries whose source images change.

A ``Watcher`` scans the index once (``reconcile``) and then follows file-system events on the
images directory (inotify, or polling where inotify is unavailable). Events are debounced per
source and applied by one background thread, one write transaction per batch.

NOTE: the watcher is an optimisation, not a correctness mechanism: every dataset read checks
the source's (size, mtime_ns) against the index anyway. Watching makes stale entries rare and
frees their space early.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from diskcache_ocr.errors import CacheError, SourceError
from diskcache_ocr.ocr.annotations import IMAGE_SUFFIXES, safe_source_path
from diskcache_ocr.schema import dataset_root, source_id, source_state
from diskcache_ocr.store import CacheStore, WriteBatch

_LOG = logging.getLogger("diskcache_ocr.watch")
# Event types that can change a file's bytes or stat; opened/closed carry no news.
_RELEVANT = frozenset({"created", "modified", "deleted", "moved", "attrib"})
_ANNOTATION = "\0annotations"  # pending-queue marker: no source name can contain NUL
# A file rewritten without pause would postpone its invalidation forever; cap the wait.
_MAX_WAIT_FACTOR = 10


@dataclass
class WatchSummary:
    """What a watcher did, for the final line of the service."""

    invalidated: int = 0  # sources invalidated in total, reconcile included
    reconciled: int = 0  # of which by the start-up scan
    events: int = 0  # relevant file-system events seen (before debouncing)
    mode: str = ""  # "inotify" or "polling"
    annotation_changes: int = 0

    def line(self) -> str:
        ann = f", {_n(self.annotation_changes, 'annotation change')}" \
            if self.annotation_changes else ""
        return (f"watch: {_n(self.events, 'event')}, {_n(self.invalidated, 'source')} "
                f"invalidated ({self.reconciled} at start){ann}, {self.mode or 'not started'}")


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


class Watcher:
    """Keeps a cache's index honest while the images under ``images_dir`` change.

    ``polling``: None tries inotify and falls back to polling when it cannot start, True
    forces polling, False requires inotify (a CacheError if it cannot start).
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike[str],
        images_dir: str | os.PathLike[str],
        annotations: str | os.PathLike[str] | None = None,
        *,
        debounce_s: float = 0.5,
        polling: bool | None = None,
        poll_interval_s: float = 1.0,
        log: logging.Logger = _LOG,
    ) -> None:
        if not (Path(cache_dir) / "data.mdb").is_file():
            raise CacheError(f"{cache_dir}: no cache here (no data.mdb) to watch")
        if not Path(images_dir).is_dir():
            raise SourceError(str(images_dir), "images directory does not exist")
        # Resolved, like the dataset's root, so event paths and index names agree.
        self.images_dir = Path(images_dir).resolve()
        self.annotations = None if annotations is None else Path(annotations).resolve()
        # A directory means ICDAR-2015 ground-truth files (one .txt per image).
        self._ann_is_dir = self.annotations is not None and self.annotations.is_dir()
        self.debounce_s = max(0.0, debounce_s)
        self.polling = polling
        self.poll_interval_s = poll_interval_s
        self.log = log
        self.mode = ""
        self.store = CacheStore(cache_dir)
        root = dataset_root(self.store.header())
        self.store.refresh()  # see _release_snapshot
        if root is not None and root != self.images_dir:
            log.warning("%s was built from %s, but %s is watched: entries may all look stale",
                        cache_dir, root, self.images_dir)
        self._summary = WatchSummary()
        self._cond = threading.Condition()
        self._pending: dict[str, tuple[float, float]] = {}  # source -> (first, last) event time
        self._busy = False
        self._stopping = False
        self._observer: BaseObserver | None = None
        self._flusher: threading.Thread | None = None
        self._died = ""  # why a service thread stopped, once one has

    def __enter__(self) -> Watcher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- scanning and invalidating -------------------------------------------------------
    def reconcile(self) -> int:
        """Invalidate every indexed source whose file is missing or whose stat changed."""
        self.store.refresh()  # see what other processes indexed up to now
        stale: list[str] = []
        under = os.path.join(str(self.images_dir), "")
        try:
            for source, entry in self.store.iter_index():
                # Sources of other datasets sharing the cache are theirs to judge; nothing
                # outside the root is stat'ed (a symlink leading out counts as missing).
                if not source.startswith(under) and os.path.isabs(source):
                    continue
                if source_state(self._locate, source, entry):
                    stale.append(source)
        except CacheError as exc:  # a damaged index entry ends the listing; keep what we have
            self.log.error("reconcile: index listing stopped early: %s", exc)
        n = self._invalidate_ids(stale)
        self._release_snapshot()
        with self._cond:
            self._summary.reconciled += n
        self.log.info("reconcile: %d of the indexed sources were stale", n)
        return n

    def invalidate(self, sources: Iterable[str]) -> int:
        """Delete the index entries of ``sources`` and the records they name, in one write
        transaction; returns how many sources had an entry. A source is its path or its
        name under the watched directory.

        NOTE: records are content-addressed, so another source with identical bytes may share
        a record deleted here; that source then recomputes it on its next read, nothing more.
        """
        return self._invalidate_ids({source_id(self.images_dir, s) for s in sources})

    def _locate(self, source: str) -> Path:
        return safe_source_path(self.images_dir, os.path.relpath(source, self.images_dir))

    def _invalidate_ids(self, ids: Iterable[str]) -> int:
        names = sorted(set(ids))
        batch, count = WriteBatch(), 0
        self.store.refresh()
        with self.store.reader() as r:
            for source in names:
                try:
                    entry = r.get_index(source)
                except CacheError as exc:  # unreadable entry: drop it, its records are orphans
                    self.log.warning("%s", exc)
                    batch.delete_index(source)
                    count += 1
                    continue
                if entry is not None:
                    batch.delete_index(source)
                    for kind, key in entry.records():  # (every pipeline's records)
                        batch.delete(kind, key)
                    count += 1
        if count:
            self.store.commit(batch)
        self._release_snapshot()
        with self._cond:
            self._summary.invalidated += count
        self.log.debug("invalidated %d of: %s", count, ", ".join(names))
        return count

    def _release_snapshot(self) -> None:
        # The store keeps a read transaction per thread until that thread reads again; an
        # idle service thread would pin old pages, LMDB could not reuse them, the file grows.
        self.store.refresh()

    # -- events --------------------------------------------------------------------------
    def _on_event(self, event: FileSystemEvent) -> None:
        """Observer thread: note which sources an event touches; never raises."""
        try:
            if event.is_directory or event.event_type not in _RELEVANT:
                return
            paths = [os.fsdecode(event.src_path)]
            if event.event_type == "moved":
                paths.append(os.fsdecode(event.dest_path))
            keys = [k for k in (self._classify(Path(p)) for p in paths) if k is not None]
            if not keys:
                return
            now = time.monotonic()
            with self._cond:
                self._summary.events += 1
                for key in keys:
                    first = self._pending.get(key, (now, now))[0]
                    self._pending[key] = (first, now)
                self._cond.notify_all()
        except Exception:  # a crashed observer thread would silently stop watching
            self.log.exception("watch: event %r not handled", event)

    def _classify(self, path: Path) -> str | None:
        """The source name of an image event, the annotation marker, or None to ignore."""
        ann = self.annotations
        if ann is not None and (path == ann or (self._ann_is_dir and path.parent == ann
                                                and path.suffix.lower() == ".txt")):
            return _ANNOTATION
        if not path.name.lower().endswith(IMAGE_SUFFIXES):
            return None
        # NOTE: a source reached through a symlink inside the root changes under another
        # name; the dataset's stat check and the next reconcile cover it.
        try:
            path.relative_to(self.images_dir)
        except ValueError:  # an image beside the annotation file, outside the root
            return None
        return str(path)  # its index identity (schema.source_id), the root being resolved

    def _flush_loop(self) -> None:
        """Background thread: apply debounced invalidations in batches. If it dies, the
        service must not go on looking healthy while it invalidates nothing: ``check``
        (called by ``run``) raises."""
        try:
            self._flush_until_stopped()
        except BaseException as exc:
            self._died = f"the invalidation thread stopped ({type(exc).__name__}: {exc})"
            self.log.critical("watch: %s", self._died)

    def check(self) -> None:
        """Raise CacheError when a service thread has died (the watch is then useless)."""
        if self._died:
            raise CacheError(f"watch stopped: {self._died}")
        obs = self._observer
        if obs is not None and not obs.is_alive():
            raise CacheError("watch stopped: the file-system observer thread died")

    def _flush_until_stopped(self) -> None:
        while True:
            with self._cond:
                now = time.monotonic()
                limit = self.debounce_s * _MAX_WAIT_FACTOR
                due_at = {k: min(last + self.debounce_s, first + limit)
                          for k, (first, last) in self._pending.items()}
                due = [k for k, t in due_at.items() if self._stopping or t <= now]
                if not due:
                    if self._stopping:
                        return
                    wait = min(due_at.values()) - now if due_at else None
                    self._cond.wait(wait)
                    continue
                for k in due:
                    del self._pending[k]
                self._busy = True
            try:
                self._apply(due)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _apply(self, due: list[str]) -> None:
        if _ANNOTATION in due:
            due.remove(_ANNOTATION)
            with self._cond:
                self._summary.annotation_changes += 1
            # Map keys include the polygons, so edited words get new records by themselves.
            self.log.info("annotations changed (%s): maps of edited images are rebuilt on read",
                          self.annotations)
        try:
            if due:
                n = self.invalidate(due)
                self.log.info("invalidated %d of %d changed sources", n, len(due))
        except CacheError as exc:
            self.log.error("watch: invalidation of %d sources failed: %s", len(due), exc)
        except Exception:  # keep serving: the dataset's own stat check still protects reads
            self.log.exception("watch: invalidation of %d sources failed", len(due))

    def wait_idle(self, timeout: float) -> bool:
        """True once no debounced event is pending or being applied (for tests)."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._pending and not self._busy, timeout)

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        """Start observing, then reconcile (events during the scan are queued, not lost)."""
        if self._flusher is not None:
            raise CacheError("this watcher was already started")
        self._flusher = threading.Thread(target=self._flush_loop, name="watch-flush",
                                         daemon=True)
        self._flusher.start()
        handler = _Handler(self._on_event)
        dirs = [self.images_dir]
        if self.annotations is not None:
            ann_dir = self.annotations if self._ann_is_dir else self.annotations.parent
            if not ann_dir.is_relative_to(self.images_dir):  # else the recursive watch has it
                dirs.append(ann_dir)
        try:
            self._observer = self._start_observer(handler, dirs)
            self._summary.mode = self.mode
            self.reconcile()
        except BaseException:
            self.stop()  # no thread or open store is left behind
            raise

    def _start_observer(self, handler: FileSystemEventHandler, dirs: list[Path]) -> BaseObserver:
        if not self.polling:
            obs: BaseObserver | None = None
            try:
                obs = Observer()
                _schedule(obs, handler, dirs).start()
                self.mode = "inotify" if "Inotify" in type(obs).__name__ else "native"
                return obs
            except OSError as exc:
                if obs is not None:
                    _quiet_stop(obs)
                if self.polling is False:
                    raise CacheError(f"cannot watch {self.images_dir}: {exc}") from exc
                # ENOSPC here is the inotify watch limit (fs.inotify.max_user_watches), not
                # the disk; EMFILE the instance limit. Polling needs neither.
                self.log.warning("inotify unavailable (%s); falling back to polling every %.1fs",
                                 exc, self.poll_interval_s)
        obs = PollingObserver(timeout=self.poll_interval_s)  # the emitter's poll interval
        _schedule(obs, handler, dirs).start()
        self.mode = "polling"
        return obs

    def stop(self) -> WatchSummary:
        """Stop observing, apply what is still pending, close the store; idempotent."""
        if self._observer is not None:
            _quiet_stop(self._observer)
            self._observer = None
        if self._flusher is not None:
            with self._cond:
                self._stopping = True
                self._cond.notify_all()
            self._flusher.join()
        self.store.close()
        return self.summary

    @property
    def summary(self) -> WatchSummary:
        with self._cond:
            return WatchSummary(**vars(self._summary))


class _Handler(FileSystemEventHandler):
    def __init__(self, callback: Callable[[FileSystemEvent], None]) -> None:
        self._callback = callback

    def on_any_event(self, event: FileSystemEvent) -> None:
        self._callback(event)


def _schedule(obs: BaseObserver, handler: FileSystemEventHandler,
              dirs: list[Path]) -> BaseObserver:
    for i, d in enumerate(dirs):  # the images directory recursively, the annotations' not
        obs.schedule(handler, str(d), recursive=i == 0)
    return obs


def _quiet_stop(obs: BaseObserver) -> None:
    try:
        obs.stop()
        if obs.is_alive():
            obs.join(timeout=10)
    except Exception as exc:  # stopping a half-started observer may fail; nothing to keep
        _LOG.debug("observer stop: %s", exc)


def run(
    cache_dir: str | os.PathLike[str],
    images_dir: str | os.PathLike[str],
    annotations: str | os.PathLike[str] | None = None,
    *,
    stop: threading.Event,
    polling: bool | None = None,
    debounce_s: float = 0.5,
    started: Callable[[Watcher], Any] | None = None,
) -> WatchSummary:
    """Run a watcher until ``stop`` is set; ``started`` is told once it watches. Returns
    the summary (the command line prints it and owns the signals that set ``stop``)."""
    watcher: Watcher | None = None
    try:
        watcher = Watcher(cache_dir, images_dir, annotations, polling=polling,
                          debounce_s=debounce_s)
        watcher.start()
        if started is not None:
            started(watcher)
        # (a timed wait keeps the main thread responsive to signal handlers)
        while not stop.wait(1.0):
            watcher.check()
    finally:
        summary = watcher.stop() if watcher is not None else None
    assert summary is not None
    return summary


__all__ = ["WatchSummary", "Watcher", "run"]
