"""What a run shows the model: the thread's recent messages, served from memory for threads active here.

Each message is kept with its id, so a run can take the history up to its own message (see RunManager).

The cache follows the event log: after every commit it appends the batch's messages to the threads it holds,
if the batch continues exactly where the cached copy ends (its first seq is one past the cached last seq);
any other batch (another process wrote to the thread) drops the copy, and the next run reads the database.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass

from parley.llm.base import ChatMessage
from parley.realtime.event_log import WriteRequest
from parley.realtime.events import StoredEvent

HISTORY_MESSAGES = 40
ROLES = ("user", "assistant")

HistoryItem = tuple[str, ChatMessage]  # (message id, the message as the model sees it)


def history_item(message_id: str, role: str, content: str) -> HistoryItem:
    return message_id, ChatMessage(role="user" if role == "user" else "assistant", content=content)


@dataclass
class _Entry:
    messages: deque[HistoryItem]
    last_seq: int


class HistoryCache:
    def __init__(self, max_threads: int = 5000, limit: int = HISTORY_MESSAGES) -> None:
        self.max_threads = max_threads
        self.limit = limit
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._latest: OrderedDict[str, int] = OrderedDict()  # newest committed seq seen per thread
        self.hits = 0
        self.misses = 0

    def get(self, thread_id: str) -> tuple[HistoryItem, ...] | None:
        entry = self._entries.get(thread_id)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(thread_id)
        self.hits += 1
        return tuple(entry.messages)

    def put(self, thread_id: str, messages: Sequence[HistoryItem], last_seq: int) -> None:
        """Keeps a copy read from the database at `last_seq`, unless a newer commit has been seen since."""
        if self._latest.get(thread_id, 0) > last_seq:
            return  # the copy is already behind; the next read will try again
        self._entries[thread_id] = _Entry(deque(messages, maxlen=self.limit), last_seq)
        self._entries.move_to_end(thread_id)
        while len(self._entries) > self.max_threads:
            self._entries.popitem(last=False)

    def observe(self, committed: Sequence[tuple[WriteRequest, list[StoredEvent]]]) -> None:
        """Called by the event log after each commit, in commit order."""
        spans: dict[str, list[int]] = {}
        added: dict[str, list[HistoryItem]] = {}
        for request, events in committed:
            if events and len({event.thread_id for event in events}) == 1:  # usual: one thread, seqs ascending
                head, tail = events[0], events[-1]
                span = spans.setdefault(head.thread_id, [head.seq, tail.seq])
                span[0], span[1] = min(span[0], head.seq), max(span[1], tail.seq)
            else:
                for event in events:
                    span = spans.setdefault(event.thread_id, [event.seq, event.seq])
                    span[0], span[1] = min(span[0], event.seq), max(span[1], event.seq)
            for row in request.messages:
                if row["role"] in ROLES:
                    added.setdefault(row["thread_id"], []).append(
                        history_item(row["id"], row["role"], row["content"]))
        for thread_id, (first, last) in spans.items():
            self._latest[thread_id] = max(self._latest.get(thread_id, 0), last)
            self._latest.move_to_end(thread_id)
            entry = self._entries.get(thread_id)
            if entry is None:
                continue
            if first != entry.last_seq + 1:
                del self._entries[thread_id]  # someone else wrote in between: read it again
                continue
            entry.messages.extend(added.get(thread_id, ()))
            entry.last_seq = last
        while len(self._latest) > self.max_threads * 2:
            self._latest.popitem(last=False)
