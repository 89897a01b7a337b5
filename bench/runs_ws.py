"""Benchmark of conversations over `/ws` with the builtin provider at zero delay, and of idle connections' memory.

Every server and the load generator run in separate processes:

- `baseline`: a bare Starlette WebSocket endpoint that answers each `user_message` with the same frames parley
  sends for a run and stores nothing (bench/ws_baseline_server.py): the framework's ceiling;
- `parley sqlite` and `parley postgresql`: `parley serve` with PARLEY_BUILTIN_TOKEN_DELAY_S=0 and
  PARLEY_LOG_LEVEL=WARNING, which stores every event before it sends it;
- the load generator (bench/ws_load.py): asyncio, uvloop and the `websockets` client, one task per conversation.

A conversation is one connection that sends `CONTENT` (one calculator step, then an answer of 20 streamed
tokens), waits for `agent_completed` and repeats on the same thread. For 1, 10 and 100 concurrent conversations
the generator measures runs/s, events/s (every frame received), p50/p99 from `user_message` to `agent_started`
and to `agent_completed`, and the CPU time per run of the server, of itself, and of PostgreSQL. Each measurement
warms up, then lasts a fixed duration. The targets are measured in interleaved rounds (their order rotates each
round); the figures are medians across rounds, and ratios to the baseline are medians of the ratios within each
round, because the machine is shared and noisy. Any error, `agent_error`, gap in a thread's `seq` or run that
is not exactly the expected sequence of frames fails the run.

Memory: a fresh server (parley on SQLite, and the baseline) gets 2,000 idle connections (parley's all of one
user). Its resident memory (VmRSS, and its anonymous part RssAnon) is read before and after, each time after a
full garbage collection (see bench/gc_hook/sitecustomize.py), and the growth is divided by the number of
connections.

    .venv/bin/python bench/runs_ws.py [--duration S] [--rounds N] [--conversations 1,10,100]
                                      [--databases sqlite,postgresql] [--idle-connections N]

Prints a table and writes bench/results/runs_ws.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common import (
    BenchmarkError,
    Server,
    environment,
    raise_open_file_limit,
    recreate_postgres_database,
    register,
    running,
    start_parley,
)
from ws_baseline_server import READY_PATH as READY_PATH_BASELINE

from parley.clock import utcnow
from parley.server import free_port

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_FILE = BENCH_DIR / "results" / "runs_ws.json"
LOAD_SCRIPT = BENCH_DIR / "ws_load.py"
BASELINE_SCRIPT = BENCH_DIR / "ws_baseline_server.py"
GC_HOOK_DIR = BENCH_DIR / "gc_hook"
GC_LINE = "bench gc_hook: collected"  # what gc_hook/sitecustomize.py prints after each collection

PG_DATABASE = "parley_bench_runs"
PG_URL = f"postgresql+asyncpg://postgres@127.0.0.1:5432/{PG_DATABASE}"

# The builtin assistant calls the calculator once, then streams "1 + 2 + ... + 9 +10 = 55." as 20 tokens, the
# workload the reference figures are for. ("what is 12 * 7" would stream only 5.)
CONTENT = "what is 1 + 2 + 3 + 4 + 5 + 6 + 7 + 8 + 9 +10"
TOKENS_PER_RUN = 20
FRAMES_PER_RUN = TOKENS_PER_RUN + 8  # message_created or thread_created, ack, 5 run events, deltas, completed
WARMUP_S = 1.0  # of every measurement: connections are open, first runs (which create the threads) are done
FIRST_WARMUP_S = 3.0  # once per target before the rounds, discarded
IDLE_SETTLE_S = 2.0
RSS_POLL_S, RSS_STEADY_KIB, RSS_SETTLE_MAX_S = 0.5, 256, 20.0
READY_PATH_PARLEY = "/health/ready"

TARGET_RUNS_PER_S_AT_10 = 1000
TARGET_COMPLETED_P99_MS_AT_100 = 100
TARGET_IDLE_KIB = 30

BASELINE = "baseline"
FIELDS = ("runs_per_s", "events_per_s", "started_p50_ms", "started_p99_ms", "completed_p50_ms", "completed_p99_ms",
          "server_cpu_ms_per_run", "server_cpu_share", "generator_cpu_ms_per_run", "generator_cpu_share",
          "postgres_cpu_ms_per_run", "machine_cpu_share")


@dataclass(frozen=True)
class Target:
    """One server the generator loads: its `/ws` URL, its process, and the access tokens to connect with."""

    name: str
    server: Server
    tokens_file: Path | None
    postgres: bool = False

    @property
    def ws_url(self) -> str:
        return self.server.url.replace("http://", "ws://", 1) + "/ws"


@dataclass(frozen=True)
class Sample:
    """One measurement of one target at one concurrency, as bench/ws_load.py reports it."""

    conversations: int
    duration_s: float
    runs: int
    runs_per_s: float
    events_per_s: float
    frames_per_run: float
    tokens_per_run: list[int]
    started_p50_ms: float
    started_p99_ms: float
    completed_p50_ms: float
    completed_p99_ms: float
    server_cpu_ms_per_run: float
    server_cpu_share: float  # server CPU seconds per second of the window: 1.0 is one core
    generator_cpu_ms_per_run: float
    generator_cpu_share: float
    postgres_cpu_ms_per_run: float  # every `postgres` process; 0 for the others
    machine_cpu_share: float  # every process on the machine, ours included, in cores


# What `parley serve` gets here besides the settings of every benchmark (common.start_parley). Everything else
# keeps its default; in particular analytics is `auto`: with chDB installed it records every run in chDB.
PARLEY_SETTINGS = {
    "PARLEY_BUILTIN_TOKEN_DELAY_S": "0",
    "PARLEY_PASSWORD_HASH_MEMORY_KIB": "1024",  # cheap registrations; login cost is not measured here
    "PARLEY_WS_MESSAGES_PER_MINUTE": "1000000",
    "PARLEY_WS_MAX_CONNECTIONS_PER_USER": "10000",  # the idle test opens all its connections as one user
}


def start_parley_ws(name: str, database_url: str, work_dir: Path, *, gc_hook: bool = False,
                    settings: dict[str, str] | None = None) -> Server:
    """`parley serve` with PARLEY_SETTINGS, plus `settings`; `gc_hook` loads bench/gc_hook into it."""
    return start_parley(name, database_url, work_dir, {**PARLEY_SETTINGS, **(settings or {})},
                        pythonpath=GC_HOOK_DIR if gc_hook else None)


def start_baseline(work_dir: Path, name: str = BASELINE, *, gc_hook: bool = False) -> Server:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(GC_HOOK_DIR)} if gc_hook else None
    return Server(name, [sys.executable, str(BASELINE_SCRIPT), str(port)], port, work_dir / f"{name}.log", env=env)


def register_users(server: Server, count: int, tokens_file: Path) -> None:
    """Registers `count` accounts (one per conversation, so no user's run slots limit the load) and writes their
    access tokens to `tokens_file` for the generator."""
    tokens = [register(server.url, f"bench-{index}@bench.example")[1] for index in range(count)]
    tokens_file.write_text(json.dumps(tokens))


# --- load ----------------------------------------------------------------------------------------------------


def run_load(target: Target, conversations: int, warmup_s: float, duration_s: float) -> Sample:
    command = [sys.executable, str(LOAD_SCRIPT), "runs", target.ws_url, "--conversations", str(conversations),
               "--warmup", str(warmup_s), "--duration", str(duration_s), "--content", CONTENT,
               "--server-pid", str(target.server.pid)]
    if target.tokens_file is not None:
        command += ["--tokens-file", str(target.tokens_file)]
    if target.postgres:
        command.append("--postgres-cpu")
    result = subprocess.run(command, capture_output=True, text=True, timeout=warmup_s + duration_s + 120)
    if result.returncode != 0:
        raise BenchmarkError(f"{target.name}, {conversations} conversations: the generator failed:\n"
                             f"{result.stderr[-3000:]}\nserver log:\n{target.server.log_tail()}")
    sample = Sample(**json.loads(result.stdout))
    if sample.tokens_per_run != [TOKENS_PER_RUN]:
        raise BenchmarkError(f"{target.name}: runs streamed {sample.tokens_per_run} tokens, not {TOKENS_PER_RUN}")
    return sample


def measure(targets: list[Target], concurrencies: list[int], rounds: int,
            duration_s: float) -> dict[str, dict[int, list[Sample]]]:
    """Warms every target up once, then runs `rounds` rounds; within a round, each concurrency loads every
    target in turn, the order rotating from round to round so no target is always first."""
    for target in targets:
        run_load(target, max(concurrencies), WARMUP_S, FIRST_WARMUP_S)
    samples: dict[str, dict[int, list[Sample]]] = {target.name: {n: [] for n in concurrencies} for target in targets}
    for round_index in range(rounds):
        shift = round_index % len(targets)
        for conversations in concurrencies:
            for target in targets[shift:] + targets[:shift]:
                sample = run_load(target, conversations, WARMUP_S, duration_s)
                samples[target.name][conversations].append(sample)
                print(f"  round {round_index + 1}/{rounds} {conversations:>3} conv. {target.name:<18} "
                      f"{sample.runs_per_s:7.0f} runs/s  to completed p50 {sample.completed_p50_ms:7.2f} ms "
                      f"p99 {sample.completed_p99_ms:7.2f} ms  server CPU {sample.server_cpu_ms_per_run:.3f} ms/run "
                      f"({sample.server_cpu_share:.2f} core), generator {sample.generator_cpu_share:.2f} core, "
                      f"machine {sample.machine_cpu_share:.2f} cores",
                      flush=True)
    return samples


def summarise(samples: dict[str, dict[int, list[Sample]]]) -> dict[str, Any]:
    def median(runs: list[Sample], field: str) -> float:
        return round(statistics.median(float(getattr(sample, field)) for sample in runs), 3)

    def paired_ratio(top: list[Sample], bottom: list[Sample], field: str) -> float:
        """The median over rounds of top/bottom, each pair measured in the same round."""
        return round(statistics.median(float(getattr(a, field)) / float(getattr(b, field))
                                       for a, b in zip(top, bottom, strict=True)), 3)

    medians = {name: {str(n): {field: median(runs, field) for field in FIELDS} for n, runs in by_n.items()}
               for name, by_n in samples.items()}
    ranges = {name: {str(n): [min(s.runs_per_s for s in runs), max(s.runs_per_s for s in runs)]
                     for n, runs in by_n.items()} for name, by_n in samples.items()}
    ratios = {
        name: {str(n): {
            "runs_per_s": paired_ratio(runs, samples[BASELINE][n], "runs_per_s"),
            "completed_p50_ms": paired_ratio(runs, samples[BASELINE][n], "completed_p50_ms"),
            "completed_p99_ms": paired_ratio(runs, samples[BASELINE][n], "completed_p99_ms"),
            "server_cpu_ms_per_run": paired_ratio(runs, samples[BASELINE][n], "server_cpu_ms_per_run"),
        } for n, runs in by_n.items()}
        for name, by_n in samples.items() if name != BASELINE
    }
    return {"medians": medians, "runs_per_s_min_max_over_rounds": ranges, "ratios_to_baseline": ratios,
            "rounds": {name: {str(n): [asdict(s) for s in runs] for n, runs in by_n.items()}
                       for name, by_n in samples.items()}}


# --- idle memory ---------------------------------------------------------------------------------------------


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS (all resident memory) and RssAnon (its anonymous part: the heap, without mapped files such as
    shared libraries, whose pages fault in as code first runs), from /proc (Linux)."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {name: int(fields[name].split()[0]) for name in ("VmRSS", "RssAnon")}


def settled_memory_kib(pid: int) -> dict[str, int]:
    """Memory once VmRSS stops moving (less than RSS_STEADY_KIB over RSS_POLL_S): the server may still be
    finishing work of its own, such as starting its analytics store, when the measurement begins."""
    deadline = time.monotonic() + RSS_SETTLE_MAX_S
    previous = memory_kib(pid)
    while True:
        time.sleep(RSS_POLL_S)
        current = memory_kib(pid)
        if abs(current["VmRSS"] - previous["VmRSS"]) < RSS_STEADY_KIB or time.monotonic() > deadline:
            return current
        previous = current


def collect_garbage(server: Server) -> int:
    """Has the server run a full collection (SIGUSR1 to gc_hook) and returns how many objects it found."""
    done = server.log_file.read_text().count(GC_LINE)
    os.kill(server.pid, signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lines = [line for line in server.log_file.read_text().splitlines() if line.startswith(GC_LINE)]
        if len(lines) > done:
            return int(lines[-1].removeprefix(GC_LINE))
        time.sleep(0.05)
    raise BenchmarkError(f"{server.name} did not report a garbage collection:\n{server.log_tail()}")


def hold_idle(server: Server, tokens_file: Path | None, connections: int) -> subprocess.Popen[str]:
    """Starts a generator holding `connections` idle connections; returns once all of them are greeted."""
    ws_url = server.url.replace("http://", "ws://", 1) + "/ws"
    command = [sys.executable, str(LOAD_SCRIPT), "idle", ws_url, "--connections", str(connections)]
    if tokens_file is not None:
        command += ["--tokens-file", str(tokens_file)]
    holder = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None
    line = holder.stdout.readline()  # the generator's only line, once every connection is open
    if not line or json.loads(line).get("open") != connections:
        holder.kill()
        raise BenchmarkError(f"{server.name}: could not open {connections} idle connections:\n{server.log_tail()}")
    return holder


def release(holder: subprocess.Popen[str]) -> None:
    holder.communicate("close\n", timeout=60)
    if holder.returncode != 0:
        raise BenchmarkError(f"the idle generator exited with {holder.returncode}")


def idle_memory(server: Server, tokens_file: Path | None, connections: int) -> dict[str, Any]:
    """Resident memory per idle connection: a few connections first open and close (first-use imports and
    caches), then memory is read before and after `connections` idle ones, each time after a full collection
    and once it has settled."""
    release(hold_idle(server, tokens_file, 10))
    collected_before = collect_garbage(server)
    before = settled_memory_kib(server.pid)
    holder = hold_idle(server, tokens_file, connections)
    try:
        time.sleep(IDLE_SETTLE_S)
        collected_after = collect_garbage(server)
        after = settled_memory_kib(server.pid)
    finally:
        release(holder)
    per_connection = (after["VmRSS"] - before["VmRSS"]) / connections
    anon_per_connection = (after["RssAnon"] - before["RssAnon"]) / connections
    print(f"  {server.name}: VmRSS {before['VmRSS']} KiB -> {after['VmRSS']} KiB with {connections} idle "
          f"connections: {per_connection:.1f} KiB each ({anon_per_connection:.1f} KiB RssAnon); gc found "
          f"{collected_before} and {collected_after} objects", flush=True)
    return {"connections": connections, "rss_before_kib": before["VmRSS"], "rss_after_kib": after["VmRSS"],
            "kib_per_connection": round(per_connection, 2),
            "anon_before_kib": before["RssAnon"], "anon_after_kib": after["RssAnon"],
            "anon_kib_per_connection": round(anon_per_connection, 2),
            "gc_collected_before_after": [collected_before, collected_after]}


def bench_idle(work: Path, connections: int) -> dict[str, Any]:
    print(f"\n== idle memory, {connections} connections", flush=True)
    results: dict[str, Any] = {}
    baseline_dir, parley_dir = work / "idle-baseline", work / "idle-parley"
    baseline_dir.mkdir()
    parley_dir.mkdir()
    with running(start_baseline(baseline_dir, "idle-baseline", gc_hook=True), READY_PATH_BASELINE) as baseline:
        results[BASELINE] = idle_memory(baseline, None, connections)
    database_url = f"sqlite+aiosqlite:///{parley_dir / 'parley.db'}"
    with running(start_parley_ws("idle-parley-sqlite", database_url, parley_dir, gc_hook=True),
                 READY_PATH_PARLEY) as parley:
        tokens_file = parley_dir / "tokens.json"
        register_users(parley, 1, tokens_file)
        results["parley sqlite"] = idle_memory(parley, tokens_file, connections)
    results["ratio_parley_to_baseline"] = round(
        results["parley sqlite"]["kib_per_connection"] / results[BASELINE]["kib_per_connection"], 2)
    return results


# --- report --------------------------------------------------------------------------------------------------


def verdicts(load: dict[str, Any], idle: dict[str, Any] | None) -> dict[str, Any]:
    """The issue's three targets, on SQLite; each None when its measurement was not part of this run."""
    sqlite = load["medians"].get("parley sqlite", {})
    runs = sqlite.get("10", {}).get("runs_per_s")
    p99 = sqlite.get("100", {}).get("completed_p99_ms")
    kib = idle["parley sqlite"]["kib_per_connection"] if idle else None
    return {
        "runs_per_s_at_10": {"target_at_least": TARGET_RUNS_PER_S_AT_10, "measured": runs,
                             "met": None if runs is None else runs >= TARGET_RUNS_PER_S_AT_10},
        "completed_p99_ms_at_100": {"target_at_most": TARGET_COMPLETED_P99_MS_AT_100, "measured": p99,
                                    "met": None if p99 is None else p99 <= TARGET_COMPLETED_P99_MS_AT_100},
        "idle_kib_per_connection": {"target_at_most": TARGET_IDLE_KIB, "measured": kib,
                                    "met": None if kib is None else kib <= TARGET_IDLE_KIB},
    }


def print_table(load: dict[str, Any], idle: dict[str, Any] | None, targets: dict[str, Any]) -> None:
    print("\n| target | conv. | runs/s | events/s | to started p50 / p99 ms | to completed p50 / p99 ms | "
          "server CPU ms/run (cores) | generator CPU ms/run (cores) | postgres CPU ms/run | machine cores busy |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, by_n in load["medians"].items():
        for n, m in by_n.items():
            postgres = f"{m['postgres_cpu_ms_per_run']:.3f}" if name == "parley postgresql" else "-"
            print(f"| {name} | {n} | {m['runs_per_s']:.0f} | {m['events_per_s']:.0f} | "
                  f"{m['started_p50_ms']:.2f} / {m['started_p99_ms']:.2f} | "
                  f"{m['completed_p50_ms']:.2f} / {m['completed_p99_ms']:.2f} | "
                  f"{m['server_cpu_ms_per_run']:.3f} ({m['server_cpu_share']:.2f}) | "
                  f"{m['generator_cpu_ms_per_run']:.3f} ({m['generator_cpu_share']:.2f}) | {postgres} | "
                  f"{m['machine_cpu_share']:.2f} |")
    print("\n| parley / baseline (median of per-round ratios) | conv. | runs/s | to completed p50 | server CPU/run |")
    print("|---|---:|---:|---:|---:|")
    for name, by_n in load["ratios_to_baseline"].items():
        for n, r in by_n.items():
            print(f"| {name} | {n} | {r['runs_per_s']:.3f} | {r['completed_p50_ms']:.1f} | "
                  f"{r['server_cpu_ms_per_run']:.1f} |")
    if idle:
        print("\n| idle connections | VmRSS before KiB | after KiB | KiB per connection | RssAnon KiB per connection |")
        print("|---|---:|---:|---:|---:|")
        for name in (BASELINE, "parley sqlite"):
            m = idle[name]
            print(f"| {name} ({m['connections']}) | {m['rss_before_kib']} | {m['rss_after_kib']} | "
                  f"{m['kib_per_connection']:.1f} | {m['anon_kib_per_connection']:.1f} |")
    print()
    for name, verdict in targets.items():
        if verdict["met"] is None:
            continue
        bound = verdict.get("target_at_least", verdict.get("target_at_most"))
        relation = ">=" if "target_at_least" in verdict else "<="
        print(f"target {name}: {verdict['measured']} (target {relation} {bound}): "
              f"{'MET' if verdict['met'] else 'NOT MET'}")


PACKAGES = ("starlette", "uvicorn", "uvloop", "websockets", "sqlalchemy", "aiosqlite", "asyncpg", "orjson",
            "pydantic", "chdb")  # with chdb installed, `parley serve` records analytics in it by default


def bench_load(work: Path, kinds: list[str], concurrencies: list[int], args: argparse.Namespace) -> dict[str, Any]:
    print("\n== conversations", flush=True)
    servers: list[tuple[Server, str]] = [(start_baseline(work), READY_PATH_BASELINE)]
    tokens: dict[str, Path] = {}
    for kind in kinds:
        (work / kind).mkdir()
        if kind == "postgresql":
            asyncio.run(recreate_postgres_database(PG_DATABASE))
            database_url = PG_URL
        else:
            database_url = f"sqlite+aiosqlite:///{work / kind / 'parley.db'}"
        servers.append((start_parley_ws(f"parley {kind}", database_url, work / kind), READY_PATH_PARLEY))
        tokens[kind] = work / kind / "tokens.json"
    try:
        for server, ready_path in servers:
            server.wait_until_answering(ready_path)
        for (server, _), kind in zip(servers[1:], kinds, strict=True):
            register_users(server, max(concurrencies), tokens[kind])
        targets = [Target(BASELINE, servers[0][0], None)]
        targets += [Target(server.name, server, tokens[kind], postgres=kind == "postgresql")
                    for (server, _), kind in zip(servers[1:], kinds, strict=True)]
        return summarise(measure(targets, concurrencies, args.rounds, args.duration))
    finally:
        for server, _ in servers:
            server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=5, help="seconds per measurement (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--conversations", default="1,10,100", help="comma-separated concurrencies")
    parser.add_argument("--databases", default="sqlite,postgresql", help="comma-separated: sqlite,postgresql")
    parser.add_argument("--idle-connections", type=int, default=2000, help="0 skips the memory measurement")
    args = parser.parse_args()
    kinds = [kind.strip() for kind in args.databases.split(",") if kind.strip()]
    if not kinds or any(kind not in ("sqlite", "postgresql") for kind in kinds):
        parser.error("--databases takes sqlite and/or postgresql")
    concurrencies = [int(n) for n in args.conversations.split(",") if n.strip()]
    if not concurrencies or min(concurrencies) < 1:
        parser.error("--conversations takes positive integers")

    raise_open_file_limit()
    started = time.monotonic()
    load_at_start = os.getloadavg()
    measured_code = environment(PACKAGES)  # before the run: another engineer may commit or edit src/ meanwhile
    with tempfile.TemporaryDirectory(prefix="parley-bench-ws-") as temp:
        work = Path(temp)
        try:
            load = bench_load(work, kinds, concurrencies, args)
            idle = bench_idle(work, args.idle_connections) if args.idle_connections else None
        except BenchmarkError as exc:
            print(f"\nbenchmark failed: {exc}", file=sys.stderr)
            return 1
    targets = verdicts(load, idle)
    print_table(load, idle, targets)
    report = {
        "benchmark": "WebSocket conversations (builtin provider, zero delay) and idle connections",
        "date": utcnow().isoformat(timespec="seconds"),
        "elapsed_s": round(time.monotonic() - started, 1),
        "load_average_start_end": [load_at_start, os.getloadavg()],
        "settings": {"duration_s": args.duration, "rounds": args.rounds, "conversations": concurrencies,
                     "warmup_s": WARMUP_S, "first_warmup_s": FIRST_WARMUP_S, "content": CONTENT,
                     "tokens_per_run": TOKENS_PER_RUN, "frames_per_run": FRAMES_PER_RUN,
                     "idle_connections": args.idle_connections, "idle_settle_s": IDLE_SETTLE_S},
        "environment": measured_code,
        "targets": targets,
        "load": load,
        "idle": idle,
    }
    RESULTS_FILE.parent.mkdir(exist_ok=True)
    RESULTS_FILE.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten to {RESULTS_FILE.relative_to(BENCH_DIR.parent)} in {report['elapsed_s']}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
