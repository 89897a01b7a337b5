"""`render_markdown`: a `Diagnosis` as a Markdown report, a summary table and then one section per pattern.

Owns the report's formatting: times, shares, code spans, and samples in fences with tracebacks unfolded.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping
from datetime import UTC, datetime

from parley.observability.diagnose.clustering import Diagnosis
from parley.observability.diagnose.events import _json_record


def render_markdown(diagnosis: Diagnosis) -> str:
    since = f" since {_when(diagnosis.since)}" if diagnosis.since else ""
    lines = ["# Failure patterns", ""]
    if not diagnosis.patterns:
        return "\n".join([*lines, f"No warnings or errors{since}.", ""])
    levels: Counter[str] = Counter()
    for pattern in diagnosis.patterns:
        levels.update(pattern.levels)
    firsts = [p.first_seen for p in diagnosis.patterns if p.first_seen]
    lasts = [p.last_seen for p in diagnosis.patterns if p.last_seen]
    span = f", {_when(min(firsts))} to {_when(max(lasts))}" if firsts and lasts else ""
    by_level = ", ".join(f"{levels[name]} {name}" for name in ("critical", "error", "warning") if levels[name])
    lines += [f"**{diagnosis.total}** warnings and errors{since} ({by_level}) in **{len(diagnosis.patterns)}** "
              f"patterns{span}.", "", "| # | Count | Share | Template |", "|---:|---:|---:|---|"]
    for rank, pattern in enumerate(diagnosis.patterns, 1):
        template = _code(_shorten(pattern.template, 120)).replace("|", "\\|")
        lines.append(f"| {rank} | {pattern.count} | {_percent(pattern.share)} | {template} |")
    for rank, pattern in enumerate(diagnosis.patterns, 1):
        lines += ["", f"## {rank}. {_code(_shorten(pattern.template, 500))}", "",
                  f"- **Count:** {pattern.count} ({_percent(pattern.share)} of all), "
                  + ", ".join(f"{n} {name}" for name, n in pattern.levels.items()),
                  f"- **First seen:** {_when(pattern.first_seen)} · **Last seen:** {_when(pattern.last_seen)}",
                  f"- **Routes** ({pattern.distinct_routes}): {_top(pattern.routes, pattern.distinct_routes)}",
                  f"- **Users** ({pattern.distinct_users}): {_top(pattern.users, pattern.distinct_users)}",
                  "- **Sample:**", "", *_block(pattern.sample)]
    return "\n".join([*lines, ""])


def _when(moment: datetime | None) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ") if moment else "unknown"


def _percent(share: float) -> str:
    return f"{share * 100:.1f}%" if share >= 0.001 else f"{share * 100:.2f}%"


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _code(text: str) -> str:
    ticks = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if "`" in text else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"


def _top(counts: Mapping[str, int], distinct: int) -> str:
    if not counts:
        return "none recorded"
    shown = ", ".join(f"{_code(_shorten(name, 80))} {n}" for name, n in counts.items())
    return shown + (f", and {distinct - len(counts)} more" if distinct > len(counts) else "")


def _block(sample: str) -> list[str]:
    lines = [_shorten(line, 400) for line in _readable(sample).splitlines()] or [""]
    if len(lines) > 12:
        lines = [*lines[:4], "…", *lines[-7:]]
    fence = "`" * max(3, max((len(run) for run in re.findall(r"`+", sample)), default=0) + 1)
    return [fence, *lines, fence]


def _readable(sample: str) -> str:
    """A JSON line with its traceback unfolded below it, as the console would have shown it."""
    record = _json_record(sample) if "\n" not in sample else None
    if record is None or not isinstance(record.get("exception"), str):
        return sample
    rest = {key: value for key, value in record.items() if key != "exception"}
    return json.dumps(rest, ensure_ascii=False) + "\n" + str(record["exception"])
