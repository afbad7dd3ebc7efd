"""Samples of a stage pipeline (the user's own transform and maps) and their batch memory.

A stage pipeline's arrays have the stage's shapes, known only once a sample is made. For a
deterministic transform every sample has the same ones, so the first batch a process packs
teaches it the layout (:class:`StageLayout`), and from then on a batch's block of batch memory
is taken before the lookup: the cached arrays of a hit are copied once, straight from the
cache's memory map into their rows, instead of into fresh arrays first and the rows after.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from diskcache_ocr import batchmem
from diskcache_ocr.batchmem import Block, Spec
from diskcache_ocr.ocr.conventions import upright_size
from diskcache_ocr.ocr.maps import MAP_NAMES
from diskcache_ocr.ocr.staged import StagePipeline
from diskcache_ocr.samples import (
    FINISH,
    TORCH_DTYPES,
    BatchRow,
    Catalog,
    Sample,
    collate,
    cpu_array,
)

# The arrays of a sample that go into batch rows, by the name a sample and a record share.
PACKED = ("image", "inverse_matrix", *MAP_NAMES)


class StageLayout:
    """The per-sample shape and dtype of each packed array, as the last packed batch of this
    process had them (None until one was packed). Only ever a guess: every use checks it."""

    __slots__ = ("specs",)

    def __init__(self) -> None:
        self.specs: tuple[Spec, ...] | None = None


class StageBuffers:
    """The batch "buffers" of a stage pipeline, whose shapes are the stage's own.

    With ``pack``, :meth:`pack` moves a batch's samples into rows of one block of batch
    memory once their shapes are known (a reusable shared-memory slab inside a DataLoader
    worker, the local pool in-process), so :func:`collate` hands the whole block on instead
    of stacking into fresh memory, and a worker sends a reference instead of the bytes.
    Without it (or when the samples' shapes differ) each sample owns its arrays.

    Given a ``layout`` that already knows the shapes and ``n`` samples to come, the block is
    taken up front, and :meth:`target` names the row a cached array can be copied into
    directly. A block taken up front but not used (the batch's shapes differ after all) is
    simply let go: rows still referenced keep it busy, as batch memory always does.
    :meth:`batch` is :func:`collate` under the dataset's item keys.
    """

    def __init__(self, keys: str = "db", *, shared: bool = False, pack: bool = False,
                 layout: StageLayout | None = None, n: int = 0) -> None:
        self.keys = keys
        self.shared = shared
        self.pack_rows = pack
        self.layout = layout
        self._block: Block | None = None
        self._specs: tuple[Spec, ...] = ()
        if pack and layout is not None and layout.specs is not None and n >= 2:
            self._specs = _batch_specs(layout.specs, n)
            self._block = self._take(self._specs)

    def needs_layout(self, n: int) -> bool:
        """Whether a batch of ``n`` would pack without the shapes being known: then one
        sample first, and :meth:`learn` from it."""
        return (self.pack_rows and n >= 2 and self._block is None and self.layout is not None
                and self.layout.specs is None)

    def learn(self, sample: Sample, n: int) -> None:
        """Take the packed arrays' shapes from ``sample`` (one of ``n``) and the block for
        ``n`` samples of them, so the others' hits are copied straight into their rows."""
        specs = _row_specs([sample])
        if specs is None or self.layout is None:
            return
        self.layout.specs = specs
        self._specs = _batch_specs(specs, n)
        self._block = self._take(self._specs)

    def _take(self, specs: Sequence[Spec]) -> Block | None:
        return batchmem.shared_block(specs) if self.shared else batchmem.local_block(specs)

    def target(self, name: str, slot: int, like: np.ndarray) -> np.ndarray | None:
        """The row of the block taken up front that an array like ``like`` (named ``name``,
        of sample ``slot``) is copied into, or None when there is none or it does not fit."""
        if self._block is None:
            return None
        rows = self._block.arrays.get(name)
        if rows is None or not 0 <= slot < rows.shape[0]:
            return None
        row = rows[slot]
        return row if row.shape == like.shape and row.dtype == like.dtype else None

    def batch(self, samples: Sequence[Sample]) -> dict[str, object]:
        return collate(samples, keys=self.keys)

    def pack(self, samples: list[Sample]) -> list[Sample]:
        """The samples with their image, maps and inverse matrix as rows of one block (the
        same values and types: a tensor stays a tensor, a numpy array a numpy array)."""
        taken, self._block = self._block, None
        if not self.pack_rows or len(samples) < 2:
            return samples  # one sample (``ds[i]``): no stacking to save, the copy would cost
        per_sample = _row_specs(samples)
        if per_sample is None:
            return samples  # differing shapes: each sample keeps its own arrays
        names = [s.name for s in per_sample]
        if self.layout is not None:
            self.layout.specs = per_sample
        specs = _batch_specs(per_sample, len(samples))
        block = taken if taken is not None and specs == self._specs else self._take(specs)
        if block is None:  # every slab busy: as without packing
            return samples
        out = []
        for row, s in enumerate(samples):
            s = dict(s)
            for name in names:
                value = s[name]
                target = block.arrays[name][row]
                source = cpu_array(value)
                assert source is not None
                if not _same_memory(source, target):  # (a hit was copied there already)
                    np.copyto(target, source)
                batch = block.tensors[name]
                s[name] = (batch[row] if isinstance(value, torch.Tensor)
                           else np.asarray(BatchRow(batch, row, target)))
            out.append(s)
        return out


def _batch_specs(per_sample: Sequence[Spec], n: int) -> tuple[Spec, ...]:
    """The block's arrays for ``n`` samples of the ``per_sample`` specs."""
    return tuple(Spec(s.name, (n, *s.shape), s.dtype) for s in per_sample)


def _row_specs(samples: Sequence[Sample]) -> tuple[Spec, ...] | None:
    """The shape and dtype of each packed array, when every sample has the same ones."""
    specs = []
    for name in (k for k in PACKED if k in samples[0]):
        first = cpu_array(samples[0][name])
        if first is None or first.dtype not in TORCH_DTYPES:
            return None
        for s in samples[1:]:
            other = cpu_array(s.get(name))
            if other is None or other.shape != first.shape or other.dtype != first.dtype:
                return None
        specs.append(Spec(name, first.shape, first.dtype))
    return tuple(specs)


def _same_memory(a: np.ndarray, b: np.ndarray) -> bool:
    return (a.shape == b.shape and a.dtype == b.dtype and a.strides == b.strides
            and a.__array_interface__["data"][0] == b.__array_interface__["data"][0])


def take_record(record: Mapping[str, np.ndarray], buffers: object, slot: int
                ) -> dict[str, np.ndarray]:
    """A cached record's arrays, owned by the caller: copied into the rows of ``buffers``'
    block where it has one that fits (see :meth:`StageBuffers.target`), else into fresh
    arrays. Runs while the read transaction that holds the views lives."""
    out = {}
    for name, view in record.items():
        target = (buffers.target(name, slot, view)
                  if isinstance(buffers, StageBuffers) and name in PACKED else None)
        if target is None:
            out[name] = np.array(view)
        else:
            np.copyto(target, view)
            out[name] = target
    return out


def assemble_staged(pipeline: StagePipeline, catalog: Catalog, index: int,
                    record: Mapping[str, np.ndarray], maps: Mapping[str, np.ndarray] | None,
                    return_maps: bool, keys: str) -> Sample:
    """One sample of a stage pipeline: the transform's output from its record (the random
    rest run here, when there is one), maps from ``maps`` or made live."""
    image, polygons, inverse = pipeline.run_rest(dict(record))
    flags = catalog.flat_words(index)[2]
    # each polygon's own word's flag (a transform may have dropped words)
    ignore = pipeline.check_word_flags(polygons, flags, catalog.source(index))
    if return_maps and maps is None:
        maps = pipeline.make_maps(polygons, image, flags)
    raw = tuple(int(v) for v in record["raw_size"])
    return _staged_sample(pipeline, catalog, index, image, polygons, ignore, inverse,
                          maps if return_maps else None, raw, int(record["orientation"][0]),
                          None, keys)


def empty_staged(pipeline: StagePipeline, catalog: Catalog, index: int, error: str,
                 return_maps: bool, keys: str) -> Sample:
    """A bad source under a stage pipeline: a blank image's shapes, no words, the reason."""
    image, _, _ = pipeline.blank()
    maps = pipeline.make_maps([], image, []) if return_maps else None
    return _staged_sample(pipeline, catalog, index, np.zeros_like(image), [], np.zeros(0, bool),
                          np.eye(3), maps, (0, 0), 1, error, keys)


def _staged_sample(pipeline: StagePipeline, catalog: Catalog, index: int, image: np.ndarray,
                   polygons: Sequence[np.ndarray], ignore: np.ndarray, inverse: np.ndarray,
                   maps: Mapping[str, np.ndarray] | None, raw_size: tuple[int, ...],
                   orientation: int, error: str | None, keys: str) -> Sample:
    file = catalog.source(index)
    upright = upright_size(*raw_size, orientation) if error is None else (0, 0)
    if keys == "origin":
        sample = _origin_item(catalog, index, image, polygons, inverse, maps, raw_size,
                              orientation, upright, error)
        return _with_finish(sample, pipeline)
    sample = {
        "image": torch.from_numpy(np.ascontiguousarray(image)),
        "polygons": list(polygons), "ignore": ignore,
        "inverse_matrix": torch.from_numpy(np.asarray(inverse, np.float64)),
        "meta": {"index": index, "file": file, "orig_size": upright, "raw_size": raw_size,
                 "orientation": orientation, "error": error},
    }
    for name, arr in (maps or {}).items():
        sample[name] = torch.from_numpy(np.ascontiguousarray(arr))
    return _with_finish(sample, pipeline)


def _origin_item(catalog: Catalog, index: int, image: np.ndarray,
                 polygons: Sequence[np.ndarray], inverse: np.ndarray,
                 maps: Mapping[str, np.ndarray] | None, raw_size: tuple[int, ...],
                 orientation: int, upright: tuple[int, int], error: str | None) -> Sample:
    """The origin dataset's item, key for key and type for type: a tensor image, (k, 2)
    float32 polygons, its metadata (the decoded image's, as its transform passes it on),
    ``prob_map`` / ``thresh_map`` (H, W) or None, a float32 inverse matrix."""
    file = catalog.source(index)
    has_words = bool(len(catalog.flat_words(index)[1]))
    metadata: dict[str, Any] = {
        "filename": file, "path": str(catalog.images_dir / file),
        "original_shape": (int(upright[1]), int(upright[0])), "orientation": int(orientation),
        "is_normalized": False, "dtype": "uint8",
        "raw_size": (int(raw_size[0]), int(raw_size[1])),
        # The origin names the frame "canonical" whenever an EXIF-rotated image has words.
        "polygon_frame": "canonical" if orientation != 1 and has_words else "raw",
        "cache_source": "disk", "cache_hits": None, "cache_misses": None,
    }
    if error is not None:
        metadata["error"] = error
    maps = maps or {}
    return {
        "image": torch.from_numpy(np.ascontiguousarray(image)),
        "polygons": [np.array(p, np.float32).reshape(-1, 2) for p in polygons],
        "metadata": metadata,
        "prob_map": _plane(maps.get("prob_map")),
        "thresh_map": _plane(maps.get("thresh_map")),
        "inverse_matrix": np.asarray(inverse, np.float32),
    }


def _plane(arr: np.ndarray | None) -> np.ndarray | None:
    return None if arr is None else np.asarray(arr).reshape(np.shape(arr)[-2:])


def _with_finish(sample: Sample, pipeline: StagePipeline) -> Sample:
    """A compact sample says how its image is finished (see ``StagePipeline.finish_spec``)."""
    spec = pipeline.finish_spec()
    if spec is not None:
        sample[FINISH] = spec
    return sample


__all__ = ["PACKED", "StageBuffers", "StageLayout", "assemble_staged", "empty_staged",
           "take_record"]
