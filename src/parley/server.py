"""Running parley under uvicorn: the `parley serve` path, and the same server for tests and benchmarks.

Before any worker starts, a preflight validates the settings, migrates embedded SQLite and checks the schema,
so a broken configuration ends the command with its reason instead of a crash loop of workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import threading
from collections.abc import Iterator
from typing import Any

import uvicorn

from parley.app import SERVICES_STATE_KEY, create_app
from parley.health.components import FatalStartError
from parley.http.deps import AppServices
from parley.observability.logging import configure_logging, get_logger
from parley.settings import Settings
from parley.storage.component import DatabaseComponent
from parley.storage.database import Database, is_database_unavailable

log = get_logger("parley.server")


class ParleyServer(uvicorn.Server):
    """uvicorn's server, which also stops when the app reports a fatal start-up error."""

    @property
    def services(self) -> AppServices | None:
        state: dict[str, Any] = (getattr(self, "lifespan", None) and self.lifespan.state) or {}
        services = state.get(SERVICES_STATE_KEY)
        return services if isinstance(services, AppServices) else None

    @property
    def fatal_error(self) -> str | None:
        services = self.services
        return services.lifecycle.fatal_error if services else None

    async def on_tick(self, counter: int) -> bool:
        if self.fatal_error is not None:
            return True
        return await super().on_tick(counter)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # Readiness says `draining` and streams end before uvicorn waits for connections to finish.
        if self.services is not None:
            self.services.lifecycle.begin_drain()
        await super().shutdown(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """As uvicorn's, without re-raising the signal afterwards: a graceful stop exits with status 0."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def uvicorn_config(settings: Settings, app: Any, **overrides: Any) -> uvicorn.Config:
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_config": None,
        "access_log": False,
        "proxy_headers": True,
        "forwarded_allow_ips": settings.forwarded_allow_ips,
        "timeout_graceful_shutdown": settings.shutdown_deadline_s,
        # WebSocket ping frames every heartbeat; a connection that answers none for two heartbeats is closed.
        "ws": "websockets-sansio",
        "ws_max_size": settings.ws_max_frame_bytes,
        "ws_per_message_deflate": settings.ws_compression,
        "ws_ping_interval": settings.ws_heartbeat_s,
        "ws_ping_timeout": settings.ws_heartbeat_s * 2,
        "lifespan": "on",
        "server_header": False,
    }
    options.update(overrides)
    return uvicorn.Config(app, **options)


async def preflight(settings: Settings) -> None:
    """Migrate (if configured) and check the schema once, before serving. Raises `FatalStartError`."""
    database = Database(settings)
    try:
        await DatabaseComponent(database, settings).start()
    except FatalStartError:
        raise
    except Exception as exc:
        if not is_database_unavailable(exc):
            raise
        # Not fatal: workers keep retrying and report `starting` until the database answers.
        log.warning("database_unreachable_at_start", database=database.display_url, reason=str(exc)[:200])
    finally:
        await database.dispose()


def serve(settings: Settings) -> int:
    """Runs the service until it is stopped; returns the process exit code."""
    configure_logging(settings)
    settings.check()
    if settings.is_sqlite or settings.jwt_secret is None:
        settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        asyncio.run(preflight(settings))
    except FatalStartError as exc:
        log.critical("startup_failed", reason=str(exc))
        return 1
    log.info("starting", host=settings.host, port=settings.port, workers=settings.workers, env=settings.env)
    if settings.workers > 1:
        # Each worker builds its own app from the environment (the settings travel as PARLEY_* variables).
        config = uvicorn_config(settings, "parley.server:app_from_environment", factory=True,
                                workers=settings.workers)
        sock = config.bind_socket()
        from uvicorn.supervisors import Multiprocess

        Multiprocess(config, sockets=[sock]).run()
        return 0
    server = ParleyServer(uvicorn_config(settings, create_app(settings)))
    server.run()
    return 1 if server.fatal_error else 0


def app_from_environment() -> Any:
    settings = Settings()
    configure_logging(settings)
    return create_app(settings)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])
