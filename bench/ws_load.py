"""The load generator of bench/runs_ws.py: WebSocket conversations (or idle connections) against one `/ws`.

It runs in its own process, on asyncio with uvloop and the `websockets` client, one task per connection.

`runs`: each conversation is one connection that sends a `user_message`, reads every frame until
`agent_completed`, and repeats on the same thread (the first message creates it). After a warm-up it measures
for a fixed duration. Runs/s and events/s are the runs completed and frames received between the two edges of
that window. The latencies are taken from each run sent inside the window: `user_message` sent →
`agent_started` received, and → `agent_completed` received. CPU time is read at the same two edges: the
generator's own, the server process's (from /proc), optionally that of every `postgres` process, and that of
the whole machine (to show whether other processes competed for the CPUs).
Every frame is checked. Any `error` or `agent_error`, a gap or repeat in a thread's `seq`, a run whose frames are
not the expected sequence, or deltas that do not add up to the final answer ends the process with status 1.

`idle`: opens N connections, waits for each `connected`, prints one JSON line, keeps them open (answering the
server's pings) until a line arrives on stdin, then closes them.

    ws_load.py runs URL --conversations N --warmup S --duration S --content TEXT --server-pid PID
                        [--tokens-file F] [--postgres-cpu]
    ws_load.py idle URL --connections N [--tokens-file F]

`--tokens-file` is a JSON list of access tokens, used in turn as `Authorization: Bearer` headers.
The `runs` mode prints one JSON line of figures; both modes report failures on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import uvloop
from websockets.asyncio.client import ClientConnection, connect

RUN_TIMEOUT_S = 30.0
CONNECT_BATCH = 100  # connections opened at once, so the server's accept backlog is not overrun
# The frames of one run after `ack` and `thread_created`/`message_created`, before the deltas.
RUN_HEAD = ["agent_started", "agent_thinking", "tool_executing", "tool_completed", "agent_thinking"]
ERROR_TYPES = frozenset({"error", "agent_error", "agent_cancelled"})


class LoadError(Exception):
    """The server answered something a correct run never contains."""


@dataclass
class Counters:
    """What the window's edges snapshot: totals since the conversations started."""

    frames: int = 0
    runs: int = 0
    tokens: set[int] = field(default_factory=set)  # the distinct numbers of deltas per run seen


@dataclass(frozen=True)
class Edge:
    at: float
    frames: int
    runs: int
    generator_cpu_s: float
    server_cpu_s: float
    postgres_cpu_s: float
    machine_busy_s: float


@dataclass
class Window:
    start: float
    end: float
    started_ms: list[float] = field(default_factory=list)
    completed_ms: list[float] = field(default_factory=list)


def process_cpu_s(pid: int) -> float:
    """User plus system CPU seconds of a process and all its threads, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> float:
    """CPU seconds every process on the machine spent busy (all cores), from the first line of /proc/stat:
    user, nice, system, irq and softirq; not idle, iowait or steal."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    user, nice, system, _idle, _iowait, irq, softirq = (int(value) for value in fields[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def postgres_cpu_s() -> float:
    """CPU seconds of every process named `postgres` (the server, its backends and background workers)."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # the process ended meanwhile
            continue
        if stat[stat.index("(") + 1:stat.rindex(")")] == "postgres":
            total += process_cpu_s(int(entry.name))
    return total


def raise_open_file_limit() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def open_connections(url: str, tokens: list[str], count: int) -> list[ClientConnection]:
    """Opens `count` connections in batches and waits for each one's `connected` greeting."""

    async def one(index: int) -> ClientConnection:
        headers = {"Authorization": f"Bearer {tokens[index % len(tokens)]}"} if tokens else None
        ws = await connect(url, additional_headers=headers, compression=None, proxy=None, ping_interval=None,
                           open_timeout=30, max_size=2**20)
        greeting = orjson.loads(await ws.recv())
        if greeting.get("type") != "connected":
            raise LoadError(f"expected `connected` first, got {greeting}")
        return ws

    connections: list[ClientConnection] = []
    for offset in range(0, count, CONNECT_BATCH):
        batch = range(offset, min(count, offset + CONNECT_BATCH))
        connections += await asyncio.gather(*(one(index) for index in batch))
    return connections


async def converse(ws: ClientConnection, content: str, counters: Counters, window: Window) -> None:
    """Runs after run on one thread until the window has ended, checking every frame."""
    thread_id: str | None = None
    last_seq: int | None = None
    while time.perf_counter() < window.end:
        payload: dict[str, Any] = {"content": content}
        if thread_id is not None:
            payload["thread_id"] = thread_id
        types: list[str] = []
        deltas: list[str] = []
        started_at: float | None = None
        sent_at = time.perf_counter()
        await ws.send(orjson.dumps({"type": "user_message", "payload": payload}).decode())
        async with asyncio.timeout(RUN_TIMEOUT_S):
            while True:
                message = orjson.loads(await ws.recv())
                counters.frames += 1
                type_ = message["type"]
                types.append(type_)
                seq = message.get("seq")
                if seq is not None:
                    if last_seq is not None and seq != last_seq + 1:
                        raise LoadError(f"thread {message.get('thread_id')}: seq {seq} after {last_seq}")
                    last_seq = seq
                if type_ in ERROR_TYPES:
                    raise LoadError(f"the server answered {message}")
                if type_ == "ack":
                    thread_id = message["payload"]["thread_id"]
                elif type_ == "agent_started":
                    started_at = time.perf_counter()
                elif type_ == "agent_delta":
                    deltas.append(message["payload"]["text"])
                elif type_ == "agent_completed":
                    completed_at = time.perf_counter()
                    content_out = message["payload"]["message"]["content"]
                    break
        first_run = "thread_created" in types
        opening = {"thread_created" if first_run else "message_created", "ack"}
        if (set(types[:2]) != opening or types[2:7] != RUN_HEAD or not deltas
                or types[7:-1] != ["agent_delta"] * len(deltas) or "".join(deltas) != content_out):
            raise LoadError(f"thread {thread_id}: unexpected run {types} (answer {content_out!r})")
        assert started_at is not None  # RUN_HEAD begins with agent_started
        counters.runs += 1
        counters.tokens.add(len(deltas))
        if window.start <= sent_at < window.end:
            window.started_ms.append((started_at - sent_at) * 1000)
            window.completed_ms.append((completed_at - sent_at) * 1000)


