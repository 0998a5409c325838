#!/usr/bin/env python3
"""Writes docs/performance.md: tooln1's benches next to PyTorch on the same device.

    python3 tools/bench_report.py --torch torch.json --ours target/tooln1-bench.jsonl \\
        --criterion target/criterion --out docs/performance.md

Inputs
------
--torch      the JSON written by tools/torch_baselines.py (device, versions, the two ceilings
             measured in that run, one row per op/shape/variant, the skipped variants).
--ours       tooln1's measurements, JSON Lines: the contract below.
--criterion  criterion's output folder (target/criterion by default): every
             <group>/<function>/new/{benchmark,estimates}.json found is listed in an appendix
             with its median and 95% interval, so that nothing criterion measured goes unseen.

Contract for tooln1's benches (benches/*.rs)
--------------------------------------------
Besides criterion's own output, every bench appends one JSON object per measurement, one per
line, to the file named by the environment variable TOOLN1_BENCH_JSONL, or to
target/tooln1-bench.jsonl when it is unset:

    {"name": "rmsnorm_fwd", "shape": {"model": "1.5b", "tokens": 4096, "hidden": 1536},
     "median_ms": 0.0123, "flops": 25165824, "bytes": 25171968}

Required: name (string), shape (object of string/integer values, or a string
"k=v,k=v"), median_ms (number > 0), flops and bytes (numbers >= 0 per call: the work one timed
call does, counted as in tools/torch_baselines.py; 0 where not meaningful).
Optional: tokens (tokens one call processes: a tokens/s column), peak_bytes (device memory the
call needs beyond its inputs), criterion (the criterion id "group/function" of the same
measurement), device (name), note.
A row matches PyTorch's when name and shape are equal: shape keys compare in any order and
case-insensitively, string values case-insensitively ("1.5B" == "1.5b"). When a name+shape
appears several times the last line wins. The names and shape keys:

    rmsnorm_fwd, rmsnorm_bwd           model, tokens, hidden
    rope_fwd, rope_bwd                 model, tokens, heads, kv_heads, head_dim   (q and k)
    swiglu_fwd, swiglu_bwd             model, tokens, inter
    linear_fwd, linear_bwd             model, tokens, out, in
    attention_fwd, attention_bwd       model, batch, seq, heads, kv_heads, head_dim (causal)
    attention_decode                   model, batch, ctx, heads, kv_heads, head_dim
    logprobs_fwd, logprobs_bwd         model, tokens, hidden, vocab
    grpo_loss                          tokens, seqs      (loss and d loss/d logp, one call)
    adamw                              params
    sample_top_p                       batch, vocab
    decode                             model, batch, prompt, new_tokens   (tokens = new tokens)
    policy_fwd_bwd                     model, batch, seq
    logprob_loss                       model, tokens, hidden, vocab  (lm_head+logprobs+loss fwd+bwd)
    optimizer_step                     model
    host_optimizer_step                model, schedule   (pipelined | synchronous; host state)
    grpo_step                          model, prompts, group, prompt_len, response_len
                                       (tokens = prompts * group * (prompt_len + response_len))

Model names are the Qwen2.5 sizes "0.5b", "1.5b", "7b". The default sizes of
tools/torch_baselines.py (4096 tokens as 4 sequences of 1024, logprobs over 1024 tokens,
attention at 8192 tokens per batch for seq 1k/4k/8k, decode attention 64 x 2048, grpo_loss
65536 tokens in 256 sequences, adamw 64 Mi parameters, sampling 64 rows, decode prompt 128 +
128 new tokens, policy 4 x 1024, grpo_step 4 prompts x 8 x (256 + 256)) are the ones to match.

What the table says
-------------------
speedup = PyTorch's best median / ours (above 1: ours is faster). "% of ceiling" is the floor
time over the measured time, where the floor is max(bytes / copy bandwidth, flops / GEMM rate)
with both ceilings from the same run; "bound" says which term is larger. Each side's own flops
and bytes are used for its own percentage.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import glob
import json
import math
import os
import shlex
import sys
import tempfile

WHOLE_STEP = ["decode", "policy_fwd_bwd", "logprob_loss", "optimizer_step",
              "host_optimizer_step", "grpo_step"]
KERNEL_ORDER = ["rmsnorm_fwd", "rmsnorm_bwd", "rope_fwd", "rope_bwd", "swiglu_fwd",
                "swiglu_bwd", "linear_fwd", "linear_bwd", "attention_fwd", "attention_bwd",
                "attention_decode", "logprobs_fwd", "logprobs_bwd", "grpo_loss", "grpo_loss_fwd",
                "adamw", "sample_top_p"]
MEMORY_BOUND_AIM = 0.85


class InputError(Exception):
    """Bad input file: the message names the file, the line and what was expected."""


# ----------------------------------------------------------------------------- parsing


def canon_shape(shape, where: str) -> str:
    """Canonical text of a shape: keys sorted, lower case; 'k=v,k=v'."""
    if isinstance(shape, str):
        items = {}
        for part in [p for p in shape.split(",") if p.strip()]:
            if "=" not in part:
                raise InputError(f"{where}: shape {shape!r}: expected 'key=value' items "
                                 f"separated by commas, got {part!r}")
            k, v = part.split("=", 1)
            v = v.strip()
            items[k.strip()] = int(v) if v.lstrip("-").isdigit() else v
        shape = items
    if not isinstance(shape, dict):
        raise InputError(f"{where}: shape must be an object or a 'k=v,...' string, "
                         f"got {type(shape).__name__}")
    out = []
    for k in sorted(shape, key=lambda s: str(s).lower()):
        v = shape[k]
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            raise InputError(f"{where}: shape[{k!r}] must be a string or a number, got {v!r}")
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        out.append(f"{str(k).strip().lower()}={str(v).strip().lower()}")
    return ",".join(out)


def _num(obj, key, where, required=True, positive=False):
    v = obj.get(key)
    if v is None:
        if required:
            raise InputError(f"{where}: missing field {key!r} (a number)")
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise InputError(f"{where}: field {key!r} must be a finite number, got {v!r}")
    if positive and v <= 0:
        raise InputError(f"{where}: field {key!r} must be > 0, got {v!r}")
    if v < 0:
        raise InputError(f"{where}: field {key!r} must be >= 0, got {v!r}")
    return float(v)


def read_ours(path: str) -> tuple[dict, list[str]]:
    """tooln1's JSON Lines -> {(name, shape): row}; notes about duplicates."""
    rows, notes = {}, []
    with open(path, encoding="utf-8") as f:
        for ln, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{ln}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from e
            if not isinstance(obj, dict):
                raise InputError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            name = obj.get("name")
            if not isinstance(name, str) or not name:
                raise InputError(f"{where}: missing field 'name' (a non-empty string)")
            if "shape" not in obj:
                raise InputError(f"{where}: missing field 'shape' (an object)")
            row = {
                "name": name,
                "shape": canon_shape(obj["shape"], where),
                "median_ms": _num(obj, "median_ms", where, positive=True),
                "flops": _num(obj, "flops", where),
                "bytes": _num(obj, "bytes", where),
                "tokens": _num(obj, "tokens", where, required=False),
                "peak_bytes": _num(obj, "peak_bytes", where, required=False),
                "criterion": obj.get("criterion"),
                "device": obj.get("device"),
                "note": obj.get("note"),
                "line": ln,
            }
            key = (name, row["shape"])
            if key in rows:
                notes.append(f"{name} [{row['shape']}] appears on lines {rows[key]['line']} and "
                             f"{ln} of {os.path.basename(path)}; line {ln} is used")
            rows[key] = row
    return rows, notes


