"""The process's open WebSocket connections (whether new ones are accepted, how many each user has, closing
them all on shutdown) and its SSE streams per user. Each user may hold `max_per_user` of each."""

from __future__ import annotations

from collections import Counter

from parley.realtime.connection import CLOSE_GOING_AWAY, Connection


class ConnectionHub:
    def __init__(self, max_per_user: int) -> None:
        self.max_per_user = max_per_user
        self.accepting = False
        self._connections: dict[str, Connection] = {}
        self._per_user: Counter[str] = Counter()
        self._streams: Counter[str] = Counter()  # open SSE streams per user
        self.opened = 0
        self.closed_by: Counter[str] = Counter()

    @property
    def count(self) -> int:
        return len(self._connections)

    def user_is_full(self, user_id: str) -> bool:
        return self._per_user[user_id] >= self.max_per_user

    def register(self, connection: Connection) -> None:
        self._connections[connection.id] = connection
        self._per_user[connection.user_id] += 1
        self.opened += 1

    def unregister(self, connection: Connection) -> None:
        if self._connections.pop(connection.id, None) is None:
            return
        self._per_user[connection.user_id] -= 1
        if self._per_user[connection.user_id] <= 0:
            del self._per_user[connection.user_id]
        self.closed_by[connection.closed_by or "unknown"] += 1

    def open_stream(self, user_id: str) -> bool:
        """Counts an SSE stream of `user_id`'s; False (nothing counted) when the user has too many."""
        if self._streams[user_id] >= self.max_per_user:
            return False
        self._streams[user_id] += 1
        return True

    def close_stream(self, user_id: str) -> None:
        self._streams[user_id] -= 1
        if self._streams[user_id] <= 0:
            del self._streams[user_id]

    def close_all(self, code: int = CLOSE_GOING_AWAY, reason: str = "server shutting down") -> None:
        self.accepting = False
        for connection in list(self._connections.values()):
            connection.close(code, reason)
