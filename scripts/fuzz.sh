#!/usr/bin/env bash
# Coverage-guided fuzzing of Kiln's parsers of untrusted input, on the
# stable toolchain: libFuzzer (from the libfuzzer-sys crate) driving targets
# built with LLVM's SanitizerCoverage, without sanitizers (fuzz/README.md
# says why this tool and what each target checks).
#
#   scripts/fuzz.sh TARGET SECONDS   run one target for at most SECONDS
#   scripts/fuzz.sh all SECONDS      run every target, SECONDS each
#   scripts/fuzz.sh list             name the targets
#
# Builds first (fuzz/target, apart from the workspace's target/). The
# corpus of each target lives outside the repository, in
# $KILN_FUZZ_DIR/TARGET/corpus (default /var/tmp/kiln-fuzz), seeded from
# fuzz/seeds/TARGET; it grows across runs. Prints, per target, the
# executions reached and the crashes found. A crash stops the target,
# leaves the crashing input in $KILN_FUZZ_DIR/TARGET/crashes/ (the path is
# printed) and makes the script exit 1 once every asked target has run.
# KILN_FUZZ_RUNS=N also stops each target after N executions.
set -euo pipefail
cd "$(dirname "$0")/.."

TARGETS=(frame_decoder job_spec piston_body sandbox_create amqp_message page_server_handshake config image_layer)
TRIPLE=x86_64-unknown-linux-gnu
BIN_DIR="fuzz/target/$TRIPLE/release"
WORK="${KILN_FUZZ_DIR:-/var/tmp/kiln-fuzz}"

usage() {
    echo "usage: scripts/fuzz.sh TARGET|all SECONDS   (targets: ${TARGETS[*]})" >&2
    exit 2
}

[ "${1:-}" = list ] && { printf '%s\n' "${TARGETS[@]}"; exit 0; }
[ $# -eq 2 ] || usage
what=$1
seconds=$2
[[ "$seconds" =~ ^[1-9][0-9]*$ ]] || usage
if [ "$what" = all ]; then
    run=("${TARGETS[@]}")
else
    found=
    for t in "${TARGETS[@]}"; do [ "$t" = "$what" ] && found=1; done
    [ -n "$found" ] || { echo "scripts/fuzz.sh: no target $what" >&2; usage; }
    run=("$what")
fi

# libfuzzer-sys compiles libFuzzer's C++ sources: it needs a C++ compiler
# (installed if missing, idempotently; nothing else is needed).
if ! command -v c++ >/dev/null; then
    echo "== installing g++ (libFuzzer is C++)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends g++
fi

# What cargo-fuzz passes on nightly, less the sanitizer (-Zsanitizer is
# nightly-only): SanitizerCoverage's inline 8-bit counters, PC table and
# comparison tracing, which libFuzzer reads for its coverage feedback. The
# explicit --target keeps these flags off build scripts and proc macros,
# which are not linked with libFuzzer. The release profile of fuzz/Cargo.toml
# keeps debug assertions and overflow checks on.
export RUSTFLAGS="-C passes=sancov-module \
 -C llvm-args=-sanitizer-coverage-level=4 \
 -C llvm-args=-sanitizer-coverage-inline-8bit-counters \
 -C llvm-args=-sanitizer-coverage-pc-table \
 -C llvm-args=-sanitizer-coverage-trace-compares \
 --cfg fuzzing"
bins=()
for t in "${run[@]}"; do bins+=(--bin "$t"); done
echo "== building ${run[*]}"
(cd fuzz && cargo build --quiet --release --target "$TRIPLE" "${bins[@]}")

crashed=()
for t in "${run[@]}"; do
    corpus="$WORK/$t/corpus"
    crashes="$WORK/$t/crashes"
    mkdir -p "$corpus" "$crashes"
    seeds=()
    [ -d "fuzz/seeds/$t" ] && seeds=("fuzz/seeds/$t")
    log="$WORK/$t/last-run.log"
    before=$(find "$crashes" -type f | wc -l)
    echo "== fuzzing $t for at most $seconds s (corpus $corpus)"
    # -timeout: an input taking 10 s is a hang, reported like a crash.
    # -rss_limit_mb: a parser that lets input grow memory past 2 GiB is one too.
    runs=()
    [ -n "${KILN_FUZZ_RUNS:-}" ] && runs=(-runs="$KILN_FUZZ_RUNS")
    status=0
    start=$(date +%s)
    "$BIN_DIR/$t" "$corpus" "${seeds[@]}" \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
        -artifact_prefix="$crashes/" -print_final_stats=1 "${runs[@]}" \
        >"$log" 2>&1 || status=$?
    took=$(($(date +%s) - start))
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    if [ -z "$execs" ]; then
        # No final statistics (a crash can cut them short): the last
        # progress line's count is a lower bound.
        execs=$(grep -aoE '^#[0-9]+' "$log" | tail -1 | tr -d '#')
        execs="at least ${execs:-0}"
    fi
    after=$(find "$crashes" -type f | wc -l)
    new=$((after - before))
    if [ "$status" -ne 0 ] && [ "$new" -eq 0 ]; then
        # libFuzzer failed without leaving an input: show why.
        tail -20 "$log" >&2
        echo "$t: libFuzzer exited with status $status and left no crashing input" >&2
        crashed+=("$t")
        continue
    fi
    echo "$t: ${execs:-0} executions in $took s, $new crashes, corpus $(find "$corpus" -type f | wc -l) inputs"
    if [ "$new" -gt 0 ]; then
        grep -E "panicked at|^==[0-9]+== ERROR|SUMMARY" "$log" | head -5 >&2 || true
        echo "$t: crashing input(s), run one again with $BIN_DIR/$t FILE (log: $log):" >&2
        ls -t "$crashes" | head -"$new" | sed "s|^|  $crashes/|" >&2
        crashed+=("$t")
    fi
done

if [ "${#crashed[@]}" -gt 0 ]; then
    echo "crashed: ${crashed[*]}" >&2
    exit 1
fi
