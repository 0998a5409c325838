#!/usr/bin/env bash
# Host AdamW throughput against a parallel memory copy on the same machine, and the projected
# seconds of one 7.6 B-parameter update (examples/host_adamw.rs). Extra KEY=VALUE arguments go
# to the example (params=N runs=R threads=T). PROFILE=test reuses the test profile's build.
set -euo pipefail
cd "$(dirname "$0")/.."
profile="${PROFILE:-release}"
cargo build --profile "$profile" --example host_adamw
dir=release
[ "$profile" = release ] || dir=debug
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB; load average before: $(cut -d' ' -f1-3 /proc/loadavg); $(date -u +%F)"
"target/$dir/examples/host_adamw" "$@"
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
