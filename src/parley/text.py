"""Text that can be stored: PostgreSQL refuses NUL characters in text and JSON, so they are refused at the
edge as invalid input instead of failing deep inside a query."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

MAX_DEPTH = 32


def check_no_nul(value: Any, depth: int = 0) -> None:
    """Raises ValueError if `value` (a string, or strings inside lists and dicts) holds a NUL character."""
    if depth > MAX_DEPTH:
        raise ValueError("the value is nested too deeply")
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError("text must not contain NUL characters")
    elif isinstance(value, dict):
        for key, item in value.items():
            check_no_nul(key, depth + 1)
            check_no_nul(item, depth + 1)
    elif isinstance(value, list | tuple):
        for item in value:
            check_no_nul(item, depth + 1)


class InputModel(BaseModel):
    """A request body or message payload: unknown fields refused, NUL characters refused anywhere inside."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _no_nul(cls, data: Any) -> Any:
        check_no_nul(data)
        return data
