#!/usr/bin/env python3
"""Reads cargo's JSON messages (`cargo test --no-run --message-format=json`) on stdin and prints
one line per built executable: kind (test or bench), target name (lib and bin unit-test
binaries as lib-NAME / bin-NAME), path; tab-separated. Used by tools/gpu-test.sh and
tools/vgpu/test.sh."""
import json
import sys

for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    kinds = m["target"]["kind"]
    kind = "bench" if "bench" in kinds else "test"
    name = m["target"]["name"]
    if kinds[0] in ("lib", "bin"):
        name = kinds[0] + "-" + name
    print(kind + "\t" + name + "\t" + m["executable"])
