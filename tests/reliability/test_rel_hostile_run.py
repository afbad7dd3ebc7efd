"""A hostile run: reproductions of what careless and hostile users found.

Each test asserts the behaviour the issue asks for through the public API only (the dataset,
BatchLoader, CacheStore, the command line). A test still marked ``xfail(strict=True)`` fails
on today's code for the reason in its docstring; fixing its cause makes it pass (and the
strict mark then fails, to be removed). Tests whose body could kill the interpreter run it
in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from PIL import Image
from relhelp import fill_disk, part_digests, sample_digest, small_tmpfs

from diskcache_ocr import BatchLoader, CachedOCRDataset, CacheError, CacheFormatError, CacheStore

WORD = [[20, 20], [120, 20], [120, 60], [20, 60]]


def _png(path: Path, size: tuple[int, int], colour: tuple[int, int, int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _ann(path: Path, *names: str) -> Path:
    path.write_text(json.dumps({"images": {n: {"words": {"1": {"points": WORD}}}
                                           for n in names}}))
    return path


def _fresh(images: Path, annotations: Path | None, index: int = 0) -> dict:
    """A sample computed without any cache, by the user's own pipeline."""
    ds = CachedOCRDataset(images, annotations, None, preset={"load_maps": True})
    return ds[index]


def _run_py(code: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``code`` in a fresh interpreter (a crash there is a return code here)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout)


# -- 1. two splits sharing one cache -----------------------------------------------------------
def test_item1_splits_sharing_a_cache_never_get_each_others_pixels(tmp_path):
    """train/img_1.bmp and val/img_1.bmp: same name, size and mtime, other pixels. Today the
    index is keyed by the name relative to the images directory and a (size, mtime) match
    trusts the stored content hash: train is served val's image."""
    train = _png(tmp_path / "train" / "img_1.bmp", (64, 48), (255, 0, 0))
    val = _png(tmp_path / "val" / "img_1.bmp", (64, 48), (0, 0, 255))
    assert train.stat().st_size == val.stat().st_size
    os.utime(train, ns=(val.stat().st_atime_ns, val.stat().st_mtime_ns))
    cache = tmp_path / "cache"
    CachedOCRDataset(val.parent, None, cache, preset="balanced")[0]
    got = CachedOCRDataset(train.parent, None, cache, preset="balanced")[0]
    want = _fresh(train.parent, None)
    assert got["meta"]["error"] is None
    assert part_digests(got)["image"] == part_digests(want)["image"]


def test_item1_clear_stale_keeps_the_other_splits_entries(tmp_path, capsys):
    """`clear --stale` without --images judges every entry against one dataset root: the
    other split's entries are counted stale. Asserted through the dry run's report."""
    from testkit import run_cli

    for split, colour in (("train", (255, 0, 0)), ("val", (0, 0, 255))):
        _png(tmp_path / split / f"{split}_1.png", (64, 48), colour)
    cache = tmp_path / "cache"
    for split in ("train", "val"):
        CachedOCRDataset(tmp_path / split, None, cache, preset="balanced")[0]
    rc, out, err = run_cli(capsys, "clear", "--stale", "--dry-run", "--json", "--cache", cache)
    assert rc == 0, err
    report = json.loads(out)
    assert report["stale_sources"] == [], report
    assert set(report["removed"].values()) == {0}, report


