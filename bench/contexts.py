"""Latency of a code-context exec of `x + 1` against a fresh-process exec
of the same code in the same workspace, over HTTP to a real `kiln serve`
(bench/contexts.sh starts one); then the same for a cell that uses numpy,
imported once by the context and by every fresh exec. Interleaved in
rounds, so that the load of this shared machine hits both alike;
percentiles over all samples merged.

usage: python bench/contexts.py URL [N] [ROUNDS]
"""

import statistics
import sys
import time

from kiln_client import Kiln

url = sys.argv[1]
n = int(sys.argv[2]) if len(sys.argv) > 2 else 300
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 5
kiln = Kiln(url)


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


with kiln.sandbox("python", ttl_s=3600) as sb:
    ctx = sb.context()
    assert ctx.run("x = 41").ok
    # The fresh-process exec prints so that both return the value.
    fresh_code = "x = 41\nprint(x + 1)"
    assert sb.exec(fresh_code).stdout == "42\n"
    assert ctx.run("x + 1").value == "42"
    samples = {"context": [], "fresh": [], "context_server": [], "fresh_server": []}
    for _ in range(rounds):
        for _ in range(n // rounds):
            t = time.perf_counter()
            r = ctx.run("x + 1")
            samples["context"].append((time.perf_counter() - t) * 1000)
            samples["context_server"].append(r.timings["total_ms"])
            assert r.value == "42", r
            t = time.perf_counter()
            r = sb.exec(fresh_code)
            samples["fresh"].append((time.perf_counter() - t) * 1000)
            samples["fresh_server"].append(r.timings["total_ms"])
            assert r.stdout == "42\n", r

    # A cell that needs a heavy import: the context has it already.
    assert ctx.run("import numpy as np").ok
    np_fresh = "import numpy as np\nprint(np.arange(10).sum())"
    for _ in range(rounds):
        for _ in range(max(1, n // 3 // rounds)):
            t = time.perf_counter()
            r = ctx.run("np.arange(10).sum()")
            samples.setdefault("np_context", []).append((time.perf_counter() - t) * 1000)
            assert r.value in ("45", "np.int64(45)"), r
            t = time.perf_counter()
            r = sb.exec(np_fresh)
            samples.setdefault("np_fresh", []).append((time.perf_counter() - t) * 1000)
            assert r.stdout == "45\n", r

print(f"{'cell':<38} {'n':>5} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'mean ms':>8}")
for name, label in (
    ("context", "context exec, client round trip"),
    ("fresh", "fresh-process exec, client round trip"),
    ("context_server", "context exec, server total_ms"),
    ("fresh_server", "fresh-process exec, server total_ms"),
    ("np_context", "numpy cell, context (imported once)"),
    ("np_fresh", "numpy cell, fresh process (imports)"),
):
    xs = samples[name]
    print(f"{label:<38} {len(xs):>5} {pct(xs, 50):>8.2f} {pct(xs, 90):>8.2f} {pct(xs, 99):>8.2f} {statistics.mean(xs):>8.2f}")
print(f"ratio of p50 round trips, x + 1 (fresh / context): {pct(samples['fresh'], 50) / pct(samples['context'], 50):.1f}x")
print(f"ratio of p50 round trips, numpy (fresh / context): {pct(samples['np_fresh'], 50) / pct(samples['np_context'], 50):.1f}x")
