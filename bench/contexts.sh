#!/usr/bin/env bash
# Issue 17: a code-context exec of `x + 1` against a fresh-process exec of
# the same code, in one workspace of a real `kiln serve` (release build,
# jail backend), interleaved in ROUNDS rounds (bench/contexts.py). Needs
# root and the Python environment of scripts/pyenv.sh.
#
#   bench/contexts.sh                 # N=300 ROUNDS=5
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-300}
ROUNDS=${ROUNDS:-5}
python=$(bash scripts/pyenv.sh)
state=$(mktemp -d /tmp/kiln-bench-contexts.XXXXXX)
chmod o+x "$state"   # the jails' ids pass through it
out=$(mktemp)
target/release/kiln serve --bind 127.0.0.1:0 --state-dir "$state" \
    --cgroup-parent kiln-bench-contexts --min-idle 0 >"$out" 2>/dev/null &
pid=$!
trap 'kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; rm -rf "$state" "$out"' EXIT
for _ in $(seq 600); do
    grep -q '^listening on ' "$out" && break
    sleep 0.1
done
url=$(sed -n 's/^listening on //p' "$out")
[ -n "$url" ] || { echo "kiln serve did not start" >&2; exit 1; }
echo "$(date -u +%H:%M) UTC, load $(cut -d' ' -f1-3 /proc/loadavg)"
"$python" bench/contexts.py "$url" "$N" "$ROUNDS"
echo "$(date -u +%H:%M) UTC, load $(cut -d' ' -f1-3 /proc/loadavg)"
