#!/usr/bin/env python3
"""PyTorch baselines for tooln1's kernels and its whole GRPO step, at real Qwen2.5 shapes.

Times the same operations that `cargo bench` times for tooln1, with PyTorch on the same device,
and writes one JSON file that tools/bench_report.py turns into docs/performance.md.

    python3 tools/torch_baselines.py --device cuda --shapes 0.5b,1.5b,7b --out torch.json
    python3 tools/torch_baselines.py --device cpu --quick --out /tmp/torch-cpu.json   # smoke run
    python3 tools/torch_baselines.py --device cpu --quick --check                    # numerics only

What is timed (each op name and its shape keys are the contract with tooln1's benches; see the
header of tools/bench_report.py):

  rmsnorm_fwd/bwd   {model,tokens,hidden}            HF Qwen2RMSNorm formula; compile; Liger
  rope_fwd/bwd      {model,tokens,heads,kv_heads,head_dim}  q AND k of one layer, HF
                                                     apply_rotary_pos_emb (cos/sin built outside
                                                     the timed region, as HF does once per step)
  swiglu_fwd/bwd    {model,tokens,inter}             silu(gate) * up; compile; Liger
  linear_fwd/bwd    {model,tokens,out,in}            F.linear (cuBLAS), gate_proj-sized
  attention_fwd/bwd {model,batch,seq,heads,kv_heads,head_dim}  causal SDPA, flash and cuDNN
                                                     backends (GQA through enable_gqa)
  attention_decode  {model,batch,ctx,heads,kv_heads,head_dim}  one query token over a KV cache
  logprobs_fwd/bwd  {model,tokens,hidden,vocab}      lm_head + log-softmax + gather: eager
                                                     (materialises [tokens, vocab] logits),
                                                     chunked over tokens, compile, Liger FLCE
  grpo_loss         {tokens,seqs}                    verl token-mean clipped loss + k3 KL, forward
                                                     AND backward to d loss / d logp in one region
                                                     (tooln1's kernel computes both in one launch);
                                                     grpo_loss_fwd is the forward alone
  adamw             {params}                         torch.optim.AdamW(fused=True) on f32 params
  sample_top_p      {batch,vocab}                    temperature + top-p + multinomial on f32 logits
  decode            {model,batch,prompt,new_tokens}  HF generate, sampling, fixed length
  policy_fwd_bwd    {model,batch,seq}                transformers Qwen2ForCausalLM forward+backward
  logprob_loss      {model,tokens,hidden,vocab}      lm_head + logprobs + GRPO loss, fwd+bwd
  optimizer_step    {model}                          fused AdamW over all of a model's parameters
  grpo_step         {model,prompts,group,prompt_len,response_len}  rollout (generate) + old and
                                                     ref logprobs + one update (fwd+bwd, grad
                                                     clip, AdamW), transformers eager

Counting (per call; `flops` and `bytes` in the JSON). Bytes are the fewest the operation must
move through device memory: each input read once, each output written once, in the tensor's
dtype (es = 2 for bf16); they are a property of the operation, not of one implementation, so
that both sides' "% of ceiling" compare. T tokens, h hidden, I intermediate, H/Hk query/kv heads,
D head_dim, V vocab, N tokens of a logprob call, B batch, S sequence length.
  rmsnorm_fwd   bytes (2Th + h) es                      flops 4Th
  rmsnorm_bwd   bytes (3Th + h) es + 4h (dw in f32)     flops 8Th
  rope_fwd/bwd  bytes 2T(H+Hk)D es + 4T (positions)     flops 3T(H+Hk)D
  swiglu_fwd    bytes 3TI es                            flops 5TI
  swiglu_bwd    bytes 5TI es                            flops 10TI
  linear_fwd    bytes (TI + Ih + Th) es                 flops 2ThI          (out = I, in = h)
  linear_bwd    bytes (2TI + 2Th + 2Ih) es              flops 4ThI
  attention_fwd bytes B S (2H + 2Hk) D es + 4BHS (lse)  flops 4 B S^2 H D / 2   (causal)
  attention_bwd bytes B S (3H + 4Hk) D es + 4BHS        flops 2.5 x forward
  attention_decode bytes 2 B ctx Hk D es + 2 B H D es   flops 4 B ctx H D
  logprobs_fwd  bytes (Nh + Vh) es + 12N                flops 2NVh
  logprobs_bwd  bytes (2Nh + 2Vh) es + 12N              flops 4NVh  (recomputing logits in a
                                                        fused kernel adds 2NVh not counted here)
  grpo_loss     bytes 24N (5 f32 inputs, 1 f32 output)  flops 30N;  grpo_loss_fwd 20N, 20N
  adamw         bytes 28P (p, m, v read+write, g read)  flops 16P
  sample_top_p  bytes 4BV                               flops 6BV (no sort counted)
  model level   flops 6 P_mm per trained token + 6 L S H D (causal attention, fwd+bwd), where
                P_mm counts the matmul weights (layers and lm_head, not the embedding lookup);
                forward-only work (decode, old/ref logprobs) counts 2 P_mm + 2 L S H D;
                MFU = achieved FLOP/s over the bf16 GEMM ceiling measured in the same run.

Timing: CUDA events around each call (host clock with no device), warm-up first (compilation
and autotuning land there), then many repetitions and the median; each repetition's untimed
setup (the forward before a timed backward) is launched before the start event. Inputs are
random (never zeros) and rotate among several sets when one set fits in 4x the L2 cache.
Ceilings measured in the same run: a large device-to-device copy (bytes read + written) and a
large bf16 GEMM through torch.matmul on random data.

Failures (a compile error, out of memory, a missing package) are caught and recorded under
"skipped" with the reason; the run goes on.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import gc
import json
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import traceback

import torch
import torch.nn.functional as F

# Qwen2.5 configs (from the config.json of each Qwen/Qwen2.5-*-Instruct release); "tiny" is for smoke runs on a CPU.
MODELS = {
    "0.5b": dict(hidden=896, inter=4864, layers=24, heads=14, kv_heads=2, head_dim=64,
                 vocab=151936, tied=True),
    "1.5b": dict(hidden=1536, inter=8960, layers=28, heads=12, kv_heads=2, head_dim=128,
                 vocab=151936, tied=True),
    "3b": dict(hidden=2048, inter=11008, layers=36, heads=16, kv_heads=2, head_dim=128,
               vocab=151936, tied=True),
    "7b": dict(hidden=3584, inter=18944, layers=28, heads=28, kv_heads=4, head_dim=128,
               vocab=152064, tied=False),
    "tiny": dict(hidden=64, inter=176, layers=2, heads=4, kv_heads=2, head_dim=16,
                 vocab=1000, tied=True),
}
ROPE_THETA = 1e6
EPS = 1e-6
CLIP = 0.2
KL_COEF = 0.001


class Plan:
    """Sizes and timing settings of one run."""

    def __init__(self, quick: bool):
        if quick:
            self.tokens, self.seq = 64, 32
            self.logprob_tokens = 32
            self.attn_tokens, self.attn_seqs = 128, [32, 64]
            self.decode_slots, self.decode_ctx = 4, 64
            self.sample_batch = 4
            self.grpo_tokens, self.grpo_seqs = 512, 8
            self.adamw_params = 1 << 16
            self.decode_batches, self.prompt_len, self.new_tokens = [1, 4], 8, 8
            self.train_batch, self.train_seq = 2, 32
            self.step_prompts, self.step_group, self.step_prompt, self.step_response = 2, 2, 8, 8
            self.step_micro = 2
            self.loss_tokens = 32
            self.copy_bytes, self.gemm_n = 16 << 20, 256
            self.warmup_ms, self.rep_ms, self.min_reps, self.max_reps = 5.0, 30.0, 3, 50
            self.model_reps = 2
        else:
            # Kernel shapes follow tooln1's benches/kernels.rs: 4 sequences of 1024 tokens.
            self.tokens, self.seq = 4096, 1024
            self.logprob_tokens = 1024
            self.attn_tokens, self.attn_seqs = 8192, [1024, 4096, 8192]
            self.decode_slots, self.decode_ctx = 64, 2048
            self.sample_batch = 64
            self.grpo_tokens, self.grpo_seqs = 65536, 256
            self.adamw_params = 64 << 20
            self.decode_batches, self.prompt_len, self.new_tokens = [1, 64, 256], 128, 128
            self.train_batch, self.train_seq = 4, 1024
            self.step_prompts, self.step_group = 4, 8
            self.step_prompt, self.step_response = 256, 256
            self.step_micro = 4
            self.loss_tokens = 4096
            self.copy_bytes, self.gemm_n = 1 << 30, 8192
            self.warmup_ms, self.rep_ms, self.min_reps, self.max_reps = 25.0, 200.0, 10, 1000
            self.model_reps = 3


# ----------------------------------------------------------------------------- timing


class Bench:
    """Times callables on one device and collects the JSON rows."""

    def __init__(self, device: torch.device, plan: Plan, budget_s: float, compile_ok: bool):
        self.dev = device
        self.cuda = device.type == "cuda"
        self.plan = plan
        self.deadline = time.monotonic() + budget_s
        self.compile_ok = compile_ok
        self.results: list[dict] = []
        self.skipped: list[dict] = []
        if self.cuda:
            props = torch.cuda.get_device_properties(device)
            self.l2 = int(getattr(props, "L2_cache_size", 50 << 20))
        else:
            self.l2 = 32 << 20

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.dev)

    def left_s(self) -> float:
        return self.deadline - time.monotonic()

    def n_sets(self, set_bytes: float) -> int:
        """Input sets to rotate among so that repeated calls do not just hit the L2 cache."""
        if set_bytes <= 0 or set_bytes >= 4 * self.l2:
            return 1
        return int(min(16, math.ceil(4 * self.l2 / set_bytes)))

    def time_calls(self, run, setup=None, warmup_ms=None, rep_ms=None, min_reps=None,
                   max_reps=None, warm_calls=2):
        """Median, min and max milliseconds of `run(i)` over repetitions i = 0, 1, ...

        `setup(i)`, when given, runs before each repetition outside the timed region. The
        warm-up is at least `warm_calls` calls and lasts at least `warmup_ms`."""
        p = self.plan
        warmup_ms = p.warmup_ms if warmup_ms is None else warmup_ms
        rep_ms = p.rep_ms if rep_ms is None else rep_ms
        min_reps = p.min_reps if min_reps is None else min_reps
        max_reps = p.max_reps if max_reps is None else max_reps

        def one(i):
            if setup is not None:
                setup(i)
            if self.cuda:
                a = torch.cuda.Event(enable_timing=True)
                b = torch.cuda.Event(enable_timing=True)
                a.record()
                run(i)
                b.record()
                return (a, b)
            t0 = time.perf_counter()
            run(i)
            return time.perf_counter() - t0

        def ms(m):
            return m[0].elapsed_time(m[1]) if self.cuda else m * 1e3

        # Warm-up: at least warm_calls calls, then until warmup_ms have passed.
        i = 0
        t0 = time.perf_counter()
        warm = []
        while i < warm_calls or (time.perf_counter() - t0) * 1e3 < warmup_ms:
            warm.append(one(i))
            i += 1
            self.sync()
        est = statistics.median(ms(m) for m in (warm[1:] or warm))
        reps = int(max(min_reps, min(max_reps, rep_ms / max(est, 1e-4))))
        marks = [one(i + r) for r in range(reps)]
        self.sync()
        times = sorted(ms(m) for m in marks)
        return statistics.median(times), times[0], times[-1], reps

    def record(self, name, shape, variant, t, flops, nbytes, tokens=None, peak=None, note=None):
        med, lo, hi, reps = t
        row = {
            "name": name, "shape": shape, "variant": variant, "median_ms": med, "min_ms": lo,
            "max_ms": hi, "reps": reps, "flops": flops, "bytes": nbytes,
            "tflops": flops / (med * 1e-3) / 1e12 if flops and med > 0 else None,
            "gbps": nbytes / (med * 1e-3) / 1e9 if nbytes and med > 0 else None,
        }
        if tokens:
            row["tokens"] = tokens
            row["tokens_per_s"] = tokens / (med * 1e-3)
        if peak is not None:
            row["peak_extra_bytes"] = peak
        if note:
            row["note"] = note
        self.results.append(row)
        rate = (f"{row['tflops']:.1f} TFLOP/s" if row["tflops"] and
                (not nbytes or flops / nbytes > 50) else
                f"{row['gbps']:.0f} GB/s" if row["gbps"] else "")
        extra = f" {row['tokens_per_s']:.0f} tok/s" if tokens else ""
        print(f"{name:18s} {fmt_shape(shape):58s} {variant:22s} {med:10.4f} ms  {rate}{extra}",
              flush=True)

    def skip(self, name, shape, variant, reason):
        self.skipped.append({"name": name, "shape": shape, "variant": variant,
                             "reason": reason})
        print(f"{name:18s} {fmt_shape(shape):58s} {variant:22s} skipped: {reason}", flush=True)

    def variant(self, name, shape, variant, body, is_compile=False):
        """Runs `body()` (which times and records) with failures caught and recorded."""
        if self.left_s() <= 0:
            self.skip(name, shape, variant, "time budget (--budget-s) used up")
            return
        if is_compile and not self.compile_ok:
            self.skip(name, shape, variant, "torch.compile not run (--no-compile)")
            return
        try:
            if self.cuda:
                torch.cuda.reset_peak_memory_stats(self.dev)
            body()
        except Exception as e:  # noqa: BLE001 - every failure is recorded, the run goes on
            msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            self.skip(name, shape, variant, msg[:300])
            if os.environ.get("TORCH_BASELINES_TRACE"):
                traceback.print_exc()
        finally:
            if self.cuda:
                torch.cuda.empty_cache()

    def peak_since(self, base: int):
        if not self.cuda:
            return None
        return max(0, torch.cuda.max_memory_allocated(self.dev) - base)

    def allocated(self) -> int:
        return torch.cuda.memory_allocated(self.dev) if self.cuda else 0


def fmt_shape(shape: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in shape.items())


def rand(shape, dev, dtype, scale=1.0, gen=None):
    """Uniform random in [-scale, scale): never zeros, never constant."""
    return ((torch.rand(shape, device=dev, dtype=torch.float32, generator=gen) * 2 - 1)
            * scale).to(dtype)


# ----------------------------------------------------------------------------- op definitions


def rmsnorm_eager(x, w):
    """transformers' Qwen2RMSNorm.forward."""
    dt = x.dtype
    h = x.to(torch.float32)
    var = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(var + EPS)
    return w * h.to(dt)


