"""What an albumentations ``Compose`` does, as plain data (its fingerprint's core).

The description covers the class of every transform (nested Composes, ``OneOf``...
included) with everything it holds — its constructor arguments
(``get_transform_init_args``) and its whole instance state, which ``A.to_dict`` does not
always cover (albumentations 1.3.1 leaves out ``PadIfNeeded(position=...)``) — and the
keypoint/bbox parameters and additional targets. A value that is not plain data nor
albumentations' own (a ``Lambda``'s function, a custom transform class) has no stable
description: :class:`Undescribable`.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


class Undescribable(ValueError):
    """A value inside a transform that has no stable description (see :func:`describe`)."""

    def __init__(self, path: str, value: object) -> None:
        super().__init__(f"{path} is {_qualname(value)}, which has no stable description")
        self.path = path


# Instance attributes that are run-time state, not what a transform does: the replay
# record of the last call (a dict named ``params``; a processor's ``params`` are its
# KeypointParams and count), and (albumentations 2) the transform's own generators.
_RUNTIME_STATE = frozenset({"applied_in_replay", "random_generator", "py_random"})


def _runtime_state(name: str, value: object) -> bool:
    return name in _RUNTIME_STATE or (name == "params" and isinstance(value, dict))


# Code whose behaviour the fingerprint's versions pin down (albumentations and OpenCV), or
# that does not change: a function or class of these is described by its qualified name.
_VERSIONED_CODE = ("albumentations", "cv2", "numpy", "builtins", "math", "operator")
_MAX_DEPTH = 64


def _qualname(value: object) -> str:
    target = value if isinstance(value, type) or callable(value) and hasattr(
        value, "__qualname__") else type(value)
    kind = "" if target is value else "a "
    return (f"{kind}{getattr(target, '__module__', '?')}."
            f"{getattr(target, '__qualname__', type(target).__name__)}")


def _versioned_code(value: object) -> bool:
    module = getattr(value, "__module__", None) or ""
    return module.split(".")[0] in _VERSIONED_CODE


def describe(value: object, path: str = "compose", *, lenient: bool = False,
             _depth: int = 0) -> Any:
    """Plain data that says what ``value`` (a Compose, a transform, or anything one holds)
    does: plain values as they are (OmegaConf containers, tuples and numpy values as plain
    lists and numbers), an albumentations object as its class with its constructor arguments
    and instance state, a function or class of albumentations/OpenCV/numpy by name.

    Anything else raises :class:`Undescribable` naming where it sits; with ``lenient`` it is
    described by its type's name only (for a Compose its owner versions explicitly)."""
    if _depth > _MAX_DEPTH:
        raise Undescribable(path, value)
    deeper = functools.partial(_describe_child, lenient=lenient, depth=_depth + 1)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic) and value.dtype.kind in "biuf":
        return value.item()
    if isinstance(value, (bytes, bytearray)):
        return {"bytes": bytes(value).hex()}
    if isinstance(value, enum.Enum):
        return {"enum": _qualname(type(value)), "value": deeper(value.value, f"{path}.value")}
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise Undescribable(path, value)
        return {"ndarray": value.dtype.str, "shape": list(value.shape),
                "values": value.tolist()}
    if isinstance(value, Mapping):
        pairs = [[deeper(k, f"{path}.<key>"), deeper(v, f"{path}.{k}")]
                 for k, v in value.items()]
        return {"mapping": sorted(pairs, key=lambda kv: repr(kv[0]))}
    if isinstance(value, (set, frozenset)):
        items = [deeper(v, f"{path}.<item>") for v in value]
        return {"set": sorted(items, key=repr)}
    if isinstance(value, Sequence):
        return [deeper(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, functools.partial):
        return {"partial": deeper(value.func, f"{path}.func"),
                "args": deeper(value.args, f"{path}.args"),
                "keywords": deeper(value.keywords, f"{path}.keywords")}
    if isinstance(value, type) or callable(value) and not hasattr(value, "__dict__") or (
            callable(value) and hasattr(value, "__qualname__")):
        # a class, a function, a builtin or a bound method: code, known only by its name
        owner = getattr(value, "__self__", None)
        if _versioned_code(value) and (owner is None or isinstance(owner, type)
                                       or _versioned_code(type(owner))):
            return {"code": _qualname(value)}
        if lenient:
            return {"opaque": _qualname(value)}
        raise Undescribable(path, value)
    if _versioned_code(type(value)) and hasattr(value, "__dict__"):
        out: dict[str, Any] = {"class": _qualname(type(value))}
        init_args = getattr(value, "get_transform_init_args", None)
        if callable(init_args):
            try:
                args = init_args()
            except Exception:  # noqa: BLE001 - an accessor that fails: the state still says it
                args = None
            if isinstance(args, Mapping):
                out["init"] = deeper(args, f"{path}.init")
        state = {k: v for k, v in vars(value).items() if not _runtime_state(k, v)}
        out["state"] = deeper(state, path)
        return out
    if lenient:
        return {"opaque": _qualname(type(value))}
    raise Undescribable(path, value)


def _describe_child(value: object, path: str, *, lenient: bool, depth: int) -> Any:
    return describe(value, path, lenient=lenient, _depth=depth)



__all__ = ["Undescribable", "describe"]
