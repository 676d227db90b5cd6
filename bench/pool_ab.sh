#!/usr/bin/env bash
# Pooled `print(1)` jobs through a real `kiln serve` (jail backend), for
# builds or runtime tables side by side: in each of ROUNDS rounds every
# variant in turn gets a fresh `kiln serve`, WARMUP jobs, then PER_ROUND
# jobs in a closed loop at concurrency C. Interleaving spreads this shared
# machine's drift over all variants alike. Per variant it reports, over the
# merged samples: latency p50/p90/p99, the median of the per-round p50s,
# the daemon's CPU per job (utime+stime of `kiln serve`, children
# excluded), and the sandboxes' CPU per job (cpuacct.usage of the cgroup
# parent: agents, holders, zygotes and jobs; not the kernel's workers), and
# the throughput (jobs/s, median of the rounds).
# Needs root and cgroup v1 cpuacct. Uses its own port, state dir and cgroup
# parent.
#
#   bench/pool_ab.sh NAME=DIR[,TABLE] ...
#
# DIR holds `kiln` and `kiln-agent` (the loadtest is target/release's);
# TABLE, when given, is a runtime table for `--runtimes`. Example (issue 14:
# the network namespace made ahead, and the zygote refreshed every N jobs):
#
#   ROUNDS=6 PER_ROUND=200 bench/pool_ab.sh old=/tmp/old new=target/release
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-5}
PER_ROUND=${PER_ROUND:-200}
WARMUP=${WARMUP:-20}
C=${C:-1}
MIN_IDLE=${MIN_IDLE:-4}
MAX_RUNNING=${MAX_RUNNING:-8}
PORT=${PORT:-18791}
OUT=${OUT:-target/bench/pool_ab}
STATE=${STATE:-/run/kiln-bench-pool-ab}
PARENT=kiln-bench-pool-ab
LT=${LT:-target/release/kiln-loadtest}
URL=http://127.0.0.1:$PORT/v1/jobs
[ $# -gt 0 ] || { echo "usage: $0 NAME=DIR[,TABLE] ..." >&2; exit 2; }
rm -rf "$OUT"
mkdir -p "$OUT"
SERVE=

start_serve() { # $1: kiln dir, $2: runtime table or empty, $3: log
    local args=()
    [ -n "$2" ] && args=(--runtimes "$2")
    "$1/kiln" serve --bind "127.0.0.1:$PORT" --state-dir "$STATE" --cgroup-parent "$PARENT" \
        --agent "$1/kiln-agent" --pool-runtimes python --min-idle "$MIN_IDLE" \
        --max-running "$MAX_RUNNING" "${args[@]}" > "$3" 2>&1 &
    SERVE=$!
    for _ in $(seq 1 240); do
        if [ "$(curl -s -o /dev/null -w '%{http_code}' "127.0.0.1:$PORT/readyz")" = 200 ]; then
            sleep 1 # let the pool settle
            return 0
        fi
        kill -0 "$SERVE" 2>/dev/null || { echo "kiln serve died: see $3" >&2; exit 1; }
        sleep 0.25
    done
    echo "kiln serve never became ready: see $3" >&2
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
cpuacct() { cat "/sys/fs/cgroup/cpuacct/$PARENT/cpuacct.usage"; }

{ date -u +%FT%TZ; cat /proc/loadavg; } > "$OUT/host.txt"
NAMES=()
for r in $(seq 1 "$ROUNDS"); do
    for v in "$@"; do
        name=${v%%=*}; spec=${v#*=}; dir=${spec%%,*}; table=
        [ "$spec" != "$dir" ] && table=${spec#*,}
        [ "$r" = 1 ] && NAMES+=("$name")
        echo "== round $r: $name"
        start_serve "$dir" "$table" "$OUT/serve-$name-$r.log"
        $LT --url "$URL" -c "$C" -n "$WARMUP" -q || true
        before=$(cpuacct)
        $LT --url "$URL" -c "$C" -n "$PER_ROUND" -d 20m --expect-stdout '1\n' -q \
            --server-pid "$SERVE" --json-out "$OUT/$name-$r.json" \
            --samples-out "$OUT/$name-$r.samples" || true
        after=$(cpuacct)
        echo "$before $after" > "$OUT/$name-$r.cpuacct"
        stop_serve
    done
done
{ date -u +%FT%TZ; cat /proc/loadavg; } >> "$OUT/host.txt"

python3 - "$OUT" "$ROUNDS" "${NAMES[@]}" <<'PYEOF'
import json, os, statistics, sys
out, rounds, names = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
host = open(os.path.join(out, "host.txt")).read().split("\n")
print(f"start {host[0]} load {host[1]}; end {host[2]} load {host[3]}\n")
def pct(v, q):
    return v[min(len(v) - 1, int(q * len(v)))] if v else float("nan")
print("| variant | jobs | p50 ms | p90 ms | p99 ms | median of round p50s | jobs/s (median of rounds) | daemon CPU us/job | sandboxes CPU us/job | acquire warm/cold | not ok |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
for n in names:
    v, p50s, rates, dcpu, scpu, ran, warm, cold, bad = [], [], [], 0.0, 0.0, 0, 0, 0, 0
    for r in range(1, rounds + 1):
        p = os.path.join(out, f"{n}-{r}")
        v += [float(x) for x in open(p + ".samples") if x.strip()]
        j = json.load(open(p + ".json"))
        p50s.append(j["latency_ms"]["p50"])
        rates.append(j["ok_per_s"])
        dcpu += j["server"]["cpu_ms"] * 1000
        b, a = map(int, open(p + ".cpuacct").read().split())
        scpu += (a - b) / 1000
        ran += j["counts"]["ran"]
        warm += j["counts"]["acquire_warm"]; cold += j["counts"]["acquire_cold"]
        bad += j["counts"]["jobs"] - j["counts"]["ok"]
    v.sort()
    print(f"| {n} | {len(v)} | {pct(v, .5):.2f} | {pct(v, .9):.2f} | {pct(v, .99):.2f} | "
          f"{statistics.median(p50s):.2f} | {statistics.median(rates):.0f} | {dcpu / max(1, ran):.0f} | {scpu / max(1, ran):.0f} | {warm}/{cold} | {bad} |")
PYEOF
