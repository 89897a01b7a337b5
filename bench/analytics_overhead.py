"""What analytics costs: parley with analytics on (embedded chDB) against off, in the same run, and the throughput
of the analytics writer.

Two `parley serve` processes run side by side on SQLite, each with its own data directory and database, and
identical but for PARLEY_ANALYTICS=chdb against PARLEY_ANALYTICS=off (both with PARLEY_ANALYTICS_FLUSH_INTERVAL_S=1
and the settings of bench/runs_ws.py: the builtin provider at zero delay, WARNING logging). The chDB server is
measured only once its `/health` says `analytics: healthy`. Then, in interleaved rounds whose order alternates:

- `GET /api/threads?limit=20` for a user with 100 threads, loaded with wrk (bench/threads_list.py: 1 thread,
  10 keep-alive connections, a fixed duration): requests/s, p50, p99;
- full WebSocket runs (bench/runs_ws.py and bench/ws_load.py: 10 concurrent conversations, `user_message` to
  `agent_completed`, every frame checked): runs/s, p50, p99;

and for each the server process's CPU time per request or run (chDB's threads included). The figures are
medians over rounds; the on/off ratios are medians of the ratios within each round. **Target: p99 with
analytics on at most 1.10x p99 with it off**, for both loads. After each measurement of the chDB server the script
waits until its analytics queue is empty, so that no flush of one measurement falls into the next.

Writer throughput:

- *under load*: after the rounds, each load runs once more for longer against the chDB server while a thread
  reads `/health` (`chdb: N rows written, M queued, K dropped`) twice a second; rows/s are taken over the
  load's measurement window. (No `/health` is read during the latency rounds: the reads themselves cost the
  server a little.)
- *maximum*: a process of its own (`analytics_overhead.py writer-max`) starts a `ClickHouseSink` on a fresh chDB
  directory with batches of up to 10,000 rows and a flush interval of 0.2 s, records 200,000 `RequestRecord`s
  as fast as it can (yielding to the event loop every 1,000, as a busy server would), and times until every row
  is written; then it counts the rows in chDB.

    .venv/bin/python bench/analytics_overhead.py [--rounds N] [--duration S] [--connections C]
        [--conversations N] [--load-duration S] [--writer-rows N] [--writer-repeats N]

Prints tables and writes bench/results/analytics_overhead.json; exits with status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
from common import BenchmarkError, Server, environment, raise_open_file_limit, register
from runs_ws import CONTENT, TOKENS_PER_RUN, register_users, run_load, start_parley_ws
from runs_ws import Target as WsTarget
from threads_list import LIST_PATH, check_listing, run_wrk, seed_threads
from threads_list import Target as HttpTarget
from ws_load import machine_busy_s

from parley.clock import utcnow

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_FILE = BENCH_DIR / "results" / "analytics_overhead.json"
READY_PATH = "/health/ready"

ON, OFF = "on", "off"  # PARLEY_ANALYTICS=chdb, PARLEY_ANALYTICS=off
HTTP, WS = "http", "ws"
LIST_THREADS = 100  # the listed user's threads: full pages of 20
FLUSH_INTERVAL_S = 1.0
TARGET_P99_RATIO = 1.10
HTTP_WARMUP_S = 2
WS_WARMUP_S = 1.0  # of every WebSocket measurement, as in runs_ws.py
FIRST_WS_WARMUP_S = 3.0
ANALYTICS_READY_TIMEOUT_S = 90
DRAIN_TIMEOUT_S = 30
SAMPLE_EVERY_S = 0.5
COUNTS = re.compile(r"(\d+) rows written, (\d+) queued, (\d+) dropped")
PACKAGES = ("starlette", "uvicorn", "uvloop", "websockets", "sqlalchemy", "aiosqlite", "orjson", "chdb",
            "clickhouse-connect")

# The maximum-throughput test: the sink as `parley serve` builds it, but flushing every 0.2 s.
WRITER_BATCH_MAX = 10_000
WRITER_FLUSH_INTERVAL_S = 0.2
WRITER_YIELD_EVERY = 1_000


@dataclass(frozen=True)
class Measurement:
    """One load against one server: wrk's figures for HTTP (per request), the generator's for WebSocket (per run)."""

    load: str
    analytics: str
    rate_per_s: float  # requests/s or runs/s
    p50_ms: float
    p99_ms: float
    server_cpu_ms_per_unit: float  # per request or per run; every thread of the server process
    server_cpu_share: float  # cores
    machine_cpu_share: float  # every process on the machine, in cores
    units: int  # requests or runs inside the window
    analytics_rows: int | None  # rows the chDB server's sink wrote for this measurement (None with analytics off)


@dataclass(frozen=True)
class SinkCounts:
    at: float
    written: int
    queued: int
    dropped: int

    @property
    def recorded(self) -> int:
        return self.written + self.queued + self.dropped


@dataclass
class Parley:
    """One of the two servers, with what the loads need to reach it."""

    analytics: str
    server: Server
    http: HttpTarget
    ws: WsTarget
    samples: dict[str, list[Measurement]] = field(default_factory=lambda: {HTTP: [], WS: []})


# --- the servers ---------------------------------------------------------------------------------------------


# `/health` calls made to each server so far: each adds one row (its `http_requests` record, recorded once the
# answer is sent), which is taken off the rows a load wrote.
HEALTH_CALLS: Counter[str] = Counter()


def sink_counts(server: Server) -> SinkCounts:
    """The chDB sink's counters, from the `analytics` component of `/health`."""
    HEALTH_CALLS[server.url] += 1
    body = httpx.get(server.url + "/health", timeout=10).json()
    detail = body["components"]["analytics"].get("detail", "")
    match = COUNTS.search(detail)
    if match is None:
        raise BenchmarkError(f"{server.name}: no sink counts in the analytics detail {detail!r}")
    written, queued, dropped = (int(value) for value in match.groups())
    return SinkCounts(time.monotonic(), written, queued, dropped)


