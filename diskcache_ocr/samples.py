"""What a reader hands out: samples, batch buffers, collate, and the flat word index.

A sample is assembled here from a computed or cached record (the read-through engine decides
which); the arrays land in a :class:`BatchBuffers` row, so :func:`collate` hands the whole
buffer on without copying again. This module knows how records are laid out (which maps are
stored as uint8), so nothing above it has to.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from diskcache_ocr import batchmem
from diskcache_ocr.batchmem import Spec
from diskcache_ocr.errors import BatchError, CacheError
from diskcache_ocr.ocr.maps import MAP_NAMES
from diskcache_ocr.ocr.pipeline import BINARY_MAPS, Pipeline
from diskcache_ocr.ocr.polygons import Polygons
from diskcache_ocr.ocr.transform import (
    TransformConfig,
    finish,
    normalize_channels_last,
    normalize_channels_last_torch,
)

Sample = dict[str, Any]
GEOMETRY = ("matrix", "inverse_matrix", "orig_size")


class BatchBuffers:
    """Where one batch's arrays land: image (B,3,S,S), each map (B,1,S,S), inverse (B,3,3).

    The memory is reused once nothing of its last use is alive (:mod:`batchmem`). Inside a
    DataLoader worker it is a shared-memory slab, so sending the batch to the main process
    moves a reference, not the bytes; the batched loader keeps a few pinned sets of its own.
    ``raw_image`` keeps a compact record's uint8 image unfinished, and ``raw_maps`` the binary
    maps as their stored uint8 0/1 (:func:`finish_batch` turns both into float32 later,
    typically on a device).
    """

    def __init__(self, n: int, size: int, return_maps: bool, *, shared: bool = False,
                 pin: bool = False, raw_image: bool = False, raw_maps: bool = False,
                 reuse: bool = True) -> None:
        specs = [Spec("image", (n, 3, size, size), np.dtype(np.uint8 if raw_image
                                                           else np.float32)),
                 Spec("inverse_matrix", (n, 3, 3), np.dtype(np.float64))]
        specs += [Spec(name, (n, 1, size, size),
                       np.dtype(np.uint8 if raw_maps and name in BINARY_MAPS else np.float32))
                  for name in (MAP_NAMES if return_maps else ())]
        block = None
        if reuse and not pin:
            block = batchmem.shared_block(specs) if shared else batchmem.local_block(specs)
        if block is None:  # pinned, not reused, or every slab busy: memory of its own
            tensors = {s.name: _new_tensor(s.shape, TORCH_DTYPES[s.dtype], shared, pin)
                       for s in specs}
            arrays = {name: t.numpy() for name, t in tensors.items()}
        else:
            tensors, arrays = block.tensors, block.arrays
        self.image_t = tensors["image"]
        self.inverse_t = tensors["inverse_matrix"]
        self.maps_t = {name: tensors[name] for name in MAP_NAMES if name in tensors}
        self.image = arrays["image"]
        self.inverse = arrays["inverse_matrix"]
        self.maps = {name: arrays[name] for name in self.maps_t}
        self.raw_image = raw_image
        self.compact = raw_image or raw_maps

    def needs_layout(self, n: int) -> bool:
        """Never: the rows' shapes are known from the transform's size."""
        return False

    def learn(self, sample: Sample, n: int) -> None:
        """Nothing to learn (see :meth:`needs_layout`)."""

    def pack(self, samples: list[Sample]) -> list[Sample]:
        """The samples as they are: each already sits in its row."""
        return samples

    def batch(self, samples: Sequence[Sample]) -> dict[str, Any]:
        """The first ``len(samples)`` rows as a batch, in :func:`collate`'s structure."""
        n = len(samples)
        out: dict[str, Any] = {"image": self.image_t[:n], "inverse_matrix": self.inverse_t[:n]}
        for name, t in self.maps_t.items():
            out[name] = t[:n]
        for name in ("polygons", "ignore", "meta"):
            out[name] = [s[name] for s in samples]
        spec = batch_finish_spec(samples)
        if spec is not None:
            out[FINISH] = spec
        return out


TORCH_DTYPES = {np.dtype(np.uint8): torch.uint8, np.dtype(np.float32): torch.float32,
                 np.dtype(np.float64): torch.float64}


