#!/usr/bin/env bash
# Set up and run the main job: a busybox container in its own VM, on the hypervisor
# backend `bulkhead check` picks for this host, through bulkheadd on the embedded bus
# (no systemd, nothing started by hand). It prints the host's kernel and the guest's.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo build --release -q
BULKHEAD_GUEST_DIR=$(python3 packaging/guest/build.py --agent target/x86_64-unknown-linux-gnu/release/bulkhead-agent)
export BULKHEAD_GUEST_DIR
image=$(bash scripts/busybox-image.sh)
./target/x86_64-unknown-linux-gnu/release/bulkhead check
echo "host kernel:  $(uname -r)"
printf 'guest kernel: '
BULKHEAD_TIMINGS=1 ./target/x86_64-unknown-linux-gnu/release/bulkhead run --rm "$image" uname -r
