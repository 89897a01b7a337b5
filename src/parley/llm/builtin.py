"""The offline, deterministic provider: picks tools by simple intent rules and words answers from their results.
Owns those rules, the answer wording and the word-by-word streaming; the same request always streams the same.

A turn is everything after the last `user` message. With no tool results yet, the provider asks for tools
(only among `request.tools`); once an assistant message with `tool_calls` is followed by `tool` messages, it
answers from them and never asks again in that turn. Each tool message's content is JSON of the shape

    {"ok": true,  "result": <the tool's JSON result>, "error": null}
    {"ok": false, "result": null, "error": "<plain message>"}

(`parley.llm.base.tool_message_content` writes it). The tool is found through `tool_call_id` in the
assistant's `tool_calls`.
Content that is JSON without an `ok` key is read as a successful result; content that is not JSON, as a failure.
"""

from __future__ import annotations

import asyncio
import functools
import math
import re
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson

from parley.llm.base import (
    ChatMessage,
    LLMChunk,
    LLMRequest,
    ProviderHealth,
    TextDelta,
    ToolCall,
    Usage,
)

CURRENT_TIME = "current_time"
CALCULATOR = "calculator"
SEARCH_THREADS = "search_threads"
USAGE_REPORT = "usage_report"
HEALTH_REPORT = "health_report"
SLO_STATUS = "slo_status"
ERROR_PATTERNS = "error_patterns"
OPS_TOOLS = (HEALTH_REPORT, SLO_STATUS, ERROR_PATTERNS)
MAX_ECHO_CHARS = 200

_TIME_WORDS = re.compile(
    r"\b(?:time|clock|date|today|tonight|o'clock|time\s*zone|what\s+day|which\s+day|day\s+is\s+it)\b", re.I)
_SEARCH_WORDS = re.compile(
    r"\b(?:search(?:\s+(?:for|my|through))?|find|look(?:ing)?\s+(?:for|up)|look\s+through|"
    r"did\s+i\s+(?:ever\s+)?(?:mention|say|write|talk\s+about|ask\s+about)|"
    r"(?:do\s+you\s+)?remember|recall)\b", re.I)
_CALCULATION_WORDS = re.compile(
    r"\b(?:calculate|compute|evaluate|solve|what\s+is|what's|whats|how\s+much\s+is)\b|=", re.I)
_USAGE_WORDS = re.compile(
    r"\b(?:tokens?|usage|how\s+much\s+(?:did\s+i\s+)?(?:spend|spent|cost)|my\s+(?:spend|costs?|bill))\b", re.I)
_HEALTH_WORDS = re.compile(r"\b(?:health|healthy|unhealthy|status|down|components?|outage)\b", re.I)
_SLO_WORDS = re.compile(r"\b(?:slos?|objectives?|budgets?|burn(?:ing|\s+rate)?|availability|alerts?)\b", re.I)
_ERROR_WORDS = re.compile(r"\b(?:errors?|fail(?:ing|ures?|ed)?|broken|wrong|patterns?|exceptions?)\b", re.I)
_PERIODS = (("today", re.compile(r"\btoday\b", re.I)), ("month", re.compile(r"\bmonth\b", re.I)),
            ("year", re.compile(r"\byear\b", re.I)))
