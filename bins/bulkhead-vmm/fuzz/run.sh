#!/usr/bin/env bash
# Fuzz bulkhead-vmm's devices with libFuzzer on nightly Rust (scripts/fuzz.sh):
# run.sh TARGET [SECONDS] [RUNS], TARGET queues or mmio, for SECONDS (default 120) or
# RUNS executions, whichever ends first. The corpus is kept under .cache/fuzz/vmm-TARGET.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
t=${1:?target: queues or mmio}
exec "$here/../../../scripts/fuzz.sh" "$here" "$t" "vmm-$t" "${2:-120}" "${3:--1}" 2048
