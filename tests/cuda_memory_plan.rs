//! The memory planner's device estimate against the peak device bytes the virtual GPU measures
//! (`vgpuMemStats`: bytes taken from the driver, which with the caching pool includes cached
//! blocks) for one SFT step and one GRPO step of small random models of two shapes under the
//! placements of the planner: everything on the device, the optimizer state on the host, the
//! gradients on the host and, for GRPO, the reference streamed from the host (alone and with
//! the optimizer on the host). Each case prints the estimate, the measured peak, their ratio
//! and the pool's own figures at its peak; the test checks the estimate is within 10% of the
//! measured peak either way with the default caching pool, and with exact-size buffers
//! (`TOOLN1_CUDA_POOL=exact`, which the size classes overcount) that it falls short by at most
//! 10%. On a real GPU (no `vgpuMemStats`) the test says so and checks
//! nothing. `TOOLN1_TEST_SEED` replays the data.

mod common;

use common::train::LikesE;
use tooln1::backend::cuda::Cuda;
use tooln1::model::init;
use tooln1::model::plan::{plan, Budget, Caps, Place, Placement, RunShape};
use tooln1::model::{Model, Qwen2Config};
use tooln1::train::config::{RunConfig, SftConfig};
use tooln1::train::sft::{SftItem, SftTrainer};
use tooln1::train::{PromptItem, TrainConfig, Trainer};

type Stats = unsafe extern "C" fn(*mut usize, *mut usize);
type Reset = unsafe extern "C" fn();

/// The virtual GPU's device-memory counters.
struct Counters {
    _lib: libloading::Library,
    stats: Stats,
    reset: Reset,
}

impl Counters {
    fn open() -> Option<Counters> {
        let lib = unsafe { libloading::Library::new("libcuda.so") }.ok()?;
        let (stats, reset) = unsafe {
            let s = *lib.get::<Stats>(b"vgpuMemStats\0").ok()?;
            let r = *lib.get::<Reset>(b"vgpuResetPeak\0").ok()?;
            (s, r)
        };
        Some(Counters {
            _lib: lib,
            stats,
            reset,
        })
    }

    /// Peak device bytes above the bytes in use before `run`, over `run`.
    fn peak_of(&self, c: &Cuda, run: impl FnOnce()) -> u64 {
        c.trim().unwrap();
        let (mut cur, mut peak) = (0usize, 0usize);
        unsafe { (self.stats)(&mut cur, &mut peak) };
        unsafe { (self.reset)() };
        c.reset_pool_peak();
        run();
        let cur0 = cur as u64;
        unsafe { (self.stats)(&mut cur, &mut peak) };
        (peak as u64).saturating_sub(cur0)
    }
}

fn lcg(r: &mut u64) -> u64 {
    *r = r
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    *r >> 33
}

fn placement(optimizer: Place, grads: Place, reference: Place) -> Placement {
    Placement {
        optimizer,
        grads,
        reference,
    }
}

fn estimate(cfg: &Qwen2Config, shape: &RunShape, choice: &Placement) -> u64 {
    let budget = Budget {
        device_free: 1 << 40,
        host_available: None,
    };
    let p = plan(cfg, shape, &budget, choice, &Caps::ENGINE).unwrap();
    assert_eq!(
        p.micro_batch_tokens, shape.micro_batch_tokens,
        "the plan must keep the configured micro-batch"
    );
    p.device_peak()
}