def read_torch(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        try:
            doc = json.load(f)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column "
                             f"{e.colno})") from e
    if not isinstance(doc, dict) or doc.get("tool") != "torch_baselines":
        raise InputError(f"{path}: expected the JSON written by tools/torch_baselines.py "
                         f"(an object with \"tool\": \"torch_baselines\")")
    for k in ("device", "device_kind", "torch", "date", "ceilings", "results", "skipped"):
        if k not in doc:
            raise InputError(f"{path}: missing field {k!r}")
    c = doc["ceilings"]
    for k in ("copy_gbps", "gemm_tflops"):
        _num(c, k, f"{path}: ceilings", positive=True)
    groups: dict = {}
    for i, r in enumerate(doc["results"]):
        where = f"{path}: results[{i}]"
        if not isinstance(r, dict) or not isinstance(r.get("name"), str):
            raise InputError(f"{where}: expected an object with a string 'name'")
        row = dict(r)
        row["shape"] = canon_shape(r.get("shape", {}), where)
        row["median_ms"] = _num(r, "median_ms", where, positive=True)
        row["flops"] = _num(r, "flops", where, required=False) or 0.0
        row["bytes"] = _num(r, "bytes", where, required=False) or 0.0
        groups.setdefault((row["name"], row["shape"]), []).append(row)
    doc["groups"] = groups
    doc["skipped_rows"] = [dict(s, shape=canon_shape(s.get("shape", {}), f"{path}: skipped"))
                           for s in doc["skipped"]]
    return doc


