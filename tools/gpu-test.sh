#!/usr/bin/env bash
# Builds the release test and bench binaries here (with nvcc-compiled kernels), copies them
# stripped into the git-ignored `.gpu/` folder together with `run-all.sh`, and prints the one
# command that runs them all on a GPU machine (which has CUDA 13 libraries but no Rust).
#
# Usage: tools/gpu-test.sh            then copy .gpu/ to the GPU machine and run the printed
#                                     command there; logs go under $OUT (default .gpu/logs).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
LIMIT=$((64 * 1024 * 1024))

tools/setup-cuda.sh >/dev/null
export TOOLN1_REQUIRE_NVCC=1

list_exes() { # cargo JSON messages on stdin -> "kind<TAB>name<TAB>path" lines
    python3 tools/list_test_exes.py
}


echo "gpu-test: building release test binaries" >&2
cargo test --release --no-run --message-format=json 2>/dev/null | list_exes >target/gpu-exes.tsv
echo "gpu-test: building bench binaries" >&2
cargo bench --no-run --message-format=json 2>/dev/null | list_exes >>target/gpu-exes.tsv

rm -rf .gpu
mkdir -p .gpu/bin
# CUDA tests first so that they are kept if the size limit forces a cut.
sort -t$'\t' -k2,2 target/gpu-exes.tsv | awk -F'\t' '{p = ($2 ~ /cuda|kernels/) ? 0 : 1; print p "\t" $0}' | sort -s -k1,1n |
while IFS=$'\t' read -r _ kind name exe; do
    dst=".gpu/bin/$kind-$name"
    [ -e "$dst" ] && continue
    cp "$exe" "$dst"
    strip "$dst" 2>/dev/null || true
    total=$(du -cb .gpu/bin | tail -n1 | cut -f1)
    if [ "$total" -gt "$LIMIT" ]; then
        rm -f "$dst"
        echo "gpu-test: skipped $name (would exceed 64 MiB)" >&2
    fi
done

{
echo '#!/usr/bin/env bash'
echo '# Runs every packed test binary and bench on the GPU machine; logs go under $OUT.'
echo "BUILD_ROOT='$ROOT'"
cat <<'RUN'
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
# Tests find their fixtures under the build machine's checkout path (CARGO_MANIFEST_DIR, fixed
# at compile time): point that path at this checkout when it does not exist here.
if [ ! -e "$BUILD_ROOT/Cargo.toml" ] && [ -e "$HERE/../Cargo.toml" ]; then
    mkdir -p "$(dirname "$BUILD_ROOT")" && ln -sfn "$(cd "$HERE/.." && pwd)" "$BUILD_ROOT"
fi
OUT=${OUT:-$HERE/logs}
mkdir -p "$OUT"
LOG="$OUT/gpu-test.log"
# Find the CUDA 13 user-space libraries (cuBLAS, cuBLASLt, NVRTC).
LIBDIRS=""
for lib in libcublas.so.13 libcublasLt.so.13 libnvrtc.so.13; do
    d=$(ldconfig -p 2>/dev/null | awk -v l="$lib" '$1 == l {print $NF; exit}' | xargs -r dirname)
    [ -z "$d" ] && d=$(ls -d /usr/local/cuda*/lib64 /usr/local/cuda*/targets/x86_64-linux/lib 2>/dev/null | while read -r x; do [ -e "$x/$lib" ] && echo "$x" && break; done)
    [ -z "$d" ] && d=$(find / -xdev -name "$lib" -path '*nvidia*' 2>/dev/null | head -n1 | xargs -r dirname)
    [ -n "$d" ] && case ":$LIBDIRS:" in *":$d:"*) ;; *) LIBDIRS="$LIBDIRS:$d" ;; esac
done
export LD_LIBRARY_PATH="${LIBDIRS#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# On the GPU machine a CUDA test that finds no device is a failure, not a skip.
export TOOLN1_REQUIRE_CUDA=1
{
    echo "# GPU test run"
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | sed 's/^/device: /'
    echo "LD_LIBRARY_PATH: $LD_LIBRARY_PATH"
} | tee "$LOG"
pass=0
fail=0
for t in "$HERE"/bin/test-*; do
    [ -e "$t" ] || continue
    echo "== $(basename "$t")" | tee -a "$LOG"
    # Tests synchronise after every kernel so that a fault is reported at the kernel that
    # caused it (benches do not: it would inflate their times).
    if TOOLN1_CUDA_SYNC=1 "$t" --test-threads=1 --nocapture 2>&1 | tee -a "$LOG"; then pass=$((pass + 1)); else fail=$((fail + 1)); echo "FAILED: $(basename "$t")" | tee -a "$LOG"; fi
done
if [ "${SKIP_BENCH:-0}" != 1 ]; then
    # The benches' default outputs live under the build machine's target/ (fixed at compile
    # time), which need not exist here: write them under $OUT.
    unset TOOLN1_CUDA_SYNC
    export TOOLN1_BENCH_JSONL="$OUT/tooln1-bench.jsonl"
    export CRITERION_HOME="$OUT/criterion"
    mkdir -p "$OUT/criterion"
    for b in "$HERE"/bin/bench-*; do
        [ -e "$b" ] || continue
        echo "== $(basename "$b")" | tee -a "$LOG"
        "$b" --bench --warm-up-time 0.3 --measurement-time 1 2>&1 | tee "$OUT/$(basename "$b").log" | tee -a "$LOG" >/dev/null ||
            echo "FAILED: $(basename "$b")" | tee -a "$LOG"
    done
fi
echo "test binaries: $pass passed, $fail failed" | tee -a "$LOG"
[ "$fail" -eq 0 ]
RUN
} >.gpu/run-all.sh
chmod +x .gpu/run-all.sh

du -sh .gpu >&2
ls -l .gpu/bin >&2
echo "Copy .gpu/ to the GPU machine and run there:"
echo "  bash .gpu/run-all.sh"
