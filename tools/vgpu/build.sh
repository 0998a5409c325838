#!/usr/bin/env bash
# Builds the virtual GPU: every kernels/*.cu compiled unmodified for the host through the SIMT
# shim (simt.h), linked with the fiber runtime and the stand-in driver into libcuda.so, the
# stand-in cuBLAS into libcublas.so and the stand-in NCCL into libnccl.so (.so.2). Test-only: nothing in tooln1's own build links these; a
# test run finds them only through the LD_LIBRARY_PATH that tools/vgpu/env.sh prints.
#
# Usage: tools/vgpu/build.sh [--asan] [--kernels DIR] [--out DIR]
#   --asan     AddressSanitizer build (run with LD_PRELOAD of libasan, see env.sh): an
#              out-of-bounds kernel access is reported with its kernels/*.cu source line.
#   --kernels  the kernel folder to compile (default: this checkout's kernels/)
#   --out      output folder (default: target/vgpu, or target/vgpu-asan with --asan)
# Prints the library folder on its last line. Rebuilds only when an input changed.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
KDIR=$ROOT/kernels
ASAN=0
OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --asan) ASAN=1 ;;
        --kernels) KDIR=$(cd "$2" && pwd); shift ;;
        --out) OUT=$2; shift ;;
        *) echo "vgpu/build.sh: unknown argument $1 (expected --asan, --kernels DIR, --out DIR)" >&2; exit 2 ;;
    esac
    shift
done
if [ -z "$OUT" ]; then
    OUT=$ROOT/target/vgpu
    [ "$ASAN" = 1 ] && OUT=$ROOT/target/vgpu-asan
fi
mkdir -p "$OUT/obj" "$OUT/gen" "$OUT/lib"
OUT=$(cd "$OUT" && pwd)

# cuda.h (the real driver API prototypes) from the pinned CUDA toolchain.
INC=$(ls -d "$ROOT"/.venv-cuda/lib/python3.*/site-packages/nvidia/cu13/include 2>/dev/null | head -n1 || true)
if [ -z "$INC" ] || [ ! -e "$INC/cuda.h" ]; then
    bash "$ROOT/tools/setup-cuda.sh" >&2
    INC=$(ls -d "$ROOT"/.venv-cuda/lib/python3.*/site-packages/nvidia/cu13/include | head -n1)
fi
CXX=${CXX:-g++}
FLAGS=(-std=c++20 -O2 -g -fPIC -fvisibility=hidden -fno-strict-aliasing -pthread
    -Wall -Wno-unknown-pragmas -Wno-unused-function -Wno-unused-variable)
if [ "$ASAN" = 1 ]; then
    FLAGS+=(-fsanitize=address -fno-omit-frame-pointer)
fi
REPORT=$ROOT/docs/ptxas-report.md

# Skip the build when nothing changed.
STAMP=$( { echo "${FLAGS[*]} $CXX $KDIR"; cat "$HERE"/*.h "$HERE"/*.cpp "$HERE"/gen_registry.py "$KDIR"/*.cu "$KDIR"/*.cuh \
    "$REPORT" 2>/dev/null; } | sha256sum | cut -d' ' -f1)
if [ -e "$OUT/lib/libcuda.so" ] && [ -e "$OUT/lib/libcublas.so" ] && [ -e "$OUT/lib/libnccl.so" ] && [ "$(cat "$OUT/stamp" 2>/dev/null)" = "$STAMP" ]; then
    echo "$OUT/lib"
    exit 0
fi
rm -f "$OUT"/gen/*.cpp "$OUT"/obj/*.o
python3 "$HERE/gen_registry.py" "$KDIR" "$OUT/gen" "$REPORT" >&2

compile() { # src obj extra-flags...
    local src=$1 obj=$2
    shift 2
    "$CXX" "${FLAGS[@]}" "$@" -c "$src" -o "$obj"
}
export -f compile
export CXX
JOBS=$(nproc 2>/dev/null || echo 2)
pids=()
fail=0
run_bg() {
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || fail=1; done
    "$@" &
}
for reg in "$OUT"/gen/*.reg.cpp; do
    stem=$(basename "$reg" .reg.cpp)
    run_bg compile "$reg" "$OUT/obj/k_$stem.o" -include "$HERE/simt.h" -I "$KDIR" -I "$HERE"
done
run_bg compile "$OUT/gen/resources.cpp" "$OUT/obj/resources.o" -I "$HERE"
run_bg compile "$HERE/runtime.cpp" "$OUT/obj/runtime.o" -I "$HERE"
run_bg compile "$HERE/driver.cpp" "$OUT/obj/driver.o" -I "$HERE" -I "$INC"
run_bg compile "$HERE/cublas.cpp" "$OUT/obj/cublas.o" -I "$HERE" -O3
run_bg compile "$HERE/nccl.cpp" "$OUT/obj/nccl.o" -I "$HERE" -I "$INC"
while [ "$(jobs -rp | wc -l)" -gt 0 ]; do wait -n || fail=1; done
if [ "$fail" != 0 ]; then
    echo "vgpu/build.sh: compilation failed" >&2
    exit 1
fi
LINK=(-shared -pthread)
[ "$ASAN" = 1 ] && LINK+=(-fsanitize=address)
"$CXX" "${LINK[@]}" -Wl,-soname,libcuda.so.1 -o "$OUT/lib/libcuda.so" \
    "$OUT"/obj/k_*.o "$OUT/obj/resources.o" "$OUT/obj/runtime.o" "$OUT/obj/driver.o"
"$CXX" "${LINK[@]}" -Wl,-soname,libcublas.so.13 -o "$OUT/lib/libcublas.so" "$OUT/obj/cublas.o" \
    -L"$OUT/lib" -l:libcuda.so -Wl,-rpath,'$ORIGIN'
"$CXX" "${LINK[@]}" -Wl,-soname,libnccl.so.2 -o "$OUT/lib/libnccl.so" "$OUT/obj/nccl.o" \
    -L"$OUT/lib" -l:libcuda.so -Wl,-rpath,'$ORIGIN'
# The virtual GPU's own self-test (planted bugs and limit violations it must catch).
"$CXX" "${FLAGS[@]}" -include "$HERE/simt.h" -I "$HERE" -I "$INC" "$HERE/selftest.cpp" -o "$OUT/selftest" \
    -L"$OUT/lib" -l:libcuda.so -Wl,-rpath,"$OUT/lib" $([ "$ASAN" = 1 ] && echo -fsanitize=address)
ln -sf libcuda.so "$OUT/lib/libcuda.so.1"
ln -sf libcublas.so "$OUT/lib/libcublas.so.13"
ln -sf libnccl.so "$OUT/lib/libnccl.so.2"
echo "$STAMP" >"$OUT/stamp"
echo "$OUT/lib"