def merge_torch(docs: list[dict], paths: list[str]) -> dict:
    """Several torch_baselines files of one device (say kernels and model level measured in two
    calls) as one: the first file's ceilings and header; a variant skipped in one file but
    measured in another counts as measured."""
    first = docs[0]
    for d, p in zip(docs[1:], paths[1:]):
        if d["device"] != first["device"] or d["device_kind"] != first["device_kind"]:
            raise InputError(f"{p}: measured on {d['device']!r}, but {paths[0]} on "
                             f"{first['device']!r}; a report compares one device")
    if len(docs) == 1:
        return first
    out = dict(first)
    out["groups"] = {}
    for d in docs:
        for k, rows in d["groups"].items():
            out["groups"].setdefault(k, []).extend(rows)
    done = {(n, sh, r["variant"]) for (n, sh), rows in out["groups"].items() for r in rows}
    out["skipped_rows"] = [s for d in docs for s in d["skipped_rows"]
                           if (s["name"], s["shape"], s["variant"]) not in done]
    out["extra_runs"] = [{"path": p, "date": d["date"], "ceilings": d["ceilings"],
                          "command": d.get("command")} for d, p in zip(docs[1:], paths[1:])]
    return out


def read_criterion(root: str) -> list[dict]:
    """Every criterion benchmark under root: id, median and 95% interval in ms."""
    out = []
    for bj in sorted(glob.glob(os.path.join(root, "**", "new", "benchmark.json"),
                               recursive=True)):
        ej = os.path.join(os.path.dirname(bj), "estimates.json")
        if not os.path.exists(ej):
            continue
        try:
            with open(bj, encoding="utf-8") as f:
                b = json.load(f)
            with open(ej, encoding="utf-8") as f:
                e = json.load(f)
            med = e["median"]
            out.append({
                "id": b.get("full_id") or os.path.relpath(os.path.dirname(os.path.dirname(bj)),
                                                          root),
                "median_ms": med["point_estimate"] / 1e6,
                "lo_ms": med["confidence_interval"]["lower_bound"] / 1e6,
                "hi_ms": med["confidence_interval"]["upper_bound"] / 1e6,
            })
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise InputError(f"{bj} / {ej}: not criterion's benchmark/estimates layout "
                             f"({type(err).__name__}: {err})") from err
    return out


# ----------------------------------------------------------------------------- numbers


def floor_ms(flops: float, nbytes: float, ceil: dict) -> tuple[float, str]:
    """The time no version beats on this device, and which term sets it."""
    t_mem = nbytes / (ceil["copy_gbps"] * 1e9) * 1e3 if nbytes else 0.0
    t_flop = flops / (ceil["gemm_tflops"] * 1e12) * 1e3 if flops else 0.0
    if t_mem == 0.0 and t_flop == 0.0:
        return 0.0, "-"
    return (t_mem, "memory") if t_mem >= t_flop else (t_flop, "compute")


def pct_of_ceiling(row, ceil) -> tuple[float | None, str]:
    f, bound = floor_ms(row.get("flops") or 0.0, row.get("bytes") or 0.0, ceil)
    if f <= 0:
        return None, bound
    return f / row["median_ms"], bound


def rate(row) -> str:
    ms = row["median_ms"]
    flops, nbytes = row.get("flops") or 0.0, row.get("bytes") or 0.0
    if flops and (not nbytes or flops / nbytes > 50):
        return f"{flops / (ms * 1e-3) / 1e12:.1f} TFLOP/s"
    if nbytes:
        return f"{nbytes / (ms * 1e-3) / 1e9:.0f} GB/s"
    return "-"


def best_torch(rows: list[dict]) -> dict:
    return min(rows, key=lambda r: r["median_ms"])