_ZONE = re.compile(r"\b[A-Za-z]+(?:/[A-Za-z0-9_+\-]+)+\b")
_UTC = re.compile(r"\b(?:UTC|GMT)\b", re.I)
# Dates and clock times look like arithmetic (2026-11-29, 10/12/2026, 14:05) but are not.
_NOT_ARITHMETIC = re.compile(r"\b\d{1,4}[-/.]\d{1,2}[-/.]\d{1,4}\b|\b\d{1,2}:\d{2}\b")
_SPOKEN_OPERATORS = (
    (re.compile(r"(?<=[\d)])\s+(?:plus)\s+(?=[-+(\d.])", re.I), " + "),
    (re.compile(r"(?<=[\d)])\s+(?:minus)\s+(?=[-+(\d.])", re.I), " - "),
    (re.compile(r"(?<=[\d)])\s+(?:times|x|multiplied\s+by)\s+(?=[-+(\d.])", re.I), " * "),
    (re.compile(r"(?<=[\d)])\s+(?:divided\s+by)\s+(?=[-+(\d.])", re.I), " / "),
    (re.compile(r"(?<=[\d)])\s+(?:to\s+the\s+power\s+of)\s+(?=[-+(\d.])", re.I), " ** "),
    (re.compile(r"(?<=[\d)])\s+(?:mod|modulo)\s+(?=[-+(\d.])", re.I), " % "),
)
_FUNCTION_NAMES = r"\b(?:sqrt|abs|round|min|max)\b"
_EXPRESSION_RUN = re.compile(
    rf"(?:{_FUNCTION_NAMES}|\bpi\b|\d[\d_]*(?:\.\d+)?|\.\d+|\*\*|//|[-+*/%^\u00d7\u00f7\u2212(),.]|[ \t])+", re.I)
_BINARY_OPERATION = re.compile(
    rf"(?:[\d)]|\bpi\b)\s*(?:\*\*|//|[-+*/%^\u00d7\u00f7\u2212])\s*(?:[-+(\d.]|{_FUNCTION_NAMES}|\bpi\b)", re.I)
_FUNCTION_CALL = re.compile(rf"{_FUNCTION_NAMES}\s*\(", re.I)
# Only '-' and '/' also join numbers that are not sums: phone numbers, ranges, fractions of a page.
_PLAINLY_ARITHMETIC = re.compile(rf"[+*%^\u00d7\u00f7]|{_FUNCTION_NAMES}", re.I)
_WORD = re.compile(r"[\w][\w'\u2019\-.@#+]*")
_STOPWORDS = frozenset(re.findall(r"\S+", """
    a an the i i'm i've me my mine you your yours we our us it its is are was were be been am do does did
    can could would should will shall may might must please pls kindly any anything something some
    about for of in on at to from by with and or but if then than that this these those there here
    what what's whats when where which who whom whose why how
    mention mentioned mentioning say said saying write wrote written talk talked talking ask asked
    tell told earlier before previously ago ever once again all every last recent recently
    message messages thread threads chat chats conversation conversations history
    search searching find finding look looking up through remember recall
    """))
_TOKEN = re.compile(r"\S+\s*|\s+")


@dataclass(frozen=True, slots=True)
class ToolResult:
    """One tool outcome as the provider reads it back from the conversation."""

    tool: str
    ok: bool
    result: Any = None
    error: str | None = None
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Turn:
    """What the provider needs from the conversation: the user's words and any tool results for them."""

    number: int  # how many user messages the conversation has; keeps tool call ids distinct across turns
    user_text: str
    asked_for_tools: bool
    results: tuple[ToolResult, ...]


class BuiltinProvider:
    """Offline and deterministic: no network, no randomness; for development, demos and tests."""

    name = "builtin"

    def __init__(self, token_delay_s: float, model: str = "parley-builtin") -> None:
        if token_delay_s < 0 or not math.isfinite(token_delay_s):
            raise ValueError("token_delay_s must be a finite number of seconds, 0 or more")
        self.model = model
        self._token_delay_s = token_delay_s

    async def stream(self, request: LLMRequest) -> AsyncIterator[LLMChunk]:
        started = time.perf_counter()
        first_chunk_ms: float | None = None
        turn = read_turn(request.messages)
        offered = {spec.name for spec in request.tools}
        calls = () if turn.asked_for_tools else plan_tool_calls(turn, offered)
        output_tokens = 0
        if calls:
            for call in calls:
                if first_chunk_ms is None:
                    first_chunk_ms = _elapsed_ms(started)
                output_tokens += len(f"{call.name} {call.arguments}".split())
                yield call
        else:
            answer = compose_answer(turn.results) if turn.asked_for_tools else default_reply(turn.user_text, offered)
            tokens = split_tokens(answer)
            if request.max_output_tokens is not None:
                tokens = tokens[: request.max_output_tokens]
            for index, token in enumerate(tokens):
                if index and self._token_delay_s > 0:
                    await asyncio.sleep(self._token_delay_s)
                if first_chunk_ms is None:
                    first_chunk_ms = _elapsed_ms(started)
                output_tokens += 1
                yield TextDelta(token)
        yield Usage(input_tokens=prompt_tokens(request), output_tokens=output_tokens, model=self.model,
                    time_to_first_token_ms=first_chunk_ms)

    async def probe(self) -> ProviderHealth:
        started = time.perf_counter()
        # A real (if trivial) pass through the intent rules, so a broken provider would not report ok.
        plan_tool_calls(Turn(1, "what is 1 + 1", False, ()), {CALCULATOR})
        return ProviderHealth(ok=True, latency_ms=round(_elapsed_ms(started), 3), detail="offline",
                              extra={"model": self.model})

    async def aclose(self) -> None:
        return None


