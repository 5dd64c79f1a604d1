#!/usr/bin/env bash
# Runs every check and test of the workspace, including the tests that boot
# real microVMs. Those need a data directory prepared by `upstream setup`;
# this script prepares one at $UPSTREAM_TEST_HOME (default
# ~/.cache/upstream-test). The guest kernel and base image in it are
# cached by the hash of their inputs, so only the first run builds them.
set -euo pipefail
cd "$(dirname "$0")/.."

export UPSTREAM_TEST_HOME=${UPSTREAM_TEST_HOME:-$HOME/.cache/upstream-test}

cargo fmt --all --check
cargo build -p upstream-cli
RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --release -p upstream-agent --target x86_64-unknown-linux-gnu

UPSTREAM_HOME=$UPSTREAM_TEST_HOME target/debug/upstream setup \
  --agent target/x86_64-unknown-linux-gnu/release/upstream-agent

cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace --no-fail-fast
