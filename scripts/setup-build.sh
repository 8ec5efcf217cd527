#!/usr/bin/env bash
# What building mm needs on a fresh Debian machine: cargo (rustup) and a C
# compiler for crates with C parts (Debian's build-essential). Shared by
# scripts/test.sh and scripts/demo.sh.
set -euo pipefail

if ! command -v cargo >/dev/null; then
    echo "cargo not found: install the Rust toolchain (rustup) first" >&2
    exit 1
fi
if ! command -v cc >/dev/null; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && apt-get install -y -qq build-essential
    else
        echo "no C compiler: run 'sudo apt-get install build-essential'" >&2
        exit 1
    fi
fi
