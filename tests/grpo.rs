//! The GRPO update on the CPU backend: micro-batch splitting never changes the gradient or the
//! loss (every aggregation mode), and updates move logprobs in the direction of the advantage.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tooln1::backend::cpu::Cpu;
use tooln1::backend::{GrpoLossCfg, KlKind, LossAgg};
use tooln1::model::{init, Model};
use tooln1::train::config::OptimConfig;
use tooln1::train::grpo::{accumulate_minibatch, seq_logprobs, Layout, PassCfg, Scored, TrainSeq};
use tooln1::train::optim::{zero_grads, AdamW};

fn seed() -> u64 {
    let s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("seed {s}");
    s
}

fn model(seed: u64, vocab: usize) -> Model<Cpu> {
    let cfg = init::tiny_config(32, 2, 4, 2, 40, vocab, seed % 2 == 1);
    let host = init::random_params(&cfg, seed);
    Model::from_host(&Cpu, cfg, &host).unwrap()
}

fn seqs(rng: &mut ChaCha8Rng, vocab: u32, k: usize) -> Vec<TrainSeq> {
    (0..k)
        .map(|_| {
            let p = rng.random_range(1..6);
            let r = rng.random_range(1..7);
            TrainSeq {
                tokens: (0..p + r).map(|_| rng.random_range(0..vocab)).collect(),
                prompt_len: p,
                adv: rng.random_range(-2.0..2.0),
            }
        })
        .collect()
}

