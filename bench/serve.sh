#!/usr/bin/env bash
# Issue 3 against a real `kiln serve` (release build, jail backend), each
# measurement interleaved with its baseline in ROUNDS rounds, so that this
# shared machine's drift hits both alike:
#   1. warm-pool job latency over HTTP, `print(1)`, closed loop c=1, N jobs
#      in all (N/ROUNDS per round), vs bare `/usr/bin/python3 -c 'print(1)'`
#      spawned per job; percentiles over the merged samples;
#   1b. the same job at a steady open-loop rate (RATE/s, N_OPEN jobs),
#      latency counted from each job's intended send time, next to the bare
#      interpreter spawned at the same rate (on this VM a process that
#      idled a fifth of a second runs slower, bare or not);
#   2. sustained throughput at concurrency 2, 8, 32 (DUR per round, 429s
#      retried), remove-on-exit, vs the bare interpreter spawned per job at
#      the same concurrency;
#   3. the daemon's own CPU per job (utime+stime of the `kiln serve`
#      process, all threads, children excluded) in runs 1 and 2;
#   3b. CPU per exec and latency in one reused workspace sandbox;
#   4. daemon RSS with 32 warm sandboxes idle in the pool (alone, and with
#      all its descendants: the sandboxes).
# Needs root. Uses its own port, state dir and cgroup parent.
#
#   bench/serve.sh                          # N=1000 ROUNDS=5 DUR=6s
#   N=200 ROUNDS=2 DUR=3s bench/serve.sh    # quick look
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-1000}
ROUNDS=${ROUNDS:-5}
RATE=${RATE:-5}
N_OPEN=${N_OPEN:-600}
DUR=${DUR:-6s}
PORT=${PORT:-18790}
OUT=${OUT:-target/bench/serve}
STATE=${STATE:-/run/kiln-bench-serve}
PY=/usr/bin/python3
URL=http://127.0.0.1:$PORT/v1/jobs
PER_ROUND=$(( (N + ROUNDS - 1) / ROUNDS ))
rm -rf "$OUT"
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

echo "== 1. latency, c=1, $N jobs in $ROUNDS rounds, interleaved with bare python3"
start_serve latency --min-idle 4 --max-running 8
$LT --url "$URL" -c 1 -n 20 -q || true # warm-up, not recorded
for r in $(seq 1 "$ROUNDS"); do
    $LT --url "$URL" -c 1 -n "$PER_ROUND" -d 20m --expect-stdout '1\n' -q \
        --server-pid "$SERVE" --json-out "$OUT/latency-kiln-$r.json" \
        --samples-out "$OUT/latency-kiln-$r.samples" || true
    $LT --baseline-bare --python "$PY" -c 1 -n "$PER_ROUND" -d 20m --expect-stdout '1\n' -q \
        --json-out "$OUT/latency-bare-$r.json" --samples-out "$OUT/latency-bare-$r.samples" || true
done
echo "== 1b. latency, open loop at $RATE/s, $N_OPEN jobs"
$LT --url "$URL" --rate "$RATE" --arrivals poisson -n "$N_OPEN" -d 20m --expect-stdout '1\n' -q \
    --server-pid "$SERVE" --json-out "$OUT/latency-kiln-open.json" || true
stop_serve
$LT --baseline-bare --python "$PY" --rate "$RATE" --arrivals poisson -n "$((N_OPEN / 3))" -d 20m \
    --expect-stdout '1\n' -q --json-out "$OUT/latency-bare-open.json" || true

for C in 2 8 32; do
    echo "== 2. throughput, c=$C, $ROUNDS rounds of $DUR each, interleaved with bare python3"
    start_serve "c$C" --min-idle "$C" --max-running "$C" --queue-depth 64
    $LT --url "$URL" -c "$C" -n "$((C * 4))" -q || true # warm-up
    for r in $(seq 1 "$ROUNDS"); do
        $LT --url "$URL" -c "$C" -n 1000000 -d "$DUR" --on-429 retry --expect-stdout '1\n' -q \
            --server-pid "$SERVE" --json-out "$OUT/throughput-kiln-c$C-$r.json" || true
        $LT --baseline-bare --python "$PY" -c "$C" -n 1000000 -d "$DUR" --expect-stdout '1\n' -q \
            --json-out "$OUT/throughput-bare-c$C-$r.json" || true
    done
    stop_serve
