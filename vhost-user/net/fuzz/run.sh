#!/usr/bin/env bash
# Fuzz bulkhead-net's frame and chain parsing for SECONDS (default 120) with libFuzzer,
# on nightly Rust, without cargo-fuzz: the same flags cargo-fuzz passes. The corpus is
# kept under .cache/fuzz/frames; crashes land in the current directory.
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-120}
root=$(cd ../../.. && pwd)
target="$root/.cache/fuzz/target"
corpus="$root/.cache/fuzz/frames"
mkdir -p "$corpus"
RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions" \
CARGO_TARGET_DIR="$target" cargo +nightly build -q --release \
    --target x86_64-unknown-linux-gnu --bin frames
"$target/x86_64-unknown-linux-gnu/release/frames" -max_total_time="$secs" -max_len=600 "$corpus"
