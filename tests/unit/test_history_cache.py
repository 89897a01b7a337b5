"""The run history cache follows the event log exactly, and lets go when another writer got in between."""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

from parley.agents.history import HistoryCache
from parley.agents.runs import RunManager
from parley.llm.base import ChatMessage
from parley.realtime.event_log import WriteRequest
from parley.realtime.events import StoredEvent

NOW = datetime(2026, 11, 29, tzinfo=UTC)


def commit(thread: str, seqs: range, messages: list[tuple[str, str]]) -> list[tuple[Any, list[StoredEvent]]]:
    request = WriteRequest.__new__(WriteRequest)  # only its rows are read; no future is needed
    request.messages = [{"id": f"m-{text}", "thread_id": thread, "role": role, "content": text}
                        for role, text in messages]
    return [(request, [StoredEvent.make(thread, seq, None, "x", {}, NOW) for seq in seqs])]


def test_appends_in_step_and_drops_on_a_gap() -> None:
    cache = HistoryCache(max_threads=10, limit=3)
    assert cache.get("t") is None
    cache.put("t", [("m-a", ChatMessage("user", "a"))], last_seq=5)
    cache.observe(commit("t", range(6, 8), [("user", "b"), ("tool", "ignored")]))
    cache.observe(commit("t", range(8, 11), [("assistant", "c"), ("user", "d")]))
    assert [(message_id, m.content) for message_id, m in cache.get("t") or ()] == [
        ("m-b", "b"), ("m-c", "c"), ("m-d", "d")]  # bounded to the newest three
    cache.observe(commit("t", range(13, 14), [("user", "e")]))  # seq 11 and 12 were written elsewhere
    assert cache.get("t") is None


def test_a_copy_older_than_a_seen_commit_is_not_kept() -> None:
    cache = HistoryCache()
    cache.observe(commit("t", range(1, 4), [("user", "a")]))  # committed while the database was being read
    cache.put("t", [], last_seq=0)
    assert cache.get("t") is None
    cache.put("t", [("m-a", ChatMessage("user", "a"))], last_seq=3)
    assert cache.get("t") == (("m-a", ChatMessage("user", "a")),)


def test_the_number_of_threads_is_bounded() -> None:
    cache = HistoryCache(max_threads=2)
    for thread in ("a", "b", "c"):
        cache.put(thread, [], last_seq=1)
    assert cache.get("a") is None and cache.get("c") == ()


async def history_for(items: list[tuple[str, ChatMessage]], message_id: str, content: str) -> list[str]:
    """What RunManager._history gives a run whose message is `message_id`, the thread's cache holding `items`."""
    manager = RunManager.__new__(RunManager)
    manager.history = HistoryCache()
    manager.history.put("t", items, last_seq=len(items))
    ctx = SimpleNamespace(thread_id="t")
    chats = await manager._history(ctx, SimpleNamespace(id=message_id, content=content))  # type: ignore[arg-type]
    return [f"{chat.role}:{chat.content}" for chat in chats]


async def test_a_run_sees_the_thread_up_to_its_own_message_with_earlier_answers_before_it() -> None:
    q1, a1 = ("m-q1", ChatMessage("user", "q1")), ("m-a1", ChatMessage("assistant", "a1"))
    q2, q3 = ("m-q2", ChatMessage("user", "q2")), ("m-q3", ChatMessage("user", "q3"))
    # Typed ahead: q2 and q3 were stored while q1's run answered; a1 was stored after them.
    assert await history_for([q1, q2, q3, a1], "m-q2", "q2") == ["user:q1", "assistant:a1", "user:q2"]
    # Started before its message was stored: the message is added.
    assert await history_for([q1, a1], "m-q2", "q2") == ["user:q1", "assistant:a1", "user:q2"]
    # The usual case: its message is the newest.
    assert await history_for([q1, a1, q2], "m-q2", "q2") == ["user:q1", "assistant:a1", "user:q2"]
