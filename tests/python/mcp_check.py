"""Kiln's MCP server seen by the official MCP Python SDK (`mcp`), over
Streamable HTTP (`/mcp` of a real `kiln serve`) and over stdio (`kiln mcp`
bridged to it). Run by tests/tests/mcp_python.rs; exits non-zero with the
failed check on stderr.

usage: mcp_check.py http|stdio BASE_URL TOKEN KILN_BINARY
"""

import asyncio
import sys
from contextlib import asynccontextmanager

from mcp import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

MODE, BASE, TOKEN, KILN = sys.argv[1:5]

TOOLS = {
    "run_code", "create_sandbox", "exec", "write_file", "read_file",
    "list_files", "delete_sandbox", "list_sandboxes",
}


def text(result):
    return "\n".join(c.text for c in result.content if getattr(c, "type", "") == "text")


def check(cond, what, result=None):
    if not cond:
        detail = "" if result is None else f"\n--- result ---\n{result}"
        raise SystemExit(f"FAILED: {what}{detail}")
    print(f"ok: {what}")


@asynccontextmanager
async def session():
    if MODE == "http":
        client = create_mcp_http_client(headers={"Authorization": f"Bearer {TOKEN}"})
        async with client, streamable_http_client(BASE + "/mcp", http_client=client) as (r, w):
            async with ClientSession(r, w) as s:
                await s.initialize()
                yield s
    else:
        params = StdioServerParameters(
            command=KILN, args=["mcp", "--server", BASE], env={"KILN_TOKEN": TOKEN}
        )
        async with stdio_client(params) as (r, w):
            async with ClientSession(r, w) as s:
                await s.initialize()
                yield s


async def modern_client():
    # The SDK's high-level Client negotiates the newest version it can;
    # Kiln offers versions with sessions only, so it settles on one and a
    # sandbox stays its own from call to call.
    from mcp.client import Client

    if MODE == "http":
        hc = create_mcp_http_client(headers={"Authorization": f"Bearer {TOKEN}"})
        server = streamable_http_client(BASE + "/mcp", http_client=hc)
    else:
        hc = None
        server = StdioServerParameters(command=KILN, args=["mcp", "--server", BASE], env={"KILN_TOKEN": TOKEN})
    try:
        async with Client(server) as c:
            r = await c.call_tool("create_sandbox", {})
            check(not r.is_error, "create_sandbox with the high-level Client", r)
            sid = next(line.split(": ", 1)[1] for line in text(r).splitlines() if line.startswith("sandbox_id: "))
            r = await c.call_tool("exec", {"sandbox_id": sid, "code": "print('mine')"})
            check(not r.is_error and "mine" in text(r), "the high-level Client keeps its sandbox between calls", r)
            await c.call_tool("delete_sandbox", {"sandbox_id": sid})
    finally:
        if hc is not None:
            await hc.aclose()


