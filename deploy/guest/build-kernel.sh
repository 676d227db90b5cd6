#!/usr/bin/env bash
# Builds Kiln's microVM guest kernel: Debian's linux-source-6.1, `make
# tinyconfig`, plus kernel.config. Output: an uncompressed PVH `vmlinux`
# that boots on QEMU `-M microvm` and on Firecracker.
#
# The result is cached in $KILN_GUEST_CACHE/kernel-<hash>/ (default
# /var/cache/kiln/guest), keyed by kernel.config, the linux-source package
# version and $recipe below; a second run prints the cached path at once.
#
# Usage: build-kernel.sh            prints the path of vmlinux on stdout
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
. "$here/common.sh"

need_packages linux-source-6.1 build-essential flex bison bc libelf-dev cpio xz-utils

# Bump when a change to the steps below changes the kernel built.
recipe=1
src_version="$(dpkg-query -W -f='${Version}' linux-source-6.1)"
key="$( { cat "$here/kernel.config"; echo "$src_version recipe $recipe"; } | short_hash)"
out="$KILN_GUEST_CACHE/kernel-$key"
if [ -f "$out/vmlinux" ]; then
    echo "$out/vmlinux"
    exit 0
fi

log "building kernel $src_version (key $key) in $out"
mkdir -p "$KILN_GUEST_CACHE"
work="$(mktemp -d "$KILN_GUEST_CACHE/.kernel-build.XXXXXX")"
trap 'rm -rf "$work"' EXIT
tar -C "$work" -xf /usr/src/linux-source-6.1.tar.xz
cd "$work/linux-source-6.1"

make -s tinyconfig >&2
KCONFIG_CONFIG=.config scripts/kconfig/merge_config.sh -m .config "$here/kernel.config" >/dev/null
make -s olddefconfig >&2

# Every option asked for must have survived olddefconfig.
lost=()
while IFS= read -r line; do
    case "$line" in
        CONFIG_*=y) grep -qx "$line" .config || lost+=("$line") ;;
        "# CONFIG_"*" is not set")
            opt="${line#\# }"; opt="${opt%% *}"
            grep -q "^$opt=y" .config && lost+=("$opt off") ;;
    esac
done < "$here/kernel.config"
[ "${#lost[@]}" -eq 0 ] || die "kernel options not applied (missing dependencies?): ${lost[*]}"

make -s -j"$(nproc)" vmlinux >&2
mkdir -p "$out.tmp"
cp vmlinux "$out.tmp/vmlinux"
cp .config "$out.tmp/config"
rm -rf "$out"
mv "$out.tmp" "$out"
log "kernel ready: $out/vmlinux"
prune kernel- 2
echo "$out/vmlinux"
