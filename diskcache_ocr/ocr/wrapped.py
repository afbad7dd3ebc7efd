"""A transform object that holds an albumentations ``Compose`` and returns a mapping.

The origin project's transforms are such objects: built by Hydra from its config, each holds
the ``Compose`` in ``.transform``, is called with the image and its polygons, and returns an
ordered mapping with ``image`` (a CHW tensor), ``polygons`` ((1, k, 2) float32 arrays),
``inverse_matrix`` and ``metadata``. :class:`ComposeHolderTransform` runs such an object as a
transform stage: its output is the object's own (so a cached sample is what the object
returns), it is as deterministic as its ``Compose``, and its fingerprint covers the
``Compose``, the object's class and the source file that defines the class (the wrapper's own
steps, such as clamping and the inverse matrix, live there). The ``metadata`` it returns is
not kept: a sample's metadata is the dataset's (see the origin item keys).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import blake3
import numpy as np

from diskcache_ocr.ocr.conventions import TransformResult
from diskcache_ocr.ocr.stages import TransformStage, _not_cacheable, plain_version


def holds_compose(obj: object) -> bool:
    """Whether ``obj`` is a callable object (not a Compose itself) whose ``.transform`` is an
    albumentations ``Compose``."""
    from diskcache_ocr.ocr import albu

    if albu.is_compose(obj) or not callable(obj) or isinstance(obj, type):
        return False
    return albu.is_compose(getattr(obj, "transform", None))


def _class_name(obj: object) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _source_digest(obj: object) -> str | None:
    """blake3 of the file that defines ``obj``'s class (None when there is no such file)."""
    try:
        path = inspect.getsourcefile(type(obj))
    except TypeError:  # a built-in class
        return None
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            return blake3.blake3(f.read()).hexdigest()
    except OSError:
        return None


class ComposeHolderTransform(TransformStage):
    """A transform object holding an albumentations ``Compose`` in ``.transform`` and
    returning a mapping (see the module docstring). ``version`` adds to its fingerprint."""

    def __init__(self, obj: Any, version: object = None) -> None:
        from diskcache_ocr.ocr import albu

        if not holds_compose(obj):
            raise TypeError(f"{_class_name(obj)}: expected a callable holding an "
                            "albumentations.Compose in .transform")
        self.obj = obj
        self.name = f"transform {_class_name(obj)}"
        self.inner = albu.AlbumentationsTransform(obj.transform, version=version)
        self.version = None if version is None else plain_version(version, "transform_version")
        self.source = _source_digest(obj)
        # What else the object holds (its own settings) is part of what it does.
        others = {k: v for k, v in vars(obj).items() if k != "transform"}
        try:
            self.state: Any = albu.describe(others, "transform object")
        except albu.Undescribable as e:
            self.state = None
            if self.version is None:
                _not_cacheable(f"{self.name} ({e})")
        self.cacheable = self.inner.cacheable and (self.state is not None
                                                  or self.version is not None)

    def fingerprint(self) -> dict[str, Any] | None:
        inner = self.inner.fingerprint()
        if inner is None or not self.cacheable:
            return None
        return {"stage": "compose-holder", "class": _class_name(self.obj),
                "source": self.source, "state": self.state, "compose": inner,
                "version": self.version}

    def random_reason(self, trials: int = 8) -> str | None:
        """Random when the Compose it holds is (by its parameters or its probe), or when the
        object's own call is (probed as any callable)."""
        return self.inner.random_reason(trials) or super().random_reason(trials)

    def __call__(self, image: np.ndarray, polygons: Sequence[np.ndarray]) -> TransformResult:
        polys = [np.asarray(p, np.float32).reshape(-1, 2) for p in polygons]
        out = self.obj(image, polys)
        if not isinstance(out, Mapping) or not {"image", "inverse_matrix"} <= set(out):
            raise TypeError(f"transform {_class_name(self.obj)} must return a mapping with "
                            f"'image', 'polygons' and 'inverse_matrix', got "
                            f"{type(out).__name__}")
        img = out["image"]
        if hasattr(img, "detach"):  # a torch tensor
            img = img.detach().cpu().numpy()
        moved = [np.asarray(p) for p in (out.get("polygons") or [])]
        return np.ascontiguousarray(img), moved, np.asarray(out["inverse_matrix"])


__all__ = ["ComposeHolderTransform", "holds_compose"]
