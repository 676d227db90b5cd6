"""The synchronous client: :class:`Kiln`, :class:`Sandbox`, :class:`Context`.

Only the standard library is used (``urllib``); event streams (exec output
as it happens, live metrics) are read line by line from the response.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Dict, Iterator, List, Mapping, Optional, Union

from .errors import ConnectionFailed, KilnError, from_response
from .types import ContextInfo, Event, ExecResult, SandboxInfo

Files = Union[Mapping[str, Union[str, bytes]], None]


def _files(files: Files) -> List[Dict[str, Any]]:
    out = []
    for path, content in (files or {}).items():
        if isinstance(content, bytes):
            out.append({"path": path, "content": base64.b64encode(content).decode(), "encoding": "base64"})
        else:
            out.append({"path": path, "content": content})
    return out


def _limits(timeout_ms: Optional[int], memory_mb: Optional[int], output_bytes: Optional[int]) -> Dict[str, int]:
    lim: Dict[str, int] = {}
    if timeout_ms is not None:
        lim["timeout_ms"] = timeout_ms
    if memory_mb is not None:
        lim["memory_mb"] = memory_mb
    if output_bytes is not None:
        lim["output_bytes"] = output_bytes
    return lim


class Kiln:
    """A connection to a Kiln server.

    >>> kiln = Kiln("http://127.0.0.1:8080", token="...")
    >>> kiln.run("print(6 * 7)").stdout
    '42\\n'
    """

    def __init__(self, url: str = "http://127.0.0.1:8080", token: Optional[str] = None, timeout: float = 900.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    # -- plumbing ---------------------------------------------------------

    def _request(self, method: str, path: str, body: Any = None, *, raw: Optional[bytes] = None, accept: Optional[str] = None):
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json" if raw is None else "application/octet-stream")
        if accept:
            req.add_header("Accept", accept)
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            return urllib.request.urlopen(req, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            text = e.read()
            try:
                parsed: Any = json.loads(text)
            except ValueError:
                parsed = text.decode(errors="replace")
            raise from_response(e.code, parsed, e.headers.get("Retry-After")) from None
        except (urllib.error.URLError, OSError) as e:
            raise ConnectionFailed(f"cannot reach Kiln at {self.url}: {e}", code="connection_failed") from None

    def _json(self, method: str, path: str, body: Any = None) -> Any:
        with self._request(method, path, body) as r:
            text = r.read()
        return json.loads(text) if text else None

    def _events(self, method: str, path: str, body: Any = None) -> Iterator[Event]:
        with self._request(method, path, body, accept="text/event-stream") as r:
            name, data = "message", []
            for line in r:
                line = line.decode().rstrip("\r\n")
                if not line:
                    if data:
                        yield Event(name, json.loads("\n".join(data)))
                    name, data = "message", []
                elif line.startswith(":"):
                    continue
                elif line.startswith("event:"):
                    name = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].lstrip(" "))

    # -- jobs ---------------------------------------------------------------

    def run(
        self,
        code: str,
        runtime: str = "python",
        *,
        files: Files = None,
        stdin: Optional[str] = None,
        args: Optional[List[str]] = None,
        env: Optional[Mapping[str, str]] = None,
        timeout_ms: Optional[int] = None,
        memory_mb: Optional[int] = None,
        output_bytes: Optional[int] = None,
        image: Optional[str] = None,
        allow_internet: bool = False,
        egress: Optional[Mapping[str, List[str]]] = None,
    ) -> ExecResult:
        """Runs ``code`` once in a fresh sandbox and returns its result.

        ``image``: an OCI image the server has (or may pull) to run in;
        ``allow_internet``: a network under the server's egress rules, or
        under ``egress`` (``{"allow": [...], "deny": [...]}``).
        """
        body: Dict[str, Any] = {"runtime": runtime, "code": code, "files": _files(files)}
        if image is not None:
            body["image"] = image
        if allow_internet:
            body["allow_internet"] = True
        if egress is not None:
            body["egress"] = {k: list(v) for k, v in egress.items()}
        if stdin is not None:
            body["stdin"] = stdin
        if args:
            body["args"] = list(args)
        if env:
            body["env"] = dict(env)
        lim = _limits(timeout_ms, memory_mb, output_bytes)
        if lim:
            body["limits"] = lim
        return ExecResult.from_json(self._json("POST", "/v1/jobs", body))

    def runtimes(self) -> List[Dict[str, Any]]:
        """The server's runtimes (Piston's shape: language, version, aliases)."""
        return self._json("GET", "/api/v2/runtimes")

    # -- sandboxes ----------------------------------------------------------

    def sandbox(
        self,
        template: str = "python",
        *,
        ttl_s: Optional[float] = None,
        allow_internet: bool = False,
        cpus: Optional[float] = None,
        memory_mb: Optional[int] = None,
        env: Optional[Mapping[str, str]] = None,
        image: Optional[str] = None,
        egress: Optional[Mapping[str, List[str]]] = None,
    ) -> "Sandbox":
        """Creates a sandbox; use it as a context manager to delete it at the end."""
        body: Dict[str, Any] = {"template": template, "allow_internet": allow_internet}
        if image is not None:
            body["image"] = image
        if egress is not None:
            body["egress"] = {k: list(v) for k, v in egress.items()}
        if ttl_s is not None:
            body["ttl_s"] = ttl_s
        if cpus is not None:
            body["cpus"] = cpus
        if memory_mb is not None:
            body["memory_mb"] = memory_mb
        if env:
            body["env"] = dict(env)
        info = SandboxInfo.from_json(self._json("POST", "/v1/sandboxes", body))
        return Sandbox(self, info)

    def sandboxes(self) -> List[SandboxInfo]:
        return [SandboxInfo.from_json(v) for v in self._json("GET", "/v1/sandboxes")["sandboxes"]]

    def get_sandbox(self, sandbox_id: str) -> "Sandbox":
        return Sandbox(self, SandboxInfo.from_json(self._json("GET", f"/v1/sandboxes/{sandbox_id}")))


class Sandbox:
    """A sandbox that lives across execs until :meth:`delete` or its TTL."""

    def __init__(self, kiln: Kiln, info: SandboxInfo) -> None:
        self.kiln = kiln
        self.info = info
        self.id = info.id

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.delete(missing_ok=True)

    def _path(self, rest: str = "") -> str:
        return f"/v1/sandboxes/{self.id}{rest}"

    def _exec_body(self, code: str, runtime, files, stdin, timeout_ms, output_bytes, context) -> Dict[str, Any]:
        body: Dict[str, Any] = {"code": code, "files": _files(files)}
        if runtime is not None:
            body["runtime"] = runtime
        if stdin is not None:
            body["stdin"] = stdin
        if context is not None:
            body["context"] = context.id if isinstance(context, Context) else context
        lim = _limits(timeout_ms, None, output_bytes)
        if lim:
            body["limits"] = lim
        return body

    def exec(
        self,
        code: str,
        runtime: Optional[str] = None,
        *,
        files: Files = None,
        stdin: Optional[str] = None,
        timeout_ms: Optional[int] = None,
        output_bytes: Optional[int] = None,
        context: Union["Context", str, None] = None,
    ) -> ExecResult:
        """Runs ``code`` in the sandbox (in ``context``'s interpreter if given)."""
        body = self._exec_body(code, runtime, files, stdin, timeout_ms, output_bytes, context)
        return ExecResult.from_json(self.kiln._json("POST", self._path("/exec"), body))

    def exec_stream(self, code: str, runtime: Optional[str] = None, **kw: Any) -> Iterator[Event]:
        """Like :meth:`exec`, yielding ``stdout``/``stderr`` events as they
        happen and the ``exit`` event (with ``.result``) last."""
        body = self._exec_body(
            code, runtime, kw.get("files"), kw.get("stdin"), kw.get("timeout_ms"), kw.get("output_bytes"), kw.get("context")
        )
        for ev in self.kiln._events("POST", self._path("/exec"), body):
            if ev.event == "error":
                err = ev.data.get("error", {})
                raise from_response(409 if "context" in err.get("code", "") else 500, ev.data)
            yield ev

    def write_file(self, path: str, data: Union[str, bytes]) -> None:
        raw = data.encode() if isinstance(data, str) else data
        with self.kiln._request("PUT", self._path("/files/" + urllib.parse.quote(path)), raw=raw):
            pass

    def read_file(self, path: str) -> bytes:
        with self.kiln._request("GET", self._path("/files/" + urllib.parse.quote(path))) as r:
            return r.read()

    def context(self, language: Optional[str] = None, cwd: Optional[str] = None) -> "Context":
        """Starts a code context: a long-lived interpreter whose state
        persists between :meth:`Context.run` calls."""
        body: Dict[str, Any] = {}
        if language:
            body["language"] = language
        if cwd:
            body["cwd"] = cwd
        return Context(self, ContextInfo.from_json(self.kiln._json("POST", self._path("/contexts"), body)))

    def contexts(self) -> List[ContextInfo]:
        return [ContextInfo.from_json(v) for v in self.kiln._json("GET", self._path("/contexts"))["contexts"]]

    def metrics(self) -> Iterator[Dict[str, Any]]:
        """Live figures (CPU, memory, disk, network) once a second until the
        sandbox ends."""
        for ev in self.kiln._events("GET", self._path("/metrics")):
            if ev.event == "metrics":
                yield ev.data
            elif ev.event == "end":
                return

    def refresh(self) -> SandboxInfo:
        self.info = SandboxInfo.from_json(self.kiln._json("GET", self._path()))
        return self.info

    def delete(self, missing_ok: bool = False) -> None:
        try:
            self.kiln._json("DELETE", self._path())
        except KilnError as e:
            if not (missing_ok and e.status == 404):
                raise


class Context:
    """A code context in a sandbox (see :meth:`Sandbox.context`)."""

    def __init__(self, sandbox: Sandbox, info: ContextInfo) -> None:
        self.sandbox = sandbox
        self.info = info
        self.id = info.id

    def __enter__(self) -> "Context":
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self.delete()
        except KilnError:
            pass

    def _path(self, rest: str = "") -> str:
        return self.sandbox._path(f"/contexts/{self.id}{rest}")

    def run(self, code: str, *, timeout_ms: Optional[int] = None, output_bytes: Optional[int] = None, files: Files = None) -> ExecResult:
        """Runs one cell; ``.value`` of the result is its trailing expression's repr."""
        return self.sandbox.exec(code, files=files, timeout_ms=timeout_ms, output_bytes=output_bytes, context=self)

    def interrupt(self) -> bool:
        """SIGINT to the running cell (KeyboardInterrupt); the state stays."""
        return bool(self.sandbox.kiln._json("POST", self._path("/interrupt"), {})["interrupted"])

    def restart(self) -> ContextInfo:
        self.info = ContextInfo.from_json(self.sandbox.kiln._json("POST", self._path("/restart"), {}))
        return self.info

    def refresh(self) -> ContextInfo:
        self.info = ContextInfo.from_json(self.sandbox.kiln._json("GET", self._path()))
        return self.info

    def delete(self) -> None:
        self.sandbox.kiln._json("DELETE", self._path())
