#!/usr/bin/env bash
# The README's main command: set up (PostgreSQL 15 from Debian's packages if
# missing), build mmd and mm-harness, then run `mm-harness demo`: a local
# 3-node mm cluster under the seed workload, ending in a consistency verdict.
# Arguments go to `mm-harness demo` (e.g. --duration 60s --json).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup-build.sh
bash scripts/setup-postgres.sh
# mm-harness starts mmd from the same target directory.
cargo build --release --workspace --bins
exec target/release/mm-harness demo "$@"