# -- 2. torn samples ---------------------------------------------------------------------------
def test_item2_one_sample_comes_from_one_content(tmp_path, monkeypatch):
    """Only maps cached; a.png (400×300) is atomically replaced by another size (200×500)
    right after the batch's stat. Today the stat matches the index entry, so the maps come
    from the old content's hash while the image is decoded from the new file: a torn sample.
    Every part of a sample must come from one content (old or new)."""
    images = tmp_path / "img"
    old = _png(tmp_path / "old" / "a.png", (400, 300), (200, 30, 30))
    new = _png(tmp_path / "new" / "a.png", (200, 500), (30, 30, 200))
    ann = _ann(tmp_path / "a.json", "a.png")
    want = {}
    for version, src in (("old", old), ("new", new)):
        want[version] = part_digests(_fresh(src.parent, ann))
    target = images / "a.png"
    images.mkdir()
    target.write_bytes(old.read_bytes())
    preset = {"cache_config": {"cache_maps": True}, "load_maps": True}
    cache = tmp_path / "cache"
    CachedOCRDataset(images, ann, cache, preset=preset)[0]  # maps of the old content cached
    staged = images / ".a.png.tmp"  # no image suffix: never listed
    staged.write_bytes(new.read_bytes())
    ds = CachedOCRDataset(images, ann, cache, preset=preset)
    fired = []
    real_stat, real_fstat = os.stat, os.fstat
    old_file = (target.stat().st_dev, target.stat().st_ino)

    def replace_once() -> None:
        if not fired:
            fired.append(True)
            os.replace(staged, target)

    def stat(path, *a, follow_symlinks=True, **kw):
        result = real_stat(path, *a, follow_symlinks=follow_symlinks, **kw)
        # (an lstat is a step of the name's resolution, not the content's stat)
        if follow_symlinks and os.fspath(path) == os.fspath(target):
            replace_once()
        return result

    def fstat(fd):
        result = real_fstat(fd)
        if (result.st_dev, result.st_ino) == old_file:
            replace_once()
        return result

    monkeypatch.setattr(os, "stat", stat)
    monkeypatch.setattr(os, "fstat", fstat)
    got = part_digests(ds[0])
    monkeypatch.undo()
    assert fired, "the source was never stat'ed: the race was not exercised"
    assert got in (want["old"], want["new"]), (got, want)


# -- 3. a retargeted symlink -------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["none", "balanced", "validation_optimized"])
def test_item3_retargeted_symlink_is_never_served_stale(tmp_path, preset):
    """a.png -> store/x.png (400×300), then re-pointed to store/y.png (200×500). Today the
    dataset keeps each source's resolved path for its lifetime and serves x.png's content."""
    images = tmp_path / "img"
    _png(images / "store" / "x.png", (400, 300), (200, 30, 30))
    _png(images / "store" / "y.png", (200, 500), (30, 30, 200))
    link = images / "a.png"
    link.symlink_to("store/x.png")
    ds = CachedOCRDataset(images, None, tmp_path / "cache", preset=preset)
    assert ds[0]["meta"]["orig_size"] == (300, 400)
    staged = images / ".a.tmp"
    staged.symlink_to("store/y.png")
    os.replace(staged, link)
    got = ds[0]
    assert got["meta"]["orig_size"] == (500, 200)
    want = _fresh(images, None)  # (with maps: compared on what this preset returns)
    assert sample_digest(got) == sample_digest({k: v for k, v in want.items() if k in got})


# -- 4. BatchLoader batches kept by the consumer -----------------------------------------------
def test_item4_batches_kept_by_the_consumer_stay_intact(tiny):
    """Without a device, BatchLoader reuses its `buffers` host buffers as soon as the next
    batch is asked for, whoever still holds them: a consumer that keeps batches (Lightning
    prefetches one; a list) finds other batches' pixels under its batch's meta."""
    ds = CachedOCRDataset(tiny.images, tiny.annotations, None, preset={"load_maps": True})
    fresh = {i: part_digests(ds[i]) for i in range(len(ds))}
    kept = list(BatchLoader(ds, batch_size=2, threads=2))
    assert len(kept) == len(ds) // 2
    wrong = []
    for batch in kept:
        for j, meta in enumerate(batch["meta"]):
            got = {name: part_digests({name: batch[name][j]})[name]
                   for name in ("image", "prob_map", "prob_mask", "thresh_map", "thresh_mask")}
            if got != fresh[meta["index"]]:
                wrong.append(meta["file"])
    assert wrong == []