def rotate_half(x):
    d = x.shape[-1] // 2
    return torch.cat((-x[..., d:], x[..., :d]), dim=-1)


def rope_eager(q, k, cos, sin):
    """transformers' apply_rotary_pos_emb with cos/sin [B, S, D] (unsqueezed at dim 1)."""
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def rope_tables(batch, seq, head_dim, dev, dtype):
    """cos/sin [B, S, D] for positions 0..S-1, half-split layout, computed in f32 like HF."""
    inv = 1.0 / (ROPE_THETA ** (torch.arange(0, head_dim, 2, device=dev, dtype=torch.float32)
                                / head_dim))
    pos = torch.arange(seq, device=dev, dtype=torch.float32)
    f = torch.outer(pos, inv)
    emb = torch.cat((f, f), dim=-1)
    cos = emb.cos().to(dtype).unsqueeze(0).expand(batch, -1, -1).contiguous()
    sin = emb.sin().to(dtype).unsqueeze(0).expand(batch, -1, -1).contiguous()
    return cos, sin


def swiglu_eager(g, u):
    return F.silu(g) * u


def logprobs_eager(h, w, tgt):
    """Materialises [N, V] logits (bf16), log-softmax in f32, gather."""
    logits = h @ w.t()
    lp = torch.log_softmax(logits.float(), dim=-1)
    return lp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)