def wait_for_analytics(server: Server, wanted: str) -> dict[str, Any]:
    """Waits until `/health` reports the analytics component as `wanted`; returns the component."""
    deadline = time.monotonic() + ANALYTICS_READY_TIMEOUT_S
    component: dict[str, Any] = {}
    while time.monotonic() < deadline:
        component = httpx.get(server.url + "/health", timeout=10).json()["components"]["analytics"]
        if component["status"] == wanted:
            return component
        time.sleep(0.25)
    raise BenchmarkError(f"{server.name}: analytics is {component} after {ANALYTICS_READY_TIMEOUT_S}s, "
                         f"not {wanted}:\n{server.log_tail()}")


def drained(server: Server) -> SinkCounts:
    """Waits until the sink's queue is empty and returns its counters then."""
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while True:
        counts = sink_counts(server)
        if counts.queued == 0:
            return counts
        if time.monotonic() > deadline:
            raise BenchmarkError(f"{server.name}: {counts.queued} analytics rows still queued after "
                                 f"{DRAIN_TIMEOUT_S}s:\n{server.log_tail()}")
        time.sleep(0.1)


def start_pair(work: Path, conversations: int) -> list[Parley]:
    """Starts both servers, waits for them (and for chDB), creates the accounts and checks the listing."""
    servers: dict[str, Server] = {}
    for analytics in (ON, OFF):
        directory = work / f"analytics-{analytics}"
        directory.mkdir()
        settings = {"PARLEY_ANALYTICS": "chdb" if analytics == ON else "off",
                    "PARLEY_ANALYTICS_FLUSH_INTERVAL_S": str(FLUSH_INTERVAL_S)}
        servers[analytics] = start_parley_ws(f"parley-analytics-{analytics}",
                                             f"sqlite+aiosqlite:///{directory / 'parley.db'}", directory,
                                             settings=settings)
    pair: list[Parley] = []
    try:
        for analytics, server in servers.items():
            server.wait_until_answering(READY_PATH)
            component = wait_for_analytics(server, "healthy" if analytics == ON else "disabled")
            print(f"  {server.name}: analytics {component['status']} ({component.get('detail')})", flush=True)
            directory = work / f"analytics-{analytics}"
            user_id, token = register(server.url, "lister@bench.example")
            asyncio.run(seed_threads(f"sqlite+aiosqlite:///{directory / 'parley.db'}", directory, user_id,
                                     LIST_THREADS))
            http = HttpTarget(f"{analytics} http", server.url + LIST_PATH, server.pid, token)
            check_listing(http, LIST_THREADS)
            tokens_file = directory / "tokens.json"
            register_users(server, conversations, tokens_file)
            pair.append(Parley(analytics, server, http, WsTarget(f"{analytics} ws", server, tokens_file)))
    except BaseException:
        for server in servers.values():
            server.stop()
        raise
    return pair