# -- 16. any batch sampler ---------------------------------------------------------------------
def test_item16_batch_sampler_with_batches_larger_than_batch_size(tiny):
    """A batch sampler yielding 20 indices with the default batch_size of 16: today an
    IndexError (the host buffers are sized by batch_size)."""
    ds = CachedOCRDataset(tiny.images, tiny.annotations, None)
    order = [i % len(ds) for i in range(20)]
    (batch,) = list(BatchLoader(ds, batch_sampler=[order], threads=2, device="cpu"))
    assert [m["index"] for m in batch["meta"]] == order
    assert batch["image"].shape[0] == 20
    for j in (0, 8, 19):
        assert part_digests({"image": batch["image"][j]}) == part_digests(
            {"image": ds[order[j]]["image"]})


# -- 5. on_mismatch="ignore" -------------------------------------------------------------------
def _keys(cache: Path) -> dict[str, set[bytes]]:
    with CacheStore(cache, readonly=True) as store:
        return {kind: set(store.keys(kind)) for kind in ("images", "tensors", "maps")}


def test_item5_ignore_serves_what_is_stored_and_writes_nothing_under_a_stale_stamp(tiny,
                                                                                   tmp_path):
    """A cache built with the default map parameters, opened with other ones and
    on_mismatch="ignore". Tensor and map keys include the fingerprint, so today nothing
    stored is found: fresh records are computed and written into kinds still stamped with
    the old version. Stored maps must be served (the README's promise), and nothing may be
    written under the old stamp."""
    from diskcache_ocr.ocr.maps import MapConfig

    cache = tmp_path / "cache"
    built = CachedOCRDataset(tiny.images, tiny.annotations, cache, preset="validation_optimized")
    stored_maps = {i: part_digests(built[i]) for i in range(len(built))}
    built.close()
    before = _keys(cache)
    ds = CachedOCRDataset(tiny.images, tiny.annotations, cache, preset="validation_optimized",
                          map_config=MapConfig(shrink_ratio=0.5), on_mismatch="ignore",
                          preload=False)
    served = {i: part_digests(ds[i]) for i in range(len(ds))}
    ds.close()
    after = _keys(cache)
    assert {k: len(after[k] ^ before[k]) for k in after} == {k: 0 for k in after}
    assert served == stored_maps


# -- 6. symlinked cache files ------------------------------------------------------------------
@pytest.mark.parametrize("name", ["lock.mdb", "data.mdb"])
def test_item6_symlinked_cache_files_are_refused(tmp_path, tiny, name):
    """A planted `lock.mdb` -> notes.txt, or `data.mdb` -> an empty file elsewhere: today
    LMDB follows the link and writes its lock table / a whole cache into the target. The
    cache must refuse to open (a CacheError naming the file) and leave the target as it was."""
    cache = tmp_path / "cache"
    CachedOCRDataset(tiny.images, tiny.annotations, cache, preset="balanced")[0]
    notes = tmp_path / "elsewhere" / "notes.txt"
    notes.parent.mkdir()
    notes.write_bytes(b"" if name == "data.mdb" else b"my notes\n")
    before = notes.read_bytes()
    (cache / name).unlink()
    (cache / name).symlink_to(notes)
    for readonly in (True, False):
        with pytest.raises(CacheError, match=name):
            CacheStore(cache, readonly=readonly).header()
    with pytest.raises(CacheError, match=name):
        CachedOCRDataset(tiny.images, tiny.annotations, cache, preset="balanced")[0]
    assert notes.read_bytes() == before


def test_item6_status_and_health_refuse_a_symlinked_lock_file(tmp_path, tiny, capsys):
    from testkit import run_cli

    cache = tmp_path / "cache"
    CachedOCRDataset(tiny.images, tiny.annotations, cache, preset="balanced")[0]
    notes = tmp_path / "notes.txt"
    notes.write_bytes(b"my notes\n")
    (cache / "lock.mdb").unlink()
    (cache / "lock.mdb").symlink_to(notes)
    for command in ("status", "health"):
        rc, _, err = run_cli(capsys, command, "--cache", cache)
        assert rc == 2 and "lock.mdb" in err, (command, rc, err)
    assert notes.read_bytes() == b"my notes\n"


