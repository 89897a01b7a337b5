"""Benchmark of `GET /api/threads?limit=20` for a user with 10 and a user with 10,000 threads.

For each database (SQLite, PostgreSQL) it starts real servers as separate processes and loads them with wrk,
also a separate process, at a fixed concurrency for a fixed duration per measurement:

- `baseline`: a bare FastAPI app returning a constant list of 20 small dicts (bench/baseline_server.py),
- `10 threads` and `10,000 threads`: parley with PARLEY_LOG_LEVEL=WARNING, so per-request logging is off,
- `10 threads, INFO log`: a second parley process on the same database with PARLEY_LOG_LEVEL=INFO, which writes
  one JSON line per request to a file, to show what that logging costs.

The targets are measured in interleaved rounds (their order rotates each round) after one warm-up each; the
figures are medians across rounds and ratios are medians of the ratios taken within each round, because the
machine is shared and noisy. Beside wrk's requests/s, p50 and p99, each measurement records the server process's
CPU time per request. Each parley target's answer is checked once before it is loaded, and any error response
(wrk counts status >= 400), socket error or timeout fails the run.

    .venv/bin/python bench/threads_list.py [--duration S] [--rounds N] [--connections C]
                                           [--databases sqlite,postgresql]

Prints a table and writes bench/results/threads_list.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
from common import (
    JWT_SECRET,
    BenchmarkError,
    Server,
    environment,
    process_cpu_s,
    recreate_postgres_database,
    register,
    running,
    start_parley,
)
from sqlalchemy import insert, text, update

from parley.clock import utcnow
from parley.ids import new_id
from parley.server import free_port
from parley.settings import Settings
from parley.storage.database import Database
from parley.storage.models import Thread, User

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_FILE = BENCH_DIR / "results" / "threads_list.json"
WRK_SCRIPT = BENCH_DIR / "wrk_report.lua"

PG_DATABASE = "parley_bench"
PG_URL = f"postgresql+asyncpg://postgres@127.0.0.1:5432/{PG_DATABASE}"

LIST_PATH = "/api/threads?limit=20"
PAGE_SIZE = 20
SMALL, LARGE = 10, 10_000
TARGET_RATIO = 1.5
WARMUP_S = 2


@dataclass(frozen=True)
class Target:
    """One thing wrk loads: a URL (with the bearer token of the user whose threads are listed) and the id of the
    server process behind it, whose CPU time is read around each run."""

    name: str
    url: str
    pid: int
    token: str | None = None


@dataclass(frozen=True)
class Sample:
    """One wrk run against one target."""

    requests: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    # CPU time (user + system) of the server process per request: steadier than latency on a shared machine.
    # For PostgreSQL it leaves out the database server's own processes.
    server_cpu_ms_per_request: float


def start_parley_logging(name: str, database_url: str, work_dir: Path, log_level: str) -> Server:
    return start_parley(name, database_url, work_dir, {"PARLEY_LOG_LEVEL": log_level,
                                                       "PARLEY_LOGIN_RATE_LIMIT": "10000"})


def start_baseline(work_dir: Path) -> Server:
    port = free_port()
    command = [sys.executable, str(BENCH_DIR / "baseline_server.py"), str(port)]
    return Server("baseline", command, port, work_dir / "baseline.log")


# --- databases and data ------------------------------------------------------------------------------------


async def seed_threads(database_url: str, work_dir: Path, user_id: str, count: int) -> None:
    """Inserts `count` threads for `user_id` as `ThreadRepository.create` would, with distinct timestamps,
    and moves the user's `thread_count` in the same transaction."""
    settings = Settings(_env_file=None, env="test", data_dir=work_dir, database_url=database_url,
                        jwt_secret=JWT_SECRET)
    database = Database(settings)
    start = utcnow() - timedelta(seconds=count)
    rows: list[dict[str, Any]] = []
    for index in range(count):
        moment = start + timedelta(seconds=index)
        rows.append({"id": new_id(), "user_id": user_id, "title": f"Thread {index}", "meta": {"n": index},
                     "created_at": moment, "updated_at": moment, "message_count": 0,
                     "last_message_at": None, "last_seq": 0})
    try:
        async with database.session() as session:
            for offset in range(0, count, 1000):
                await session.execute(insert(Thread), rows[offset:offset + 1000])
            await session.execute(
                update(User).where(User.id == user_id).values(thread_count=User.thread_count + count)
            )
            await session.commit()
            if database.dialect == "postgresql":
                await session.execute(text("ANALYZE threads"))
                await session.commit()
    finally:
        await database.dispose()