# --- the latency rounds --------------------------------------------------------------------------------------


def measure_http(parley: Parley, duration_s: int, connections: int) -> Measurement:
    busy_before = machine_busy_s()
    sample = run_wrk(parley.http, duration_s, connections)
    machine = (machine_busy_s() - busy_before) / duration_s  # wrk's own duration is within a few ms of this
    return Measurement(HTTP, parley.analytics, round(sample.requests_per_s, 1), sample.p50_ms, sample.p99_ms,
                       round(sample.server_cpu_ms_per_request, 4),
                       round(sample.server_cpu_ms_per_request * sample.requests_per_s / 1000, 3),
                       round(machine, 3), sample.requests, None)


def measure_ws(parley: Parley, conversations: int, duration_s: float) -> Measurement:
    sample = run_load(parley.ws, conversations, WS_WARMUP_S, duration_s)
    return Measurement(WS, parley.analytics, sample.runs_per_s, sample.completed_p50_ms, sample.completed_p99_ms,
                       sample.server_cpu_ms_per_run, sample.server_cpu_share, sample.machine_cpu_share,
                       sample.runs, None)


def measured(parley: Parley, load: str, args: argparse.Namespace) -> Measurement:
    """One measurement; for the chDB server, the rows its sink wrote for it, once they are all written."""
    before = drained(parley.server) if parley.analytics == ON else None
    calls_before = HEALTH_CALLS[parley.server.url]
    if load == HTTP:
        result = measure_http(parley, args.duration, args.connections)
    else:
        result = measure_ws(parley, args.conversations, args.duration)
    if before is not None:
        after = drained(parley.server)
        # Less the rows of the /health reads from the one that gave `before` to the one before `after`.
        rows = after.written - before.written - (HEALTH_CALLS[parley.server.url] - calls_before)
        result = replace(result, analytics_rows=rows)
    return result


def run_rounds(pair: list[Parley], args: argparse.Namespace) -> None:
    for parley in pair:  # warm-up, discarded
        measure_http(parley, HTTP_WARMUP_S, args.connections)
        run_load(parley.ws, args.conversations, WS_WARMUP_S, FIRST_WS_WARMUP_S)
    for round_index in range(args.rounds):
        order = pair if round_index % 2 == 0 else pair[::-1]
        for load in (HTTP, WS):
            for parley in order:
                sample = measured(parley, load, args)
                parley.samples[load].append(sample)
                unit = "req/s" if load == HTTP else "runs/s"
                print(f"  round {round_index + 1}/{args.rounds} {load:<4} analytics {parley.analytics:<3} "
                      f"{sample.rate_per_s:7.0f} {unit:<6} p50 {sample.p50_ms:7.2f} ms  p99 {sample.p99_ms:7.2f} ms"
                      f"  server CPU {sample.server_cpu_ms_per_unit:.3f} ms ({sample.server_cpu_share:.2f} core),"
                      f" machine {sample.machine_cpu_share:.2f} cores"
                      + ("" if sample.analytics_rows is None else f", {sample.analytics_rows} rows"), flush=True)


