//! Data-parallel GRPO through the library API on CPU rank groups (one thread per rank, host
//! collectives summing in rank order; see `tooln1::train::parallel`):
//! - 2 and 4 ranks give the rollouts, losses, gradient norms and final weights of 1 rank for
//!   the same global batch, within float bounds (a rank sums its part's gradients, then the
//!   ranks' sums are added: a different order of f32 additions than one rank's);
//! - every rank ends with the same weights and the same metrics;
//! - a 2-rank run resumed from its checkpoint equals the uninterrupted one bit for bit;
//! - a 4-rank checkpoint resumes on 2 ranks and on 1 (the shards re-cut from the whole saved
//!   tensors): saved again at once it is the same file, and the two continuations agree;
//! - SFT on 2, 3 and 4 ranks (uneven parts, an empty one) gives 1 rank's losses and weights,
//!   and its checkpoint is the folder one rank writes.
//!
//! The model and the run's seed are random per run (printed; TOOLN1_TEST_SEED replays).

mod common;

use common::train::LikesE;

use std::path::Path;
use tooln1::backend::cpu::Cpu;
use tooln1::model::{init, Model, Qwen2Config};
use tooln1::train::config::RunConfig;
use tooln1::train::config::SftConfig;
use tooln1::train::metrics::StepMetrics;
use tooln1::train::parallel::{cpu_group, on_ranks};
use tooln1::train::sft::SftItem;
use tooln1::train::{
    checkpoint, PromptItem, RankComm, SftTrainer, TrainConfig, TrainData, Trainer,
};

struct Setup {
    cfg: Qwen2Config,
    host: Vec<Vec<f32>>,
    prompts: Vec<PromptItem>,
    seed: u64,
}

fn setup(tag: &str) -> Setup {
    let seed = common::seed(tag);
    let tok = common::train::golden_tokenizer();
    let vocab = tok.inner.get_vocab_size(true).div_ceil(64) * 64;
    let mut cfg = init::tiny_config(32, 2, 4, 2, 48, vocab, true);
    cfg.eos_token_id = vec![tok.token_id("<|im_end|>").unwrap()];
    let host = init::random_params(&cfg, seed);
    let texts = [
        "the tree",
        "set a timer",
        "weather here",
        "one",
        "green see",
        "call me",
        "eleven",
        "where is the bee",
    ];
    let prompts = common::train::chat_prompts(&tok, &texts);
    Setup {
        cfg,
        host,
        prompts,
        seed,
    }
}

/// 3 prompts per step in mini-batches of 2 groups: with 2 ranks the second mini-batch runs
/// on rank 0 alone, with 4 ranks ranks 2 and 3 have nothing in any mini-batch.
fn config(out: &Path, steps: u64, seed: u64) -> TrainConfig {
    let mut c = TrainConfig {
        run: RunConfig {
            out: out.to_path_buf(),
            steps,
            seed,
            ..RunConfig::default()
        },
        save_every: 2,
        ..TrainConfig::default()
    };
    c.rollout.n = 3;
    c.rollout.max_new_tokens = 6;
    c.rollout.temperature = 1.0;
    c.rollout.max_slots = 4;
    c.grpo.prompts_per_step = 3;
    c.grpo.mini_batch_prompts = 2;
    c.grpo.micro_batch_tokens = 24;
    c.grpo.kl_coef = 0.05;
    c.grpo.entropy_coef = 0.01;
    c.optim.lr = 2e-3;
    c
}

fn data(s: &Setup) -> TrainData {
    TrainData {
        tokenizer: common::train::golden_tokenizer(),
        prompts: s.prompts.clone(),
        reward: Box::new(LikesE),
    }
}

/// What one rank ended with.
struct Ended {
    metrics: Vec<StepMetrics>,
    weights: Vec<Vec<f32>>,
}

