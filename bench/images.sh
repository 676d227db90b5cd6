#!/usr/bin/env bash
# Images (issue 15), side by side:
#   - import:  `kiln image import` of the test image (the host's Python,
#              ~54 MiB, as an uncompressed OCI layout): copy, verify, unpack
#   - pull:    `kiln image pull` (fetch, verify, unpack) against
#              `skopeo copy docker://… oci:…` (fetch only) of the same image
#              from a docker-registry on loopback; disk use of both
#   - big:     a ~110 MiB image (the host's Python, numpy and pip), BIG_RUNS
#              times each, alternating: `kiln image pull` (fetch, verify,
#              unpack) against `skopeo copy` + `umoci unpack` (fetch, then
#              unpack into a runtime bundle); medians, and disk use of both
#   - create:  `kiln run --json` of `pass`, RUNS times, alternating a host
#              root and an image root, with the same static agent:
#              `timings.acquire_ms` (the jail made until the agent's
#              handshake) and `total_ms`
# Needs root, docker-registry, skopeo and umoci (Debian packages); KILN_BIN (default target/debug)
# holds `kiln`, AGENT is a static kiln-agent (tests build one in
# target/static-agent).
#
#   bench/images.sh            # RUNS=40 BIG_RUNS=5
set -euo pipefail
BIN=$(realpath "${KILN_BIN:-target/debug}")
AGENT=$(realpath "${AGENT:-target/static-agent/x86_64-unknown-linux-gnu/debug/kiln-agent}")
RUNS=${RUNS:-40}
BIG_RUNS=${BIG_RUNS:-5}
OUT=$(mktemp -d /tmp/kiln-bench-images.XXXXXX)
chmod 755 "$OUT"
trap 'kill "$REG" 2>/dev/null || true; rm -rf "$OUT"' EXIT
{ date -u +%FT%TZ; cat /proc/loadavg; } >&2
cargo run -q -p kiln-tests --example make_test_image -- "$OUT/layout" >/dev/null
ms() { python3 -c 'import sys,time; print(round((time.time()-float(sys.argv[1]))*1000))' "$1"; }

t=$(date +%s.%N); "$BIN/kiln" image import "$OUT/layout" --images-dir "$OUT/import" >/dev/null
echo "import: $(ms "$t") ms, store $(du -sm "$OUT/import" | cut -f1) MiB (blobs + unpacked root)"

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
printf 'version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: %s\nhttp:\n  addr: 127.0.0.1:%s\n' "$OUT/registry" "$port" > "$OUT/registry.yml"
docker-registry serve "$OUT/registry.yml" >/dev/null 2>&1 & REG=$!
for _ in $(seq 100); do (echo > "/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
skopeo --insecure-policy copy --quiet --dest-tls-verify=false "oci:$OUT/layout:py" "docker://127.0.0.1:$port/bench/py:1"
t=$(date +%s.%N); "$BIN/kiln" image pull --insecure "127.0.0.1:$port/bench/py:1" --images-dir "$OUT/pull" >/dev/null
echo "kiln image pull (fetch + verify + unpack): $(ms "$t") ms, $(du -sm "$OUT/pull" | cut -f1) MiB"
t=$(date +%s.%N); skopeo --insecure-policy copy --quiet --src-tls-verify=false "docker://127.0.0.1:$port/bench/py:1" "oci:$OUT/skopeo:py"
echo "skopeo copy (fetch only): $(ms "$t") ms, $(du -sm "$OUT/skopeo" | cut -f1) MiB"

# The ~100 MiB image, side by side with skopeo + umoci.
cargo run -q -p kiln-tests --example make_test_image -- "$OUT/big-layout" --big >/dev/null
echo "big image: $(du -sm "$OUT/big-layout" | cut -f1) MiB as an uncompressed OCI layout"
skopeo --insecure-policy copy --quiet --dest-tls-verify=false "oci:$OUT/big-layout:big" "docker://127.0.0.1:$port/bench/big:1"
for i in $(seq "$BIG_RUNS"); do
    rm -rf "$OUT/big-pull" "$OUT/big-skopeo" "$OUT/big-bundle"
    sync; echo 1 > /proc/sys/vm/drop_caches 2>/dev/null || true
    t=$(date +%s.%N); "$BIN/kiln" image pull --insecure "127.0.0.1:$port/bench/big:1" --images-dir "$OUT/big-pull" >/dev/null
    k=$(ms "$t")
    sync; echo 1 > /proc/sys/vm/drop_caches 2>/dev/null || true
    t=$(date +%s.%N); skopeo --insecure-policy copy --quiet --src-tls-verify=false "docker://127.0.0.1:$port/bench/big:1" "oci:$OUT/big-skopeo:big"
    c=$(ms "$t")
    t=$(date +%s.%N); umoci --log error unpack --image "$OUT/big-skopeo:big" "$OUT/big-bundle" >/dev/null
    u=$(ms "$t")
    echo "$k $c $u"
done > "$OUT/big.txt"
python3 - "$OUT/big.txt" <<'PY'
import statistics, sys
rows = [list(map(float, l.split())) for l in open(sys.argv[1])]
k, c, u = (statistics.median(r[i] for r in rows) for i in range(3))
both = statistics.median(r[1] + r[2] for r in rows)
print(f"big: kiln image pull median {k:.0f} ms; skopeo copy {c:.0f} + umoci unpack {u:.0f} = {both:.0f} ms (median of sums); kiln/baseline {k/both:.2f} (n={len(rows)})")
PY
echo "big disk: kiln store $(du -sm "$OUT/big-pull" | cut -f1) MiB; skopeo layout $(du -sm "$OUT/big-skopeo" | cut -f1) MiB + umoci bundle $(du -sm "$OUT/big-bundle" | cut -f1) MiB"

mkdir -p "$OUT/state"
for i in $(seq "$RUNS"); do
    for mode in host image; do
        extra=()
        [ "$mode" = image ] && extra=(--images-dir "$OUT/import" --image py)
        "$BIN/kiln" run --agent "$AGENT" --state-dir "$OUT/state" --cgroup-parent kiln-bench-images \
            "${extra[@]}" --runtime python -c pass --json --no-stdin \
            | python3 -c "import json,sys; r=json.load(sys.stdin); assert r['outcome']=='ok', r; print('$mode', r['timings']['acquire_ms'], r['timings']['total_ms'])"
    done
done > "$OUT/create.txt"
python3 - "$OUT/create.txt" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
for mode in ("host", "image"):
    a = sorted(float(r[1]) for r in rows if r[0] == mode)
    t = sorted(float(r[2]) for r in rows if r[0] == mode)
    q = lambda v, p: v[min(len(v) - 1, int(p * len(v)))]
    print(f"{mode:5} root: create p50 {q(a,.5):6.1f} p90 {q(a,.9):6.1f} ms; kiln run total p50 {q(t,.5):6.1f} p90 {q(t,.9):6.1f} ms (n={len(a)})")
PY
cat /proc/loadavg >&2