def summarise(pair: list[Parley]) -> dict[str, Any]:
    on, off = (next(p for p in pair if p.analytics == kind) for kind in (ON, OFF))
    fields = ("rate_per_s", "p50_ms", "p99_ms", "server_cpu_ms_per_unit", "server_cpu_share", "machine_cpu_share")

    def median(samples: list[Measurement], name: str) -> float:
        return round(statistics.median(float(getattr(sample, name)) for sample in samples), 3)

    def paired(load: str, name: str) -> list[float]:
        return [round(float(getattr(a, name)) / float(getattr(b, name)), 3)
                for a, b in zip(on.samples[load], off.samples[load], strict=True)]

    result: dict[str, Any] = {}
    for load in (HTTP, WS):
        ratios = {name: paired(load, name) for name in ("p99_ms", "p50_ms", "server_cpu_ms_per_unit", "rate_per_s")}
        p99_ratio = round(statistics.median(ratios["p99_ms"]), 3)
        rows = [s.analytics_rows for s in on.samples[load] if s.analytics_rows is not None]
        units = [s.units for s in on.samples[load]]
        result[load] = {
            "medians": {p.analytics: {name: median(p.samples[load], name) for name in fields} for p in pair},
            "p99_ms_min_max_over_rounds": {p.analytics: [min(s.p99_ms for s in p.samples[load]),
                                                         max(s.p99_ms for s in p.samples[load])] for p in pair},
            "ratio_on_off_per_round": ratios,
            "ratio_on_off": {name: round(statistics.median(values), 3) for name, values in ratios.items()},
            "p99_ratio_of_medians": round(median(on.samples[load], "p99_ms") / median(off.samples[load], "p99_ms"),
                                          3),
            "target": {"p99_on_off_at_most": TARGET_P99_RATIO, "measured": p99_ratio,
                       "met": p99_ratio <= TARGET_P99_RATIO},
            "analytics_rows_per_measurement": rows,
            "units_per_measurement_on": units,
            "rounds": {p.analytics: [asdict(s) for s in p.samples[load]] for p in pair},
        }
    return result


# --- writer throughput under load ----------------------------------------------------------------------------


class Sampler:
    """Reads the sink's counters from `/health` every SAMPLE_EVERY_S on a thread of its own."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.samples: list[SinkCounts] = []
        self.failure: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(sink_counts(self.server))
            except BaseException as exc:  # reported by the caller, on the main thread
                self.failure = exc
                return
            self._stop.wait(SAMPLE_EVERY_S)

    def between(self, start: float, end: float) -> list[SinkCounts]:
        if self.failure is not None:
            raise BenchmarkError(f"reading /health failed: {self.failure}")
        return [sample for sample in self.samples if start <= sample.at <= end]


def writer_under_load(on: Parley, load: str, args: argparse.Namespace) -> dict[str, Any]:
    """One longer measurement against the chDB server with its sink's counters sampled throughout; the rates are
    taken over the samples inside the load's measurement window."""
    drained(on.server)
    with Sampler(on.server) as sampler:
        started = time.monotonic()
        if load == HTTP:
            result = measure_http(on, args.load_duration, args.connections)
            window = (started + 0.2, started + args.load_duration)  # wrk has no warm-up
        else:
            result = measure_ws(on, args.conversations, args.load_duration)
            returned = time.monotonic()  # the window ended just before the generator printed its figures
            window = (returned - args.load_duration, returned - 0.3)
        time.sleep(FLUSH_INTERVAL_S + SAMPLE_EVERY_S)  # the last flush, sampled
    inside = sampler.between(*window)
    if len(inside) < 4:
        raise BenchmarkError(f"only {len(inside)} /health samples inside the {load} window")
    first, last = inside[0], inside[-1]
    span = last.at - first.at
    health_rows = len(inside) - 1  # the sampler's own reads, each one row, landing between `first` and `last`
    recorded_per_s = (last.recorded - first.recorded - health_rows) / span
    every = sampler.between(started, time.monotonic())
    figures = {
        "load": load,
        "rate_per_s": result.rate_per_s,
        "p99_ms": result.p99_ms,
        "samples_in_window": len(inside),
        "window_s": round(span, 2),
        "rows_recorded_per_s": round(recorded_per_s, 1),
        "rows_written_per_s": round((last.written - first.written - health_rows) / span, 1),
        "rows_per_unit": round(recorded_per_s / result.rate_per_s, 3),
        "max_queued": max(sample.queued for sample in every),
        "dropped": every[-1].dropped - every[0].dropped,
        "queued_after_last_flush": every[-1].queued,
    }
    print(f"  {load:<4} {result.rate_per_s:7.0f}/s: {figures['rows_recorded_per_s']:.0f} rows/s recorded, "
          f"{figures['rows_written_per_s']:.0f} rows/s written over {span:.1f} s, {figures['rows_per_unit']:.2f} "
          f"rows each, at most {figures['max_queued']} queued, {figures['dropped']} dropped", flush=True)
    return figures