def _new_tensor(shape: tuple[int, ...], dtype: torch.dtype, shared: bool, pin: bool = False
                ) -> torch.Tensor:
    if not shared:
        return torch.empty(shape, dtype=dtype, pin_memory=pin)
    numel = 1
    for d in shape:
        numel *= d
    proto = torch.empty(0, dtype=dtype)
    try:
        storage = proto._typed_storage()._new_shared(numel, device="cpu")
    except RuntimeError as exc:
        if "No space left" not in str(exc) and "Cannot allocate" not in str(exc):
            raise
        # Shared memory is full: give back the idle batch memory kept for reuse (the other
        # workers too), and wait a little for the consumer to let go of batches.
        nbytes = numel * proto.element_size()
        batchmem.out_of_shared_memory(exc)
        for _ in range(SHM_RETRIES):
            batchmem.wait_for_shared_memory(nbytes, SHM_WAIT_S / SHM_RETRIES)
            try:
                storage = proto._typed_storage()._new_shared(numel, device="cpu")
                break
            except RuntimeError as again:
                exc = again
        else:
            raise _shm_full(nbytes, exc) from None
    out = proto.new(storage).resize_(shape)
    batchmem.address_populate(out.data_ptr(), out.numel() * out.element_size())
    return out


SHM_WAIT_S = 10.0  # how long a batch waits for shared memory before it is an error
SHM_RETRIES = 20


def _shm_full(nbytes: int, exc: BaseException) -> CacheError:
    return CacheError(
        f"{batchmem.SHM_DIR}: no shared memory left for a batch of {nbytes >> 20} MiB "
        f"({exc}); the DataLoader's workers hold at most prefetch_factor x num_workers "
        "batches there: give the system more shared memory (e.g. docker --shm-size), or use "
        "fewer workers, a smaller prefetch_factor or smaller batches")


FINISH = "finish"  # the key of a compact sample's (and batch's) finishing spec


def put_image(pipeline: Pipeline, stored: np.ndarray, buffers: BatchBuffers, slot: int) -> None:
    """Copy a stored image into its row: as-is for a compact batch, else finished."""
    if buffers.raw_image:
        np.copyto(buffers.image[slot], stored)
    else:
        pipeline.finish_into(stored, buffers.image[slot])


def assemble(pipeline: Pipeline, catalog: Catalog, index: int, geometry: Mapping[str, Any],
             buffers: BatchBuffers, slot: int, maps: Mapping[str, np.ndarray] | None,
             return_maps: bool) -> Sample:
    """One sample over its buffer row (the image already sits there); ``maps`` are copied
    into the row unless None (already there)."""
    np.copyto(buffers.inverse[slot], geometry["inverse_matrix"])
    sample: Sample = {
        "image": buffers.image_t[slot],
        "polygons": catalog.moved_polygons(index, geometry["matrix"]),
        "ignore": np.array(catalog.flat_words(index)[2], dtype=bool),
        "inverse_matrix": buffers.inverse_t[slot],
        "meta": {"index": index, "file": catalog.source(index),
                 "orig_size": tuple(int(v) for v in geometry["orig_size"]), "error": None},
    }
    if buffers.compact:
        sample[FINISH] = pipeline.finish_spec()
    if return_maps:
        for name in MAP_NAMES:
            if maps is not None:
                np.copyto(buffers.maps[name][slot], maps[name])
            sample[name] = buffers.maps_t[name][slot]
    return sample


def empty_sample(pipeline: Pipeline, catalog: Catalog, index: int, error: str,
                 buffers: BatchBuffers, slot: int, return_maps: bool) -> Sample:
    """What a bad source yields: the right shapes, all-zero masks, and the reason."""
    blank = np.full(buffers.image[slot].shape, pipeline.transform.pad_value, np.uint8)
    put_image(pipeline, blank, buffers, slot)
    buffers.inverse[slot] = np.eye(3)
    sample: Sample = {
        "image": buffers.image_t[slot],
        "polygons": [],
        "ignore": np.zeros(0, dtype=bool),
        "inverse_matrix": buffers.inverse_t[slot],
        "meta": {"index": index, "file": catalog.source(index), "orig_size": (0, 0),
                 "error": error},
    }
    if buffers.compact:
        sample[FINISH] = pipeline.finish_spec()
    if return_maps:
        for name in MAP_NAMES:
            buffers.maps[name][slot] = 0
            sample[name] = buffers.maps_t[name][slot]
    return sample


