//! Data-parallel GRPO step time with the gradient reduce-scatters on NCCL's own stream
//! (overlapping the backward, `NcclStream::Own`, the default) against the same steps with them
//! on the compute stream (`NcclStream::Compute`, `TOOLN1_NCCL_STREAM=compute`), on 1, 2, 4 and
//! 8 GPUs (as many as are visible; one GPU still runs a 1-rank communicator, which measures the
//! cost of the extra stream and events alone).
//!
//! Qwen2.5-0.5B's shape with random weights, one update of 8 prompts x 4 samples per step,
//! prompts of 128 and responses of 64 tokens, recomputation on. Each configuration runs one
//! warm-up step and then `TOOLN1_DP_STEPS` (default 3) timed steps; the wall time of a step is
//! the slowest rank's (every step ends with host collectives). One JSON line per configuration
//! goes to `$TOOLN1_DP_BENCH_JSONL` (default target/dp-overlap.jsonl): name `dp_grpo_step`,
//! shape {model, gpus, nccl_stream}, median_ms, steps. Without a CUDA device or NCCL it prints
//! why and exits 0. Not yet run on a GPU: no figures are recorded anywhere.

use std::time::Instant;

use tooln1::backend::cuda::{device_count, nccl_available, nccl_group_on, Cuda, NcclStream};
use tooln1::model::init::{random_params, tiny_config};
use tooln1::model::Model;
use tooln1::reward::{Reward, RewardOutput};
use tooln1::tokenizer::{Tokenizer, TINY_TOKENIZER_JSON};
use tooln1::train::config::{RunConfig, TrainConfig};
use tooln1::train::parallel::on_ranks;
use tooln1::train::runner::PromptItem;
use tooln1::train::{RankComm, TrainData, Trainer};

/// A reward that depends only on the response's length (any signal will do).
struct LengthReward;

impl Reward for LengthReward {
    fn score(&self, response: &str, _ground_truth: &serde_json::Value) -> RewardOutput {
        RewardOutput {
            reward: (response.len() % 7) as f32 / 7.0,
            format_ok: false,
            calls_ok: false,
            reason: "length".into(),
        }
    }
}

fn record(gpus: usize, stream: NcclStream, median_ms: f64, steps: usize, device: &str) {
    use std::io::Write;
    let path = std::env::var("TOOLN1_DP_BENCH_JSONL").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/target/dp-overlap.jsonl").to_string()
    });
    let line = serde_json::json!({
        "name": "dp_grpo_step",
        "shape": {"model": "0.5b", "gpus": gpus, "nccl_stream": format!("{stream:?}")},
        "median_ms": median_ms, "steps": steps, "device": device,
    });
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

/// Median wall milliseconds of `steps` GRPO steps on `gpus` ranks (after one warm-up step).
fn run(gpus: usize, stream: NcclStream, steps: usize) -> tooln1::Result<f64> {
    // Qwen2.5-0.5B: hidden 896, 24 layers, 14 heads over 2 KV heads, MLP 4864, vocab 151936.
    let mut cfg = tiny_config(896, 24, 14, 2, 4864, 151936, true);
    cfg.eos_token_id = Vec::new();
    let host = random_params(&cfg, 7);
    let devices = (0..gpus)
        .map(Cuda::with_device)
        .collect::<tooln1::Result<Vec<_>>>()?;
    let comms = nccl_group_on(&devices, stream)?;
    let ranks: Vec<(Cuda, RankComm<Cuda>)> = devices
        .into_iter()
        .zip(comms)
        .map(|(d, c)| (d, Box::new(c) as RankComm<Cuda>))
        .collect();
    let times = on_ranks(ranks, |_, (b, comm)| {
        let tok = Tokenizer::from_bytes(TINY_TOKENIZER_JSON, "tiny tokenizer")?;
        let prompts: Vec<PromptItem> = (0..8)
            .map(|i| PromptItem {
                id: format!("p{i}"),
                tokens: (0..128u32)
                    .map(|j| (i * 977 + j * 31) % 4000 + 10)
                    .collect(),
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
        tc.rollout.n = 4;
        tc.rollout.temperature = 1.0;
        tc.rollout.max_prompt_tokens = 128;
        tc.rollout.max_new_tokens = 64;
        tc.rollout.max_slots = 32;
        tc.grpo.prompts_per_step = 8;
        tc.grpo.mini_batch_prompts = 8;
        tc.grpo.ppo_epochs = 1;
        tc.grpo.recompute = true;
        let data = TrainData {
            tokenizer: tok,
            prompts,
            reward: Box::new(LengthReward),
        };
        let policy = Model::from_host(&b, cfg.clone(), &host)?;
        let reference = Model::from_host(&b, cfg.clone(), &host)?;
        let mut t = Trainer::new_in(b.clone(), policy, reference, data, tc, Some(comm))?;
        t.stop = Vec::new();
        t.quiet = true;
        t.step()?;
        let mut ms = Vec::with_capacity(steps);
        for _ in 0..steps {
            let start = Instant::now();
            t.step()?;
            ms.push(start.elapsed().as_secs_f64() * 1e3);
        }
        Ok(ms)
    })?;
    // Per step, the slowest rank; then the median over the steps.
    let mut per_step: Vec<f64> = (0..steps)
        .map(|k| times.iter().map(|r| r[k]).fold(0.0, f64::max))
        .collect();
    per_step.sort_by(f64::total_cmp);
    Ok(per_step[per_step.len() / 2])
}

fn main() {
    let visible = match device_count() {
        Ok(n) if n > 0 => n,
        Ok(_) | Err(_) => {
            println!("dp_overlap: skipped: no CUDA device");
            return;
        }
    };
    if !nccl_available() {
        println!("dp_overlap: skipped: no NCCL library (libnccl.so.2)");
        return;
    }
    let steps: usize = std::env::var("TOOLN1_DP_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(3);
    let device = Cuda::new()
        .map(|c| c.device())
        .unwrap_or_else(|_| "unknown".into());
    for gpus in [1usize, 2, 4, 8].into_iter().filter(|&g| g <= visible) {
        for stream in [NcclStream::Own, NcclStream::Compute] {
            match run(gpus, stream, steps) {
                Ok(ms) => {
                    println!("dp_grpo_step 0.5b gpus {gpus} nccl_stream {stream:?}: {ms:.1} ms");
                    record(gpus, stream, ms, steps, &device);
                }
                Err(e) => println!("dp_grpo_step gpus {gpus} nccl_stream {stream:?}: failed: {e}"),
            }
        }
    }
}
