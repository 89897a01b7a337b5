"""`mask`: a message's variable parts (ids, numbers, addresses, times, quoted values) replaced by typed markers.

What it keeps (names of code, HTTP statuses) and what it masks decides which messages cluster together.
"""

from __future__ import annotations

import re
from typing import Any

from parley.observability.diagnose.events import _MESSAGE_CHARS, _TIME, _URL

_KEPT_NUMBER = re.compile(r"(?:HTTP(?:/[\d.]+)?|status(?:[ _]code)?)[\s=:]*$", re.IGNORECASE)


def _mask_url(match: re.Match[str]) -> str:
    # The path names the endpoint; the query is data (limit/offset, cache busters) and is left out:
    # /api/threads?limit=20 and /api/threads are one endpoint. The sample keeps the full address.
    url = match[0].rstrip(".,;)]")
    return url.partition("?")[0] + match[0][len(url):]


def _mask_quoted(match: re.Match[str]) -> str:
    # A quoted identifier ('execute', 'CLICKHOUSE_URL', 'websocket.close') names code and stays;
    # a quoted value (digits, an address, prose, a long blob) is data.
    inner = match[0][1:-1]
    if any(c.isdigit() for c in inner) or "@" in inner or len(inner) > 40 or len(inner.split()) > 3:
        return "<STR>"
    return match[0]


def _mask_number(match: re.Match[str]) -> str:
    # HTTP status codes tell failures apart (500 vs 404); every other bare number is data.
    before = match.string[max(0, match.start() - 16):match.start()]
    if len(match[0]) == 3 and match[0][0] in "12345" and _KEPT_NUMBER.search(before):
        return match[0]
    return "<NUM>"


_MASKS: tuple[tuple[re.Pattern[str], Any], ...] = (
    (re.compile(_TIME), "<TS>"),
    (re.compile(r"\b\d{2}:\d{2}:\d{2}(?:[.,]\d+)?\b"), "<TIME>"),
    (re.compile(rf"{_URL.pattern}|(?<![\w/])/[\w./{{}}-]*\?[^\s'\"<>]*"), _mask_url),
    (re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b"), "<EMAIL>"),
    (re.compile(r"\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b"), "<UUID>"),
    (re.compile(r"\b(?=[0-9a-z]*\d)[0-9a-z]{26}\b|\b(?=[0-9A-Z]*\d)[0-9A-Z]{26}\b"), "<ID>"),  # ULIDs
    (re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}(?::\d{1,5})?\b"), "<IP>"),
    (re.compile(r"\b0x[0-9a-fA-F]+\b"), "<HEX>"),
    (re.compile(r"\b(?=[0-9a-fA-F]*\d)(?=[0-9a-fA-F]*[a-fA-F])[0-9a-fA-F]{6,}\b"), "<HEX>"),
    (re.compile(r"\b(?=[\w-]*\d)(?=[\w-]*[A-Za-z])[A-Za-z0-9][\w-]{9,}(?![\w-])"), "<ID>"),  # req_8f3k2j1x0p…
    (re.compile(
        r"(?<![\w/.:-])(?:[A-Za-z]:)?(?:[\\/][\w.@+-]+)+\.(?:py|pyc|js|ts|go|rb|java|json|ya?ml|toml|log|txt|sql|"
        r"so|db|sqlite3?|csv|cfg|ini|conf|sock|pid)\b"
        r"|(?<![\w/.:-])/(?:home|usr|var|tmp|opt|srv|etc|app|proc|run|mnt|data)(?:/[\w.@+-]+)+"), "<PATH>"),
    (re.compile(
        r"(?<![\w.])\d+(?:\.\d+)?\s?(?:ns|us|µs|ms|s|sec|secs|seconds?|m|mins?|minutes?|h|hrs?|hours?|d|days?)"
        r"(?!\w)"), "<DUR>"),
    (re.compile(r"'[^'\n]{0,200}'|\"[^\"\n]{0,200}\""), _mask_quoted),
    (re.compile(r"(?<![\w.])[-+]?\d+(?:\.\d+)*(?!\w)"), _mask_number),
)


def mask(message: str) -> str:
    """The message with its variable parts (ids, numbers, addresses, times, values) replaced by typed markers."""
    text = " ".join(message.split())[:_MESSAGE_CHARS]
    for pattern, replacement in _MASKS:
        text = pattern.sub(replacement, text)
    return text or "(empty message)"
