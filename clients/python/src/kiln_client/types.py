"""What the API answers, as typed values (the raw JSON stays in ``raw``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


@dataclass
class DisplayData:
    """Rich output of a context exec: a MIME bundle. Binary types (such as
    ``image/png``) are base64 strings; ``kind`` is ``result`` for the value
    of the cell's trailing expression, ``display`` for what it displayed."""

    kind: str
    data: Dict[str, str]

    @property
    def text(self) -> Optional[str]:
        return self.data.get("text/plain")

    def png(self) -> Optional[bytes]:
        """The ``image/png`` bytes, if any."""
        import base64

        b64 = self.data.get("image/png")
        return base64.b64decode(b64) if b64 else None


@dataclass
class CellError:
    """The exception a context exec raised."""

    name: str
    value: str
    traceback: str


@dataclass
class ExecResult:
    """The result of a job, an exec, or a context exec."""

    id: str
    outcome: str
    exit_code: Optional[int]
    signal: Optional[int]
    stdout: str
    stderr: str
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    message: Optional[str] = None
    timings: Dict[str, Any] = field(default_factory=dict)
    usage: Dict[str, Any] = field(default_factory=dict)
    context: Optional[str] = None
    results: List[DisplayData] = field(default_factory=list)
    error: Optional[CellError] = None
    context_alive: Optional[bool] = None
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"

    @property
    def value(self) -> Optional[str]:
        """``text/plain`` of a context exec's trailing expression."""
        for d in self.results:
            if d.kind == "result":
                return d.text
        return None

    @classmethod
    def from_json(cls, v: Dict[str, Any]) -> "ExecResult":
        err = v.get("error")
        return cls(
            id=str(v.get("id", "")),
            outcome=str(v.get("outcome", "internal")),
            exit_code=v.get("exit_code"),
            signal=v.get("signal"),
            stdout=v.get("stdout", ""),
            stderr=v.get("stderr", ""),
            stdout_truncated=bool(v.get("stdout_truncated", False)),
            stderr_truncated=bool(v.get("stderr_truncated", False)),
            message=v.get("message"),
            timings=v.get("timings") or {},
            usage=v.get("usage") or {},
            context=v.get("context"),
            results=[DisplayData(d.get("kind", ""), d.get("data") or {}) for d in v.get("results") or []],
            error=CellError(err["name"], err["value"], err["traceback"]) if isinstance(err, dict) and "name" in err else None,
            context_alive=v.get("context_alive"),
            raw=v,
        )


@dataclass
class SandboxInfo:
    id: str
    template: str
    created_at: float
    expires_at: float
    ttl_s: float
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, v: Dict[str, Any]) -> "SandboxInfo":
        return cls(v["id"], v["template"], v["created_at"], v["expires_at"], v["ttl_s"], raw=v)


@dataclass
class ContextInfo:
    id: str
    sandbox_id: str
    language: str
    cwd: str
    state: str
    execs: int
    reason: Optional[str] = None
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, v: Dict[str, Any]) -> "ContextInfo":
        return cls(
            v["id"], v["sandbox_id"], v["language"], v.get("cwd", ""), v["state"], v.get("execs", 0), v.get("reason"), raw=v
        )


@dataclass
class Event:
    """One server-sent event: ``stdout``/``stderr`` (``data`` is the text),
    ``exit`` (``result``), ``metrics`` or ``end``."""

    event: str
    data: Dict[str, Any]

    @property
    def result(self) -> Optional[ExecResult]:
        return ExecResult.from_json(self.data) if self.event == "exit" else None
