#!/usr/bin/env bash
# Builds (or takes from the cache) the guest kernel and root image, installs
# vhost-device-vsock if it is missing, and prints the settings that point
# Kiln's qemu backend at them:
#
#   eval "$(deploy/guest/build.sh)"    # exports KILN_GUEST_KERNEL, KILN_GUEST_ROOTFS
#
# Cold: ~4 min for the kernel (2 cores), ~2 min for debootstrap, plus the
# vhost-device-vsock build; warm: a few seconds (the agent is rebuilt
# incrementally and the image remade only when the agent changed).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
. "$here/common.sh"

need_packages qemu-system-x86
if ! command -v vhost-device-vsock >/dev/null && [ ! -x "$HOME/.cargo/bin/vhost-device-vsock" ]; then
    log "installing vhost-device-vsock (cargo install)"
    cargo install --quiet --locked vhost-device-vsock >&2
fi
kernel="$("$here/build-kernel.sh")"
rootfs="$("$here/build-rootfs.sh")"
printf 'export KILN_GUEST_KERNEL=%q\nexport KILN_GUEST_ROOTFS=%q\n' "$kernel" "$rootfs"