def _elapsed_ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000


def split_tokens(text: str) -> list[str]:
    """Words with their trailing whitespace; joined they give `text` back exactly."""
    return _TOKEN.findall(text)


def prompt_tokens(request: LLMRequest) -> int:
    """An approximation of the prompt's size in tokens: its words, tool calls and tool descriptions included."""
    words = sum(map(_word_count, [message.content for message in request.messages]))
    for message in request.messages:
        if message.tool_calls:
            words += sum(_word_count(f"{call.name} {call.arguments}") for call in message.tool_calls)
    return words + sum(_spec_word_count(spec.name, spec.description) for spec in request.tools)


@functools.lru_cache(maxsize=4096)
def _word_count(text: str) -> int:
    """Cached: a thread's history is counted again on every call, mostly the same strings."""
    return len(text.split())


@functools.lru_cache(maxsize=256)
def _spec_word_count(name: str, description: str) -> int:
    """A tool's name and description, counted once (every call offers the same few tools)."""
    return _word_count(f"{name} {description}")


# --- reading the conversation ---------------------------------------------------------------------------------


def read_turn(messages: Sequence[ChatMessage]) -> Turn:
    user_indexes = [index for index, message in enumerate(messages) if message.role == "user"]
    last_user = user_indexes[-1] if user_indexes else -1
    after = messages[last_user + 1:]
    user_text = messages[last_user].content if user_indexes else ""
    asking = [index for index, message in enumerate(after) if message.role == "assistant" and message.tool_calls]
    if not asking:
        return Turn(len(user_indexes), user_text, False, ())
    # Only the latest request for tools counts: its results are the ones to answer from.
    request = after[asking[-1]]
    calls = {call.id: call for call in request.tool_calls}
    results = tuple(_read_result(message, calls) for message in after[asking[-1] + 1:] if message.role == "tool")
    return Turn(len(user_indexes), user_text, True, results)


def _read_result(message: ChatMessage, calls: dict[str, ToolCall]) -> ToolResult:
    call = calls.get(message.tool_call_id or "")
    arguments = _json_object(call.arguments) if call else {}
    try:
        payload = orjson.loads(message.content)
    except orjson.JSONDecodeError:
        payload = {"ok": False, "error": "the tool's result could not be read"}
    if not isinstance(payload, dict) or "ok" not in payload:
        payload = {"ok": True, "result": payload}
    tool = call.name if call else str(payload.get("tool") or "unknown")
    error = payload.get("error")
    return ToolResult(tool=tool, ok=bool(payload.get("ok")), result=payload.get("result"),
                      error=str(error) if error is not None else None, arguments=arguments)


def _json_object(raw: str) -> dict[str, Any]:
    try:
        value = orjson.loads(raw or "{}")
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


# --- choosing tools -------------------------------------------------------------------------------------------


