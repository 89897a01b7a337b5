"""ClickHouse schema as versioned migrations, applied in order and remembered in `schema_migrations`.

The same statements run on a ClickHouse server and on chDB. `{db}` and `{ttl_days}` are filled in; a changed
TTL setting is applied to existing tables at start (`ALTER TABLE ... MODIFY TTL`).
"""

from __future__ import annotations

MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (1, "usage and performance tables", [
        """CREATE TABLE IF NOT EXISTS {db}.llm_calls (
            ts DateTime64(3, 'UTC'), user_id String, thread_id String, run_id String, agent LowCardinality(String),
            provider LowCardinality(String), model LowCardinality(String), input_tokens UInt32,
            output_tokens UInt32, ttft_ms Float64, latency_ms Float64, cost_usd Float64,
            outcome LowCardinality(String)
        ) ENGINE = MergeTree PARTITION BY toYYYYMM(ts) ORDER BY (user_id, ts)
        TTL toDateTime(ts) + INTERVAL {ttl_days} DAY""",
        """CREATE TABLE IF NOT EXISTS {db}.tool_calls (
            ts DateTime64(3, 'UTC'), user_id String, thread_id String, run_id String, agent LowCardinality(String),
            tool LowCardinality(String), duration_ms Float64, ok Bool
        ) ENGINE = MergeTree PARTITION BY toYYYYMM(ts) ORDER BY (tool, ts)
        TTL toDateTime(ts) + INTERVAL {ttl_days} DAY""",
        """CREATE TABLE IF NOT EXISTS {db}.runs (
            ts DateTime64(3, 'UTC'), user_id String, thread_id String, run_id String, agent LowCardinality(String),
            model LowCardinality(String), status LowCardinality(String), duration_ms Float64,
            input_tokens UInt32, output_tokens UInt32, cost_usd Float64
        ) ENGINE = MergeTree PARTITION BY toYYYYMM(ts) ORDER BY (user_id, ts)
        TTL toDateTime(ts) + INTERVAL {ttl_days} DAY""",
        """CREATE TABLE IF NOT EXISTS {db}.ws_connections (
            ts DateTime64(3, 'UTC'), connection_id String, user_id String, duration_ms Float64,
            close_code UInt16, closed_by LowCardinality(String)
        ) ENGINE = MergeTree PARTITION BY toYYYYMM(ts) ORDER BY ts
        TTL toDateTime(ts) + INTERVAL {ttl_days} DAY""",
        """CREATE TABLE IF NOT EXISTS {db}.http_requests (
            ts DateTime64(3, 'UTC'), method LowCardinality(String), route LowCardinality(String), status UInt16,
            duration_ms Float64, user_id String
        ) ENGINE = MergeTree PARTITION BY toYYYYMM(ts) ORDER BY (route, ts)
        TTL toDateTime(ts) + INTERVAL {ttl_days} DAY""",
    ]),
]

TABLES = ("llm_calls", "tool_calls", "runs", "ws_connections", "http_requests")

MIGRATIONS_TABLE = """CREATE TABLE IF NOT EXISTS {db}.schema_migrations (
    version UInt32, description String, applied_at DateTime64(3, 'UTC') DEFAULT now64(3)
) ENGINE = MergeTree ORDER BY version"""
