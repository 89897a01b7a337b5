"""Accounts and credentials over real HTTP: register, login, refresh rotation and reuse, logout, tickets."""

from __future__ import annotations

import httpx
import jwt
import pytest

from parley.settings import Settings
from tests.conftest import TEST_JWT_SECRET, SettingsFactory
from tests.support.clients import Account, error_code, register
from tests.support.live import LiveServer


def test_register_login_me(client: httpx.Client) -> None:
    response = client.post("/api/auth/register",
                           json={"email": "Ada@Example.com", "password": "analytical", "display_name": "Ada"})
    assert response.status_code == 201
    body = response.json()
    assert body["token_type"] == "bearer" and body["expires_in"] == 900
    assert body["user"]["email"] == "ada@example.com" and body["user"]["role"] == "user"
    assert set(body["user"]) == {"id", "email", "display_name", "role", "created_at"}

    claims = jwt.decode(body["access_token"], TEST_JWT_SECRET, algorithms=["HS256"], audience="parley-api",
                        issuer="parley")
    assert claims["sub"] == body["user"]["id"]
    assert claims["exp"] - claims["iat"] == 900
    assert {"iss", "aud", "sub", "exp", "iat", "jti"} <= set(claims)

    login = client.post("/api/auth/login", json={"email": "ada@example.com", "password": "analytical"})
    assert login.status_code == 200
    me = client.get("/api/auth/me", headers={"Authorization": f"Bearer {login.json()['access_token']}"})
    assert me.status_code == 200 and me.json() == body["user"]


def test_register_rejects_bad_input_and_duplicates(client: httpx.Client) -> None:
    account = register(client)
    duplicate = client.post("/api/auth/register", json={"email": account.email.upper(), "password": "whatever1"})
    assert duplicate.status_code == 409 and error_code(duplicate) == "email_taken"
    short = client.post("/api/auth/register", json={"email": "new@example.com", "password": "short"})
    assert short.status_code == 422 and short.json()["error"]["details"][0]["field"] == "body.password"
    bad_email = client.post("/api/auth/register", json={"email": "not-an-email", "password": "long enough"})
    assert bad_email.status_code == 422 and bad_email.json()["error"]["details"][0]["field"] == "body.email"
    assert "long enough" not in bad_email.text  # inputs are not echoed back


def test_login_answers_the_same_for_unknown_email_and_wrong_password(client: httpx.Client) -> None:
    account = register(client)
    wrong = client.post("/api/auth/login", json={"email": account.email, "password": "wrong password"})
    unknown = client.post("/api/auth/login", json={"email": "nobody@example.com", "password": "wrong password"})
    assert wrong.status_code == unknown.status_code == 401
    assert error_code(wrong) == error_code(unknown) == "invalid_credentials"
    assert wrong.json()["error"]["message"] == unknown.json()["error"]["message"]


@pytest.mark.parametrize("header", [None, "Bearer", "Bearer garbage", "Basic dXNlcjpwYXNz"])
def test_invalid_access_tokens_are_401(client: httpx.Client, header: str | None) -> None:
    headers = {"Authorization": header} if header else {}
    response = client.get("/api/threads", headers=headers)
    assert response.status_code == 401 and error_code(response) == "unauthorized"


def test_expired_and_foreign_tokens_are_401(client: httpx.Client, account: Account) -> None:
    import time

    now = int(time.time())
    base = {"iss": "parley", "aud": "parley-api", "sub": account.id, "jti": "x", "iat": now - 3600}
    expired = jwt.encode({**base, "exp": now - 60}, TEST_JWT_SECRET, algorithm="HS256")
    forged = jwt.encode({**base, "exp": now + 600}, "another secret entirely, also long enough",
                        algorithm="HS256")
    wrong_audience = jwt.encode({**base, "aud": "elsewhere", "exp": now + 600}, TEST_JWT_SECRET,
                                algorithm="HS256")
    for token in (expired, forged, wrong_audience):
        response = client.get("/api/auth/me", headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 401


def test_refresh_rotates_and_reuse_revokes_the_family(client: httpx.Client, account: Account) -> None:
    first = client.post("/api/auth/refresh", json={"refresh_token": account.refresh_token})
    assert first.status_code == 200
    second_token = first.json()["refresh_token"]
    assert second_token != account.refresh_token
    second = client.post("/api/auth/refresh", json={"refresh_token": second_token})
    assert second.status_code == 200
    third_token = second.json()["refresh_token"]

    # The first token is presented again (stolen and replayed): refused, and every descendant is revoked.
    replay = client.post("/api/auth/refresh", json={"refresh_token": account.refresh_token})
    assert replay.status_code == 401
    descendant = client.post("/api/auth/refresh", json={"refresh_token": third_token})
    assert descendant.status_code == 401

    # Another login's family is unaffected.
    other = client.post("/api/auth/login", json={"email": account.email, "password": account.password})
    assert client.post("/api/auth/refresh",
                       json={"refresh_token": other.json()["refresh_token"]}).status_code == 200


def test_logout_revokes_the_refresh_token(client: httpx.Client, account: Account) -> None:
    response = client.post("/api/auth/logout", json={"refresh_token": account.refresh_token})
    assert response.status_code == 204
    assert client.post("/api/auth/refresh", json={"refresh_token": account.refresh_token}).status_code == 401
    assert client.post("/api/auth/logout", json={"refresh_token": "unknown"}).status_code == 204


def test_ws_ticket_requires_auth_and_is_short_lived(client: httpx.Client, account: Account) -> None:
    assert client.post("/api/ws/ticket").status_code == 401
    response = client.post("/api/ws/ticket", headers=account.headers)
    assert response.status_code == 201
    body = response.json()
    assert len(body["ticket"]) >= 32 and 0 < body["expires_in"] <= 60


def test_login_is_rate_limited_per_email_with_retry_after(make_settings: SettingsFactory) -> None:
    server = LiveServer(make_settings(login_rate_limit=3, login_rate_window_s=60)).start()
    try:
        with httpx.Client(base_url=server.url) as client:
            account = register(client)
            statuses = [client.post("/api/auth/login", json={"email": account.email, "password": "nope nope"})
                        for _ in range(4)]
            assert [r.status_code for r in statuses] == [401, 401, 401, 429]
            limited = statuses[-1]
            assert error_code(limited) == "rate_limited"
            assert 1 <= int(limited.headers["Retry-After"]) <= 60
            # Even the right password waits out the limit for this email...
            right = client.post("/api/auth/login", json={"email": account.email, "password": account.password})
            assert right.status_code == 429
            # ...while another email from the same address still gets through.
            other = register(client)
            assert client.post("/api/auth/login",
                               json={"email": other.email, "password": other.password}).status_code == 200
    finally:
        server.stop()


def test_generated_jwt_secret_is_kept_private_and_stable(make_settings: SettingsFactory,
                                                         settings: Settings) -> None:
    development = make_settings(env="development", jwt_secret=None)
    server = LiveServer(development).start()
    try:
        with httpx.Client(base_url=server.url) as client:
            account = register(client)
    finally:
        server.stop()
    secret_file = development.data_dir / "jwt_secret"
    assert secret_file.stat().st_mode & 0o777 == 0o600
    # A restarted server reads the same secret: the token issued before still works.
    server = LiveServer(development).start()
    try:
        with httpx.Client(base_url=server.url) as client:
            assert client.get("/api/auth/me", headers=account.headers).status_code == 200
    finally:
        server.stop()
