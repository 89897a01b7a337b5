"""Helpers the benchmarks share: servers in their own processes, `parley serve` with the benchmarks' settings,
accounts, PostgreSQL set-up, CPU readings from /proc, and the description of the code and machine measured.

The load generator (bench/ws_load.py) keeps its own copies of the /proc readers: it runs in a process of its own
and imports nothing from parley or from here.
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from parley.server import free_port

BENCH_DIR = Path(__file__).resolve().parent
PARLEY_BIN = Path(sys.executable).with_name("parley")
PG_ADMIN_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
JWT_SECRET = "bench-secret-" + "x" * 40
PASSWORD = "bench-password-123"
READY_TIMEOUT_S = 60


class BenchmarkError(Exception):
    """The run cannot give trustworthy figures (a server failed, an answer was wrong, requests errored)."""


class Server:
    """A server in its own process, its output going to a log file; stopped with SIGTERM, then SIGKILL."""

    def __init__(self, name: str, command: list[str], port: int, log_file: Path,
                 env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        self.name = name
        self.url = f"http://127.0.0.1:{port}"
        self.log_file = log_file
        with log_file.open("wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)

    def wait_until_answering(self, path: str) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BenchmarkError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return
            time.sleep(0.1)
        raise BenchmarkError(f"{self.name} did not answer {path} within {READY_TIMEOUT_S}s:\n{self.log_tail()}")

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@contextlib.contextmanager
def running(server: Server, ready_path: str) -> Iterator[Server]:
    try:
        server.wait_until_answering(ready_path)
        yield server
    finally:
        server.stop()


def start_parley(name: str, database_url: str, work_dir: Path, settings: dict[str, str],
                 *, pythonpath: Path | None = None) -> Server:
    """`parley serve` on a free port with the settings every benchmark uses, plus `settings` (PARLEY_* variables,
    which win). No PARLEY_* variable of this process's environment is passed on, and the work directory is the
    server's cwd, so no .env file of the checkout is read either."""
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("PARLEY_")}
    env.update({
        "PARLEY_ENV": "test",
        "PARLEY_HOST": "127.0.0.1",
        "PARLEY_PORT": str(port),
        "PARLEY_DATABASE_URL": database_url,
        "PARLEY_DATA_DIR": str(work_dir),
        "PARLEY_JWT_SECRET": JWT_SECRET,
        "PARLEY_AUTO_MIGRATE": "true",
        "PARLEY_LOG_LEVEL": "WARNING",
        "PARLEY_LOG_FORMAT": "json",  # as in production
        "PARLEY_ACCESS_TOKEN_TTL_S": "3600",  # outlives the whole run
        "PARLEY_REGISTER_RATE_LIMIT": "10000",
    })
    env.update(settings)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return Server(name, [str(PARLEY_BIN), "serve"], port, work_dir / f"{name}.log", env=env, cwd=work_dir)


def register(base_url: str, email: str) -> tuple[str, str]:
    """Registers an account through the API; returns its user id and access token."""
    response = httpx.post(f"{base_url}/api/auth/register", json={"email": email, "password": PASSWORD}, timeout=30)
    if response.status_code != 201:
        raise BenchmarkError(f"registering {email}: {response.status_code} {response.text[:300]}")
    body = response.json()
    return body["user"]["id"], body["access_token"]


async def recreate_postgres_database(name: str) -> None:
    admin = create_async_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as connection:
            await connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            await connection.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        await admin.dispose()


def process_cpu_s(pid: int) -> float:
    """User plus system CPU seconds of a process and all its threads, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5), counted after the name
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def raise_open_file_limit() -> None:
    """Up to the hard limit, for this process and every server and generator it starts (they inherit it)."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def installed_version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment(packages: tuple[str, ...]) -> dict[str, Any]:
    """The code and machine measured: parley's commit, whether `src/` had uncommitted changes, the platform and
    the versions of `packages`. Read it when the run starts: other engineers may commit or edit meanwhile."""
    git = ["git", "-C", str(BENCH_DIR.parent)]
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    changed = subprocess.run([*git, "status", "--porcelain", "src"], capture_output=True, text=True).stdout
    return {
        "parley_commit": commit,
        "src_has_uncommitted_changes": bool(changed.strip()),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "packages": {name: installed_version(name) for name in packages},
    }