done

echo "== 3b. execs in one reused workspace sandbox, c=1, $N jobs"
start_serve workspace --min-idle 1
WS=$(curl -sf "127.0.0.1:$PORT/v1/sandboxes" -d '{"template":"python","ttl_s":3600}' \
    | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["id"])')
echo '{"code":"print(1)"}' > "$OUT/exec-job.json"
$LT --url "http://127.0.0.1:$PORT/v1/sandboxes/$WS/exec" --job "$OUT/exec-job.json" -c 1 -n "$N" \
    --warmup 20 -d 20m --expect-stdout '1\n' -q --server-pid "$SERVE" --json-out "$OUT/workspace-exec.json" || true
stop_serve

echo "== 4. memory with 32 warm sandboxes"
start_serve rss --min-idle 32 --max-running 32
sleep 5
$LT --url "$URL" -n 0 --server-pid "$SERVE" --json-out "$OUT/rss-32.json" -q || true
stop_serve
{ date -u +%FT%TZ; cat /proc/loadavg; } >> "$OUT/host.txt"

"$PY" - "$OUT" "$ROUNDS" <<'PYEOF'
import json, os, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
j = lambda n: json.load(open(os.path.join(out, n)))
def samples(prefix):
    v = []
    for r in range(1, rounds + 1):
        p = os.path.join(out, f"{prefix}-{r}.samples")
        if os.path.exists(p):
            v += [float(x) for x in open(p) if x.strip()]
    return sorted(v)
def pct(v, q):
    return v[min(len(v) - 1, int(q * len(v)))] if v else float("nan")
host = open(os.path.join(out, "host.txt")).read().split("\n")
print(f"\nstart {host[0]} load {host[1]}; end {host[3]} load {host[4]}; {host[2]} CPUs\n")
kl, bl = samples("latency-kiln"), samples("latency-bare")
print("| latency, c=1, merged over the rounds | jobs | p50 ms | p90 ms | p99 ms | max ms |")
print("| --- | ---: | ---: | ---: | ---: | ---: |")
for name, v in (("kiln serve, POST /v1/jobs", kl), ("bare python3 per job", bl)):
    print(f"| {name} | {len(v)} | {pct(v, .5):.2f} | {pct(v, .9):.2f} | {pct(v, .99):.2f} | {v[-1]:.2f} |")
k50, b50, k99, b99 = pct(kl, .5), pct(bl, .5), pct(kl, .99), pct(bl, .99)
per_round = [j(f"latency-kiln-{r}.json")["latency_ms"]["p50"] / j(f"latency-bare-{r}.json")["latency_ms"]["p50"]
             for r in range(1, rounds + 1)]
print(f"\n- ratio p50 {k50/b50:.2f}x (target <= 0.25x: {'met' if k50 <= .25*b50 else 'MISSED'}), "
      f"p99 {k99/b99:.2f}x (target <= 1x: {'met' if k99 <= b99 else 'MISSED'}); "
      f"per-round p50 ratios {', '.join(f'{x:.2f}' for x in per_round)}")
ks = [j(f"latency-kiln-{r}.json") for r in range(1, rounds + 1)]
outcomes, warm, cold = {}, 0, 0
for k in ks:
    for o, n in k["outcomes"].items():
        outcomes[o] = outcomes.get(o, 0) + n
    warm += k["counts"]["acquire_warm"]; cold += k["counts"]["acquire_cold"]
