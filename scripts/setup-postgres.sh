#!/usr/bin/env bash
# Installs what the harness needs from Debian: the PostgreSQL 15 server binaries
# (/usr/lib/postgresql/15/bin/{postgres,initdb,pg_ctl}), the pgbench client,
# pgbouncer (the read baseline of `mm-harness bench`), and builds the mm_output
# plugin (scripts/build-plugin.sh).
# Idempotent: does nothing when they are already there.
#
# The harness never uses the cluster the Debian package creates (15/main on
# port 5432); it runs its own clusters under target/mm-work on their own ports.
# This script stops that cluster if it runs and marks it `manual` so it does not
# start at boot.
set -euo pipefail

PG_BIN=/usr/lib/postgresql/15/bin

have_server() { [ -x "$PG_BIN/postgres" ] && [ -x "$PG_BIN/initdb" ] && [ -x "$PG_BIN/pg_ctl" ]; }
have_pgbench() { [ -x "$PG_BIN/pgbench" ] || command -v pgbench >/dev/null 2>&1; }

as_root() {
    if [ "$(id -u)" = 0 ]; then
        "$@"
    else
        echo "setup-postgres: need root for: $*" >&2
        echo "run:  sudo $*" >&2
        exit 1
    fi
}

if ! have_server || ! have_pgbench; then
    pkgs=()
    have_server || pkgs+=(postgresql-15)
    if [ "$(id -u)" != 0 ]; then
        # Cannot ask apt-cache reliably without a fresh index; name the usual packages.
        echo "setup-postgres: PostgreSQL 15 server and/or pgbench missing." >&2
        echo "run:  sudo apt-get update && sudo apt-get install -y postgresql-15 postgresql-client-15" >&2
        echo "then: scripts/setup-postgres.sh" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    if ! have_pgbench; then
        # pgbench ships in postgresql-15 on bookworm; on other releases it has
        # lived in postgresql-contrib-15 or postgresql-client-15. Ask apt which
        # candidate actually exists and contains it.
        for p in postgresql-15 postgresql-client-15 postgresql-contrib-15; do
            if apt-cache show "$p" >/dev/null 2>&1; then
                pkgs+=("$p")
            fi
        done
    fi
    echo "setup-postgres: apt-get install -y ${pkgs[*]}"
    apt-get install -y -qq "${pkgs[@]}"
fi

# `mm-harness bench` runs its own pgbouncer (own ini, own port) as the read
# baseline; the package's system service is never used, so keep it stopped.
if [ "$(id -u)" = 0 ] && ! command -v pgbouncer >/dev/null 2>&1 && [ ! -x /usr/sbin/pgbouncer ]; then
    echo "setup-postgres: apt-get install -y pgbouncer (read baseline of mm-harness bench)"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbouncer
    if command -v systemctl >/dev/null 2>&1; then
        systemctl disable --now pgbouncer >/dev/null 2>&1 || true
    fi
fi

# The local backend cuts single links with iptables (harness/src/backend/linkcut.rs).
if [ "$(id -u)" = 0 ] && ! command -v iptables >/dev/null 2>&1; then
    echo "setup-postgres: apt-get install -y iptables (link cuts on the local backend)"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iptables
fi

if ! have_server; then
    echo "setup-postgres: $PG_BIN/postgres still missing after install" >&2
    exit 1
fi
if ! have_pgbench; then
    echo "setup-postgres: pgbench still missing after install" >&2
    exit 1
fi

# Keep the package's own cluster (if any) out of the way.
if command -v pg_lsclusters >/dev/null 2>&1; then
    while read -r ver name _port status _rest; do
        [ "$ver" = 15 ] || continue
        if [ "$status" = online ]; then
            echo "setup-postgres: stopping Debian cluster $ver/$name (not used by mm)"
            as_root pg_ctlcluster "$ver" "$name" stop || true
        fi
        conf="/etc/postgresql/$ver/$name/start.conf"
        if [ -f "$conf" ] && ! grep -qx manual "$conf"; then
            if [ "$(id -u)" = 0 ]; then
                echo manual >"$conf"
            fi
        fi
    done < <(pg_lsclusters -h 2>/dev/null || true)
fi

# The harness runs the server as this user when started as root (initdb refuses root).
if [ "$(id -u)" = 0 ] && ! id -u postgres >/dev/null 2>&1; then
    echo "setup-postgres: no 'postgres' OS user (the package normally creates it); creating one"
    useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
fi

# mm_output, the output plugin mmd's slots use to leave out echoes a node
# already has (mmd falls back to pgoutput without it). Built after the server
# packages so its headers match the installed server.
if [ "$(id -u)" = 0 ]; then
    "$(dirname "$0")/build-plugin.sh"
else
    echo "setup-postgres: run scripts/build-plugin.sh as root to install the mm_output plugin" >&2
fi

echo "setup-postgres: ok: $("$PG_BIN/postgres" --version), pgbench: $("$PG_BIN/pgbench" --version 2>/dev/null || pgbench --version)"
