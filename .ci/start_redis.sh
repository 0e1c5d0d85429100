#!/usr/bin/env bash
# Start a throwaway Redis server (the Celery broker and result backend for the scale-out tests), on
# 127.0.0.1 only, and print its URL.
#
#   url="$(bash .ci/start_redis.sh)"         # then: export POLL_TEST_REDIS_URL="$url"
#   bash .ci/start_redis.sh stop             # stop the one this script started last
#
# Its own folder (POLL_REDIS_STATE_DIR) and a port that is free now, no persistence, so two runs on
# one machine cannot stop or read each other's server. Diagnostics go to stderr; stdout carries
# only the URL.
set -euo pipefail

STATE_DIR="${POLL_REDIS_STATE_DIR:-/tmp/poll-assets-redis}"
PID_FILE="$STATE_DIR/redis.pid"

log() { echo "start_redis: $*" >&2; }

stop_server() {
    if [[ -f "$PID_FILE" ]]; then
        local pid
        pid="$(cat "$PID_FILE")"
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        rm -f "$PID_FILE"
    fi
}

if ! command -v redis-server >/dev/null; then
    log "redis-server is not installed (apt-get install -y redis-server)"
    exit 1
fi
if [[ "${1:-start}" == "stop" ]]; then
    stop_server
    exit 0
fi

stop_server
rm -rf "$STATE_DIR"
mkdir -p "$STATE_DIR"
PORT="${POLL_REDIS_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"

# No password: the server listens on loopback only and lives for one CI run.
redis-server --bind 127.0.0.1 --port "$PORT" --dir "$STATE_DIR" --daemonize yes --pidfile "$PID_FILE" \
    --logfile "$STATE_DIR/redis.log" --save "" --appendonly no >&2
for _ in $(seq 100); do
    if redis-cli -h 127.0.0.1 -p "$PORT" ping 2>/dev/null | grep -q PONG; then
        log "$(redis-server --version | cut -d' ' -f1-3) on 127.0.0.1:$PORT, files in $STATE_DIR"
        echo "redis://127.0.0.1:$PORT/0"
        exit 0
    fi
    sleep 0.1
done
log "redis did not answer on 127.0.0.1:$PORT; log:"
cat "$STATE_DIR/redis.log" >&2 || true
exit 1
