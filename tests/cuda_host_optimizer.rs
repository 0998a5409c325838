//! The host-resident optimizer state on the CUDA backend against the device AdamW kernel:
//! the op on random inputs (bf16 parameters, f32 master, odd sizes; `TOOLN1_TEST_SEED`
//! replays), SFT training and GRPO training (3 steps straight against 2 steps, a checkpoint
//! and a resume with the host state) with `memory.optimizer = "host"` against `"device"`,
//! weights and state compared bit for bit.
//!
//! The virtual GPU builds the kernel without fused multiply-adds, like the host code, so there
//! the two agree bit for bit. On a real GPU nvcc contracts multiply-adds (see
//! `backend::host_adamw`), and the op test allows one f32 ulp per element there.

mod common;

use common::train::LikesE;

use common::{gpu, seed};
use tooln1::backend::cuda::Cuda;
use tooln1::backend::host_adamw;
use tooln1::backend::{AdamWState, AdamWStep, Backend};
use tooln1::model::{init, Model};
use tooln1::train::config::{Place, SftConfig};
use tooln1::train::sft::{SftItem, SftTrainer};

fn virtual_gpu(c: &Cuda) -> bool {
    c.device().contains("virtual GPU")
}

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

fn ulps(a: f32, b: f32) -> u32 {
    (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
}

#[test]
fn device_kernel_and_host_adamw_agree() {
    let Some(c) = gpu() else { return };
    let tol = if virtual_gpu(&c) { 0 } else { 1 };
    let mut r = seed("cuda_host_optimizer");
    for (n, step) in [(1usize, 1u64), (257, 2), (4099, 17)] {
        let hp = AdamWStep {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            step,
            grad_scale: 0.5,
        };
        // The master holds bf16-representable values, as after loading a bf16 checkpoint.
        let master0: Vec<f32> = randv(&mut r, n, 1.0)
            .iter()
            .map(|&x| half::bf16::from_f32(x).to_f32())
            .collect();
        let g = randv(&mut r, n, 2.0);
        let m0 = randv(&mut r, n, 0.1);
        let v0: Vec<f32> = randv(&mut r, n, 0.01).iter().map(|x| x.abs()).collect();
        let mut p = c.upload(&master0).unwrap();
        let mut master = c.upload_f32(&master0).unwrap();
        let gd = c.upload_f32(&g).unwrap();
        let mut m = c.upload_f32(&m0).unwrap();
        let mut v = c.upload_f32(&v0).unwrap();
        c.adamw(
            AdamWState {
                param: &mut p,
                master: Some(&mut master),
                m: &mut m,
                v: &mut v,
            },
            &gd,
            n,
            &hp,
        )
        .unwrap();
        let (mut hp_, mut hm, mut hv) = (master0.clone(), m0.clone(), v0.clone());
        host_adamw::adamw(&mut hp_, &g, &mut hm, &mut hv, n, &hp);
        let dev = [
            c.download_f32(&master, n).unwrap(),
            c.download_f32(&m, n).unwrap(),
            c.download_f32(&v, n).unwrap(),
        ];
        for (what, d, h) in [
            ("master", &dev[0], &hp_),
            ("m", &dev[1], &hm),
            ("v", &dev[2], &hv),
        ] {
            for i in 0..n {
                assert!(
                    ulps(d[i], h[i]) <= tol,
                    "{what}[{i}] n {n} step {step}: device {} host {}",
                    d[i],
                    h[i]
                );
            }
        }
        // The bf16 weights are the master rounded to nearest even, as the upload rounds.
        let pw = c.download(&p, n).unwrap();
        let up = c.download(&c.upload(&dev[0]).unwrap(), n).unwrap();
        assert_eq!(
            pw.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            up.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            "bf16 rounding n {n}"
        );
    }
}

#[test]
fn sft_with_the_optimizer_on_the_host_matches_the_device_optimizer() {
    let Some(c) = gpu() else { return };
    if !virtual_gpu(&c) {
        eprintln!(
            "bit-identity of whole runs is checked on the virtual GPU only (FMA contraction)"
        );
        return;
    }
    drop(c);
    let cfg = init::tiny_config(128, 2, 2, 1, 96, 96, false);
    let host = init::random_params(&cfg, 21);
    let mut r = seed("cuda_host_optimizer sft");
    let items: Vec<SftItem> = (0..4)
        .map(|i| SftItem {
            tokens: randv(&mut r, 7 + 2 * i, 1.0)
                .iter()
                .map(|x| ((x.abs() * 95.0) as u32) % 96)
                .collect(),
            prompt_len: 2 + i,
        })
        .collect();
    let run = |place: Place| {
        let c = gpu().unwrap();
        let mut sc = SftConfig {
            batch_size: 2,
            micro_batch_tokens: 16,
            ..SftConfig::default()
        };
        sc.run.steps = 2;
        sc.optim.lr = 1e-2;
        sc.optim.warmup_steps = 0;
        sc.memory.optimizer = place;
        let model = Model::from_host(&c, cfg.clone(), &host).unwrap();
        let mut t = SftTrainer::new(c, model, items.clone(), sc).unwrap();
        t.quiet = true;
        t.run(None).unwrap();
        let w = t.model.to_host(&t.b).unwrap();
        let specs = t.model.layout.specs.clone();
        let mut state = Vec::new();
        for g in ["m", "v", "master"] {
            for (i, s) in specs.iter().enumerate() {
                state.push(t.opt.state_to_host(&t.b, g, i, s.numel()).unwrap());
            }
        }
        (w, state)
    };
    let (wd, sd) = run(Place::Device);
    let (wh, sh) = run(Place::Host);
    assert_ne!(wd, host);
    let bits = |x: &Vec<Vec<f32>>| -> Vec<Vec<u32>> {
        x.iter()
            .map(|t| t.iter().map(|v| v.to_bits()).collect())
            .collect()
    };
    assert_eq!(bits(&wd), bits(&wh), "bf16 weights");
    assert_eq!(bits(&sd), bits(&sh), "optimizer state");
}

#[test]
fn grpo_with_the_optimizer_on_the_host_matches_the_device_optimizer_including_resume() {
    use tooln1::tokenizer::Tokenizer;
    use tooln1::train::config::RunConfig;
    use tooln1::train::{checkpoint, PromptItem, TrainConfig, Trainer};
    let Some(c) = gpu() else { return };
    if !virtual_gpu(&c) {
        eprintln!(
            "bit-identity of whole runs is checked on the virtual GPU only (FMA contraction)"
        );
        return;
    }
    let tok_path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/golden/tokenizer/tokenizer.json");
    let tok = || Tokenizer::from_file(&tok_path).unwrap();
    let vocab = tok().inner.get_vocab_size(true).div_ceil(64) * 64;
    let mut cfg = init::tiny_config(128, 2, 2, 1, 96, vocab, false);
    cfg.eos_token_id = vec![tok().token_id("<|im_end|>").unwrap()];
    // The reference keeps this f32 config while a CUDA checkpoint (the resumed policy) says
    // bfloat16: the same model, which `Trainer::resume` must accept.
    let host = init::random_params(&cfg, 17);
    let prompts: Vec<PromptItem> = ["the tree", "set a timer", "call me"]
        .iter()
        .enumerate()
        .map(|(i, t)| PromptItem {
            id: format!("p{i}"),
            tokens: tok()
                .encode(&format!(
                    "<|im_start|>user\n{t}<|im_end|>\n<|im_start|>assistant\n"
                ))
                .unwrap(),
            ground_truth: serde_json::Value::Null,
        })
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let config = |out: &str, steps: u64, place: Place| {
        let mut t = TrainConfig {
            run: RunConfig {
                out: tmp.path().join(out),
                steps,
                seed: 9,
                ..RunConfig::default()
            },
            save_every: 2,
            ..TrainConfig::default()
        };
        t.rollout.n = 2;
        t.rollout.max_new_tokens = 4;
        t.rollout.temperature = 1.0;
        t.rollout.max_slots = 4;
        t.grpo.prompts_per_step = 2;
        t.grpo.mini_batch_prompts = 1;
        t.grpo.kl_coef = 0.05;
        t.optim.lr = 2e-3;
        t.memory.optimizer = place;
        t
    };
    let fresh = |tc: TrainConfig| {
        let c = gpu().unwrap();
        let policy = Model::from_host(&c, cfg.clone(), &host).unwrap();
        let reference = Model::from_host(&c, cfg.clone(), &host).unwrap();
        let mut t = Trainer::new(
            c,
            policy,
            reference,
            tok(),
            prompts.clone(),
            Box::new(LikesE),
            tc,
        )
        .unwrap();
        t.quiet = true;
        t
    };
    let mut d = fresh(config("d", 3, Place::Device));
    d.run().unwrap();
    let wd = d.policy.to_host(&d.b).unwrap();
    assert_ne!(wd, host);
    let mut h1 = fresh(config("h", 2, Place::Host));
    h1.run().unwrap();
    drop(h1);
    let ck = checkpoint::resolve_resume(&tmp.path().join("h")).unwrap();
    let c2 = gpu().unwrap();
    let reference = Model::from_host(&c2, cfg.clone(), &host).unwrap();
    let mut h2 = Trainer::resume(
        c2,
        &ck,
        reference,
        tok(),
        prompts.clone(),
        Box::new(LikesE),
        config("h", 3, Place::Host),
    )
    .unwrap();
    h2.quiet = true;
    assert!(h2.opt.on_host());
    h2.run().unwrap();
    let wh = h2.policy.to_host(&h2.b).unwrap();
    let bits = |x: &Vec<Vec<f32>>| -> Vec<Vec<u32>> {
        x.iter()
            .map(|t| t.iter().map(|v| v.to_bits()).collect())
            .collect()
    };
    assert_eq!(
        bits(&wd),
        bits(&wh),
        "bf16 weights after 3 steps vs 2 + resume + 1"
    );
    for g in ["m", "v", "master"] {
        for (i, s) in d.policy.layout.specs.iter().enumerate() {
            let a = d.opt.state_to_host(&d.b, g, i, s.numel()).unwrap();
            let b = h2.opt.state_to_host(&h2.b, g, i, s.numel()).unwrap();
            assert_eq!(
                a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                b.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{g} tensor {i}"
            );
        }
    }
}
