#!/usr/bin/env bash
# A/B of two builds of the jail backend, side by side in one run: for each
# build, interleaved in ROUNDS rounds so that a shared machine's changing
# load hits both alike,
#   - create:    JailBackend::create until the agent handshake (in process)
#   - kiln run:  `kiln run` of `print(1)` per run (a new jail each: cold,
#                Python starts inside the jail's root)
#   - warm:      one jail, warm `print(1)` with 100 ms idle between runs,
#                plus the idle sandbox's memory (cgroup and Pss)
# Each build is a directory holding `kiln`, `kiln-agent`, `kiln-loadtest`
# and the bench executables `create` and `warm_exec` (copy them from
# target/release and target/release/deps after `cargo build --release
# --bins && cargo bench -p kiln-sandbox --no-run`). Prints a Markdown table
# of p50/p99 per build over all runs merged, the B/A ratio, and the median
# of the rounds' own p50 ratios. Needs root.
#
#   bench/jail_ab.sh /tmp/kiln-base /tmp/kiln-new        # RUNS=300 ROUNDS=5
set -euo pipefail
A=$(realpath "$1")
B=$(realpath "$2")
RUNS=${RUNS:-300}
ROUNDS=${ROUNDS:-5}
PER=$(( (RUNS + ROUNDS - 1) / ROUNDS ))
OUT=${OUT:-target/bench/jail_ab}
mkdir -p "$OUT"
OUT=$(realpath "$OUT")
rm -f "$OUT"/r*.json "$OUT"/r*.txt "$OUT"/r*.log
PY=/usr/bin/python3

{ date -u +%FT%TZ; cat /proc/loadavg; } > "$OUT/host.txt"
for r in $(seq 1 "$ROUNDS"); do
    echo "== round $r of $ROUNDS ($PER runs each)"
    for side in A B; do
        dir=$A; [ "$side" = B ] && dir=$B
        KILN_AGENT="$dir/kiln-agent" "$dir/create" --runs "$PER" \
            --json-out "$OUT/r$r-$side-create.json" > "$OUT/r$r-$side-create.log" 2>&1
        KILN_AGENT="$dir/kiln-agent" "$dir/kiln-loadtest" -q --cli --kiln "$dir/kiln" -n "$PER" \
            --warmup 2 --expect-stdout '1\n' --json-out "$OUT/r$r-$side-run.json" \
            --samples-out "$OUT/r$r-$side-run.txt"
        KILN_AGENT="$dir/kiln-agent" "$dir/warm_exec" --runs "$PER" --idle-ms 100 \
            --json-out "$OUT/r$r-$side-warm.json" > "$OUT/r$r-$side-warm.log" 2>&1
    done
done
{ date -u +%FT%TZ; cat /proc/loadavg; } >> "$OUT/host.txt"

"$PY" - "$OUT" "$ROUNDS" <<'PYEOF'
import json, math, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
def pct(v, q):
    v = sorted(v)
    return v[max(0, math.ceil(q * len(v)) - 1)]
def samples(r, side, kind):
    if kind == "run":
        return [float(l) for l in open(f"{out}/r{r}-{side}-run.txt") if l.strip()]
    return json.load(open(f"{out}/r{r}-{side}-{kind}.json"))["samples_ms"]
print(open(f"{out}/host.txt").read())
print("| measurement | A p50 ms | B p50 ms | B/A p50 | A p99 ms | B p99 ms | B/A p99 | median of per-round p50 ratios |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
for kind, name in [("create", "`JailBackend::create` (to HelloAck)"), ("run", "`kiln run` print(1), cold"), ("warm", "warm exec print(1)")]:
    a = [x for r in range(1, rounds + 1) for x in samples(r, "A", kind)]
    b = [x for r in range(1, rounds + 1) for x in samples(r, "B", kind)]
    per = [statistics.median(samples(r, "B", kind)) / statistics.median(samples(r, "A", kind)) for r in range(1, rounds + 1)]
    print(f"| {name} | {pct(a,.5):.2f} | {pct(b,.5):.2f} | {pct(b,.5)/pct(a,.5):.2f}x | {pct(a,.99):.2f} | {pct(b,.99):.2f} | {pct(b,.99)/pct(a,.99):.2f}x | {statistics.median(per):.2f}x |")
for side in "AB":
    cg = [json.load(open(f"{out}/r{r}-{side}-warm.json"))["memory_idle_fresh"] for r in range(1, rounds + 1)]
    print(f"{side}: idle warm sandbox, fresh: cgroup {[round(m['cgroup_bytes']/2**20,1) if m['cgroup_bytes'] else None for m in cg]} MiB, Pss {[round(m['pss_kib']/1024,1) for m in cg]} MiB")
    cpu = [json.load(open(f"{out}/r{r}-{side}-create.json"))["host_cpu_us_per_cycle"] for r in range(1, rounds + 1)]
    print(f"{side}: host CPU per create+destroy, per round: {[round(c) for c in cpu]} us")
PYEOF
