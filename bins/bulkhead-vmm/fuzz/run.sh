#!/usr/bin/env bash
# Fuzz bulkhead-vmm's devices with libFuzzer on nightly Rust (scripts/fuzz.sh):
# run.sh TARGET [SECONDS] [RUNS], TARGET one of queues (every device), rng, balloon,
# vsock, blk, console, mem (one device each), mmio or loader, for SECONDS (default 120) or
# RUNS executions, whichever ends first. The corpus is kept under .cache/fuzz/vmm-TARGET.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
t=${1:?target: queues, rng, balloon, vsock, blk, console, mem, mmio or loader}
len=2048
[ "$t" = loader ] && len=16384  # room for ELF program headers and a bzImage setup
exec "$here/../../../scripts/fuzz.sh" "$here" "$t" "vmm-$t" "${2:-120}" "${3:--1}" "$len"