def make_logprobs_chunked(chunk):
    def logprobs_chunked(h, w, tgt):
        """Same values, [chunk, V] logits at a time (memory grows with chunk x V)."""
        outs = []
        for s in range(0, h.shape[0], chunk):
            hc = h[s:s + chunk]
            lg = (hc @ w.t()).float()
            lse = torch.logsumexp(lg, dim=-1)
            outs.append(lg.gather(-1, tgt[s:s + chunk].unsqueeze(-1)).squeeze(-1) - lse)
        return torch.cat(outs)
    return logprobs_chunked


def grpo_loss_eager(logp, old, ref, adv, mask):
    """verl core_algos (verl/trainer/ppo/core_algos.py): clipped surrogate + k3 KL, token-mean aggregation."""
    neg_kl = torch.clamp(logp - old, -20.0, 20.0)
    ratio = torch.exp(neg_kl)
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1.0 - CLIP, 1.0 + CLIP)
    pg = torch.maximum(pg1, pg2)
    x = torch.clamp(ref - logp, -20.0, 20.0)
    kl = torch.clamp(torch.exp(x) - x - 1.0, -10.0, 10.0)
    per_tok = pg + KL_COEF * kl
    return (per_tok * mask).sum() / mask.sum().clamp_min(1.0)


def sample_top_p(logits, temperature=0.8, top_p=0.95, gen=None):
    """HF-style top-p: sort, cumulative sum, drop the tail, renormalise, multinomial."""
    probs = torch.softmax(logits / temperature, dim=-1)
    sp, si = torch.sort(probs, dim=-1, descending=True)
    cum = sp.cumsum(-1)
    sp = sp.masked_fill(cum - sp > top_p, 0.0)
    pick = torch.multinomial(sp, 1, generator=gen)
    return si.gather(-1, pick).squeeze(-1)


def liger_modules():
    """Liger kernel entry points when the package imports (it needs Triton and a GPU)."""
    try:
        import liger_kernel  # noqa: F401
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
        from liger_kernel.transformers.fused_linear_cross_entropy import \
            LigerFusedLinearCrossEntropyLoss
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        from liger_kernel.transformers.rope import liger_rotary_pos_emb
    except Exception as e:  # noqa: BLE001
        return None, f"liger_kernel not importable ({type(e).__name__}: {e})"
    return dict(rmsnorm=LigerRMSNormFunction, swiglu=LigerSiLUMulFunction,
                rope=liger_rotary_pos_emb, flce=LigerFusedLinearCrossEntropyLoss), None


def compiled(fn):
    return torch.compile(fn, dynamic=False)


# ----------------------------------------------------------------------------- generic runners


def bench_fwd(B: Bench, name, shape, flops, nbytes, make_set, set_bytes, variants, grad=False):
    """Forward timing: variants {label: (fn, is_compile)}; make_set(i) -> tuple of inputs."""
    sets = [make_set(i) for i in range(B.n_sets(set_bytes))]
    for label, (fn, is_c) in variants.items():
        def body(fn=fn, label=label):
            base = B.allocated()

            def run(i):
                with torch.no_grad():
                    fn(*sets[i % len(sets)])
            t = B.time_calls(run)
            B.record(name, shape, label, t, flops, nbytes, peak=B.peak_since(base))
        B.variant(name, shape, label, body, is_compile=is_c)


def bench_bwd(B: Bench, name, shape, flops, nbytes, make_set, set_bytes, variants, n_grad):
    """Backward timing: the forward runs untimed before each repetition, then
    torch.autograd.grad of the output(s) w.r.t. the first n_grad inputs is timed."""
    sets = []
    for i in range(B.n_sets(set_bytes)):
        ins = make_set(i)
        ins = tuple(x.detach().requires_grad_(True) if j < n_grad else x
                    for j, x in enumerate(ins))
        sets.append(ins)
    for label, (fn, is_c) in variants.items():
        def body(fn=fn, label=label):
            base = B.allocated()
            state = {}

            def setup(i):
                ins = sets[i % len(sets)]
                out = fn(*ins)
                outs = out if isinstance(out, tuple) else (out,)
                gens = [torch.ones_like(o) if o.dim() == 0 else
                        rand(o.shape, o.device, o.dtype) for o in outs]
                state["o"], state["g"], state["ins"] = outs, gens, ins[:n_grad]

            def run(i):
                torch.autograd.grad(state["o"], state["ins"], state["g"])
            t = B.time_calls(run, setup=setup)
            state.clear()
            B.record(name, shape, label, t, flops, nbytes, peak=B.peak_since(base))
        B.variant(name, shape, label, body, is_compile=is_c)


# ----------------------------------------------------------------------------- kernels


