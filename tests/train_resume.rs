//! The GRPO loop through the library API with a user-supplied reward: 4 steps straight equal
//! 2 steps + checkpoint + resume + 2 steps, bit for bit on the CPU backend; the checkpoint's
//! model folder loads back; metrics lines are written per step; the training-side passes take
//! their logprobs at the rollout temperature.

mod common;

use common::train::LikesE;

use std::path::Path;
use tooln1::backend::cpu::Cpu;
use tooln1::model::weights::load_model;
use tooln1::model::PackedBatch;
use tooln1::model::{init, Model, Qwen2Config};
use tooln1::reward::{Reward, RewardOutput};
use tooln1::tokenizer::Tokenizer;
use tooln1::train::checkpoint;
use tooln1::train::config::RunConfig;
use tooln1::train::rollout::{self, SamplingParams};
use tooln1::train::{PromptItem, TrainConfig, Trainer};

fn tokenizer() -> Tokenizer {
    common::train::golden_tokenizer()
}

fn setup() -> (Qwen2Config, Vec<Vec<f32>>, Vec<PromptItem>) {
    let tok = tokenizer();
    let vocab = tok.inner.get_vocab_size(true).div_ceil(64) * 64;
    let mut cfg = init::tiny_config(32, 2, 4, 2, 48, vocab, true);
    cfg.eos_token_id = vec![tok.token_id("<|im_end|>").unwrap()];
    let host = init::random_params(&cfg, 11);
    let texts = [
        "the tree",
        "set a timer",
        "weather here",
        "one",
        "green see",
        "call me",
    ];
    let prompts = common::train::chat_prompts(&tok, &texts);
    (cfg, host, prompts)
}

fn config(out: &Path, steps: u64) -> TrainConfig {
    let mut c = TrainConfig {
        run: RunConfig {
            out: out.to_path_buf(),
            steps,
            seed: 5,
            ..RunConfig::default()
        },
        save_every: 2,
        ..TrainConfig::default()
    };
    c.rollout.n = 3;
    c.rollout.max_new_tokens = 6;
    c.rollout.temperature = 1.0;
    c.rollout.max_slots = 4;
    c.grpo.prompts_per_step = 2;
    c.grpo.mini_batch_prompts = 1;
    c.grpo.micro_batch_tokens = 24;
    c.grpo.kl_coef = 0.05;
    c.grpo.entropy_coef = 0.01;
    c.optim.lr = 2e-3;
    c
}

fn trainer(
    cfg: &Qwen2Config,
    host: &[Vec<f32>],
    prompts: &[PromptItem],
    tc: TrainConfig,
) -> Trainer<Cpu> {
    let policy = Model::from_host(&Cpu, cfg.clone(), host).unwrap();
    let reference = Model::from_host(&Cpu, cfg.clone(), host).unwrap();
    let mut t = Trainer::new(
        Cpu,
        policy,
        reference,
        tokenizer(),
        prompts.to_vec(),
        Box::new(LikesE),
        tc,
    )
    .unwrap();
    t.quiet = true;
    t
}

fn strip_times(line: &str) -> serde_json::Value {
    let mut v: serde_json::Value = serde_json::from_str(line).unwrap();
    let o = v.as_object_mut().unwrap();
    // Timings and the rates and utilisations derived from them vary from run to run.
    o.retain(|k, _| {
        !k.starts_with("time_")
            && !k.starts_with("tokens_per_s")
            && !k.starts_with("mfu_")
            && k != "peak_host_mib"
    });
    v
}