async def main():
    async with session() as s:
        tools = (await s.list_tools()).tools
        names = {t.name for t in tools}
        check(TOOLS <= names, f"all tools listed ({sorted(names)})")
        for t in tools:
            check(t.description and len(t.description) > 30, f"{t.name} has a description")
            check(t.input_schema.get("type") == "object", f"{t.name} has an input schema")

        for lang, code, want in (
            ("python", "print(6 * 7)", "42"),
            ("node", "console.log([1,2,3].map(x => x * 2).join(','))", "2,4,6"),
            ("bash", "echo $((40 + 2))", "42"),
        ):
            r = await s.call_tool("run_code", {"language": lang, "code": code})
            check(not r.is_error and want in text(r), f"run_code {lang}", r)

        r = await s.call_tool("run_code", {"language": "python", "code": "raise SystemExit(3)"})
        check(r.is_error and "exit code 3" in text(r), "a failing program is a tool error naming its exit code", r)

        # Bad arguments are tool errors, not protocol errors.
        r = await s.call_tool("run_code", {"code": "print(1)"})
        check(r.is_error and "language" in text(r), "a missing argument is a tool error naming it", r)
        r = await s.call_tool("run_code", {"language": "cobol", "code": "x"})
        check(r.is_error and "cobol" in text(r), "an unknown language is a tool error", r)
        # This server has no sandbox networking: asking for it is refused,
        # naming what was asked, and so is an image the server does not have.
        r = await s.call_tool("run_code", {"language": "python", "code": "print(1)", "allow_internet": True})
        check(r.is_error and "allow_internet" in text(r), "run_code refuses allow_internet where networking is off", r)
        r = await s.call_tool("run_code", {"language": "python", "code": "print(1)", "image": "nowhere/none:1"})
        check(r.is_error and "image" in text(r), "run_code refuses an image the server does not have", r)

        r = await s.call_tool("create_sandbox", {"template": "python", "ttl_s": 300})
        check(not r.is_error, "create_sandbox", r)
        sid = next(line.split(": ", 1)[1] for line in text(r).splitlines() if line.startswith("sandbox_id: "))

        r = await s.call_tool("write_file", {"sandbox_id": sid, "path": "data/n.txt", "content": "20"})
        check(not r.is_error, "write_file", r)
        r = await s.call_tool("exec", {"sandbox_id": sid, "code": "n = int(open('data/n.txt').read())\nopen('out.txt', 'w').write(str(n + 1))\nprint('wrote', n + 1)"})
        check(not r.is_error and "wrote 21" in text(r), "exec reads the file and writes another", r)
        r = await s.call_tool("read_file", {"sandbox_id": sid, "path": "out.txt"})
        check(not r.is_error and text(r) == "21", "read_file reads it back", r)
        r = await s.call_tool("list_files", {"sandbox_id": sid})
        check(not r.is_error and "data/n.txt" in text(r) and "out.txt" in text(r), "list_files", r)
        r = await s.call_tool("read_file", {"sandbox_id": sid, "path": "missing.txt"})
        check(r.is_error, "reading a missing file is a tool error", r)

        # Stateful execs keep the interpreter.
        r = await s.call_tool("exec", {"sandbox_id": sid, "code": "x = 41", "stateful": True})
        check(not r.is_error, "stateful exec", r)
        r = await s.call_tool("exec", {"sandbox_id": sid, "code": "x + 1", "stateful": True})
        check(not r.is_error and "--- result ---\n42" in text(r), "the state persists and the value comes back", r)

        # A figure comes back as an image block next to the text.
        r = await s.call_tool("exec", {"sandbox_id": sid, "stateful": True, "code": "import matplotlib.pyplot as plt\nplt.plot([1, 2], [3, 4])\n'plotted'"})
        images = [c for c in r.content if getattr(c, "type", "") == "image"]
        check(not r.is_error and images and images[0].mime_type == "image/png", "a stateful plot returns a PNG image", r)

        r = await s.call_tool("run_code", {"language": "python", "code": "print(input()[::-1])", "stdin": "olleh\n", "files": [{"path": "f.txt", "content": "x"}]})
        check(not r.is_error and "hello" in text(r), "run_code takes stdin and files", r)

        # Long output is cut for the model and kept whole as a resource.
        r = await s.call_tool("exec", {"sandbox_id": sid, "code": "print('z' * 100000)"})
        t = text(r)
        check("truncated" in t and "kiln://output/" in t, "long output is truncated with a note", r)
        uri = t[t.index("kiln://output/"):].split()[0]
        res = await s.read_resource(uri)
        check(res.contents[0].text.count("z") == 100000, "the whole output is behind the resource URI")

        r = await s.call_tool("list_sandboxes", {})
        check(sid in text(r), "list_sandboxes shows it", r)

        # Another session cannot use this session's sandbox.
        async with session() as other:
            r = await other.call_tool("exec", {"sandbox_id": sid, "code": "print(1)"})
            check(r.is_error and "not one of this session" in text(r), "another session is refused", r)
            r = await other.call_tool("list_sandboxes", {})
            check(sid not in text(r), "another session does not list it", r)

        r = await s.call_tool("delete_sandbox", {"sandbox_id": sid})
        check(not r.is_error, "delete_sandbox", r)
        r = await s.call_tool("exec", {"sandbox_id": sid, "code": "print(1)"})
        check(r.is_error, "a deleted sandbox is a tool error", r)

        # A sandbox left at the end of the session dies with it.
        r = await s.call_tool("create_sandbox", {})
        check(not r.is_error, "create a sandbox to leave behind", r)
        left = next(line.split(": ", 1)[1] for line in text(r).splitlines() if line.startswith("sandbox_id: "))
    await modern_client()
    print(f"left {left}")


asyncio.run(main())