def check_listing(target: Target, expected_total: int) -> None:
    """One request, before loading: the benchmark must measure real listings, not errors or empty pages."""
    response = httpx.get(target.url, headers={"Authorization": f"Bearer {target.token}"}, timeout=30)
    if response.status_code != 200:
        raise BenchmarkError(f"{target.name}: {response.status_code} {response.text[:300]}")
    page = response.json()
    items = page["items"]
    stamps = [item["updated_at"] for item in items]
    if (page["total"] != expected_total or len(items) != min(PAGE_SIZE, expected_total)
            or page["has_more"] != (expected_total > PAGE_SIZE) or stamps != sorted(stamps, reverse=True)):
        raise BenchmarkError(f"{target.name}: wrong page: total={page['total']} items={len(items)} "
                             f"has_more={page['has_more']}, expected total={expected_total}")


def check_baseline(target: Target) -> None:
    response = httpx.get(target.url, timeout=30)
    if response.status_code != 200 or len(response.json()) != PAGE_SIZE:
        raise BenchmarkError(f"baseline: {response.status_code} {response.text[:300]}")


# --- load ----------------------------------------------------------------------------------------------------


def run_wrk(target: Target, duration_s: int, connections: int) -> Sample:
    command = ["wrk", "-t1", f"-c{connections}", f"-d{duration_s}s", "--timeout", "5s", "-s", str(WRK_SCRIPT)]
    if target.token:
        command += ["-H", f"Authorization: Bearer {target.token}"]
    cpu_before = process_cpu_s(target.pid)
    output = subprocess.run([*command, target.url], capture_output=True, text=True, check=True).stdout
    cpu_s = process_cpu_s(target.pid) - cpu_before
    lines = [line for line in output.splitlines() if line.startswith("WRK_JSON ")]
    if not lines:
        raise BenchmarkError(f"wrk printed no summary for {target.name}:\n{output}")
    figures = json.loads(lines[0].removeprefix("WRK_JSON "))
    errors = {key: figures[key] for key in figures if key.startswith("errors_") and figures[key]}
    if errors or not figures["requests"]:
        raise BenchmarkError(f"{target.name}: {figures['requests']} requests with errors {errors}")
    return Sample(
        requests=int(figures["requests"]),
        requests_per_s=figures["requests"] / (figures["duration_us"] / 1e6),
        p50_ms=figures["p50_us"] / 1000,
        p99_ms=figures["p99_us"] / 1000,
        mean_ms=figures["mean_us"] / 1000,
        max_ms=figures["max_us"] / 1000,
        server_cpu_ms_per_request=cpu_s * 1000 / figures["requests"],
    )


def measure(targets: list[Target], rounds: int, duration_s: int, connections: int) -> dict[str, list[Sample]]:
    """Warms every target up once, then runs `rounds` rounds, rotating the order so no target is always first."""
    for target in targets:
        run_wrk(target, WARMUP_S, connections)
    samples: dict[str, list[Sample]] = {target.name: [] for target in targets}
    for round_index in range(rounds):
        shift = round_index % len(targets)
        for target in targets[shift:] + targets[:shift]:
            sample = run_wrk(target, duration_s, connections)
            samples[target.name].append(sample)
            print(f"  round {round_index + 1}/{rounds} {target.name:<22} {sample.requests_per_s:8.0f} req/s  "
                  f"p50 {sample.p50_ms:6.2f} ms  p99 {sample.p99_ms:6.2f} ms", flush=True)
    return samples


