"""The built-in tools on their own and through the real dispatcher; search on a real, migrated database.

The search tests prove the isolation a user relies on: another user's messages never come back (pattern 9).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from parley.agents.context import UserExecutionContext
from parley.llm.base import ToolCall
from parley.storage.database import Database
from parley.storage.migrate import upgrade
from parley.storage.models import Message, Thread, User
from parley.tools.base import Tool, ToolRegistry, tool_spec
from parley.tools.builtin import CalculatorTool, CurrentTimeTool, SearchThreadsTool, snippet
from parley.tools.dispatcher import ToolDispatcher, ToolOutcome
from tests.conftest import SettingsFactory

MOMENT = datetime(2026, 11, 29, 14, 5, 30, tzinfo=UTC)  # a Sunday


def context(user_id: str = "user-a") -> UserExecutionContext:
    return UserExecutionContext(user_id=user_id, thread_id="thread", run_id="run", request_id="req",
                                agent="assistant")


async def call(tools: list[Tool], name: str, arguments: dict[str, Any], user_id: str = "user-a") -> ToolOutcome:
    """Runs a tool the way a run does: through the dispatcher, which validates arguments with `Params`."""
    registry = ToolRegistry(tools)
    dispatcher = ToolDispatcher(context(user_id), registry.select([tool.name for tool in tools]))
    return await dispatcher.execute(ToolCall(id="call_1", name=name, arguments=orjson.dumps(arguments).decode()))


# --- current_time ---------------------------------------------------------------------------------------------


async def test_current_time_defaults_to_utc() -> None:
    outcome = await call([CurrentTimeTool(now=lambda: MOMENT)], "current_time", {})

    assert outcome.ok, outcome.error
    assert outcome.result == {"timezone": "UTC", "iso": "2026-11-29T14:05:30+00:00",
                              "human": "14:05 UTC on Sunday 29 November 2026"}


@pytest.mark.parametrize(("zone", "iso", "human"), [
    ("Europe/Paris", "2026-11-29T15:05:30+01:00", "15:05 CET on Sunday 29 November 2026"),
    ("America/New_York", "2026-11-29T09:05:30-05:00", "09:05 EST on Sunday 29 November 2026"),
    ("Asia/Kolkata", "2026-11-29T19:35:30+05:30", "19:35 IST on Sunday 29 November 2026"),
    ("Pacific/Kiritimati", "2026-11-30T04:05:30+14:00", "04:05 +14 on Monday 30 November 2026"),
])
async def test_current_time_in_a_zone(zone: str, iso: str, human: str) -> None:
    outcome = await call([CurrentTimeTool(now=lambda: MOMENT)], "current_time", {"timezone": zone})

    assert outcome.ok, outcome.error
    assert outcome.result == {"timezone": zone, "iso": iso, "human": human}


@pytest.mark.parametrize("zone", ["Mars/Olympus_Mons", "../../etc/passwd", "/etc/localtime", "Not a zone"])
async def test_current_time_refuses_unknown_zones_plainly(zone: str) -> None:
    outcome = await call([CurrentTimeTool()], "current_time", {"timezone": zone})

    assert not outcome.ok
    assert outcome.error is not None and "unknown time zone" in outcome.error


async def test_current_time_uses_the_real_clock_by_default() -> None:
    before = datetime.now(UTC)
    outcome = await call([CurrentTimeTool()], "current_time", {"timezone": "UTC"})

    moment = datetime.fromisoformat(outcome.result["iso"])
    assert before - timedelta(seconds=1) <= moment <= datetime.now(UTC) + timedelta(seconds=1)


# --- calculator -----------------------------------------------------------------------------------------------


async def test_calculator_returns_expression_and_result() -> None:
    outcome = await call([CalculatorTool()], "calculator", {"expression": " 12 * (3 + 4) / 2 "})

    assert outcome.ok, outcome.error
    assert outcome.result == {"expression": "12 * (3 + 4) / 2", "result": 42}


async def test_calculator_gives_huge_integers_as_exact_strings() -> None:
    outcome = await call([CalculatorTool()], "calculator", {"expression": "2 ** 100"})

    assert outcome.result == {"expression": "2 ** 100", "result": str(2**100)}


@pytest.mark.parametrize(("arguments", "error"), [
    ({"expression": "1 / 0"}, "division by zero"),
    ({"expression": "9 ** 9 ** 9"}, "exponents are limited"),
    ({"expression": "__import__('os')"}, "the only functions"),
    ({"expression": "1+" * 150 + "1"}, "invalid arguments: expression"),
    ({}, "invalid arguments: expression"),
    ({"expression": "1", "extra": True}, "invalid arguments: extra"),
])
async def test_calculator_failures_are_plain_tool_errors(arguments: dict[str, Any], error: str) -> None:
    outcome = await call([CalculatorTool()], "calculator", arguments)

    assert not outcome.ok
    assert outcome.error is not None and error in outcome.error


def test_every_tool_describes_itself_for_users_and_models() -> None:
    tools: list[Tool] = [CurrentTimeTool(), CalculatorTool(), SearchThreadsTool(database=None)]  # type: ignore[arg-type]
    for tool in tools:
        spec = tool_spec(tool)
        assert len(spec.description) > 40
        assert spec.parameters["type"] == "object"
        assert all(field.get("description") for field in spec.parameters["properties"].values())
        assert 0 < tool.timeout_s <= 10
        assert tool.admin_only is False


# --- search_threads -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class World:
    database: Database
    tool: SearchThreadsTool


@pytest.fixture
async def world(make_settings: SettingsFactory) -> AsyncIterator[World]:
    database = Database(make_settings())
    await upgrade(database)
    async with database.session() as session, session.begin():
        for user_id in ("user-a", "user-b"):
            session.add(User(id=user_id, email=f"{user_id}@example.com", password_hash="x",
                             display_name=user_id, role="user", created_at=MOMENT, thread_count=0))
    yield World(database, SearchThreadsTool(database))
    await database.dispose()


async def add_thread(world: World, user_id: str, title: str, messages: list[tuple[str, str]],
                     start: datetime = MOMENT) -> list[str]:
    """Stores a thread with `(role, content)` messages a minute apart; returns the message ids."""
    thread_id = f"{user_id}-{title}"[:26]
    ids = []
    async with world.database.session() as session, session.begin():
        session.add(Thread(id=thread_id, user_id=user_id, title=title, meta={}, created_at=start,
                           updated_at=start, message_count=len(messages), last_seq=0))
        await session.flush()
        for index, (role, content) in enumerate(messages):
            message_id = f"{thread_id}-{index}"[-26:]
            session.add(Message(id=message_id, thread_id=thread_id, user_id=user_id, role=role, content=content,
                                created_at=start + timedelta(minutes=index), meta={}))
            ids.append(message_id)
    return ids


async def search(world: World, user_id: str, query: str, limit: int | None = None) -> ToolOutcome:
    arguments: dict[str, Any] = {"query": query} if limit is None else {"query": query, "limit": limit}
    outcome = await call([world.tool], "search_threads", arguments, user_id=user_id)
    assert outcome.ok, outcome.error
    return outcome


async def test_search_finds_every_word_case_insensitively_newest_first(world: World) -> None:
    ids = await add_thread(world, "user-a", "Holiday", [
        ("user", "Should we book the Paris flights for December?"),
        ("assistant", "Yes: the flights to PARIS are cheaper in early December."),
        ("user", "Paris hotels are another matter."),
    ])

    outcome = await search(world, "user-a", "paris  DECEMBER")

    assert outcome.result["query"] == "paris DECEMBER"
    matches = outcome.result["matches"]
    assert [match["message_id"] for match in matches] == [ids[1], ids[0]]
    assert matches[0] == {"thread_id": "user-a-Holiday", "thread_title": "Holiday", "message_id": ids[1],
                          "role": "assistant",
                          "snippet": "Yes: the flights to PARIS are cheaper in early December.",
                          "created_at": "2026-11-29T14:06:30.000Z"}


async def test_pattern9_search_never_returns_another_users_messages(world: World) -> None:
    await add_thread(world, "user-a", "Secrets", [("user", "my bank password hint is pineapple")])
    b_ids = await add_thread(world, "user-b", "Fruit", [("user", "I like pineapple on pizza")])

    as_b = await search(world, "user-b", "pineapple", limit=20)
    as_a = await search(world, "user-a", "pizza")
    as_b_for_a_words = await search(world, "user-b", "bank password")

    assert [match["message_id"] for match in as_b.result["matches"]] == b_ids
    assert all("bank" not in match["snippet"] for match in as_b.result["matches"])
    assert as_a.result["matches"] == []
    assert as_b_for_a_words.result["matches"] == []


async def test_search_wildcards_are_literal(world: World) -> None:
    ids = await add_thread(world, "user-a", "Percent", [
        ("user", "growth was 100% this year"),
        ("user", "growth was 1000 this year"),
        ("user", "the file is report_final.pdf"),
        ("user", "the file is reportXfinal.pdf"),
        ("user", r"the path is C:\temp\notes"),
        ("user", "the path is C:tempnotes"),
    ])

    percent = await search(world, "user-a", "100%")
    underscore = await search(world, "user-a", "report_final")
    backslash = await search(world, "user-a", r"C:\temp")
    only_wildcards = await search(world, "user-a", "%")

    assert [m["message_id"] for m in percent.result["matches"]] == [ids[0]]
    assert [m["message_id"] for m in underscore.result["matches"]] == [ids[2]]
    assert [m["message_id"] for m in backslash.result["matches"]] == [ids[4]]
    assert [m["message_id"] for m in only_wildcards.result["matches"]] == [ids[0]]


async def test_search_respects_the_limit(world: World) -> None:
    ids = await add_thread(world, "user-a", "Many", [("user", f"note number {i} about kiwis") for i in range(12)])

    default = await search(world, "user-a", "kiwis")
    three = await search(world, "user-a", "kiwis", limit=3)

    assert [m["message_id"] for m in default.result["matches"]] == list(reversed(ids))[:5]
    assert [m["message_id"] for m in three.result["matches"]] == list(reversed(ids))[:3]


async def test_search_skips_tool_and_system_messages(world: World) -> None:
    ids = await add_thread(world, "user-a", "Tools", [
        ("user", "remind me about mangoes"),
        ("tool", '{"ok":true,"result":{"matches":["mangoes"]}}'),
        ("system", "mangoes are a test fixture"),
    ])

    outcome = await search(world, "user-a", "mangoes")

    assert [m["message_id"] for m in outcome.result["matches"]] == [ids[0]]


@pytest.mark.parametrize(("arguments", "error"), [
    ({"query": ""}, "invalid arguments: query"),
    ({"query": "x" * 201}, "invalid arguments: query"),
    ({"query": "ok", "limit": 0}, "invalid arguments: limit"),
    ({"query": "ok", "limit": 21}, "invalid arguments: limit"),
    ({"query": "   "}, "no words"),
])
async def test_search_refuses_bad_arguments(world: World, arguments: dict[str, Any], error: str) -> None:
    outcome = await call([world.tool], "search_threads", arguments)

    assert not outcome.ok
    assert outcome.error is not None and error in outcome.error


async def test_search_snippet_is_bounded_and_shows_the_hit(world: World) -> None:
    long_text = "word " * 100 + "the KEYSTONE detail " + "tail " * 100
    await add_thread(world, "user-a", "Long", [("user", long_text)])

    outcome = await search(world, "user-a", "keystone")

    [match] = outcome.result["matches"]
    assert len(match["snippet"]) <= 160
    assert "KEYSTONE" in match["snippet"]
    assert match["snippet"].startswith("…") and match["snippet"].endswith("…")


def test_snippet_edges() -> None:
    assert snippet("short  text\n here", ["text"]) == "short text here"
    text = "needle " + "x" * 300
    assert snippet(text, ["needle"]).startswith("needle") and len(snippet(text, ["needle"])) == 160
    text = "x" * 300 + " needle"
    assert snippet(text, ["needle"]).endswith("needle") and len(snippet(text, ["needle"])) == 160
    assert len(snippet("y" * 500, ["absent"])) == 160
