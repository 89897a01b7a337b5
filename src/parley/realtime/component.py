"""The `agent_bridge` component: the event log writer, the run manager and the WebSocket hub, started in
that order so nothing accepts a connection before runs can be stored and delivered (incident pattern 8)."""

from __future__ import annotations

from dataclasses import dataclass

from parley.agents.runs import RunManager
from parley.health.components import ComponentHealth
from parley.realtime.bus import EventBus
from parley.realtime.event_log import EventLog
from parley.realtime.hub import ConnectionHub
from parley.realtime.protocol import MessageRouter
from parley.realtime.session import SessionServices


@dataclass(frozen=True)
class RealtimeServices:
    bus: EventBus
    event_log: EventLog
    hub: ConnectionHub
    router: MessageRouter
    session_services: SessionServices


class AgentBridge:
    name = "agent_bridge"
    required = True

    def __init__(self, event_log: EventLog, runs: RunManager, hub: ConnectionHub, deadline_s: float) -> None:
        self.event_log = event_log
        self.runs = runs
        self.hub = hub
        self.deadline_s = deadline_s
        self.draining = False

    async def start(self) -> None:
        await self.event_log.start()
        try:
            await self.runs.start()
        except Exception:
            await self.event_log.stop(0)
            raise
        self.draining = False
        self.hub.accepting = True

    def begin_drain(self) -> None:
        self.draining = True
        self.hub.accepting = False

    async def stop(self) -> None:
        self.hub.close_all()
        await self.runs.stop(self.deadline_s)
        await self.event_log.stop(self.deadline_s)

    @property
    def accepting(self) -> bool:
        return self.hub.accepting and self.event_log.health().status == "healthy"

    async def check(self) -> ComponentHealth:
        log_health = self.event_log.health()
        if log_health.status != "healthy":
            return log_health
        detail = (f"{self.hub.count} connections, {self.runs.active_runs} active runs, "
                  f"{self.event_log.backlog} events queued")
        if not self.hub.accepting:
            return ComponentHealth("unhealthy", detail="not accepting connections: " + detail)
        return ComponentHealth("healthy", latency_ms=self.event_log.last_commit_ms, detail=detail)
