#!/usr/bin/env bash
# Runs the whole performance comparison on a GPU machine, from the repository root:
#   1. every tooln1 bench binary in .gpu/bin/bench-* (criterion, with --bench); they append one
#      JSON line per measurement to $TOOLN1_BENCH_JSONL (contract: tools/bench_report.py);
#      bench-step's host_optimizer_step rows time the host-offloaded optimizer's update
#      (`memory.optimizer = "host"`) pipelined over the parameter groups against the
#      synchronous schedule, per model size;
#      bench-dp_overlap (no criterion) writes its step times, reductions overlapped with the
#      backward or not, on every GPU count up to the visible ones, to $OUT/dp-overlap.jsonl;
#   2. tools/torch_baselines.py on the same GPU, with whatever time is left of the budget;
#   3. tools/bench_report.py, writing performance.md from both.
#
# The GPU machine needs no Rust: build the stripped bench binaries first on a build machine
# with `tools/gpu-test.sh` (it fills the git-ignored .gpu/ folder) and bring .gpu/ along.
# Liger kernels are measured too when a wheel is found in .whl/ (liger_kernel-*.whl).
#
# Usage: bash tools/bench-gpu.sh [MODE]
#   all            (default) everything below in one go, as far as BENCH_BUDGET_S allows
#   ours           tooln1's benches only
#   torch          the PyTorch side only
#   torch-kernels  the PyTorch side, kernels only (RMSNorm ... sampling)
#   torch-model    the PyTorch side, model level only (decode, policy, loss, optimizer, step)
# When one call cannot hold everything, run ours, torch-kernels and torch-model as three calls
# on the same machine and write the report from their files (docs/performance.md shows how).
# Output folder: $OUT, or .gpu/out when OUT is unset. It receives bench-gpu-MODE.log,
# tooln1-bench.jsonl, dp-overlap.jsonl, torch-*.json, performance.md and criterion.tar.gz; copy performance.md
# to docs/performance.md (or re-run bench_report.py on the JSON files).
# Environment: BENCH_BUDGET_S   seconds for the whole run (default 540)
#              TORCH_SHAPES     Qwen2.5 sizes for the PyTorch side (default 0.5b,1.5b,7b)
#              TORCH_ARGS       extra arguments for torch_baselines.py (e.g. --no-compile)
#              CRITERION_ARGS   criterion options (default: short warm-up and measurement)
#              TORCH_DEVICE     cuda (default); cpu only to smoke-test this script elsewhere
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
MODE=${1:-all}
case "$MODE" in
all | ours | torch | torch-kernels | torch-model) ;;
*)
    echo "bench-gpu: unknown mode '$MODE' (expected all, ours, torch, torch-kernels or torch-model)" >&2
    exit 2
    ;;
esac
OUT=${OUT:-$ROOT/.gpu/out}
mkdir -p "$OUT"
LOG="$OUT/bench-gpu-$MODE.log"
BUDGET=${BENCH_BUDGET_S:-540}
START=$(date +%s)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export TOOLN1_BENCH_JSONL="$OUT/tooln1-bench.jsonl"
# benches/dp_overlap.rs: data-parallel GRPO step time, reduce-scatters on NCCL's own stream
# (overlapped with the backward) against on the compute stream, on 1, 2, 4, 8 GPUs.
export TOOLN1_DP_BENCH_JSONL="$OUT/dp-overlap.jsonl"
export CRITERION_HOME="$ROOT/.gpu/criterion"
CRITERION_ARGS=${CRITERION_ARGS:---warm-up-time 0.5 --measurement-time 1}
TORCH_SHAPES=${TORCH_SHAPES:-0.5b,1.5b,7b}
TORCH_DEVICE=${TORCH_DEVICE:-cuda}
KERNEL_OPS=rmsnorm,rope,swiglu,linear,attention,logprobs,grpo_loss,adamw,sample
MODEL_OPS=decode,policy,logprob_loss,optimizer,grpo_step
case "$MODE" in
torch-kernels) TORCH_OPS=$KERNEL_OPS TORCH_JSON=torch-kernels.json ;;
torch-model) TORCH_OPS=$MODEL_OPS TORCH_JSON=torch-model.json ;;
*) TORCH_OPS=$KERNEL_OPS,$MODEL_OPS TORCH_JSON=torch-baselines.json ;;
esac

log() { echo "bench-gpu: $*" | tee -a "$LOG" >&2; }
elapsed() { echo $(($(date +%s) - START)); }

{
    echo "# bench-gpu run"
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "mode: $MODE, budget ${BUDGET}s"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm \
        --format=csv,noheader 2>&1 | sed 's/^/device: /'
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
} | tee "$LOG"