#[test]
fn planner_estimate_against_the_measured_peak() {
    use Place::{Device as D, Host as H};
    let Some(c) = common::gpu() else { return };
    let Some(counters) = Counters::open() else {
        eprintln!("not the virtual GPU: no device memory counters to check against");
        return;
    };
    let mut r = common::seed("cuda_memory_plan");
    let mut report = Vec::new();
    for (k, (hidden, layers, inter, vocab, seq)) in
        [(256, 2, 512, 2048, 64), (128, 3, 384, 3072, 96)]
            .into_iter()
            .enumerate()
    {
        let mut cfg = init::tiny_config(hidden, layers, hidden / 64, 1, inter, vocab, false);
        // A stop id no prompt holds; a response reaching it early only shortens the step.
        cfg.eos_token_id = vec![vocab as u32 - 1];
        let host = init::random_params(&cfg, 3);
        let ids = |r: &mut u64, n: usize| -> Vec<u32> {
            (0..n)
                .map(|_| (lcg(r) % (vocab as u64 - 2)) as u32)
                .collect()
        };
        let shape = format!("hidden {hidden} layers {layers} vocab {vocab}");

        // SFT: one step of two sequences in one micro-batch.
        let items: Vec<SftItem> = (0..2)
            .map(|_| SftItem {
                tokens: ids(&mut r, seq),
                prompt_len: 4,
            })
            .collect();
        // Each placement once over the two shapes and the two kinds of step (every case is a
        // whole run on the virtual GPU: a few seconds each).
        let sft_choices = if k == 0 {
            [placement(D, D, D), placement(H, D, D)].to_vec()
        } else {
            [placement(D, H, D)].to_vec()
        };
        for choice in sft_choices {
            let mut sc = SftConfig {
                batch_size: 2,
                micro_batch_tokens: 2 * seq,
                max_seq_tokens: seq,
                ..SftConfig::default()
            };
            sc.run.steps = 1;
            sc.memory = choice;
            let est = estimate(&cfg, &sc.run_shape(), &choice);
            let measured = counters.peak_of(&c, || {
                let model = Model::from_host(&c, cfg.clone(), &host).unwrap();
                let mut t = SftTrainer::new(c.clone(), model, items.clone(), sc).unwrap();
                t.quiet = true;
                t.run(None).unwrap();
            });
            report.push((
                est as f64 / measured as f64,
                format!(
                    "SFT {shape} seq {seq} {choice:?}: estimate {est} B, measured {measured} B, \
                     pool {:?}",
                    c.pool_stats()
                ),
            ));
        }

        // GRPO: one step of two prompts, four responses each, one group per micro-batch.
        let (prompt, new, n) = (16usize, 8usize, 4usize);
        let prompts: Vec<PromptItem> = (0..2)
            .map(|i| PromptItem {
                id: format!("p{i}"),
                tokens: ids(&mut r, prompt),
                ground_truth: serde_json::Value::Null,
            })
            .collect();
        let grpo_choices = if k == 0 {
            [placement(D, H, D), placement(H, D, H)].to_vec()
        } else {
            [placement(D, D, D), placement(D, D, H)].to_vec()
        };
        for choice in grpo_choices {
            let tmp = tempfile::tempdir().unwrap();
            let mut tc = TrainConfig {
                run: RunConfig {
                    out: tmp.path().join("out"),
                    steps: 1,
                    seed: lcg(&mut r),
                    ..RunConfig::default()
                },
                save_every: 0,
                ..TrainConfig::default()
            };
            tc.rollout.n = n;
            tc.rollout.max_new_tokens = new;
            tc.rollout.max_prompt_tokens = prompt;
            tc.rollout.temperature = 1.0;
            tc.rollout.max_slots = 8;
            tc.grpo.prompts_per_step = 2;
            tc.grpo.mini_batch_prompts = 1;
            tc.grpo.micro_batch_tokens = prompt + n * new;
            tc.grpo.kl_coef = 0.05;
            tc.memory = choice;
            let est = estimate(&cfg, &tc.run_shape(), &choice);
            let measured = counters.peak_of(&c, || {
                let policy = Model::from_host(&c, cfg.clone(), &host).unwrap();
                let reference = Model::from_host(&c, cfg.clone(), &host).unwrap();
                let mut t = Trainer::new(
                    c.clone(),
                    policy,
                    reference,
                    common::train::golden_tokenizer(),
                    prompts.clone(),
                    Box::new(LikesE),
                    tc,
                )
                .unwrap();
                t.quiet = true;
                t.run().unwrap();
            });
            report.push((
                est as f64 / measured as f64,
                format!(
                    "GRPO {shape} prompt {prompt} n {n} new {new} {choice:?}: estimate {est} B, \
                     measured {measured} B, pool {:?}",
                    c.pool_stats()
                ),
            ));
        }
    }
    for (ratio, l) in &report {
        println!("estimate / measured {ratio:.3}: {l}");
    }
    // The planner models the default caching pool (its size classes). With exact-size
    // buffers (TOOLN1_CUDA_POOL=exact, the memory checkers' mode) the device holds less than
    // the size classes would, so there the estimate is only checked never to fall short by
    // more than 10% (and not to overshoot wildly).
    let exact = std::env::var("TOOLN1_CUDA_POOL").is_ok_and(|v| v == "exact");
    let bounds = if exact { 0.9..=1.6 } else { 0.9..=1.1 };
    for (ratio, l) in &report {
        assert!(
            bounds.contains(ratio),
            "estimate / measured {ratio:.3} outside {bounds:?} ({} pool): {l}",
            if exact { "exact-size" } else { "caching" }
        );
    }
}
