#!/usr/bin/env bash
# THE test command: bash scripts/test.sh
#
# Runs every stage even after a failure (so one report shows formatting, lint
# and test results together) and exits non-zero if any stage failed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup-host.sh

failed=()
step() {
    local name=$1
    shift
    echo "test: $name: $*"
    if ! "$@"; then
        echo "test: $name: FAILED"
        failed+=("$name")
    fi
}

step fmt cargo fmt --all -- --check
step clippy cargo clippy --all-targets -- -D warnings
step nextest cargo nextest run --no-fail-fast
step doctest cargo test --doc
# The library builds on the oldest Rust that Cargo.toml declares (rust-version).
msrv=$(sed -n 's/^rust-version = "\(.*\)"$/\1/p' Cargo.toml)
step msrv cargo "+$msrv" check --lib --all-features

if [ "${#failed[@]}" -ne 0 ]; then
    echo "test: FAILED stages: ${failed[*]}"
    exit 1
fi
echo "test: all stages passed"
