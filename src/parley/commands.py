"""The work behind `parley migrate`, `parley user create` and `parley doctor`."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from pydantic import SecretStr

from parley.analytics.clickhouse import ClickHouseStore
from parley.auth.secret import SECRET_FILE
from parley.auth.service import AuthService
from parley.errors import ParleyError
from parley.health.components import public_reason
from parley.settings import Settings
from parley.storage.database import Database
from parley.storage.migrate import head_revision, upgrade
from parley.storage.schema_check import check_schema


def _say(line: str) -> None:
    print(line, flush=True)


async def migrate(settings: Settings) -> int:
    if settings.is_sqlite:
        settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    database = Database(settings)
    try:
        before, after = await upgrade(database)
    finally:
        await database.dispose()
    if before == after:
        _say(f"{database.display_url}: already at revision {after}")
    else:
        _say(f"{database.display_url}: migrated {before or 'empty'} -> {after}")
    return 0


async def create_user(settings: Settings, email: str, password: str, display_name: str | None,
                      admin: bool) -> int:
    if len(password) < 8:
        _say("parley: the password must have at least 8 characters")
        return 2
    database = Database(settings)
    try:
        report = await check_schema(database)
        if not report.ok:
            _say(f"parley: {report.problem()}")
            return 1
        auth = AuthService.from_settings(settings)
        async with database.session() as session:
            try:
                user = await auth.create_user(session, email, password, display_name,
                                              role="admin" if admin else "user")
            except ParleyError as exc:
                _say(f"parley: {exc.message}")
                return 1
            await session.commit()
    finally:
        await database.dispose()
    _say(f"created {user.role} {user.email} ({user.id})")
    return 0


def effective_configuration(settings: Settings) -> dict[str, Any]:
    """Every setting with its effective value; secrets say only whether and where they are set."""
    values: dict[str, Any] = {}
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if isinstance(value, SecretStr):
            value = "set" if value.get_secret_value() else "empty"
        elif value is None and name == "jwt_secret":
            value = f"generated, kept in {settings.data_dir / SECRET_FILE}"
        values[name] = value
    values["database_url"] = Database(settings).display_url
    values["auto_migrate"] = settings.should_auto_migrate
    return values


Check = tuple[bool, str, str]  # (ok, what, detail)


async def doctor(settings: Settings) -> int:
    _say("parley configuration (PARLEY_* environment and .env):")
    for name, value in effective_configuration(settings).items():
        _say(f"  {name} = {value}")
    checks: list[Check] = []
    if settings.env == "production":
        problems = settings.production_problems()
        checks.append((not problems, "production settings", "; ".join(problems) or "safe"))
    if settings.is_sqlite or settings.jwt_secret is None:
        data_dir = settings.data_dir
        writable = data_dir.is_dir() and os.access(data_dir, os.W_OK)
        checks.append((writable or not data_dir.exists(), "data directory",
                       f"{data_dir} ({'writable' if writable else 'created on first start'})"))
    checks += await _check_database(settings)
    checks += await _check_analytics(settings)
    checks += await _check_llm(settings)
    for ok, what, detail in checks:
        _say(f"[{'ok' if ok else 'FAIL'}] {what}: {detail}")
    failures = sum(1 for ok, _, _ in checks if not ok)
    _say("all checks passed" if failures == 0 else f"{failures} check(s) failed")
    return 0 if failures == 0 else 1


async def _check_database(settings: Settings) -> list[Check]:
    database = Database(settings)
    sqlite_file = database.url.database if database.dialect == "sqlite" else None
    try:
        if sqlite_file and sqlite_file != ":memory:" and not os.path.exists(sqlite_file):
            return [(True, "database", f"{database.display_url} (created and migrated on first start)")]
        try:
            latency = await database.ping()
            schema = await check_schema(database)
        except Exception as exc:
            return [(False, "database", f"{database.display_url} unreachable: {type(exc).__name__}: {exc}")]
        checks: list[Check] = [(True, "database", f"{database.display_url} answered in {latency:.1f} ms")]
        if schema.ok:
            checks.append((True, "schema", f"revision {schema.revision} (head {head_revision()})"))
        elif settings.is_sqlite and settings.should_auto_migrate:
            checks.append((True, "schema", "pending migrations are applied on start"))
        else:
            checks.append((False, "schema", schema.problem()))
        if schema.foreign_tables:
            _say(f"[info] tables parley does not own (left alone): {', '.join(schema.foreign_tables)}")
        return checks
    finally:
        await database.dispose()


async def _check_analytics(settings: Settings) -> list[Check]:
    backend = settings.analytics_backend
    if backend == "off":
        return [(True, "analytics", "off (nothing is recorded; /api/usage answers from the database)")]
    if backend == "chdb":
        # Not opened: chDB admits one process per data directory, and that may be the running server.
        return [(True, "analytics", f"chDB embedded in {settings.data_dir / 'analytics'} (opened by the server)")]
    assert settings.clickhouse_url is not None
    store = ClickHouseStore(settings.clickhouse_url.get_secret_value(), settings.analytics_database,
                            settings.analytics_ttl_days, connect_timeout_s=3, timeout_s=5)
    try:
        latency = await asyncio.to_thread(store.ping)
    except Exception as exc:
        return [(False, "analytics", f"ClickHouse not answering: {public_reason(exc)}")]
    finally:
        await asyncio.to_thread(store.close)
    return [(True, "analytics", f"ClickHouse answered in {latency:.1f} ms")]


async def _check_llm(settings: Settings) -> list[Check]:
    from parley.app import build_llm  # the same provider the server would use

    provider = build_llm(settings)
    try:
        health = await provider.probe()
    finally:
        await provider.aclose()
    what = f"llm ({provider.name}, model {provider.model})"
    detail = f"answered in {health.latency_ms:.1f} ms" if health.ok and health.latency_ms is not None else \
        ("ok" if health.ok else f"not answering: {health.detail or 'no detail'}")
    return [(health.ok, what, detail)]