# --- maximum writer throughput (a process of its own) --------------------------------------------------------


async def writer_max(rows: int, queue_max: int, directory: Path) -> dict[str, Any]:
    """Records `rows` RequestRecords into a fresh chDB sink as fast as the loop allows; times until all are
    written (or dropped), then checks the count in chDB."""
    from parley.analytics.clickhouse import ClickHouseStore
    from parley.analytics.records import RequestRecord
    from parley.analytics.sink import ClickHouseSink

    store = ClickHouseStore(f"chdb://{directory}", "bench", 30)
    sink = ClickHouseSink(store, queue_max=queue_max, batch_max=WRITER_BATCH_MAX,
                          flush_interval_s=WRITER_FLUSH_INTERVAL_S, retry_max_s=1, shutdown_flush_s=10)
    await sink.start()
    deadline = time.monotonic() + ANALYTICS_READY_TIMEOUT_S
    while (await sink.check()).status != "healthy":  # connected and migrated
        if time.monotonic() > deadline:
            raise BenchmarkError(f"the chDB sink did not become healthy: {await sink.check()}")
        await asyncio.sleep(0.05)
    now = utcnow()
    records = [RequestRecord(ts=now, method="GET", route="/api/threads", status=200, duration_ms=1.0 + i % 100,
                             user_id=f"user-{i % 1000}") for i in range(rows)]
    max_queued = 0
    started = time.perf_counter()
    for offset in range(0, rows, WRITER_YIELD_EVERY):
        for record in records[offset:offset + WRITER_YIELD_EVERY]:
            sink.record(record)
        max_queued = max(max_queued, sink.queued)
        await asyncio.sleep(0)  # a server's loop would run other tasks, the writer among them
    recorded_at = time.perf_counter()
    while sink.written + sink.dropped < rows:
        if sink.failing_since is not None:
            raise BenchmarkError(f"the chDB sink failed: {sink.last_error}")
        await asyncio.sleep(0.002)
    done_at = time.perf_counter()
    counted = (await sink.query("SELECT count() AS n FROM bench.http_requests"))[0]["n"]
    await sink.stop()
    elapsed = done_at - started
    return {"rows": rows, "queue_max": queue_max, "written": sink.written, "dropped": sink.dropped,
            "rows_in_chdb": int(counted), "max_queued": max_queued,
            "record_s": round(recorded_at - started, 3), "total_s": round(elapsed, 3),
            "rows_written_per_s": round(sink.written / elapsed), "records_per_s_offered": round(
                rows / (recorded_at - started))}


