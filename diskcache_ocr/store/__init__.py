"""The storage layer: one LMDB environment per cache directory.

``CacheStore`` speaks kinds, keys and records (named numpy arrays); it knows nothing about
OCR. Sub-databases: ``meta`` (the header), ``index`` (one entry per source file),
``images``, ``tensors``, ``maps`` (records), ``stats`` (persisted counters).

- :mod:`.files`: the cache directory's files, its lock, the file system it lies on;
- :mod:`.opening`: opening an environment as a cache (options, refusals, sub-databases);
- :mod:`.env`: the environment and its process rules (lazy open per process, fork safety,
  map growth, reader slots, the write transaction);
- :mod:`.txn`: read blocks with zero-copy records, and write batches;
- :mod:`.header`: the header, its format version and the unsynced marker;
- :mod:`.counters`: the read counters, in memory and on disk;
- :mod:`.versions`: the kind versions each pipeline (role) of a cache holds, and the policy
  for a mismatch;
- :mod:`.cache`: :class:`CacheStore`, the front;
- :mod:`.remove`: removing a whole cache directory (:mod:`.wipe`, its earlier name, re-exports it).

The modules talk through public names only; ``cache`` builds on all the others.

Pickling a store carries only the path and options.
"""

from diskcache_ocr.codec import parse_header
from diskcache_ocr.schema import KINDS, IndexEntry, KindVersion
from diskcache_ocr.store.cache import CacheStore
from diskcache_ocr.store.header import POLICIES, STORE_FORMAT, Policy, boot_id
from diskcache_ocr.store.opening import DEFAULT_MAP_SIZE, StoreOptions
from diskcache_ocr.store.txn import ReadTxn, Record, WriteBatch

__all__ = [
    "DEFAULT_MAP_SIZE", "KINDS", "POLICIES", "STORE_FORMAT", "CacheStore", "IndexEntry",
    "KindVersion", "Policy", "ReadTxn", "Record", "StoreOptions", "WriteBatch", "boot_id",
    "parse_header",
]
