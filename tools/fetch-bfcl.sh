#!/usr/bin/env bash
# Fetch the BFCL evaluation data (JSON Lines test files and possible answers) from the
# `bfcl-eval` Python package into data/bfcl/ (git-ignored). Idempotent: does nothing when the
# data for the pinned version is already there.
#
#   tools/fetch-bfcl.sh [DEST]      (DEST defaults to data/bfcl under the repository root)
set -euo pipefail

VERSION="2026.3.23"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="${1:-$ROOT/data/bfcl}"
STAMP="$DEST/.bfcl-eval-version"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$VERSION" && -d "$DEST/possible_answer" ]]; then
    echo "BFCL data $VERSION already in $DEST"
    exit 0
fi

PY="$(command -v python3 || command -v python || true)"
if [[ -z "$PY" ]]; then
    echo "error: python3 is needed (pip downloads the bfcl-eval wheel and unzips it)" >&2
    exit 1
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

echo "downloading bfcl-eval==$VERSION ..."
"$PY" -m pip download --quiet --no-deps --only-binary=:all: \
    --dest "$WORK" "bfcl-eval==$VERSION"
WHEEL="$(ls "$WORK"/bfcl_eval-*.whl 2>/dev/null | head -n 1)"
if [[ -z "$WHEEL" ]]; then
    echo "error: pip did not produce a bfcl_eval wheel in $WORK" >&2
    exit 1
fi

# Unzip only bfcl_eval/data/ with Python's zipfile (no unzip binary needed), into a staging
# folder that replaces DEST at the end so a partial download never looks complete.
STAGE="$DEST.partial"
rm -rf "$STAGE"
mkdir -p "$STAGE"
"$PY" - "$WHEEL" "$STAGE" <<'PYEOF'
import os, sys, zipfile
wheel, stage = sys.argv[1], sys.argv[2]
prefix = "bfcl_eval/data/"
n = 0
with zipfile.ZipFile(wheel) as z:
    for info in z.infolist():
        if not info.filename.startswith(prefix) or info.is_dir():
            continue
        rel = info.filename[len(prefix):]
        if rel.startswith("/") or ".." in rel.split("/"):
            raise SystemExit(f"refusing odd path in wheel: {info.filename}")
        out = os.path.join(stage, rel)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with z.open(info) as src, open(out, "wb") as dst:
            dst.write(src.read())
        n += 1
if n == 0:
    raise SystemExit("the wheel holds no bfcl_eval/data/ files")
print(f"extracted {n} files")
PYEOF
echo "$VERSION" > "$STAGE/.bfcl-eval-version"
rm -rf "$DEST"
mkdir -p "$(dirname "$DEST")"
mv "$STAGE" "$DEST"
echo "BFCL data $VERSION in $DEST"
