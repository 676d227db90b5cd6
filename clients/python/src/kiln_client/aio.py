"""The asynchronous client: the same API as :mod:`kiln_client.client`, each
call awaited (it runs the blocking call on a worker thread, so many calls
can be in flight at once)."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Dict, List, Optional, Union

from .client import Context, Kiln, Sandbox
from .types import ContextInfo, Event, ExecResult, SandboxInfo


async def _iterate(make) -> AsyncIterator[Any]:
    it = await asyncio.to_thread(make)
    sentinel = object()
    while True:
        v = await asyncio.to_thread(next, it, sentinel)
        if v is sentinel:
            return
        yield v


class AsyncKiln:
    """``await kiln.run(...)``; ``async with await kiln.sandbox() as sb``."""

    def __init__(self, url: str = "http://127.0.0.1:8080", token: Optional[str] = None, timeout: float = 900.0) -> None:
        self.sync = Kiln(url, token, timeout)

    async def run(self, code: str, runtime: str = "python", **kw: Any) -> ExecResult:
        return await asyncio.to_thread(self.sync.run, code, runtime, **kw)

    async def sandbox(self, template: str = "python", **kw: Any) -> "AsyncSandbox":
        return AsyncSandbox(await asyncio.to_thread(self.sync.sandbox, template, **kw))

    async def sandboxes(self) -> List[SandboxInfo]:
        return await asyncio.to_thread(self.sync.sandboxes)

    async def runtimes(self) -> List[Dict[str, Any]]:
        return await asyncio.to_thread(self.sync.runtimes)


class AsyncSandbox:
    def __init__(self, sandbox: Sandbox) -> None:
        self.sync = sandbox
        self.id = sandbox.id
        self.info = sandbox.info

    async def __aenter__(self) -> "AsyncSandbox":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await asyncio.to_thread(self.sync.delete, True)

    async def exec(self, code: str, runtime: Optional[str] = None, **kw: Any) -> ExecResult:
        ctx = kw.get("context")
        if isinstance(ctx, AsyncContext):
            kw["context"] = ctx.sync
        return await asyncio.to_thread(self.sync.exec, code, runtime, **kw)

    def exec_stream(self, code: str, runtime: Optional[str] = None, **kw: Any) -> AsyncIterator[Event]:
        return _iterate(lambda: self.sync.exec_stream(code, runtime, **kw))

    def metrics(self) -> AsyncIterator[Dict[str, Any]]:
        return _iterate(self.sync.metrics)

    async def write_file(self, path: str, data: Union[str, bytes]) -> None:
        await asyncio.to_thread(self.sync.write_file, path, data)

    async def read_file(self, path: str) -> bytes:
        return await asyncio.to_thread(self.sync.read_file, path)

    async def context(self, language: Optional[str] = None, cwd: Optional[str] = None) -> "AsyncContext":
        return AsyncContext(await asyncio.to_thread(self.sync.context, language, cwd))

    async def delete(self) -> None:
        await asyncio.to_thread(self.sync.delete)


class AsyncContext:
    def __init__(self, context: Context) -> None:
        self.sync = context
        self.id = context.id

    async def run(self, code: str, **kw: Any) -> ExecResult:
        return await asyncio.to_thread(self.sync.run, code, **kw)

    async def interrupt(self) -> bool:
        return await asyncio.to_thread(self.sync.interrupt)

    async def restart(self) -> ContextInfo:
        return await asyncio.to_thread(self.sync.restart)

    async def delete(self) -> None:
        await asyncio.to_thread(self.sync.delete)
