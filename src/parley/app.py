"""`create_app(settings)`: the one place that builds the world, in a fixed order, and wires it to the edges.

Start-up runs in the background (readiness answers `starting` meanwhile); SIGTERM first turns readiness to
`draining` for `drain_delay_s`, then the server stops accepting and in-flight work gets `shutdown_deadline_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from parley import __version__
from parley.agents.assistant import Assistant
from parley.agents.base import Agent, AgentRegistry
from parley.agents.ops import OpsAgent
from parley.agents.routes import router as runs_router
from parley.agents.runs import RunManager
from parley.analytics.clickhouse import ClickHouseStore
from parley.analytics.pricing import PriceTable
from parley.analytics.records import RequestRecord
from parley.analytics.routes import router as usage_router
from parley.analytics.sink import AnalyticsSink, ClickHouseSink, DisabledSink
from parley.analytics.usage import UsageService
from parley.auth.ratelimit import SlidingWindowLimiter
from parley.auth.routes import router as auth_router
from parley.auth.service import AuthService
from parley.clock import utcnow
from parley.health.components import Component, Lifecycle
from parley.health.routes import router as health_router
from parley.http.deps import AppServices, RateLimits
from parley.http.errors import install_error_handlers
from parley.http.middleware import (
    BodySizeLimitMiddleware,
    RequestContextMiddleware,
    RequestRecorder,
    SecurityHeadersMiddleware,
)
from parley.ids import new_id
from parley.llm.base import LLMProvider
from parley.llm.builtin import BuiltinProvider
from parley.llm.component import LLMComponent
from parley.llm.openai_provider import OpenAIProvider
from parley.observability.alerts import AlertManager
from parley.observability.diagnose import RecentErrors
from parley.observability.logging import get_logger
from parley.observability.metrics import Metrics
from parley.observability.routes import router as observability_router
from parley.observability.slo import SLOTracker
from parley.observability.telemetry import Telemetry
from parley.realtime.bus import InProcessEventBus
from parley.realtime.component import AgentBridge, RealtimeServices
from parley.realtime.endpoint import WebSocketRouteMiddleware
from parley.realtime.event_log import EventLog
from parley.realtime.event_store import EventStore
from parley.realtime.hub import ConnectionHub
from parley.realtime.routes import router as realtime_router
from parley.realtime.session import SessionServices, build_router
from parley.settings import Settings
from parley.storage.component import DatabaseComponent
from parley.storage.database import Database
from parley.threads.routes import router as threads_router
from parley.tools.base import Tool, ToolRegistry
from parley.tools.builtin import CalculatorTool, CurrentTimeTool, SearchThreadsTool
from parley.tools.ops import ErrorPatternsTool, HealthReportTool, SLOStatusTool
from parley.tools.usage import UsageReportTool
from parley.web.routes import router as web_router
from parley.web.routes import static_files

log = get_logger("parley.app")

# The state key under which the lifespan shares the app's services with the server running it.
SERVICES_STATE_KEY = "parley_services"


def build_llm(settings: Settings) -> LLMProvider:
    if settings.llm_provider == "openai":
        api_key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else ""
        return OpenAIProvider(base_url=settings.openai_base_url, api_key=api_key, model=settings.openai_model,
                              timeout_s=settings.llm_timeout_s, max_retries=settings.llm_max_retries,
                              health_ttl_s=settings.llm_health_ttl_s)
    return BuiltinProvider(token_delay_s=settings.builtin_token_delay_s)


def build_analytics(settings: Settings, metrics: Metrics) -> AnalyticsSink:
    backend = settings.analytics_backend
    if backend == "off":
        return DisabledSink()
    if backend == "chdb":
        dsn = f"chdb://{settings.data_dir / 'analytics'}"
    else:
        assert settings.clickhouse_url is not None  # Settings.check() refuses clickhouse without a URL
        dsn = settings.clickhouse_url.get_secret_value()
    store = ClickHouseStore(dsn, settings.analytics_database, settings.analytics_ttl_days)
    return ClickHouseSink(store, queue_max=settings.analytics_queue_max, batch_max=settings.analytics_batch_max,
                          flush_interval_s=settings.analytics_flush_interval_s,
                          retry_max_s=settings.analytics_retry_max_s,
                          shutdown_flush_s=settings.analytics_shutdown_flush_s,
                          on_drop=metrics.analytics_dropped.inc)


def build_services(settings: Settings, on_fatal: Callable[[str], None] | None = None,
                   extra_agents: Sequence[Agent] = (), extra_tools: Sequence[Tool] = ()) -> AppServices:
    """Constructs every component in dependency order; nothing is started or connected yet.

    `extra_agents` and `extra_tools` extend the built-in catalogue (an embedding application's own)."""
    settings.check()
    if settings.is_sqlite or settings.jwt_secret is None:
        settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    database = Database(settings)
    auth = AuthService.from_settings(settings)
    window, keys = settings.login_rate_window_s, settings.rate_limit_max_keys
    rate_limits = RateLimits(
        login_by_address=SlidingWindowLimiter(settings.login_rate_limit * 5, window, keys),
        login_by_email=SlidingWindowLimiter(settings.login_rate_limit, window, keys),
        register_by_address=SlidingWindowLimiter(settings.register_rate_limit, window, keys),
        tickets_by_user=SlidingWindowLimiter(settings.ticket_rate_limit, 60.0, keys),
    )

    metrics = Metrics()
    slos = SLOTracker()
    analytics = build_analytics(settings, metrics)
    telemetry = Telemetry(metrics, slos, analytics)
    webhook = settings.alert_webhook.get_secret_value() if settings.alert_webhook else None
    alerts = AlertManager(slos, metrics, webhook, settings.alert_eval_interval_s)
    prices = PriceTable.load(settings.model_prices, settings.model_prices_file)
    usage = UsageService(database, analytics, settings.analytics_database)
    bus = InProcessEventBus()
    writer_database = Database(settings, pool_size=1, max_overflow=1)
    event_log = EventLog(EventStore(writer_database), bus, batch_max=settings.event_log_batch_max,
                         queue_max=settings.event_log_queue_max,
                         answer_within_s=settings.database_statement_timeout_s,
                         retry_after_s=settings.database_retry_after_s,
                         on_stored=lambda count: telemetry.run_events("stored", count))
    llm = build_llm(settings)
    recent_errors = RecentErrors(settings.recent_errors_max)
    tools = ToolRegistry([SearchThreadsTool(database), CurrentTimeTool(), CalculatorTool(), UsageReportTool(usage),
                          SLOStatusTool(slos, alerts), ErrorPatternsTool(recent_errors), *extra_tools])
    agents = AgentRegistry([Assistant(), OpsAgent(), *extra_agents])
    runs = RunManager(settings, database, event_log, bus, agents, tools, llm, worker_id=new_id(),
                      telemetry=telemetry, prices=prices)
    hub = ConnectionHub(settings.ws_max_connections_per_user)
    realtime = RealtimeServices(bus=bus, event_log=event_log, hub=hub, router=build_router(),
                                session_services=SessionServices(database=database, bus=bus, runs=runs,
                                                                 telemetry=telemetry))
    bridge = AgentBridge(event_log, runs, hub, deadline_s=settings.shutdown_deadline_s)

    # The declared start order: storage, then delivery, then the model, then what accepts work.
    storage = DatabaseComponent(database, settings, housekeeping=[auth.purge_expired])  # expired tokens, tickets
    components: list[Component] = [storage, bus, analytics, alerts, LLMComponent(llm), bridge]
    lifecycle = Lifecycle(components, on_fatal=on_fatal)
    tools.add(HealthReportTool(lifecycle))  # the one tool that needs the finished lifecycle
    return AppServices(settings=settings, database=database, lifecycle=lifecycle, auth=auth,
                       rate_limits=rate_limits, agents=agents, tools=tools, runs=runs, realtime=realtime,
                       bridge=bridge, analytics=analytics, usage=usage, telemetry=telemetry, slos=slos,
                       alerts=alerts, recent_errors=recent_errors)


def create_app(settings: Settings | None = None, on_fatal: Callable[[str], None] | None = None, *,
               extra_agents: Sequence[Agent] = (), extra_tools: Sequence[Tool] = ()) -> FastAPI:
    settings = settings or Settings()
    services = build_services(settings, on_fatal, extra_agents, extra_tools)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        # This app's recent WARNING/ERROR events, for /api/admin/errors and the ops agent.
        logging.getLogger().addHandler(services.recent_errors)
        boot = asyncio.create_task(services.lifecycle.start(), name="parley-boot")
        restore_signals = _drain_on_sigterm(services)
        try:
            yield {SERVICES_STATE_KEY: services}
        finally:
            logging.getLogger().removeHandler(services.recent_errors)
            restore_signals()
            services.lifecycle.begin_drain()
            boot.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await boot
            await services.lifecycle.stop(settings.shutdown_deadline_s)

    app = FastAPI(
        title="parley",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url="/api/openapi.json",
    )
    app.state.services = services
    install_error_handlers(app)
    app.include_router(health_router)
    app.include_router(auth_router)
    app.include_router(threads_router)
    app.include_router(runs_router)
    app.include_router(realtime_router)
    app.include_router(usage_router)
    app.include_router(observability_router)
    app.include_router(web_router)
    app.mount("/static", static_files(), name="static")

    # Added innermost first: the security headers wrap everything, including the last-resort error answer.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_request_body_bytes)
    app.add_middleware(RequestContextMiddleware, retry_after_s=settings.database_retry_after_s,
                       on_request=_request_recorder(services.telemetry))
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_credentials=False,
                           allow_methods=["GET", "POST", "PATCH", "DELETE", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
                           expose_headers=["X-Request-ID", "Retry-After"], max_age=600)
    # `/ws` goes straight to its endpoint, past the HTTP-only layers that would wrap every frame it sends.
    app.add_middleware(WebSocketRouteMiddleware, path="/ws")
    app.add_middleware(SecurityHeadersMiddleware, hsts_max_age_s=settings.hsts_max_age_s)
    return app


def _request_recorder(telemetry: Telemetry) -> RequestRecorder:
    def record(method: str, route: str, status: int, duration_ms: float, user_id: str | None) -> None:
        telemetry.record(RequestRecord(ts=utcnow(), method=method, route=route, status=status,
                                       duration_ms=duration_ms, user_id=user_id or ""))

    return record


def _drain_on_sigterm(services: AppServices) -> Callable[[], None]:
    """Chains onto the server's SIGTERM/SIGINT handler: readiness turns `draining` at once, and the server's
    own shutdown begins `drain_delay_s` later so load balancers stop routing here first."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None  # signals belong to the main thread (a server in a test thread has none)
    loop = asyncio.get_running_loop()
    delay = services.settings.drain_delay_s
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def handler(signum: int, frame: Any) -> None:
        already_draining = not services.lifecycle.ready
        services.lifecycle.begin_drain()
        forward = previous[signal.Signals(signum)]
        if not callable(forward):
            return
        if delay <= 0 or already_draining:
            forward(signum, frame)
        else:
            loop.call_soon_threadsafe(loop.call_later, delay, forward, signum, frame)

    for sig in previous:
        signal.signal(sig, handler)

    def restore() -> None:
        for sig, original in previous.items():
            signal.signal(sig, original)

    return restore