print(f"- acquire: warm {warm}, cold {cold}; outcomes {outcomes}")
s = ks[len(ks) // 2]["server_ms"]
print("- server timings p50/p99 ms (middle round): " + ", ".join(f"{t} {s[t]['p50']:.2f}/{s[t]['p99']:.2f}" for t in ("queued", "acquire", "run", "total") if s.get(t)))
cpu = sum(k["server"]["cpu_ms"] for k in ks) * 1000 / max(1, sum(k["counts"]["ran"] for k in ks))
per_round_cpu = ", ".join("%.0f" % k["server"]["cpu_us_per_job"] for k in ks)
ran = sum(k["counts"]["ran"] for k in ks)
print(f"- daemon CPU: {cpu:.0f} us/job over {ran} jobs (per round: {per_round_cpu})")
o, ob = j("latency-kiln-open.json"), j("latency-bare-open.json")
op, oc, os_, obp = o["latency_ms"], o["counts"], o["server_ms"], ob["latency_ms"]
print(f"- open loop at {o['run']['rate_per_s']}/s (Poisson), {op['count']} jobs: p50 {op['p50']:.2f} ms, p99 {op['p99']:.2f} ms; "
      f"bare python3 at the same rate ({obp['count']} jobs): p50 {obp['p50']:.2f} ms, p99 {obp['p99']:.2f} ms; "
      f"ratios p50 {op['p50']/obp['p50']:.2f}x, p99 {op['p99']/obp['p99']:.2f}x; acquire warm {oc['acquire_warm']}, cold {oc['acquire_cold']}; "
      f"server run p50 {os_['run']['p50']:.2f} ms; daemon CPU {o['server']['cpu_us_per_job']:.0f} us/job")
print()
print("| concurrency | kiln jobs/s (median of rounds) | bare jobs/s | ratio of medians | per-round ratios | kiln p50/p99 ms | bare p50/p99 ms | 429s | acquire warm/cold | daemon CPU us/job |")
print("| ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
for C in (2, 8, 32):
    ks = [j(f"throughput-kiln-c{C}-{r}.json") for r in range(1, rounds + 1)]
    bs = [j(f"throughput-bare-c{C}-{r}.json") for r in range(1, rounds + 1)]
    kt, bt = [k["ok_per_s"] for k in ks], [b["ok_per_s"] for b in bs]
    km, bm = statistics.median(kt), statistics.median(bt)
    ratios = [a / b for a, b in zip(kt, bt) if b]
    mid_k, mid_b = ks[rounds // 2], bs[rounds // 2]
    kp, bp = mid_k["latency_ms"] or {}, mid_b["latency_ms"] or {}
    n429 = sum(k["counts"]["http_429"] for k in ks)
    w = sum(k["counts"]["acquire_warm"] for k in ks); c = sum(k["counts"]["acquire_cold"] for k in ks)
    cpu = sum(k["server"]["cpu_ms"] for k in ks) * 1000 / max(1, sum(k["counts"]["ran"] for k in ks))
    r = km / bm if bm else float("nan")
    print(f"| {C} | {km:.1f} | {bm:.1f} | {r:.2f}x ({'met' if r >= 1.5 else 'MISSED'}) | {', '.join(f'{x:.2f}' for x in ratios)} | "
          f"{kp.get('p50', 0):.1f}/{kp.get('p99', 0):.1f} | {bp.get('p50', 0):.1f}/{bp.get('p99', 0):.1f} | {n429} | {w}/{c} | {cpu:.0f} |")
w = j("workspace-exec.json")
wp = w["latency_ms"]
print(f"\n- reused workspace, c=1, {wp['count']} execs: p50 {wp['p50']:.2f} ms ({wp['p50']/b50:.2f}x bare), p99 {wp['p99']:.2f} ms "
      f"({wp['p99']/b99:.2f}x bare); server run p50 {w['server_ms']['run']['p50']:.2f} ms; daemon CPU {w['server']['cpu_us_per_job']:.0f} us/exec")
m = j("rss-32.json")["server"]
print(f"\n- 32 warm sandboxes idle: daemon VmRSS {m['rss_kib']/1024:.1f} MiB; daemon + descendants ({m['tree_processes']} processes): "
      f"VmRSS {m['tree_rss_kib']/1024:.1f} MiB, Pss {m['tree_pss_kib']/1024:.1f} MiB "
      f"({m['tree_pss_kib']/1024/32:.1f} MiB Pss per sandbox)")
PYEOF
