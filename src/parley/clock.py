"""Time in one place: aware UTC datetimes inside, RFC 3339 with a `Z` outside."""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> datetime:
    return datetime.now(UTC)


def rfc3339(moment: datetime) -> str:
    """`2026-11-29T13:37:27.123Z`: millisecond precision, always UTC."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    if moment.utcoffset():
        moment = moment.astimezone(UTC)
    # isoformat is several times cheaper than strftime, and this runs for every timestamp sent.
    return moment.replace(tzinfo=None).isoformat(timespec="milliseconds") + "Z"
