#!/usr/bin/env bash
# Runs a command with the CUDA backend on the virtual GPU: builds the stand-in libraries when
# needed (tools/vgpu/build.sh), puts their folder first on LD_LIBRARY_PATH (the only way they
# are ever found), and turns every "skipped: no CUDA device" into a failure.
#
# Usage: tools/vgpu/run.sh [--asan] [--order forward|reverse|random] [--] COMMAND...
#   e.g. tools/vgpu/run.sh --order reverse cargo test --test cuda_ops
# With --asan the command should be a test binary, not cargo (libasan is preloaded into it).
# Other knobs, read by the stand-in at start: TOOLN1_VGPU_SEED (random order), TOOLN1_VGPU_DEVICE
# (h100 | h200), TOOLN1_VGPU_DEVICES (count), TOOLN1_VGPU_MEM_BYTES, TOOLN1_VGPU_THREADS,
# TOOLN1_VGPU_ASYNC=strict, TOOLN1_VGPU_TRACE=1.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ASAN=()
ORDER=${TOOLN1_VGPU_ORDER:-forward}
while [ $# -gt 0 ]; do
    case "$1" in
        --asan) ASAN=(--asan) ;;
        --order) ORDER=$2; shift ;;
        --) shift; break ;;
        *) break ;;
    esac
    shift
done
[ $# -gt 0 ] || { echo "usage: tools/vgpu/run.sh [--asan] [--order O] COMMAND..." >&2; exit 2; }
LIB=$(bash "$HERE/build.sh" "${ASAN[@]}" | tail -n1)
export LD_LIBRARY_PATH="$LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export TOOLN1_VGPU_ORDER=$ORDER
export TOOLN1_REQUIRE_CUDA=1
if [ ${#ASAN[@]} -gt 0 ]; then
    export LD_PRELOAD="$("${CXX:-g++}" -print-file-name=libasan.so)${LD_PRELOAD:+:$LD_PRELOAD}"
    export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0:abort_on_error=1:use_sigaltstack=0}
fi
echo "virtual GPU: $LIB (thread order $ORDER${ASAN:+, AddressSanitizer})" >&2
exec "$@"
