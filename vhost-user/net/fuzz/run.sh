#!/usr/bin/env bash
# Fuzz bulkhead-net's frame and chain parsing for SECONDS (default 120) or RUNS
# executions (run.sh SECONDS RUNS), whichever ends first, with libFuzzer on
# nightly Rust (scripts/fuzz.sh). The corpus is kept under .cache/fuzz/frames.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
exec "$here/../../../scripts/fuzz.sh" "$here" frames frames "${1:-120}" "${2:--1}" 600
