"""This thread's reusable buffer that records are encoded into at commit.

Records are encoded into one reused buffer per thread right before LMDB copies them into
the map: a fresh multi-megabyte buffer per record costs more in page faults than the copy.
Larger records get a buffer of their own; an unused buffer is dropped after a while (the
end of a read block asks, :meth:`EncodeBuffer.drop_if_idle`).
"""

from __future__ import annotations

import threading
import time

_SCRATCH_MAX = 64 << 20
_SCRATCH_IDLE_S = 10.0


class EncodeBuffer(threading.local):
    """This thread's reusable encode buffer (see ``_SCRATCH_MAX``): a write batch's records
    are written into it at commit, and the end of a read block lets it go once idle."""

    buf: bytearray | None = None
    used = 0.0

    def get(self, size: int) -> bytearray:
        if size > _SCRATCH_MAX:
            return bytearray(size)
        if self.buf is None or len(self.buf) < size:
            self.buf = None  # (let the old one go before the new one is touched)
            self.buf = bytearray(-(-size // (1 << 20)) * (1 << 20))
        self.used = time.monotonic()
        return self.buf

    def drop_if_idle(self, now: float) -> None:
        if self.buf is not None and now - self.used > _SCRATCH_IDLE_S:
            self.buf = None


encode_buffer = EncodeBuffer()


__all__ = ["EncodeBuffer", "encode_buffer"]
