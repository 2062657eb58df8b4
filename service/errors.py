"""One error type with a code and a status; one envelope ``{"error": {code, message, details}}``."""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """Base of every error the API reports on purpose."""

    code = "internal_error"
    http_status = 500

    def __init__(self, message: str, details: Any = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.details = details
        self.headers = headers or {}


class ValidationFailed(ServiceError):
    code, http_status = "validation_error", 422


class PayloadTooLarge(ServiceError):
    code, http_status = "payload_too_large", 413


class Unauthorized(ServiceError):
    code, http_status = "unauthorized", 401


class Forbidden(ServiceError):
    code, http_status = "forbidden", 403


class NotFound(ServiceError):
    code, http_status = "not_found", 404


class Conflict(ServiceError):
    code, http_status = "conflict", 409


class Overloaded(ServiceError):
    code, http_status = "overloaded", 429


class NotReady(ServiceError):
    code, http_status = "not_ready", 503


def envelope(code: str, message: str, details: Any = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details}}
