#!/usr/bin/env bash
# The cost of host gradients and of the streamed reference on the CPU backend
# (examples/host_placement.rs). Extra KEY=VALUE arguments go to the example (hidden=H layers=L
# tokens=T micro=M runs=R). PROFILE=test reuses the test profile's build.
set -euo pipefail
cd "$(dirname "$0")/.."
profile="${PROFILE:-release}"
cargo build --profile "$profile" --example host_placement
dir=release
[ "$profile" = release ] || dir=debug
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB; load average before: $(cut -d' ' -f1-3 /proc/loadavg); $(date -u +%F)"
"target/$dir/examples/host_placement" "$@"
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