/// A run on `world` ranks (1: the plain single-device trainer), from the start or from `ck`.
fn run(s: &Setup, world: usize, tc: TrainConfig, ck: Option<&Path>) -> Vec<Ended> {
    let make = |comm: Option<RankComm<Cpu>>| {
        let reference = Model::from_host(&Cpu, s.cfg.clone(), &s.host).unwrap();
        let mut t = match ck {
            Some(ck) => Trainer::resume_in(Cpu, ck, reference, data(s), tc.clone(), comm).unwrap(),
            None => {
                let policy = Model::from_host(&Cpu, s.cfg.clone(), &s.host).unwrap();
                Trainer::new_in(Cpu, policy, reference, data(s), tc.clone(), comm).unwrap()
            }
        };
        t.quiet = true;
        let metrics = t.run()?;
        let weights = t.policy.to_host(&Cpu)?;
        Ok(Ended { metrics, weights })
    };
    if world == 1 {
        return vec![make(None).unwrap()];
    }
    on_ranks(cpu_group(world).unwrap(), |_, (_, comm)| make(Some(comm))).unwrap()
}

fn bits_equal(a: &[Vec<f32>], b: &[Vec<f32>]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.len() == y.len() && x.iter().zip(y).all(|(u, v)| u.to_bits() == v.to_bits())
        })
}

/// The largest |a - b| / (1e-3 + |b|) over every element, and the fraction of elements where
/// it exceeds 1e-3. (AdamW's update of an element whose summed gradient is nearly zero has the
/// sign of that sum, which a different order of float additions can flip: a few elements may
/// differ by up to 2 lr per step however close the gradients are.)
fn weight_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> (f64, f64) {
    let (mut worst, mut over, mut count) = (0.0f64, 0usize, 0usize);
    for (x, y) in a.iter().zip(b) {
        for (&u, &v) in x.iter().zip(y) {
            let d = (u as f64 - v as f64).abs() / (1e-3 + (v as f64).abs());
            worst = worst.max(d);
            over += (d > 1e-3) as usize;
            count += 1;
        }
    }
    (worst, over as f64 / count.max(1) as f64)
}

/// Weights that agree up to the order of float sums: at most 0.1% of the elements beyond 1e-3
/// relative.
fn assert_weights_close(a: &[Vec<f32>], b: &[Vec<f32>], what: &str) {
    let (worst, frac) = weight_diff(a, b);
    println!(
        "{what}: worst relative weight difference {worst:.3e}, {frac:.2e} of elements beyond 1e-3"
    );
    assert!(
        frac <= 1e-3,
        "{what}: {frac:e} of the weights differ by more than 1e-3"
    );
}

/// The metrics that do not depend on timing.
fn key(m: &StepMetrics) -> serde_json::Value {
    let mut v = serde_json::to_value(m).unwrap();
    v.as_object_mut().unwrap().retain(|k, _| {
        !k.starts_with("time_")
            && !k.starts_with("tokens_per_s")
            && !k.starts_with("mfu_")
            && k != "peak_host_mib"
    });
    v
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * (1.0 + b.abs())
}

