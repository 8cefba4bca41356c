#!/usr/bin/env bash
# Set up, build, and boot a VM whose agent answers a health request. Uses bulkhead-vmm on
# this host when its /dev/kvm can boot a stock kernel, else inside the nested test node.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo build --release -q
./target/release/bulkhead check
backend=$(./target/release/bulkhead check | sed -n 's/^backend: //p')
if [ "$backend" = "bulkhead-vmm" ]; then
    guest=$(python3 packaging/guest/build.py --agent target/release/bulkhead-agent)
    run=$(mktemp -d)
    echo "booting with bulkhead-vmm on this host's KVM"
    ./target/release/bulkhead probe --socket "$run/v.sock" --shutdown -- \
        ./target/release/bulkhead-vmm --kernel "$guest/vmlinux" --initrd "$guest/initramfs.cpio.gz" \
        --cmdline "console=ttyS0 quiet panic=-1 pci=off" --memory 256 \
        --vsock "cid=3,socket=$run/v.sock" --serial "file:$run/serial.log"
else
    python3 tests/nested/node.py demo
fi
