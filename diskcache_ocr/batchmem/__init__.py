"""Memory for batches, reused as soon as nobody can read it any more.

A cached sample is a few copies of bytes (the map → a batch buffer), so the cost of *fresh*
memory dominates it: the first write to each new page traps into the kernel, which zeroes
the page (and, for shared memory, allocates it in tmpfs): allocating a batch as fresh shared
memory costs more than filling it (benchmarks/README.md has the figures). So batch memory is
kept and reused, with one rule: a block is handed out again only when no tensor,
array or view of its last use is alive anywhere, in any process.

- **In one process** (``ds[i]``, a ``DataLoader`` without workers): a small pool of blocks
  owned by numpy. Every tensor carved from a block holds a reference to it, so
  ``sys.getrefcount`` says exactly whether anything still reads it.
- **In a DataLoader worker**: slabs of POSIX shared memory (``/dev/shm``). The worker sends
  a small reference instead of the bytes (:class:`SlabTensor` pickles as one); the main
  process maps the slab and builds plain tensors on it, tied to a lease whose end marks the
  slab free in its header. The worker reuses a slab only when the main process has released
  it and its own references are gone. When every slab is busy (the consumer holds many
  batches), or the system has no ``/dev/shm``, a block is fresh shared memory as before.
  The main process maps each slab once and reads every later batch of it through the same
  mapping (a fresh mapping per batch faults on each page read again); the mapping of a slab
  whose worker has exited is let go when the next new slab arrives or before a fork, and is
  unmapped once no tensor of its last batch is alive.
- **Shared memory is never kept beyond need when it runs short**: a worker keeps at most
  four slabs and puts a smaller batch into a free larger one; when ``/dev/shm`` has no room,
  every worker of the loader gives back its idle slabs and stops reusing (a warning), so it
  needs no more than a DataLoader without reuse.
- **No slab outlives its worker**: unlinked at the worker's exit, when it is terminated
  (SIGTERM), and swept by name (owner pid) once its owner is dead: when the main process
  first sees a new worker's slab, when a worker starts, and at the main process's exit.

Nothing here is ever read from the cache: slabs carry no pickled data, only arrays.

- :mod:`.blocks`: a block's layout, and the pool of one process;
- :mod:`.slabs`: a worker's shared-memory slabs (the sending end);
- :mod:`.leases`: the main process's end of a slab (mappings, leases, sweeps at exit);
- :mod:`.pages`: the writer's allocator tuning and page prefaulting.
"""

from diskcache_ocr.batchmem.blocks import (
    ALIGN,
    LOCAL_KEEP,
    Block,
    Spec,
    layout,
    local_block,
    release_local,
)
from diskcache_ocr.batchmem.leases import rebuild
from diskcache_ocr.batchmem.pages import (
    WRITER_MMAP_THRESHOLD,
    WRITER_TRIM_THRESHOLD,
    address_populate,
    keep_freed_memory,
    populate,
)
from diskcache_ocr.batchmem.slabs import (
    SHM_DIR,
    SLAB_PREFIX,
    SLABS_PER_WORKER,
    SlabTensor,
    out_of_shared_memory,
    shared_block,
    wait_for_shared_memory,
)

__all__ = ["ALIGN", "LOCAL_KEEP", "SHM_DIR", "SLABS_PER_WORKER", "SLAB_PREFIX",
           "WRITER_MMAP_THRESHOLD", "WRITER_TRIM_THRESHOLD", "Block",
           "SlabTensor", "Spec", "address_populate", "keep_freed_memory", "layout",
           "local_block", "out_of_shared_memory", "populate", "rebuild", "release_local",
           "shared_block", "wait_for_shared_memory"]
