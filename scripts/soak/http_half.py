"""The HTTP half of the soak: a mix of jobs through `kiln serve`'s HTTP API,
each checked against the outcome it must have: `ok` (its stdout computed
here too), `timeout`, `oom`, `killed` at the output cap, and `killed` by
deleting the workspace it runs in (`DELETE /v1/sandboxes/{id}` during an
exec). A plain HTTP/1.1 client (the standard library's), no Kiln code.
"""

import collections
import hashlib
import http.client
import json
import threading
import time

KINDS = [
    # (kind, share of the jobs)
    ("ok", 0.70),
    ("timeout", 0.08),
    ("oom", 0.08),
    ("output-cap", 0.08),
    ("deleted", 0.06),
]

OUTPUT_CAP = 1024


def kind_of(rng):
    x, acc = rng.random(), 0.0
    for k, share in KINDS:
        acc += share
        if x < acc:
            return k
    return KINDS[0][0]


def job(i, kind, rng):
    """(body, check) for job `i` of `kind`; check(result) -> None or what is wrong."""
    if kind == "ok":
        if rng.random() < 0.5:
            a, b = rng.randrange(1, 10**6), rng.randrange(1, 10**6)
            return ({"runtime": "bash", "code": f"echo $(( {a} * {b} - {i} ))"},
                    expect("ok", stdout=f"{a * b - i}\n"))
        word = f"http-{i}-{rng.randrange(10**9)}"
        return ({"runtime": "python",
                 "code": f"import hashlib\nprint(hashlib.sha256(b'{word}').hexdigest())"},
                expect("ok", stdout=hashlib.sha256(word.encode()).hexdigest() + "\n"))
    if kind == "timeout":
        ms = rng.randrange(150, 300)
        return ({"runtime": "bash", "code": "echo started; sleep 30",
                 "limits": {"timeout_ms": ms}},
                # On a busy host the deadline can come before Bash printed.
                expect("timeout", stdout_prefix_of="started\n"))
    if kind == "oom":
        # Touches 128 MiB in a 48 MiB sandbox: the cgroup's OOM killer acts.
        return ({"runtime": "python", "code": "b = b'k' * (128 << 20)\nprint(len(b))",
                 "limits": {"memory_mb": 48}},
                expect("oom"))
    if kind == "output-cap":
        return ({"runtime": "bash", "code": "yes kiln-soak | head -c 200000",
                 "limits": {"output_bytes": OUTPUT_CAP}},
                expect("killed", stdout_len=OUTPUT_CAP, truncated=True))
    if kind == "deleted":
        return ({"code": "echo started; sleep 30", "limits": {"timeout_ms": 20000}},
                expect("killed", message="the sandbox was deleted during the exec"))
    raise ValueError(kind)


def expect(outcome, stdout=None, stdout_len=None, truncated=None, message=None,
           stdout_prefix_of=None):
    def check(r):
        wrong = []
        if r.get("outcome") != outcome:
            wrong.append(f"outcome {r.get('outcome')!r}, expected {outcome!r}"
                         f" (message {r.get('message')!r})")
        if stdout is not None and r.get("stdout") != stdout:
            wrong.append(f"stdout {r.get('stdout', '')[:80]!r}, expected {stdout[:80]!r}")
        if stdout_prefix_of is not None and not stdout_prefix_of.startswith(str(r.get("stdout"))):
            wrong.append(f"stdout {r.get('stdout', '')[:80]!r}, expected a prefix of"
                         f" {stdout_prefix_of!r}")
        if stdout_len is not None and len(r.get("stdout", "").encode()) != stdout_len:
            wrong.append(f"stdout of {len(r.get('stdout', '').encode())} bytes,"
                         f" expected {stdout_len}")
        if truncated is not None and r.get("stdout_truncated") != truncated:
            wrong.append(f"stdout_truncated {r.get('stdout_truncated')}")
        if message is not None and r.get("message") != message:
            wrong.append(f"message {r.get('message')!r}, expected {message!r}")
        return "; ".join(wrong) or None
    return check


class Client:
    def __init__(self, addr):
        host, port = addr.rsplit(":", 1)
        self.host, self.port = host, int(port)
        self.busy = 0  # 429 answers (all run slots and queue places taken)

    def request(self, method, path, body=None, timeout=120):
        """(status, parsed JSON or None); retries 429 (bounded)."""
        for _ in range(600):
            c = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
            try:
                data = json.dumps(body).encode() if body is not None else None
                c.request(method, path, body=data,
                          headers={"Content-Type": "application/json"} if data else {})
                resp = c.getresponse()
                raw = resp.read()
            finally:
                c.close()
            if resp.status == 429:
                self.busy += 1
                time.sleep(0.05)
                continue
            return resp.status, (json.loads(raw) if raw else None)
        raise RuntimeError(f"{method} {path}: still 429 after 600 tries")


def run_one(client, i, kind, body, check):
    """Runs job `i`; returns (kind, what is wrong or None, seconds)."""
    t = time.monotonic()
    if kind != "deleted":
        status, r = client.request("POST", "/v1/jobs", body)
        if status != 200:
            return kind, f"POST /v1/jobs answered {status}: {r}", time.monotonic() - t
        return kind, check(r), time.monotonic() - t
    status, ws = client.request("POST", "/v1/sandboxes", {"template": "bash", "ttl_s": 120})
    if status != 201:
        return kind, f"POST /v1/sandboxes answered {status}: {ws}", time.monotonic() - t
    out = {}

    def exec_():
        out["r"] = client.request("POST", f"/v1/sandboxes/{ws['id']}/exec", body)

    th = threading.Thread(target=exec_)
    th.start()
    # The exec starts within milliseconds; deleting mid-exec is the point.
    time.sleep(0.25)
    dstatus, _ = client.request("DELETE", f"/v1/sandboxes/{ws['id']}")
    th.join(timeout=60)
    if th.is_alive():
        return kind, "the exec did not end within 60 s of the DELETE", time.monotonic() - t
    if dstatus != 204:
        return kind, f"DELETE answered {dstatus}", time.monotonic() - t
    status, r = out["r"]
    if status != 200:
        return kind, f"exec answered {status}: {r}", time.monotonic() - t
    return kind, check(r), time.monotonic() - t


def run_jobs(addr, jobs, concurrency, deadline, progress):
    """Runs `jobs` [(i, kind, body, check)] with `concurrency` clients;
    returns (per-kind counts, failures, latencies by kind, 429 count)."""
    client = Client(addr)
    todo = collections.deque(jobs)
    lock = threading.Lock()
    counts = collections.Counter()
    failures = []
    latency = collections.defaultdict(list)

    def worker():
        while time.monotonic() < deadline:
            with lock:
                if not todo:
                    return
                i, kind, body, check = todo.popleft()
            try:
                kind, wrong, secs = run_one(client, i, kind, body, check)
            except Exception as e:  # a dropped connection is a failure too
                kind, wrong, secs = kind, f"{type(e).__name__}: {e}", 0.0
            with lock:
                counts[kind] += 1
                latency[kind].append(secs)
                if wrong:
                    failures.append((i, kind, wrong))
                progress[0] += 1

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(1.0, deadline - time.monotonic() + 5))
    if todo or any(t.is_alive() for t in threads):
        failures.append((-1, "all", f"{len(todo)} jobs not run before the deadline"))
    return counts, failures, latency, client.busy