# The CUDA 13 user-space libraries (cuBLAS, cuBLASLt, NVRTC) for the bench binaries: from the
# system, a CUDA install, or the nvidia-* Python packages that come with PyTorch.
libdirs=""
for lib in libcublas.so.13 libcublasLt.so.13 libnvrtc.so.13; do
    d=$(ldconfig -p 2>/dev/null | awk -v l="$lib" '$1 == l {print $NF; exit}' | xargs -r dirname)
    if [ -z "$d" ]; then
        for x in /usr/local/cuda*/lib64 /usr/local/cuda*/targets/x86_64-linux/lib; do
            [ -e "$x/$lib" ] && d=$x && break
        done
    fi
    [ -z "$d" ] && d=$(find /opt /usr /root /home -xdev -name "$lib" -path '*nvidia*' 2>/dev/null |
        head -n1 | xargs -r dirname)
    if [ -n "$d" ]; then
        case ":$libdirs:" in *":$d:"*) ;; *) libdirs="$libdirs:$d" ;; esac
    else
        log "warning: $lib not found; CUDA benches may skip"
    fi
done
export LD_LIBRARY_PATH="${libdirs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "LD_LIBRARY_PATH: $LD_LIBRARY_PATH" >>"$LOG"

status=0
ours_cmds=()
if [ "$MODE" = all ] || [ "$MODE" = ours ]; then
    rm -f "$TOOLN1_BENCH_JSONL"
    rm -rf "$CRITERION_HOME"
    found=0
    for b in .gpu/bin/bench-*; do
        [ -x "$b" ] || continue
        found=1
        cmd="$b --bench $CRITERION_ARGS"
        ours_cmds+=("TOOLN1_BENCH_JSONL=tooln1-bench.jsonl $cmd")
        log "running $cmd ($(elapsed)s elapsed)"
        # shellcheck disable=SC2086 # CRITERION_ARGS is a list of options
        if ! "$b" --bench $CRITERION_ARGS 2>&1 | tee -a "$LOG"; then
            log "FAILED: $b"
            status=1
        fi
    done
    if [ "$found" = 0 ]; then
        log "no bench binaries in .gpu/bin (build them with tools/gpu-test.sh and copy .gpu/ here)"
        status=1
    fi
    if [ -s "$TOOLN1_BENCH_JSONL" ]; then
        log "tooln1 benches wrote $(wc -l <"$TOOLN1_BENCH_JSONL") measurements"
    else
        log "tooln1 benches wrote no lines to $TOOLN1_BENCH_JSONL"
    fi
    if [ -d "$CRITERION_HOME" ]; then
        tar -czf "$OUT/criterion.tar.gz" -C "$ROOT/.gpu" criterion
    fi
fi

if [ "$MODE" != ours ]; then
    if compgen -G ".whl/liger_kernel-*.whl" >/dev/null; then
        if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/bench-site .whl/liger_kernel-*.whl >>"$LOG" 2>&1; then
            export PYTHONPATH="/tmp/bench-site${PYTHONPATH:+:$PYTHONPATH}"
            log "Liger installed from .whl/"
        else
            log "Liger wheel found but did not install (see log); measuring without it"
        fi
    fi
    left=$((BUDGET - $(elapsed) - 40))
    if [ "$left" -lt 30 ]; then
        log "only ${left}s of the budget left: PyTorch baselines not run (use mode 'torch')"
        status=1
    else
        log "running tools/torch_baselines.py --ops $TORCH_OPS ($(elapsed)s elapsed)"
        # shellcheck disable=SC2086
        if ! "$PY" tools/torch_baselines.py --device "$TORCH_DEVICE" --shapes "$TORCH_SHAPES" \
            --ops "$TORCH_OPS" --budget-s "$left" ${TORCH_ARGS:-} --out "$OUT/$TORCH_JSON" 2>&1 |
            tee -a "$LOG"; then
            log "FAILED: torch_baselines.py"
            status=1
        fi
    fi
fi

torch_files=()
for f in "$OUT"/torch-baselines.json "$OUT"/torch-kernels.json "$OUT"/torch-model.json; do
    [ -s "$f" ] && torch_files+=(--torch "$f")
done
if [ "${#torch_files[@]}" -gt 0 ]; then
    args=("${torch_files[@]}" --criterion "$CRITERION_HOME" --out "$OUT/performance.md"
        --command "bash tools/bench-gpu.sh $MODE   # on the GPU machine, .gpu/ built by tools/gpu-test.sh")
    [ -s "$TOOLN1_BENCH_JSONL" ] && args+=(--ours "$TOOLN1_BENCH_JSONL")
    for c in "${ours_cmds[@]}"; do args+=(--command "$c"); done
    if ! "$PY" tools/bench_report.py "${args[@]}" 2>&1 | tee -a "$LOG"; then
        log "FAILED: bench_report.py"
        status=1
    fi
fi
log "done in $(elapsed)s, status $status; files in $OUT:"
find "$OUT" -maxdepth 1 -type f -printf '%s\t%f\n' | tee -a "$LOG" >&2
exit "$status"