# -- 9. a file name that is not UTF-8 ----------------------------------------------------------
def test_item9_non_utf8_file_name_is_served_and_cached(tmp_path):
    """`caf\\xe9.png` (Latin-1 bytes) listed from the directory: today `source.encode()`
    raises UnicodeEncodeError (the index key, in `store.get_index`) and the epoch stops. It
    must be served, indexed (by a lossless byte form of its name), then read from the cache."""
    images = tmp_path / "img"
    images.mkdir()
    raw = os.path.join(os.fsencode(images), b"caf\xe9.png")
    Image.new("RGB", (64, 48), (10, 200, 10)).save(os.fsdecode(raw))
    cache = tmp_path / "cache"
    want = _fresh(images, None)
    assert want["meta"]["error"] is None
    first = CachedOCRDataset(images, None, cache, preset="validation_optimized", preload=False)[0]
    assert first["meta"]["error"] is None
    assert sample_digest(first) == sample_digest(want)
    ds = CachedOCRDataset(images, None, cache, preset="validation_optimized", preload=False)
    again = ds[0]
    assert sample_digest(again) == sample_digest(want)
    assert ds.stats().get("tensors.hits", 0) >= 1


def test_item9_prebuild_builds_a_non_utf8_name(tmp_path, capsys):
    from testkit import run_cli

    images = tmp_path / "img"
    images.mkdir()
    Image.new("RGB", (64, 48)).save(os.fsdecode(os.path.join(os.fsencode(images), b"caf\xe9.png")))
    Image.new("RGB", (64, 48)).save(images / "plain.png")
    rc, out, err = run_cli(capsys, "prebuild", "--images", images, "--cache", tmp_path / "c")
    assert rc == 0, err
    with CacheStore(tmp_path / "c", readonly=True) as store:
        assert len(list(store.iter_index())) == 2


# -- 13. well-formed but wrong values read from the cache --------------------------------------
@pytest.fixture
def built(tiny, tmp_path):
    """A cache of ``tiny`` built by validation_optimized (all kinds)."""
    cache = tmp_path / "cache"
    CachedOCRDataset(tiny.images, tiny.annotations, cache, preset="validation_optimized").close()
    return cache


def test_item13_index_entry_with_an_empty_content_hash_is_damage(tiny, built, references,
                                                                 capsys):
    """Today every read of that source fails with MDB_BAD_VALSIZE (the empty hash is used as
    a key), `prebuild` aborts, and `health` says nothing."""
    from dataclasses import replace

    from testkit import run_cli

    from diskcache_ocr import ops
    from diskcache_ocr.schema import source_id

    victim = tiny.names[3]
    victim_id = source_id(tiny.images, victim)  # the index knows a source by its path
    with CacheStore(built) as store:
        entry = store.get_index(victim_id)
        with store.writer() as batch:
            batch.put_index(victim_id, replace(entry, content_hash=b""))
    ds = CachedOCRDataset(tiny.images, tiny.annotations, built, preset="validation_optimized",
                          preload=False)
    i = [ds.source(k) for k in range(len(ds))].index(victim)
    sample = ds[i]
    assert sample["meta"]["error"] is None
    assert sample_digest(sample) == references[victim]
    ds.close()
    with CacheStore(built) as store:  # the bad entry was rewritten by that read
        assert len(store.get_index(victim_id).content_hash) == 32
        entry = store.get_index(victim_id)
        with store.writer() as batch:
            batch.put_index(victim_id, replace(entry, content_hash=b""))
    report = ops.health(built, images_dir=tiny.images)
    corrupt = [p["detail"] for p in report["problems"] if p["code"] == "corrupt"]
    assert any(victim in d for d in corrupt), report
    rc, _, err = run_cli(capsys, "prebuild", "--images", tiny.images, "--annotations",
                         tiny.annotations, "--cache", built)
    assert rc == 0, err


BAD_HEADERS = {
    "kinds is a string": {"kinds": {"images": "garbage"}},
    "fingerprint missing": {"kinds": {"images": {"version": "1"}}},
    "kinds not a map": {"kinds": ["images"]},
}


