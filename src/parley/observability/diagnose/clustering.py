"""`diagnose`: events grouped by masked message, then clustered with drain3 into ranked failure patterns.

Owns the result types, `FailurePattern` and `Diagnosis`, that the CLI and `GET /api/admin/errors` report.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from drain3.drain import Drain

from parley.observability.diagnose.events import LogEvent, _rfc3339
from parley.observability.diagnose.masking import mask

TOP = 10  # routes and users listed per pattern; the distinct count is reported beside them
_EXCEPTION_TYPE = re.compile(r"(?:^|\s)exception=([A-Za-z_][\w.]*)")


@dataclass(frozen=True)
class FailurePattern:
    """One distinct failure: its template, how often, when, where and for whom, and one occurrence as written."""

    template: str
    count: int
    share: float  # of all WARNING+ events, 0..1
    first_seen: datetime | None
    last_seen: datetime | None
    levels: dict[str, int]
    routes: dict[str, int]  # the TOP most affected, ranked
    users: dict[str, int]  # the TOP most affected, ranked
    sample: str
    distinct_routes: int = 0
    distinct_users: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "template": self.template, "count": self.count, "share": self.share,
            "first_seen": _rfc3339(self.first_seen), "last_seen": _rfc3339(self.last_seen),
            "levels": self.levels, "routes": self.routes, "distinct_routes": self.distinct_routes,
            "users": self.users, "distinct_users": self.distinct_users, "sample": self.sample,
        }


@dataclass(frozen=True)
class Diagnosis:
    """Every failure pattern among `total` WARNING+ events (those at or after `since`, when given)."""

    patterns: list[FailurePattern]  # ranked by count desc, then first seen
    total: int
    since: datetime | None

    def as_dict(self) -> dict[str, Any]:
        return {"total": self.total, "since": _rfc3339(self.since),
                "patterns": [pattern.as_dict() for pattern in self.patterns]}


@dataclass
class _Group:
    """Every event whose masked message is the same text: the unit drain3 clusters."""

    order: int
    count: int = 0
    first: datetime | None = None
    last: datetime | None = None
    sample: str = ""
    levels: Counter[str] = field(default_factory=Counter)
    routes: Counter[str] = field(default_factory=Counter)
    users: Counter[str] = field(default_factory=Counter)

    def add(self, event: LogEvent) -> None:
        if not self.count:
            self.sample = event.raw
        self.count += 1
        self.levels[event.level] += 1
        if event.route:
            self.routes[event.route] += 1
        if event.user_id:
            self.users[event.user_id] += 1
        if event.timestamp is not None:
            self.first = min(self.first or event.timestamp, event.timestamp)
            self.last = max(self.last or event.timestamp, event.timestamp)


def diagnose(events: Iterable[LogEvent], since: datetime | None = None) -> Diagnosis:
    """The distinct failure patterns among the events (those at or after `since`, when given), ranked by count."""
    since = _aware(since)
    groups: dict[tuple[str, str], _Group] = {}
    keys: dict[str, tuple[str, str]] = {}  # the same message again (no ids in it) is masked once
    total = 0
    for event in events:
        if since is not None and (event.timestamp is None or event.timestamp < since):
            continue
        total += 1
        key = keys.get(event.message)
        if key is None:
            kind = _EXCEPTION_TYPE.search(event.message)
            key = (kind[1] if kind else "", mask(event.message))
            if len(keys) < 50_000:
                keys[event.message] = key
        group = groups.get(key)
        if group is None:
            group = groups[key] = _Group(order=len(groups))
        group.add(event)
    patterns = [_pattern(template, members, total) for template, members in _cluster(groups)]
    patterns.sort(key=lambda p: (-p.count, p.first_seen is None, p.first_seen or datetime.min.replace(tzinfo=UTC),
                                 p.template))
    return Diagnosis(patterns=patterns, total=total, since=since)


def _cluster(groups: Mapping[tuple[str, str], _Group]) -> list[tuple[str, list[_Group]]]:
    """Drain over the distinct masked messages, one tree per exception type, in order of first appearance.

    Feeding each distinct text once (not every occurrence) makes identical texts share a pattern by construction:
    drain alone can send a repeat of a message to another cluster once the first cluster's template has widened.
    """
    trees: dict[str, Drain] = {}
    members: dict[tuple[str, int], list[_Group]] = {}
    for (kind, text), group in groups.items():
        tree = trees.get(kind)
        if tree is None:
            # depth 5: the first two tokens (an event name and its exception or reason; "HTTP 500") never merge.
            # Numbers are masked already, so a digit left in a token (an HTTP status) is meant to tell apart.
            tree = trees[kind] = Drain(depth=5, sim_th=0.5, max_children=100, parametrize_numeric_tokens=False)
        cluster, _ = tree.add_log_message(text)
        members.setdefault((kind, int(cluster.cluster_id)), []).append(group)
    return [(" ".join(str(t) for t in trees[kind].id_to_cluster[cluster_id].log_template_tokens), found)
            for (kind, cluster_id), found in members.items()]


def _pattern(template: str, groups: list[_Group], total: int) -> FailurePattern:
    levels: Counter[str] = Counter()
    routes: Counter[str] = Counter()
    users: Counter[str] = Counter()
    for group in groups:
        levels.update(group.levels)
        routes.update(group.routes)
        users.update(group.users)
    firsts = [g.first for g in groups if g.first is not None]
    lasts = [g.last for g in groups if g.last is not None]
    count = sum(g.count for g in groups)
    return FailurePattern(
        template=template, count=count, share=count / total if total else 0.0,
        first_seen=min(firsts, default=None), last_seen=max(lasts, default=None),
        levels=_ranked(levels, len(levels)), routes=_ranked(routes, TOP), users=_ranked(users, TOP),
        sample=min(groups, key=lambda g: g.order).sample,
        distinct_routes=len(routes), distinct_users=len(users),
    )


def _ranked(counts: Counter[str], limit: int) -> dict[str, int]:
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:limit])


def _aware(moment: datetime | None) -> datetime | None:
    if moment is None:
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
