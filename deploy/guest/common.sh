# Shared by the guest build scripts: the cache location, input hashing,
# and installing missing Debian build dependencies.

# Artefacts live outside the repository, one directory per hash of inputs.
KILN_GUEST_CACHE="${KILN_GUEST_CACHE:-/var/cache/kiln/guest}"

log() { printf '[guest] %s\n' "$*" >&2; }
die() { printf '[guest] error: %s\n' "$*" >&2; exit 1; }

# Installs the Debian packages named, if any is missing (root only).
need_packages() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    [ "$(id -u)" = 0 ] || die "missing packages: ${missing[*]} (run as root, or apt-get install them)"
    log "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# sha256 of everything given on stdin, 16 hex digits.
short_hash() { sha256sum | cut -c1-16; }

# Keeps the newest $2 directories named $1* in the cache, removes older
# ones (a VM still running on a removed image keeps its open file).
prune() {
    local prefix="$1" keep="$2"
    ls -1dt "$KILN_GUEST_CACHE/$prefix"* 2>/dev/null | tail -n +"$((keep + 1))" | while IFS= read -r d; do
        log "pruning old $d"
        rm -rf "$d"
    done
}
