//! Whole-step criterion benches of the GRPO engine at Qwen2.5 shapes with random weights:
//! rollout decoding (`decode`), a policy forward + backward (`policy_fwd_bwd`), one AdamW update
//! over every parameter (`optimizer_step`) and one whole `Trainer::step` (`grpo_step`).
//!
//! The CUDA group (0.5b, 1.5b, 7b shapes, timed with CUDA events) runs where a device opens;
//! a measurement whose memory estimate (src/model/memory.rs) does not fit the device is
//! skipped with the reason printed. The CPU group (a tiny model named "tiny", wall-clock
//! timing, small batches) runs everywhere. Every measurement appends one JSON line to
//! $TOOLN1_BENCH_JSONL (default target/tooln1-bench.jsonl), the contract of
//! tools/bench_report.py.
//!
//! FLOP counts follow tools/torch_baselines.py: `matmul_params` = every weight matrix a token
//! passes through (per layer q, k, v, o and the three MLP projections, plus the lm_head; norms,
//! biases and the embedding lookup are not matmuls), a forward costs 2 * matmul_params per
//! token plus 2 * layers * seq * heads * head_dim per token for causal attention, and a
//! forward + backward three times that (the "6 * params * tokens" rule plus attention).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode};
use tooln1::backend::cpu::Cpu;
use tooln1::backend::cuda::Cuda;
use tooln1::backend::Backend;
use tooln1::model::init::{random_params, tiny_config};
use tooln1::model::memory::{human_bytes, MemoryEstimate, MemoryInputs};
use tooln1::model::{Model, PackedBatch, Qwen2Config};
use tooln1::reward::{Reward, RewardOutput};
use tooln1::tokenizer::{Tokenizer, TINY_TOKENIZER_JSON};
use tooln1::train::config::{OptimConfig, RunConfig, TrainConfig};
use tooln1::train::optim::AdamW;
use tooln1::train::rollout::{self, SamplingParams};
use tooln1::train::runner::{PromptItem, Trainer};

/// A model shape: Qwen2.5 sizes (from the models' config.json files) or the tiny CPU model.
struct Shape {
    name: &'static str,
    hidden: usize,
    inter: usize,
    layers: usize,
    heads: usize,
    kv: usize,
    hd: usize,
    vocab: usize,
    tied: bool,
}

const QWEN25: &[Shape] = &[
    Shape {
        name: "0.5b",
        hidden: 896,
        inter: 4864,
        layers: 24,
        heads: 14,
        kv: 2,
        hd: 64,
        vocab: 151936,
        tied: true,
    },
    Shape {
        name: "1.5b",
        hidden: 1536,
        inter: 8960,
        layers: 28,
        heads: 12,
        kv: 2,
        hd: 128,
        vocab: 151936,
        tied: true,
    },
    Shape {
        name: "7b",
        hidden: 3584,
        inter: 18944,
        layers: 28,
        heads: 28,
        kv: 4,
        hd: 128,
        vocab: 152064,
        tied: false,
    },
];

const TINY: Shape = Shape {
    name: "tiny",
    hidden: 64,
    inter: 96,
    layers: 2,
    heads: 4,
    kv: 2,
    hd: 16,
    vocab: 512,
    tied: false,
};

/// Batch sizes of one group.
struct Sizes {
    decode_batches: &'static [usize],
    prompt: usize,
    new_tokens: usize,
    train_batch: usize,
    train_seq: usize,
    step_prompts: usize,
    step_group: usize,
    step_prompt: usize,
    step_response: usize,
}

/// The defaults of tools/torch_baselines.py.
const GPU_SIZES: Sizes = Sizes {
    decode_batches: &[1, 64, 256],
    prompt: 128,
    new_tokens: 128,
    train_batch: 4,
    train_seq: 1024,
    step_prompts: 4,
    step_group: 8,
    step_prompt: 256,
    step_response: 256,
};

/// Small enough for the whole CPU group to finish in about a minute on two cores.
const CPU_SIZES: Sizes = Sizes {
    decode_batches: &[1, 8],
    prompt: 16,
    new_tokens: 16,
    train_batch: 2,
    train_seq: 64,
    step_prompts: 2,
    step_group: 4,
    step_prompt: 16,
    step_response: 16,
};