fn rel(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

#[test]
fn micro_batch_split_does_not_change_the_update() {
    let s = seed();
    let mut rng = ChaCha8Rng::seed_from_u64(s);
    let vocab = 47;
    let m = model(s, vocab);
    let batch = seqs(&mut rng, vocab as u32, 7);
    let cur = seq_logprobs(&Cpu, &m, &batch, 10_000, 1.0).unwrap();
    // Split logprob computation gives the same numbers too.
    let cur_split = seq_logprobs(&Cpu, &m, &batch, 5, 1.0).unwrap();
    for (a, b) in cur.iter().zip(&cur_split) {
        assert!(rel(a, b) < 1e-6, "{a:?} vs {b:?}");
    }
    // Old and reference logprobs away from the current ones so ratios clip and KL is non-zero.
    let mut old: Vec<Vec<f32>> = cur
        .iter()
        .map(|v| v.iter().map(|x| x + rng.random_range(-0.4..0.4)).collect())
        .collect();
    // Make sure at least one token takes the clipped branch whatever the draw: the first
    // response token of the first sequence with a non-zero advantage gets a ratio of e^0.5
    // (advantage > 0, above 1 + clip_high) or e^-0.5 (advantage < 0, below 1 - clip_low).
    let i = batch
        .iter()
        .position(|q| q.adv != 0.0)
        .expect("test batch has a sequence with a non-zero advantage");
    let t = batch[i].prompt_len - 1;
    old[i][t] = cur[i][t] - 0.5f32.copysign(batch[i].adv);
    let reference: Vec<Vec<f32>> = cur
        .iter()
        .map(|v| v.iter().map(|x| x + rng.random_range(-0.3..0.3)).collect())
        .collect();
    for agg in LossAgg::ALL {
        let cfg = GrpoLossCfg {
            clip_low: 0.2,
            clip_high: 0.2,
            kl_coef: 0.1,
            kl_kind: KlKind::K3,
            agg,
            norm_len: 8.0,
            loss_scale_div: 1.0,
        };
        let mut g_whole = m.zero_grads(&Cpu).unwrap();
        let whole = accumulate_minibatch(
            &Cpu,
            &m,
            Scored {
                seqs: &batch,
                old: &old,
                reference: &reference,
            },
            &PassCfg {
                loss: cfg,
                entropy_coef: 0.0,
                budget: 10_000,
                recompute: false,
                inv_t: 1.0,
                layout: Layout::PerSequence,
            },
            &mut g_whole,
        )
        .unwrap();
        assert_eq!(whole.micro_batches, 1);
        for (budget, recompute) in [(6, false), (9, true), (1, false)] {
            let mut g = m.zero_grads(&Cpu).unwrap();
            let split = accumulate_minibatch(
                &Cpu,
                &m,
                Scored {
                    seqs: &batch,
                    old: &old,
                    reference: &reference,
                },
                &PassCfg {
                    loss: cfg,
                    entropy_coef: 0.0,
                    budget,
                    recompute,
                    inv_t: 1.0,
                    layout: Layout::PerSequence,
                },
                &mut g,
            )
            .unwrap();
            assert!(split.micro_batches > 1);
            assert!(
                (split.loss - whole.loss).abs() < 1e-5 * (1.0 + whole.loss.abs()),
                "{agg:?} budget {budget}: loss {} vs {}",
                split.loss,
                whole.loss
            );
            assert!((split.tokens - whole.tokens).abs() < 1e-9);
            assert!((split.kl_sum - whole.kl_sum).abs() < 1e-4 * (1.0 + whole.kl_sum.abs()));
            let mut worst = 0.0f64;
            for (a, b) in g.iter().zip(&g_whole) {
                worst = worst.max(rel(a, b));
            }
            assert!(
                worst < 1e-4,
                "{agg:?} budget {budget}: gradient differs, rel {worst}"
            );
        }
        assert!(
            whole.clip_sum > 0.0,
            "{agg:?}: no clipped token in the test batch"
        );
    }
}

#[test]
fn updates_follow_the_advantage() {
    let s = seed();
    let mut rng = ChaCha8Rng::seed_from_u64(s);
    let vocab = 37;
    let mut m = model(s, vocab);
    let prompt: Vec<u32> = (0..4).map(|_| rng.random_range(0..vocab as u32)).collect();
    let mut good = prompt.clone();
    good.extend([3, 9, 14]);
    let mut bad = prompt.clone();
    bad.extend([20, 21, 5, 6]);
    let batch = vec![
        TrainSeq {
            tokens: good,
            prompt_len: 4,
            adv: 1.0,
        },
        TrainSeq {
            tokens: bad,
            prompt_len: 4,
            adv: -1.0,
        },
    ];
    let resp_sum = |m: &Model<Cpu>, i: usize| -> f32 {
        let lp = seq_logprobs(&Cpu, m, &batch, 1000, 1.0).unwrap();
        lp[i][3..].iter().sum()
    };
    let (g0, b0) = (resp_sum(&m, 0), resp_sum(&m, 1));
    let reference = seq_logprobs(&Cpu, &m, &batch, 1000, 1.0).unwrap();
    let mut opt = AdamW::new(
        &Cpu,
        &m,
        OptimConfig {
            lr: 3e-3,
            weight_decay: 0.0,
            ..OptimConfig::default()
        },
    )
    .unwrap();
    let mut grads = m.zero_grads(&Cpu).unwrap();
    let cfg = GrpoLossCfg {
        clip_low: 0.2,
        clip_high: 0.2,
        kl_coef: 1e-3,
        kl_kind: KlKind::K3,
        agg: LossAgg::TokenMean,
        norm_len: 1.0,
        loss_scale_div: 1.0,
    };
    for _ in 0..5 {
        let old = seq_logprobs(&Cpu, &m, &batch, 1000, 1.0).unwrap();
        zero_grads(&Cpu, &m, &mut grads).unwrap();
        let sums = accumulate_minibatch(
            &Cpu,
            &m,
            Scored {
                seqs: &batch,
                old: &old,
                reference: &reference,
            },
            &PassCfg {
                loss: cfg,
                entropy_coef: 0.0,
                budget: 1000,
                recompute: true,
                inv_t: 1.0,
                layout: Layout::PerSequence,
            },
            &mut grads,
        )
        .unwrap();
        assert!(sums.loss.is_finite());
        let u = opt.step(&Cpu, &mut m, &grads, 5).unwrap();
        assert!(u.grad_norm > 0.0 && u.grad_norm.is_finite());
    }
    let (g1, b1) = (resp_sum(&m, 0), resp_sum(&m, 1));
    assert!(g1 > g0, "positive-advantage response logprob {g0} -> {g1}");
    assert!(b1 < b0, "negative-advantage response logprob {b0} -> {b1}");
}