def fmt_ms(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if v < 1000 else f"{v:.0f}"


def fmt_pct(v) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def fmt_bytes(v) -> str:
    if v is None:
        return "-"
    for unit, s in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if v >= unit:
            return f"{v / unit:.2f} {s}"
    return f"{v:.0f} B"


def shape_md(s: str) -> str:
    return s.replace(",", ", ")


MODEL_ORDER = ["tiny", "0.5b", "1.5b", "3b", "7b", "14b"]
SHAPE_PRIORITY = ["model", "seq", "ctx", "batch", "tokens"]


def order_key(key):
    """Table order: op (kernels as listed, then the whole step), model size, then the shape
    with numbers compared as numbers."""
    name, shape = key
    group = KERNEL_ORDER.index(name) if name in KERNEL_ORDER else (
        100 + WHOLE_STEP.index(name) if name in WHOLE_STEP else 50)
    items = dict(p.split("=", 1) for p in shape.split(",") if "=" in p)
    model = items.get("model", "")
    m = MODEL_ORDER.index(model) if model in MODEL_ORDER else len(MODEL_ORDER)
    ks = sorted(items, key=lambda k: (SHAPE_PRIORITY.index(k) if k in SHAPE_PRIORITY
                                      else len(SHAPE_PRIORITY), k))
    rest = tuple((k, (0, int(items[k]), "") if items[k].lstrip("-").isdigit()
                  else (1, 0, items[k])) for k in ks)
    return (group, name, m, model, rest)


# ----------------------------------------------------------------------------- report


def build(torch_doc: dict | None, ours: dict, ours_notes: list[str], crit: list[dict],
          commands: list[str]) -> str:
    L = []
    w = L.append
    cpu = torch_doc is not None and torch_doc.get("device_kind") != "cuda"
    w("# Performance: tooln1 against PyTorch on the same device")
    w("")
    if torch_doc is None:
        w("**No measurements were given to the report: no figures below.**")
        w("")
    elif cpu:
        w("**CPU SMOKE RUN: these are not GPU figures.** They come from tiny shapes on a CPU and "
          "only show that the scripts run end to end; they say nothing about the CUDA backend.")
        w("")
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if torch_doc is not None:
        info = torch_doc.get("device_info", {})
        extra = ", ".join(f"{k} {v}" for k, v in info.items() if k in ("sm_count", "capability",
                                                                         "cuda", "threads"))
        w(f"- Device: {torch_doc['device']}" + (f" ({extra})" if extra else ""))
        w(f"- Measured: {torch_doc['date']} (PyTorch side); report written {now}")
        w(f"- PyTorch {torch_doc['torch']}, transformers {torch_doc.get('transformers') or '-'}, "
          f"Liger {torch_doc.get('liger') or 'not installed'}; dtype "
          f"{torch_doc.get('dtype', '?')}")
        c = torch_doc["ceilings"]
        w(f"- Ceilings measured in this run: device-to-device copy "
          f"**{c['copy_gbps']:.0f} GB/s** ({fmt_bytes(c.get('copy_bytes'))} read + written), "
          f"{c.get('gemm_dtype', 'bf16')} GEMM {c.get('gemm_n', '?')}³ through torch.matmul "
          f"**{c['gemm_tflops']:.1f} TFLOP/s** (random data)")
        for x in torch_doc.get("extra_runs", []):
            xc = x["ceilings"]
            w(f"- Also merged: {os.path.basename(x['path'])} measured {x['date']} on the same "
              f"device (its ceilings: copy {xc['copy_gbps']:.0f} GB/s, GEMM "
              f"{xc['gemm_tflops']:.1f} TFLOP/s; the table uses the first run's)")
        devs = sorted({r["device"] for r in ours.values() if r.get("device")})
        if devs:
            w(f"- tooln1 benches ran on: {', '.join(devs)}")
    w("")
    w("Commands:")
    w("")
    w("```")
    for cmd in commands:
        w(cmd)
    w("```")
    w("")
    w("How to read: times are medians of many CUDA-event-timed calls after warm-up, on random "
      "inputs. **speedup** = PyTorch's best / ours (above 1: tooln1 is faster). "
      "**% of ceiling** = the floor time over the measured time, the floor being the larger of "
      "bytes / copy bandwidth and FLOPs / GEMM rate (the **bound** column says which). "
      "FLOP and byte counts are documented at the top of tools/torch_baselines.py.")
    w("")
    if torch_doc is None:
        return "\n".join(L) + "\n"
    ceil = torch_doc["ceilings"]
    groups = torch_doc["groups"]
    keys = sorted(set(groups) | set(ours), key=order_key)

    def section(title, names_filter, whole):
        sel = [k for k in keys if names_filter(k[0])]
        if not sel:
            return
        w(f"## {title}")
        w("")
        if whole:
            w("| op | shape | tooln1 ms | tooln1 tok/s | PyTorch best ms (variant) | "
              "PyTorch tok/s | speedup | tooln1 MFU | PyTorch MFU |")
            w("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        else:
            w("| op | shape | tooln1 ms | PyTorch best ms (variant) | speedup | tooln1 rate | "
              "tooln1 % of ceiling | PyTorch % of ceiling | bound |")
            w("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for k in sel:
            o = ours.get(k)
            t = best_torch(groups[k]) if k in groups else None
            sp = (t["median_ms"] / o["median_ms"]) if (o and t) else None
            o_ms = fmt_ms(o["median_ms"]) if o else "not measured"
            t_ms = f"{fmt_ms(t['median_ms'])} ({t['variant']})" if t else "not measured"
            sp_s = "-" if sp is None else f"{sp:.2f}x"
            if whole:
                o_tps = (f"{o['tokens'] / (o['median_ms'] * 1e-3):,.0f}"
                         if o and o.get("tokens") else "-")
                t_tps = (f"{t['tokens'] / (t['median_ms'] * 1e-3):,.0f}"
                         if t and t.get("tokens") else "-")

                def mfu(r):
                    if not r or not r.get("flops"):
                        return "-"
                    return fmt_pct(r["flops"] / (r["median_ms"] * 1e-3) /
                                   (ceil["gemm_tflops"] * 1e12))
                w(f"| {k[0]} | {shape_md(k[1])} | {o_ms} | {o_tps} | {t_ms} | {t_tps} | {sp_s} "
                  f"| {mfu(o)} | {mfu(t)} |")
            else:
                op_, bound = pct_of_ceiling(o, ceil) if o else (None, "-")
                tp_, tbound = pct_of_ceiling(t, ceil) if t else (None, "-")
                w(f"| {k[0]} | {shape_md(k[1])} | {o_ms} | {t_ms} | {sp_s} | "
                  f"{rate(o) if o else '-'} | {fmt_pct(op_)} | {fmt_pct(tp_)} | "
                  f"{bound if o else tbound} |")
        w("")

    section("Kernels", lambda n: n not in WHOLE_STEP, whole=False)
    section("Whole step", lambda n: n in WHOLE_STEP, whole=True)
    if not ours:
        w("tooln1's benches wrote no measurements to this report: every tooln1 column is "
          "'not measured'.")
        w("")

    # Aims (from the issue), judged from the rows above.
    w("## Aims")
    w("")
    mem_rows = []
    for k, o in ours.items():
        if k[0] in WHOLE_STEP:
            continue
        p, bound = pct_of_ceiling(o, ceil)
        if bound == "memory" and p is not None:
            mem_rows.append((k, p))
    if mem_rows:
        met = [x for x in mem_rows if x[1] >= MEMORY_BOUND_AIM]
        w(f"- Memory-bound kernels at {100 * MEMORY_BOUND_AIM:.0f}% or more of the measured copy "
          f"bandwidth: {len(met)} of {len(mem_rows)} rows. Missed: " +
          ("none." if len(met) == len(mem_rows) else
           "; ".join(f"{k[0]} [{shape_md(k[1])}] {100 * p:.0f}%"
                     for k, p in sorted(mem_rows, key=lambda x: order_key(x[0]))
                     if p < MEMORY_BOUND_AIM) + "."))
    else:
        w("- Memory-bound kernels at 85% of copy bandwidth: no tooln1 rows measured.")
    att = [(k, ours[k], groups[k]) for k in ours if k[0] == "attention_fwd" and k in groups]
    if att:
        parts = []
        for k, o, ts in att:
            fl = [t for t in ts if "flash" in t["variant"]]
            ref = fl[0] if fl else best_torch(ts)
            parts.append(f"[{shape_md(k[1])}] {ref['median_ms'] / o['median_ms']:.2f}x vs "
                         f"{ref['variant']}")
        w("- Attention forward at or above SDPA-flash: " + "; ".join(parts) + ".")
    else:
        w("- Attention forward vs SDPA-flash: no matched rows.")
    lp = [(k, ours[k], groups[k]) for k in ours if k[0] in ("logprobs_fwd", "logprobs_bwd",
                                                             "logprob_loss") and k in groups]
    if lp:
        parts = []
        for k, o, ts in lp:
            eager = [t for t in ts if t["variant"] == "eager"]
            if not eager:
                continue
            e = eager[0]
            mem = ""
            if e.get("peak_extra_bytes") is not None:
                mem = (f", memory beyond inputs: eager {fmt_bytes(e['peak_extra_bytes'])}, "
                       f"tooln1 {fmt_bytes(o.get('peak_bytes'))}")
            parts.append(f"{k[0]} [{shape_md(k[1])}] {e['median_ms'] / o['median_ms']:.2f}x vs "
                         f"eager logits + log_softmax + gather{mem}")
        w("- Fused logprob faster than torch's logits + log_softmax + gather, memory not growing "
          "with the vocabulary: " + ("; ".join(parts) if parts else "no eager rows") + ".")
    else:
        w("- Fused logprob vs torch: no matched rows.")
    st = [(k, ours[k], groups[k]) for k in ours if k[0] == "grpo_step" and k in groups]
    if st:
        parts = []
        for k, o, ts in st:
            eager = [t for t in ts if t["variant"] == "transformers-eager"] or ts
            sp = eager[0]["median_ms"] / o["median_ms"]
            parts.append(f"[{shape_md(k[1])}] {sp:.2f}x ({'met' if sp >= 2 else 'missed'})")
        w("- Whole GRPO step at least 2x transformers eager: " + "; ".join(parts) + ".")
    else:
        w("- Whole GRPO step vs transformers eager: no matched rows.")
    w("")

    # Everything that did not produce a number.
    only_ours = [k for k in ours if k not in groups]
    only_torch = [k for k in groups if k not in ours]
    if torch_doc["skipped_rows"] or only_ours or only_torch or ours_notes:
        w("## Not measured, failed or unmatched")
        w("")
        for s in torch_doc["skipped_rows"]:
            w(f"- PyTorch {s['name']} [{shape_md(s['shape'])}] {s['variant']}: {s['reason']}")
        for k in sorted(only_ours, key=order_key):
            w(f"- tooln1 {k[0]} [{shape_md(k[1])}]: no PyTorch row with this name and shape")
        for k in sorted(only_torch, key=order_key):
            w(f"- PyTorch {k[0]} [{shape_md(k[1])}]: no tooln1 row with this name and shape")
        for n in ours_notes:
            w(f"- {n}")
        w("")

    w("## Every PyTorch variant")
    w("")
    w("| op | shape | variant | median ms | min ms | reps | rate | % of ceiling | memory beyond "
      "inputs |")
    w("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for k in sorted(groups, key=order_key):
        for t in sorted(groups[k], key=lambda r: r["median_ms"]):
            p, _ = pct_of_ceiling(t, ceil)
            w(f"| {k[0]} | {shape_md(k[1])} | {t['variant']} | {fmt_ms(t['median_ms'])} | "
              f"{fmt_ms(t.get('min_ms'))} | {t.get('reps', '-')} | {rate(t)} | {fmt_pct(p)} | "
              f"{fmt_bytes(t.get('peak_extra_bytes'))} |")
    w("")
    if crit:
        w("## Criterion estimates (tooln1)")
        w("")
        w("| criterion id | median ms | 95% interval ms |")
        w("| --- | --- | --- |")
        for c in crit:
            w(f"| {c['id']} | {fmt_ms(c['median_ms'])} | {fmt_ms(c['lo_ms'])} - "
              f"{fmt_ms(c['hi_ms'])} |")
        w("")
    return "\n".join(L) + "\n"


def write_atomic(path: str, text: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".bench-report-", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ----------------------------------------------------------------------------- self-test


def self_test() -> int:
    """Checks the parsing, matching and arithmetic on made-up inputs; exits non-zero on failure."""
    import random
    fails = []

    def expect(cond, what):
        if not cond:
            fails.append(what)

    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    a = canon_shape({"Model": "1.5B", "tokens": 4096, "hidden": 1536.0}, "t")
    b = canon_shape("hidden=1536, tokens=4096,model=1.5b", "t")
    expect(a == b == "hidden=1536,model=1.5b,tokens=4096", f"canon_shape: {a!r} vs {b!r}")
    for bad in ({"x": [1]}, "tokens", {"flag": True}):
        try:
            canon_shape(bad, "t")
            fails.append(f"canon_shape accepted {bad!r}")
        except InputError:
            pass
    ceil = {"copy_gbps": rng.uniform(1000, 5000), "gemm_tflops": rng.uniform(100, 900)}
    nb = rng.uniform(1e6, 1e9)
    f, bound = floor_ms(1.0, nb, ceil)
    expect(bound == "memory" and abs(f - nb / ceil["copy_gbps"] / 1e6) < 1e-9 * f,
           f"floor_ms memory: {f} {bound}")
    fl = rng.uniform(1e12, 1e14)
    f, bound = floor_ms(fl, 1.0, ceil)
    expect(bound == "compute" and abs(f - fl / ceil["gemm_tflops"] / 1e9) < 1e-9 * f,
           f"floor_ms compute: {f} {bound}")
    row = {"median_ms": 2.0, "flops": 0.0, "bytes": ceil["copy_gbps"] * 1e9 * 1e-3}
    p, _ = pct_of_ceiling(row, ceil)
    expect(abs(p - 0.5) < 1e-12, f"pct_of_ceiling: {p}")

    with tempfile.TemporaryDirectory() as d:
        jl = os.path.join(d, "o.jsonl")
        with open(jl, "w") as fh:
            fh.write('{"name":"rmsnorm_fwd","shape":{"model":"1.5B","tokens":8,"hidden":4},'
                     '"median_ms":0.5,"flops":1,"bytes":100}\n\n')
            fh.write('{"name":"rmsnorm_fwd","shape":"model=1.5b,tokens=8,hidden=4",'
                     '"median_ms":0.25,"flops":1,"bytes":100}\n')
        rows, notes = read_ours(jl)
        expect(len(rows) == 1 and next(iter(rows.values()))["median_ms"] == 0.25 and
               len(notes) == 1, f"read_ours duplicate handling: {rows} {notes}")
        for text, needle in (('{"name":"x","shape":{},"median_ms":0,"flops":0,"bytes":0}',
                              "must be > 0"),
                             ('{"name":"x","shape":{},"median_ms":1,"flops":0}',
                              "missing field 'bytes'"),
                             ('{"name":"x","median_ms":1}', "missing field 'shape'"),
                             ('{"name": ', "not valid JSON")):
            with open(jl, "w") as fh:
                fh.write('{"name":"ok","shape":{},"median_ms":1,"flops":0,"bytes":0}\n' + text +
                         "\n")
            try:
                read_ours(jl)
                fails.append(f"read_ours accepted {text!r}")
            except InputError as e:
                expect(f"{jl}:2:" in str(e) and needle in str(e), f"read_ours message: {e}")

        tj = os.path.join(d, "t.json")
        t_ms, o_ms = rng.uniform(1, 10), rng.uniform(1, 10)
        doc = {"tool": "torch_baselines", "device": "Fake GPU", "device_kind": "cuda",
               "torch": "0", "date": "2026-01-01T00:00:00Z", "ceilings": ceil,
               "results": [{"name": "grpo_step", "shape": {"model": "7b"}, "variant": v,
                            "median_ms": m, "flops": 1e12, "bytes": 0, "tokens": 1000}
                           for v, m in (("transformers-eager", t_ms),
                                        ("other", t_ms * 2))],
               "skipped": [{"name": "x", "shape": {}, "variant": "compile", "reason": "boom"}]}
        with open(tj, "w") as fh:
            json.dump(doc, fh)
        with open(jl, "w") as fh:
            fh.write(json.dumps({"name": "grpo_step", "shape": {"model": "7B"},
                                 "median_ms": o_ms, "flops": 1e12, "bytes": 0,
                                 "tokens": 1000}) + "\n")
        rows, notes = read_ours(jl)
        md = build(read_torch(tj), rows, notes, [], ["cmd"])
        want = f"{t_ms / o_ms:.2f}x"
        table = md.split("## Whole step")[1].split("## Aims")[0]
        row = [x for x in table.splitlines() if x.startswith("| grpo_step |")]
        expect(len(row) == 1 and f"| {want} |" in row[0] and
               f"{fmt_ms(t_ms)} (transformers-eager)" in row[0],
               f"whole-step row lacks speedup {want}: {row}")
        expect("boom" in md, "report lacks the skip reason")
        # Criterion's layout: <id>/new/benchmark.json + estimates.json (median in ns).
        cd = os.path.join(d, "criterion", "g", "f", "new")
        os.makedirs(cd)
        ns = rng.uniform(1e3, 1e7)
        with open(os.path.join(cd, "benchmark.json"), "w") as fh:
            json.dump({"full_id": "g/f"}, fh)
        with open(os.path.join(cd, "estimates.json"), "w") as fh:
            json.dump({"median": {"point_estimate": ns, "confidence_interval": {
                "lower_bound": ns / 2, "upper_bound": ns * 2}}}, fh)
        cr = read_criterion(os.path.join(d, "criterion"))
        expect(len(cr) == 1 and cr[0]["id"] == "g/f" and
               abs(cr[0]["median_ms"] - ns / 1e6) < 1e-12, f"read_criterion: {cr}")
        expect(("met" if t_ms / o_ms >= 2 else "missed") in md.split("## Aims")[1],
               "aims verdict")
        # Merging: a variant skipped in the first file but measured in the second counts.
        tj2 = os.path.join(d, "t2.json")
        doc2 = dict(doc, results=[{"name": "x", "shape": {}, "variant": "compile",
                                   "median_ms": 1.0}], skipped=[])
        with open(tj2, "w") as fh:
            json.dump(doc2, fh)
        m = merge_torch([read_torch(tj), read_torch(tj2)], [tj, tj2])
        expect(("x", "") in m["groups"] and not m["skipped_rows"] and
               len(m["groups"][("grpo_step", "model=7b")]) == 2, f"merge_torch: {m['groups']}")
        doc3 = dict(doc, device="Other GPU")
        with open(tj2, "w") as fh:
            json.dump(doc3, fh)
        try:
            merge_torch([read_torch(tj), read_torch(tj2)], [tj, tj2])
            fails.append("merge_torch accepted two devices")
        except InputError:
            pass
    if fails:
        print(f"bench_report self-test (seed {seed}): {len(fails)} failure(s)")
        for f_ in fails:
            print("  " + f_)
        return 1
    print(f"bench_report self-test (seed {seed}): ok")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="The input contract is in this script's header.")
    ap.add_argument("--torch", action="append", default=[],
                    help="JSON from tools/torch_baselines.py (repeatable: files from one device "
                         "are merged)")
    ap.add_argument("--ours", default=None,
                    help="tooln1 JSON Lines (default: $TOOLN1_BENCH_JSONL or "
                         "target/tooln1-bench.jsonl, when present)")
    ap.add_argument("--criterion", default="target/criterion", help="criterion output folder")
    ap.add_argument("--out", default="docs/performance.md", help="markdown to write")
    ap.add_argument("--command", action="append", default=[],
                    help="a command that produced the inputs, listed in the report (repeatable)")
    ap.add_argument("--self-test", action="store_true", help="check this script and exit")
    a = ap.parse_args(sys.argv[1:] if argv is None else argv)
    if a.self_test:
        return self_test()
    try:
        torch_doc = merge_torch([read_torch(p) for p in a.torch], a.torch) if a.torch else None
        ours_path = a.ours or os.environ.get("TOOLN1_BENCH_JSONL") or "target/tooln1-bench.jsonl"
        if a.ours and not os.path.exists(a.ours):
            raise InputError(f"{a.ours}: no such file (expected tooln1's bench JSON Lines)")
        ours, notes = read_ours(ours_path) if os.path.exists(ours_path) else ({}, [])
        crit = read_criterion(a.criterion) if os.path.isdir(a.criterion) else []
    except (InputError, OSError) as e:
        print(f"bench_report: {e}", file=sys.stderr)
        return 2
    cmds = list(a.command)
    if torch_doc is not None:  # each PyTorch file's own command line, as it recorded it
        for c in [torch_doc.get("command")] + [x.get("command")
                                              for x in torch_doc.get("extra_runs", [])]:
            if c and c not in cmds:
                cmds.append(c)
    own = list(sys.argv[1:] if argv is None else argv)
    shown = []  # this script's own command, without the --command texts listed above it
    while own:
        arg = own.pop(0)
        if arg == "--command" and own:
            own.pop(0)
        elif not arg.startswith("--command="):
            shown.append(arg)
    cmds.append("python3 tools/bench_report.py " + shlex.join(shown))
    md = build(torch_doc, ours, notes, crit, cmds)
    write_atomic(a.out, md)
    print(f"bench_report: {len(ours)} tooln1 rows, "
          f"{len(torch_doc['groups']) if torch_doc else 0} PyTorch rows -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
