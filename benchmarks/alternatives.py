"""What a user would otherwise write: the comparison datasets of ``bench_compare``.

* :class:`DictCacheDataset` — the origin project's approach: a per-process Python dict filled
  lazily with each sample (owned tensor copies), keyed by index. Every DataLoader worker
  fills its own dict; nothing is on disk and nothing is shared.
* :class:`NpzMapsDataset` — images through the uncached pipeline, the four DBNet maps from one
  ``np.savez`` file per image (written on first use, loaded afterwards).

Both return the same sample structure as :class:`diskcache_ocr.CachedOCRDataset` with
``load_maps`` (image, polygons, ignore, inverse_matrix, meta and the four maps), so they feed
:func:`diskcache_ocr.collate` unchanged.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from diskcache_ocr import CachedOCRDataset
from diskcache_ocr.ocr.maps import MAP_NAMES


def _owned(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, np.ndarray):
        return value.copy()
    if isinstance(value, list):
        return [_owned(v) for v in value]
    if isinstance(value, dict):
        return {k: _owned(v) for k, v in value.items()}
    return value


class DictCacheDataset(Dataset):
    """Memoizes whole samples by index in a dict of this process.

    ``report_dir``: when given, each process writes ``<pid>.json`` there with the number of
    samples it holds and their tensor bytes, so a benchmark can add up the copies.
    """

    def __init__(self, base: CachedOCRDataset, report_dir: str | os.PathLike[str] | None = None
                 ) -> None:
        self.base = base
        self.cache: dict[int, dict[str, Any]] = {}
        self.cached_bytes = 0
        self.report_dir = None if report_dir is None else str(report_dir)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        missing = [int(i) for i in indices if int(i) not in self.cache]
        if missing:
            for i, sample in zip(missing, self.base.__getitems__(missing), strict=True):
                owned = _owned(sample)
                self.cache[i] = owned
                self.cached_bytes += sum(v.numel() * v.element_size() for v in owned.values()
                                         if isinstance(v, torch.Tensor))
            self._report()
        return [self.cache[int(i)] for i in indices]

    def _report(self) -> None:
        if self.report_dir is None:
            return
        info = {"pid": os.getpid(), "worker": getattr(get_worker_info(), "id", None),
                "entries": len(self.cache), "bytes": self.cached_bytes,
                "indices": sorted(self.cache)}
        path = Path(self.report_dir) / f"{os.getpid()}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(info))
        os.replace(tmp, path)


def _batch_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A batch buffer; in shared memory inside a DataLoader worker (as the library does)."""
    t = torch.empty(shape, dtype=dtype)
    return t.share_memory_() if get_worker_info() is not None else t


class NpzMapsDataset(Dataset):
    """Uncached image path plus DBNet maps stored as one ``.npz`` file per image."""

    def __init__(self, images_dir: str | os.PathLike[str], annotations: str | os.PathLike[str],
                 npz_dir: str | os.PathLike[str]) -> None:
        self.base = CachedOCRDataset(images_dir, annotations, None, preset="none")
        self.pipeline = self.base.pipeline
        self.npz_dir = Path(npz_dir)
        self.npz_dir.mkdir(parents=True, exist_ok=True)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        samples = self.base.__getitems__(indices)
        size = self.pipeline.transform.size
        maps = {name: _batch_tensor((len(samples), 1, size, size), torch.float32)
                for name in MAP_NAMES}
        for slot, (index, sample) in enumerate(zip(indices, samples, strict=True)):
            path = self.npz_dir / f"{int(index):06d}.npz"
            if path.exists():
                with np.load(path) as z:
                    for name in MAP_NAMES:
                        np.copyto(maps[name][slot].numpy(), z[name])
            else:
                computed = self.pipeline.make_maps(sample["polygons"], sample["ignore"])
                tmp = path.with_name(path.stem + f".{os.getpid()}.tmp.npz")
                np.savez(tmp, **computed)
                os.replace(tmp, path)
                for name in MAP_NAMES:
                    np.copyto(maps[name][slot].numpy(), computed[name])
            for name in MAP_NAMES:
                sample[name] = maps[name][slot]
        return samples
