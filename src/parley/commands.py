"""The work behind `parley migrate`, `parley user create` and `parley doctor`."""

from __future__ import annotations

import os
from typing import Any

from pydantic import SecretStr

from parley.auth.secret import SECRET_FILE
from parley.auth.service import AuthService
from parley.errors import ParleyError
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


async def doctor(settings: Settings) -> int:
    _say("parley configuration (PARLEY_* environment and .env):")
    for name, value in effective_configuration(settings).items():
        _say(f"  {name} = {value}")
    failures = 0

    def report(ok: bool, what: str, detail: str) -> None:
        nonlocal failures
        failures += 0 if ok else 1
        _say(f"[{'ok' if ok else 'FAIL'}] {what}: {detail}")

    problems = settings.production_problems()
    if settings.env == "production":
        report(not problems, "production settings", "; ".join(problems) or "safe")
    data_dir = settings.data_dir
    writable = data_dir.is_dir() and os.access(data_dir, os.W_OK)
    needs_dir = settings.is_sqlite or settings.jwt_secret is None
    if needs_dir:
        report(writable or not data_dir.exists(), "data directory",
               f"{data_dir} ({'writable' if writable else 'created on first start'})")
    database = Database(settings)
    sqlite_file = database.url.database if database.dialect == "sqlite" else None
    if sqlite_file and sqlite_file != ":memory:" and not os.path.exists(sqlite_file):
        report(True, "database", f"{database.display_url} (created and migrated on first start)")
        await database.dispose()
        _say("all checks passed" if failures == 0 else f"{failures} check(s) failed")
        return 0 if failures == 0 else 1
    try:
        try:
            latency = await database.ping()
            report(True, "database", f"{database.display_url} answered in {latency:.1f} ms")
            schema = await check_schema(database)
            if schema.ok:
                report(True, "schema", f"revision {schema.revision} (head {head_revision()})")
            elif settings.is_sqlite and settings.should_auto_migrate:
                report(True, "schema", "pending migrations are applied on start")
            else:
                report(False, "schema", schema.problem())
            if schema.foreign_tables:
                _say(f"[info] tables parley does not own (left alone): {', '.join(schema.foreign_tables)}")
        except Exception as exc:
            report(False, "database", f"{database.display_url} unreachable: {type(exc).__name__}: {exc}")
    finally:
        await database.dispose()
    _say("all checks passed" if failures == 0 else f"{failures} check(s) failed")
    return 0 if failures == 0 else 1
