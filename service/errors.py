"""The errors the service reports on purpose: a stable ``code``, a message that says how to fix
it, and ``details`` (the field and reason, limits, ids).

They say what went wrong, not how HTTP says it: the engine raises them whether it is called
through the API or as a library, and ``service/api.py`` alone maps each code to a status.
"""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """Base of every error reported on purpose; ``retry_after_s`` when retrying will help."""

    code = "internal_error"

    def __init__(
        self, message: str, details: Any = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        self.retry_after_s = retry_after_s


class ValidationFailed(ServiceError):
    code = "validation_error"


class PayloadTooLarge(ServiceError):
    code = "payload_too_large"


class Unauthorized(ServiceError):
    code = "unauthorized"


class Forbidden(ServiceError):
    code = "forbidden"


class NotFound(ServiceError):
    code = "not_found"


class Conflict(ServiceError):
    code = "conflict"


class Overloaded(ServiceError):
    code = "overloaded"


class NotReady(ServiceError):
    code = "not_ready"
