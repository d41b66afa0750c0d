#!/usr/bin/env bash
# Multi-host test of the ZeroMQ transport on one machine: three network namespaces ("hosts"),
# each with its own network stack and one address, joined by veth pairs to a bridge:
#
#   ns 1: 10.77.0.1/24 ---+
#   ns 2: 10.77.0.2/24 ---+--- bridge (no address on the host)
#   ns 3: 10.77.0.3/24 ---+
#
# One demo process runs in each namespace (`demo --transport zmq --listen tcp://10.77.0.X:7000
# [--join tcp://10.77.0.1:7000] --expect 3`, with a shared secret); the one in ns 1 founds the
# cluster. The script waits for all three (each bounded by `timeout`), checks every exit code
# and that every process printed `coherent: yes`, and always removes what it created. Exits
# non-zero on failure, printing the logs.
#
# Needs root (network namespaces) and iproute2, which it installs with apt-get if missing.
# Environment: DEMO=path/to/demo skips the build; RUN_TIMEOUT (seconds, default 120) bounds
# each process.
set -euo pipefail
cd "$(dirname "$0")/.."

RUN_TIMEOUT=${RUN_TIMEOUT:-120}
PORT=7000
SUBNET=10.77.0
TAG="cz$$"                 # keeps names unique per run; interface names stay under 16 chars
BRIDGE="${TAG}br"
WORK=$(mktemp -d)
NAMESPACES=()
PIDS=()

log() { printf 'netns-zmq: %s\n' "$*"; }

cleanup() {
    local pid ns i
    for pid in "${PIDS[@]}"; do
        kill -9 "$pid" 2>/dev/null || true
    done
    for i in 1 2 3; do
        ip link del "${TAG}h$i" 2>/dev/null || true
    done
    for ns in "${NAMESPACES[@]}"; do
        # Ends every process still inside the namespace, then the namespace and its veth ends.
        for pid in $(ip netns pids "$ns" 2>/dev/null); do
            kill -9 "$pid" 2>/dev/null || true
        done
        ip netns del "$ns" 2>/dev/null || true
    done
    ip link del "$BRIDGE" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

if [ "$(id -u)" -ne 0 ]; then
    log "needs root to create network namespaces" >&2
    exit 1
fi
if ! command -v ip >/dev/null; then
    log "installing iproute2"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq iproute2
fi
command -v timeout >/dev/null || { log "timeout (coreutils) is missing" >&2; exit 1; }

if [ -z "${DEMO:-}" ]; then
    log "building the demo"
    cargo build --release -p demo --bin demo
    DEMO=target/release/demo
fi
DEMO=$(realpath "$DEMO")

log "creating bridge $BRIDGE and namespaces ${TAG}-1..3"
ip link add "$BRIDGE" type bridge
ip link set "$BRIDGE" up
for i in 1 2 3; do
    ns="${TAG}-$i"
    ip netns add "$ns"
    NAMESPACES+=("$ns")
    ip link add "${TAG}h$i" type veth peer name "${TAG}n$i"
    ip link set "${TAG}h$i" master "$BRIDGE" up
    ip link set "${TAG}n$i" netns "$ns"
    ip -n "$ns" link set lo up
    ip -n "$ns" addr add "$SUBNET.$i/24" dev "${TAG}n$i"
    ip -n "$ns" link set "${TAG}n$i" up
done

# The three processes share a secret, so every frame between the "hosts" is authenticated.
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$WORK/secret"

# start I [ARGS...]: runs one demo process in namespace I, output to $WORK/node-I.log.
start() {
    local i=$1
    shift
    ip netns exec "${TAG}-$i" timeout --kill-after=5 "$RUN_TIMEOUT" "$DEMO" --transport zmq \
        --listen "tcp://$SUBNET.$i:$PORT" --expect 3 --secret-file "$WORK/secret" "$@" \
        </dev/null >"$WORK/node-$i.log" 2>&1 &
    PIDS[i]=$!
}

show_logs() {
    local i
    for i in 1 2 3; do
        printf '\n----- %s-%s (%s.%s) -----\n' "$TAG" "$i" "$SUBNET" "$i"
        cat "$WORK/node-$i.log" 2>/dev/null || echo "(no log)"
    done
}

fail() {
    log "FAILED: $*" >&2
    show_logs >&2
    exit 1
}

log "starting the founder in ${TAG}-1 on tcp://$SUBNET.1:$PORT"
start 1
for _ in $(seq 100); do
    grep -q "listening on" "$WORK/node-1.log" 2>/dev/null && break
    kill -0 "${PIDS[1]}" 2>/dev/null || break
    sleep 0.1
done
grep -q "listening on tcp://$SUBNET.1:$PORT" "$WORK/node-1.log" 2>/dev/null ||
    fail "the founder did not start listening"
log "starting the joiners in ${TAG}-2 and ${TAG}-3"
start 2 --join "tcp://$SUBNET.1:$PORT"
start 3 --join "tcp://$SUBNET.1:$PORT"

failed=()
for i in 1 2 3; do
    code=0
    wait "${PIDS[i]}" || code=$?
    unset "PIDS[i]"
    case $code in
        0) ;;
        124 | 137) failed+=("process in ${TAG}-$i timed out after ${RUN_TIMEOUT}s (exit $code)") ;;
        *) failed+=("process in ${TAG}-$i exited with $code") ;;
    esac
    verdict=$(tail -n 1 "$WORK/node-$i.log")
    [ "$verdict" = "coherent: yes" ] ||
        failed+=("process in ${TAG}-$i ended with ${verdict:-nothing}")
done
# The founder is node 0 and prints the report; the last node admitted opened late and must have
# seen the values the other two wrote.
grep -q "int: read 20 on open, not its init -1 (version 2)" "$WORK/node-1.log" ||
    failed+=("the founder's report lacks the late opener's read of the current value")
if [ ${#failed[@]} -gt 0 ]; then
    fail "$(printf '%s; ' "${failed[@]}")"
fi

show_logs
log "passed: three namespaces, three processes, coherent: yes"
