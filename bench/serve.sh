#!/usr/bin/env bash
# Issue 3 against a real `kiln serve` (release build, jail backend), each
# next to the same load spawning the bare interpreter per job:
#   1. warm-pool job latency over HTTP, `print(1)`, closed loop c=1, N jobs
#      (default 1000), vs bare `/usr/bin/python3 -c 'print(1)'` per job;
#   1b. the same at a steady open-loop rate the pool can refill at
#      (RATE/s, default 5, N_OPEN jobs, default 600), latency counted from
#      each job's intended send time;
#   2. sustained throughput at concurrency 2, 8, 32 (DUR each, 429s
#      retried), vs the bare interpreter spawned per job at the same
#      concurrency;
#   3. the daemon's own CPU per job (utime+stime of the `kiln serve`
#      process, all threads, children excluded) from runs 1 and 2;
#   3b. the daemon's CPU per exec and the latency when the sandbox is
#      reused (a workspace, `POST /v1/sandboxes/{id}/exec`, warm_next), i.e.
#      without a sandbox's creation and destruction per job;
#   4. daemon RSS with 32 warm sandboxes idle in the pool (alone, and with
#      all its descendants: the sandboxes).
# Needs root. Uses its own port, state dir and cgroup parent.
#
#   bench/serve.sh                       # N=1000 DUR=30s PORT=18790
#   N=200 DUR=10s bench/serve.sh         # quick look
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-1000}
RATE=${RATE:-5}
N_OPEN=${N_OPEN:-600}
DUR=${DUR:-30s}
PORT=${PORT:-18790}
OUT=${OUT:-target/bench/serve}
STATE=${STATE:-/run/kiln-bench-serve}
PY=/usr/bin/python3
URL=http://127.0.0.1:$PORT/v1/jobs
mkdir -p "$OUT"

cargo build --release --bins
KILN=target/release/kiln
LT=target/release/kiln-loadtest
SERVE=

start_serve() { # $1: tag, rest: flags for kiln serve
    local tag=$1; shift
    "$KILN" serve --bind "127.0.0.1:$PORT" --state-dir "$STATE" --cgroup-parent kiln-bench-serve \
        --pool-runtimes python "$@" > "$OUT/serve-$tag.log" 2>&1 &
    SERVE=$!
    for _ in $(seq 1 240); do
        if [ "$(curl -s -o /dev/null -w '%{http_code}' "127.0.0.1:$PORT/readyz")" = 200 ]; then
            sleep 1 # let the pool settle
            return 0
        fi
        kill -0 "$SERVE" 2>/dev/null || { echo "kiln serve died: see $OUT/serve-$tag.log" >&2; exit 1; }
        sleep 0.25
    done
    echo "kiln serve never became ready: see $OUT/serve-$tag.log" >&2
    exit 1
}
stop_serve() {
    if [ -n "$SERVE" ]; then
        kill -TERM "$SERVE" 2>/dev/null || true
        for _ in $(seq 1 60); do kill -0 "$SERVE" 2>/dev/null || break; sleep 0.25; done
        kill -KILL "$SERVE" 2>/dev/null || true
        wait "$SERVE" 2>/dev/null || true
        SERVE=
    fi
}
trap stop_serve EXIT

{ date -u +%FT%TZ; cat /proc/loadavg; nproc; } > "$OUT/host.txt"

echo "== 1. latency, c=1, $N jobs"
start_serve latency --min-idle 4 --max-running 8
$LT --url "$URL" -c 1 -n "$N" --warmup 20 -d 20m --expect-stdout '1\n' \
    --server-pid "$SERVE" --json-out "$OUT/latency-kiln.json" || true
echo "== 1b. latency, open loop at $RATE/s, $N_OPEN jobs"
$LT --url "$URL" --rate "$RATE" --arrivals poisson -n "$N_OPEN" -d 20m --expect-stdout '1\n' \
    --server-pid "$SERVE" --json-out "$OUT/latency-kiln-open.json" || true
stop_serve
$LT --baseline-bare --python "$PY" -c 1 -n "$N" --warmup 20 -d 20m --expect-stdout '1\n' \
    --json-out "$OUT/latency-bare.json" || true

for C in 2 8 32; do
    echo "== 2. throughput, c=$C, $DUR"
    start_serve "c$C" --min-idle "$C" --max-running "$C" --queue-depth 64
    $LT --url "$URL" -c "$C" -n 1000000 -d "$DUR" --warmup "$C" --on-429 retry \
        --expect-stdout '1\n' --server-pid "$SERVE" --json-out "$OUT/throughput-kiln-c$C.json" || true
    stop_serve
    $LT --baseline-bare --python "$PY" -c "$C" -n 1000000 -d "$DUR" --warmup "$C" \
        --expect-stdout '1\n' --json-out "$OUT/throughput-bare-c$C.json" || true
done

echo "== 3b. execs in one reused workspace sandbox, c=1, $N jobs"
start_serve workspace --min-idle 1
WS=$(curl -sf "127.0.0.1:$PORT/v1/sandboxes" -d '{"template":"python","ttl_s":3600}' \
    | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["id"])')