def kernel_benches(B: Bench, mname: str, cfg: dict, dtype, ops: set, liger):
    P, dev = B.plan, B.dev
    es = torch.finfo(dtype).bits // 8
    T, h, I = P.tokens, cfg["hidden"], cfg["inter"]
    H, Hk, D, V = cfg["heads"], cfg["kv_heads"], cfg["head_dim"], cfg["vocab"]
    gen = torch.Generator(device=dev)
    gen.manual_seed(int(time.time_ns() % (1 << 31)))

    def r(shape, scale=1.0):
        return rand(shape, dev, dtype, scale, gen)

    if "rmsnorm" in ops:
        shape = {"model": mname, "tokens": T, "hidden": h}
        mk = lambda i: (r((T, h)), r((h,), 1.0) + 1.0)  # noqa: E731
        var = {"eager": (rmsnorm_eager, False), "compile": (compiled(rmsnorm_eager), True)}
        if liger:
            var["liger"] = (lambda x, w: liger["rmsnorm"].apply(x, w, EPS, 0.0, "llama", False),
                            False)
        bench_fwd(B, "rmsnorm_fwd", shape, 4 * T * h, (2 * T * h + h) * es, mk, 2 * T * h * es, var)
        bench_bwd(B, "rmsnorm_bwd", shape, 8 * T * h, (3 * T * h + h) * es + 4 * h, mk,
                  3 * T * h * es, var, n_grad=2)

    if "rope" in ops:
        nb = max(1, T // P.seq)
        S = T // nb
        shape = {"model": mname, "tokens": T, "heads": H, "kv_heads": Hk, "head_dim": D}
        cos, sin = rope_tables(nb, S, D, dev, dtype)

        def mk(i):
            # As in HF: projections [B, S, heads, D] viewed as [B, heads, S, D].
            return (r((nb, S, H, D)).transpose(1, 2), r((nb, S, Hk, D)).transpose(1, 2))
        var = {"eager": (lambda q, k: rope_eager(q, k, cos, sin), False),
               "compile": (compiled(lambda q, k: rope_eager(q, k, cos, sin)), True)}
        if liger:
            # Liger rotates in place: work on copies so the inputs stay valid. The copies are
            # made inside the timed region, so Liger's time here includes one extra q,k copy.
            var["liger"] = (lambda q, k: liger["rope"](q.clone(), k.clone(), cos, sin), False)
        nbytes = 2 * T * (H + Hk) * D * es + 4 * T
        bench_fwd(B, "rope_fwd", shape, 3 * T * (H + Hk) * D, nbytes, mk,
                  T * (H + Hk) * D * es, var)
        bench_bwd(B, "rope_bwd", shape, 3 * T * (H + Hk) * D, nbytes, mk,
                  2 * T * (H + Hk) * D * es, var, n_grad=2)

    if "swiglu" in ops:
        shape = {"model": mname, "tokens": T, "inter": I}
        mk = lambda i: (r((T, I), 2.0), r((T, I), 2.0))  # noqa: E731
        var = {"eager": (swiglu_eager, False), "compile": (compiled(swiglu_eager), True)}
        if liger:
            var["liger"] = (lambda g, u: liger["swiglu"].apply(g, u), False)
        bench_fwd(B, "swiglu_fwd", shape, 5 * T * I, 3 * T * I * es, mk, 2 * T * I * es, var)
        bench_bwd(B, "swiglu_bwd", shape, 10 * T * I, 5 * T * I * es, mk, 3 * T * I * es, var,
                  n_grad=2)

    if "linear" in ops:
        shape = {"model": mname, "tokens": T, "out": I, "in": h}
        mk = lambda i: (r((T, h)), r((I, h), 0.05))  # noqa: E731
        var = {"eager": (lambda x, w: F.linear(x, w), False)}
        bench_fwd(B, "linear_fwd", shape, 2 * T * h * I, (T * I + I * h + T * h) * es, mk,
                  (T * h + I * h) * es, var)
        bench_bwd(B, "linear_bwd", shape, 4 * T * h * I, (2 * T * I + 2 * T * h + 2 * I * h) * es,
                  mk, (T * h + I * h + T * I) * es, var, n_grad=2)

    if "attention" in ops:
        for S in P.attn_seqs:
            nb = max(1, P.attn_tokens // S)
            shape = {"model": mname, "batch": nb, "seq": S, "heads": H, "kv_heads": Hk,
                     "head_dim": D}
            mk = lambda i, nb=nb, S=S: (r((nb, H, S, D)), r((nb, Hk, S, D)),  # noqa: E731
                                        r((nb, Hk, S, D)))
            var = attention_variants(B, H, Hk, D, dtype)
            fl = 4 * nb * S * S * H * D / 2
            fwd_b = nb * S * (2 * H + 2 * Hk) * D * es + 4 * nb * H * S
            bwd_b = nb * S * (3 * H + 4 * Hk) * D * es + 4 * nb * H * S
            bench_fwd(B, "attention_fwd", shape, fl, fwd_b, mk, fwd_b, var)
            bench_bwd(B, "attention_bwd", shape, 2.5 * fl, bwd_b, mk, bwd_b, var, n_grad=3)
        nb, ctx = P.decode_slots, P.decode_ctx
        shape = {"model": mname, "batch": nb, "ctx": ctx, "heads": H, "kv_heads": Hk,
                 "head_dim": D}
        mk = lambda i: (r((nb, H, 1, D)), r((nb, Hk, ctx, D)), r((nb, Hk, ctx, D)))  # noqa: E731
        nbytes = 2 * nb * ctx * Hk * D * es + 2 * nb * H * D * es

        def dec(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        bench_fwd(B, "attention_decode", shape, 4 * nb * ctx * H * D, nbytes, mk, nbytes,
                  {"sdpa-auto": (dec, False)})

    if "logprobs" in ops:
        N = P.logprob_tokens
        shape = {"model": mname, "tokens": N, "hidden": h, "vocab": V}
        tg = [torch.randint(0, V, (N,), device=dev, generator=gen) for _ in range(16)]
        w = r((V, h), 0.05)
        mk = lambda i: (r((N, h)), w, tg[i % len(tg)])  # noqa: E731
        chunk = max(1, N // 8)
        var = {"eager": (logprobs_eager, False),
               f"chunked-{chunk}": (make_logprobs_chunked(chunk), False),
               "compile": (compiled(logprobs_eager), True)}
        if liger:
            flce = liger["flce"](reduction="none")
            var["liger-flce"] = (lambda hh, ww, t: -flce(ww, hh, t), False)
        bench_fwd(B, "logprobs_fwd", shape, 2 * N * V * h, (N * h + V * h) * es + 12 * N, mk,
                  N * h * es, var)
        # d/dh and d/dW; the weight is shared by every set (it is the lm_head).
        mk_b = lambda i: (r((N, h)), w.detach().requires_grad_(True),  # noqa: E731
                          tg[i % len(tg)])
        # Liger's fused linear cross-entropy computes its gradients inside the forward, so its
        # backward alone would look free: it is timed in the forward only.
        var_b = {k: v for k, v in var.items() if not k.startswith("liger")}
        bench_bwd(B, "logprobs_bwd", shape, 4 * N * V * h, (2 * N * h + 2 * V * h) * es + 12 * N,
                  mk_b, 0, var_b, n_grad=2)

    if "grpo_loss" in ops:
        N, ns = P.grpo_tokens, P.grpo_seqs
        shape = {"tokens": N, "seqs": ns}

        def mk(i):
            lp = -torch.rand(N, device=dev, generator=gen) * 5 - 0.01
            old = lp + (torch.rand(N, device=dev, generator=gen) - 0.5) * 0.6
            ref = lp + (torch.rand(N, device=dev, generator=gen) - 0.5) * 0.6
            adv = torch.repeat_interleave(torch.randn(ns, device=dev, generator=gen), N // ns)
            mask = (torch.rand(N, device=dev, generator=gen) > 0.1).float()
            return lp, old, ref, adv, mask
        var = {"eager": (grpo_loss_eager, False), "compile": (compiled(grpo_loss_eager), True)}
        bench_fwd(B, "grpo_loss_fwd", shape, 20 * N, 20 * N, mk, 20 * N, var)
        sets = [mk(i) for i in range(B.n_sets(24 * N))]
        for label, (fn, is_c) in var.items():
            def body(fn=fn, label=label):
                leaves = [s[0].detach().requires_grad_(True) for s in sets]

                def run(i):
                    s = sets[i % len(sets)]
                    lp = leaves[i % len(sets)]
                    torch.autograd.grad(fn(lp, *s[1:]), (lp,))
                t = B.time_calls(run)
                B.record("grpo_loss", shape, label, t, 30 * N, 24 * N)
            B.variant("grpo_loss", shape, label, body, is_compile=is_c)


def attention_variants(B: Bench, H: int, Hk: int, D: int, dtype):
    """Causal SDPA per backend. Where a backend refuses GQA (enable_gqa), k and v are expanded
    to every query head inside the timed call (what transformers' repeat_kv does) and the
    variant's label says so."""
    if not B.cuda:
        return {"sdpa-auto": (lambda q, k, v: F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=True), False)}
    from torch.nn.attention import SDPBackend, sdpa_kernel
    out = {}
    g = H // Hk
    for label, be in (("sdpa-flash", SDPBackend.FLASH_ATTENTION),
                      ("sdpa-cudnn", getattr(SDPBackend, "CUDNN_ATTENTION", None))):
        if be is None:
            continue

        def gqa(q, k, v, be=be):
            with sdpa_kernel([be]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        def expanded(q, k, v, be=be):
            k = k.repeat_interleave(g, dim=1)
            v = v.repeat_interleave(g, dim=1)
            with sdpa_kernel([be]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        probe = (rand((1, H, 128, D), B.dev, dtype), rand((1, Hk, 128, D), B.dev, dtype),
                 rand((1, Hk, 128, D), B.dev, dtype))
        chosen = None
        for lab, fn in ((label, gqa), (label + "+repeat_kv", expanded)):
            try:
                fn(*probe)
                chosen = (lab, fn)
                break
            except Exception as e:  # noqa: BLE001 - the backend refuses this input; try the next
                print(f"attention {lab}: refused ({type(e).__name__}); trying the next form",
                      flush=True)
        if chosen is None:
            B.skip("attention_fwd", {"heads": H, "kv_heads": Hk, "head_dim": D}, label,
                   "backend refused both GQA and expanded k/v inputs")
            continue
        out[chosen[0]] = (chosen[1], False)
    return out


def global_benches(B: Bench, dtype, ops: set):
    """Shape-independent ops: AdamW and top-p sampling."""
    P, dev = B.plan, B.dev
    gen = torch.Generator(device=dev)
    gen.manual_seed(int(time.time_ns() % (1 << 31)))
    if "adamw" in ops:
        n = P.adamw_params
        shape = {"params": n}

        def body(fused):
            p = torch.nn.Parameter(rand((n,), dev, torch.float32, 1.0, gen))
            p.grad = rand((n,), dev, torch.float32, 0.01, gen)
            opt = torch.optim.AdamW([p], lr=1e-6, weight_decay=0.01, fused=fused)
            t = B.time_calls(lambda i: opt.step())
            B.record("adamw", shape, "fused" if fused else "foreach", t, 16 * n, 28 * n)
        if B.cuda:
            B.variant("adamw", shape, "fused", lambda: body(True))
        B.variant("adamw", shape, "foreach", lambda: body(False))
    if "sample" in ops:
        for mname in sorted({m for m in B.sample_vocabs}):
            V = B.sample_vocabs[mname]
            bs = P.sample_batch
            shape = {"batch": bs, "vocab": V}
            lg = [rand((bs, V), dev, torch.float32, 8.0, gen) for _ in range(B.n_sets(4 * bs * V))]

            def body(lg=lg, shape=shape, V=V, bs=bs):
                t = B.time_calls(lambda i: sample_top_p(lg[i % len(lg)], gen=gen))
                B.record("sample_top_p", shape, "eager", t, 6 * bs * V, 4 * bs * V)
            B.variant("sample_top_p", shape, "eager", body)


# ----------------------------------------------------------------------------- model level


def matmul_params(cfg: dict) -> int:
    h, I, L = cfg["hidden"], cfg["inter"], cfg["layers"]
    qd, kvd = cfg["heads"] * cfg["head_dim"], cfg["kv_heads"] * cfg["head_dim"]
    per_layer = h * qd + 2 * h * kvd + qd * h + 3 * h * I
    return L * per_layer + cfg["vocab"] * h


def param_shapes(cfg: dict):
    """Every parameter tensor's shape, as transformers lays Qwen2 out."""
    h, I = cfg["hidden"], cfg["inter"]
    qd, kvd = cfg["heads"] * cfg["head_dim"], cfg["kv_heads"] * cfg["head_dim"]
    out = [(cfg["vocab"], h)]
    for _ in range(cfg["layers"]):
        out += [(h,), (qd, h), (qd,), (kvd, h), (kvd,), (kvd, h), (kvd,), (h, qd), (h,),
                (I, h), (I, h), (h, I)]
    out.append((h,))
    if not cfg["tied"]:
        out.append((cfg["vocab"], h))
    return out


def train_flops(cfg, tokens, seq):
    return 6 * matmul_params(cfg) * tokens + 6 * cfg["layers"] * seq * cfg["heads"] * \
        cfg["head_dim"] * tokens


def fwd_flops(cfg, tokens, seq):
    return 2 * matmul_params(cfg) * tokens + 2 * cfg["layers"] * seq * cfg["heads"] * \
        cfg["head_dim"] * tokens


def build_model(cfg: dict, dev, dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    conf = Qwen2Config(
        vocab_size=cfg["vocab"], hidden_size=cfg["hidden"], intermediate_size=cfg["inter"],
        num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
        num_key_value_heads=cfg["kv_heads"], max_position_embeddings=32768,
        rope_theta=ROPE_THETA, rms_norm_eps=EPS, tie_word_embeddings=cfg["tied"],
        use_sliding_window=False, hidden_act="silu")
    conf._attn_implementation = "sdpa"
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(dev):
            model = Qwen2ForCausalLM(conf)
    finally:
        torch.set_default_dtype(old)
    model.to(dtype)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 1:  # norms (ones) and biases (zeros) get random values too
                p.copy_(rand(p.shape, dev, dtype, 0.5) + (1.0 if "norm" in n else 0.0))
    model.generation_config.pad_token_id = 0
    return model


def response_logprobs(model, ids, prompt_len):
    """Log-probabilities of the tokens after prompt_len, f32 log-softmax over the vocab."""
    logits = model(input_ids=ids).logits[:, prompt_len - 1:-1]
    lp = torch.log_softmax(logits.float(), dim=-1)
    return lp.gather(-1, ids[:, prompt_len:].unsqueeze(-1)).squeeze(-1)


def model_benches(B: Bench, mname: str, cfg: dict, dtype, ops: set, compile_model: bool):
    P, dev = B.plan, B.dev
    V = cfg["vocab"]
    gen = torch.Generator(device=dev)
    gen.manual_seed(int(time.time_ns() % (1 << 31)))
    model_ops = ops & {"decode", "policy", "logprob_loss", "optimizer", "grpo_step"}
    if "optimizer" in model_ops:
        shape = {"model": mname}
        npar = sum(math.prod(s) for s in param_shapes(cfg))

        def body(pdtype, label):
            ps = [torch.nn.Parameter(rand(s, dev, pdtype, 0.02, gen)) for s in param_shapes(cfg)]
            for p in ps:
                p.grad = rand(p.shape, dev, pdtype, 0.01, gen)
            opt = torch.optim.AdamW(ps, lr=1e-6, weight_decay=0.01, fused=B.cuda)
            t = B.time_calls(lambda i: opt.step(), rep_ms=P.rep_ms, max_reps=50)
            es = torch.finfo(pdtype).bits // 8
            B.record("optimizer_step", shape, label, t, 16 * npar, 7 * es * npar,
                     note=f"{npar} parameters")
        n_before = len(B.results)
        B.variant("optimizer_step", shape, "fused-adamw-f32", lambda: body(torch.float32,
                                                                           "fused-adamw-f32"))
        if len(B.results) == n_before:
            B.variant("optimizer_step", shape, "fused-adamw-bf16",
                      lambda: body(torch.bfloat16, "fused-adamw-bf16"))

    if "logprob_loss" in model_ops:
        N, h = P.loss_tokens, cfg["hidden"]
        shape = {"model": mname, "tokens": N, "hidden": h, "vocab": V}
        w = rand((V, h), dev, dtype, 0.05, gen).requires_grad_(True)
        hs = rand((N, h), dev, dtype, 1.0, gen).requires_grad_(True)
        tgt = torch.randint(0, V, (N,), device=dev, generator=gen)
        old = -torch.rand(N, device=dev, generator=gen) * 5 - 5
        ref = old + 0.1
        adv = torch.randn(N, device=dev, generator=gen)
        mask = torch.ones(N, device=dev)
        chunk = max(1, N // 8)
        for label, lpf in (("eager", logprobs_eager),
                           (f"chunked-{chunk}", make_logprobs_chunked(chunk))):
            def body(lpf=lpf, label=label):
                base = B.allocated()

                def run(i):
                    loss = grpo_loss_eager(lpf(hs, w, tgt), old, ref, adv, mask)
                    torch.autograd.grad(loss, (hs, w))
                t = B.time_calls(run, rep_ms=P.rep_ms, max_reps=100)
                B.record("logprob_loss", shape, label, t, 6 * N * V * h,
                         (3 * N * h + 3 * V * h) * 2 + 24 * N, peak=B.peak_since(base))
            B.variant("logprob_loss", shape, label, body)
        del w, hs

    need_model = model_ops & {"decode", "policy", "grpo_step"}
    if not need_model:
        return
    try:
        import transformers
    except Exception as e:  # noqa: BLE001
        for op in sorted(need_model):
            B.skip(op, {"model": mname}, "transformers", f"transformers not importable: {e}")
        return
    model = None
    try:
        model = build_model(cfg, dev, dtype)
    except Exception as e:  # noqa: BLE001
        for op in sorted(need_model):
            B.skip(op, {"model": mname}, "transformers-eager",
                   f"model build failed: {type(e).__name__}: {e}"[:300])
        return
    wbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    label = f"hf-generate (transformers {transformers.__version__})"

    if "decode" in model_ops:
        model.eval()
        for bs in P.decode_batches:
            shape = {"model": mname, "batch": bs, "prompt": P.prompt_len,
                     "new_tokens": P.new_tokens}
            ids = torch.randint(0, V, (bs, P.prompt_len), device=dev, generator=gen)

            def body(ids=ids, shape=shape, bs=bs):
                def run(i):
                    with torch.no_grad():
                        out = model.generate(
                            input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                            temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=P.new_tokens,
                            min_new_tokens=P.new_tokens, pad_token_id=0)
                    if out.shape[1] != P.prompt_len + P.new_tokens:
                        raise RuntimeError(f"generate returned {out.shape[1]} tokens")
                t = B.time_calls(run, warmup_ms=0, rep_ms=0, min_reps=P.model_reps, max_reps=1,
                                 warm_calls=1)
                ntok = bs * P.new_tokens
                B.record("decode", shape, label, t,
                         fwd_flops(cfg, bs * (P.prompt_len + P.new_tokens), P.prompt_len),
                         P.new_tokens * wbytes, tokens=ntok,
                         note="tokens = new tokens; time includes the prompt's prefill")
            B.variant("decode", shape, label, body)

    if "policy" in model_ops:
        model.train()
        bs, S = P.train_batch, P.train_seq
        shape = {"model": mname, "batch": bs, "seq": S}
        ids = [torch.randint(0, V, (bs, S), device=dev, generator=gen) for _ in range(2)]
        fl = train_flops(cfg, bs * S, S)
        variants = [("transformers-eager", model, False)]
        if compile_model:
            variants.append(("transformers-compile", None, True))
        for vlabel, m, is_c in variants:
            def body(m=m, vlabel=vlabel):
                mod = m if m is not None else torch.compile(model)
                base = B.allocated()

                def run(i):
                    x = ids[i % len(ids)]
                    loss = mod(input_ids=x, labels=x).loss
                    loss.backward()
                t = B.time_calls(run, warmup_ms=0, rep_ms=0, min_reps=P.model_reps + 2,
                                 max_reps=1, warm_calls=1)
                model.zero_grad(set_to_none=True)
                B.record("policy_fwd_bwd", shape, vlabel, t, fl, 3 * wbytes, tokens=bs * S,
                         peak=B.peak_since(base))
            B.variant("policy_fwd_bwd", shape, vlabel, body, is_compile=is_c)
        if not compile_model:
            B.skip("policy_fwd_bwd", shape, "transformers-compile",
                   "whole-model torch.compile not run (pass --compile-model)")
        model.zero_grad(set_to_none=True)

    if "grpo_step" in model_ops:
        np_, g = P.step_prompts, P.step_group
        pl, rl = P.step_prompt, P.step_response
        shape = {"model": mname, "prompts": np_, "group": g, "prompt_len": pl,
                 "response_len": rl}
        bs = np_ * g
        ntok = bs * (pl + rl)
        fl = (fwd_flops(cfg, bs * (pl + rl), pl) + 2 * fwd_flops(cfg, bs * (pl + rl), pl + rl)
              + train_flops(cfg, bs * (pl + rl), pl + rl))

        def body():
            ref = copy.deepcopy(model).eval()
            for p in ref.parameters():
                p.requires_grad_(False)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.01,
                                    fused=B.cuda)
            prompts = torch.randint(0, V, (np_, pl), device=dev, generator=gen)
            mb = max(1, min(P.step_micro, bs))

            def run(i):
                model.eval()
                with torch.no_grad():
                    ids = model.generate(
                        input_ids=prompts.repeat_interleave(g, 0),
                        attention_mask=torch.ones(bs, pl, dtype=torch.long, device=dev),
                        do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                        max_new_tokens=rl, min_new_tokens=rl, pad_token_id=0)
                    old, refl = [], []
                    for s in range(0, bs, mb):
                        old.append(response_logprobs(model, ids[s:s + mb], pl))
                        refl.append(response_logprobs(ref, ids[s:s + mb], pl))
                    old, refl = torch.cat(old), torch.cat(refl)
                # Random scores stand in for the reward; advantages as verl's GRPO.
                score = torch.rand(np_, g, device=dev, generator=gen)
                adv = ((score - score.mean(1, keepdim=True)) / (score.std(1, keepdim=True)
                                                               + 1e-6)).reshape(bs, 1)
                model.train()
                for s in range(0, bs, mb):
                    lp = response_logprobs(model, ids[s:s + mb], pl)
                    a = adv[s:s + mb].expand_as(lp)
                    loss = grpo_loss_eager(lp, old[s:s + mb], refl[s:s + mb], a,
                                           torch.ones_like(lp)) * (lp.shape[0] / bs)
                    loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
            try:
                t = B.time_calls(run, warmup_ms=0, rep_ms=0, min_reps=P.model_reps, max_reps=1,
                                 warm_calls=1)
                B.record("grpo_step", shape, "transformers-eager", t, fl, None, tokens=ntok,
                         note=f"micro-batch {mb} sequences; AdamW fused on bf16 params")
            finally:
                del ref, opt
                model.zero_grad(set_to_none=True)
        B.variant("grpo_step", shape, "transformers-eager", body)
    model = None  # drops the last reference before the next size is built
    gc.collect()
    if B.cuda:
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- ceilings


def ceilings(B: Bench) -> dict:
    P, dev = B.plan, B.dev
    out = {}
    n = P.copy_bytes // 4
    src = rand((n,), dev, torch.float32)
    dst = torch.empty_like(src)
    t = B.time_calls(lambda i: dst.copy_(src), rep_ms=P.rep_ms, max_reps=200)
    out["copy_bytes"] = 2 * n * 4
    out["copy_ms"] = t[0]
    out["copy_gbps"] = 2 * n * 4 / (t[0] * 1e-3) / 1e9
    src = dst = None  # frees the copy buffers before the GEMM
    N = P.gemm_n
    gdt = torch.bfloat16 if B.cuda else torch.float32
    a = rand((N, N), dev, gdt)
    b = rand((N, N), dev, gdt)
    t = B.time_calls(lambda i: torch.matmul(a, b), rep_ms=P.rep_ms, max_reps=200)
    out["gemm_n"] = N
    out["gemm_dtype"] = str(gdt).replace("torch.", "")
    out["gemm_ms"] = t[0]
    out["gemm_tflops"] = 2 * N ** 3 / (t[0] * 1e-3) / 1e12
    print(f"ceilings: copy {out['copy_gbps']:.0f} GB/s ({out['copy_bytes'] >> 20} MiB read+"
          f"written), {out['gemm_dtype']} GEMM {N}^3 {out['gemm_tflops']:.1f} TFLOP/s", flush=True)
    return out


# ----------------------------------------------------------------------------- numerics check


def rel_err(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check(dev, compile_ok: bool, liger) -> int:
    """Every baseline variant against an f64 reference on fresh random inputs."""
    seed = int(time.time_ns() % (1 << 31))
    torch.manual_seed(seed)
    print(f"check: seed {seed}")
    fails = 0

    def report(what, err, tol):
        nonlocal fails
        ok = math.isfinite(err) and err < tol
        fails += 0 if ok else 1
        print(f"check {what:40s} rel err {err:.2e} (tol {tol:.0e}) {'ok' if ok else 'FAIL'}")

    T, h, H, Hk, D, I, V = 37, 48, 6, 2, 16, 72, 301
    x = rand((T, h), dev, torch.float32)
    w = rand((h,), dev, torch.float32) + 1.0
    ref = x.double() / torch.sqrt(x.double().pow(2).mean(-1, keepdim=True) + EPS) * w.double()
    report("rmsnorm eager", rel_err(rmsnorm_eager(x, w), ref), 1e-5)

    q = rand((1, T, H, D), dev, torch.float32).transpose(1, 2)
    k = rand((1, T, Hk, D), dev, torch.float32).transpose(1, 2)
    cos, sin = rope_tables(1, T, D, dev, torch.float32)
    qo, ko = rope_eager(q, k, cos, sin)
    # Reference: rotate pairs (i, i + D/2) by angle pos * theta^(-2i/D), in f64.
    i = torch.arange(D // 2, device=dev, dtype=torch.float64)
    ang = torch.arange(T, device=dev, dtype=torch.float64)[:, None] * ROPE_THETA ** (-2 * i / D)
    c, s = ang.cos(), ang.sin()

    def rot(t):
        t = t.double()
        a, b = t[..., :D // 2], t[..., D // 2:]
        return torch.cat((a * c - b * s, b * c + a * s), dim=-1)
    report("rope eager (q)", rel_err(qo, rot(q)), 1e-5)
    report("rope eager (k)", rel_err(ko, rot(k)), 1e-5)

    g, u = rand((T, I), dev, torch.float32, 3.0), rand((T, I), dev, torch.float32, 3.0)
    gd = g.double()
    report("swiglu eager", rel_err(swiglu_eager(g, u), gd / (1 + torch.exp(-gd)) * u.double()),
           1e-5)

    hs, wv = rand((T, h), dev, torch.float32), rand((V, h), dev, torch.float32, 0.3)
    tg = torch.randint(0, V, (T,), device=dev)
    lg = hs.double() @ wv.double().t()
    lref = (lg - torch.logsumexp(lg, -1, keepdim=True)).gather(-1, tg[:, None]).squeeze(-1)
    report("logprobs eager", rel_err(logprobs_eager(hs, wv, tg), lref), 1e-5)
    report("logprobs chunked-5", rel_err(make_logprobs_chunked(5)(hs, wv, tg), lref), 1e-5)

    # GRPO loss against a per-token loop written from verl's core_algos.py, plus its gradient.
    N = 53
    lp = -torch.rand(N, device=dev, dtype=torch.float64) * 3
    old = lp + (torch.rand(N, device=dev, dtype=torch.float64) - 0.5)
    refl = lp + (torch.rand(N, device=dev, dtype=torch.float64) - 0.5)
    adv = torch.randn(N, device=dev, dtype=torch.float64)
    mask = (torch.rand(N, device=dev) > 0.2).double()
    tot, cnt = 0.0, 0.0
    for t in range(N):
        if mask[t] == 0:
            continue
        r = math.exp(max(-20.0, min(20.0, float(lp[t] - old[t]))))
        a = float(adv[t])
        pg = max(-a * r, -a * min(max(r, 1 - CLIP), 1 + CLIP))
        xx = max(-20.0, min(20.0, float(refl[t] - lp[t])))
        kl = max(-10.0, min(10.0, math.exp(xx) - xx - 1))
        tot += pg + KL_COEF * kl
        cnt += 1
    got = grpo_loss_eager(lp, old, refl, adv, mask)
    report("grpo_loss eager", abs(float(got) - tot / cnt) / abs(tot / cnt), 1e-12)
    lpg = lp.clone().requires_grad_(True)
    (gr,) = torch.autograd.grad(grpo_loss_eager(lpg, old, refl, adv, mask), (lpg,))
    fd = torch.zeros(N, dtype=torch.float64, device=dev)
    for t in range(N):
        e = torch.zeros_like(lp)
        e[t] = 1e-6
        fd[t] = (grpo_loss_eager(lp + e, old, refl, adv, mask) -
                 grpo_loss_eager(lp - e, old, refl, adv, mask)) / 2e-6
    report("grpo_loss grad vs finite differences", rel_err(gr, fd), 1e-6)

    logits = rand((3, 50), dev, torch.float32, 4.0)
    gen = torch.Generator(device=dev)
    gen.manual_seed(seed)
    draws = torch.stack([sample_top_p(logits, 0.8, 0.5, gen) for _ in range(200)])
    pr = torch.softmax(logits / 0.8, -1)
    sp, si = torch.sort(pr, -1, descending=True)
    keep = (sp.cumsum(-1) - sp) <= 0.5
    allowed = [set(si[r][keep[r]].tolist()) for r in range(3)]
    bad = sum(int(draws[j, r]) not in allowed[r] for j in range(200) for r in range(3))
    report("sample_top_p draws inside the nucleus", float(bad), 0.5)

    if compile_ok:
        for label, f, args, tol in (
                ("rmsnorm compile", rmsnorm_eager, (x, w), 1e-5),
                ("swiglu compile", swiglu_eager, (g, u), 1e-5),
                ("logprobs compile", logprobs_eager, (hs, wv, tg), 1e-5),
                ("grpo_loss compile", grpo_loss_eager, (lp, old, refl, adv, mask), 1e-10)):
            try:
                report(label, rel_err(compiled(f)(*args), f(*args)), tol)
            except Exception as e:  # noqa: BLE001
                print(f"check {label:40s} not run: {type(e).__name__}: {e}"[:300])
    if liger:
        try:
            y = liger["rmsnorm"].apply(x, w, EPS, 0.0, "llama", False)
            report("rmsnorm liger", rel_err(y, ref), 1e-4)
            report("swiglu liger", rel_err(liger["swiglu"].apply(g, u), swiglu_eager(g, u)), 1e-4)
        except Exception as e:  # noqa: BLE001
            print(f"check liger not run: {type(e).__name__}: {e}"[:300])
    print(f"check: {fails} failure(s)")
    return fails


# ----------------------------------------------------------------------------- main


OPS = ["rmsnorm", "rope", "swiglu", "linear", "attention", "logprobs", "grpo_loss", "adamw",
       "sample", "decode", "policy", "logprob_loss", "optimizer", "grpo_step"]


def write_json_atomic(path: str, obj) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".torch-baselines-", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--shapes", default=None,
                    help="comma-separated Qwen2.5 sizes from " + ",".join(MODELS) +
                         " (default 0.5b,1.5b,7b; tiny with --quick)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, short timing (smoke run)")
    ap.add_argument("--out", default=None, help="JSON output path")
    ap.add_argument("--ops", default=",".join(OPS), help="subset of: " + ",".join(OPS))
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile variants")
    ap.add_argument("--compile-model", action="store_true",
                    help="also torch.compile the whole transformers model (slow to compile)")
    ap.add_argument("--no-liger", action="store_true", help="skip Liger kernels even if present")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for torch (default: torch's choice; 1 with --quick on a "
                         "CPU, where spinning threads on a shared machine distort tiny timings)")
    ap.add_argument("--budget-s", type=float, default=1e9,
                    help="stop starting new measurements after this many seconds")
    ap.add_argument("--check", action="store_true",
                    help="check every baseline's numerics against f64 references and exit")
    a = ap.parse_args(argv)
    if a.shapes is None:
        a.shapes = "tiny" if a.quick else "0.5b,1.5b,7b"
    shapes = [s.strip().lower() for s in a.shapes.split(",") if s.strip()]
    bad = [s for s in shapes if s not in MODELS]
    if bad or not shapes:
        ap.error(f"--shapes: unknown size(s) {bad}; expected a comma-separated list of "
                 f"{', '.join(MODELS)}")
    a.shapes = shapes
    ops = [o.strip() for o in a.ops.split(",") if o.strip()]
    bad = [o for o in ops if o not in OPS]
    if bad:
        ap.error(f"--ops: unknown op(s) {bad}; expected names from {', '.join(OPS)}")
    a.ops = set(ops)
    if not a.check and not a.out:
        ap.error("--out JSON is required (except with --check)")
    return a


def main(argv=None) -> int:
    a = parse_args(sys.argv[1:] if argv is None else argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("torch_baselines: --device cuda but torch sees no CUDA device "
              "(use --device cpu for a smoke run)", file=sys.stderr)
        return 2
    dev = torch.device(a.device)
    threads = a.threads if a.threads else (1 if a.quick and a.device == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    compile_ok = not a.no_compile
    for attr in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, attr):
            setattr(torch._dynamo.config, attr, 256)
    liger, liger_why = (None, "--no-liger given") if a.no_liger else liger_modules()
    if a.device != "cuda" and liger:
        liger, liger_why = None, "Liger kernels need a CUDA device"
    if a.check:
        return 1 if check(dev, compile_ok, liger) else 0

    plan = Plan(a.quick)
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    B = Bench(dev, plan, a.budget_s, compile_ok)
    B.sample_vocabs = {m: MODELS[m]["vocab"] for m in a.shapes}
    t_start = time.monotonic()
    if a.device == "cuda":
        props = torch.cuda.get_device_properties(dev)
        dev_name = props.name
        dev_info = {"sm_count": props.multi_processor_count, "l2_bytes": B.l2,
                    "memory_bytes": props.total_memory,
                    "capability": f"{props.major}.{props.minor}",
                    "cuda": torch.version.cuda}
    else:
        dev_name = f"CPU ({platform.processor() or platform.machine()}, "\
                   f"{os.cpu_count()} logical cores)"
        dev_info = {"threads": torch.get_num_threads()}
    print(f"torch_baselines: {dev_name}, torch {torch.__version__}, dtype "
          f"{str(dtype).replace('torch.', '')}, shapes {','.join(a.shapes)}", flush=True)
    try:
        import transformers
        tf_ver = transformers.__version__
    except Exception:  # noqa: BLE001
        tf_ver = None
    ceil = ceilings(B)
    for m in a.shapes:
        kernel_benches(B, m, MODELS[m], dtype, a.ops, liger)
    global_benches(B, dtype, a.ops)
    for m in a.shapes:
        model_benches(B, m, MODELS[m], dtype, a.ops, a.compile_model)
    if liger is None:
        B.skipped.append({"name": "*", "shape": {}, "variant": "liger",
                          "reason": liger_why})
    out = {
        "tool": "torch_baselines",
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": dev_name,
        "device_kind": a.device,
        "device_info": dev_info,
        "torch": torch.__version__,
        "transformers": tf_ver,
        "liger": None if liger is None else __import__("liger_kernel").__dict__.get(
            "__version__", "unknown"),
        "dtype": str(dtype).replace("torch.", ""),
        "quick": a.quick,
        "command": "python3 tools/torch_baselines.py " + shlex.join(
            sys.argv[1:] if argv is None else argv),
        "wall_s": round(time.monotonic() - t_start, 1),
        "ceilings": ceil,
        "results": B.results,
        "skipped": B.skipped,
    }
    write_json_atomic(a.out, out)
    print(f"torch_baselines: {len(B.results)} results, {len(B.skipped)} skipped, "
          f"{out['wall_s']} s -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