class BatchRow:
    """The ``base`` of a packed sample's numpy row: names the batch tensor and the row, so
    :func:`collate` can hand the batch on (a tensor row has the batch as its ``_base``)."""

    def __init__(self, batch: torch.Tensor, row: int, array: np.ndarray) -> None:
        self.batch = batch
        self.row = row
        self.__array_interface__ = array.__array_interface__
        self._array = array  # the interface's memory stays alive with the row


def cpu_array(value: Any) -> np.ndarray | None:
    if isinstance(value, torch.Tensor):
        return value.numpy() if value.device.type == "cpu" else None
    return value if isinstance(value, np.ndarray) else None


def finish_batch(batch: dict[str, Any], device: str | torch.device | None = None
                 ) -> dict[str, Any]:
    """A compact batch as exactly the float32 batch the default output returns, bit for bit.

    With ``device``, the tensors move there first (asynchronously from pinned memory), so
    the widening happens on the device; without, where they live. The uint8 image is
    normalized by the same ``finish`` the uncached path uses, the uint8 0/1 binary maps are
    widened (exact). The batch's ``"finish"`` spec says how and is dropped from the result,
    so a finished (or a float32) batch comes back unchanged: calling it twice is harmless.

    A batch that still carries its spec but whose image or binary maps are no longer uint8
    (cast before finishing: the values would stay 0–255), or a spec with a non-finite mean
    or a zero or non-finite std, raises :class:`~diskcache_ocr.errors.BatchError`.
    """
    out = dict(batch)
    spec = out.pop(FINISH, None)
    if spec is not None:
        check_finish_spec(spec)
        _check_unfinished(out, spec)
    if device is not None:
        device = torch.device(device)
        for name, value in out.items():
            if isinstance(value, torch.Tensor):
                out[name] = value.to(device, non_blocking=value.is_pinned())
    if spec is None:
        return out
    if spec.get("op") == "sub_mul":
        return _finish_channels_last(out, spec)
    todo = [name for name in ("image", *spec.get("binary_maps", ()))
            if isinstance(out.get(name), torch.Tensor) and out[name].dtype == torch.uint8]
    if not todo:
        return out
    into: dict[str, torch.Tensor] = {}
    if all(out[name].device.type == "cpu" for name in todo):
        # Fresh memory is what costs most on the CPU: reuse a block once nothing of the
        # batch finished into it before is alive (the same rule as the batch buffers).
        block = batchmem.local_block([Spec(name, tuple(out[name].shape), np.dtype(np.float32))
                                      for name in todo])
        into = block.tensors
    for name in todo:
        value = out[name]
        target = into.get(name)
        if name == "image":
            config = _finish_config(tuple(spec["mean"]), tuple(spec["std"]))
            out[name] = finish(value, config) if target is None else finish(value, config,
                                                                              target)
        elif target is None:
            out[name] = value.to(torch.float32)  # 0/1: exact
        else:
            np.copyto(target.numpy(), value.numpy())  # numpy's widening is the fast one here
            out[name] = target
    return out


def check_finish_spec(spec: Any) -> None:
    """Refuse a finishing spec that cannot finish correctly: constants that are missing,
    not numbers, non-finite, or a zero std / scale (the output would be NaN, inf or 0)."""
    if not isinstance(spec, Mapping):
        raise BatchError(f"finish spec: expected a mapping, got {type(spec).__name__}")
    if spec.get("op") == "sub_mul":
        fields = {"shift": False, "scale": True}
    else:
        fields = {"mean": False, "std": True}
    for name, nonzero in fields.items():
        try:
            values = np.asarray(spec.get(name), dtype=np.float64)
        except (TypeError, ValueError):
            values = np.asarray([np.nan])
        if values.ndim != 1 or values.size == 0 or not np.isfinite(values).all():
            raise BatchError(f"finish spec: {name} must be a list of finite numbers, got "
                             f"{spec.get(name)!r:.80}")
        if nonzero and (values == 0).any():
            raise BatchError(f"finish spec: {name} must not be zero, got {spec.get(name)!r:.80}")


