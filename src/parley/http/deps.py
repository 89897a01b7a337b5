"""What routes receive: the app's services, a request-scoped database session, the authenticated caller.

`SessionDep` is the only way a route gets a session: a real `AsyncSession`, opened for the request and closed on
every path (success, error, client gone).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, cast

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.requests import HTTPConnection

from parley.agents.base import AgentRegistry
from parley.agents.runs import RunManager
from parley.analytics.sink import AnalyticsSink
from parley.analytics.usage import UsageService
from parley.auth.ratelimit import RateLimiter
from parley.auth.service import AuthService
from parley.auth.tokens import Principal
from parley.errors import NotFound, ServiceUnavailable, Unauthorized
from parley.health.components import Lifecycle
from parley.observability.alerts import AlertManager
from parley.observability.diagnose import RecentErrors
from parley.observability.slo import SLOTracker
from parley.observability.telemetry import Telemetry
from parley.realtime.component import AgentBridge, RealtimeServices
from parley.settings import Settings
from parley.storage.database import Database, is_database_unavailable
from parley.tools.base import ToolRegistry


@dataclass(frozen=True)
class RateLimits:
    login_by_address: RateLimiter
    login_by_email: RateLimiter
    register_by_address: RateLimiter
    tickets_by_user: RateLimiter


@dataclass(frozen=True)
class AppServices:
    """Everything `create_app` built, handed to the edges. One per app; nothing here is a module global."""

    settings: Settings
    database: Database
    lifecycle: Lifecycle
    auth: AuthService
    rate_limits: RateLimits
    agents: AgentRegistry
    tools: ToolRegistry
    runs: RunManager
    realtime: RealtimeServices
    bridge: AgentBridge
    analytics: AnalyticsSink
    usage: UsageService
    telemetry: Telemetry
    slos: SLOTracker
    alerts: AlertManager
    recent_errors: RecentErrors


def get_services(connection: HTTPConnection) -> AppServices:
    return cast(AppServices, connection.app.state.services)


ServicesDep = Annotated[AppServices, Depends(get_services)]


async def get_session(services: ServicesDep) -> AsyncIterator[AsyncSession]:
    if not services.lifecycle.is_started("database"):
        raise ServiceUnavailable("The service is starting; retry shortly.", code="starting", retry_after=1)
    async with services.database.sessionmaker() as session:
        try:
            yield session
        except Exception as exc:
            if is_database_unavailable(exc):
                services.telemetry.db_session(ok=False)
            raise
        services.telemetry.db_session(ok=True)


SessionDep = Annotated[AsyncSession, Depends(get_session)]


def bearer_token(connection: HTTPConnection) -> str | None:
    header = connection.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def get_principal(request: Request, services: ServicesDep) -> Principal:
    token = bearer_token(request)
    if token is None:
        raise Unauthorized("A bearer access token is required.")
    principal = services.auth.codec.verify(token)
    request.state.user_id = principal.user_id
    return principal


CurrentUser = Annotated[Principal, Depends(get_principal)]


def get_admin(principal: CurrentUser) -> Principal:
    if not principal.is_admin:
        raise NotFound()  # admin routes do not exist for anyone else
    return principal


AdminUser = Annotated[Principal, Depends(get_admin)]


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"
