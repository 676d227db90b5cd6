#!/usr/bin/env bash
# Issue 2, side by side in one run: `print(1)` in Python
#   - bare:      /usr/bin/python3 -c 'print(1)'           (a process per run)
#   - bwrap:     the same under Debian's bubblewrap        (a process per run)
#   - kiln run:  `kiln run` per run (a new jail each time: cold)
#   - create:    JailBackend::create until the agent handshake (in process)
#   - warm:      one jail, Python pre-warmed, run_job with warm_next=true,
#                100 ms idle between runs (sandbox/benches/warm_exec.rs)
#   - memory:    the idle warm sandbox (agent + warm Python): VmRSS and Pss
# The five measurements are interleaved in ROUNDS rounds of RUNS/ROUNDS runs
# each, so that a shared machine's changing load hits them alike; every
# latency is kept and the percentiles are taken over the merged runs. The
# Markdown table printed at the end also gives the median over rounds of
# each round's own p50 ratio. Needs root and bubblewrap
# (`apt-get install -y bubblewrap`).
#
#   bench/foundation.sh                       # RUNS=300 ROUNDS=5
#   RUNS=500 ROUNDS=10 OUT=/tmp/f bench/foundation.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-300}
ROUNDS=${ROUNDS:-5}
PER=$(( (RUNS + ROUNDS - 1) / ROUNDS ))
OUT=${OUT:-target/bench/foundation}
PY=/usr/bin/python3
mkdir -p "$OUT"
OUT=$(realpath "$OUT") # cargo bench runs benches from the package directory
rm -f "$OUT"/r*-*.json "$OUT"/r*-*.txt

cargo build --release --bins
cargo bench -p kiln-sandbox --no-run
LT=target/release/kiln-loadtest
BWRAP=$(command -v bwrap) || { echo "bwrap missing: apt-get install -y bubblewrap" >&2; exit 2; }

{ date -u +%FT%TZ; cat /proc/loadavg; nproc; } > "$OUT/host.txt"
for r in $(seq 1 "$ROUNDS"); do
    echo "== round $r of $ROUNDS ($PER runs each)"
    $LT -q --baseline-bare --python "$PY" -n "$PER" --warmup 5 --expect-stdout '1\n' \
        --json-out "$OUT/r$r-bare.json" --samples-out "$OUT/r$r-bare.txt"
    $LT -q -n "$PER" --warmup 5 --expect-stdout '1\n' \
        --json-out "$OUT/r$r-bwrap.json" --samples-out "$OUT/r$r-bwrap.txt" -- \
        "$BWRAP" --unshare-all --ro-bind /usr /usr --symlink usr/lib /lib \
        --symlink usr/lib64 /lib64 --symlink usr/bin /bin --proc /proc --dev /dev --tmpfs /tmp \
        "$PY" -c 'print(1)'
    $LT -q --cli --kiln target/release/kiln -n "$PER" --warmup 2 --expect-stdout '1\n' \
        --json-out "$OUT/r$r-kiln-run.json" --samples-out "$OUT/r$r-kiln-run.txt"
    cargo bench -q -p kiln-sandbox --bench create -- --runs "$PER" --json-out "$OUT/r$r-create.json" \
        > "$OUT/r$r-create.log" 2>&1
    cargo bench -q -p kiln-sandbox --bench warm_exec -- --runs "$PER" --idle-ms 100 \
        --json-out "$OUT/r$r-warm.json" > "$OUT/r$r-warm.log" 2>&1
done
{ date -u +%FT%TZ; cat /proc/loadavg; } >> "$OUT/host.txt"

"$PY" - "$OUT" "$ROUNDS" <<'PYEOF'
import json, math, os, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
def pct(v, q):
    v = sorted(v)
    return v[max(0, math.ceil(q * len(v)) - 1)]
def lines(n):
    return [float(x) for x in open(os.path.join(out, n)).read().split()]
def js(n):
    return json.load(open(os.path.join(out, n)))
