"""Nothing lost when the connection drops or the server restarts: `subscribe {after_seq}` resumes exactly once,
in order (the delivery guarantee of API.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from parley.settings import Settings
from tests.conftest import TEST_JWT_SECRET, SettingsFactory
from tests.support.clients import register
from tests.support.conversation import TERMINAL, Chat, assert_contiguous
from tests.support.live import LiveServer, ServerProcess, wait_for


@pytest.fixture
def settings(make_settings: SettingsFactory) -> Settings:
    return make_settings(builtin_token_delay_s=0.05)  # long enough to drop mid-run


def slow_server_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a `parley serve` process whose runs stream slowly enough to be interrupted."""
    return {"PARLEY_ENV": "test", "PARLEY_DATABASE_URL": settings.effective_database_url,
            "PARLEY_DATA_DIR": str(settings.data_dir), "PARLEY_JWT_SECRET": TEST_JWT_SECRET,
            "PARLEY_LOG_FORMAT": "json", "PARLEY_BUILTIN_TOKEN_DELAY_S": "0.5", "PARLEY_AUTO_MIGRATE": "true",
            "PARLEY_PASSWORD_HASH_MEMORY_KIB": "1024", "PARLEY_ANALYTICS": "off", **extra}


def full_log(ws_url: str, account: Any, thread_id: str, last_type: set[str] = TERMINAL) -> list[dict[str, Any]]:
    with Chat(ws_url, account) as chat:
        chat.send("subscribe", {"thread_id": thread_id, "after_seq": 0})
        return [m for m in chat.until(lambda m: m["type"] in last_type) if "seq" in m]


def test_drop_after_agent_started_then_resume_gets_the_rest_exactly_once(live_server: LiveServer,
                                                                       client: httpx.Client) -> None:
    account = register(client)
    with Chat(live_server.ws_url, account) as chat:
        chat.send("user_message", {"content": "tell me something long about nothing in particular"})
        before = chat.until(lambda m: m["type"] == "agent_started")
    thread_id = before[0]["payload"]["thread"]["id"]
    last_seq = before[-1]["seq"]
    # While the client is away the run goes on and its events are stored.
    with Chat(live_server.ws_url, account) as chat:
        chat.send("subscribe", {"thread_id": thread_id, "after_seq": last_seq})
        ack = chat.recv()
        assert ack["type"] == "ack" and ack["payload"]["after_seq"] == last_seq
        rest = chat.run_to_end()
    assert all("seq" in m for m in rest)
    assert_contiguous(rest, last_seq)
    assert rest[-1]["type"] == "agent_completed"
    everything = full_log(live_server.ws_url, account, thread_id)
    assert [m["seq"] for m in everything] == list(range(1, rest[-1]["seq"] + 1))
    assert everything[last_seq:] == rest  # identical envelopes, live or replayed


def test_resume_while_the_run_is_still_appending_has_no_gap_or_duplicate(live_server: LiveServer,
                                                                        client: httpx.Client) -> None:
    """Many reconnects at random points of one run: each sees a contiguous tail."""
    account = register(client)
    with Chat(live_server.ws_url, account) as chat:
        chat.send("user_message", {"content": "a long answer please, with many many words in it"})
        first = chat.until(lambda m: m["type"] == "agent_started")
    thread_id = first[0]["payload"]["thread"]["id"]
    after = first[-1]["seq"]
    while True:
        with Chat(live_server.ws_url, account) as chat:
            chat.send("subscribe", {"thread_id": thread_id, "after_seq": after})
            chat.recv()  # ack
            got = [chat.recv()]
            if got[-1]["type"] not in TERMINAL:
                got.append(chat.recv())  # take two, then drop the connection mid-stream
        assert_contiguous(got, after)
        after = got[-1]["seq"]
        if got[-1]["type"] in TERMINAL:
            break
    assert full_log(live_server.ws_url, account, thread_id)[-1]["seq"] == after


def test_server_restart_mid_run_interrupts_it_and_its_events_replay(settings: Settings, tmp_path: Path) -> None:
    env = slow_server_env(settings, PARLEY_RUN_LEASE_S="1")
    server = ServerProcess(env, tmp_path / "first.log").start()
    with httpx.Client(base_url=server.url) as client:
        account = register(client)
    with Chat(server.ws_url, account) as chat:
        chat.send("user_message", {"content": "say something slowly please"})
        seen = chat.until(lambda m: m["type"] == "agent_delta")
    server.kill()  # a crash: no graceful shutdown, the run is left `running`
    thread_id, run_id = seen[0]["payload"]["thread"]["id"], seen[1]["payload"]["run_id"]
    last_seq = seen[-1]["seq"]

    restarted = ServerProcess(env, tmp_path / "second.log", port=server.port).start()
    try:
        with httpx.Client(base_url=restarted.url) as client:
            wait_for(lambda: client.get(f"/api/runs/{run_id}", headers=account.headers).json()["status"]
                     == "interrupted", timeout=15, message="the orphaned run to be interrupted")
            run = client.get(f"/api/runs/{run_id}", headers=account.headers).json()
            assert run["error"]["code"] == "interrupted" and run["finished_at"]
        with Chat(restarted.ws_url, account) as chat:
            chat.send("subscribe", {"thread_id": thread_id, "after_seq": last_seq})
            chat.recv()  # ack
            rest = chat.run_to_end(run_id)
        assert_contiguous(rest, last_seq)
        assert rest[-1]["type"] == "agent_error"
        assert rest[-1]["payload"]["error"]["code"] == "interrupted"
        assert [m for m in rest if m["type"] in TERMINAL] == [rest[-1]]
    finally:
        restarted.terminate()


def test_graceful_shutdown_interrupts_running_runs_with_their_terminal_event(settings: Settings,
                                                                             tmp_path: Path) -> None:
    env = slow_server_env(settings)
    server = ServerProcess(env, tmp_path / "serve.log").start()
    with httpx.Client(base_url=server.url) as client:
        account = register(client)
    with Chat(server.ws_url, account) as chat:
        chat.send("user_message", {"content": "say something slowly please"})
        seen = chat.until(lambda m: m["type"] == "agent_delta")
        assert server.terminate() == 0
    thread_id, run_id = seen[0]["payload"]["thread"]["id"], seen[1]["payload"]["run_id"]
    restarted = ServerProcess(env, tmp_path / "again.log", port=server.port).start()
    try:
        with httpx.Client(base_url=restarted.url) as client:
            run = client.get(f"/api/runs/{run_id}", headers=account.headers).json()
        assert run["status"] == "interrupted"  # ended by the stopping server itself, not by a sweep
        log = full_log(restarted.ws_url, account, thread_id)
        assert log[-1]["type"] == "agent_error" and log[-1]["payload"]["error"]["code"] == "interrupted"
        assert [m["seq"] for m in log] == list(range(1, len(log) + 1))
    finally:
        restarted.terminate()
