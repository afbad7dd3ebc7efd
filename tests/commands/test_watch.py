"""The watchdog service: event-driven and start-up invalidation of changed sources."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from testkit import rebase_index
from watchdog.observers.inotify import InotifyObserver

from diskcache_ocr.dataset import CachedOCRDataset
from diskcache_ocr.errors import CacheError
from diskcache_ocr.schema import source_id
from diskcache_ocr.store import CacheStore, IndexEntry
from diskcache_ocr.synth import split_paths, synthesize
from diskcache_ocr.watch import Watcher, WatchSummary

NAMES = [f"receipt_{i:05d}.jpg" for i in range(5)]
WAIT_S = 10.0


def ids(images: Path, names: list[str]) -> list[str]:
    """The index knows a source by its path under the resolved images directory."""
    return [source_id(images, n) for n in names]


@pytest.fixture(scope="module")
def built_env(tmp_path_factory):
    """A 5-image dataset and a full validation_optimized cache of it under the dataset's root,
    built once for the module."""
    root = tmp_path_factory.mktemp("watched")
    synthesize(root, 5, seed=1, min_words=3, max_words=8, size=(240, 320))
    images, ann = split_paths(root)
    CachedOCRDataset(images, ann, root / "cache", preset="validation_optimized").close()
    return root


@pytest.fixture
def env(built_env, tmp_path):
    """A private copy of ``built_env`` in ``tmp_path``, its index as a build there would
    have written it (tests change files, the cache and the index)."""
    shutil.copytree(built_env, tmp_path, dirs_exist_ok=True)
    rebase_index(tmp_path / "cache", built_env, tmp_path)
    (images, ann), cache = split_paths(tmp_path), tmp_path / "cache"
    store = CacheStore(cache)
    assert [s for s, _ in store.iter_index()] == ids(images, NAMES)
    yield images, ann, cache, store
    store.close()


def wait_until(pred, timeout: float = WAIT_S) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


def gone(store: CacheStore, source: str) -> bool:
    store.refresh()
    return store.get_index(source) is None


def rewrite(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    # Same-size rewrites within one timestamp tick would look unchanged to a stat check.
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))


def assert_same(a: dict, b: dict) -> None:
    for name in ("image", "prob_map", "thresh_map", "inverse_matrix"):
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("polling", [False, True], ids=["inotify", "polling"])
def test_changes_invalidate_entries_and_reads_see_new_data(env, polling):
    images, ann, cache, store = env
    old = {s: store.get_index(source_id(images, s)) for s in NAMES}
    # Built before the changes: the cached one preloads now, while everything is unchanged.
    cached = CachedOCRDataset(images, ann, cache, preset="validation_optimized")
    fresh = CachedOCRDataset(images, ann, None, preset={"load_maps": True})
    w = Watcher(cache, images, ann, debounce_s=0.2, polling=polling, poll_interval_s=0.2)
    w.start()
    try:
        assert w.mode == ("polling" if polling else "inotify")
        rewrite(images / NAMES[0], (images / NAMES[3]).read_bytes())
        (images / NAMES[1]).unlink()
        (images / NAMES[2]).rename(images / "renamed.jpg")
        changed = NAMES[:3]
        assert wait_until(lambda: all(gone(store, source_id(images, s)) for s in changed)), \
            "not invalidated"
        assert w.wait_idle(WAIT_S)
        for s in changed:
            for kind, key in old[s].records():
                assert not store.contains(kind, key), (s, kind)
        for s in NAMES[3:]:  # untouched sources keep their entries and records
            assert store.get_index(source_id(images, s)) == old[s]
            assert all(store.contains(k, key) for k, key in old[s].records())
        summary = w.summary
        assert summary.invalidated == 3 and summary.reconciled == 0 and summary.events >= 3
    finally:
        summary = w.stop()
    assert summary.mode == w.mode and "3 sources invalidated" in summary.line()
    sample = cached[0]
    assert sample["meta"]["error"] is None
    assert_same(sample, fresh[0])
    missing = cached[1]
    assert missing["meta"]["error"] and NAMES[1] in missing["meta"]["error"]
    cached.close()


def test_debounce_collapses_rapid_writes(env, monkeypatch):
    images, ann, cache, store = env
    w = Watcher(cache, images, ann, debounce_s=0.5, polling=False)
    w.start()
    calls: list[list[str]] = []
    real = w.invalidate

    def spy(sources):
        sources = list(sources)
        calls.append(sources)
        return real(sources)

    monkeypatch.setattr(w, "invalidate", spy)
    try:
        data = (images / NAMES[0]).read_bytes()
        for i in range(5):
            rewrite(images / NAMES[0], data + bytes(i + 1))  # trailing bytes: still a JPEG
        assert wait_until(lambda: gone(store, source_id(images, NAMES[0])))
        # A fence: events arrive in order, so once a later change to another source has
        # been handled, every event of the rewrites was too (a late one would have made a
        # second invalidation of NAMES[0] by now).
        rewrite(images / NAMES[1], (images / NAMES[1]).read_bytes() + b"\0")
        assert wait_until(lambda: gone(store, source_id(images, NAMES[1])))
        assert w.wait_idle(WAIT_S)
    finally:
        summary = w.stop()
    assert calls == [ids(images, NAMES[:1]), ids(images, NAMES[1:2])]
    assert summary.invalidated == 2 and summary.events >= 6


def test_reconcile_finds_changes_made_while_not_watching(env):
    images, ann, cache, store = env
    rewrite(images / NAMES[0], (images / NAMES[0]).read_bytes() + b"\0")
    (images / NAMES[1]).unlink()
    st = (images / NAMES[2]).stat()
    os.utime(images / NAMES[2], ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    w = Watcher(cache, images, ann)
    try:
        assert w.reconcile() == 3
        store.refresh()
        assert [s for s, _ in store.iter_index()] == ids(images, NAMES[3:])
        assert w.reconcile() == 0
    finally:
        summary = w.stop()
    assert (summary.reconciled, summary.invalidated) == (3, 3)


def test_reconcile_never_stats_outside_the_root(env, tmp_path):
    images, ann, cache, store = env
    outside = tmp_path / "outside.jpg"  # images/val/../../outside.jpg
    outside.write_bytes(b"x")
    st = outside.stat()
    entry = IndexEntry(size=st.st_size, mtime_ns=st.st_mtime_ns, content_hash=b"h" * 32)
    with store.writer() as b:  # would look fresh if the watcher followed the name out
        b.put_index("../../outside.jpg", entry)
    w = Watcher(cache, images, ann)
    try:
        assert w.reconcile() == 1
    finally:
        w.stop()
    assert gone(store, "../../outside.jpg") and outside.exists()


def test_non_images_and_annotation_edits_invalidate_nothing(env, monkeypatch):
    images, ann, cache, store = env
    before = dict(store.iter_index())
    w = Watcher(cache, images, ann, debounce_s=0.2, polling=False)
    counted: set[Path] = set()  # paths of the events the watcher took as relevant
    classify = w._classify

    def spy(path):
        key = classify(path)
        if key is not None:
            counted.add(path)
        return key

    monkeypatch.setattr(w, "_classify", spy)
    w.start()
    try:
        (images / "notes.txt").write_text("hello")
        (images / "sub").mkdir()
        (images / "sub" / "x.jpg.part").write_bytes(b"partial")
        # An editor's save: write a temporary file, then rename it over the original.
        data = json.loads(ann.read_text())
        tmp = ann.with_name(".val.json.swp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, ann)
        assert wait_until(lambda: w.summary.annotation_changes >= 1)
        # A fence: events arrive in order, so once a later change to a source has been
        # handled, any event the files above could have caused would have been counted.
        rewrite(images / NAMES[0], (images / NAMES[0]).read_bytes() + b"\0")
        assert wait_until(lambda: gone(store, source_id(images, NAMES[0])))
        assert w.wait_idle(WAIT_S)
    finally:
        summary = w.stop()
    # Only the rename over the annotation file and the fence counted; the other files are
    # not sources, and the annotation edit invalidated nothing.
    assert counted == {ann.resolve(), (images / NAMES[0]).resolve()}
    assert (summary.invalidated, summary.annotation_changes) == (1, 1)
    store.refresh()
    before.pop(source_id(images, NAMES[0]))
    assert dict(store.iter_index()) == before


def test_falls_back_to_polling_when_inotify_cannot_start(env, monkeypatch, caplog):
    images, ann, cache, store = env

    def no_watches(self):
        raise OSError(errno.ENOSPC, "inotify watch limit reached")

    monkeypatch.setattr(InotifyObserver, "start", no_watches)
    with pytest.raises(CacheError, match="watch limit"):
        Watcher(cache, images, ann, polling=False).start()
    caplog.set_level(logging.WARNING, logger="diskcache_ocr.watch")
    w = Watcher(cache, images, ann, debounce_s=0.1, poll_interval_s=0.2)
    w.start()
    try:
        assert w.mode == "polling"
        assert any("falling back to polling" in r.getMessage() for r in caplog.records)
        (images / NAMES[4]).unlink()
        assert wait_until(lambda: gone(store, source_id(images, NAMES[4])))
    finally:
        summary = w.stop()
    assert summary.mode == "polling" and summary.invalidated == 1


def test_watcher_refuses_a_missing_cache(tmp_path):
    (tmp_path / "img").mkdir()
    with pytest.raises(CacheError, match="no cache"):
        Watcher(tmp_path / "nocache", tmp_path / "img")
    assert not (tmp_path / "nocache").exists()


def test_summary_line():
    line = WatchSummary(invalidated=3, reconciled=2, events=12, mode="polling").line()
    assert line == "watch: 12 events, 3 sources invalidated (2 at start), polling"


@pytest.mark.full
def test_serve_stops_on_sigterm_with_a_summary(env):
    images, ann, cache, store = env
    (images / NAMES[0]).unlink()  # found by the start-up scan
    code = ("import sys; from diskcache_ocr.cli import main; sys.exit(main(['watch', "
            "'--cache', sys.argv[1], '--images', sys.argv[2], '--annotations', sys.argv[3], "
            "'--debounce', '0.1']))")
    proc = subprocess.Popen([sys.executable, "-c", code, str(cache), str(images), str(ann)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killer = threading.Timer(60, proc.kill)  # never hang the suite
    killer.start()
    try:
        start = proc.stdout.readline()
        assert re.match(r"watch: (inotify|polling), watching .*1 stale at start", start), start
        (images / NAMES[1]).unlink()
        assert wait_until(lambda: gone(store, source_id(images, NAMES[1])))
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        killer.cancel()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    last = out.strip().splitlines()[-1]
    assert re.fullmatch(r"watch: \d+ events?, 2 sources invalidated \(1 at start\), "
                        r"(inotify|polling)", last), last


def test_a_dead_service_thread_takes_the_service_down(env, monkeypatch):
    """Issue 16 item 14: a flush thread that dies (it did on `--debounce inf`) must stop
    the service with a message, not leave it running and invalidating nothing."""
    from diskcache_ocr import watch

    images, ann, cache, store = env

    def dies(self):
        raise OverflowError("timestamp out of range")

    monkeypatch.setattr(Watcher, "_flush_until_stopped", dies)
    stop = threading.Event()
    try:
        with pytest.raises(CacheError, match="invalidation thread stopped.*OverflowError"):
            watch.run(cache, images, ann, stop=stop, polling=True)
    finally:
        stop.set()


def test_no_error_escapes_the_observer_thread(env, caplog):
    images, ann, cache, store = env
    w = Watcher(cache, images, ann, debounce_s=0.1, polling=False)
    w.start()
    try:
        def broken(sources):
            raise CacheError("disk full (simulated)")

        w.invalidate = broken  # type: ignore[method-assign]
        (images / NAMES[2]).unlink()
        assert wait_until(lambda: any("simulated" in r.getMessage() for r in caplog.records))
        (images / NAMES[3]).unlink()  # the service is still alive and still collecting
        assert wait_until(lambda: w.summary.events >= 2)
    finally:
        w.stop()
    assert np.all([not gone(store, source_id(images, s)) for s in (NAMES[2], NAMES[3])])
