#!/usr/bin/env bash
# Runs every Keel test: formatting, lints, unit and integration tests, end-to-end tests with
# real QEMU guests (required: they fail, never skip, when a tool is missing), a short
# coverage-guided fuzz run of each fuzz target, and the benchmark in smoke mode.
set -euo pipefail
cd "$(dirname "$0")/.."

# The locked dependencies need rustc >= rust-version (Cargo.toml); say so before anything else.
need_rust=$(sed -n 's/^rust-version = "\(.*\)"$/\1/p' Cargo.toml)
have_rust=$(rustc --version 2>/dev/null | awk '{ sub(/-.*/, "", $2); print $2 }') || true
if [ -z "$have_rust" ]; then
  echo "keel: rustc not found; install Rust >= $need_rust (https://rustup.rs)" >&2
  exit 1
fi
if [ "$(printf '%s\n' "$need_rust" "$have_rust" | sort -V | head -n1)" != "$need_rust" ]; then
  echo "keel: rustc $have_rust is older than $need_rust, which Cargo.lock needs (rust-version" \
    "in Cargo.toml): rustup update stable" >&2
  exit 1
fi

scripts/deps.sh

echo "== cargo fmt"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== build"
cargo build --release --workspace
echo "== tests"
if ! cargo nextest --version >/dev/null 2>&1; then
  cargo install cargo-nextest --locked
fi
cargo nextest run --release --workspace --profile ci --no-tests=fail

echo "== fuzz (bounded)"
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi
# cargo-fuzz needs nightly flags (-Z sanitizer); RUSTC_BOOTSTRAP lets the stable compiler take them.
(cd proto && RUSTC_BOOTSTRAP=1 cargo fuzz run decode_frame fuzz/corpus/decode_frame -- -max_total_time="${KEEL_FUZZ_SECONDS:-20}")
(cd vhost-backend && RUSTC_BOOTSTRAP=1 cargo fuzz run parse_request fuzz/corpus/parse_request -- -max_total_time="${KEEL_FUZZ_SECONDS:-20}")

echo "== benchmark (smoke)"
target/release/keel-bench --smoke --out target/bench-smoke
target/release/keel-vmm-bench --smoke --out target/vmm-bench-smoke
echo "keel: all tests passed"