# --- one database --------------------------------------------------------------------------------------------

BASELINE, SMALL_NAME, LARGE_NAME, SMALL_INFO_NAME = "baseline", "10 threads", "10,000 threads", "10 threads, INFO log"


def bench_database(kind: str, baseline: Target, work_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    print(f"\n== {kind}", flush=True)
    if kind == "postgresql":
        asyncio.run(recreate_postgres_database(PG_DATABASE))
        database_url = PG_URL
    else:
        database_url = f"sqlite+aiosqlite:///{work_dir / 'parley.db'}"
    quiet = start_parley_logging(f"parley-{kind}-warning", database_url, work_dir, "WARNING")
    with running(quiet, "/health/ready"):
        small_id, small_token = register(quiet.url, "ten@bench.example")
        large_id, large_token = register(quiet.url, "ten-thousand@bench.example")
        started = time.monotonic()
        asyncio.run(seed_threads(database_url, work_dir, small_id, SMALL))
        asyncio.run(seed_threads(database_url, work_dir, large_id, LARGE))
        print(f"  seeded {SMALL} + {LARGE} threads in {time.monotonic() - started:.1f}s", flush=True)
        logged = start_parley_logging(f"parley-{kind}-info", database_url, work_dir, "INFO")
        with running(logged, "/health/ready"):
            targets = [
                baseline,
                Target(SMALL_NAME, quiet.url + LIST_PATH, quiet.pid, small_token),
                Target(LARGE_NAME, quiet.url + LIST_PATH, quiet.pid, large_token),
                Target(SMALL_INFO_NAME, logged.url + LIST_PATH, logged.pid, small_token),
            ]
            check_baseline(baseline)
            for target, expected in zip(targets[1:], (SMALL, LARGE, SMALL), strict=True):
                check_listing(target, expected)
            samples = measure(targets, args.rounds, args.duration, args.connections)
    return summarise(samples)


def summarise(samples: dict[str, list[Sample]]) -> dict[str, Any]:
    def median(name: str, field: str) -> float:
        return statistics.median(float(getattr(sample, field)) for sample in samples[name])

    def paired_ratio(numerator: str, denominator: str, field: str = "p50_ms") -> float:
        """The median over rounds of numerator/denominator, each pair measured in the same round."""
        return statistics.median(float(getattr(top, field)) / float(getattr(bottom, field))
                                 for top, bottom in zip(samples[numerator], samples[denominator], strict=True))

    fields = ("requests_per_s", "p50_ms", "p99_ms", "server_cpu_ms_per_request")
    medians = {name: {field: round(median(name, field), 3) for field in fields} for name in samples}
    p50_ranges = {name: [min(sample.p50_ms for sample in runs), max(sample.p50_ms for sample in runs)]
                  for name, runs in samples.items()}
    large_vs_small = paired_ratio(LARGE_NAME, SMALL_NAME)
    ratios = {
        "p50_10000_vs_10": round(large_vs_small, 3),
        "p50_10_vs_baseline": round(paired_ratio(SMALL_NAME, BASELINE), 3),
        "p50_10000_vs_baseline": round(paired_ratio(LARGE_NAME, BASELINE), 3),
        "p50_info_log_vs_warning": round(paired_ratio(SMALL_INFO_NAME, SMALL_NAME), 3),
        "server_cpu_info_log_vs_warning": round(
            paired_ratio(SMALL_INFO_NAME, SMALL_NAME, "server_cpu_ms_per_request"), 3),
        "requests_per_s_10_vs_baseline": round(paired_ratio(SMALL_NAME, BASELINE, "requests_per_s"), 3),
    }
    return {
        "medians": medians,
        "p50_ms_min_max_over_rounds": p50_ranges,
        "ratios": ratios,
        "target": {"p50_10000_vs_10_at_most": TARGET_RATIO, "met": large_vs_small <= TARGET_RATIO},
        "rounds": {name: [asdict(sample) for sample in runs] for name, runs in samples.items()},
    }


# --- report --------------------------------------------------------------------------------------------------


def print_table(results: dict[str, dict[str, Any]]) -> None:
    print("\n| database | target | req/s | p50 ms | p99 ms | p50 ms, min-max over rounds | server CPU ms/request |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for kind, result in results.items():
        for name, figures in result["medians"].items():
            low, high = result["p50_ms_min_max_over_rounds"][name]
            print(f"| {kind} | {name} | {figures['requests_per_s']:.0f} | {figures['p50_ms']:.2f} | "
                  f"{figures['p99_ms']:.2f} | {low:.2f}-{high:.2f} | {figures['server_cpu_ms_per_request']:.3f} |")
    print()
    for kind, result in results.items():
        ratios, met = result["ratios"], result["target"]["met"]
        print(f"{kind}: p50(10,000)/p50(10) = {ratios['p50_10000_vs_10']:.2f} (target <= {TARGET_RATIO}: "
              f"{'MET' if met else 'MISSED'})")
        print(f"  p50 vs baseline: 10 threads {ratios['p50_10_vs_baseline']:.1f}x, "
              f"10,000 threads {ratios['p50_10000_vs_baseline']:.1f}x")
        print(f"  INFO vs WARNING logging: p50 {ratios['p50_info_log_vs_warning']:.2f}x, "
              f"server CPU per request {ratios['server_cpu_info_log_vs_warning']:.2f}x")


def code_and_machine() -> dict[str, Any]:
    packages = ("fastapi", "starlette", "uvicorn", "uvloop", "httptools", "sqlalchemy", "aiosqlite", "asyncpg",
                "pydantic")
    wrk_version = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout.split("[")[0]
    return {**environment(packages), "wrk": wrk_version.strip()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--duration", type=int, default=5, help="seconds per measurement (default 5)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per database (default 5)")
    parser.add_argument("--connections", type=int, default=10, help="wrk connections (default 10)")
    parser.add_argument("--databases", default="sqlite,postgresql", help="comma-separated: sqlite,postgresql")
    args = parser.parse_args()
    kinds = [kind.strip() for kind in args.databases.split(",") if kind.strip()]
    if not kinds or any(kind not in ("sqlite", "postgresql") for kind in kinds):
        parser.error("--databases takes sqlite and/or postgresql")
    if shutil.which("wrk") is None:
        parser.error("wrk is not installed (apt-get install -y wrk)")

    started = time.monotonic()
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="parley-bench-") as temp:
        work = Path(temp)
        try:
            with running(start_baseline(work), "/items") as baseline_server:
                baseline = Target(BASELINE, baseline_server.url + "/items", baseline_server.pid)
                for kind in kinds:
                    (work / kind).mkdir()
                    results[kind] = bench_database(kind, baseline, work / kind, args)
        except BenchmarkError as exc:
            print(f"\nbenchmark failed: {exc}", file=sys.stderr)
            return 1
    print_table(results)
    report = {
        "benchmark": "GET /api/threads?limit=20",
        "date": utcnow().isoformat(timespec="seconds"),
        "elapsed_s": round(time.monotonic() - started, 1),
        "settings": {"duration_s": args.duration, "rounds": args.rounds, "connections": args.connections,
                     "wrk_threads": 1, "warmup_s": WARMUP_S},
        "environment": code_and_machine(),
        "databases": results,
    }
    RESULTS_FILE.parent.mkdir(exist_ok=True)
    RESULTS_FILE.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten to {RESULTS_FILE.relative_to(BENCH_DIR.parent)} in {report['elapsed_s']}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
