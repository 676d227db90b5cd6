"""kiln-client against a real `kiln serve` (KILN_URL and KILN_TOKEN name
it; tests/tests/python_client.rs starts one and runs this suite)."""

import asyncio
import os
import threading
import time

import pytest

import kiln_client
from kiln_client import AsyncKiln, ContextBusy, ContextDead, InvalidRequest, Kiln, NotFound, Unauthorized

URL = os.environ["KILN_URL"]
TOKEN = os.environ.get("KILN_TOKEN")


@pytest.fixture
def kiln():
    return Kiln(URL, TOKEN)


def test_run_returns_output_and_outcome(kiln):
    r = kiln.run("import sys\nprint(sys.stdin.read().upper())", stdin="hi")
    assert r.ok and r.stdout == "HI\n" and r.exit_code == 0
    r = kiln.run("echo $1; exit 3", runtime="bash", args=["a"])
    assert r.outcome == "error" and r.exit_code == 3 and r.stdout == "a\n"
    r = kiln.run("console.log(require('fs').readFileSync('in.txt', 'utf8'))", runtime="node", files={"in.txt": "from a file"})
    assert r.stdout == "from a file\n"
    r = kiln.run("while True: pass", timeout_ms=300)
    assert r.outcome == "timeout"


def test_errors_are_typed(kiln):
    with pytest.raises(InvalidRequest) as e:
        kiln.run("x", runtime="cobol")
    assert "cobol" in e.value.message
    with pytest.raises(InvalidRequest) as e:
        kiln.run("x", memory_mb=0)
    assert e.value.field == "limits.memory_mb"
    # Egress rules without a network, an image the server does not have.
    with pytest.raises(InvalidRequest) as e:
        kiln.run("x", egress={"allow": ["example.com"]})
    assert e.value.field == "egress"
    with pytest.raises(InvalidRequest) as e:
        kiln.run("x", image="nowhere/none:1")
    assert e.value.field == "image"
    with pytest.raises(NotFound):
        kiln.get_sandbox("no-such-sandbox")
    if TOKEN:
        with pytest.raises(Unauthorized):
            Kiln(URL, "wrong").sandboxes()


def test_a_sandbox_keeps_files_and_deletes_itself(kiln):
    with kiln.sandbox("python", ttl_s=120) as sb:
        sb.write_file("data/n.txt", "20")
        r = sb.exec("n = int(open('data/n.txt').read())\nopen('out.bin', 'wb').write(bytes([n, n + 1]))")
        assert r.ok, r
        assert sb.read_file("out.bin") == bytes([20, 21])
        assert any(s.id == sb.id for s in kiln.sandboxes())
        events = list(sb.exec_stream("echo one; echo two >&2", runtime="bash"))
        kinds = [e.event for e in events]
        assert "stdout" in kinds and "stderr" in kinds and kinds[-1] == "exit"
        assert events[-1].result.ok
        sample = next(sb.metrics())
        assert "memory_bytes" in sample or "cpu_usage_us" in sample, sample
        with pytest.raises(NotFound):
            sb.read_file("missing.txt")
        sid = sb.id
    assert all(s.id != sid for s in kiln.sandboxes())


def test_a_context_keeps_state_and_survives_an_interrupt(kiln):
    with kiln.sandbox("python", ttl_s=120, memory_mb=256) as sb:
        ctx = sb.context()
        assert ctx.run("x = 41").ok
        r = ctx.run("x + 1")
        assert r.value == "42" and r.context == ctx.id and r.context_alive
        r = ctx.run("1 / 0")
        assert r.outcome == "error" and r.error.name == "ZeroDivisionError"

        got = {}
        t = threading.Thread(target=lambda: got.setdefault("r", ctx.run("while True: pass")))
        t.start()
        for _ in range(400):
            if ctx.refresh().state == "running":
                break
            time.sleep(0.05)
        with pytest.raises(ContextBusy):
            ctx.run("x")
        assert ctx.interrupt()
        t.join(60)
        assert got["r"].outcome == "killed" and got["r"].error.name == "KeyboardInterrupt"
        assert ctx.run("x").value == "41"

        r = ctx.run("b = []\nwhile True: b.append(bytearray(1 << 20))")
        assert r.outcome == "oom" and r.context_alive is False
        with pytest.raises(ContextDead) as e:
            ctx.run("x")
        assert "restart" in e.value.message
        assert ctx.restart().state == "idle"
        assert ctx.run("'fresh'").value == "'fresh'"
        ctx.delete()
        assert sb.contexts() == []


def test_the_async_client_runs_calls_concurrently():
    async def main():
        kiln = AsyncKiln(URL, TOKEN)
        results = await asyncio.gather(*(kiln.run(f"print({i} * 2)") for i in range(3)))
        assert [r.stdout for r in results] == ["0\n", "2\n", "4\n"]
        async with await kiln.sandbox("python", ttl_s=60) as sb:
            ctx = await sb.context()
            await ctx.run("import math")
            r = await ctx.run("math.factorial(5)")
            assert r.value == "120"
            kinds = [e.event async for e in sb.exec_stream("print('s')")]
            assert kinds[-1] == "exit"

    asyncio.run(main())


def test_the_package_exports_its_api():
    for name in ("Kiln", "AsyncKiln", "Sandbox", "Context", "ExecResult", "KilnError"):
        assert hasattr(kiln_client, name)


def test_the_amqp_helper_publishes_jobs_and_awaits_their_replies():
    # Needs the daemon's AMQP intake: tests/tests/python_client.rs sets
    # these; without them this test fails rather than passing unseen.
    url = os.environ.get("KILN_AMQP_URL")
    queue = os.environ.get("KILN_AMQP_QUEUE")
    assert url and queue, "KILN_AMQP_URL and KILN_AMQP_QUEUE must name the daemon's broker and queue"
    from kiln_client.amqp import AmqpJobs

    with AmqpJobs(url, queue) as jobs:
        ids = [jobs.publish({"runtime": "python", "code": f"print({i} + 1)"}) for i in range(3)]
        results = [jobs.result(cid, timeout_s=120) for cid in ids]
        assert [r.stdout for r in results] == ["1\n", "2\n", "3\n"]
        r = jobs.run({"runtime": "bash", "code": "exit 4"}, timeout_s=120)
        assert r.outcome == "error" and r.exit_code == 4