names = [("bare", "bare `python3 -c 'print(1)'`"), ("bwrap", "bwrap + python3"),
         ("kiln-run", "`kiln run` (cold sandbox per run)"),
         ("create", "JailBackend::create (to HelloAck)"), ("warm", "warm exec (run_job, warm_next)")]
per_round = {k: [] for k, _ in names}
for r in range(1, rounds + 1):
    for k in ("bare", "bwrap", "kiln-run"):
        per_round[k].append(lines(f"r{r}-{k}.txt"))
    per_round["create"].append(js(f"r{r}-create.json")["samples_ms"])
    per_round["warm"].append(js(f"r{r}-warm.json")["samples_ms"])
allv = {k: [x for rr in v for x in rr] for k, v in per_round.items()}
p50 = {k: pct(v, .5) for k, v in allv.items()}
p99 = {k: pct(v, .99) for k, v in allv.items()}
def round_ratio(k, base):
    return statistics.median(pct(a, .5) / pct(b, .5) for a, b in zip(per_round[k], per_round[base]))
host = open(os.path.join(out, "host.txt")).read().split("\n")
print(f"\nstart {host[0]} load {host[1]}; end {host[3]} load {host[4]}; {host[2]} CPUs; {rounds} interleaved rounds\n")
print("| what | runs | p50 ms | p99 ms | p50 / bare | p99 / bare | median of per-round p50 ratios |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
for k, name in names:
    print(f"| {name} | {len(allv[k])} | {p50[k]:.2f} | {p99[k]:.2f} | {p50[k]/p50['bare']:.2f}x | {p99[k]/p99['bare']:.2f}x | {round_ratio(k, 'bare'):.2f}x |")
print()
w, c = "warm", "create"
print(f"- warm exec / bare: p50 {p50[w]/p50['bare']:.3f}x, p99 {p99[w]/p99['bare']:.3f}x, per-round {round_ratio(w, 'bare'):.3f}x "
      f"(target <= 0.25x): " + ("met" if p50[w] <= .25 * p50['bare'] else "MISSED"))
print(f"- create / bwrap: p50 {p50[c]/p50['bwrap']:.3f}x, p99 {p99[c]/p99['bwrap']:.3f}x, per-round {round_ratio(c, 'bwrap'):.3f}x "
      f"(target <= 1x): " + ("met" if p50[c] <= p50['bwrap'] else "MISSED"))
warms = [js(f"r{r}-warm.json") for r in range(1, rounds + 1)]
creates = [js(f"r{r}-create.json") for r in range(1, rounds + 1)]
print(f"- warm runs that were not warm: {sum(x['not_warm'] for x in warms)}, failed: {sum(x['failed'] for x in warms)}; "
      f"create failures: {sum(x['failed'] for x in creates)}")
print(f"- host-side CPU per create+destroy (bench process, children excluded): median over rounds "
      f"{statistics.median(x['host_cpu_us_per_cycle'] for x in creates):.0f} us")
for key in ("memory_idle_fresh", "memory_idle_after"):
    ms = [x[key] for x in warms]
    m = max(ms, key=lambda m: m["pss_kib"])
    print(f"- {key} (peak over rounds): {m['processes']} processes, VmRSS {max(x['rss_kib'] for x in ms)/1024:.1f} MiB, "
          f"VmHWM {max(x['hwm_kib'] for x in ms)/1024:.1f} MiB, Pss {m['pss_kib']/1024:.1f} MiB, "
          f"cgroup {max(x['cgroup_bytes'] for x in ms)/1048576:.1f} MiB (target <= 15 MiB, judged on Pss: "
          + ("met" if m['pss_kib'] <= 15 * 1024 else "MISSED") + ")")
keys = list(warms[0].get("breakdown_ms", {}))
if keys:
    print("- warm exec breakdown, median over rounds of p50 (ms): "
          + ", ".join(f"{k} {statistics.median(x['breakdown_ms'][k]['p50'] for x in warms):.2f}" for k in keys))
PYEOF
