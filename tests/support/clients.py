"""Small conveniences for talking to a live server the way a client would."""

from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass
from typing import Any

import httpx

_counter = itertools.count()


@dataclass
class Account:
    email: str
    password: str
    user: dict[str, Any]
    access_token: str
    refresh_token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.access_token}"}

    @property
    def id(self) -> str:
        return str(self.user["id"])


def register(client: httpx.Client, email: str | None = None, password: str = "correct horse battery") -> Account:
    email = email or f"user{next(_counter)}-{uuid.uuid4().hex[:8]}@example.com"
    response = client.post("/api/auth/register", json={"email": email, "password": password})
    assert response.status_code == 201, response.text
    body = response.json()
    return Account(email=email, password=password, user=body["user"], access_token=body["access_token"],
                   refresh_token=body["refresh_token"])


def error_code(response: httpx.Response) -> str:
    return str(response.json()["error"]["code"])


def promote_to_admin(settings: Any, client: httpx.Client, account: Account) -> Account:
    """Makes the account an admin (as `parley user create --admin` would) and logs in again for a token
    that carries the role."""
    import asyncio

    from sqlalchemy import update

    from parley.storage.database import Database
    from parley.storage.models import User

    async def promote() -> None:
        database = Database(settings)
        try:
            async with database.session() as session:
                await session.execute(update(User).where(User.id == account.id).values(role="admin"))
                await session.commit()
        finally:
            await database.dispose()

    asyncio.run(promote())
    login = client.post("/api/auth/login", json={"email": account.email, "password": account.password})
    assert login.status_code == 200 and login.json()["user"]["role"] == "admin"
    body = login.json()
    return Account(account.email, account.password, body["user"], body["access_token"], body["refresh_token"])