#[test]
fn ranks_match_one_rank() {
    let s = setup("dist_train_ranks");
    let tmp = tempfile::tempdir().unwrap();
    let steps = 2;
    let one = run(&s, 1, config(&tmp.path().join("w1"), steps, s.seed), None);
    let one = &one[0];
    for world in [2usize, 4] {
        let ranks = run(
            &s,
            world,
            config(&tmp.path().join(format!("w{world}")), steps, s.seed),
            None,
        );
        assert_eq!(ranks.len(), world);
        for (r, e) in ranks.iter().enumerate() {
            assert!(
                bits_equal(&e.weights, &ranks[0].weights),
                "{world} ranks: rank {r}'s weights differ from rank 0's"
            );
            assert_eq!(e.metrics.len(), steps as usize);
            for (a, b) in e.metrics.iter().zip(&ranks[0].metrics) {
                assert_eq!(key(a), key(b), "{world} ranks: rank {r}'s metrics differ");
            }
        }
        let m = &ranks[0].metrics;
        for (k, (a, b)) in m.iter().zip(&one.metrics).enumerate() {
            println!(
                "{world} ranks step {}: loss {:.9} vs {:.9}, grad norm {:.9} vs {:.9}, reward {} vs {}",
                k + 1,
                a.loss,
                b.loss,
                a.grad_norm,
                b.grad_norm,
                a.reward_mean,
                b.reward_mean
            );
            // The rollouts are the same sequences: identical counts and rewards.
            assert_eq!(a.response_tokens, b.response_tokens, "step {}", k + 1);
            assert_eq!(a.prompt_tokens, b.prompt_tokens);
            assert_eq!(a.reward_mean, b.reward_mean, "step {}", k + 1);
            assert_eq!(a.updates, b.updates);
            assert_eq!(a.tokens_old_logprobs, b.tokens_old_logprobs);
            assert!(close(a.loss, b.loss, 1e-5), "step {}: loss", k + 1);
            assert!(close(a.kl, b.kl, 1e-4), "step {}: kl", k + 1);
            assert!(
                close(a.grad_norm, b.grad_norm, 1e-5),
                "step {}: grad norm",
                k + 1
            );
            assert!(close(a.entropy, b.entropy, 1e-5), "step {}: entropy", k + 1);
        }
        assert_weights_close(
            &ranks[0].weights,
            &one.weights,
            &format!("{world} ranks vs 1"),
        );
        assert!(
            !bits_equal(&one.weights, &s.host),
            "training changed nothing"
        );
    }
}

#[test]
fn resume_on_same_and_other_rank_counts() {
    let s = setup("dist_train_resume");
    let tmp = tempfile::tempdir().unwrap();
    // 2 ranks: 4 steps straight, and 2 + resume + 2.
    let straight = run(&s, 2, config(&tmp.path().join("a"), 4, s.seed), None);
    let out_b = tmp.path().join("b");
    run(&s, 2, config(&out_b, 2, s.seed), None);
    let ck = checkpoint::resolve_resume(&out_b).unwrap();
    assert!(ck.ends_with("step-00000002"), "{}", ck.display());
    let resumed = run(&s, 2, config(&out_b, 4, s.seed), Some(&ck));
    assert!(
        bits_equal(&resumed[0].weights, &straight[0].weights),
        "2 -> 2 resume is not exact"
    );
    for (a, b) in resumed[0].metrics.iter().zip(&straight[0].metrics[2..]) {
        assert_eq!(key(a), key(b));
    }

    // 4 ranks for 2 steps; that checkpoint on 2 ranks and on 1.
    let out_c = tmp.path().join("c");
    run(&s, 4, config(&out_c, 2, s.seed), None);
    let ck4 = checkpoint::resolve_resume(&out_c).unwrap();
    // Re-cut into 2 ranks' shards and saved again at once: the same optimizer file.
    let again = tmp.path().join("again/checkpoints/step-00000002");
    on_ranks(cpu_group(2).unwrap(), |_, (_, comm)| {
        let reference = Model::from_host(&Cpu, s.cfg.clone(), &s.host)?;
        let t = Trainer::resume_in(
            Cpu,
            &ck4,
            reference,
            data(&s),
            config(&out_c, 4, s.seed),
            Some(comm),
        )?;
        t.save_checkpoint(&again)
    })
    .unwrap();
    let read = |p: &Path| std::fs::read(p.join("optimizer.safetensors")).unwrap();
    assert!(
        read(&ck4) == read(&again),
        "resharded optimizer state changed"
    );
    let on2 = run(&s, 2, config(&tmp.path().join("d2"), 4, s.seed), Some(&ck4));
    let on1 = run(&s, 1, config(&tmp.path().join("d1"), 4, s.seed), Some(&ck4));
    assert_eq!(on2[0].metrics.len(), 2);
    for (a, b) in on2[0].metrics.iter().zip(&on1[0].metrics) {
        assert_eq!(a.step, b.step);
        assert_eq!(a.response_tokens, b.response_tokens);
        assert!(close(a.loss, b.loss, 1e-5));
        assert!(close(a.grad_norm, b.grad_norm, 1e-5));
    }
    assert_weights_close(&on2[0].weights, &on1[0].weights, "4 -> 2 vs 4 -> 1");
}

