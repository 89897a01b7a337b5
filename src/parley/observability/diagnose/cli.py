"""`parley diagnose LOGFILE... | -` (`main`): log files or standard input in, a Markdown or JSON report out.

Owns the command's arguments and exit codes, and `parse_since` (shared with the HTTP `?since=` parameter).
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from itertools import chain
from pathlib import Path
from typing import Any, NoReturn, TextIO

from parley.observability.diagnose.clustering import diagnose
from parley.observability.diagnose.events import _timestamp, parse_lines
from parley.observability.diagnose.render import render_markdown


class _Usage(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _Usage(message)


def _parser() -> _Parser:
    parser = _Parser(prog="parley diagnose", add_help=False,
                     description="Cluster the WARNING and ERROR lines of parley's logs (JSON, console or plain text) "
                                 "into failure patterns, ranked by count.")
    parser.add_argument("files", nargs="+", metavar="LOGFILE", help="log files (.gz too); - reads standard input")
    parser.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    parser.add_argument("--since", metavar="WHEN",
                        help="only events at or after WHEN: an ISO 8601 date or time (UTC unless stated), "
                             "or an age such as 30m, 2h, 7d")
    return parser


def main(argv: Sequence[str], stdin: TextIO, stdout: TextIO) -> int:
    """`parley diagnose LOGFILE... | -`: 0 when done (also with nothing found), 2 on a bad argument or file."""
    if "-h" in argv or "--help" in argv:
        stdout.write(_parser().format_help())
        return 0
    try:
        args = _parser().parse_args(list(argv))
        since = _since_argument(args.since) if args.since else None
        for name in args.files:
            if name != "-" and not Path(name).is_file():
                raise _Usage(f"no such log file: {name}")
        events = chain.from_iterable(parse_lines(_read(name, stdin)) for name in args.files)
        diagnosis = diagnose(events, since)
    except _Usage as exc:
        print(f"parley diagnose: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"parley diagnose: cannot read {exc.filename or 'input'}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except EOFError as exc:  # a truncated .gz
        print(f"parley diagnose: cannot read input: {exc}", file=sys.stderr)
        return 2
    stdout.write(json.dumps(diagnosis.as_dict(), indent=2, ensure_ascii=False) + "\n" if args.json
                 else render_markdown(diagnosis))
    return 0


def _since_argument(text: str) -> datetime:
    try:
        return parse_since(text)
    except ValueError as exc:
        raise _Usage(f"--since: {exc}") from None


def _read(name: str, stdin: TextIO) -> Iterator[str]:
    if name == "-":
        yield from stdin
        return
    opener: Any = gzip.open if name.endswith(".gz") else open
    with opener(name, "rt", encoding="utf-8", errors="replace") as lines:
        yield from lines


_AGE = re.compile(r"(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|hr|d|w)", re.IGNORECASE)
_UNITS = {"s": "seconds", "sec": "seconds", "m": "minutes", "min": "minutes", "h": "hours", "hr": "hours",
          "d": "days", "w": "weeks"}


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """`2025-09-03`, `2025-09-03T12:00:00Z` (naive means UTC), or an age before `now`: `30m`, `2h`, `7d`.

    Raises ValueError for anything else (the CLI's `--since`; an HTTP `?since=` can share it).
    """
    age = _AGE.fullmatch(text.strip())
    moment: datetime | None
    try:
        if age is not None:
            moment = (now or datetime.now(UTC)) - timedelta(**{_UNITS[age[2].lower()]: float(age[1])})
        else:
            moment = _timestamp(text)
    except OverflowError:
        moment = None
    if moment is None:
        raise ValueError(f"not a date, time or age (like 2h, 30m, 7d): {text!r}")
    return moment
