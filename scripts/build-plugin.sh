#!/usr/bin/env bash
# Builds the mm_output logical decoding plugin (plugin/mm_output: pgoutput
# without the echoes a subscriber already has) and installs it into the
# PostgreSQL 15 library directory, where the server loads output plugins from.
# mmd creates its slots with mm_output when the server has it and falls back
# to pgoutput (every echo decoded and sent) when it does not.
#
# Needs the server headers and a C compiler: Debian's postgresql-server-dev-15,
# gcc and make (installed here when missing and run as root).
# Idempotent: rebuilds only when the source changed.
#
# Usage: scripts/build-plugin.sh [--no-install]   (the .so stays in target/mm_output)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
INSTALL=1
[ "${1:-}" = --no-install ] && INSTALL=0
PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR=$ROOT/$TARGET_DIR ;; esac
OUT=$TARGET_DIR/mm_output
say() { echo "build-plugin: $*" >&2; }

if [ ! -x "$PG_CONFIG" ] || [ ! -f /usr/include/postgresql/15/server/replication/output_plugin.h ] \
    || ! command -v gcc >/dev/null 2>&1 || ! command -v make >/dev/null 2>&1; then
    if [ "$(id -u)" != 0 ]; then
        say "missing the PostgreSQL 15 server headers or a C compiler"
        say "run:  sudo apt-get install -y postgresql-server-dev-15 gcc make"
        exit 1
    fi
    say "apt-get install -y postgresql-server-dev-15 gcc make"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-server-dev-15 gcc make >/dev/null
fi

mkdir -p "$OUT"
cp "$ROOT/plugin/mm_output/mm_output.c" "$ROOT/plugin/mm_output/Makefile" "$OUT/"
# with_llvm=no: no JIT bitcode (it would need clang); the plugin has no SQL.
make -s -C "$OUT" PG_CONFIG="$PG_CONFIG" with_llvm=no >/dev/null
[ -f "$OUT/mm_output.so" ] || { say "$OUT/mm_output.so missing after make"; exit 1; }
if [ "$INSTALL" = 1 ]; then
    LIB=$("$PG_CONFIG" --pkglibdir)
    if ! cmp -s "$OUT/mm_output.so" "$LIB/mm_output.so"; then
        if [ "$(id -u)" != 0 ]; then
            say "run as root to install $OUT/mm_output.so into $LIB"
            exit 1
        fi
        install -m 0755 "$OUT/mm_output.so" "$LIB/mm_output.so"
        say "installed $LIB/mm_output.so"
    fi
fi
say "ok: $OUT/mm_output.so"
