"""tooln1's CPU backend against PyTorch's CPU path on the same random Qwen2 model.

For each shape: build a random Qwen2ForCausalLM with transformers (f32), save it as a model
folder (config.json + safetensors), draw a batch of token sequences, then time

- forward: teacher-forced log p(target) of every position (no gradient);
- forward + backward: the same, then the gradient of sum(log p) with respect to every weight;

with tooln1 (examples/bench_cpu.rs, which loads the same folder) and with PyTorch (eager and
sdpa attention), at 1 thread and at all cores. Times are medians over --rounds rounds of
--runs runs (each after one warm-up), the three interleaved round by round. The outputs are checked to agree (log p and the norm of every weight's gradient), and
the table is written between the markers of docs/performance.md.

Run through tools/bench-cpu-vs-torch.sh, which creates the Python environment and builds the
Rust side.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import time

import torch
import transformers
from transformers import Qwen2Config, Qwen2ForCausalLM

SHAPES = [
    # name, hidden, intermediate, layers, heads, kv heads, vocab, batch, sequence length
    ("h256-l4-v4096", 256, 1024, 4, 4, 2, 4096, 4, 256),
    ("h896-l2-v32000", 896, 4864, 2, 14, 2, 32000, 4, 256),
    ("h896-l2-v32000", 896, 4864, 2, 14, 2, 32000, 1, 1024),
]

START = "<!-- cpu-bench:start -->"
END = "<!-- cpu-bench:end -->"


def build(shape, root):
    name, hidden, inter, layers, heads, kv, vocab, b, seq = shape
    folder = os.path.join(root, name)
    if not os.path.exists(os.path.join(folder, "config.json")):
        cfg = Qwen2Config(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=inter,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv,
            max_position_embeddings=4096,
            rope_theta=1000000.0,
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
        )
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(cfg).float()
        with torch.no_grad():
            # Non-zero biases, so that the comparison covers them.
            for layer in model.model.layers:
                for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    p.bias.normal_(0.0, 0.02)
        model.save_pretrained(folder, safe_serialization=True)
    gen = torch.Generator().manual_seed(1)
    seqs = torch.randint(0, vocab, (b, seq + 1), generator=gen)
    batch = os.path.join(root, f"{name}-{b}x{seq}.json")
    with open(batch, "w") as f:
        json.dump(seqs.tolist(), f)
    return folder, batch, seqs


def load(folder, impl):
    try:
        m = Qwen2ForCausalLM.from_pretrained(folder, attn_implementation=impl, dtype=torch.float32)
    except TypeError:
        m = Qwen2ForCausalLM.from_pretrained(folder, attn_implementation=impl, torch_dtype=torch.float32)
    return m.float().eval()


def torch_run(model, seqs, runs):
    inp, tgt = seqs[:, :-1], seqs[:, 1:]

    def logp():
        logits = model(input_ids=inp).logits
        return torch.log_softmax(logits.float(), -1).gather(-1, tgt.unsqueeze(-1)).squeeze(-1)

    fwd, fwd_bwd = [], []
    out = None
    for i in range(runs + 1):
        t = time.perf_counter()
        with torch.no_grad():
            out = logp()
        if i:
            fwd.append((time.perf_counter() - t) * 1e3)
    for i in range(runs + 1):
        model.zero_grad(set_to_none=False)
        t = time.perf_counter()
        logp().sum().backward()
        if i:
            fwd_bwd.append((time.perf_counter() - t) * 1e3)
    norms = {n: p.grad.double().norm().item() for n, p in model.named_parameters()}
    return fwd, fwd_bwd, out.reshape(-1), norms


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", default="target/bench-cpu")
    ap.add_argument("--bin", default="target/release/examples/bench_cpu")
    ap.add_argument("--doc", default="docs/performance.md")
    ap.add_argument("--command", default="tools/bench-cpu-vs-torch.sh")
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    cores = os.cpu_count() or 1
    threads = [1] if cores == 1 else [1, cores]
    load_before = os.getloadavg()
    rows = []
    for shape in SHAPES:
        name, hidden, inter, layers, heads, kv, vocab, b, seq = shape
        folder, batch, seqs = build(shape, a.work)
        label = f"hidden {hidden}, inter {inter}, {layers} layers, vocab {vocab}, {b} x {seq}"
        for t in threads:
            res = os.path.join(a.work, f"tooln1-{name}-{b}x{seq}-t{t}.json")
            torch.set_num_threads(t)
            # Rounds of tooln1, eager, sdpa one after the other, so that a machine whose speed
            # drifts (a shared host) weighs on all three alike; medians over every round's runs.
            ours_f, ours_fb = [], []
            times = {impl: ([], []) for impl in ("eager", "sdpa")}
            errs = {}
            for _ in range(a.rounds):
                subprocess.run([a.bin, folder, batch, str(t), str(a.runs), res], check=True)
                with open(res) as f:
                    ours = json.load(f)
                ours_f += ours["fwd_ms"]
                ours_fb += ours["fwd_bwd_ms"]
                for impl in ("eager", "sdpa"):
                    fwd, fb, lp, norms = torch_run(load(folder, impl), seqs, a.runs)
                    times[impl][0].extend(fwd)
                    times[impl][1].extend(fb)
                    lp_err = (torch.tensor(ours["logp"]) - lp).abs().max().item()
                    g_err = max(
                        abs(ours["grad_norms"][n] - v) / max(v, 1e-30)
                        for n, v in norms.items()
                        if n in ours["grad_norms"]
                    )
                    prev = errs.get(impl, (0.0, 0.0))
                    errs[impl] = (max(prev[0], lp_err), max(prev[1], g_err))
                    print(f"{label}, {t} thr, torch {impl}: fwd {statistics.median(fwd):.1f} ms,"
                          f" fwd+bwd {statistics.median(fb):.1f} ms; max |dlogp| {lp_err:.2e},"
                          f" max grad-norm rel diff {g_err:.2e}", flush=True)
            med = statistics.median
            theirs = {
                impl: (med(times[impl][0]), med(times[impl][1])) + errs[impl]
                for impl in ("eager", "sdpa")
            }
            rows.append((label, t, med(ours_f), med(ours_fb), theirs))
    load_after = os.getloadavg()
    write_doc(a, rows, load_before, load_after)


def write_doc(a, rows, load_before, load_after):
    try:
        cpu = next(
            l.split(":", 1)[1].strip()
            for l in open("/proc/cpuinfo")
            if l.startswith("model name")
        )
    except (OSError, StopIteration):
        cpu = platform.processor() or "unknown"
    rustc = subprocess.run(["rustc", "--version"], capture_output=True, text=True).stdout.strip()
    lines = [
        START,
        "## CPU: tooln1 against PyTorch",
        "",
        f"Measured {datetime.date.today().isoformat()} on {cpu}, {os.cpu_count()} cores"
        f" ({platform.system()} {platform.release()}); load average before"
        f" {load_before[0]:.2f}, after {load_after[0]:.2f} (the benchmark's own processes"
        " included; above the core count, times carry noise). Versions: " + rustc + f", torch {torch.__version__},"
        f" transformers {transformers.__version__}. Command: `{a.command}` (medians of"
        f" {a.rounds} rounds x {a.runs} runs, each after a warm-up; in each round tooln1, torch"
        " eager and torch sdpa run one after the other).",
        "",
        "Same random Qwen2 weights (f32, 64-dim heads, 2 KV heads, untied lm_head), same"
        " tokens. fwd: the log-probabilities of every target, without gradient; fwd + bwd:"
        " then the gradient of their sum with respect to every weight. Ratio: PyTorch sdpa time"
        " / tooln1 time (above 1: tooln1 is faster). Agreement: the largest |Δ log p| and the"
        " largest relative difference of a weight's gradient norm, tooln1 against PyTorch sdpa.",
        "",
        "| shape | threads | op | tooln1 ms | torch eager ms | torch sdpa ms | ratio (sdpa / tooln1) | agreement |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, t, f, fb, th in rows:
        e, s = th["eager"], th["sdpa"]
        agree = f"{s[2]:.1e} / {s[3]:.1e}"
        lines.append(f"| {label} | {t} | fwd | {f:.0f} | {e[0]:.0f} | {s[0]:.0f} | {s[0] / f:.2f} | {agree} |")
        lines.append(f"| {label} | {t} | fwd + bwd | {fb:.0f} | {e[1]:.0f} | {s[1]:.0f} | {s[1] / fb:.2f} | |")
    lines.append(END)
    block = "\n".join(lines) + "\n"
    text = open(a.doc).read() if os.path.exists(a.doc) else ""
    if START in text and END in text:
        head, rest = text.split(START, 1)
        tail = rest.split(END, 1)[1].lstrip("\n")
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block
    with open(a.doc, "w") as f:
        f.write(text)
    print(f"wrote {a.doc}")


if __name__ == "__main__":
    main()