def percentile(values: list[float], fraction: float) -> float:
    """The nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(fraction * len(ordered)) - 1))]


async def measure_runs(args: argparse.Namespace, tokens: list[str]) -> dict[str, Any]:
    connections = await open_connections(args.url, tokens, args.conversations)
    counters = Counters()
    start = time.perf_counter() + args.warmup
    window = Window(start, start + args.duration)

    def edge() -> Edge:
        return Edge(time.perf_counter(), counters.frames, counters.runs, time.process_time(),
                    process_cpu_s(args.server_pid), postgres_cpu_s() if args.postgres_cpu else 0.0,
                    machine_busy_s())

    edges: list[Edge] = []

    async def clock() -> None:
        for moment in (window.start, window.end):
            await asyncio.sleep(moment - time.perf_counter())
            edges.append(edge())

    async with asyncio.TaskGroup() as group:
        group.create_task(clock())
        for ws in connections:
            group.create_task(converse(ws, args.content, counters, window))
    await asyncio.gather(*(ws.close() for ws in connections))

    first, last = edges
    wall = last.at - first.at
    runs = last.runs - first.runs
    if not runs or not window.completed_ms:
        raise LoadError("no run completed inside the measurement window")
    return {
        "conversations": args.conversations,
        "duration_s": round(wall, 3),
        "runs": runs,
        "runs_per_s": round(runs / wall, 1),
        "events_per_s": round((last.frames - first.frames) / wall, 1),
        "frames_per_run": round((last.frames - first.frames) / runs, 2),
        "tokens_per_run": sorted(counters.tokens),
        "started_p50_ms": round(percentile(window.started_ms, 0.50), 3),
        "started_p99_ms": round(percentile(window.started_ms, 0.99), 3),
        "completed_p50_ms": round(percentile(window.completed_ms, 0.50), 3),
        "completed_p99_ms": round(percentile(window.completed_ms, 0.99), 3),
        "server_cpu_ms_per_run": round((last.server_cpu_s - first.server_cpu_s) * 1000 / runs, 4),
        "server_cpu_share": round((last.server_cpu_s - first.server_cpu_s) / wall, 3),
        "generator_cpu_ms_per_run": round((last.generator_cpu_s - first.generator_cpu_s) * 1000 / runs, 4),
        "generator_cpu_share": round((last.generator_cpu_s - first.generator_cpu_s) / wall, 3),
        "postgres_cpu_ms_per_run": round((last.postgres_cpu_s - first.postgres_cpu_s) * 1000 / runs, 4),
        # Every process's CPU, ours included: well above server + generator (+ postgres) means others were busy.
        "machine_cpu_share": round((last.machine_busy_s - first.machine_busy_s) / wall, 3),
    }


async def hold_idle(args: argparse.Namespace, tokens: list[str]) -> None:
    connections = await open_connections(args.url, tokens, args.connections)
    print(json.dumps({"open": len(connections)}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await asyncio.gather(*(ws.close() for ws in connections))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    modes = parser.add_subparsers(dest="mode", required=True)
    runs = modes.add_parser("runs", help="conversations for a fixed duration; prints the figures as JSON")
    runs.add_argument("url")
    runs.add_argument("--conversations", type=int, required=True)
    runs.add_argument("--warmup", type=float, required=True, help="seconds before the window opens")
    runs.add_argument("--duration", type=float, required=True, help="seconds the window stays open")
    runs.add_argument("--content", required=True, help="the user_message every run sends")
    runs.add_argument("--server-pid", type=int, required=True, help="whose CPU time to read at the edges")
    runs.add_argument("--postgres-cpu", action="store_true", help="also read the CPU time of postgres")
    idle = modes.add_parser("idle", help="hold idle connections until a line arrives on stdin")
    idle.add_argument("url")
    idle.add_argument("--connections", type=int, required=True)
    for mode in (runs, idle):
        mode.add_argument("--tokens-file", type=Path, help="JSON list of access tokens")
    args = parser.parse_args()
    tokens: list[str] = json.loads(args.tokens_file.read_text()) if args.tokens_file else []
    raise_open_file_limit()
    failures: list[BaseException] = []
    try:
        if args.mode == "runs":
            print(json.dumps(uvloop.run(measure_runs(args, tokens))), flush=True)
        else:
            uvloop.run(hold_idle(args, tokens))
    except* LoadError as group:  # anything else ends the process with its traceback
        failures.extend(group.exceptions)
    for failure in failures:
        print(f"ws_load: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
