"""The error envelope, request ids and security headers on every response (incident pattern 3)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from fastapi import FastAPI

from parley.app import create_app
from parley.http.deps import SessionDep
from parley.settings import Settings
from tests.conftest import SettingsFactory
from tests.support.clients import Account
from tests.support.live import LiveServer, wait_for

SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
}


def assert_security_headers(response: httpx.Response) -> None:
    for name, value in SECURITY_HEADERS.items():
        assert response.headers.get(name) == value, f"{name} missing on {response.status_code}"
    assert "content-security-policy" in response.headers


def assert_envelope(response: httpx.Response, status: int, code: str) -> dict[str, object]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert error["request_id"] == response.headers["x-request-id"]
    return dict(error)


class Boom(Exception):
    pass


def app_with_failing_routes(settings: Settings) -> FastAPI:
    app = create_app(settings)

    @app.get("/api/test/boom")
    async def boom() -> None:
        raise Boom("secret internal detail: SELECT * FROM users")

    @app.get("/api/test/boom-with-session")
    async def boom_with_session(session: SessionDep) -> None:
        raise KeyError("thread 42 in /srv/parley/secret.py")

    return app


@pytest.fixture
def failing_server(make_settings: SettingsFactory) -> Iterator[LiveServer]:
    settings = make_settings(hsts_max_age_s=31536000)
    server = LiveServer(settings, app_with_failing_routes(settings)).start()
    yield server
    server.stop()


def test_pattern3_forced_exception_gives_clean_500_with_every_security_header(
        failing_server: LiveServer, log_records: list) -> None:
    with httpx.Client(base_url=failing_server.url) as client:
        for path in ("/api/test/boom", "/api/test/boom-with-session"):
            response = client.get(path)
            error = assert_envelope(response, 500, "internal_error")
            assert_security_headers(response)
            assert response.headers["strict-transport-security"].startswith("max-age=31536000")
            for leak in ("SELECT", "secret", "Boom", "KeyError", "Traceback", "/srv/"):
                assert leak not in response.text
            assert set(error) == {"code", "message", "request_id"}
        # The server is still healthy and answering afterwards.
        assert client.get("/health/live").json() == {"status": "ok"}
    failures = [r for r in list(log_records) if isinstance(r.msg, dict) and r.msg.get("event") == "request_failed"]
    assert len(failures) == 2 and all(r.msg.get("exc_info") for r in failures)  # operators get the traceback


def test_security_headers_on_404_422_401_and_health(client: httpx.Client, account: Account) -> None:
    cases = [
        (client.get("/no/such/route"), 404, "not_found"),
        (client.get("/api/threads?limit=0", headers=account.headers), 422, "invalid_request"),
        (client.get("/api/threads"), 401, "unauthorized"),
        (client.delete("/health/live"), 405, "method_not_allowed"),
    ]
    for response, status, code in cases:
        assert_envelope(response, status, code)
        assert_security_headers(response)
    assert_security_headers(client.get("/health"))


def test_request_id_is_echoed_when_valid_and_generated_otherwise(client: httpx.Client) -> None:
    echoed = client.get("/health/live", headers={"X-Request-ID": "abc-123.xyz"})
    assert echoed.headers["x-request-id"] == "abc-123.xyz"
    for bad in ("bad id with spaces", "x" * 129, "<script>"):
        replaced = client.get("/health/live", headers={"X-Request-ID": bad})
        assert replaced.headers["x-request-id"] != bad
        assert len(replaced.headers["x-request-id"]) == 26


def test_malformed_json_and_oversized_bodies(client: httpx.Client, account: Account,
                                             make_settings: SettingsFactory) -> None:
    broken = client.post("/api/threads", content=b"{not json", headers={**account.headers,
                                                                        "Content-Type": "application/json"})
    assert_envelope(broken, 422, "invalid_request")
    extra = client.post("/api/threads", json={"title": "x", "unexpected": 1}, headers=account.headers)
    assert_envelope(extra, 422, "invalid_request")
    big = client.post("/api/threads", content=b'{"title": "' + b"x" * 2_000_000 + b'"}',
                      headers={**account.headers, "Content-Type": "application/json"})
    assert_envelope(big, 413, "payload_too_large")
    assert_security_headers(big)

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is enforced while streaming
        yield b'{"title": "'
        for _ in range(40):
            yield b"x" * 65536
        yield b'"}'

    streamed = client.post("/api/threads", content=chunks(),
                           headers={**account.headers, "Content-Type": "application/json"})
    assert_envelope(streamed, 413, "payload_too_large")


def test_every_request_is_one_structured_log_line(client: httpx.Client, account: Account,
                                                  log_records: list) -> None:
    thread = client.post("/api/threads", json={}, headers=account.headers).json()
    client.get(f"/api/threads/{thread['id']}", headers={**account.headers, "X-Request-ID": "trace-me"})

    def request_lines() -> list[dict[str, object]]:
        return [r.msg for r in list(log_records) if isinstance(r.msg, dict)
                and r.msg.get("request_id") == "trace-me" and r.msg.get("event") == "request"]

    lines = wait_for(request_lines, message="the request's log line")  # written just after the response
    assert len(lines) == 1
    line = lines[0]
    assert line["route"] == "/api/threads/{thread_id}" and line["status"] == 200
    assert line["user_id"] == account.id and line["method"] == "GET"
    assert isinstance(line["duration_ms"], float)
    for record in log_records:  # no secret ever reaches a log line
        assert account.access_token not in str(record.msg)
        assert account.password not in str(record.msg)


def test_cors_is_off_by_default_and_configurable(client: httpx.Client, make_settings: SettingsFactory) -> None:
    preflight = {"Origin": "https://app.example.com", "Access-Control-Request-Method": "GET"}
    assert "access-control-allow-origin" not in client.options("/api/threads", headers=preflight).headers
    server = LiveServer(make_settings(cors_origins="https://app.example.com")).start()
    try:
        response = httpx.options(f"{server.url}/api/threads", headers=preflight)
        assert response.headers["access-control-allow-origin"] == "https://app.example.com"
        assert_security_headers(response)
        other = httpx.options(f"{server.url}/api/threads",
                              headers={**preflight, "Origin": "https://evil.example.com"})
        assert "access-control-allow-origin" not in other.headers
    finally:
        server.stop()
