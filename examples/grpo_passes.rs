//! Times the three training-side passes of one GRPO step (old logprobs, reference logprobs,
//! policy forward + backward) on the CPU backend with a random model, per sequence ("naive":
//! every sequence prompt + response in full, logits at every position) and in the shared-prompt
//! layout with response-only logits ("lean"), and prints both, their ratio and the token rows
//! each processes. One JSON line per layout goes to $TOOLN1_BENCH_JSONL when set.
//!
//!   cargo run --release --example grpo_passes -- [KEY=VALUE ...]
//!
//! Keys (defaults: a Tool-N1-like shape, one prompt of ~1000 tokens with n = 5 responses of
//! ~150 per group): hidden=256 layers=4 heads=4 kv=2 inter=1024 vocab=32000 groups=3 n=5
//! prompt=1000 resp=150 (each response 0.8..1.2 x resp) runs=3 threads=0 (0 = default)
//! recompute=1 budget=16384 seed=1.

use std::time::Instant;

use tooln1::backend::cpu::{self, Cpu};
use tooln1::backend::{GrpoLossCfg, KlKind, LossAgg};
use tooln1::model::init::tiny_config;
use tooln1::model::Model;
use tooln1::train::grpo::{self, Layout, TrainSeq};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let mut kv: std::collections::BTreeMap<String, usize> = [
        ("hidden", 256),
        ("layers", 4),
        ("heads", 4),
        ("kv", 2),
        ("inter", 1024),
        ("vocab", 32000),
        ("groups", 3),
        ("n", 5),
        ("prompt", 1000),
        ("resp", 150),
        ("runs", 3),
        ("threads", 0),
        ("recompute", 1),
        ("budget", 16384),
        ("seed", 1),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    for a in std::env::args().skip(1) {
        let (k, v) = a
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("argument {a:?}: expected KEY=VALUE"))?;
        let keys: Vec<String> = kv.keys().cloned().collect();
        let slot = kv
            .get_mut(k)
            .ok_or_else(|| anyhow::anyhow!("unknown key {k:?}; keys: {keys:?}"))?;
        *slot = v
            .parse()
            .map_err(|_| anyhow::anyhow!("{k}={v:?}: expected a non-negative integer"))?;
    }
    let g = |k: &str| kv[k];
    anyhow::ensure!(g("runs") >= 1, "runs must be at least 1");
    anyhow::ensure!(
        g("prompt") >= 1 && g("resp") >= 2,
        "prompt >= 1 and resp >= 2"
    );
    cpu::set_num_threads(g("threads"));
    let b = Cpu;
    let cfg = tiny_config(
        g("hidden"),
        g("layers"),
        g("heads"),
        g("kv"),
        g("inter"),
        g("vocab"),
        false,
    );
    let policy = Model::random(&b, cfg.clone(), g("seed") as u64)?;
    let reference = Model::random(&b, cfg, g("seed") as u64 + 1)?;

    // Random groups: one prompt and n responses each (splitmix-style counter stream).
    let mut state = g("seed") as u64 ^ 0x9e37_79b9_7f4a_7c15;
    let mut next = move |m: usize| -> usize {
        state = cpu::math::splitmix64(state);
        (state % m as u64) as usize
    };
    let mut seqs = Vec::new();
    for _ in 0..g("groups") {
        let prompt: Vec<u32> = (0..g("prompt")).map(|_| next(g("vocab")) as u32).collect();
        for _ in 0..g("n") {
            let lo = g("resp") * 4 / 5;
            let len = (lo + next(g("resp") * 2 / 5 + 1)).max(1);
            let mut tokens = prompt.clone();
            tokens.extend((0..len).map(|_| next(g("vocab")) as u32));
            seqs.push(TrainSeq {
                tokens,
                prompt_len: prompt.len(),
                adv: next(2001) as f32 / 1000.0 - 1.0,
            });
        }
    }
    let loss_cfg = GrpoLossCfg {
        clip_low: 0.2,
        clip_high: 0.2,
        kl_coef: 1e-3,
        kl_kind: KlKind::K3,
        agg: LossAgg::TokenMean,
        norm_len: 1.0,
        loss_scale_div: 1.0,
    };
    let inv_t = 1.0 / 0.7;
    let (budget, recompute) = (g("budget"), g("recompute") != 0);
    println!(
        "model: hidden {} layers {} heads {}/{} inter {} vocab {}; {} groups x n = {}, prompt {}, \
         responses ~{}; {} threads, recompute {recompute}, budget {budget}",
        g("hidden"),
        g("layers"),
        g("heads"),
        g("kv"),
        g("inter"),
        g("vocab"),
        g("groups"),
        g("n"),
        g("prompt"),
        g("resp"),
        cpu::num_threads()
    );
    let mut step_ms = Vec::new();
    for (name, layout) in [("naive", Layout::PerSequence), ("lean", Layout::Shared)] {
        let (rows, logit_rows) = grpo::pass_rows(&seqs, layout);
        let (mut t_old, mut t_ref, mut t_pol) = (Vec::new(), Vec::new(), Vec::new());
        let mut loss = 0.0;
        for _ in 0..g("runs") {
            let t = Instant::now();
            let old = grpo::response_logprobs(&b, &policy, &seqs, budget, inv_t, layout)?;
            t_old.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            let rf = grpo::response_logprobs(&b, &reference, &seqs, budget, inv_t, layout)?;
            t_ref.push(t.elapsed().as_secs_f64());
            let mut grads = policy.zero_grads(&b)?;
            let t = Instant::now();
            let s = grpo::accumulate_responses(
                &b,
                &policy,
                grpo::Scored {
                    seqs: &seqs,
                    old: &old,
                    reference: &rf,
                },
                &grpo::PassCfg {
                    loss: loss_cfg,
                    entropy_coef: 0.0,
                    budget,
                    recompute,
                    inv_t,
                    layout,
                },
                &mut grads,
            )?;
            t_pol.push(t.elapsed().as_secs_f64());
            loss = s.loss;
        }
        let (o, r, p) = (median(t_old), median(t_ref), median(t_pol));
        let total = o + r + p;
        step_ms.push(total * 1e3);
        println!(
            "{name:>5}: old {:8.1} ms  ref {:8.1} ms  policy fwd+bwd {:8.1} ms  total {:8.1} ms  \
             | token rows/pass {rows}, logit rows/pass {logit_rows}, loss {loss:.6}",
            o * 1e3,
            r * 1e3,
            p * 1e3,
            total * 1e3
        );
        if let Ok(path) = std::env::var("TOOLN1_BENCH_JSONL") {
            use std::io::Write;
            let line = serde_json::json!({
                "bench": "grpo_passes",
                "layout": name,
                "config": kv,
                "threads": cpu::num_threads(),
                "old_ms": o * 1e3,
                "ref_ms": r * 1e3,
                "policy_ms": p * 1e3,
                "total_ms": total * 1e3,
                "token_rows_per_pass": rows,
                "logit_rows_per_pass": logit_rows,
            });
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)?;
            writeln!(f, "{line}")?;
        }
    }
    println!("naive / lean: {:.2}x", step_ms[0] / step_ms[1]);
    Ok(())
}
