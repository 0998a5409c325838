//! The host AdamW (`backend::host_adamw`) and the host-resident optimizer state
//! (`memory.optimizer = "host"`): the update against a scalar transcription of the CUDA kernel
//! on random inputs (seeded, `TOOLN1_TEST_SEED` replays), thread-count independence, and GRPO
//! and SFT training with the state on the host giving bit-identical weights to the state on
//! the backend on the CPU backend, including a resume from a host-state checkpoint.

mod common;

use common::train::LikesE;

use std::path::Path;
use tooln1::backend::cpu::{set_num_threads, Cpu};
use tooln1::backend::host_adamw::{self, HostStep};
use tooln1::backend::AdamWStep;
use tooln1::model::{init, Model, Qwen2Config};
use tooln1::tokenizer::Tokenizer;
use tooln1::train::checkpoint;
use tooln1::train::config::{Place, RunConfig, SftConfig};
use tooln1::train::sft::{SftItem, SftTrainer};
use tooln1::train::{PromptItem, TrainConfig, Trainer};

fn seed() -> u64 {
    let s = std::env::var("TOOLN1_TEST_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed_ada3);
    eprintln!("TOOLN1_TEST_SEED={s}");
    s
}

/// splitmix64 stream of floats in [-scale, scale).
fn randv(state: &mut u64, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = *state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// kernels/adamw.cu's `adamw_step` for one element, transcribed line by line, with the
/// launcher's f64 bias corrections.
fn kernel_element(p: &mut f32, g: f32, m: &mut f32, v: &mut f32, hp: &AdamWStep) {
    let t = hp.step.min(i32::MAX as u64) as i32;
    let bc1 = (1.0 - (hp.beta1 as f64).powi(t)) as f32;
    let bc2 = (1.0 - (hp.beta2 as f64).powi(t)) as f32;
    let (b1, b2) = (hp.beta1, hp.beta2);
    let g = g * hp.grad_scale;
    let mi = b1 * *m + (1.0 - b1) * g;
    let vi = b2 * *v + (1.0 - b2) * g * g;
    *m = mi;
    *v = vi;
    let mut x = *p;
    x -= hp.lr * ((mi / bc1) / ((vi / bc2).sqrt() + hp.eps) + hp.weight_decay * x);
    *p = x;
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn host_adamw_is_the_kernel_math_bit_for_bit_for_every_thread_count() {
    let mut r = seed();
    for (n, step) in [
        (1usize, 1u64),
        (7, 2),
        (16385, 3),
        (50_001, 1000),
        (3, u64::MAX),
    ] {
        let hp = AdamWStep {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            step,
            grad_scale: 0.75,
        };
        let p0 = randv(&mut r, n, 1.0);
        let g = randv(&mut r, n, 2.0);
        let m0 = randv(&mut r, n, 0.1);
        let v0: Vec<f32> = randv(&mut r, n, 0.01).iter().map(|x| x.abs()).collect();
        let (mut pw, mut mw, mut vw) = (p0.clone(), m0.clone(), v0.clone());
        for i in 0..n {
            kernel_element(&mut pw[i], g[i], &mut mw[i], &mut vw[i], &hp);
        }
        for threads in [1, 2, 3] {
            set_num_threads(threads);
            let (mut p, mut m, mut v) = (p0.clone(), m0.clone(), v0.clone());
            host_adamw::adamw(&mut p, &g, &mut m, &mut v, n, &hp);
            assert_eq!(
                bits(&p),
                bits(&pw),
                "p: n {n} step {step} threads {threads}"
            );
            assert_eq!(
                bits(&m),
                bits(&mw),
                "m: n {n} step {step} threads {threads}"
            );
            assert_eq!(
                bits(&v),
                bits(&vw),
                "v: n {n} step {step} threads {threads}"
            );
        }
        // The serial form agrees too, and only the first n elements are touched.
        let (mut p, mut m, mut v) = (p0.clone(), m0.clone(), v0.clone());
        p.push(9.0);
        host_adamw::adamw(&mut p, &g, &mut m, &mut v, n, &hp);
        assert_eq!(p[n], 9.0);
        let h = HostStep::new(&hp);
        let (mut p, mut m, mut v) = (p0.clone(), m0.clone(), v0.clone());
        host_adamw::update_serial(&mut p, &g, &mut m, &mut v, &h);
        assert_eq!(bits(&p), bits(&pw));
    }
}

fn tokenizer() -> Tokenizer {
    common::train::golden_tokenizer()
}

fn setup(tied: bool) -> (Qwen2Config, Vec<Vec<f32>>, Vec<PromptItem>) {
    let tok = tokenizer();
    let vocab = tok.inner.get_vocab_size(true).div_ceil(64) * 64;
    let mut cfg = init::tiny_config(24, 2, 4, 2, 40, vocab, tied);
    cfg.eos_token_id = vec![tok.token_id("<|im_end|>").unwrap()];
    let host = init::random_params(&cfg, 13);
    let prompts = common::train::chat_prompts(
        &tok,
        &["the tree", "set a timer", "weather here", "call me"],
    );
    (cfg, host, prompts)
}

fn grpo_config(out: &Path, steps: u64, place: Place) -> TrainConfig {
    let mut c = TrainConfig {
        run: RunConfig {
            out: out.to_path_buf(),
            steps,
            seed: 3,
            ..RunConfig::default()
        },
        save_every: 2,
        ..TrainConfig::default()
    };
    c.rollout.n = 3;
    c.rollout.max_new_tokens = 5;
    c.rollout.temperature = 1.0;
    c.rollout.max_slots = 4;
    c.grpo.prompts_per_step = 2;
    c.grpo.mini_batch_prompts = 1;
    c.grpo.micro_batch_tokens = 24;
    c.grpo.kl_coef = 0.05;
    c.optim.lr = 2e-3;
    c.memory.optimizer = place;
    c
}

fn grpo_trainer(
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

fn same(a: &[Vec<f32>], b: &[Vec<f32>], what: &str) {
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert_eq!(bits(x), bits(y), "{what}: tensor {i} differs");
    }
}

#[test]
fn grpo_with_the_optimizer_on_the_host_matches_the_device_optimizer_including_resume() {
    let tmp = tempfile::tempdir().unwrap();
    for tied in [true, false] {
        let (cfg, host, prompts) = setup(tied);
        let out_d = tmp.path().join(format!("d{tied}"));
        let mut d = grpo_trainer(&cfg, &host, &prompts, grpo_config(&out_d, 4, Place::Device));
        d.run().unwrap();
        assert!(!d.opt.on_host());
        let pd = d.policy.to_host(&Cpu).unwrap();
        assert_ne!(pd, host, "training did not change the parameters");

        // Host state: 2 steps, checkpoint, resume with the host state for 2 more.
        let out_h = tmp.path().join(format!("h{tied}"));
        let mut h1 = grpo_trainer(&cfg, &host, &prompts, grpo_config(&out_h, 2, Place::Host));
        assert!(h1.opt.on_host());
        assert!(h1.opt.m.is_empty() && h1.opt.master.is_none());
        h1.run().unwrap();
        drop(h1);
        let ck = checkpoint::resolve_resume(&out_h).unwrap();
        let reference = Model::from_host(&Cpu, cfg.clone(), &host).unwrap();
        let mut h2 = Trainer::resume(
            Cpu,
            &ck,
            reference,
            tokenizer(),
            prompts.clone(),
            Box::new(LikesE),
            grpo_config(&out_h, 4, Place::Host),
        )
        .unwrap();
        h2.quiet = true;
        assert!(h2.opt.on_host());
        h2.run().unwrap();
        same(&pd, &h2.policy.to_host(&Cpu).unwrap(), "GRPO weights");
        let n = |i: usize| d.policy.layout.specs[i].numel();
        for g in ["m", "v"] {
            for i in 0..pd.len() {
                let a = d.opt.state_to_host(&Cpu, g, i, n(i)).unwrap();
                let b = h2.opt.state_to_host(&Cpu, g, i, n(i)).unwrap();
                assert_eq!(bits(&a), bits(&b), "{g} tensor {i}");
            }
        }
        // A host-state checkpoint resumes with the state on the device too (same file).
        let reference = Model::from_host(&Cpu, cfg.clone(), &host).unwrap();
        let mut d2 = Trainer::resume(
            Cpu,
            &ck,
            reference,
            tokenizer(),
            prompts.clone(),
            Box::new(LikesE),
            grpo_config(&tmp.path().join(format!("x{tied}")), 4, Place::Device),
        )
        .unwrap();
        d2.quiet = true;
        d2.run().unwrap();
        same(
            &pd,
            &d2.policy.to_host(&Cpu).unwrap(),
            "GRPO weights, device resume",
        );
    }
}

#[test]
fn sft_with_the_optimizer_on_the_host_matches_the_device_optimizer() {
    let (cfg, host, _) = setup(false);
    let mut r = seed();
    let items: Vec<SftItem> = (0..5)
        .map(|i| {
            let len = 6 + 3 * i;
            let tokens = randv(&mut r, len, 1.0)
                .iter()
                .map(|x| ((x.abs() * 200.0) as u32) % cfg.vocab_size as u32)
                .collect();
            SftItem {
                tokens,
                prompt_len: 2 + i,
            }
        })
        .collect();
    let run = |place: Place, pipelined: bool| {
        let mut c = SftConfig {
            batch_size: 2,
            micro_batch_tokens: 16,
            ..SftConfig::default()
        };
        c.run.steps = 3;
        c.optim.lr = 1e-2;
        c.memory.optimizer = place;
        let model = Model::from_host(&Cpu, cfg.clone(), &host).unwrap();
        let mut t = SftTrainer::new(Cpu, model, items.clone(), c).unwrap();
        t.quiet = true;
        if let Some(h) = t.opt.host.as_mut() {
            // Plain memory on the CPU backend.
            assert!(!h.m[0].pinned());
            h.pipelined = pipelined;
        }
        t.run(None).unwrap();
        assert_eq!(t.opt.on_host(), place == Place::Host);
        t.model.to_host(&Cpu).unwrap()
    };
    let d = run(Place::Device, true);
    assert_ne!(d, host);
    same(
        &d,
        &run(Place::Host, true),
        "SFT weights, pipelined host update",
    );
    same(
        &d,
        &run(Place::Host, false),
        "SFT weights, synchronous host update",
    );
}
