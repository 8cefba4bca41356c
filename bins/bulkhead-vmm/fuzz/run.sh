#!/usr/bin/env bash
# Fuzz bulkhead-vmm's devices with libFuzzer on nightly Rust, without cargo-fuzz (the
# same flags it passes): run.sh TARGET [SECONDS] [RUNS], TARGET queues or mmio, for
# SECONDS (default 120) or RUNS executions, whichever ends first. The corpus is kept
# under .cache/fuzz/vmm-TARGET; crashes land in the current directory.
set -euo pipefail
cd "$(dirname "$0")"
t=${1:?target: queues or mmio}
secs=${2:-120}
runs=${3:--1}
root=$(cd ../../.. && pwd)
target="$root/.cache/fuzz/target"
corpus="$root/.cache/fuzz/vmm-$t"
mkdir -p "$corpus"
RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions" \
CARGO_TARGET_DIR="$target" cargo +nightly build -q --release \
    --target x86_64-unknown-linux-gnu --bin "$t"
"$target/x86_64-unknown-linux-gnu/release/$t" -max_total_time="$secs" -runs="$runs" \
    -max_len=2048 "$corpus"