@pytest.mark.parametrize("change", BAD_HEADERS.values(), ids=BAD_HEADERS.keys())
def test_item13_header_fields_of_the_wrong_type_are_named_damage(tiny, built, capsys, change):
    """Today: TypeError / KeyError / AttributeError out of the dataset, tracebacks from
    `status` and `health`. Each must be a CacheFormatError naming the header field; `status`
    exits 2 with one line, `health` reports the damage (exit 1) without a traceback."""
    from testkit import run_cli

    with CacheStore(built) as store:
        store.update_header(**change)
    with pytest.raises(CacheFormatError, match="kinds"):
        CachedOCRDataset(tiny.images, tiny.annotations, built, preset="validation_optimized")
    rc, out, err = run_cli(capsys, "status", "--cache", built)
    assert rc == 2 and "kinds" in err and "Traceback" not in err, (rc, err)
    rc, out, err = run_cli(capsys, "health", "--json", "--cache", built)
    assert rc == 1, (rc, err)
    codes = {p["code"] for p in json.loads(out)["problems"]}
    assert "corrupt" in codes, out


# -- 14. command-line edge values --------------------------------------------------------------
@pytest.mark.parametrize("value", ["inf", "nan", "-1"])
def test_item14_health_max_age_days_out_of_range_is_a_usage_error(built, capsys, value):
    """Today `--max-age-days inf` escapes as an OverflowError traceback."""
    from testkit import run_cli

    try:
        rc, _, err = run_cli(capsys, "health", "--cache", built, "--max-age-days", value)
    except SystemExit as exc:  # argparse's own refusal (exit 2) is fine too
        rc, err = exc.code, capsys.readouterr().err
    assert rc == 2 and "max-age-days" in err, (rc, err)