def _check_unfinished(out: Mapping[str, Any], spec: Mapping[str, Any]) -> None:
    """A batch that carries a finish spec must still be what the spec finishes: uint8."""
    if spec.get("op") == "sub_mul":
        names = [spec.get("image_key", "image")]
    else:
        names = ["image", *spec.get("binary_maps", ())]
    for name in names:
        value = out.get(name)
        dtype = value.dtype if isinstance(value, (torch.Tensor, np.ndarray)) else None
        if dtype is not None and dtype not in (torch.uint8, np.dtype(np.uint8)):
            raise BatchError(
                f"finish_batch: {name!r} is {dtype}, but the batch's finish spec says it is "
                "the compact uint8 form still to be normalized; call finish_batch before "
                "casting the batch (or cast the finished float32 batch)")


def _finish_channels_last(out: dict[str, Any], spec: Mapping[str, Any]) -> dict[str, Any]:
    """A compact batch of a user's transform: its uint8 image through the transform's own
    final Normalize, reproduced (``(x - shift) * scale`` per channel, channels last)."""
    key = spec.get("image_key", "image")
    value = out.get(key)
    if not (isinstance(value, torch.Tensor) and value.dtype == torch.uint8):
        return out
    shift = np.asarray(spec["shift"], np.float32)
    scale = np.asarray(spec["scale"], np.float32)
    if value.device.type == "cpu":
        block = batchmem.local_block([Spec(key, tuple(value.shape), np.dtype(np.float32))])
        normalize_channels_last(value.numpy(), shift, scale, block.arrays[key])
        out[key] = block.tensors[key]
    else:
        out[key] = normalize_channels_last_torch(
            value, torch.from_numpy(shift), torch.from_numpy(scale),
            torch.empty(value.shape, dtype=torch.float32, device=value.device))
    return out


@functools.lru_cache(maxsize=16)
def _finish_config(mean: tuple[float, ...], std: tuple[float, ...]) -> TransformConfig:
    # Only mean and std enter ``finish``; one config per spec keeps its constants cached.
    return TransformConfig(mean=mean, std=std)  # type: ignore[arg-type]


def collate(samples: Sequence[Sample], keys: str = "db") -> dict[str, Any]:
    """Stack images, maps and matrices; keep polygons, ignore flags and metadata as lists.

    ``keys="origin"`` names the batch the origin project's way (``images``, ``polygons``,
    ``prob_maps``, ``thresh_maps``, ``inverse_matrix``, ``image_filename``, ``image_path``,
    ``raw_size``, ``orientation``, ``metadata``) from samples with the origin's item keys.
    """
    if keys == "origin":
        return _collate_origin(samples)
    if keys != "db":
        raise ValueError(f"collate: keys must be 'db' or 'origin', got {keys!r}")
    spec = batch_finish_spec(samples)  # (before stacking: a mix is refused, not promoted)
    out: dict[str, Any] = {}
    for name in ("image", *MAP_NAMES, "inverse_matrix"):
        if name in samples[0]:
            tensors = [s[name] for s in samples]
            out[name] = _whole_buffer(tensors)
            if out[name] is None:
                out[name] = torch.stack(tensors)
    for name in ("polygons", "ignore", "meta"):
        out[name] = [s[name] for s in samples]
    if spec is not None:  # compact samples: the batch says how to finish them
        out[FINISH] = spec
    return out


def batch_finish_spec(samples: Sequence[Sample]) -> dict[str, Any] | None:
    """The finishing spec that describes every sample of a batch (None: none is compact).

    A batch carries one spec for all its rows, so samples that are compact and not (a
    ``ConcatDataset`` of a compact and a float32 dataset), or compact with different specs
    (two normalizations), cannot form one batch: :class:`~diskcache_ocr.errors.BatchError`
    names two samples that differ.
    """
    if not samples:
        return None
    first = samples[0].get(FINISH)
    if first is not None:
        check_finish_spec(first)
    for i, sample in enumerate(samples):
        spec = sample.get(FINISH)
        if spec is not first and spec != first:
            raise BatchError(
                f"collate: sample 0 ({_sample_file(samples[0])}) is {_describe(first)}, "
                f"sample {i} ({_sample_file(sample)}) is {_describe(spec)}; one batch holds "
                "samples of one output form and one normalization (batch such datasets "
                "apart, or give them the same output and transform)")
    return first


def _sample_file(sample: Sample) -> str:
    meta = sample.get("meta") or sample.get("metadata") or {}
    return str(meta.get("file") or meta.get("filename") or "?")


