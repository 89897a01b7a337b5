"""The event bus: fans stored events out to every subscriber of a thread, and carries control messages
(such as "cancel run R") to whichever process can act on them.

`InProcessEventBus` serves one process. A bus for several processes implements the same protocol; nothing
outside this module knows which one it has.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from parley.clock import utcnow
from parley.health.components import ComponentHealth
from parley.observability.logging import get_logger
from parley.realtime.events import StoredEvent

log = get_logger("parley.bus")

EventListener = Callable[[StoredEvent], None]
ControlHandler = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass(frozen=True)
class Subscription:
    """A handle that stops one listener's deliveries; calling it twice is harmless."""

    cancel: Callable[[], None]

    def __call__(self) -> None:
        self.cancel()


class EventBus(Protocol):
    name: str
    required: bool

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def check(self) -> ComponentHealth: ...

    async def publish(self, events: Sequence[StoredEvent]) -> None:
        """Delivers stored events (in seq order per thread) to every subscriber of their threads."""
        ...

    async def subscribe(self, thread_id: str, listener: EventListener) -> Subscription:
        """Registers `listener` for the thread's events; effective when this returns. Listeners must not block."""
        ...

    async def send_control(self, message: dict[str, Any]) -> None:
        """Delivers a control message to every process's control handler (this one's included)."""
        ...

    def on_control(self, handler: ControlHandler) -> None: ...


class InProcessEventBus:
    """Listeners in this process, called synchronously in publish order."""

    name = "event_bus"
    required = True

    def __init__(self) -> None:
        self._listeners: dict[str, dict[int, EventListener]] = defaultdict(dict)
        self._next_key = 0
        self._control_handlers: list[ControlHandler] = []
        self._running = False
        self.published = 0

    async def start(self) -> None:
        self._running = True

    async def stop(self) -> None:
        self._running = False
        self._listeners.clear()

    async def check(self) -> ComponentHealth:
        if not self._running:
            return ComponentHealth("unhealthy", detail="stopped")
        # A real round trip through the same path events take.
        started = time.perf_counter()
        received: list[StoredEvent] = []
        probe_thread = "__health__"
        unsubscribe = await self.subscribe(probe_thread, received.append)
        try:
            await self.publish([StoredEvent.make(probe_thread, 0, None, "probe", {}, utcnow())])
        finally:
            unsubscribe()
        if len(received) != 1:
            return ComponentHealth("unhealthy", detail="probe event not delivered")
        return ComponentHealth("healthy", latency_ms=(time.perf_counter() - started) * 1000)

    async def publish(self, events: Sequence[StoredEvent]) -> None:
        for event in events:
            listeners = self._listeners.get(event.thread_id)
            if not listeners:
                continue
            for listener in list(listeners.values()):
                try:
                    listener(event)
                except Exception:  # one broken listener must not starve the others
                    log.exception("listener_failed", thread_id=event.thread_id, seq=event.seq)
            self.published += 1

    async def subscribe(self, thread_id: str, listener: EventListener) -> Subscription:
        key = self._next_key
        self._next_key += 1
        self._listeners[thread_id][key] = listener

        def cancel() -> None:
            listeners = self._listeners.get(thread_id)
            if listeners is not None:
                listeners.pop(key, None)
                if not listeners:
                    del self._listeners[thread_id]

        return Subscription(cancel)

    async def send_control(self, message: dict[str, Any]) -> None:
        for handler in list(self._control_handlers):
            await handler(message)

    def on_control(self, handler: ControlHandler) -> None:
        self._control_handlers.append(handler)

    @property
    def subscriber_count(self) -> int:
        return sum(len(listeners) for listeners in self._listeners.values())
