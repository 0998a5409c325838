#!/usr/bin/env bash
# Times the training-side passes of one GRPO step on the CPU backend, per sequence ("naive")
# against the shared-prompt layout with response-only logits ("lean"), at a Tool-N1-like shape
# (3 groups, one ~1000-token prompt and n = 5 responses of ~150 tokens each, a random model of
# hidden 256, 4 layers, vocab 32000). Extra KEY=VALUE arguments go to examples/grpo_passes.rs
# (e.g. `groups=2 runs=1 threads=1`). PROFILE=test reuses the test profile's build (opt-level 2)
# instead of a release build.
set -euo pipefail
cd "$(dirname "$0")/.."
profile="${PROFILE:-release}"
cargo build --profile "$profile" --example grpo_passes
dir=release
[ "$profile" = release ] || dir=debug
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores; load average before: $(cut -d' ' -f1-3 /proc/loadavg); $(date -u +%F)"
"target/$dir/examples/grpo_passes" "$@"
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