#[test]
fn resume_is_bit_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let (cfg, host, prompts) = setup();

    // 4 steps straight.
    let out_a = tmp.path().join("a");
    let mut a = trainer(&cfg, &host, &prompts, config(&out_a, 4));
    let ma = a.run().unwrap();
    assert_eq!(ma.len(), 4);
    assert!(ma.iter().all(|m| m.updates == 2 && m.loss.is_finite()));
    let pa = a.policy.to_host(&Cpu).unwrap();
    assert_ne!(pa, host, "training did not change the parameters");

    // 2 steps, then resume from the step-2 checkpoint for 2 more.
    let out_b = tmp.path().join("b");
    let mut b1 = trainer(&cfg, &host, &prompts, config(&out_b, 2));
    b1.run().unwrap();
    drop(b1);
    let ck = checkpoint::resolve_resume(&out_b).unwrap();
    assert!(ck.ends_with("step-00000002"), "{}", ck.display());
    let reference = Model::from_host(&Cpu, cfg.clone(), &host).unwrap();
    let mut b2 = Trainer::resume(
        Cpu,
        &ck,
        reference,
        tokenizer(),
        prompts.clone(),
        Box::new(LikesE),
        config(&out_b, 4),
    )
    .unwrap();
    b2.quiet = true;
    assert_eq!(b2.step, 2);
    let mb = b2.run().unwrap();
    assert_eq!(mb.len(), 2);
    let pb = b2.policy.to_host(&Cpu).unwrap();
    for (i, (x, y)) in pa.iter().zip(&pb).enumerate() {
        let same = x.iter().zip(y).all(|(u, v)| u.to_bits() == v.to_bits());
        assert!(same, "parameter tensor {i} differs after resume");
    }
    // Optimizer moments are identical too.
    for (x, y) in a.opt.m.iter().zip(&b2.opt.m) {
        assert!(x.iter().zip(y).all(|(u, v)| u.to_bits() == v.to_bits()));
    }
    // The metrics of steps 3 and 4 agree (timings aside), and each run's file has one line per
    // step.
    let la: Vec<String> = std::fs::read_to_string(out_a.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    let lb: Vec<String> = std::fs::read_to_string(out_b.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(la.len(), 4);
    assert_eq!(lb.len(), 4);
    for k in 0..4 {
        assert_eq!(strip_times(&la[k]), strip_times(&lb[k]), "metrics line {k}");
    }
    for key in [
        "reward_mean",
        "reward_std",
        "format_ok_rate",
        "exact_match_rate",
        "kl",
        "clip_frac",
        "entropy",
        "response_len_mean",
        "response_len_max",
        "prompt_tokens",
        "response_tokens",
        "time_rollout_s",
        "time_reference_s",
        "time_old_logprobs_s",
        "time_update_s",
        "tokens_per_s",
        "peak_host_mib",
        "tokens_rollout_prefill",
        "tokens_rollout_decode",
        "tokens_rollout_naive",
        "flops_rollout",
        "flops_update",
        "tokens_per_s_update",
        "mfu_update",
        "groups_skipped",
    ] {
        let v: serde_json::Value = serde_json::from_str(&la[0]).unwrap();
        assert!(v.get(key).is_some(), "metrics line lacks {key}");
    }
}

#[test]
fn checkpoint_model_folder_loads_back() {
    let tmp = tempfile::tempdir().unwrap();
    let (cfg, host, prompts) = setup();
    let out = tmp.path().join("run");
    let mut t = trainer(&cfg, &host, &prompts, config(&out, 1));
    t.run().unwrap();
    let ck = checkpoint::latest(&out).unwrap();
    assert!(ck.join("model/config.json").exists());
    assert!(ck.join("optimizer.safetensors").exists());
    let state = checkpoint::read_state(&ck).unwrap();
    assert_eq!(state.step, 1);
    assert_eq!(state.updates, 2);
    assert_eq!(state.data_pos, 2);
    assert_eq!(state.kind, "grpo");
    let loaded = load_model(&ck.join("model"), &Cpu).unwrap();
    assert_eq!(loaded.cfg, t.policy.cfg);
    assert_eq!(
        loaded.to_host(&Cpu).unwrap(),
        t.policy.to_host(&Cpu).unwrap()
    );
    // No temporary folder is left behind.
    let names: Vec<String> = std::fs::read_dir(out.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(names, vec!["step-00000001".to_string()]);
    // Resuming a checkpoint with different data is refused with a message naming it.
    let reference = Model::from_host(&Cpu, cfg.clone(), &host).unwrap();
    let err = Trainer::resume(
        Cpu,
        &ck,
        reference,
        tokenizer(),
        prompts[..3].to_vec(),
        Box::new(LikesE),
        config(&out, 2),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("prompts"), "{err}");
}

/// Response-token means of the entropy of softmax(z / T) under `policy` and of the k3 KL
/// between `policy` and `reference` at T, from full T = 1 logits (f64 log-softmax here, not the
/// fused op).
fn means_at(
    policy: &Model<Cpu>,
    reference: &Model<Cpu>,
    seqs: &[Vec<u32>],
    prompt_len: usize,
    temperature: f64,
) -> (f64, f64) {
    let packed = PackedBatch::from_sequences(seqs).unwrap();
    let vocab = policy.cfg.vocab_size;
    let log_softmax = |m: &Model<Cpu>| -> Vec<Vec<f64>> {
        let db = m.upload_batch(&Cpu, &packed).unwrap();
        let z = m.forward_logits(&Cpu, &db).unwrap();
        z.chunks(vocab)
            .map(|row| {
                let x: Vec<f64> = row.iter().map(|&v| v as f64 / temperature).collect();
                let mx = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let lse = mx + x.iter().map(|v| (v - mx).exp()).sum::<f64>().ln();
                x.iter().map(|v| v - lse).collect()
            })
            .collect()
    };
    let (lp, lr) = (log_softmax(policy), log_softmax(reference));
    let (mut ent, mut kl, mut n) = (0.0, 0.0, 0.0);
    for (s, seq) in seqs.iter().enumerate() {
        let base = packed.cu_seqlens[s] as usize;
        // position t predicts seq[t + 1]; the response targets start at the prompt's end
        for t in prompt_len - 1..seq.len() - 1 {
            let (p, r) = (&lp[base + t], &lr[base + t]);
            ent -= p.iter().map(|l| l.exp() * l).sum::<f64>();
            let y = seq[t + 1] as usize;
            let x = r[y] - p[y];
            kl += x.exp() - x - 1.0;
            n += 1.0;
        }
    }
    (ent / n, kl / n)
}

#[test]
fn training_side_logprobs_use_the_rollout_temperature() {
    let tmp = tempfile::tempdir().unwrap();
    let (cfg, host, prompts) = setup();
    let prompts = prompts[..1].to_vec();
    let mut tc = config(&tmp.path().join("run"), 1);
    tc.rollout.temperature = 0.7;
    tc.grpo.prompts_per_step = 1;
    tc.grpo.micro_batch_tokens = 4096;
    assert_eq!(tc.logprob_temperature(), 0.7);
    // A reference with other weights, so the KL term is not zero.
    let other = init::random_params(&cfg, 12);
    let policy = Model::from_host(&Cpu, cfg.clone(), &host).unwrap();
    let reference = Model::from_host(&Cpu, cfg.clone(), &other).unwrap();
    let mut t = Trainer::new(
        Cpu,
        policy,
        reference,
        tokenizer(),
        prompts.clone(),
        Box::new(LikesE),
        tc.clone(),
    )
    .unwrap();
    t.quiet = true;
    // The step's rollout, drawn again from the same counter-based stream.
    let sp = SamplingParams {
        temperature: tc.rollout.temperature,
        top_p: tc.rollout.top_p,
        top_k: tc.rollout.top_k,
        max_new_tokens: tc.rollout.max_new_tokens,
        stop: t.stop.clone(),
        max_slots: tc.rollout.max_slots,
    };
    let p = &prompts[0].tokens;
    let gens = rollout::generate(
        &Cpu,
        &t.policy,
        std::slice::from_ref(p),
        tc.rollout.n,
        &sp,
        tc.run.seed,
        0,
    )
    .unwrap();
    let seqs: Vec<Vec<u32>> = gens
        .iter()
        .map(|g| p.iter().chain(&g.tokens).copied().collect())
        .collect();
    let (ent, kl) = means_at(&t.policy, &t.reference, &seqs, p.len(), 0.7);
    let (ent1, kl1) = means_at(&t.policy, &t.reference, &seqs, p.len(), 1.0);
    let m = t.step().unwrap();
    let resp: usize = gens.iter().map(|g| g.tokens.len()).sum();
    assert_eq!(m.response_tokens, resp, "the step sampled other responses");
    // The policy's entropy and the KL against the reference are those at T = 0.7 ...
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-4 * b.abs().max(1e-3);
    assert!(
        close(m.entropy, ent),
        "entropy {} vs {ent} at T = 0.7",
        m.entropy
    );
    assert!(close(m.kl, kl), "kl {} vs {kl} at T = 0.7", m.kl);
    // ... and far from those at T = 1, so this test can tell them apart.
    assert!(
        !close(m.entropy, ent1) && !close(m.kl, kl1),
        "T = 1 values agree too"
    );
    // Old and policy logprobs are at the same temperature: the first update is on-policy.
    assert!((m.ratio_mean - 1.0).abs() < 1e-5, "ratio {}", m.ratio_mean);
    assert_eq!(m.clip_frac, 0.0);
}

/// A reward that gives every response to a prompt whose ground truth is "flat" the same score
/// (a zero-signal group) and scores the others by the letters they contain and their length.
struct FlatForOne;

impl Reward for FlatForOne {
    fn score(&self, response: &str, gt: &serde_json::Value) -> RewardOutput {
        let flat = gt.as_str() == Some("flat");
        let r = if flat {
            0.5
        } else {
            (response.matches('e').count() as f32 + response.len() as f32 * 0.01).min(1.0)
        };
        RewardOutput {
            reward: r,
            format_ok: true,
            calls_ok: false,
            reason: "ok".into(),
        }
    }
}

/// `grpo.skip_zero_adv_groups`: the zero-signal groups leave the old, reference and update
/// passes (fewer rows, counted in `groups_skipped`), the other groups' rollouts and metrics are
/// untouched; with every group flat there is no update at all; n = 1 is refused. Also the
/// per-phase work metrics: FLOPs from the formula, no utilisation on the CPU without a peak,
/// one with `peak_tflops`.
#[test]
fn zero_signal_groups_can_be_left_out() {
    let tmp = tempfile::tempdir().unwrap();
    let (cfg, host, mut prompts) = setup();
    // Every other prompt is flat; one step takes all six.
    for (i, p) in prompts.iter_mut().enumerate() {
        if i % 2 == 1 {
            p.ground_truth = serde_json::json!("flat");
        }
    }
    let run = |skip: bool, flat_all: bool, name: &str| {
        let mut ps = prompts.clone();
        if flat_all {
            for p in &mut ps {
                p.ground_truth = serde_json::json!("flat");
            }
        }
        let mut tc = config(&tmp.path().join(name), 1);
        tc.grpo.prompts_per_step = 6;
        tc.grpo.mini_batch_prompts = 2;
        tc.grpo.skip_zero_adv_groups = skip;
        tc.peak_tflops = if skip { Some(1.0) } else { None };
        let policy = Model::from_host(&Cpu, cfg.clone(), &host).unwrap();
        let reference = Model::from_host(&Cpu, cfg.clone(), &host).unwrap();
        let mut t = Trainer::new(
            Cpu,
            policy,
            reference,
            tokenizer(),
            ps,
            Box::new(FlatForOne),
            tc,
        )
        .unwrap();
        t.quiet = true;
        let m = t.step().unwrap();
        (m, t.policy.to_host(&Cpu).unwrap())
    };
    let (off, _) = run(false, false, "off");
    let (on, _) = run(true, false, "on");
    println!(
        "zero_adv_groups {} skipped {}; pass rows {} -> {}",
        off.zero_adv_groups, on.groups_skipped, off.tokens_old_logprobs, on.tokens_old_logprobs
    );
    // 3 of the 6 prompts are flat (the others' three responses score differently: scores count
    // letters and length, and the run's seed is fixed).
    assert_eq!(off.groups_skipped, 0);
    assert_eq!(on.groups_skipped, 3);
    assert!(
        (off.zero_adv_groups - 0.5).abs() < 1e-12,
        "{}",
        off.zero_adv_groups
    );
    assert_eq!(on.zero_adv_groups, off.zero_adv_groups);
    // Same rollouts and rewards either way.
    assert_eq!(on.reward_mean, off.reward_mean);
    assert_eq!(on.response_tokens, off.response_tokens);
    assert_eq!(on.tokens_rollout_decode, off.tokens_rollout_decode);
    // Fewer rows through the passes, fewer updates (mini-batches of 2 groups: 3 -> 2).
    assert!(on.tokens_old_logprobs < off.tokens_old_logprobs);
    assert_eq!((off.updates, on.updates), (3, 2));
    assert!(on.flops_update < off.flops_update && on.flops_old_logprobs < off.flops_old_logprobs);
    // FLOPs and utilisation: none on the CPU without a configured peak.
    assert!(off.flops_rollout > 0.0 && off.flops_update == 3.0 * off.flops_old_logprobs);
    assert_eq!((off.peak_tflops, off.mfu_update), (None, None));
    assert_eq!(on.peak_tflops, Some(1.0));
    assert!(on.mfu_update.is_some_and(|u| u > 0.0));
    // The shared rollout prefilled each prompt once; the naive count is larger.
    assert_eq!(off.rollout_prefills, 6);
    assert!(off.tokens_rollout_naive >= 3 * off.tokens_rollout_prefill + off.tokens_rollout_decode);
    // Every group flat: nothing to update, the policy stays as it was.
    let (all, p_all) = run(true, true, "all");
    assert_eq!((all.groups_skipped, all.updates), (6, 0));
    assert_eq!(p_all, host);
    // A group of one is never zero-signal under GRPO: the option needs n >= 2.
    let mut tc = config(&tmp.path().join("n1"), 1);
    tc.rollout.n = 1;
    tc.grpo.skip_zero_adv_groups = true;
    let e = tc.validate().unwrap_err().to_string();
    assert!(e.contains("grpo.skip_zero_adv_groups"), "{e}");
    let mut tc = config(&tmp.path().join("peak"), 1);
    for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        tc.peak_tflops = Some(bad);
        let e = tc.validate().unwrap_err().to_string();
        assert!(e.contains("peak_tflops"), "{e}");
    }
}
