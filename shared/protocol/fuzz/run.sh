#!/usr/bin/env bash
# Fuzz the host side of the agent protocol with libFuzzer on nightly Rust
# (scripts/fuzz.sh): run.sh [SECONDS] [RUNS], for SECONDS (default 120) or RUNS
# executions, whichever ends first. The corpus is kept under .cache/fuzz/agent-replies.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
exec "$here/../../../scripts/fuzz.sh" "$here" agent_replies agent-replies "${1:-120}" "${2:--1}" 65536
