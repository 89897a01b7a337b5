"""Identifiers: time-ordered, URL-safe, opaque to clients (ULID layout: 48-bit ms time + 80 random bits)."""

from __future__ import annotations

import os
import threading
import time

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford base32, lower case
_PAIRS = [first + second for first in _ALPHABET for second in _ALPHABET]  # every 10-bit value as 2 characters

# The random bits come from the operating system's CSPRNG, read 4 KiB at a time: one `getrandom` per 409 ids
# instead of one per id (each call also gives up the GIL, which the event-store thread then holds for a while).
_POOL_BYTES = 4096
_RANDOM_BYTES = 10
_lock = threading.Lock()
_pool = b""
_offset = 0


def _forget_pool() -> None:
    """A forked child must not hand out the ids its parent's pool still holds."""
    global _pool, _offset
    _pool, _offset = b"", 0


os.register_at_fork(after_in_child=_forget_pool)


def _random_bits() -> int:
    global _pool, _offset
    with _lock:
        start = _offset
        if start + _RANDOM_BYTES > len(_pool):
            _pool, start = os.urandom(_POOL_BYTES), 0
        _offset = start + _RANDOM_BYTES
        return int.from_bytes(_pool[start:start + _RANDOM_BYTES], "big")


def new_id() -> str:
    """A 26-character id whose lexical order follows creation time (to the millisecond)."""
    v = (time.time_ns() // 1_000_000) << 80 | _random_bits()
    # 26 characters carry 130 bits (two leading zeros, then the value), 10 bits per pair, most significant first.
    p = _PAIRS
    return "".join((p[v >> 120 & 1023], p[v >> 110 & 1023], p[v >> 100 & 1023], p[v >> 90 & 1023],
                    p[v >> 80 & 1023], p[v >> 70 & 1023], p[v >> 60 & 1023], p[v >> 50 & 1023], p[v >> 40 & 1023],
                    p[v >> 30 & 1023], p[v >> 20 & 1023], p[v >> 10 & 1023], p[v & 1023]))
