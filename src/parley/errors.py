"""Typed errors that reach clients, each with a stable snake_case code and HTTP status.

Services raise these; the HTTP and WebSocket edges turn them into the error envelope of API.md.
"""

from __future__ import annotations

from typing import Any


class ParleyError(Exception):
    status: int = 400
    code: str = "bad_request"
    message: str = "The request could not be processed."

    def __init__(
        self,
        message: str | None = None,
        *,
        code: str | None = None,
        retry_after: int | None = None,
        details: list[dict[str, Any]] | None = None,
    ) -> None:
        self.message = message or type(self).message
        if code is not None:
            self.code = code
        self.retry_after = retry_after
        self.details = details
        super().__init__(self.message)


class InvalidRequest(ParleyError):
    status = 422
    code = "invalid_request"
    message = "The request is invalid."


class Unauthorized(ParleyError):
    status = 401
    code = "unauthorized"
    message = "Authentication is required."


class InvalidCredentials(Unauthorized):
    code = "invalid_credentials"
    message = "The email or password is incorrect."


class Forbidden(ParleyError):
    status = 403
    code = "forbidden"
    message = "This action is not allowed."


class NotFound(ParleyError):
    status = 404
    code = "not_found"
    message = "Not found."


class Conflict(ParleyError):
    status = 409
    code = "conflict"
    message = "The request conflicts with the current state."


class PayloadTooLarge(ParleyError):
    status = 413
    code = "payload_too_large"
    message = "The request body is too large."


class RateLimited(ParleyError):
    status = 429
    code = "rate_limited"
    message = "Too many requests; retry later."


class ServiceUnavailable(ParleyError):
    status = 503
    code = "service_unavailable"
    message = "The service is temporarily unavailable."

    @classmethod
    def not_running(cls, draining: bool) -> ServiceUnavailable:
        """Work refused because the part that does it is not running yet (`starting`) or any more (`draining`)."""
        if draining:
            return cls("The service is draining; retry shortly.", code="draining", retry_after=1)
        return cls("The service is starting; retry shortly.", code="starting", retry_after=1)


class DatabaseUnavailable(ServiceUnavailable):
    code = "database_unavailable"
    message = "The database is unavailable; retry shortly."