def test_item14_deeply_nested_preset_is_a_preset_error(tiny, tmp_path, capsys):
    """A preset file nested 100 000 levels deep: was a RecursionError traceback."""
    from testkit import run_cli

    deep = tmp_path / "deep.yaml"
    deep.write_text("cache_config: " + "[" * 100_000 + "]" * 100_000 + "\n")
    try:
        rc, _, err = run_cli(capsys, "prebuild", "--images", tiny.images, "--cache",
                             tmp_path / "cache", "--preset", deep)
    except SystemExit as exc:  # refused by the parser (exit 2) is fine too
        rc, err = exc.code, capsys.readouterr().err
    assert rc == 2 and "deep.yaml" in err and "Traceback" not in err, (rc, err[-500:])
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("value", ["inf"])
def test_item14_watch_debounce_out_of_range_is_refused_at_start(tiny, built, value):
    """Today `watch --debounce inf` starts; its flush thread dies (OverflowError: timestamp
    out of range) and the service keeps running, invalidating nothing. It must refuse the
    value at the edge: exit 2 naming --debounce, before its start line."""
    from testkit import command

    proc = subprocess.Popen([*command(), "watch", "--images", str(tiny.images), "--cache",
                             str(built), "--polling", "--debounce", value],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first: list[str] = []
    reader = threading.Thread(target=lambda: first.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(120)  # a deadline for a hang, not a timing: either outcome comes in seconds
    try:
        assert first and not first[0].startswith("watch:"), f"started serving: {first}"
        err = proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.communicate()
    assert proc.returncode == 2 and "debounce" in err, (proc.returncode, err[-500:])


# -- 15. refusals that should be degradation, and errors that should be CacheErrors ------------
@pytest.fixture
def small_disk(tmp_path):
    with small_tmpfs(tmp_path / "disk", 8) as mnt:
        yield mnt


def test_item15_preload_on_a_full_disk_degrades_to_computed_samples(tiny, small_disk,
                                                                   references, caplog):
    """validation_optimized preloads in its constructor; on a full disk today that raises
    CacheFullError. It must warn and serve computed samples, as it does without preload.
    (The cache stays open while the disk fills: see the next test for opening it then.)"""
    cache = small_disk / "cache"
    keeper = CacheStore(cache)
    keeper.header()
    try:
        fill_disk(small_disk)
        ds = CachedOCRDataset(tiny.images, tiny.annotations, cache,
                              preset="validation_optimized")
        assert any("full" in r.getMessage() for r in caplog.records
                   if r.levelname == "WARNING")
        for i in range(len(ds)):
            assert sample_digest(ds[i]) == references[ds.source(i)]
    finally:
        keeper.close()


def test_item15_opening_a_cache_on_a_full_tmpfs_is_a_cache_full_error(small_disk):
    """A closed cache on a tmpfs that then fills up: LMDB re-initialises its lock table
    when it is the first opener, and writing the lock file's unbacked pages of a full tmpfs
    is a SIGBUS. Opening must be a named error (CacheFullError), never a signal."""
    cache = small_disk / "cache"
    CacheStore(cache).close()
    fill_disk(small_disk)
    res = _run_py(f"""
        from diskcache_ocr import CacheStore, CacheFullError
        try:
            CacheStore({str(cache)!r}).header()
        except CacheFullError as exc:
            print("refused:", exc)
        """)
    assert res.returncode == 0 and "refused:" in res.stdout, (res.returncode, res.stderr[-800:])


def test_item15_a_cache_path_that_is_a_file_is_a_cache_error(tiny, tmp_path):
    """Today FileExistsError from mkdir, not a CacheError."""
    not_a_dir = tmp_path / "cache"
    not_a_dir.write_text("a file where the cache should be\n")
    with pytest.raises(CacheError, match="cache"):
        CachedOCRDataset(tiny.images, tiny.annotations, not_a_dir, preset="balanced")
    with pytest.raises(CacheError):
        CacheStore(not_a_dir).header()
    assert not_a_dir.read_text() == "a file where the cache should be\n"


def test_item15_foreign_lmdb_with_a_plain_meta_key(tiny, tmp_path, capsys):
    """An LMDB whose main database has a plain `meta` key (not a sub-database): today
    MDB_INCOMPATIBLE escapes as a plain CacheError and `clear --all` cannot recover (exit 2).
    It must be named as foreign (CacheFormatError) and `clear --all` must clear it."""
    import lmdb
    from testkit import run_cli

    cache = tmp_path / "cache"
    env = lmdb.open(str(cache), map_size=1 << 20)
    with env.begin(write=True) as txn:
        txn.put(b"meta", b"somebody else's value")
    env.close()
    with pytest.raises(CacheFormatError):
        CacheStore(cache).header()
    rc, _, err = run_cli(capsys, "clear", "--all", "--cache", cache)
    assert rc == 0, err
    ds = CachedOCRDataset(tiny.images, tiny.annotations, cache, preset="balanced")
    assert ds[0]["meta"]["error"] is None


# -- 7, 8. a fork or a close while another thread reads ----------------------------------------
_READER = """
    import json, os, sys, threading
    sys.path.insert(0, {helpers!r})
    from relhelp import sample_digest
    from diskcache_ocr import BatchLoader, CachedOCRDataset, CacheClosedError
    from relhelp import unbatch
    want = json.loads({references!r})
    ds = CachedOCRDataset({images!r}, {annotations!r}, {cache!r},
                          preset="validation_optimized", preload=False)
    ds[0]
    stop, started, problems, reads = threading.Event(), threading.Event(), [], [0]

    loader = BatchLoader(ds, batch_size=4, threads=2, device="cpu")

    def samples():
        if {batches}:
            for batch in loader:
                yield from unbatch(batch)
        else:
            for i in range(len(ds)):
                yield ds[i]

    def read():
        while not stop.is_set():
            try:
                for s in samples():
                    f = s["meta"]["file"]
                    if s["meta"]["error"] is not None or sample_digest(s) != want[f]:
                        problems.append(f"wrong sample {{f}}: {{s['meta']['error']}}")
                    reads[0] += 1
                    started.set()
            except CacheClosedError:
                continue  # refused while closing: allowed
            except Exception as exc:
                problems.append(repr(exc))

    t = threading.Thread(target=read)
    t.start()
    started.wait()
    while reads[0] < {reads} and t.is_alive():
        {action}
    stop.set()
    t.join()
    print("reads", reads[0], "problems", problems[:3], len(problems))
    sys.exit(1 if problems else 0)
"""


def _reader_script(tiny, built, references, action: str, reads: int, batches: bool) -> str:
    return _READER.format(helpers=str(Path(__file__).parent), references=json.dumps(references),
                          images=str(tiny.images), annotations=str(tiny.annotations),
                          cache=str(built), action=action, reads=reads, batches=batches)


def test_item7_fork_while_another_thread_reads(tiny, built, references):
    """The at-fork hook aborts every transaction and closes every environment in the parent,
    other threads' read slots included: the reading thread then uses an unmapped view
    (SIGSEGV), or is told that the cache file is damaged (CacheFormatError advising
    `clear --all` on a healthy cache). The parent must keep reading correct samples."""
    action = "pid = os.fork()\n        os._exit(0) if pid == 0 else os.waitpid(pid, 0)"
    res = _run_py(_reader_script(tiny, built, references, action, reads=120, batches=True))
    assert res.returncode == 0, (res.returncode, res.stdout[-600:], res.stderr[-600:])


def test_item8_close_while_another_thread_reads(tiny, built, references):
    """`ds.close()` unmaps the environment under a reader in flight: SIGSEGV. Close must
    wait for (or refuse) readers in flight; a read after it reopens or is a CacheClosedError."""
    res = _run_py(_reader_script(tiny, built, references, "ds.close()", reads=120,
                                batches=False))
    assert res.returncode == 0, (res.returncode, res.stdout[-600:], res.stderr[-600:])


# -- 17. an idle reader pins pages -------------------------------------------------------------
def test_item17_an_idle_reader_does_not_pin_the_pages_of_rebuilds(tiny, built):
    """A reader that read one sample and then sits idle (a persistent DataLoader worker
    between epochs) keeps its read snapshot today, so no page freed after it can be reused:
    every rebuild of the maps grows the file by the whole kind. Readers must not hold a
    snapshot between batches."""
    from diskcache_ocr import ops

    reader = CachedOCRDataset(tiny.images, tiny.annotations, built,
                              preset="validation_optimized", preload=False)
    done, idle = threading.Event(), threading.Event()

    def read_then_idle() -> None:
        reader[0]
        idle.set()
        done.wait()

    t = threading.Thread(target=read_then_idle)
    t.start()
    try:
        assert idle.wait(60)
        used = []
        for _ in range(5):
            ops.clear(built, kind="maps")
            CachedOCRDataset(tiny.images, tiny.annotations, built,
                             preset="validation_optimized").close()
            with CacheStore(built) as store:
                used.append(store.info()["used_bytes"])
                maps_bytes = store.kind_stats("maps")["bytes"]
    finally:
        done.set()
        t.join()
        reader.close()
    # Freed pages are reused: four more rebuilds need less room than one more set of maps.
    assert used[-1] - used[0] < maps_bytes, (used, maps_bytes)


# -- 12. a source replaced by a FIFO (the read itself is fixed in ocr/decode.py) ---------------
def test_item12_a_source_replaced_by_a_fifo_does_not_hang_the_dataset(tiny, tmp_path):
    """After start-up a source becomes a FIFO. Today `ds[i]` blocks forever in the open
    (Path.read_bytes) until a writer comes. It must come back at once with that sample's
    error naming the file as not a regular file."""
    from relhelp import copy_images

    images = tmp_path / "img"
    copy_images(tiny.images, images)
    ds = CachedOCRDataset(images, tiny.annotations, None)
    victim = ds.source(2)
    (images / victim).unlink()
    os.mkfifo(images / victim)
    result: list = []
    worker = threading.Thread(target=lambda: result.append(ds[2]), daemon=True)
    worker.start()
    # Poll (with a deadline) until the read is done or a reader holds the FIFO open: a
    # writer's open then succeeds, and closing it gives a blocked reader EOF (an empty file).
    deadline = time.monotonic() + 60
    while worker.is_alive() and time.monotonic() < deadline:
        try:
            os.close(os.open(images / victim, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:  # ENXIO: nobody has it open for reading
            time.sleep(0.01)
    worker.join(60)
    assert not worker.is_alive(), f"ds[2] blocked on the FIFO {victim}"
    (sample,) = result
    assert "not a regular file" in sample["meta"]["error"], sample["meta"]
    assert ds[3]["meta"]["error"] is None
