"""Python client for Kiln: run code once, keep sandboxes, run cells in
stateful code contexts, stream output and live metrics; sync
(:class:`Kiln`) and async (:class:`AsyncKiln`); typed exceptions for the
API's error codes; jobs over AMQP in :mod:`kiln_client.amqp`."""

from .aio import AsyncContext, AsyncKiln, AsyncSandbox
from .client import Context, Kiln, Sandbox
from .errors import (
    Busy,
    Conflict,
    ConnectionFailed,
    ContextBusy,
    ContextDead,
    InvalidRequest,
    KilnError,
    NotFound,
    PayloadTooLarge,
    ServerError,
    Unauthorized,
    Unsupported,
)
from .types import CellError, ContextInfo, DisplayData, Event, ExecResult, SandboxInfo

__all__ = [
    "AsyncContext", "AsyncKiln", "AsyncSandbox", "Busy", "CellError", "Conflict", "ConnectionFailed",
    "Context", "ContextBusy", "ContextDead", "ContextInfo", "DisplayData", "Event", "ExecResult",
    "InvalidRequest", "Kiln", "KilnError", "NotFound", "PayloadTooLarge", "Sandbox", "SandboxInfo",
    "ServerError", "Unauthorized", "Unsupported",
]