fn config(s: &Shape) -> Qwen2Config {
    let mut c = tiny_config(s.hidden, s.layers, s.heads, s.kv, s.inter, s.vocab, s.tied);
    c.head_dim = s.hd;
    c.rope_theta = 1e6;
    c.max_position_embeddings = 32768;
    c
}

fn matmul_params(c: &Qwen2Config) -> f64 {
    let (h, i) = (c.hidden_size as f64, c.intermediate_size as f64);
    let qd = (c.num_attention_heads * c.head_dim) as f64;
    let kvd = (c.num_key_value_heads * c.head_dim) as f64;
    let per_layer = h * qd + 2.0 * h * kvd + qd * h + 3.0 * h * i;
    c.num_hidden_layers as f64 * per_layer + c.vocab_size as f64 * h
}

fn fwd_flops(c: &Qwen2Config, tokens: usize, seq: usize) -> f64 {
    let attn = (c.num_hidden_layers * seq * c.num_attention_heads * c.head_dim) as f64;
    2.0 * (matmul_params(c) + attn) * tokens as f64
}

fn train_flops(c: &Qwen2Config, tokens: usize, seq: usize) -> f64 {
    3.0 * fwd_flops(c, tokens, seq)
}

/// xorshift64 stream (benches need varied, not statistically perfect, inputs).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn tokens(&mut self, n: usize, vocab: usize) -> Vec<u32> {
        (0..n)
            .map(|_| (self.next() % vocab as u64) as u32)
            .collect()
    }
    fn floats(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| ((self.next() >> 40) as f32 / 16777216.0 * 2.0 - 1.0) * scale)
            .collect()
    }
}

/// A reward of uniform random values in [0, 1), so every group has non-zero advantages.
struct RandomReward(AtomicU64);

impl Reward for RandomReward {
    fn score(&self, _response: &str, _ground_truth: &serde_json::Value) -> RewardOutput {
        let x = self
            .0
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
            .wrapping_mul(0xD1B5_4A32_D192_ED03);
        RewardOutput {
            reward: (x >> 40) as f32 / 16777216.0,
            format_ok: false,
            calls_ok: false,
            reason: "random".into(),
        }
    }
}

/// One measurement's row of the contract.
struct Row<'a> {
    name: &'a str,
    shape: serde_json::Value,
    flops: f64,
    bytes: f64,
    tokens: usize,
    note: String,
}

/// Appends one measurement to $TOOLN1_BENCH_JSONL (default target/tooln1-bench.jsonl).
fn record(r: &Row, median_ms: f64, crit: &str, device: &str) {
    use std::io::Write;
    let path = std::env::var("TOOLN1_BENCH_JSONL").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/target/tooln1-bench.jsonl").to_string()
    });
    let mut line = serde_json::json!({
        "name": r.name, "shape": r.shape, "median_ms": median_ms, "flops": r.flops,
        "bytes": r.bytes, "tokens": r.tokens, "criterion": crit, "device": device,
    });
    if !r.note.is_empty() {
        line["note"] = serde_json::Value::String(r.note.clone());
    }
    match std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
    {
        Ok(mut f) => {
            let _ = writeln!(f, "{line}");
        }
        Err(e) => eprintln!("{path}: {e}"),
    }
}

/// How calls are timed: CUDA events on the device's stream, or the wall clock (CPU backend).
#[derive(Clone, Copy)]
enum Clock<'a> {
    Cuda(&'a Cuda),
    Wall,
}

/// Dense bf16 tensor-core peak of known devices, for MFU.
fn peak_flops(device: &str) -> Option<f64> {
    if device.contains("H100") || device.contains("H200") {
        Some(989e12)
    } else if device.contains("A100") {
        Some(312e12)
    } else {
        None
    }
}

