"""The `parley` command as an operator runs it: production refusal, migrate, user create, doctor."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx

from parley.settings import Settings
from parley.storage.migrate import head_revision
from tests.conftest import TEST_JWT_SECRET, SettingsFactory
from tests.support.live import LiveServer


def parley(*args: str, env: dict[str, str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PARLEY_")}
    return subprocess.run([sys.executable, "-m", "parley", *args], env={**clean, **env}, input=stdin,
                          capture_output=True, text=True, timeout=120)


def env_for(settings: Settings) -> dict[str, str]:
    return {"PARLEY_DATABASE_URL": settings.effective_database_url, "PARLEY_DATA_DIR": str(settings.data_dir),
            "PARLEY_JWT_SECRET": TEST_JWT_SECRET, "PARLEY_ENV": "test"}


def test_production_refuses_unsafe_settings_and_says_which(tmp_path: Path) -> None:
    result = parley("serve", env={"PARLEY_ENV": "production", "PARLEY_DEBUG": "true", "PARLEY_WORKERS": "4",
                                  "PARLEY_DATA_DIR": str(tmp_path)})
    assert result.returncode == 2
    for expected in ("PARLEY_JWT_SECRET is not set", "SQLite cannot serve 4 workers", "PARLEY_DEBUG is on"):
        assert expected in result.stderr
    assert not (tmp_path / "parley.db").exists()  # refused before touching anything

    short = parley("doctor", env={"PARLEY_ENV": "production", "PARLEY_JWT_SECRET": "short",
                                  "PARLEY_DATA_DIR": str(tmp_path)})
    assert short.returncode == 2 and "shorter than 32 characters" in short.stderr


def test_migrate_then_user_create_admin_then_login(make_settings: SettingsFactory, tmp_path: Path) -> None:
    settings = make_settings(auto_migrate=False)
    env = env_for(settings)
    first = parley("migrate", env=env)
    assert first.returncode == 0, first.stderr
    head = head_revision()
    assert f"-> {head}" in first.stdout or f"already at revision {head}" in first.stdout
    again = parley("migrate", env=env)
    assert again.returncode == 0 and "already at revision" in again.stdout

    created = parley("user", "create", "--email", "Root@Example.com", "--admin", "--password-stdin", env=env,
                     stdin="a strong password\n")
    assert created.returncode == 0, created.stdout + created.stderr
    assert "created admin root@example.com" in created.stdout
    duplicate = parley("user", "create", "--email", "root@example.com", "--password-stdin", env=env,
                       stdin="a strong password\n")
    assert duplicate.returncode == 1 and "already exists" in duplicate.stdout
    short = parley("user", "create", "--email", "x@example.com", "--password-stdin", env=env, stdin="short\n")
    assert short.returncode == 2

    server = LiveServer(settings).start()
    try:
        login = httpx.post(f"{server.url}/api/auth/login",
                           json={"email": "root@example.com", "password": "a strong password"})
        assert login.status_code == 200 and login.json()["user"]["role"] == "admin"
    finally:
        server.stop()


def test_doctor_checks_components_and_hides_secrets(settings: Settings) -> None:
    LiveServer(settings).start().stop()
    healthy = parley("doctor", env=env_for(settings))
    assert healthy.returncode == 0, healthy.stdout
    assert "[ok] database" in healthy.stdout and "[ok] schema" in healthy.stdout
    assert TEST_JWT_SECRET not in healthy.stdout and "jwt_secret = set" in healthy.stdout

    unreachable = parley("doctor", env={**env_for(settings),
                                        "PARLEY_DATABASE_URL": "postgresql+asyncpg://parley:hunter2@127.0.0.1:1/x",
                                        "PARLEY_DATABASE_CONNECT_TIMEOUT_S": "1"})
    assert unreachable.returncode == 1
    assert "[FAIL] database" in unreachable.stdout
    assert "hunter2" not in unreachable.stdout and "***" in unreachable.stdout

    clickhouse_down = parley("doctor", env={**env_for(settings), "PARLEY_ANALYTICS": "clickhouse",
                                            "PARLEY_CLICKHOUSE_URL": "http://parley:s3cret@127.0.0.1:1"})
    assert clickhouse_down.returncode == 1
    assert "[FAIL] analytics: ClickHouse not answering: unreachable" in clickhouse_down.stdout
    assert "s3cret" not in clickhouse_down.stdout + clickhouse_down.stderr
    assert "[ok] llm (builtin, model parley-builtin)" in healthy.stdout
