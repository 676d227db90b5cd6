"""Typed exceptions for the API's error codes.

Every error answer of Kiln's API is ``{"error": {"code", "message",
"field"?}}``; :func:`from_response` turns it into the most specific class
here, so that callers can ``except NotFound`` rather than parse messages.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Type


class KilnError(Exception):
    """An error answer from Kiln (or no answer at all)."""

    def __init__(
        self,
        message: str,
        *,
        code: str = "unknown",
        status: int = 0,
        field: Optional[str] = None,
        retry_after: Optional[float] = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status
        self.field = field
        self.retry_after = retry_after

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, status={self.status}, message={self.message!r})"


class ConnectionFailed(KilnError):
    """The server could not be reached."""


class Unauthorized(KilnError):
    """401: the bearer token is missing or wrong."""


class InvalidRequest(KilnError):
    """400: a request field is wrong; ``field`` names it."""


class NotFound(KilnError):
    """404: no such job, sandbox, context or file."""


class Conflict(KilnError):
    """409: the resource is in a state that refuses the request."""


class ContextBusy(Conflict):
    """409 ``context_busy``: another exec runs in the context."""


class ContextDead(Conflict):
    """409 ``context_dead``: the context's interpreter died; restart it."""


class Unsupported(KilnError):
    """422: the server cannot do what was asked (e.g. ``allow_internet``)."""


class PayloadTooLarge(KilnError):
    """413: the body is larger than the server accepts."""


class Busy(KilnError):
    """429/503: at capacity or shutting down; ``retry_after`` says when to retry."""


class ServerError(KilnError):
    """5xx: Kiln failed, not the request."""


_BY_CODE: Dict[str, Type[KilnError]] = {
    "unauthorized": Unauthorized,
    "invalid_field": InvalidRequest,
    "malformed_json": InvalidRequest,
    "bad_body": InvalidRequest,
    "rejected": InvalidRequest,
    "unknown_runtime": InvalidRequest,
    "duplicate_id": Conflict,
    "not_found": NotFound,
    "file_error": NotFound,
    "context_busy": ContextBusy,
    "context_dead": ContextDead,
    "unsupported": Unsupported,
    "body_too_large": PayloadTooLarge,
    "busy": Busy,
    "too_many_sandboxes": Busy,
    "too_many_contexts": Busy,
    "shutting_down": Busy,
}

_BY_STATUS: Dict[int, Type[KilnError]] = {
    400: InvalidRequest,
    401: Unauthorized,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    422: Unsupported,
    429: Busy,
    503: Busy,
}


def from_response(status: int, body: Any, retry_after: Optional[str] = None) -> KilnError:
    """The exception for an error answer."""
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        err = {"message": str(body) if body else f"HTTP {status}"}
    code = str(err.get("code", "unknown"))
    cls = _BY_CODE.get(code) or _BY_STATUS.get(status) or (ServerError if status >= 500 else KilnError)
    ra: Optional[float] = None
    if retry_after:
        try:
            ra = float(retry_after)
        except ValueError:
            ra = None
    return cls(
        str(err.get("message", f"HTTP {status}")),
        code=code,
        status=status,
        field=err.get("field"),
        retry_after=ra,
    )