/// Times `f` (one call = one measured unit of work) over the iterations criterion asks for,
/// with a flat sampling plan (these calls take up to seconds), prints tokens/s and FLOP rate
/// and records the median per-call time. A call that fails stops the measurement and is
/// reported instead of recorded.
fn timed(
    c: &mut Criterion,
    clock: Clock,
    device: &str,
    group: &str,
    id: &str,
    row: Row,
    mut f: impl FnMut() -> tooln1::Result<()>,
) {
    let mut g = c.benchmark_group(group);
    g.sampling_mode(SamplingMode::Flat);
    g.sample_size(10);
    g.warm_up_time(Duration::from_millis(1));
    g.measurement_time(Duration::from_millis(10));
    let mut per_call: Vec<f64> = Vec::new();
    let mut failed: Option<tooln1::Error> = None;
    let mut warmed = false;
    g.bench_function(id, |b| {
        b.iter_custom(|iters| {
            if failed.is_some() {
                return Duration::from_nanos(1);
            }
            let run = |f: &mut dyn FnMut() -> tooln1::Result<()>| -> tooln1::Result<f64> {
                match clock {
                    Clock::Cuda(cuda) => {
                        let t = cuda.timer()?;
                        t.start()?;
                        for _ in 0..iters {
                            f()?;
                        }
                        Ok(t.stop_ms()? as f64)
                    }
                    Clock::Wall => {
                        let t = Instant::now();
                        for _ in 0..iters {
                            f()?;
                        }
                        Ok(t.elapsed().as_secs_f64() * 1e3)
                    }
                }
            };
            match run(&mut f) {
                Ok(ms) => {
                    // The first routine call is criterion's warm-up (first-use compilation and
                    // allocation); it is timed for criterion but left out of the median.
                    if warmed {
                        per_call.push(ms / iters as f64);
                    }
                    warmed = true;
                    Duration::from_secs_f64(ms / 1e3)
                }
                Err(e) => {
                    failed = Some(e);
                    Duration::from_nanos(1)
                }
            }
        })
    });
    g.finish();
    if let Some(e) = failed {
        println!("{group}/{id}: failed: {e}");
        return;
    }
    if per_call.is_empty() {
        return;
    }
    per_call.sort_by(|a, b| a.total_cmp(b));
    let med = per_call[per_call.len() / 2];
    let s = med / 1e3;
    let mut row = row;
    let mut line = format!(
        "{group}/{id}: {med:.3} ms, {:.1} GFLOP/s",
        row.flops / s / 1e9
    );
    if row.tokens > 0 {
        line.push_str(&format!(", {:.0} tokens/s", row.tokens as f64 / s));
    }
    if row.name == "policy_fwd_bwd" {
        if let Some(peak) = peak_flops(device) {
            let mfu = row.flops / s / peak;
            line.push_str(&format!(", MFU {:.1}%", mfu * 100.0));
            let sep = if row.note.is_empty() { "" } else { "; " };
            row.note = format!(
                "{}{sep}MFU {:.1}% of {peak:.3e} FLOP/s",
                row.note,
                mfu * 100.0
            );
        }
    }
    println!("{line}");
    record(&row, med, &format!("{group}/{id}"), device);
}

/// Which measurements fit: device memory each needs, from the GRPO memory estimate.
struct Fit {
    decode: Vec<u64>,
    policy: u64,
    optimizer: u64,
    grpo_step: u64,
}

fn memory_needs(cfg: &Qwen2Config, z: &Sizes) -> Fit {
    let est = |tokens: usize, seqs: usize, len: usize| {
        MemoryEstimate::new(
            cfg,
            MemoryInputs {
                micro_batch_tokens: tokens as u64,
                rollout_seqs: seqs as u64,
                max_len: len as u64,
                vocab_tile_rows: 1024,
                offload_reference: false,
            },
        )
    };
    let decode = z
        .decode_batches
        .iter()
        .map(|&bs| {
            let e = est(1, bs, z.prompt + z.new_tokens);
            e.weights + e.kv_cache + e.rollout_logits
        })
        .collect();
    let e = est(z.train_batch * z.train_seq, 1, 1);
    let policy = e.weights + e.grads + e.activations_recompute + e.vocab_buffers;
    let optimizer = e.weights + e.grads + e.adam + e.master;
    let seqs = z.step_prompts * z.step_group;
    let len = z.step_prompt + z.step_response;
    let grpo_step = est(seqs * len, seqs, len).peak(true);
    Fit {
        decode,
        policy,
        optimizer,
        grpo_step,
    }
}

