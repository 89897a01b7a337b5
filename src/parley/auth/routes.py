"""HTTP routes of API.md's Auth section."""

from __future__ import annotations

import math

from fastapi import APIRouter, Response
from fastapi import Request as FastAPIRequest

from parley.auth.ratelimit import RateLimiter
from parley.auth.schemas import (
    LoginRequest,
    RefreshRequest,
    RegisterRequest,
    TicketResponse,
    TokenResponse,
    UserOut,
)
from parley.auth.service import IssuedTokens
from parley.errors import NotFound, RateLimited
from parley.http.deps import CurrentUser, ServicesDep, SessionDep, client_address
from parley.storage.models import User

router = APIRouter(tags=["auth"])


def _enforce(limiter: RateLimiter, key: str) -> None:
    retry_after = limiter.hit(key)
    if retry_after is not None:
        raise RateLimited("Too many attempts; retry later.", retry_after=math.ceil(retry_after))


def _tokens(issued: IssuedTokens) -> TokenResponse:
    return TokenResponse(user=UserOut.of(issued.user), access_token=issued.access_token,
                         refresh_token=issued.refresh_token, expires_in=issued.expires_in)


@router.post("/api/auth/register", status_code=201)
async def register(body: RegisterRequest, request: FastAPIRequest, services: ServicesDep,
                   session: SessionDep) -> TokenResponse:
    _enforce(services.rate_limits.register_by_address, client_address(request))
    issued = await services.auth.register(session, body.email, body.password, body.display_name)
    return _tokens(issued)


@router.post("/api/auth/login")
async def login(body: LoginRequest, request: FastAPIRequest, services: ServicesDep,
                session: SessionDep) -> TokenResponse:
    _enforce(services.rate_limits.login_by_address, client_address(request))
    _enforce(services.rate_limits.login_by_email, body.email)
    issued = await services.auth.login(session, body.email, body.password)
    return _tokens(issued)


@router.post("/api/auth/refresh")
async def refresh(body: RefreshRequest, services: ServicesDep, session: SessionDep) -> TokenResponse:
    return _tokens(await services.auth.refresh(session, body.refresh_token))


@router.post("/api/auth/logout", status_code=204)
async def logout(body: RefreshRequest, services: ServicesDep, session: SessionDep) -> Response:
    await services.auth.logout(session, body.refresh_token)
    return Response(status_code=204)


@router.get("/api/auth/me")
async def me(principal: CurrentUser, session: SessionDep) -> UserOut:
    user = await session.get(User, principal.user_id)
    if user is None:
        raise NotFound()
    return UserOut.of(user)


@router.post("/api/ws/ticket", status_code=201)
async def ws_ticket(principal: CurrentUser, services: ServicesDep, session: SessionDep) -> TicketResponse:
    _enforce(services.rate_limits.tickets_by_user, principal.user_id)
    ticket, expires_in = await services.auth.create_ws_ticket(session, principal.user_id)
    return TicketResponse(ticket=ticket, expires_in=expires_in)
