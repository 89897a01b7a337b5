"""A real parley server on a free port, in a thread of the test process or as a separate process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI

from parley.app import create_app
from parley.http.deps import AppServices
from parley.server import ParleyServer, uvicorn_config
from parley.settings import Settings


def wait_for(condition: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02,
             message: str = "condition") -> Any:
    """Polls `condition` until it returns something truthy; fails the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def _bound_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def ready_status(url: str) -> int | None:
    try:
        return httpx.get(f"{url}/health/ready", timeout=2).status_code
    except httpx.HTTPError:
        return None


class LiveServer:
    """uvicorn serving `create_app(settings)` in a background thread with its own event loop."""

    def __init__(self, settings: Settings, app: FastAPI | None = None) -> None:
        self.settings = settings
        self.app = app or create_app(settings)
        self.socket = _bound_socket()
        self.port = self.socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        self.server = ParleyServer(uvicorn_config(settings, self.app, host="127.0.0.1", port=self.port))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]},
                                       name=f"parley-server-{self.port}", daemon=True)

    @property
    def services(self) -> AppServices:
        services: AppServices = self.app.state.services
        return services

    def start(self, wait_ready: bool = True, timeout: float = 30.0) -> LiveServer:
        self.thread.start()
        wait_for(lambda: self.server.started or not self.thread.is_alive(), timeout, message="server start")
        if not self.thread.is_alive():
            raise AssertionError("server thread died during start-up")
        if wait_ready:
            wait_for(lambda: ready_status(self.url) == 200, timeout, message="readiness")
        return self

    def stop(self, timeout: float = 30.0) -> None:
        if self.thread.is_alive():
            self.server.should_exit = True
            self.thread.join(timeout)
            if self.thread.is_alive():
                raise AssertionError("server did not stop within the deadline")
        self.socket.close()


class ServerProcess:
    """`python -m parley serve` as a child process, with its log captured to a file."""

    def __init__(self, env: dict[str, str], log_path: Path, port: int | None = None) -> None:
        if port is None:
            with _bound_socket() as probe:
                port = probe.getsockname()[1]
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.ws_url = f"ws://127.0.0.1:{port}"
        self.log_path = log_path
        self.env = {**os.environ, **env, "PARLEY_PORT": str(port), "PARLEY_HOST": "127.0.0.1"}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, wait_ready: bool = True, timeout: float = 30.0) -> ServerProcess:
        log_file = self.log_path.open("ab")
        self.process = subprocess.Popen([sys.executable, "-m", "parley", "serve"], env=self.env,
                                        stdout=log_file, stderr=subprocess.STDOUT)
        if wait_ready:
            wait_for(lambda: ready_status(self.url) == 200 or self.process.poll() is not None,  # type: ignore[union-attr]
                     timeout, message="server process readiness")
            if self.process.poll() is not None:
                raise AssertionError(f"server exited with {self.process.returncode}:\n{self.log()}")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait(self, timeout: float = 30.0) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def terminate(self, timeout: float = 30.0) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.terminate()
        return self.process.wait(timeout)

    def kill(self) -> None:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