def _describe(spec: Mapping[str, Any] | None) -> str:
    if spec is None:
        return "finished (float, no finish spec)"
    if spec.get("op") == "sub_mul":
        return (f"compact (uint8, finished by shift {spec.get('shift')}, "
                f"scale {spec.get('scale')})")
    return f"compact (uint8, finished by mean {spec.get('mean')}, std {spec.get('std')})"


def collate_fn(keys: str = "db") -> Any:
    """A DataLoader ``collate_fn`` naming its batch keys by ``keys`` ("db" or "origin")."""
    if keys not in ("db", "origin"):
        raise ValueError(f"collate_fn: keys must be 'db' or 'origin', got {keys!r}")
    return functools.partial(collate, keys=keys)


def _stack(values: Sequence[Any]) -> torch.Tensor:
    whole = _whole_rows(values)
    if whole is not None:
        return whole
    return torch.stack([v if isinstance(v, torch.Tensor) else torch.from_numpy(np.asarray(v))
                        for v in values])


def _collate_origin(samples: Sequence[Sample]) -> dict[str, Any]:
    if samples and "metadata" not in samples[0]:
        raise ValueError("collate(keys='origin') needs samples with the origin's item keys "
                         "(CachedOCRDataset(..., item_keys='origin'))")
    spec = batch_finish_spec(samples)
    out: dict[str, Any] = {"images": _stack([s["image"] for s in samples]),
                           "polygons": [s["polygons"] for s in samples],
                           "inverse_matrix": _stack([s["inverse_matrix"] for s in samples])}
    for name, batch_name in (("prob_map", "prob_maps"), ("thresh_map", "thresh_maps")):
        if samples and name in samples[0]:
            out[batch_name] = _stack([s[name] for s in samples])
    meta = [s["metadata"] for s in samples]
    out["image_filename"] = [m["filename"] for m in meta]
    out["image_path"] = [m["path"] for m in meta]
    out["raw_size"] = [m["raw_size"] for m in meta]
    out["orientation"] = [m["orientation"] for m in meta]
    out["metadata"] = meta
    if spec is not None:  # compact samples: the batch says how to finish them
        out[FINISH] = {**spec, "image_key": "images"}
    return out


def _whole_rows(values: Sequence[Any]) -> torch.Tensor | None:
    """The packed batch the values are consecutive rows of, if they are exactly that."""
    if not values:
        return None
    if isinstance(values[0], torch.Tensor):
        return _whole_buffer(list(values)) if all(
            isinstance(v, torch.Tensor) for v in values) else None
    first = getattr(values[0], "base", None)
    if not isinstance(first, BatchRow) or first.batch.shape[0] != len(values):
        return None
    for i, v in enumerate(values):
        row = getattr(v, "base", None)
        # (a slice of a row has the same base: the memory it covers says which it is)
        if (not isinstance(v, np.ndarray) or not isinstance(row, BatchRow)
                or row.batch is not first.batch or row.row != i
                or not _is_whole_view(v, first.batch[i])):
            return None
    return first.batch


def _is_whole_view(array: np.ndarray, tensor: torch.Tensor) -> bool:
    """Whether ``array`` covers exactly ``tensor``'s memory, contiguously."""
    return (array.flags.c_contiguous and tensor.is_contiguous()
            and TORCH_DTYPES.get(array.dtype) == tensor.dtype
            and array.shape == tuple(tensor.shape) and array.nbytes == tensor.nbytes
            and array.__array_interface__["data"][0] == tensor.data_ptr())


def _whole_buffer(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """The batch buffer the tensors are consecutive rows of, if they are exactly that."""
    base = tensors[0]._base
    if base is None or base.dim() != tensors[0].dim() + 1 or base.shape[0] != len(tensors):
        return None
    if not base.is_contiguous():
        return None
    row = base[0].numel()
    for i, t in enumerate(tensors):
        if t._base is not base or t.storage_offset() != base.storage_offset() + i * row:
            return None
    return base


__all__ = ["FINISH", "GEOMETRY", "TORCH_DTYPES", "BatchBuffers", "BatchRow", "Catalog",
           "Polygons", "Sample", "assemble", "batch_finish_spec", "check_finish_spec", "collate",
           "collate_fn", "cpu_array", "empty_sample", "finish_batch", "put_image"]

from diskcache_ocr.ocr.catalog import Catalog  # noqa: E402  (its old home)