#[test]
fn a_failing_rank_stops_the_group() {
    let s = setup("dist_train_failure");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("f");
    // Rank 1's config is invalid: it fails at construction and every rank returns an error
    // instead of waiting for it.
    let r = on_ranks(cpu_group(2).unwrap(), |rank, (_, comm)| {
        let mut tc = config(&out, 2, s.seed);
        if rank == 1 {
            tc.rollout.n = 0;
        }
        let reference = Model::from_host(&Cpu, s.cfg.clone(), &s.host)?;
        let policy = Model::from_host(&Cpu, s.cfg.clone(), &s.host)?;
        let mut t = Trainer::new_in(Cpu, policy, reference, data(&s), tc, Some(comm))?;
        t.quiet = true;
        t.run()
    });
    let e = r.expect_err("the group should fail").to_string();
    println!("{e}");
    assert!(e.contains("rollout.n"), "{e}");
}

#[test]
fn sft_ranks_match_one_rank() {
    let s = setup("dist_train_sft");
    let mut rng = common::Rng::from_seed(s.seed ^ 0x5f7);
    let vocab = s.cfg.vocab_size;
    let items: Vec<SftItem> = (0..7)
        .map(|_| {
            let len = 4 + rng.below(9);
            let prompt_len = 1 + rng.below(len - 1);
            SftItem {
                tokens: (0..len).map(|_| rng.below(vocab) as u32).collect(),
                prompt_len,
            }
        })
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let run_sft = |world: usize| {
        let out = tmp.path().join(format!("sft{world}"));
        let make = |comm: Option<RankComm<Cpu>>| {
            let mut c = SftConfig {
                batch_size: 3,
                micro_batch_tokens: 16,
                save_every: 0,
                ..SftConfig::default()
            };
            c.run.steps = 3;
            c.run.seed = s.seed;
            c.optim.lr = 1e-2;
            let model = Model::from_host(&Cpu, s.cfg.clone(), &s.host)?;
            let mut t = SftTrainer::new_in(Cpu, model, items.clone(), c, comm)?;
            t.quiet = true;
            let m = t.run(Some(&out))?;
            Ok((m, t.model.to_host(&Cpu)?))
        };
        let r = if world == 1 {
            vec![make(None).unwrap()]
        } else {
            on_ranks(cpu_group(world).unwrap(), |_, (_, comm)| make(Some(comm))).unwrap()
        };
        (r, out)
    };
    let (one, out1) = run_sft(1);
    let (m1, w1) = &one[0];
    assert!(!bits_equal(w1, &s.host));
    for world in [2usize, 3, 4] {
        let (r, out) = run_sft(world);
        for (rank, (m, w)) in r.iter().enumerate() {
            assert!(
                bits_equal(w, &r[0].1),
                "SFT {world} ranks: rank {rank}'s weights"
            );
            assert_eq!(m.len(), 3);
        }
        let (m, w) = &r[0];
        for (a, b) in m.iter().zip(m1) {
            println!(
                "SFT {world} ranks step {}: loss {:.9} vs {:.9}, grad norm {:.9} vs {:.9}",
                a.step, a.loss, b.loss, a.grad_norm, b.grad_norm
            );
            assert_eq!((a.tokens, a.target_tokens), (b.tokens, b.target_tokens));
            assert!(close(a.loss, b.loss, 1e-5));
            assert!(close(a.grad_norm, b.grad_norm, 1e-5));
        }
        assert_weights_close(w, w1, &format!("SFT {world} ranks vs 1"));
        // One metrics file and the checkpoint folder a single rank writes.
        let lines = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
        assert_eq!(lines.lines().count(), 3);
        let names = |o: &Path| -> Vec<String> {
            let mut v: Vec<String> = std::fs::read_dir(o.join("checkpoints"))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
                .collect();
            v.sort();
            v
        };
        assert_eq!(names(&out), names(&out1));
    }
}
