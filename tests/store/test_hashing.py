from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from diskcache_ocr.hashing import content_hash, derive_key, file_hash, fingerprint


def test_content_and_file_hash_agree(tmp_path):
    data = b"x" * 3_000_000
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    assert file_hash(path) == content_hash(data)
    assert len(content_hash(data)) == 32
    assert content_hash(data) != content_hash(data + b"y")


def test_derived_keys_are_unambiguous():
    h = content_hash(b"img")
    assert derive_key("tensors", h, "fp1") != derive_key("tensors", h, "fp2")
    assert derive_key("tensors", h, "fp1") != derive_key("maps", h, "fp1")
    assert derive_key("maps", b"ab", b"c") != derive_key("maps", b"a", b"bc")


def test_fingerprint_is_order_and_type_stable():
    a = {"size": 640, "mean": [0.5602] * 3, "nested": {"b": None, "a": True}}
    b = {"nested": {"a": True, "b": None}, "mean": (0.5602, 0.5602, 0.5602), "size": np.int64(640)}
    assert fingerprint(a) == fingerprint(b)
    assert fingerprint({"x": 1.0}) != fingerprint({"x": 1})
    assert fingerprint({"x": 0.1}) != fingerprint({"x": 0.1 + 1e-17 + 1e-16})
    assert fingerprint({"x": "d0x1p+0;"}) != fingerprint({"x": 1.0})
    assert fingerprint({"x": -0.0}) == fingerprint({"x": 0.0})
    assert fingerprint({"x": float("nan")}) == fingerprint({"x": float("nan")})


def test_fingerprint_stable_across_processes():
    params = {"z": [1, 2.5, "s"], "a": {"q": 1e-300}}
    code = (
        "from diskcache_ocr.hashing import fingerprint;"
        "print(fingerprint({'a': {'q': 1e-300}, 'z': [1, 2.5, 's']}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PATH": ""})
    assert out.stdout.strip() == fingerprint(params)


def test_fingerprint_rejects_unsupported_values():
    with pytest.raises(TypeError, match="nested"):
        fingerprint({"nested": {"f": object()}})
    with pytest.raises(TypeError, match="not a str"):
        fingerprint({1: 2})  # type: ignore[dict-item]
