#!/usr/bin/env bash
# Sets up what the tests need on a fresh Debian machine, then runs them.
# The README's test command; CI (.ci/run) runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null; then
    echo "cargo not found: install the Rust toolchain (rustup) first" >&2
    exit 1
fi
# Rust crates with C parts need a C compiler; Debian's build-essential provides it.
if ! command -v cc >/dev/null; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && apt-get install -y -qq build-essential
    else
        echo "no C compiler: run 'sudo apt-get install build-essential'" >&2
        exit 1
    fi
fi

# rustfmt and clippy come with rustup's default profile; add them if missing.
if ! cargo clippy --version >/dev/null 2>&1 || ! cargo fmt --version >/dev/null 2>&1; then
    rustup component add clippy rustfmt
fi
# PostgreSQL 15 from Debian's packages, for the harness tests against a real server.
bash scripts/setup-postgres.sh
export MM_REQUIRE_PG=1

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