echo '{"code":"print(1)"}' > "$OUT/exec-job.json"
$LT --url "http://127.0.0.1:$PORT/v1/sandboxes/$WS/exec" --job "$OUT/exec-job.json" -c 1 -n "$N" \
    --warmup 20 -d 20m --expect-stdout '1\n' --server-pid "$SERVE" --json-out "$OUT/workspace-exec.json" || true
stop_serve

echo "== 4. memory with 32 warm sandboxes"
start_serve rss --min-idle 32 --max-running 32
sleep 5
$LT --url "$URL" -n 0 --server-pid "$SERVE" --json-out "$OUT/rss-32.json" -q || true
stop_serve
{ date -u +%FT%TZ; cat /proc/loadavg; } >> "$OUT/host.txt"

"$PY" - "$OUT" <<'PYEOF'
import json, os, sys
out = sys.argv[1]
j = lambda n: json.load(open(os.path.join(out, n)))
host = open(os.path.join(out, "host.txt")).read().split("\n")
print(f"\nstart {host[0]} load {host[1]}; end {host[3]} load {host[4]}; {host[2]} CPUs\n")
k, b = j("latency-kiln.json"), j("latency-bare.json")
kl, bl = k["latency_ms"], b["latency_ms"]
c = k["counts"]
print("| latency, c=1 | jobs | p50 ms | p90 ms | p99 ms | max ms |")
print("| --- | ---: | ---: | ---: | ---: | ---: |")
for name, p in (("kiln serve, POST /v1/jobs", kl), ("bare python3 per job", bl)):
    print(f"| {name} | {p['count']} | {p['p50']:.2f} | {p['p90']:.2f} | {p['p99']:.2f} | {p['max']:.2f} |")
print(f"\n- ratio p50 {kl['p50']/bl['p50']:.2f}x (target <= 0.25x: {'met' if kl['p50'] <= .25*bl['p50'] else 'MISSED'}), "
      f"p99 {kl['p99']/bl['p99']:.2f}x (target <= 1x: {'met' if kl['p99'] <= bl['p99'] else 'MISSED'})")
print(f"- acquire: warm {c['acquire_warm']}, cold {c['acquire_cold']}; outcomes {k['outcomes']}; 429s {c['http_429']}")
s = k["server_ms"]
print("- server timings p50/p99 ms: " + ", ".join(f"{t} {s[t]['p50']:.2f}/{s[t]['p99']:.2f}" for t in ("queued", "acquire", "run", "total") if s.get(t)))
print(f"- daemon CPU: {k['server']['cpu_us_per_job']:.0f} us/job over {c['ran']} jobs")
o = j("latency-kiln-open.json")
op, oc, os_ = o["latency_ms"], o["counts"], o["server_ms"]
print(f"- open loop at {o['run']['rate_per_s']}/s (Poisson), {op['count']} jobs: p50 {op['p50']:.2f} ms ({op['p50']/bl['p50']:.2f}x bare), "
      f"p99 {op['p99']:.2f} ms ({op['p99']/bl['p99']:.2f}x bare); acquire warm {oc['acquire_warm']}, cold {oc['acquire_cold']}; "
      f"server run p50 {os_['run']['p50']:.2f} ms, acquire p50 {os_['acquire']['p50']:.2f} ms; daemon CPU {o['server']['cpu_us_per_job']:.0f} us/job")
print()
print("| concurrency | kiln jobs/s | bare jobs/s | ratio | kiln p50/p99 ms | bare p50/p99 ms | 429s | acquire warm/cold | daemon CPU us/job |")
print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
for C in (2, 8, 32):
    k, b = j(f"throughput-kiln-c{C}.json"), j(f"throughput-bare-c{C}.json")
    kc = k["counts"]
    kp, bp = k["latency_ms"] or {}, b["latency_ms"] or {}
    r = k["ok_per_s"] / b["ok_per_s"] if b["ok_per_s"] else float("nan")
    print(f"| {C} | {k['ok_per_s']:.1f} | {b['ok_per_s']:.1f} | {r:.2f}x ({'met' if r >= 1.5 else 'MISSED'}) | "
          f"{kp.get('p50', 0):.1f}/{kp.get('p99', 0):.1f} | {bp.get('p50', 0):.1f}/{bp.get('p99', 0):.1f} | {kc['http_429']} | "
          f"{kc['acquire_warm']}/{kc['acquire_cold']} | {k['server']['cpu_us_per_job']:.0f} |")
w = j("workspace-exec.json")
wp = w["latency_ms"]
print(f"\n- reused workspace, c=1, {wp['count']} execs: p50 {wp['p50']:.2f} ms ({wp['p50']/bl['p50']:.2f}x bare), p99 {wp['p99']:.2f} ms "
      f"({wp['p99']/bl['p99']:.2f}x bare); server run p50 {w['server_ms']['run']['p50']:.2f} ms; daemon CPU {w['server']['cpu_us_per_job']:.0f} us/exec "
      f"(target <= 200: {'met' if w['server']['cpu_us_per_job'] <= 200 else 'MISSED'})")
m = j("rss-32.json")["server"]
print(f"\n- 32 warm sandboxes idle: daemon VmRSS {m['rss_kib']/1024:.1f} MiB; daemon + descendants ({m['tree_processes']} processes): "
      f"VmRSS {m['tree_rss_kib']/1024:.1f} MiB, Pss {m['tree_pss_kib']/1024:.1f} MiB")
PYEOF
