"""BatchLoader: feed a training step from the cache without a DataLoader's per-sample hops.

The main process reads each batch inside one read transaction; a small thread pool copies
the zero-copy views straight into reusable (pinned, when CUDA is there) batch buffers; with a
device, host-to-device copies are asynchronous and a buffer is reused only after its copy
has finished (CUDA events). A producer thread fills batch k+1 while the caller works on
batch k. Misses are filled read-through exactly as in :class:`CachedOCRDataset`: the loader
reads by the dataset's engine (or an engine it is given), never by the dataset itself.

With a device, the engine fills compact buffers (a compact pipeline's uint8 image, the binary
maps as their stored uint8 0/1) and finishes them on the device with the same code the
uncached path uses: fewer bytes written on the host and moved to the device
(benchmarks/README.md has the figures).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import BatchSampler, RandomSampler, Sampler, SequentialSampler

from diskcache_ocr.dataset import CachedOCRDataset
from diskcache_ocr.engine_setup import engine_of
from diskcache_ocr.readthrough import ReadThrough
from diskcache_ocr.samples import BatchBuffers

_DONE = object()


class _BufferSet:
    """One set of reusable host buffers and the event that says the device is done with it
    (without a device, only a place in the queue of batches in flight)."""

    def __init__(self, buffers: BatchBuffers | None, rows: int) -> None:
        self.buffers = buffers
        self.rows = rows  # how many samples the buffers hold
        self.event: Any = None  # torch.cuda.Event once a device copy was issued

    def wait_free(self) -> None:
        if self.event is not None:
            self.event.synchronize()
            self.event = None


class BatchLoader:
    """Batches from a :class:`CachedOCRDataset`, in the structure :func:`collate` returns.

    >>> loader = BatchLoader(ds, batch_size=16, shuffle=True, device="cuda")  # doctest: +SKIP
    >>> for batch in loader:                                                  # doctest: +SKIP
    ...     loss = model(batch["image"], batch["prob_map"])

    Every batch is the caller's own, to keep as long as it likes: without a device its host
    memory is reused only once nothing refers to it any more (as in a DataLoader worker);
    with one (``"cpu"`` included) the device tensors are fresh. A batch sampler may yield
    batches of any size.
    A dataset made with ``output="compact"`` yields compact batches without a device
    (``diskcache_ocr.finish_batch`` finishes them); with one they arrive finished.

    ``dataset`` may also be a read-through engine (a dataset's ``engine``, or one
    :func:`~diskcache_ocr.engine_setup.open_engine` made): its batches are float32 unless
    ``output="compact"`` says otherwise (None: the dataset's output form).
    """

    def __init__(
        self,
        dataset: CachedOCRDataset | ReadThrough,
        batch_size: int = 16,
        *,
        sampler: Sampler[int] | Iterable[int] | None = None,
        batch_sampler: Iterable[Sequence[int]] | None = None,
        shuffle: bool = False,
        drop_last: bool = False,
        threads: int = 4,
        buffers: int = 2,
        pin_memory: bool | None = None,
        device: str | torch.device | None = None,
        generator: torch.Generator | None = None,
        output: Literal["float32", "compact"] | None = None,
    ) -> None:
        if batch_size < 1 or buffers < 2 or threads < 1:
            raise ValueError(f"need batch_size >= 1, buffers >= 2, threads >= 1; got "
                             f"{batch_size}, {buffers}, {threads}")
        self.dataset = dataset
        self.engine = engine_of(dataset, "BatchLoader")
        if output is None:
            output = "float32" if isinstance(dataset, ReadThrough) else dataset.output
        if output not in ("float32", "compact"):
            raise ValueError(f"output must be 'float32' or 'compact', got {output!r}")
        self.output = output
        self.device = torch.device(device) if device is not None else None
        if batch_sampler is None:
            if sampler is None:
                # (a sampler reads only the length of what it samples)
                items = range(len(self.engine.catalog))
                sampler = (RandomSampler(items, generator=generator) if shuffle
                           else SequentialSampler(items))
            batch_sampler = BatchSampler(sampler, batch_size, drop_last)  # type: ignore[arg-type]
        self.batch_sampler = batch_sampler
        self.batch_size = batch_size
        cuda = torch.cuda.is_available()
        self.pin_memory = cuda if pin_memory is None else (pin_memory and cuda)
        self.threads = threads
        self.n_buffers = buffers
        self._slots: list[_BufferSet] = []
        self._pool: ThreadPoolExecutor | None = None

    def __len__(self) -> int:
        return len(self.batch_sampler)  # type: ignore[arg-type]

    # -- resources, kept across epochs ---------------------------------------------------
    def _ensure_resources(self) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="diskcache-copy")
        if not self._slots:
            # Compact bytes travel to a device and are finished there; on the CPU the
            # buffers get the finished float32 arrays directly.
            self._slots = [_BufferSet(None, 0) for _ in range(self.n_buffers)]

    def close(self) -> None:
        """Release the thread pool and the buffers (a later iteration makes new ones)."""
        for slot in self._slots:
            slot.wait_free()
        self._slots = []
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> BatchLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- iteration -----------------------------------------------------------------------
    def _run_copies(self, copies: list[tuple[Any, tuple[Any, ...]]]) -> None:
        assert self._pool is not None
        for future in [self._pool.submit(fn, *args) for fn, args in copies]:
            future.result()

    def _fill(self, slot: _BufferSet, indices: Sequence[int]) -> dict[str, Any]:
        slot.wait_free()
        engine = self.engine
        if self.device is None:
            # The batch itself goes to the caller, who may keep it (a prefetching trainer,
            # a list): memory that anything still refers to is never refilled.
            buffers = engine.buffers(len(indices), pin=self.pin_memory,
                                     compact=self.output == "compact", reuse=True)
        else:
            if slot.buffers is None or slot.rows < len(indices):
                slot.rows = max(self.batch_size, len(indices))
                slot.buffers = engine.buffers(slot.rows, pin=self.pin_memory, compact=True,
                                              reuse=True)
            buffers = slot.buffers
        return engine.batch(indices, buffers, run_copies=self._run_copies)

    def _to_device(self, slot: _BufferSet, batch: dict[str, Any]) -> dict[str, Any]:
        if self.device is None:
            return batch
        out = dict(batch)
        for name, value in batch.items():
            if isinstance(value, torch.Tensor):
                # copy=True: with a CPU "device" the move would otherwise hand out the host
                # buffer itself, which the next batch refills while the caller still holds it.
                out[name] = value.to(self.device, non_blocking=self.pin_memory, copy=True)
        out = self.engine.finish(out)
        if self.device.type == "cuda":
            slot.event = torch.cuda.Event()
            slot.event.record()
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._ensure_resources()
        free: queue.Queue[_BufferSet] = queue.Queue()
        for slot in self._slots:
            free.put(slot)
        ready: queue.Queue[Any] = queue.Queue()
        stop = threading.Event()

        def produce() -> None:
            try:
                for indices in self.batch_sampler:
                    slot = None
                    while slot is None and not stop.is_set():
                        try:
                            slot = free.get(timeout=0.1)
                        except queue.Empty:
                            pass
                    if slot is None:
                        break
                    ready.put((slot, self._fill(slot, list(indices))))
            except BaseException as exc:  # handed to the consumer, raised there
                ready.put(exc)
            finally:
                # (no read snapshot of this thread may outlive the epoch)
                if self.engine.store is not None:
                    self.engine.store.refresh()
                ready.put(_DONE)

        producer = threading.Thread(target=produce, name="diskcache-batches", daemon=True)
        producer.start()
        try:
            while True:
                got = ready.get()
                if got is _DONE:
                    break
                if isinstance(got, BaseException):
                    raise got
                slot, batch = got
                if self.device is not None:
                    out = self._to_device(slot, batch)
                    free.put(slot)  # reused only after its copy finished (slot.wait_free)
                    yield out
                else:
                    del got
                    yield batch  # the caller's: its memory is reused once nothing holds it
                    del batch
                    free.put(slot)  # (only a place in the queue of batches in flight)
        finally:
            stop.set()
            producer.join()


def split_batch(batch: dict[str, Any]) -> list[dict[str, Any]]:
    """The samples of a batch (for tests and debugging)."""
    n = len(batch["meta"])
    out = []
    for i in range(n):
        out.append({k: (v[i] if isinstance(v, (torch.Tensor, list, np.ndarray)) else v)
                    for k, v in batch.items()})
    return out


__all__ = ["BatchLoader", "split_batch"]
