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


class SlidingWindowCounter:
    """At most `limit` attempts per `window_s` for one key, estimated from the current and previous fixed
    windows: a few numbers, so one can be kept per connection."""

    __slots__ = ("_clock", "_current", "_index", "_previous", "limit", "window_s")

    def __init__(self, limit: int, window_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window_s = window_s
        self._clock = clock
        self._index = self._current = self._previous = 0

    def hit(self) -> float | None:
        """Counts one attempt; returns None if allowed, else the seconds until one would be."""
        now = self._clock()
        index = int(now // self.window_s)
        if self._index != index:
            self._previous = self._current if self._index == index - 1 else 0
            self._current = 0
            self._index = index
        elapsed_fraction = (now % self.window_s) / self.window_s
        if self._previous * (1 - elapsed_fraction) + self._current + 1 > self.limit:
            return self._retry_after(now)
        self._current += 1
        return None

    def _retry_after(self, now: float) -> float:
        current, previous = self._current, self._previous
        remaining_in_window = self.window_s - (now % self.window_s)
        if current + 1 > self.limit or previous == 0:
            return max(1.0, math.ceil(remaining_in_window))
        # The previous window's weight fades linearly; wait until it has faded enough for one more attempt.
        needed_fraction = 1 - (self.limit - 1 - current) / previous
        wait = needed_fraction * self.window_s - (now % self.window_s)
        return max(1.0, math.ceil(min(wait, remaining_in_window)))


class SlidingWindowLimiter:
    """A `SlidingWindowCounter` per key (an address, an email).

    Keeps at most `max_keys` keys (least recently seen evicted first), so an attacker spraying addresses or
    emails cannot grow memory without bound. State is per process.
    """

    def __init__(self, limit: int, window_s: float, max_keys: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window_s = window_s
        self.max_keys = max_keys
        self._clock = clock
        self._counters: OrderedDict[str, SlidingWindowCounter] = OrderedDict()

    def hit(self, key: str) -> float | None:
        counter = self._counters.pop(key, None) or SlidingWindowCounter(self.limit, self.window_s, self._clock)
        self._counters[key] = counter
        while len(self._counters) > self.max_keys:
            self._counters.popitem(last=False)
        return counter.hit()