def plan_tool_calls(turn: Turn, offered: set[str]) -> tuple[ToolCall, ...]:
    """The tools the user's words ask for, among those offered, as calls with ids `call_<turn>_<n>`."""
    text = turn.user_text
    planned: list[tuple[str, dict[str, Any]]] = []
    ops = [tool for tool in OPS_TOOLS if tool in offered]
    if ops:
        return _ops_calls(turn, offered)
    expression = extract_expression(text)
    wants_search = _SEARCH_WORDS.search(text) is not None
    if USAGE_REPORT in offered and not wants_search and _USAGE_WORDS.search(text):
        period = next((name for name, pattern in _PERIODS if pattern.search(text)), "week")
        group_by = "agent" if re.search(r"\bagents?\b", text, re.I) else \
            "day" if re.search(r"\b(?:day|daily|per\s+day)\b", text, re.I) else "model"
        planned.append((USAGE_REPORT, {"period": period, "group_by": group_by}))
        expression = None
    if CURRENT_TIME in offered and not wants_search and _TIME_WORDS.search(text):
        zone = extract_zone(text)
        planned.append((CURRENT_TIME, {"timezone": zone} if zone else {}))
    if CALCULATOR in offered and expression:
        planned.append((CALCULATOR, {"expression": expression}))
    if SEARCH_THREADS in offered and wants_search:
        keywords = search_keywords(text.replace(expression, " ") if expression else text)
        if keywords:
            planned.append((SEARCH_THREADS, {"query": keywords}))
    return tuple(
        ToolCall(id=f"call_{turn.number}_{index}", name=name, arguments=orjson.dumps(arguments).decode())
        for index, (name, arguments) in enumerate(planned, start=1)
    )


def _ops_calls(turn: Turn, offered: set[str]) -> tuple[ToolCall, ...]:
    """An operator's question: the tools its words point at, or the whole picture when they point at none."""
    wanted = [tool for tool, words in ((ERROR_PATTERNS, _ERROR_WORDS), (HEALTH_REPORT, _HEALTH_WORDS),
                                       (SLO_STATUS, _SLO_WORDS)) if tool in offered and words.search(turn.user_text)]
    if ERROR_PATTERNS in wanted and HEALTH_REPORT in offered and HEALTH_REPORT not in wanted:
        wanted.append(HEALTH_REPORT)  # "what is failing?" is also a question about components
    chosen = wanted or [tool for tool in OPS_TOOLS if tool in offered]
    return tuple(ToolCall(id=f"call_{turn.number}_{index}", name=name, arguments="{}")
                 for index, name in enumerate(chosen, start=1))


def extract_zone(text: str) -> str | None:
    """The first IANA zone named in `text` (`Europe/Paris`, also typed as `europe/paris`), or UTC if said."""
    for match in _ZONE.finditer(text):
        candidate = match.group(0)
        for spelling in (candidate, "/".join(_title_zone_part(part) for part in candidate.split("/"))):
            if _is_zone(spelling):
                return spelling
    return "UTC" if _UTC.search(text) else None


def _title_zone_part(part: str) -> str:
    return "_".join(piece.capitalize() for piece in part.split("_"))


def _is_zone(name: str) -> bool:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return False
    return True


def extract_expression(text: str) -> str | None:
    """The longest arithmetic expression in `text`, if the user seems to be asking for a calculation."""
    cleaned = _NOT_ARITHMETIC.sub(" ", text)
    for pattern, symbol in _SPOKEN_OPERATORS:
        cleaned = pattern.sub(symbol, cleaned)
    candidates = []
    for match in _EXPRESSION_RUN.finditer(cleaned):
        candidate = match.group(0).strip(" \t,.")
        if _BINARY_OPERATION.search(candidate) or _FUNCTION_CALL.search(candidate):
            candidates.append(candidate)
    if not candidates:
        return None
    expression = max(candidates, key=len)
    if _PLAINLY_ARITHMETIC.search(expression) or _CALCULATION_WORDS.search(text):
        return expression
    # Otherwise only a message that is mostly the expression counts ("call 555-1234" is not a subtraction).
    rest = cleaned.replace(expression, " ")
    return expression if len(_WORD.findall(rest)) <= 2 else None


