#!/usr/bin/env bash
# The RabbitMQ broker the AMQP tests run against: a real one, from Debian's
# `rabbitmq-server` package, on loopback. Idempotent: installs the package
# when missing, starts the broker when it is not running, and waits until it
# accepts connections.
#
#   scripts/rabbitmq.sh [start]   install if needed, start if needed (default)
#   scripts/rabbitmq.sh stop      stop the broker and wait until it is down
#   scripts/rabbitmq.sh status    exit 0 when the broker is up
#
# The tests use `stop` and `start` to restart the broker mid-run. Needs root
# (apt-get, and the broker runs as the `rabbitmq` user the package creates).
set -euo pipefail

log() { printf '== rabbitmq: %s\n' "$*" >&2; }

# Bounded: a broker that does not come up in this time is a failure to report,
# not something to wait for forever.
START_TIMEOUT_S=${KILN_RABBITMQ_START_TIMEOUT_S:-120}

# Only loopback: the tests never need the broker to be reachable from outside.
export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
export RABBITMQ_DIST_PORT=${RABBITMQ_DIST_PORT:-25672}
export ERL_EPMD_ADDRESS=127.0.0.1
export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"

is_up() {
    timeout 20 rabbitmqctl -q status >/dev/null 2>&1
}

install() {
    if command -v rabbitmq-server >/dev/null 2>&1 && command -v rabbitmqctl >/dev/null 2>&1; then
        return
    fi
    log "installing rabbitmq-server from Debian's packages"
    export DEBIAN_FRONTEND=noninteractive
    # Another apt run (a parallel install) holds the lock: wait for it, within
    # bounds, rather than failing.
    local i
    for i in $(seq 1 60); do
        if apt-get update -qq && apt-get install -y -qq --no-install-recommends rabbitmq-server; then
            return
        fi
        log "apt-get failed (lock held?); retry $i/60 in 5 s"
        sleep 5
    done
    log "could not install rabbitmq-server"
    exit 1
}

start() {
    install
    if is_up; then
        log "already running"
        return
    fi
    log "starting the broker"
    # Debian's postinst does not start it in containers (policy-rc.d); start
    # it directly, detached, as the package's own wrapper does (it drops to
    # the rabbitmq user).
    # A node that is still booting makes this fail ("already running"):
    # the wait below covers both cases.
    rabbitmq-server -detached || log "rabbitmq-server -detached failed; waiting for a node anyway"
    # `await_startup` fails at once while the node has not registered with
    # epmd yet, so poll it, within the bound.
    local deadline=$((SECONDS + START_TIMEOUT_S))
    until timeout 30 rabbitmqctl -q await_startup --timeout 30 >/dev/null 2>&1; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            log "the broker did not start in ${START_TIMEOUT_S} s; see /var/log/rabbitmq/"
            exit 1
        fi
        sleep 1
    done
    log "up"
}

stop() {
    if ! is_up; then
        log "not running"
        return
    fi
    log "stopping the broker"
    # `shutdown` stops the whole node (not just the app) and waits for the
    # Erlang VM to exit.
    timeout 60 rabbitmqctl -q shutdown
    log "stopped"
}

case "${1:-start}" in
    start) start ;;
    stop) stop ;;
    status) is_up ;;
    *)
        echo "usage: $0 [start|stop|status]" >&2
        exit 2
        ;;
esac
