"""Request and response bodies of the auth endpoints (API.md, Auth)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, EmailStr, Field, field_validator

from parley.clock import rfc3339
from parley.storage.models import User
from parley.text import InputModel


class RegisterRequest(InputModel):
    email: EmailStr = Field(max_length=320)
    password: str = Field(min_length=8, max_length=1024)
    display_name: str | None = Field(default=None, max_length=100)

    @field_validator("email")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.strip().lower()


class LoginRequest(InputModel):
    email: str = Field(min_length=1, max_length=320)
    password: str = Field(min_length=1, max_length=1024)

    @field_validator("email")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.strip().lower()


class RefreshRequest(InputModel):
    refresh_token: str = Field(min_length=1, max_length=512)


class UserOut(BaseModel):
    id: str
    email: str
    display_name: str
    role: Literal["user", "admin"]
    created_at: str

    @classmethod
    def of(cls, user: User) -> UserOut:
        role: Literal["user", "admin"] = "admin" if user.role == "admin" else "user"
        return cls(id=user.id, email=user.email, display_name=user.display_name, role=role,
                   created_at=rfc3339(user.created_at))


class TokenResponse(BaseModel):
    user: UserOut
    access_token: str
    refresh_token: str
    token_type: Literal["bearer"] = "bearer"
    expires_in: int


class TicketResponse(BaseModel):
    ticket: str
    expires_in: int