def search_keywords(text: str) -> str:
    """The words of `text` worth searching for: the search phrasing and common words taken out."""
    stripped = _SEARCH_WORDS.sub(" ", text)
    keywords: list[str] = []
    for word in _WORD.findall(stripped):
        word = word.strip("'\u2019-.@#+")
        if word and word.lower() not in _STOPWORDS and word.lower() not in (k.lower() for k in keywords):
            keywords.append(word)
    return " ".join(keywords)


# --- wording answers ------------------------------------------------------------------------------------------


def compose_answer(results: Iterable[ToolResult]) -> str:
    parts = [_describe(result) for result in results]
    if not parts:
        return "I asked for a tool but got no result back, so I can't answer that yet."
    return " ".join(parts)


def _describe(result: ToolResult) -> str:
    if not result.ok:
        return _describe_failure(result)
    value = result.result if isinstance(result.result, dict) else {}
    if result.tool == CURRENT_TIME and "human" in value:
        zone = str(value.get("timezone", "UTC"))
        return f"It is {value['human']}." if zone in ("UTC", "Etc/UTC") else f"In {zone} it is {value['human']}."
    if result.tool == CALCULATOR and "result" in value:
        return f"{value.get('expression', result.arguments.get('expression', ''))} = {value['result']}."
    if result.tool == SEARCH_THREADS and isinstance(value.get("matches"), list):
        return _describe_matches(str(value.get("query", result.arguments.get("query", ""))), value["matches"])
    if result.tool == USAGE_REPORT and isinstance(value.get("items"), list):
        return _describe_usage(value)
    if result.tool == HEALTH_REPORT and isinstance(value.get("components"), dict):
        return _describe_health(value)
    if result.tool == SLO_STATUS and isinstance(value.get("slos"), list):
        return _describe_slos(value)
    if result.tool == ERROR_PATTERNS and isinstance(value.get("patterns"), list):
        return _describe_patterns(value)
    shown = orjson.dumps(result.result, default=str).decode()
    return f"The {result.tool} tool answered: {_shorten(shown, 300)}."


def _describe_matches(query: str, matches: list[Any]) -> str:
    if not matches:
        return f"I couldn't find any of your messages mentioning “{query}”."
    noun = "message" if len(matches) == 1 else "messages"
    found = []
    for match in matches:
        if not isinstance(match, dict):
            continue
        when = str(match.get("created_at", ""))[:10]
        found.append(f"“{match.get('snippet', '')}” (in “{match.get('thread_title', '')}”, {when})")
    return f"I found {len(matches)} {noun} mentioning “{query}”: " + "; ".join(found) + "."


def _describe_usage(report: dict[str, Any]) -> str:
    period = {"today": "Today", "week": "This week", "month": "This month", "year": "This year"}.get(
        str(report.get("period")), "In that period")
    raw_totals = report.get("totals")
    totals: dict[str, Any] = raw_totals if isinstance(raw_totals, dict) else {}
    runs = int(totals.get("runs", 0))
    if runs == 0:
        return f"{period} you have not used any tokens yet."
    tokens_in, tokens_out = int(totals.get("input_tokens", 0)), int(totals.get("output_tokens", 0))
    parts = [f"{item.get('key') or 'unknown'}: {int(item.get('input_tokens', 0)) + int(item.get('output_tokens', 0))}"
             f" tokens in {int(item.get('runs', 0))} run{'s' if int(item.get('runs', 0)) != 1 else ''}"
             for item in report["items"] if isinstance(item, dict)]
    by = {"model": "By model", "agent": "By agent", "day": "By day"}.get(str(report.get("group_by")), "In detail")
    cost = float(totals.get("cost_usd", 0.0))
    return (f"{period} you used {tokens_in + tokens_out} tokens ({tokens_in} in, {tokens_out} out) over {runs} "
            f"run{'s' if runs != 1 else ''}, costing ${cost:.4f}. {by}: " + "; ".join(parts) + ".")


