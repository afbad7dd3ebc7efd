"""What the store's lower parts need of the :class:`~diskcache_ocr.store.cache.CacheStore` that
owns them.

``env`` (the process rules: one environment per process, the fork hooks) and ``txn`` (read
blocks) call back into their store; naming it by this protocol rather than by the class keeps
their imports pointing down, ``cache`` building on both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import lmdb


class StoreHandle(Protocol):
    """The part of a store its environment and its read blocks use."""

    path: Path

    def flush_stats(self) -> None: ...

    def _forget_after_fork(self) -> None: ...

    def _open_env(self) -> tuple[lmdb.Environment, dict[str, Any]]: ...

    def _shared(self) -> Any: ...


__all__ = ["StoreHandle"]
