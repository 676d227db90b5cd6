#!/usr/bin/env bash
# microVM root disks of images (issue 15, item 5):
#   - disk:  `ImageStore::disk` (unpack with the image's own ids, agent as
#            /sbin/init, mkfs.ext4 -d) for the test image (the host's
#            Python, tests/src/images.rs) and a larger one made from host
#            files (Python's standard library and /usr/libexec, one layer,
#            ~125 MiB): first build and cached hit
#            (images/examples/disk_build.rs, release build)
#   - boot:  `kiln run --backend qemu --snapshot-templates false` of `pass`,
#            QEMU_RUNS times alternating Kiln's guest image and the test
#            image's disk: `timings.total_ms` (a cold boot each)
# Needs root, e2fsprogs, QEMU and the guest artefacts
# (eval "$(deploy/guest/build.sh)"); KILN_BIN (default target/debug) holds
# `kiln`.
#
#   bench/image_disks.sh            # QEMU_RUNS=5
set -euo pipefail
BIN=$(realpath "${KILN_BIN:-target/debug}")
QEMU_RUNS=${QEMU_RUNS:-5}
ROOTFS=${KILN_GUEST_ROOTFS:?set it: eval \"\$(deploy/guest/build.sh)\"}
OUT=$(mktemp -d /tmp/kiln-bench-disks.XXXXXX)
trap 'rm -rf "$OUT"' EXIT
{ date -u +%FT%TZ; cat /proc/loadavg; } >&2
cargo build -q --release -p kiln-images --example disk_build
DISK_BUILD=target/release/examples/disk_build
cargo run -q -p kiln-tests --example make_test_image -- "$OUT/layout" >/dev/null
"$BIN/kiln" image import "$OUT/layout" --images-dir "$OUT/store" >/dev/null
debugfs -R "cat /sbin/kiln-agent" "$ROOTFS" > "$OUT/agent" 2>/dev/null

# The larger image: one uncompressed layer of host files, as an OCI layout.
big="$OUT/big"
mkdir -p "$big/blobs/sha256"
tar -C / -cf "$big/layer.tar" usr/lib/python3.11 usr/libexec
put() { local d; d=$(sha256sum "$1" | cut -d' ' -f1); mv "$1" "$big/blobs/sha256/$d"; echo "$d"; }
layer=$(put "$big/layer.tar")
lsize=$(stat -c %s "$big/blobs/sha256/$layer")
printf '{"architecture":"amd64","os":"linux","config":{},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' "$layer" > "$big/config.json"
csize=$(stat -c %s "$big/config.json"); config=$(put "$big/config.json")
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:%s","size":%s}]}' "$config" "$csize" "$layer" "$lsize" > "$big/manifest.json"
msize=$(stat -c %s "$big/manifest.json"); manifest=$(put "$big/manifest.json")
printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"annotations":{"org.opencontainers.image.ref.name":"big"}}]}' "$manifest" "$msize" > "$big/index.json"
echo '{"imageLayoutVersion":"1.0.0"}' > "$big/oci-layout"
"$BIN/kiln" image import "$big" --images-dir "$OUT/store" >/dev/null
echo "big image: $((lsize >> 20)) MiB uncompressed layer, $(tar -tf "$big/blobs/sha256/$layer" | wc -l) entries"

for ref in py big; do
    "$DISK_BUILD" "$OUT/store" "$ref" "$OUT/agent"
done

mkdir -p "$OUT/state"
for i in $(seq "$QEMU_RUNS"); do
    for mode in guest image; do
        extra=()
        [ "$mode" = image ] && extra=(--images-dir "$OUT/store" --image py)
        "$BIN/kiln" run --backend qemu --snapshot-templates false --state-dir "$OUT/state" \
            "${extra[@]}" --runtime python -c pass --json --no-stdin \
            | python3 -c "import json,sys; r=json.load(sys.stdin); assert r['outcome']=='ok', r; print('$mode', r['timings']['acquire_ms'], r['timings']['total_ms'])"
    done
done > "$OUT/boot.txt"
python3 - "$OUT/boot.txt" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
for mode in ("guest", "image"):
    a = [float(r[1]) for r in rows if r[0] == mode]
    t = [float(r[2]) for r in rows if r[0] == mode]
    print(f"qemu boot on the {mode:5} root: acquire median {statistics.median(a):7.1f} ms, kiln run total median {statistics.median(t):7.1f} ms (n={len(a)})")
PY
cat /proc/loadavg >&2