/// Every measurement of one model shape on backend `b`. `budget` is the device memory a
/// measurement may need (None: no limit).
#[allow(clippy::too_many_arguments)]
fn model_benches<B: Backend + Clone>(
    c: &mut Criterion,
    b: &B,
    clock: Clock,
    device: &str,
    group: &str,
    shape: &Shape,
    z: &Sizes,
    budget: Option<u64>,
    trim: &dyn Fn(),
) {
    let cfg = config(shape);
    let md = shape.name;
    let fit = memory_needs(&cfg, z);
    let fits = |what: &str, need: u64| match budget {
        Some(have) if need > have => {
            tooln1::tooln1_skip!(
                "{group}/{what}: skipped: needs about {} of device memory, the device has {}",
                human_bytes(need),
                human_bytes(have)
            );
            false
        }
        _ => true,
    };
    if !fit
        .decode
        .iter()
        .any(|&n| budget.is_none_or(|have| n <= have))
    {
        tooln1::tooln1_skip!("{group}: skipped: not even the model's weights fit the device");
        return;
    }
    let host = random_params(&cfg, 7);
    let mut model = match Model::from_host(b, cfg.clone(), &host) {
        Ok(m) => m,
        Err(e) => {
            println!("{group}: cannot build the model: {e}");
            return;
        }
    };
    let mut rng = Rng(0x2545_F491_4F6C_DD1D ^ shape.hidden as u64);
    let n_params: usize = model.layout.specs.iter().map(|s| s.numel()).sum();
    // Weight storage: bf16 on the CUDA backend, f32 on the CPU one.
    let wbytes = (n_params
        * if matches!(clock, Clock::Cuda(_)) {
            2
        } else {
            4
        }) as f64;

    // decode: prefill + sampled decode of new_tokens per sequence (no stop tokens).
    for (&bs, &need) in z.decode_batches.iter().zip(&fit.decode) {
        if !fits(&format!("decode_b{bs}"), need) {
            continue;
        }
        let prompts: Vec<Vec<u32>> = (0..bs)
            .map(|_| rng.tokens(z.prompt, cfg.vocab_size))
            .collect();
        let sp = SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            max_new_tokens: z.new_tokens,
            stop: Vec::new(),
            max_slots: bs,
        };
        let mut offset = 0u64;
        // "decode": each step replayed as the CUDA graph of its batch-size bucket (the
        // default); "decode_plain": the same rollout with plain launches
        // (`rollout.cuda_graphs = false`). On the CPU both run plainly.
        for (name, plain_decode) in [("decode", false), ("decode_plain", true)] {
            let row = Row {
                name,
                shape: serde_json::json!({"model": md, "batch": bs, "prompt": z.prompt,
                                      "new_tokens": z.new_tokens}),
                flops: fwd_flops(&cfg, bs * (z.prompt + z.new_tokens), z.prompt),
                bytes: z.new_tokens as f64 * wbytes,
                tokens: bs * z.new_tokens,
                note: "tokens = new tokens; time includes the prompt's prefill".into(),
            };
            let sched = rollout::Schedule {
                plain_decode,
                ..rollout::Schedule::default()
            };
            timed(
                c,
                clock,
                device,
                group,
                &format!("{name}_b{bs}"),
                row,
                || {
                    let stream = rollout::Stream::new(11, offset);
                    let gens =
                        rollout::generate_with(b, &model, &prompts, 1, &sp, stream, &sched)?.0;
                    offset += rollout::stream_len(bs, 1, z.new_tokens);
                    let got: usize = gens.iter().map(|g| g.tokens.len()).sum();
                    tooln1::ensure!(
                        got == bs * z.new_tokens,
                        "decode generated {got} tokens, expected {}",
                        bs * z.new_tokens
                    );
                    Ok(())
                },
            );
        }
        trim();
    }

    // policy_fwd_bwd: forward_train (recompute on) + backward from a random dL/dlogp.
    if fits("policy_fwd_bwd", fit.policy) {
        let mut run = || -> tooln1::Result<()> {
            let seqs: Vec<Vec<u32>> = (0..z.train_batch)
                .map(|_| rng.tokens(z.train_seq + 1, cfg.vocab_size))
                .collect();
            let batch = PackedBatch::from_sequences(&seqs)?;
            let n = batch.n_tok();
            let db = model.upload_batch(b, &batch)?;
            let dlogp = b.upload_f32(&rng.floats(n, 1.0 / n as f32))?;
            let mut grads = model.zero_grads(b)?;
            let row = Row {
                name: "policy_fwd_bwd",
                shape: serde_json::json!({"model": md, "batch": z.train_batch,
                                          "seq": z.train_seq}),
                flops: train_flops(&cfg, n, z.train_seq),
                bytes: 3.0 * wbytes,
                tokens: n,
                note: String::new(),
            };
            timed(c, clock, device, group, "policy_fwd_bwd", row, || {
                let tape = model.forward_train(b, &db, false, true)?;
                model.backward(b, &db, tape, &dlogp, &mut grads)
            });
            Ok(())
        };
        if let Err(e) = run() {
            println!("{group}/policy_fwd_bwd: failed to set up: {e}");
        }
        trim();
    }

    // optimizer_step: global grad norm + clip + AdamW over every parameter.
    if fits("optimizer_step", fit.optimizer) {
        let mut run = || -> tooln1::Result<()> {
            let grads = model
                .layout
                .specs
                .iter()
                .map(|s| b.upload_f32(&rng.floats(s.numel(), 1e-3)))
                .collect::<tooln1::Result<Vec<_>>>()?;
            let mut opt = AdamW::new(b, &model, OptimConfig::default())?;
            let n = n_params;
            let master = if b.needs_master() { 8.0 } else { 0.0 };
            let row = Row {
                name: "optimizer_step",
                shape: serde_json::json!({"model": md}),
                flops: 16.0 * n as f64,
                // params r/w, grads read twice (norm, update), m and v r/w, master r/w.
                bytes: n as f64 * (wbytes / n as f64 * 2.0 + 8.0 + 16.0 + master),
                tokens: 0,
                note: format!("{n} parameters"),
            };
            timed(c, clock, device, group, "optimizer_step", row, || {
                opt.step(b, &mut model, &grads, 1_000_000).map(|_| ())
            });
            Ok(())
        };
        if let Err(e) = run() {
            println!("{group}/optimizer_step: failed to set up: {e}");
        }
        trim();
    }

    // host_optimizer_step: the same update with `memory.optimizer = "host"` (state in
    // Backend::host_f32 memory), pipelined over the parameter groups and synchronous, timed
    // by the wall clock (the update runs on the host).
    if fits("host_optimizer_step", fit.optimizer) {
        let mut run = || -> tooln1::Result<()> {
            let grads = model
                .layout
                .specs
                .iter()
                .map(|s| b.upload_f32(&rng.floats(s.numel(), 1e-3)))
                .collect::<tooln1::Result<Vec<_>>>()?;
            let n = n_params;
            for (schedule, pipelined) in [("pipelined", true), ("synchronous", false)] {
                let mut opt = AdamW::placed(b, &model, OptimConfig::default(), true)?;
                if let Some(h) = opt.host.as_mut() {
                    h.pipelined = pipelined;
                }
                let pinned = opt.host.as_ref().is_some_and(|h| h.m[0].pinned());
                let row = Row {
                    name: "host_optimizer_step",
                    shape: serde_json::json!({"model": md, "schedule": schedule}),
                    flops: 16.0 * n as f64,
                    // gradient download (f32) and weight upload (bf16 or f32) over the link,
                    // host m, v, master r/w.
                    bytes: n as f64 * (4.0 + wbytes / n as f64 + 24.0),
                    tokens: 0,
                    note: format!(
                        "{n} parameters, {schedule}, {} host memory",
                        if pinned { "page-locked" } else { "pageable" }
                    ),
                };
                let id = format!("host_optimizer_step_{schedule}");
                timed(c, Clock::Wall, device, group, &id, row, || {
                    opt.step(b, &mut model, &grads, 1_000_000).map(|_| ())
                });
            }
            Ok(())
        };
        if let Err(e) = run() {
            println!("{group}/host_optimizer_step: failed to set up: {e}");
        }
        trim();
    }

    // grpo_step: one Trainer::step on random prompts with a random reward.
    if fits("grpo_step", fit.grpo_step) {
        let mut run = || -> tooln1::Result<()> {
            let reference = Model::from_host(b, cfg.clone(), &host)?;
            let policy = Model::from_host(b, cfg.clone(), &host)?;
            let tok = Tokenizer::from_bytes(TINY_TOKENIZER_JSON, "tiny tokenizer")?;
            let prompts: Vec<PromptItem> = (0..z.step_prompts)
                .map(|i| PromptItem {
                    id: format!("p{i}"),
                    tokens: rng.tokens(z.step_prompt, cfg.vocab_size),
                    ground_truth: serde_json::Value::Null,
                })
                .collect();
            let mut tc = TrainConfig {
                run: RunConfig {
                    steps: 1_000_000,
                    ..RunConfig::default()
                },
                ..TrainConfig::default()
            };
            tc.rollout.n = z.step_group;
            tc.rollout.temperature = 1.0;
            tc.rollout.top_p = 1.0;
            tc.rollout.top_k = 0;
            tc.rollout.max_prompt_tokens = z.step_prompt;
            tc.rollout.max_new_tokens = z.step_response;
            tc.rollout.max_slots = z.step_prompts * z.step_group;
            tc.grpo.prompts_per_step = z.step_prompts;
            tc.grpo.mini_batch_prompts = z.step_prompts;
            tc.grpo.ppo_epochs = 1;
            tc.grpo.recompute = true;
            let reward = Box::new(RandomReward(AtomicU64::new(rng.next())));
            let mut t = Trainer::new(b.clone(), policy, reference, tok, prompts, reward, tc)?;
            // No stop tokens: every response runs to max_new_tokens, as the baseline's
            // min_new_tokens = max_new_tokens.
            t.stop = Vec::new();
            t.quiet = true;
            let (np, g, pl, rl) = (z.step_prompts, z.step_group, z.step_prompt, z.step_response);
            let seqs = np * g;
            let row = Row {
                name: "grpo_step",
                shape: serde_json::json!({"model": md, "prompts": np, "group": g,
                                          "prompt_len": pl, "response_len": rl}),
                flops: fwd_flops(&cfg, seqs * (pl + rl), pl)
                    + 2.0 * fwd_flops(&cfg, seqs * (pl + rl), pl + rl)
                    + train_flops(&cfg, seqs * (pl + rl), pl + rl),
                bytes: 0.0,
                tokens: seqs * (pl + rl),
                note: format!(
                    "one update of {seqs} sequences, micro-batch {} tokens, recompute on",
                    t.cfg.grpo.micro_batch_tokens
                ),
            };
            timed(c, clock, device, group, "grpo_step", row, || {
                let m = t.step()?;
                tooln1::ensure!(
                    m.response_tokens == seqs * rl,
                    "grpo_step generated {} response tokens, expected {}",
                    m.response_tokens,
                    seqs * rl
                );
                Ok(())
            });
            Ok(())
        };
        if let Err(e) = run() {
            println!("{group}/grpo_step: failed to set up: {e}");
        }
        trim();
    }
}

fn cuda_benches(c: &mut Criterion) {
    let cuda = match Cuda::new() {
        Ok(x) => x,
        Err(e) => {
            tooln1::tooln1_skip!("skipped: no CUDA device ({e}); only the CPU group runs");
            return;
        }
    };
    let device = cuda.device();
    println!("device: {device}");
    // Leave some room for the CUDA context, cuBLAS workspaces and allocator slack.
    let budget = tooln1::backend::select::cuda_memory().map(|(_, total)| total / 100 * 92);
    let trim = || {
        if let Err(e) = cuda.trim() {
            eprintln!("trim: {e}");
        }
    };
    for shape in QWEN25 {
        let group = format!("step-cuda-{}", shape.name);
        model_benches(
            c,
            &cuda,
            Clock::Cuda(&cuda),
            &device,
            &group,
            shape,
            &GPU_SIZES,
            budget,
            &trim,
        );
    }
}

fn cpu_benches(c: &mut Criterion) {
    model_benches(
        c,
        &Cpu,
        Clock::Wall,
        "cpu",
        "step-cpu-tiny",
        &TINY,
        &CPU_SIZES,
        None,
        &|| {},
    );
}

criterion_group!(benches, cpu_benches, cuda_benches);
criterion_main!(benches);
