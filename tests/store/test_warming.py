"""Warming the page cache: the whole file when it fits in memory, a stated part when not."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
from testkit import drop_page_cache

from diskcache_ocr.hashing import content_hash
from diskcache_ocr.store import CacheStore, warming

MiB = 1 << 20


@pytest.fixture
def advised(monkeypatch):
    """The (offset, length) of every WILLNEED asked for."""
    calls: list[tuple[int, int]] = []
    real = os.posix_fadvise

    def record(fd, offset, length, advice):
        if advice == os.POSIX_FADV_WILLNEED:
            calls.append((offset, length))
        return real(fd, offset, length, advice)

    monkeypatch.setattr(warming.os, "posix_fadvise", record)
    return calls


def _covered(calls: list[tuple[int, int]]) -> int:
    end = 0
    for offset, length in sorted(calls):
        assert offset == end, "the ranges asked for leave a gap"
        end = offset + length
    return end


def test_a_file_that_fits_is_asked_for_whole_in_windows_the_kernel_honours(
        tmp_path, advised, caplog, monkeypatch):
    path = tmp_path / "data.mdb"
    path.write_bytes(os.urandom(3 * MiB + 5))
    monkeypatch.setattr(warming, "resident_bytes", lambda p: 0)  # (none of it in memory)
    with caplog.at_level(logging.INFO, logger="diskcache_ocr.store"):
        report = warming.warm(path, available=64 * MiB)
    assert report.fits and report.warmed == report.size == 3 * MiB + 5
    # (one WILLNEED reads at most the device's read-ahead window: a single call for the
    # whole file warmed only its first few megabytes)
    assert _covered(advised) == report.size and max(n for _, n in advised) <= 128 << 10
    assert "whole cache" in caplog.text


def test_a_file_that_does_not_fit_is_warmed_up_to_half_the_memory_and_says_so(
        tmp_path, advised, caplog, monkeypatch):
    path = tmp_path / "data.mdb"
    path.write_bytes(b"\0" * (8 * MiB))
    monkeypatch.setattr(warming, "resident_bytes", lambda p: 0)  # (none of it in memory)
    with caplog.at_level(logging.INFO, logger="diskcache_ocr.store"):
        report = warming.warm(path, available=4 * MiB)
    assert not report.fits and report.budget == 2 * MiB and report.warmed == 2 * MiB
    assert _covered(advised) == 2 * MiB
    assert "does not fit" in caplog.text and "first 2 MiB" in caplog.text


def test_a_file_already_in_memory_is_not_asked_for_again(tmp_path, advised, monkeypatch):
    path = tmp_path / "data.mdb"
    path.write_bytes(b"\0" * MiB)
    monkeypatch.setattr(warming, "resident_bytes", lambda p: MiB)
    report = warming.warm(path, available=64 * MiB)
    assert report.fits and report.warmed == 0 and advised == []


def test_resident_bytes_sees_a_file_that_was_read(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(os.urandom(MiB))
    path.read_bytes()
    assert warming.resident_bytes(path) == MiB
    (tmp_path / "empty").write_bytes(b"")
    assert warming.resident_bytes(tmp_path / "empty") == 0


def test_mem_available_reads_meminfo(tmp_path):
    info = tmp_path / "meminfo"
    info.write_text("MemTotal:       1000 kB\nMemAvailable:    512 kB\n")
    assert warming.mem_available(info) == 512 * 1024
    info.write_text("MemTotal: 1000 kB\n")
    assert warming.mem_available(info) is None


def test_store_warm_reports_its_file(tmp_path, advised):
    store = CacheStore(tmp_path / "c")
    store.put("tensors", content_hash(b"x"), {"x": np.zeros(1 << 18, np.float32)})
    data = tmp_path / "c" / "data.mdb"
    drop_page_cache(data)
    report = store.warm()
    assert report.size == os.path.getsize(data) and report.fits  # (a test machine has room)
    assert _covered(advised) == report.warmed and report.warmed in (0, report.size)
    store.close()
