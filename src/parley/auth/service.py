"""Accounts and credentials: register, log in, rotate refresh tokens with reuse detection, WebSocket tickets.

Every method takes the caller's session and leaves the transaction committed or rolled back.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from parley.auth.passwords import Passwords
from parley.auth.secret import resolve_jwt_secret
from parley.auth.tokens import TokenCodec, new_opaque_token, token_digest
from parley.clock import utcnow
from parley.errors import Conflict, InvalidCredentials, Unauthorized
from parley.ids import new_id
from parley.observability.logging import get_logger
from parley.settings import Settings
from parley.storage.models import RefreshToken, User, WebSocketTicket

log = get_logger("parley.auth")


class EmailTaken(Conflict):
    code = "email_taken"
    message = "An account with this email already exists."


class InvalidRefreshToken(Unauthorized):
    code = "invalid_refresh_token"
    message = "The refresh token is invalid, expired or already used."


@dataclass(frozen=True)
class IssuedTokens:
    user: User
    access_token: str
    refresh_token: str
    expires_in: int


class AuthService:
    def __init__(self, settings: Settings, passwords: Passwords, codec: TokenCodec) -> None:
        self.settings = settings
        self.passwords = passwords
        self.codec = codec

    @classmethod
    def from_settings(cls, settings: Settings) -> AuthService:
        codec = TokenCodec(resolve_jwt_secret(settings), settings.jwt_issuer, settings.jwt_audience,
                           settings.access_token_ttl_s)
        passwords = Passwords(settings.password_hash_memory_kib, settings.password_hash_time_cost)
        return cls(settings, passwords, codec)

    # --- accounts ------------------------------------------------------------------------------------------
    async def create_user(self, session: AsyncSession, email: str, password: str,
                          display_name: str | None = None, role: str = "user") -> User:
        email = email.strip().lower()
        if await session.scalar(select(User.id).where(User.email == email)) is not None:
            raise EmailTaken()
        user = User(id=new_id(), email=email, password_hash=await self.passwords.hash(password),
                    display_name=display_name or email.split("@", 1)[0], role=role,
                    created_at=utcnow(), thread_count=0)
        session.add(user)
        try:
            await session.flush()
        except IntegrityError as exc:  # a concurrent registration won the race for this email
            await session.rollback()
            raise EmailTaken() from exc
        return user

    async def register(self, session: AsyncSession, email: str, password: str,
                       display_name: str | None) -> IssuedTokens:
        user = await self.create_user(session, email, password, display_name)
        issued = await self._issue(session, user, family_id=new_id())
        await session.commit()
        log.info("user_registered", user_id=user.id)
        return issued

    async def login(self, session: AsyncSession, email: str, password: str) -> IssuedTokens:
        user = await session.scalar(select(User).where(User.email == email))
        if not await self.passwords.verify(user.password_hash if user else None, password) or user is None:
            raise InvalidCredentials()
        if self.passwords.needs_rehash(user.password_hash):
            user.password_hash = await self.passwords.hash(password)
        issued = await self._issue(session, user, family_id=new_id())
        await session.commit()
        return issued

    # --- refresh tokens ------------------------------------------------------------------------------------
    async def refresh(self, session: AsyncSession, refresh_token: str) -> IssuedTokens:
        now = utcnow()
        token = await session.scalar(
            select(RefreshToken).where(RefreshToken.token_hash == token_digest(refresh_token))
        )
        if token is None or token.revoked_at is not None or token.expires_at <= now:
            raise InvalidRefreshToken()
        # Claim the token atomically: of two concurrent presentations exactly one wins.
        claimed = await session.execute(
            update(RefreshToken)
            .where(RefreshToken.id == token.id, RefreshToken.used_at.is_(None))
            .values(used_at=now)
        )
        if claimed.rowcount != 1:  # type: ignore[attr-defined]
            await self._revoke_family(session, token.family_id)
            await session.commit()
            log.warning("refresh_token_reused", user_id=token.user_id, family_id=token.family_id)
            raise InvalidRefreshToken()
        user = await session.get(User, token.user_id)
        if user is None:
            raise InvalidRefreshToken()
        issued = await self._issue(session, user, family_id=token.family_id)
        await session.commit()
        return issued

    async def logout(self, session: AsyncSession, refresh_token: str) -> None:
        family_id = await session.scalar(
            select(RefreshToken.family_id).where(RefreshToken.token_hash == token_digest(refresh_token))
        )
        if family_id is not None:
            await self._revoke_family(session, family_id)
            await session.commit()

    async def _revoke_family(self, session: AsyncSession, family_id: str) -> None:
        await session.execute(
            update(RefreshToken)
            .where(RefreshToken.family_id == family_id, RefreshToken.revoked_at.is_(None))
            .values(revoked_at=utcnow())
        )

    async def _issue(self, session: AsyncSession, user: User, family_id: str) -> IssuedTokens:
        refresh_token = new_opaque_token()
        now = utcnow()
        session.add(RefreshToken(
            id=new_id(), user_id=user.id, family_id=family_id, token_hash=token_digest(refresh_token),
            created_at=now, expires_at=now + timedelta(seconds=self.settings.refresh_token_ttl_s),
        ))
        return IssuedTokens(user=user, access_token=self.codec.issue(user.id, user.role),
                            refresh_token=refresh_token, expires_in=self.codec.ttl_s)

    # --- WebSocket tickets ---------------------------------------------------------------------------------
    async def create_ws_ticket(self, session: AsyncSession, user_id: str) -> tuple[str, int]:
        ticket = new_opaque_token()
        now = utcnow()
        ttl = self.settings.ws_ticket_ttl_s
        session.add(WebSocketTicket(id=new_id(), user_id=user_id, ticket_hash=token_digest(ticket),
                                    created_at=now, expires_at=now + timedelta(seconds=ttl)))
        await session.commit()
        return ticket, ttl

    async def redeem_ws_ticket(self, session: AsyncSession, ticket: str) -> User:
        """Spends a ticket once; an unknown, expired or already used ticket is `Unauthorized`."""
        now = utcnow()
        digest = token_digest(ticket)
        spent = await session.execute(
            update(WebSocketTicket)
            .where(WebSocketTicket.ticket_hash == digest, WebSocketTicket.used_at.is_(None),
                   WebSocketTicket.expires_at > now)
            .values(used_at=now)
            .returning(WebSocketTicket.user_id)
        )
        user_id = spent.scalar_one_or_none()
        user = await session.get(User, user_id) if user_id is not None else None
        await session.commit()
        if user is None:
            raise Unauthorized("The ticket is invalid, expired or already used.")
        return user

    async def purge_expired(self, session: AsyncSession) -> int:
        """Deletes refresh tokens and tickets past their expiry; returns how many rows went."""
        now = utcnow()
        tokens = await session.execute(delete(RefreshToken).where(RefreshToken.expires_at <= now))
        tickets = await session.execute(delete(WebSocketTicket).where(WebSocketTicket.expires_at <= now))
        await session.commit()
        return int(tokens.rowcount or 0) + int(tickets.rowcount or 0)  # type: ignore[attr-defined]
