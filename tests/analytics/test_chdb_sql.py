"""parley's ClickHouse SQL on the real engine (chDB), a database per test: migrations, inserts, and the usage
roll-ups checked against figures computed by hand, and against the same roll-ups from the primary database."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from parley.analytics.clickhouse import ClickHouseStore
from parley.analytics.records import ConnectionRecord, LLMCallRecord, RequestRecord, RunRecord, ToolCallRecord
from parley.analytics.schema import TABLES
from parley.analytics.sink import ClickHouseSink, DisabledSink
from parley.analytics.usage import UsageItem, UsageService, percentile
from parley.settings import Settings
from parley.storage.database import Database
from parley.storage.migrate import upgrade
from parley.storage.models import Run, Thread, User
from tests.conftest import SettingsFactory
from tests.support.live import wait_for

DAY1 = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
DAY2 = datetime(2026, 11, 21, 9, 30, tzinfo=UTC)

# (user, day, model, agent, duration_ms, input_tokens, output_tokens, cost_usd)
RUNS = [
    ("alice", DAY1, "m1", "assistant", 100.0, 10, 20, 0.001),
    ("alice", DAY1, "m1", "assistant", 200.0, 11, 21, 0.002),
    ("alice", DAY1, "m1", "ops", 300.0, 12, 22, 0.003),
    ("alice", DAY1, "m1", "assistant", 400.0, 13, 23, 0.004),
    ("alice", DAY1, "m2", "assistant", 50.0, 5, 5, 0.0),
    ("alice", DAY2, "m1", "assistant", 1000.0, 100, 200, 0.5),
    ("bob", DAY1, "m1", "assistant", 9999.0, 999, 999, 9.0),  # another user: never in alice's figures
    ("alice", DAY1 - timedelta(days=40), "m1", "assistant", 5.0, 1, 1, 1.0),  # outside the window
]
SINCE, UNTIL = DAY1 - timedelta(days=1), DAY2 + timedelta(days=1)

# Alice's figures, by hand. m1: durations 100 200 300 400 1000 -> p50 300; p95 at rank 3.8: 400 + 0.8 * 600 = 880.
EXPECTED_BY_MODEL = [
    UsageItem("m1", 5, 146, 286, 0.51, 300.0, 880.0),
    UsageItem("m2", 1, 5, 5, 0.0, 50.0, 50.0),
]
# 2026-11-20: 50 100 200 300 400 -> p50 200; p95 at rank 3.8: 300 + 0.8 * 100 = 380. 2026-11-21: one run.
EXPECTED_BY_DAY = [
    UsageItem("2026-11-20", 5, 51, 91, 0.01, 200.0, 380.0),
    UsageItem("2026-11-21", 1, 100, 200, 0.5, 1000.0, 1000.0),
]
EXPECTED_BY_AGENT = [
    UsageItem("assistant", 5, 139, 269, 0.507, 200.0, 880.0),
    UsageItem("ops", 1, 12, 22, 0.003, 300.0, 300.0),
]


@pytest.fixture(scope="module")
def chdb_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("chdb") / "engine"


@pytest.fixture
def store(chdb_path: Path) -> Iterator[ClickHouseStore]:
    database = f"parley_t_{uuid.uuid4().hex[:10]}"
    clickhouse = ClickHouseStore(f"chdb://{chdb_path}", database, ttl_days=30)
    clickhouse.migrate()
    yield clickhouse
    clickhouse._command(f"DROP DATABASE IF EXISTS {database}")
    clickhouse.close()


def run_records() -> list[RunRecord]:
    return [RunRecord(ts=day, user_id=user, thread_id="t", run_id=uuid.uuid4().hex, agent=agent, model=model,
                      status="completed", duration_ms=duration, input_tokens=tokens_in, output_tokens=tokens_out,
                      cost_usd=cost)
            for user, day, model, agent, duration, tokens_in, tokens_out, cost in RUNS]


def assert_items(actual: list[UsageItem], expected: list[UsageItem]) -> None:
    assert [i.key for i in actual] == [i.key for i in expected]
    for got, want in zip(actual, expected, strict=True):
        assert (got.runs, got.input_tokens, got.output_tokens) == (want.runs, want.input_tokens, want.output_tokens)
        assert got.cost_usd == pytest.approx(want.cost_usd, abs=1e-9)
        assert got.latency_ms_p50 == pytest.approx(want.latency_ms_p50)
        assert got.latency_ms_p95 == pytest.approx(want.latency_ms_p95)


def test_migrations_create_the_tables_once_and_apply_a_changed_ttl(store: ClickHouseStore) -> None:
    tables = {row["name"]: row for row in store.query(
        "SELECT name, sorting_key, engine_full FROM system.tables WHERE database = {db:String}",
        {"db": store.database})}
    assert set(TABLES) <= set(tables)
    assert tables["runs"]["sorting_key"] == "user_id, ts"
    assert tables["llm_calls"]["sorting_key"] == "user_id, ts"
    assert "toIntervalDay(30)" in tables["runs"]["engine_full"]
    assert store.migrate() == []  # nothing left to apply
    assert [row["version"] for row in store.query(
        f"SELECT version FROM {store.database}.schema_migrations")] == [1]

    shorter = ClickHouseStore(store.dsn, store.database, ttl_days=7)
    shorter.migrate()
    engine = store.query("SELECT engine_full FROM system.tables WHERE database = {db:String} AND name = 'runs'",
                         {"db": store.database})[0]["engine_full"]
    assert "toIntervalDay(7)" in engine
    shorter.close()


def test_every_record_kind_lands_in_its_table(store: ClickHouseStore) -> None:
    now = datetime(2026, 11, 29, 13, 37, 27, 123456, tzinfo=UTC)
    records = [
        LLMCallRecord(now, "u", "t", "r", "assistant", "builtin", "parley-builtin", 3, 4, 1.5, 2.5, 0.0, "ok"),
        ToolCallRecord(now, "u", "t", "r", "assistant", "calculator", 0.7, True),
        RunRecord(now, "u", "t", "r", "assistant", "parley-builtin", "completed", 12.5, 3, 4, 0.0),
        ConnectionRecord(now, "c", "u", 1000.0, 1000, "client"),
        RequestRecord(now, "GET", "/api/threads", 200, 3.2, "u"),
    ]
    assert sum(store.insert(record.table, [record]) for record in records) == 5
    for record in records:
        rows = store.query(f"SELECT toString(ts) AS ts FROM {store.database}.{record.table}")
        assert rows == [{"ts": "2026-11-29 13:37:27.123"}]
    tool = store.query(f"SELECT tool, ok FROM {store.database}.tool_calls")[0]
    assert tool == {"tool": "calculator", "ok": True}


async def sink_for(store: ClickHouseStore) -> ClickHouseSink:
    sink = ClickHouseSink(store, queue_max=10_000, batch_max=1000, flush_interval_s=0.05, retry_max_s=0.5,
                          shutdown_flush_s=5)
    await sink.start()
    return sink


@pytest.fixture
async def sink(store: ClickHouseStore) -> AsyncIterator[ClickHouseSink]:
    clickhouse = await sink_for(store)
    for record in run_records():
        clickhouse.record(record)
    await asyncio.to_thread(wait_for, lambda: clickhouse.written == len(RUNS), 20, 0.02, "rows written")
    yield clickhouse
    await clickhouse.stop()


@pytest.mark.parametrize(("group_by", "expected"), [
    ("model", EXPECTED_BY_MODEL), ("day", EXPECTED_BY_DAY), ("agent", EXPECTED_BY_AGENT)])
async def test_usage_rollups_on_clickhouse_match_hand_computed_figures(
        sink: ClickHouseSink, store: ClickHouseStore, settings: Settings, group_by: str,
        expected: list[UsageItem]) -> None:
    usage = UsageService(Database(settings), sink, store.database)  # answered by ClickHouse alone
    items, source = await usage.usage("alice", SINCE, UNTIL, group_by)  # type: ignore[arg-type]
    assert source == "chdb"
    assert_items(items, expected)


async def test_admin_rollup_by_user_covers_everyone(sink: ClickHouseSink, store: ClickHouseStore,
                                                    settings: Settings) -> None:
    usage = UsageService(Database(settings), sink, store.database)
    items, _ = await usage.usage(None, SINCE, UNTIL, "user")
    assert [(i.key, i.runs) for i in items] == [("alice", 6), ("bob", 1)]


async def seed_primary_database(settings: Settings) -> Database:
    database = Database(settings)
    await upgrade(database)
    async with database.session() as session:
        for user in ("alice", "bob"):
            session.add(User(id=user, email=f"{user}@example.com", password_hash="x", display_name=user,
                             role="user", created_at=DAY1, thread_count=1))
            await session.flush()  # no relationships are mapped, so the unit of work needs the order spelled out
            session.add(Thread(id=f"t-{user}", user_id=user, title="t", meta={}, created_at=DAY1,
                               updated_at=DAY1, message_count=0, last_message_at=None, last_seq=0))
        await session.flush()
        for index, (user, day, model, agent, duration, tokens_in, tokens_out, cost) in enumerate(RUNS):
            session.add(Run(id=f"r{index}", thread_id=f"t-{user}", user_id=user, agent=agent, status="completed",
                            input_message_id=None, created_at=day, started_at=day - timedelta(milliseconds=duration),
                            finished_at=day, error_code=None, error_message=None, input_tokens=tokens_in,
                            output_tokens=tokens_out, cost_usd=cost, model=model, worker_id=None, lease_until=None))
        await session.commit()
    return database


@pytest.mark.parametrize(("group_by", "expected"), [
    ("model", EXPECTED_BY_MODEL), ("day", EXPECTED_BY_DAY), ("agent", EXPECTED_BY_AGENT)])
async def test_usage_rollups_from_the_primary_database_are_the_same(
        make_settings: SettingsFactory, group_by: str, expected: list[UsageItem]) -> None:
    database = await seed_primary_database(make_settings())
    try:
        items, source = await UsageService(database, DisabledSink()).usage(
            "alice", SINCE, UNTIL, group_by)  # type: ignore[arg-type]
    finally:
        await database.dispose()
    assert source == "database"
    assert_items(items, expected)


async def test_the_database_rollup_of_many_runs_equals_percentiles_over_every_duration(
        make_settings: SettingsFactory) -> None:
    """The database computes the rollup itself (it returns only the ranks the percentiles need); the figures
    are those of `percentile` over every run, for groups of every size, a run that never started included."""
    database = await seed_primary_database(make_settings())
    randomness = random.Random(7)
    durations: dict[str, list[float]] = {}
    try:
        async with database.session() as session:
            for index in range(1_203):
                model = f"m{index % 7}" if index % 50 else "lone"
                duration = float(randomness.randint(1, 120_000))
                finished = DAY1 + timedelta(hours=1)
                started = None if index == 11 else finished - timedelta(milliseconds=duration)
                durations.setdefault(model, []).append(duration if started else 0.0)
                session.add(Run(id=f"many-{index}", thread_id="t-alice", user_id="alice", agent="assistant",
                                status="completed", input_message_id=None, created_at=DAY2, started_at=started,
                                finished_at=finished, input_tokens=1, output_tokens=2,
                                cost_usd=0.001, model=model, worker_id=None, lease_until=None))
            await session.commit()
        items, _ = await UsageService(database, DisabledSink()).usage(
            "alice", DAY1 + timedelta(minutes=30), DAY1 + timedelta(hours=2), "model")
    finally:
        await database.dispose()
    assert [item.key for item in items] == sorted(durations)
    for item in items:
        values = durations[item.key]
        assert (item.runs, item.input_tokens, item.output_tokens) == (len(values), len(values), 2 * len(values))
        assert item.latency_ms_p50 == pytest.approx(percentile(values, 0.5))
        assert item.latency_ms_p95 == pytest.approx(percentile(values, 0.95))


def test_percentile_interpolates_like_clickhouse() -> None:
    assert percentile([], 0.5) is None
    assert percentile([7.0], 0.95) == 7.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    assert percentile([400.0, 100.0, 1000.0, 300.0, 200.0], 0.95) == pytest.approx(880.0)
