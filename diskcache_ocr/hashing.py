"""Content hashing: content keys and parameter fingerprints (blake3).

(Record keys and their recipes live in :mod:`diskcache_ocr.schema`.) Keys are raw 32-byte
digests: the content hash of a source file, and keys derived from it
for records that depend on parameters (a transform, map parameters) as well.
"""

from __future__ import annotations

import enum
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import blake3
import numpy as np

KEY_BYTES = 32
_CHUNK = 1 << 20


def content_hash(data: bytes | memoryview) -> bytes:
    """blake3 digest of a byte string."""
    return blake3.blake3(data).digest()


def file_hash(path: str | os.PathLike[str]) -> bytes:
    """blake3 digest of a file's bytes, read in chunks."""
    hasher = blake3.blake3()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            hasher.update(chunk)
    return hasher.digest()


def derive_key(kind: str, *parts: bytes | str) -> bytes:
    """A key for ``kind`` from several parts, each length-prefixed so no two inputs collide.

    >>> derive_key("tensors", b"a", "b") != derive_key("tensors", b"ab")
    True
    """
    hasher = blake3.blake3(kind.encode())
    for part in parts:
        raw = part.encode() if isinstance(part, str) else bytes(part)
        hasher.update(len(raw).to_bytes(8, "little"))
        hasher.update(raw)
    return hasher.digest()


class _Float(str):
    """A float's exact spelling, kept apart from strings that happen to look alike."""


def _canonical_tree(value: Any, path: str) -> Any:
    """A JSON-like tree with a single spelling for every value (see :func:`fingerprint`).

    Containers of other libraries that hold plain values are those values: an OmegaConf
    ``DictConfig`` is a mapping and a ``ListConfig`` a sequence (what Hydra's ``instantiate``
    leaves in the objects it builds), a numpy array the nested list of its values, an enum
    member its value.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, enum.Enum):
        return _canonical_tree(value.value, path)
    if isinstance(value, np.ndarray):
        return _canonical_tree(value.tolist(), path)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        f = float(value)
        if math.isnan(f):
            return _Float("nan")
        # float.hex is exact and independent of the Python version's repr rules.
        return _Float((f + 0.0).hex())  # + 0.0 folds -0.0 into 0.0
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"fingerprint: key {k!r} at {path or '<root>'} is not a str")
            out[k] = _canonical_tree(v, f"{path}.{k}")
        return {k: out[k] for k in sorted(out)}
    if isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray)):
        return [_canonical_tree(v, f"{path}[{i}]") for i, v in enumerate(value)]
    raise TypeError(
        f"fingerprint: value at {path or '<root>'} has type {type(value).__name__}; expected "
        "None, bool, int, float, str, a sequence (list, tuple, ListConfig, numpy array) or "
        "a str-keyed mapping"
    )


def fingerprint(params: Mapping[str, Any]) -> str:
    """Stable hex fingerprint of a parameter tree: independent of dict order, of int vs
    numpy int, and of the Python version; ``1.0`` and ``1`` differ (a float is not an int).

    >>> fingerprint({"a": 1, "b": [0.5]}) == fingerprint({"b": (0.5,), "a": 1})
    True
    """
    canon = _canonical_tree(params, "")
    return blake3.blake3(_encode(canon).encode()).hexdigest(16)


def _encode(value: Any) -> str:
    # A tiny explicit serializer: json.dumps' spelling of floats and escapes is not a
    # contract we want the fingerprint to depend on.
    if value is None:
        return "n"
    if value is True:
        return "t"
    if value is False:
        return "f"
    if isinstance(value, int):
        return f"i{value};"
    if isinstance(value, _Float):
        return f"d{value};"
    if isinstance(value, str):
        raw = value.encode()
        return f"s{len(raw)}:{value}"
    if isinstance(value, list):
        return "[" + "".join(_encode(v) for v in value) + "]"
    return "{" + "".join(_encode(k) + _encode(v) for k, v in value.items()) + "}"


__all__ = ["KEY_BYTES", "content_hash", "derive_key", "file_hash", "fingerprint"]
