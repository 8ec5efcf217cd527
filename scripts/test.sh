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
# The Docker backend's image (mm-node:dev), built offline from Debian's
# packages; its tests then must run, not skip.
if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
    bash scripts/build-image.sh
    export MM_REQUIRE_DOCKER=1
else
    echo "test.sh: no Docker daemon here: the Docker backend tests will skip" >&2
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace --no-fail-fast
