#!/bin/sh
# Entrypoint of the mm-node image: one PostgreSQL 15 server plus mmd beside it.
#
#   1. initdb $PGDATA if it is empty, with the settings mm needs for up to
#      $MM_MAX_NODES nodes (runtime/src/pg/prereq.rs) and trust authentication
#      (the image is for test clusters on a private Docker network);
#   2. start PostgreSQL (after removing lock files a killed container left:
#      no postmaster can be running when this script starts);
#   3. if $MM_CONFIG_TOML is set and $MM_CONFIG does not exist yet, write it
#      there (an operator may edit $MM_CONFIG later: adding a node changes
#      every config); if $MM_CONFIG exists and init was not done yet, run
#      `mmctl init --config $MM_CONFIG`, and with MM_ADD_NODE=1 then
#      `mmctl add-node` (a node joining a running cluster);
#   4. run `mmd --config $MM_CONFIG` (without a config: PostgreSQL alone).
#
# This script stays PID 1 and supervises: SIGTERM/SIGINT (`docker stop`) stop
# mmd, then PostgreSQL (-m fast); if mmd exits on its own, PostgreSQL is
# stopped and the container exits with mmd's status. The data directory lives
# in the container's filesystem, so `docker stop`/`start` and `docker
# kill`/`start` bring the node back with its data (crash recovery after kill).
set -eu

PGBIN=/usr/lib/postgresql/15/bin
PGDATA=${PGDATA:-/var/lib/mm/pgdata}
PGLOG=${PGLOG:-/var/lib/mm/postgres.log}
MM_CONFIG=${MM_CONFIG:-/etc/mm/mmd.toml}
MM_MAX_NODES=${MM_MAX_NODES:-5}
MM_PG_FSYNC=${MM_PG_FSYNC:-on}
MM_PG_MAX_CONNECTIONS=${MM_PG_MAX_CONNECTIONS:-100}
MM_APPLIERS_PER_PEER=${MM_APPLIERS_PER_PEER:-4}
MM_INIT_MARKER=${MM_INIT_MARKER:-/var/lib/mm/mmctl-init.done}
SOCKDIR=/var/run/postgresql

log() { echo "mm-entrypoint: $*" >&2; }
as_pg() { runuser -u postgres -- "$@"; }

mkdir -p "$(dirname "$PGDATA")" "$SOCKDIR" "$(dirname "$MM_CONFIG")"
chown postgres:postgres "$(dirname "$PGDATA")" "$SOCKDIR"
chmod 2775 "$SOCKDIR"

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    log "initdb $PGDATA"
    mkdir -p "$PGDATA"
    chown postgres:postgres "$PGDATA"
    chmod 700 "$PGDATA"
    nosync=""
    [ "$MM_PG_FSYNC" = off ] && nosync="--no-sync"
    as_pg "$PGBIN/initdb" -D "$PGDATA" -U postgres -A trust -E UTF8 --locale=C $nosync >/dev/null
    n=$MM_MAX_NODES
    maxconn=$MM_PG_MAX_CONNECTIONS
    [ "$maxconn" -lt 100 ] && prep_base=100 || prep_base=$maxconn
    # replication origins, capped by the same setting: peers x (appliers + 1)
    slots=$(((n - 1) * (MM_APPLIERS_PER_PEER + 1)))
    [ "$slots" -lt $((2 * n + 2)) ] && slots=$((2 * n + 2))
    [ "$slots" -lt 10 ] && slots=10
    senders=$((2 * n + 2))
    [ "$senders" -lt 10 ] && senders=10
    cat >"$PGDATA/mm.conf" <<CONF
# written by the mm-node entrypoint for clusters of up to $n nodes
listen_addresses = '*'
port = 5432
unix_socket_directories = '$SOCKDIR'
wal_level = logical
max_connections = $maxconn
max_prepared_transactions = $((prep_base * n))
max_replication_slots = $slots
max_wal_senders = $senders
max_worker_processes = 16
wal_sender_timeout = '10s'
max_slot_wal_keep_size = -1
fsync = $MM_PG_FSYNC
jit = off
CONF
    # PostgreSQL 15.20+ loads only the output plugins this names (mm_output:
    # pgoutput without unneeded echoes); earlier 15.x lack the setting.
    if "$PGBIN/postgres" --describe-config 2>/dev/null | grep -q '^output_plugin_libraries'; then
        echo "output_plugin_libraries = 'pgoutput, test_decoding, mm_output'" >>"$PGDATA/mm.conf"
    fi
    echo "include 'mm.conf'" >>"$PGDATA/postgresql.conf"
    # Trust on every address: test clusters on a private network only.
    cat >>"$PGDATA/pg_hba.conf" <<HBA
host all all 0.0.0.0/0 trust
host replication all 0.0.0.0/0 trust
HBA
    chown postgres:postgres "$PGDATA/mm.conf"
fi

# A killed container leaves its lock files; their pids mean nothing in this
# new PID namespace (and may even match a live process here).
rm -f "$PGDATA/postmaster.pid" "$SOCKDIR/.s.PGSQL.5432.lock" "$SOCKDIR/.s.PGSQL.5432"

log "starting PostgreSQL"
if ! as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -l "$PGLOG" -w -t 300 start >/dev/null; then
    log "PostgreSQL did not start; last lines of $PGLOG:"
    tail -n 30 "$PGLOG" >&2 || true
    exit 1
fi

stop_pg() {
    as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -m fast -w -t 20 stop >/dev/null 2>&1 ||
        as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -m immediate stop >/dev/null 2>&1 || true
}

if [ -n "${MM_CONFIG_TOML:-}" ] && [ ! -f "$MM_CONFIG" ]; then
    printf '%s\n' "$MM_CONFIG_TOML" >"$MM_CONFIG"
fi

if [ ! -f "$MM_CONFIG" ]; then
    log "no $MM_CONFIG (and no MM_CONFIG_TOML): running PostgreSQL alone"
    trap 'stop_pg; exit 0' TERM INT
    while :; do
        sleep 3600 &
        wait $! || true
    done
fi

if [ ! -f "$MM_INIT_MARKER" ]; then
    log "mmctl init --config $MM_CONFIG"
    if ! mmctl init --config "$MM_CONFIG"; then
        log "mmctl init failed"
        stop_pg
        exit 1
    fi
    if [ "${MM_ADD_NODE:-0}" = 1 ]; then
        log "mmctl add-node --config $MM_CONFIG"
        if ! mmctl add-node --config "$MM_CONFIG"; then
            log "mmctl add-node failed"
            stop_pg
            exit 1
        fi
    fi
    touch "$MM_INIT_MARKER"
fi

log "starting mmd --config $MM_CONFIG"
mmd --config "$MM_CONFIG" &
mmd_pid=$!
trap 'kill -TERM $mmd_pid 2>/dev/null || true' TERM INT
status=0
# `wait` returns early when a trapped signal arrives: wait again until mmd is gone.
while kill -0 "$mmd_pid" 2>/dev/null; do
    wait "$mmd_pid" && status=0 || status=$?
done
log "mmd exited with status $status; stopping PostgreSQL"
stop_pg
exit "$status"
