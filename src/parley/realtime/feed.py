"""A thread's events for one receiver: every stored event after `after_seq`, exactly once, in order, then live.

The feed subscribes to the bus first, then replays from the log; live events that arrive meanwhile only raise
the high-water mark, and the replay keeps reading until it has passed it, then switches to live without
awaiting in between. A live event that skips a number (events from several processes can cross on the bus)
sends the feed back to the log for the missing ones. Duplicates are dropped by `seq`.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable, Callable

from parley.observability.logging import describe, get_logger
from parley.realtime.bus import EventBus, Subscription
from parley.realtime.events import StoredEvent
from parley.storage.database import is_database_unavailable

log = get_logger("parley.feed")

REPLAY_PAGE = 500
GAP_RECHECK_S = 0.5

ReadEvents = Callable[[str, int, int], Awaitable[list[StoredEvent]]]  # (thread_id, after_seq, limit)
LiveSink = Callable[[StoredEvent], bool]  # must not block; False when the receiver cannot take more
ReplaySink = Callable[[StoredEvent], Awaitable[bool]]  # may wait for room; False when the receiver is gone


class FeedState(enum.Enum):
    REPLAYING = "replaying"
    LIVE = "live"
    CLOSED = "closed"


class ThreadFeed:
    def __init__(self, thread_id: str, after_seq: int, read: ReadEvents, live_sink: LiveSink,
                 replay_sink: ReplaySink, on_failure: Callable[[str], None] | None = None) -> None:
        self.thread_id = thread_id
        self.last_seq = after_seq
        self._high_water = after_seq
        self._read = read
        self._live_sink = live_sink
        self._replay_sink = replay_sink
        self._on_failure = on_failure
        self.state = FeedState.REPLAYING
        self._subscription: Subscription | None = None
        self._replay: asyncio.Task[None] | None = None

    async def start(self, bus: EventBus) -> None:
        self._subscription = await bus.subscribe(self.thread_id, self._on_live)
        self._start_replay()

    def close(self) -> None:
        if self.state is FeedState.CLOSED:
            return
        self.state = FeedState.CLOSED
        if self._subscription is not None:
            self._subscription()
        if self._replay is not None and self._replay is not asyncio.current_task():
            self._replay.cancel()

    def _closed(self) -> bool:
        return self.state is FeedState.CLOSED  # a method: the state changes under awaits, which mypy cannot see

    def _on_live(self, event: StoredEvent) -> None:
        if self.state is FeedState.CLOSED or event.seq <= self.last_seq:
            return  # already delivered (from the log or live)
        if self.state is FeedState.LIVE and event.seq == self.last_seq + 1:
            self.last_seq = event.seq
            if not self._live_sink(event):
                self.close()
            return
        self._high_water = max(self._high_water, event.seq)
        if self.state is FeedState.LIVE:  # a gap: fetch what is missing from the log
            self.state = FeedState.REPLAYING
            self._start_replay()

    async def _gap_confirmed(self) -> bool:
        """The log holds a later event but not the next one. Numbers are reserved and stored in one
        transaction, so a missing one never arrives: after one more look, the feed moves past it (saying so)
        rather than wait forever. Returns True once the feed has moved on."""
        await asyncio.sleep(GAP_RECHECK_S)
        if self._closed():
            return False
        again = await self._read(self.thread_id, self.last_seq, 1)
        if not again or again[0].seq == self.last_seq + 1:
            return False  # the next one is there after all
        log.error("event_log_gap_skipped", thread_id=self.thread_id, missing_from=self.last_seq + 1,
                  missing_to=again[0].seq - 1)
        self.last_seq = again[0].seq - 1
        return True

    def _start_replay(self) -> None:
        self._replay = asyncio.create_task(self._replay_from_log(), name=f"feed-replay-{self.thread_id}")

    async def _replay_from_log(self) -> None:
        delay = 0.1
        while self.state is FeedState.REPLAYING:
            try:
                events = await self._read(self.thread_id, self.last_seq, REPLAY_PAGE)
                if events and events[0].seq > self.last_seq + 1 and not await self._gap_confirmed():
                    continue
            except Exception as exc:
                if not is_database_unavailable(exc):  # retrying cannot cure it: say so and stop
                    log.error("feed_replay_failed", thread_id=self.thread_id, reason=describe(exc))
                    self.close()
                    if self._on_failure is not None:
                        self._on_failure(self.thread_id)
                    return
                # The log is unreachable: keep trying while the receiver waits, saying so once.
                if delay == 0.1:
                    log.warning("feed_replay_waiting", thread_id=self.thread_id, reason=describe(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            gap = False
            for event in events:
                if event.seq <= self.last_seq:
                    continue
                if event.seq != self.last_seq + 1:
                    gap = True  # the next read starts at it, and `_gap_confirmed` decides
                    break
                if self._closed():
                    return
                self.last_seq = event.seq
                if not await self._replay_sink(event):
                    self.close()
                    return
            if gap:
                continue
            if len(events) < REPLAY_PAGE and self.last_seq >= self._high_water:
                if self.state is FeedState.REPLAYING:
                    self.state = FeedState.LIVE  # no await since the check: nothing slipped in between
                return
            if not events:
                await asyncio.sleep(0.01)  # the bus ran ahead of what this reader can see yet
