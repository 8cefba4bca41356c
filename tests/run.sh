#!/usr/bin/env bash
# The whole test suite: unit and device tests, toy guests on the host's KVM, the agent
# API list in host mode, the runtime list (bulkheadd on a private bus, the QEMU backend,
# podman, a local registry, faults, bad input), and the nested node where bulkhead-vmm
# boots the stock kernel.
set -uo pipefail
cd "$(dirname "$0")/.."
log=$(mktemp)
rt=$(mktemp)
trap 'rm -f "$log" "$rt"' EXIT
fail=0
cargo build --release -q || exit 1
cargo test --workspace 2>&1 | tee "$log"
test_rc=${PIPESTATUS[0]}
passed=$(grep -o 'test result: [a-zA-Z]*\. [0-9]* passed' "$log" | awk '{s+=$4} END {print s+0}')
failed=$(grep -o '[0-9]* failed;' "$log" | awk '{s+=$1} END {print s+0}')
# A test binary that did not build counts as a failure even with no failed test.
if [ "$test_rc" != 0 ]; then fail=1; [ "$failed" != 0 ] || failed=1; fi
echo "== agent API, host mode: the real agent in fresh namespaces, real containers"
if ./target/x86_64-unknown-linux-gnu/release/agent-api-tests --host-mode ./target/x86_64-unknown-linux-gnu/release/bulkhead-agent; then
    passed=$((passed + 1)); else failed=$((failed + 1)); fail=1; fi
echo "== runtime: bulkhead run/exec/ls/rm, the OCI CLI under podman, D-Bus, faults, bad input"
guest=$(python3 packaging/guest/build.py --agent target/x86_64-unknown-linux-gnu/release/bulkhead-agent) || exit 1
./target/x86_64-unknown-linux-gnu/release/runtime-tests --bin-dir target/x86_64-unknown-linux-gnu/release --guest "$guest" 2>&1 | tee "$rt"
rt_line=$(grep -E '^runtime: [0-9]+ passed, [0-9]+ failed' "$rt" | tail -1)
if [ -n "$rt_line" ]; then
    passed=$((passed + $(echo "$rt_line" | awk '{print $2}')))
    rt_failed=$(echo "$rt_line" | awk '{print $4}')
    failed=$((failed + rt_failed)); [ "$rt_failed" = 0 ] || fail=1
else
    failed=$((failed + 1)); fail=1
fi
echo "== nested node: bulkhead-vmm boots the stock kernel on real KVM"
if python3 tests/nested/node.py test; then passed=$((passed + 1)); else failed=$((failed + 1)); fail=1; fi
echo "summary: $passed passed, $failed failed"
exit $fail
