#!/usr/bin/env bash
# The whole test suite: unit and device tests, toy guests on the host's KVM, the agent
# API list in host mode, and the nested node where bulkhead-vmm boots the stock kernel.
set -uo pipefail
cd "$(dirname "$0")/.."
log=$(mktemp)
fail=0
cargo build --release -q || exit 1
cargo test --workspace 2>&1 | tee "$log" || fail=1
passed=$(grep -o 'test result: [a-zA-Z]*\. [0-9]* passed' "$log" | awk '{s+=$4} END {print s+0}')
failed=$(grep -o '[0-9]* failed;' "$log" | awk '{s+=$1} END {print s+0}')
echo "== agent API, host mode: the real agent in fresh namespaces, real containers"
if ./target/release/agent-api-tests --host-mode ./target/release/bulkhead-agent; then
    passed=$((passed + 1)); else failed=$((failed + 1)); fail=1; fi
echo "== nested node: bulkhead-vmm boots the stock kernel on real KVM"
if python3 tests/nested/node.py test; then passed=$((passed + 1)); else failed=$((failed + 1)); fail=1; fi
echo "summary: $passed passed, $failed failed"
exit $fail
