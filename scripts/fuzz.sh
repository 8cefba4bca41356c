#!/usr/bin/env bash
# Build one libFuzzer target on nightly Rust, without cargo-fuzz (the same flags it
# passes), and run it: fuzz.sh FUZZ_DIR BIN CORPUS SECONDS RUNS MAX_LEN. The target is
# built under .cache/fuzz/target, the corpus kept under .cache/fuzz/CORPUS; crashes land
# in the current directory. Called by each crate's fuzz/run.sh.
set -euo pipefail
dir=$1 bin=$2 corpus_name=$3 secs=$4 runs=$5 max_len=$6
root=$(cd "$(dirname "$0")/.." && pwd)
target="$root/.cache/fuzz/target"
corpus="$root/.cache/fuzz/$corpus_name"
mkdir -p "$corpus"
cd "$dir"
RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions" \
CARGO_TARGET_DIR="$target" cargo +nightly build -q --release \
    --target x86_64-unknown-linux-gnu --bin "$bin"
"$target/x86_64-unknown-linux-gnu/release/$bin" -max_total_time="$secs" -runs="$runs" \
    -max_len="$max_len" "$corpus"
