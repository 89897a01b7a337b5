"""The error envelope of API.md and the mapping of every exception to it.

`{"error": {"code", "message", "request_id", "details"?}}`; nothing internal (traces, SQL, class names) ever
reaches a client. Unexpected exceptions become 500 `internal_error`; a database outage becomes 503.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response
from starlette.types import Scope

from parley.errors import DatabaseUnavailable, ParleyError
from parley.storage.database import is_database_unavailable, is_invalid_data

_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
}


def request_id_of(scope: Scope) -> str:
    state = scope.get("state") or {}
    return str(state.get("request_id", ""))


def error_response(
    scope: Scope,
    status: int,
    code: str,
    message: str,
    *,
    details: list[dict[str, Any]] | None = None,
    retry_after: int | None = None,
) -> Response:
    body: dict[str, Any] = {"code": code, "message": message, "request_id": request_id_of(scope)}
    if details is not None:
        body["details"] = details
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def response_for_parley_error(scope: Scope, exc: ParleyError) -> Response:
    return error_response(scope, exc.status, exc.code, exc.message, details=exc.details,
                          retry_after=exc.retry_after)


def response_for_unexpected(scope: Scope, exc: BaseException, retry_after_s: int) -> Response:
    """The answer for an exception no handler claimed: 503 for a database outage, else a bare 500."""
    if is_database_unavailable(exc):
        unavailable = DatabaseUnavailable(retry_after=retry_after_s)
        return response_for_parley_error(scope, unavailable)
    if is_invalid_data(exc):
        return error_response(scope, 422, "invalid_request", "The request holds a value that cannot be stored.")
    return error_response(scope, 500, "internal_error", "An internal error occurred; it has been logged.")


def _validation_details(exc: RequestValidationError) -> list[dict[str, Any]]:
    details = []
    for error in exc.errors():
        location = [str(part) for part in error.get("loc", ())]
        details.append({"field": ".".join(location), "message": str(error.get("msg", "invalid")),
                        "type": str(error.get("type", "invalid"))})
    return details


def install_error_handlers(app: FastAPI) -> None:
    async def on_parley_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ParleyError)
        return response_for_parley_error(request.scope, exc)

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return error_response(request.scope, 422, "invalid_request", "The request is invalid.",
                              details=_validation_details(exc))

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = _STATUS_CODES.get(exc.status_code, "http_error")
        message = exc.detail if isinstance(exc.detail, str) and exc.status_code != 404 else "Not found."
        response = error_response(request.scope, exc.status_code, code, message)
        for name, value in (exc.headers or {}).items():
            response.headers[name] = value
        return response

    app.add_exception_handler(ParleyError, on_parley_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
