"""Rate limits by key (an address, an email) with a bounded memory footprint."""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol


class RateLimiter(Protocol):
    def hit(self, key: str) -> float | None:
        """Counts one attempt for `key`; returns None if allowed, else the seconds until it would be."""
        ...


class SlidingWindowLimiter:
    """At most `limit` attempts per `window_s` per key, estimated from the current and previous fixed windows.

    Keeps at most `max_keys` keys (least recently seen evicted first), so an attacker spraying addresses or
    emails cannot grow memory without bound. State is per process.
    """

    def __init__(self, limit: int, window_s: float, max_keys: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window_s = window_s
        self.max_keys = max_keys
        self._clock = clock
        self._windows: OrderedDict[str, tuple[int, int, int]] = OrderedDict()  # key -> (index, current, previous)

    def hit(self, key: str) -> float | None:
        now = self._clock()
        index = int(now // self.window_s)
        start, current, previous = self._windows.pop(key, (index, 0, 0))
        if start != index:
            previous = current if start == index - 1 else 0
            current = 0
        elapsed_fraction = (now % self.window_s) / self.window_s
        estimate = previous * (1 - elapsed_fraction) + current
        if estimate + 1 > self.limit:
            self._windows[key] = (index, current, previous)
            return self._retry_after(now, current, previous)
        self._windows[key] = (index, current + 1, previous)
        while len(self._windows) > self.max_keys:
            self._windows.popitem(last=False)
        return None

    def _retry_after(self, now: float, current: int, previous: int) -> float:
        remaining_in_window = self.window_s - (now % self.window_s)
        if current + 1 > self.limit or previous == 0:
            return max(1.0, math.ceil(remaining_in_window))
        # The previous window's weight fades linearly; wait until it has faded enough for one more attempt.
        needed_fraction = 1 - (self.limit - 1 - current) / previous
        wait = needed_fraction * self.window_s - (now % self.window_s)
        return max(1.0, math.ceil(min(wait, remaining_in_window)))
