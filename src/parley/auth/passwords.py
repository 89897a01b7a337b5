"""argon2id password hashing, run off the event loop (each hash costs tens of milliseconds of CPU)."""

from __future__ import annotations

import asyncio

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError


class Passwords:
    def __init__(self, memory_kib: int = 65_536, time_cost: int = 3) -> None:
        # argon2id; hashes made with other parameters still verify and are upgraded at the next login.
        self._hasher = PasswordHasher(time_cost=time_cost, memory_cost=memory_kib, parallelism=4)
        self._dummy_hash: str | None = None

    async def hash(self, password: str) -> str:
        return await asyncio.to_thread(self._hasher.hash, password)

    async def verify(self, password_hash: str | None, password: str) -> bool:
        """Checks `password`; with no hash (unknown account) it spends the same time and says no."""
        if password_hash is None:
            if self._dummy_hash is None:
                self._dummy_hash = await self.hash("not a password of anyone")
            password_hash = self._dummy_hash
            await asyncio.to_thread(self._verify, password_hash, password)
            return False
        return await asyncio.to_thread(self._verify, password_hash, password)

    def _verify(self, password_hash: str, password: str) -> bool:
        try:
            return self._hasher.verify(password_hash, password)
        except (VerificationError, InvalidHashError):
            return False

    def needs_rehash(self, password_hash: str) -> bool:
        return self._hasher.check_needs_rehash(password_hash)
