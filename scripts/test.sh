#!/usr/bin/env bash
# Sets up what the tests need on a fresh Debian machine, then runs them.
# The README's test command; CI (.ci/run) runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup-build.sh

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
