#!/usr/bin/env bash
# The chaos soak: proves that under crashes nothing is lost and nothing is
# left behind (docs/operations.md, "Soak"; results in docs/BENCHMARKS.md).
#
#   scripts/soak.sh [--jobs N] [--short] [--seed S] [--out DIR] [--halves amqp,http]
#
# AMQP half: N jobs published by an ordinary AMQP client (Python's pika, not
# Kiln code) to two `kiln serve` executors, while the soak SIGKILLs an
# executor twice (restarting it), restarts the broker once, SIGKILLs random
# agents inside the executors' sandboxes and sends a burst of poison
# (malformed JSON, unknown runtime, oversize body, absurd limits). The
# producer then checks its ledger: every job answered, with the right
# stdout, duplicates only within docs/amqp.md's window, poison dead-lettered
# with its reason, nothing else in any queue.
#
# HTTP half: N jobs through `kiln serve`'s HTTP API (ok, timeout, OOM,
# output cap, killed by deleting their workspace) with the daemon's open
# descriptors, threads and RSS sampled every second (CSV and SVG in the
# output directory); then no processes, cgroups, mounts, sandbox files or
# temporary files may be left, and the daemon's footprint must be flat.
#
# --short: 300 jobs per half, every chaos action still happens (CI).
# The chaos schedule comes from the seed (printed; --seed reproduces it).
# Default N: 10,000 per half (about 20 minutes on 2 shared vCPUs).
#
# Everything is the soak's own: a work directory /run/kiln-soak-<pid>, cgroup
# parents kiln-soak-<pid>-*, and a RabbitMQ node of its own (started with
# scripts/rabbitmq.sh under another node name, port and data directory), so
# nothing else on the machine is touched. Its processes and sandboxes are
# removed by pid even when it fails. Needs root (jails, cgroups) and the
# built binaries (target/debug, or KILN_BIN_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."

jobs=10000
short=0
seed=""
out=""
halves="amqp,http"
while [ $# -gt 0 ]; do
    case "$1" in
        --jobs) jobs="$2"; shift 2 ;;
        --short) short=1; shift ;;
        --seed) seed="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --halves) halves="$2"; shift 2 ;;
        -h | --help) sed -n '2,33p' "$0"; exit 0 ;;
        *) echo "soak.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
if [ "$short" = 1 ]; then
    jobs=300
fi
case "$jobs" in
    '' | *[!0-9]*) echo "soak.sh: --jobs wants a whole number, got '$jobs'" >&2; exit 2 ;;
esac
if [ "$jobs" -lt 100 ]; then
    echo "soak.sh: --jobs $jobs is too few for the chaos schedule; at least 100" >&2
    exit 2
fi

if [ "$(id -u)" != 0 ]; then
    echo "soak.sh must run as root (jails, cgroups)" >&2
    exit 1
fi

# Debian's Python with Debian's pika (the producer is an ordinary AMQP
# client); the RabbitMQ package comes with scripts/rabbitmq.sh.
py=/usr/bin/python3
# No __pycache__ in the source tree.
export PYTHONDONTWRITEBYTECODE=1
if ! "$py" -c 'import pika' 2>/dev/null; then
    echo "== soak: installing python3-pika"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends python3 python3-pika >/dev/null 2>&1 ||
        { apt-get update -qq && apt-get install -y -qq --no-install-recommends python3 python3-pika; }
fi

bin_dir="${KILN_BIN_DIR:-$PWD/target/debug}"
if [ ! -x "$bin_dir/kiln" ] || [ ! -x "$bin_dir/kiln-agent" ]; then
    echo "== soak: building kiln and kiln-agent"
    cargo build -p kiln-executor -p kiln-agent --bins --quiet
fi

tag=$$
out="${out:-$PWD/target/soak/$(date +%Y%m%d-%H%M%S)-$tag}"
mkdir -p "$out"

# Whatever happens to the orchestrator, its daemons, sandboxes, cgroups,
# broker node and work directory go (by the pids and records it wrote).
cleanup() {
    "$py" scripts/soak/soak.py --cleanup-only --tag "$tag" --out "$out" --bin-dir "$bin_dir" ||
        echo "== soak: clean-up failed; see /run/kiln-soak-$tag" >&2
}
trap cleanup EXIT
trap 'exit 130' INT TERM

args=(--jobs "$jobs" --tag "$tag" --out "$out" --bin-dir "$bin_dir" --halves "$halves")
[ "$short" = 1 ] && args+=(--short)
[ -n "$seed" ] && args+=(--seed "$seed")
"$py" scripts/soak/soak.py "${args[@]}"
