"""The per-run execution context: who a run acts for and where. Made once per run, frozen, never global."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class UserExecutionContext:
    user_id: str
    thread_id: str
    run_id: str
    request_id: str
    agent: str
    is_admin: bool = False

    def log_fields(self) -> dict[str, str]:
        return {"user_id": self.user_id, "thread_id": self.thread_id, "run_id": self.run_id,
                "request_id": self.request_id}