def _describe_health(report: dict[str, Any]) -> str:
    components = report["components"]
    unhealthy = [f"{name} is {c.get('status')}" + (f" ({c['detail']})" if c.get("detail") else "")
                 for name, c in components.items()
                 if isinstance(c, dict) and c.get("status") not in ("healthy", "disabled")]
    if not unhealthy:
        return f"Every component is healthy ({', '.join(components)})."
    return f"The service is {report.get('status')}: " + "; ".join(unhealthy) + "."


def _percent(value: Any) -> str:
    return "no traffic" if value is None else f"{float(value) * 100:.2f}%"


def _describe_slos(report: dict[str, Any]) -> str:
    parts = []
    for slo in report["slos"]:
        if not isinstance(slo, dict):
            continue
        windows = slo.get("windows", {})
        five, month = windows.get("5m", {}), windows.get("30d", {})
        budget = slo.get("error_budget_remaining")
        budget_text = "" if budget is None else f", {float(budget) * 100:.1f}% of the 30-day error budget left"
        alert = " (ALERT FIRING)" if slo.get("alerting") else ""
        parts.append(f"{slo.get('name')}: {_percent(five.get('sli'))} over 5 minutes, {_percent(month.get('sli'))} "
                     f"over 30 days against {float(slo.get('objective', 0)) * 100:g}%{budget_text}{alert}")
    firing = report.get("alerts_firing") or []
    head = f"Alerts firing: {', '.join(firing)}. " if firing else "No SLO alert is firing. "
    return head + "; ".join(parts) + "."


def _describe_patterns(report: dict[str, Any]) -> str:
    patterns = [p for p in report["patterns"] if isinstance(p, dict)]
    total = int(report.get("total", 0))
    if not patterns:
        return "No warnings or errors were logged recently."
    ranked = [f"{index}. {p.get('template')} ({p.get('count')}x, {float(p.get('share', 0)) * 100:.0f}%"
              + (f", on {', '.join(list(p.get('routes') or {})[:2])}" if p.get("routes") else "") + ")"
              for index, p in enumerate(patterns, start=1)]
    return (f"{total} warnings and errors fall into {len(report['patterns'])} distinct patterns here; most "
            "frequent first: " + " ".join(ranked))


def _describe_failure(result: ToolResult) -> str:
    reason = (result.error or "it failed without saying why").rstrip(". ")
    if result.tool == CALCULATOR:
        expression = result.arguments.get("expression") or "that"
        return f"I couldn't calculate {expression}: {reason}."
    if result.tool == CURRENT_TIME:
        return f"I couldn't tell the time: {reason}."
    if result.tool == SEARCH_THREADS:
        return f"I couldn't search your messages: {reason}."
    if result.tool == USAGE_REPORT:
        return f"I couldn't look up your usage: {reason}."
    return f"The {result.tool} tool failed: {reason}."


_ABILITIES = (
    (CURRENT_TIME, "tell the time anywhere (try “what time is it in Asia/Tokyo?”)"),
    (CALCULATOR, "do arithmetic (“what is 12 * (3 + 4)?”)"),
    (SEARCH_THREADS, "search your earlier messages (“did I mention the budget?”)"),
    (USAGE_REPORT, "report your token usage (“how many tokens did I use this week?”)"),
)


def default_reply(user_text: str, offered: set[str]) -> str:
    """The answer when no tool applies: say what was heard and what this assistant can do."""
    heard = " ".join(user_text.split())
    opening = "Hello! I'm parley's built-in assistant, and I work offline."
    if heard:
        opening = f"You said: “{_shorten(heard, MAX_ECHO_CHARS)}”. I'm parley's built-in assistant, and I work offline."
    abilities = [text for tool, text in _ABILITIES if tool in offered]
    if not abilities:
        return f"{opening} For open-ended conversation, ask your administrator to connect a language model."
    listed = ", ".join(abilities[:-1]) + " and " + abilities[-1] if len(abilities) > 1 else abilities[0]
    return f"{opening} I can {listed}."


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"
