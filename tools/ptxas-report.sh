#!/usr/bin/env bash
# Copies the ptxas resource report of the current nvcc build to docs/ptxas-report.md. build.rs
# writes the report only into cargo's OUT_DIR (and embeds it); the copy in docs/ is what the
# virtual GPU (tools/vgpu/build.sh) reads for every kernel's registers and static shared memory,
# and cuda_ops::ptxas_report_in_docs_is_this_builds checks it against the build.
#
# Usage: tools/ptxas-report.sh [--check]   (--check: compare only; exit 1 when docs/ is stale)
set -euo pipefail
cd "$(dirname "$0")/.."
CHECK=0
case "${1:-}" in
    --check) CHECK=1 ;;
    "") ;;
    *) echo "usage: tools/ptxas-report.sh [--check]" >&2; exit 2 ;;
esac
OUT=$(cargo build --lib --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    pid = m.get("package_id", "")
    if m.get("reason") == "build-script-executed" and ("#tooln1@" in pid or pid.startswith("tooln1 ")):
        print(m["out_dir"])
')
REPORT=$OUT/ptxas-report.md
if [ -z "$OUT" ] || [ ! -e "$REPORT" ]; then
    echo "tools/ptxas-report.sh: no ptxas report in the build's OUT_DIR (${OUT:-none}): the build had no nvcc (tools/setup-cuda.sh installs it)" >&2
    exit 1
fi
if [ "$CHECK" = 1 ]; then
    if cmp -s "$REPORT" docs/ptxas-report.md; then
        echo "docs/ptxas-report.md is current"
    else
        echo "docs/ptxas-report.md differs from the build's report ($REPORT): run tools/ptxas-report.sh" >&2
        exit 1
    fi
else
    cp "$REPORT" docs/ptxas-report.md.tmp
    mv docs/ptxas-report.md.tmp docs/ptxas-report.md
    echo "docs/ptxas-report.md <- $REPORT"
fi
