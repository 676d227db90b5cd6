#!/usr/bin/env bash
# The whole test suite of Kiln, from a fresh machine: installs what the
# build and the tests need (idempotently), starts the services they use,
# builds every binary, then runs every test. `.ci/run` calls exactly this.
#
# Needs root: the jail backend uses user namespaces with id ranges, cgroups
# and mounts; the page server uses userfaultfd.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n== %s\n' "$*"; }

if [ "$(id -u)" != 0 ]; then
    echo "scripts/test.sh must run as root (namespaces, cgroups, userfaultfd)" >&2
    exit 1
fi

# The toolchain: rust-toolchain.toml pins the machine's one Rust by its
# version. Where rustup knows that release only as `stable`, give it the
# pinned name too (a link, no download), then check that the compiler cargo
# uses is the release Cargo.toml's rust-version declares.
want=$(sed -n 's/^channel = "\(.*\)"/\1/p' rust-toolchain.toml)
if ! rustup toolchain list | grep -q "^$want"; then
    stable=$(rustup run stable rustc --version | awk '{print $2}')
    if [ "$stable" != "$want" ]; then
        echo "rust-toolchain.toml pins Rust $want, but rustup has only $stable" >&2
        exit 1
    fi
    rustup toolchain link "$want" "$(rustup run stable rustc --print sysroot)"
fi
declared=$(sed -n 's/^rust-version = "\(.*\)"/\1/p' Cargo.toml)
case "$(rustc --version | awk '{print $2}')" in
    "$declared" | "$declared".*) ;;
    *) echo "rustc is $(rustc --version), Cargo.toml declares rust-version $declared" >&2; exit 1 ;;
esac

# Debian packages: the runtimes the default runtime table names,
# bubblewrap for the benchmark baseline, and the data plane of sandbox
# networks (iproute2, nftables, conntrack). (The page server issues its
# userfaultfd ioctls itself, so no libclang/bindgen is needed.) The image
# tests start their own registries on loopback (docker-registry) and push
# their images, made from host files, with skopeo; openssl makes the key of
# the token-auth registry's token service. python3-matplotlib: the
# code-context tests render a figure to PNG in a sandbox (no network at run
# time); python3-venv: the MCP and client tests' Python environment
# (scripts/pyenv.sh).
packages=(python3 nodejs bash bubblewrap procps iproute2 nftables conntrack docker-registry skopeo openssl python3-matplotlib python3-venv)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# The microVM guest: kernel from linux-source-6.1, Debian image with the
# static agent as init, and vhost-device-vsock. Cached under
# /var/cache/kiln/guest by the hash of their inputs: ~12 min on a fresh
# machine, seconds afterwards. The guest tests must run, not skip.
log "guest kernel and image"
eval "$(deploy/guest/build.sh)"
export KILN_REQUIRE_GUEST=1

# Firecracker and its jailer for the Firecracker layer's tests: a build
# shared on this machine (see docs/firecracker.md); the tests must run, not
# skip.
export KILN_FIRECRACKER_BIN="${KILN_FIRECRACKER_BIN:-/work/shared/firecracker/firecracker}"
export KILN_JAILER_BIN="${KILN_JAILER_BIN:-/work/shared/firecracker/jailer}"
export KILN_REQUIRE_FIRECRACKER=1

# RabbitMQ for the AMQP tests: Debian's rabbitmq-server, installed if
# missing and started if not running, on loopback (idempotent).
log "RabbitMQ"
bash scripts/rabbitmq.sh start

# The Python side: the official MCP SDK and the Python client, in a venv
# the MCP and client tests find through KILN_PYTHON.
log "Python environment"
KILN_PYTHON=$(bash scripts/pyenv.sh)
export KILN_PYTHON

log "format and lints"
cargo fmt --all --check
cargo clippy --workspace --all-targets --quiet -- -D warnings

log "build"
cargo build --workspace --bins --quiet

log "tests"
cargo test --workspace --quiet 2>&1

# Coverage-guided fuzzing of the parsers of untrusted input (fuzz/README.md):
# a short smoke run of every target; the long runs are in docs/BENCHMARKS.md.
log "fuzzing, 15 s per target"
bash scripts/fuzz.sh all 15

# The chaos soak, short: 300 jobs through RabbitMQ to two executors (one
# SIGKILLed twice, the broker restarted, agents killed, poison sent) and 300
# through HTTP, then nothing may be lost or left (docs/operations.md, "Soak").
# A few minutes; `scripts/soak.sh` without --short is the full 10,000 + 10,000.
log "chaos soak (short)"
rm -rf target/soak/ci
bash scripts/soak.sh --short --out target/soak/ci