def run_writer_max(rows: int, queue_max: int, work: Path, index: int) -> dict[str, Any]:
    directory = work / f"writer-{index}"
    command = [sys.executable, str(Path(__file__).resolve()), "writer-max", "--rows", str(rows),
               "--queue-max", str(queue_max), "--dir", str(directory)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise BenchmarkError(f"writer-max failed:\n{result.stderr[-3000:]}")
    figures: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    if figures["rows_in_chdb"] != figures["written"] or figures["written"] + figures["dropped"] != rows:
        raise BenchmarkError(f"writer-max: rows do not add up: {figures}")
    print(f"  queue_max {queue_max}: {figures['rows_written_per_s']} rows/s written ({rows} rows in "
          f"{figures['total_s']} s; recording took {figures['record_s']} s), {figures['dropped']} dropped, "
          f"at most {figures['max_queued']} queued", flush=True)
    return figures


def writer_max_runs(rows: int, repeats: int, work: Path) -> dict[str, Any]:
    """`repeats` runs with a queue that holds every row (the writer's own speed), then one with the server's
    default queue bound (whether a burst that size loses rows)."""
    unbounded = [run_writer_max(rows, rows, work, index) for index in range(repeats)]
    default = run_writer_max(rows, 100_000, work, repeats)
    return {
        "rows": rows, "batch_max": WRITER_BATCH_MAX, "flush_interval_s": WRITER_FLUSH_INTERVAL_S,
        "yield_every": WRITER_YIELD_EVERY,
        "median_rows_written_per_s": statistics.median(run["rows_written_per_s"] for run in unbounded),
        "min_max_rows_written_per_s": [min(run["rows_written_per_s"] for run in unbounded),
                                       max(run["rows_written_per_s"] for run in unbounded)],
        "runs_queue_holds_all": unbounded,
        "run_default_queue_max": default,
    }


# --- report --------------------------------------------------------------------------------------------------


def print_tables(latency: dict[str, Any], under_load: list[dict[str, Any]], maximum: dict[str, Any]) -> None:
    print("\n| load | analytics | rate/s | p50 ms | p99 ms | p99 ms min-max | server CPU ms/unit (cores) | "
          "machine cores |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for load, result in latency.items():
        for kind, m in result["medians"].items():
            low, high = result["p99_ms_min_max_over_rounds"][kind]
            print(f"| {load} | {kind} | {m['rate_per_s']:.0f} | {m['p50_ms']:.2f} | {m['p99_ms']:.2f} | "
                  f"{low:.1f}-{high:.1f} | {m['server_cpu_ms_per_unit']:.3f} ({m['server_cpu_share']:.2f}) | "
                  f"{m['machine_cpu_share']:.2f} |")
    print("\n| load | p99 on/off | p50 on/off | server CPU on/off | rate on/off | p99 on/off per round | verdict |")
    print("|---|---:|---:|---:|---:|---|---|")
    for load, result in latency.items():
        r = result["ratio_on_off"]
        per_round = ", ".join(f"{value:.2f}" for value in result["ratio_on_off_per_round"]["p99_ms"])
        verdict = "MET" if result["target"]["met"] else "NOT MET"
        print(f"| {load} | {r['p99_ms']:.2f} | {r['p50_ms']:.2f} | {r['server_cpu_ms_per_unit']:.2f} | "
              f"{r['rate_per_s']:.2f} | {per_round} | {verdict} |")
    print("\n| writer under load | load rate/s | rows/s recorded | rows/s written | rows per unit | max queued | "
          "dropped |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for figures in under_load:
        print(f"| {figures['load']} | {figures['rate_per_s']:.0f} | {figures['rows_recorded_per_s']:.0f} | "
              f"{figures['rows_written_per_s']:.0f} | {figures['rows_per_unit']:.2f} | {figures['max_queued']} | "
              f"{figures['dropped']} |")
    default = maximum["run_default_queue_max"]
    print(f"\nwriter maximum: {maximum['median_rows_written_per_s']} rows/s (median of "
          f"{len(maximum['runs_queue_holds_all'])}, range {maximum['min_max_rows_written_per_s']}); with the "
          f"default queue_max of 100,000: {default['rows_written_per_s']} rows/s, {default['dropped']} dropped")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved on/off rounds (default 5)")
    parser.add_argument("--duration", type=int, default=5, help="seconds per latency measurement (default 5)")
    parser.add_argument("--connections", type=int, default=10, help="wrk connections (default 10)")
    parser.add_argument("--conversations", type=int, default=10, help="WebSocket conversations (default 10)")
    parser.add_argument("--load-duration", type=int, default=10,
                        help="seconds of each writer-under-load measurement (default 10)")
    parser.add_argument("--writer-rows", type=int, default=200_000, help="rows of the maximum test (default 200,000)")
    parser.add_argument("--writer-repeats", type=int, default=3, help="runs of the maximum test (default 3)")
    args = parser.parse_args()
    if args.rounds < 1 or args.duration < 1 or args.load_duration < 3 or args.writer_rows < WRITER_BATCH_MAX:
        parser.error("--rounds, --duration >= 1, --load-duration >= 3, --writer-rows >= 10,000")

    raise_open_file_limit()
    started = time.monotonic()
    load_at_start = os.getloadavg()
    measured_code = environment(PACKAGES)  # before the run: another engineer may commit or edit src/ meanwhile
    with tempfile.TemporaryDirectory(prefix="parley-bench-analytics-") as temp:
        work = Path(temp)
        try:
            print("== servers", flush=True)
            pair = start_pair(work, args.conversations)
            try:
                print("\n== latency, analytics on (chDB) against off", flush=True)
                run_rounds(pair, args)
                print("\n== writer under load (chDB server)", flush=True)
                on = next(parley for parley in pair if parley.analytics == ON)
                under_load = [writer_under_load(on, load, args) for load in (HTTP, WS)]
            finally:
                for parley in pair:
                    parley.server.stop()
            print("\n== writer maximum (a sink in a process of its own)", flush=True)
            maximum = writer_max_runs(args.writer_rows, args.writer_repeats, work)
        except BenchmarkError as exc:
            print(f"\nbenchmark failed: {exc}", file=sys.stderr)
            return 1
    latency = summarise(pair)
    print_tables(latency, under_load, maximum)
    report = {
        "benchmark": "analytics on (chDB) against off: GET /api/threads and WebSocket runs; writer throughput",
        "date": utcnow().isoformat(timespec="seconds"),
        "elapsed_s": round(time.monotonic() - started, 1),
        "load_average_start_end": [load_at_start, os.getloadavg()],
        "settings": {"rounds": args.rounds, "duration_s": args.duration, "connections": args.connections,
                     "conversations": args.conversations, "list_path": LIST_PATH, "list_threads": LIST_THREADS,
                     "ws_content": CONTENT, "ws_tokens_per_run": TOKENS_PER_RUN, "ws_warmup_s": WS_WARMUP_S,
                     "http_warmup_s": HTTP_WARMUP_S, "analytics_flush_interval_s": FLUSH_INTERVAL_S,
                     "load_duration_s": args.load_duration, "health_sample_every_s": SAMPLE_EVERY_S},
        "environment": measured_code,
        "targets": {load: result["target"] for load, result in latency.items()},
        "latency": latency,
        "writer_under_load": under_load,
        "writer_maximum": maximum,
    }
    RESULTS_FILE.parent.mkdir(exist_ok=True)
    RESULTS_FILE.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten to {RESULTS_FILE.relative_to(BENCH_DIR.parent)} in {report['elapsed_s']}s")
    return 0


def writer_max_main() -> int:
    parser = argparse.ArgumentParser(description="the maximum-throughput test of the analytics sink")
    parser.add_argument("mode", choices=["writer-max"])
    parser.add_argument("--rows", type=int, required=True)
    parser.add_argument("--queue-max", type=int, required=True)
    parser.add_argument("--dir", type=Path, required=True, help="a fresh directory for chDB")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(writer_max(args.rows, args.queue_max, args.dir))), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(writer_max_main() if sys.argv[1:2] == ["writer-max"] else main())
