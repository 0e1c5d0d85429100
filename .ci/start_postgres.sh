#!/usr/bin/env bash
# Start a throwaway PostgreSQL server for the tests, on 127.0.0.1 only, and print its URL.
#
#   url="$(bash .ci/start_postgres.sh)"      # then: export POLL_TEST_POSTGRES_URL="$url"
#   bash .ci/start_postgres.sh stop          # stop the one this script started last
#
# A fresh cluster in its own folder (initdb) rather than Debian's `main` cluster: nothing on the
# machine has to be running or configured, a stale server from an earlier run is replaced, and the
# port is one that is free now. Diagnostics go to stderr; stdout carries only the URL.
set -euo pipefail

STATE_DIR="${POLL_PG_STATE_DIR:-/tmp/poll-assets-pg}"
DATA_DIR="$STATE_DIR/data"
DB_NAME="poll_test"

log() { echo "start_postgres: $*" >&2; }

pg_bin() {
    local dir
    dir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
    if [[ -z "$dir" || ! -x "$dir/initdb" ]]; then
        log "no PostgreSQL server binaries under /usr/lib/postgresql/*/bin (apt-get install -y postgresql)"
        exit 1
    fi
    echo "$dir"
}

# The server refuses to run as root; as root, run it as the `postgres` user the package creates.
as_owner() {
    if [[ "$(id -u)" == "0" ]]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

stop_server() {
    local bin="$1"
    if [[ -f "$DATA_DIR/postmaster.pid" ]]; then
        as_owner "$bin/pg_ctl" -D "$DATA_DIR" -m immediate -w stop >&2 || true
    fi
}

BIN="$(pg_bin)"
if [[ "${1:-start}" == "stop" ]]; then
    stop_server "$BIN"
    exit 0
fi

stop_server "$BIN"
rm -rf "$STATE_DIR"
mkdir -p "$DATA_DIR"
if [[ "$(id -u)" == "0" ]]; then
    chown -R postgres:postgres "$STATE_DIR"
fi
chmod 700 "$DATA_DIR"

PORT="${POLL_PG_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"

# trust auth is acceptable only because the server listens on loopback and lives for one CI run.
as_owner "$BIN/initdb" -D "$DATA_DIR" -U postgres --auth=trust --encoding=UTF8 --locale=C >"$STATE_DIR/initdb.log" 2>&1 \
    || { cat "$STATE_DIR/initdb.log" >&2; exit 1; }
as_owner "$BIN/pg_ctl" -D "$DATA_DIR" -l "$STATE_DIR/server.log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $PORT -k $STATE_DIR -c fsync=off" start >&2 \
    || { cat "$STATE_DIR/server.log" >&2; exit 1; }
as_owner "$BIN/createdb" -h 127.0.0.1 -p "$PORT" -U postgres "$DB_NAME" >&2
log "$("$BIN/postgres" --version) on 127.0.0.1:$PORT, data in $DATA_DIR"
echo "postgresql://postgres@127.0.0.1:$PORT/$DB_NAME"
