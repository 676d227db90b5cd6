#!/usr/bin/env bash
# Builds Kiln's guest root filesystem: an ext4 image of Debian bookworm
# (debootstrap, minbase) with python3, nodejs and bash, and a static
# `kiln-agent` as /sbin/init. Nothing else runs in the guest: the agent,
# as PID 1, mounts /proc, /sys, /dev, an overlay with a tmpfs upper on the
# read-only root, and serves the host over vsock (agent/src/guest.rs).
#
# Two cache levels under $KILN_GUEST_CACHE (default /var/cache/kiln/guest):
#   base-<hash>/root.tar     the debootstrapped tree (slow: a few minutes),
#                            keyed by the suite, the package list and
#                            $recipe below;
#   rootfs-<hash>/rootfs.ext4  base + agent (seconds), keyed by the base
#                            and the agent binary's hash.
# The mirror is the one apt uses on this machine (read from
# /etc/apt/sources.list*), or $KILN_DEBIAN_MIRROR.
#
# Usage: build-rootfs.sh [--agent PATH]   prints the image's path on stdout
#   --agent PATH   use this static kiln-agent instead of building one
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
. "$here/common.sh"

agent=""
while [ $# -gt 0 ]; do
    case "$1" in
        --agent) agent="$2"; shift 2 ;;
        *) die "unknown argument $1 (usage: build-rootfs.sh [--agent PATH])" ;;
    esac
done

[ "$(id -u)" = 0 ] || die "build-rootfs.sh needs root (debootstrap, device nodes)"
need_packages debootstrap e2fsprogs tar

# What goes into the image besides minbase.
packages="python3,nodejs,bash,ca-certificates"
suite=bookworm

# The Debian mirror apt is configured with (deb822 or one-line format).
mirror() {
    if [ -n "${KILN_DEBIAN_MIRROR:-}" ]; then echo "$KILN_DEBIAN_MIRROR"; return; fi
    local f uri
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        uri="$(awk -v s="$suite" '
            /^URIs:/ { u = $2 }
            /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == s) ok = 1 }
            /^$/ { if (ok && u != "" && !done) { print u; done = 1 } ok = 0; u = "" }
            END { if (ok && u != "" && !done) print u }' "$f")"
        [ -n "$uri" ] && { echo "$uri"; return; }
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        uri="$(awk -v s="$suite" '$1 == "deb" && $3 == s { print $2; exit }' "$f")"
        [ -n "$uri" ] && { echo "$uri"; return; }
    done
    die "no Debian $suite mirror found in /etc/apt/sources.list*; set KILN_DEBIAN_MIRROR"
}

# 1. The base tree. Bump $recipe when a change to its steps changes the tree.
recipe=1
base_key="$(echo "$suite $packages recipe $recipe" | short_hash)"
base="$KILN_GUEST_CACHE/base-$base_key"
if [ ! -f "$base/root.tar" ]; then
    m="$(mirror)"
    log "debootstrap $suite (minbase + $packages) from the configured mirror, key $base_key"
    mkdir -p "$KILN_GUEST_CACHE"
    work="$(mktemp -d "$KILN_GUEST_CACHE/.base-build.XXXXXX")"
    trap 'rm -rf "$work"' EXIT
    debootstrap --variant=minbase --include="$packages" "$suite" "$work/root" "$m" >"$work/debootstrap.log" 2>&1 \
        || { tail -20 "$work/debootstrap.log" >&2; die "debootstrap failed (log above)"; }
    r="$work/root"
    # Nothing but the agent runs in the guest: no package manager state, docs
    # or caches are needed at run time.
    rm -rf "$r"/var/cache/apt/* "$r"/var/lib/apt/lists/* "$r"/usr/share/doc/* \
        "$r"/usr/share/man/* "$r"/usr/share/info/* "$r"/var/log/* "$r"/tmp/*
    find "$r/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name 'C.*' -exec rm -rf {} + 2>/dev/null || true
    # Mount points the agent uses; /etc/hostname and resolv.conf as a guest
    # without network expects.
    mkdir -p "$r/work" "$r/overlay" "$r/proc" "$r/sys" "$r/dev" "$r/tmp" "$r/run"
    chmod 1777 "$r/tmp"
    echo kiln > "$r/etc/hostname"
    : > "$r/etc/resolv.conf"
    rm -f "$r/sbin/init"
    tar -C "$r" --numeric-owner -cf "$work/root.tar" .
    mkdir -p "$base.tmp"
    mv "$work/root.tar" "$base.tmp/root.tar"
    rm -rf "$base"
    mv "$base.tmp" "$base"
    rm -rf "$work"
    trap - EXIT
fi

# 2. The agent: static, built in its own target dir so the workspace's
# target/ is not invalidated by different RUSTFLAGS; one per checkout, so
# that two checkouts building at once never put one's agent into the
# other's image.
if [ -z "$agent" ]; then
    target_dir="$KILN_GUEST_CACHE/agent-target-$(printf '%s' "$repo" | short_hash)"
    log "building the static kiln-agent (target dir $target_dir)"
    (cd "$repo" && RUSTFLAGS='-C target-feature=+crt-static' CARGO_TARGET_DIR="$target_dir" \
        cargo build --quiet --release --target x86_64-unknown-linux-gnu -p kiln-agent)
    agent="$target_dir/x86_64-unknown-linux-gnu/release/kiln-agent"
fi
[ -x "$agent" ] || die "agent binary $agent is missing or not executable"
if file_out="$(LC_ALL=C ldd "$agent" 2>&1)" && ! grep -q "not a dynamic executable\|statically linked" <<<"$file_out"; then
    die "$agent is dynamically linked; the guest needs a static agent (crt-static)"
fi

# 3. The image: base + agent as /sbin/init.
agent_sum="$(sha256sum "$agent" | cut -c1-16)"
key="$(echo "$base_key $agent_sum" | short_hash)"
out="$KILN_GUEST_CACHE/rootfs-$key"
if [ -f "$out/rootfs.ext4" ]; then
    echo "$out/rootfs.ext4"
    exit 0
fi
log "making the ext4 image (key $key)"
work="$(mktemp -d "$KILN_GUEST_CACHE/.rootfs-build.XXXXXX")"
trap 'rm -rf "$work"' EXIT
mkdir "$work/root"
tar -C "$work/root" --numeric-owner -xf "$base/root.tar"
install -m 0755 "$agent" "$work/root/sbin/kiln-agent"
ln -sf kiln-agent "$work/root/sbin/init"
# Size: the tree plus 20% and 32 MiB of slack for ext4 metadata.
kib="$(du -sk "$work/root" | cut -f1)"
size_mb=$(( kib * 12 / 10 / 1024 + 32 ))
# No journal: the root is mounted read-only and never written.
# mke2fs prints "Creating regular file" on stdout even with -q; stdout carries
# only the image path, so its chatter goes to stderr.
mkfs.ext4 -q -F -L kiln-root -O ^has_journal -E root_owner=0:0 -d "$work/root" "$work/rootfs.ext4" "${size_mb}M" >&2
chmod 0444 "$work/rootfs.ext4"
mkdir -p "$out.tmp"
mv "$work/rootfs.ext4" "$out.tmp/rootfs.ext4"
rm -rf "$out"
mv "$out.tmp" "$out"
log "rootfs ready: $out/rootfs.ext4 (${size_mb} MiB)"
# Images of other checkouts (or of tests still running) may be in use: keep
# a few.
prune rootfs- 8
echo "$out/rootfs.ext4"
