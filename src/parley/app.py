"""`create_app(settings)`: the one place that builds the world, in a fixed order, and wires it to the edges.

Start-up runs in the background (readiness answers `starting` meanwhile); SIGTERM first turns readiness to
`draining` for `drain_delay_s`, then the server stops accepting and in-flight work gets `shutdown_deadline_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from parley import __version__
from parley.auth.passwords import Passwords
from parley.auth.ratelimit import SlidingWindowLimiter
from parley.auth.routes import router as auth_router
from parley.auth.secret import resolve_jwt_secret
from parley.auth.service import AuthService
from parley.auth.tokens import TokenCodec
from parley.health.components import Component, Lifecycle
from parley.health.routes import router as health_router
from parley.http.deps import AppServices, RateLimits
from parley.http.errors import install_error_handlers
from parley.http.middleware import BodySizeLimitMiddleware, RequestContextMiddleware, SecurityHeadersMiddleware
from parley.observability.logging import get_logger
from parley.settings import Settings
from parley.storage.component import DatabaseComponent
from parley.storage.database import Database
from parley.threads.routes import router as threads_router

log = get_logger("parley.app")

# The state key under which the lifespan shares the app's services with the server running it.
SERVICES_STATE_KEY = "parley_services"


def build_services(settings: Settings, on_fatal: Callable[[str], None] | None = None) -> AppServices:
    """Constructs every component in dependency order; nothing is started or connected yet."""
    settings.check()
    if settings.is_sqlite or settings.jwt_secret is None:
        settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    database = Database(settings)
    components: list[Component] = [DatabaseComponent(database, settings)]
    lifecycle = Lifecycle(components, on_fatal=on_fatal)
    codec = TokenCodec(resolve_jwt_secret(settings), settings.jwt_issuer, settings.jwt_audience,
                       settings.access_token_ttl_s)
    auth = AuthService(settings, Passwords(), codec)
    window, keys = settings.login_rate_window_s, settings.rate_limit_max_keys
    rate_limits = RateLimits(
        login_by_address=SlidingWindowLimiter(settings.login_rate_limit * 5, window, keys),
        login_by_email=SlidingWindowLimiter(settings.login_rate_limit, window, keys),
        register_by_address=SlidingWindowLimiter(settings.register_rate_limit, window, keys),
    )
    return AppServices(settings=settings, database=database, lifecycle=lifecycle, auth=auth,
                       rate_limits=rate_limits)


def create_app(settings: Settings | None = None, on_fatal: Callable[[str], None] | None = None) -> FastAPI:
    settings = settings or Settings()
    services = build_services(settings, on_fatal)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        boot = asyncio.create_task(services.lifecycle.start(), name="parley-boot")
        restore_signals = _drain_on_sigterm(services)
        try:
            yield {SERVICES_STATE_KEY: services}
        finally:
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

    # Added innermost first: the security headers wrap everything, including the last-resort error answer.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_request_body_bytes)
    app.add_middleware(RequestContextMiddleware, retry_after_s=settings.database_retry_after_s)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_credentials=False,
                           allow_methods=["GET", "POST", "PATCH", "DELETE", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
                           expose_headers=["X-Request-ID", "Retry-After"], max_age=600)
    app.add_middleware(SecurityHeadersMiddleware, hsts_max_age_s=settings.hsts_max_age_s)
    return app


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
