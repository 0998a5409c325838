//! The host-resident optimizer state on the CUDA backend against the device AdamW kernel:
//! the op on random inputs (bf16 parameters, f32 master, odd sizes; `TOOLN1_TEST_SEED`
//! replays), SFT training and GRPO training (3 steps straight against 2 steps, a checkpoint
//! and a resume with the host state) with `memory.optimizer = "host"` against `"device"`,
//! weights and state compared bit for bit (the pipelined host update and the synchronous one);
//! the asynchronous copies through page-locked buffers against the synchronous ones.
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
    let run = |place: Place, pipelined: bool| {
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
        if let Some(h) = t.opt.host.as_mut() {
            // Page-locked state and staging on the virtual GPU, so the copies are asynchronous.
            assert!(h.m[0].pinned() && h.master.as_ref().unwrap()[0].pinned());
            h.pipelined = pipelined;
        }
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
    let (wd, sd) = run(Place::Device, true);
    assert_ne!(wd, host);
    let bits = |x: &Vec<Vec<f32>>| -> Vec<Vec<u32>> {
        x.iter()
            .map(|t| t.iter().map(|v| v.to_bits()).collect())
            .collect()
    };
    for pipelined in [true, false] {
        let (wh, sh) = run(Place::Host, pipelined);
        assert_eq!(bits(&wd), bits(&wh), "bf16 weights, pipelined {pipelined}");
        assert_eq!(
            bits(&sd),
            bits(&sh),
            "optimizer state, pipelined {pipelined}"
        );
    }
}

/// `download_f32_async` and `upload_async` through page-locked buffers against the synchronous
/// copies: odd sizes, several tensors per copy, destinations poisoned with NaN, a device write
/// queued just before the download (which must see it), a staging buffer reused after its copy,
/// and too-small host buffers as errors.
#[test]
fn async_copies_through_page_locked_buffers_match_the_synchronous_ones() {
    let Some(c) = gpu() else { return };
    let mut r = seed("cuda_host_optimizer async copies");
    let sizes = [1usize, 257, 4099, 3];
    let total: usize = sizes.iter().sum();
    let vals: Vec<Vec<f32>> = sizes.iter().map(|&n| randv(&mut r, n, 3.0)).collect();
    let mut dev: Vec<_> = vals.iter().map(|v| c.upload_f32(v).unwrap()).collect();
    // Queued on the compute stream just before the download: the download sees it.
    c.fill_f32(&mut dev[1], sizes[1], 0.75).unwrap();
    let mut dst = c.host_f32(total + 5).unwrap();
    if virtual_gpu(&c) {
        assert!(dst.pinned(), "page-locked host buffer");
    }
    dst.iter_mut().for_each(|x| *x = f32::NAN);
    let src: Vec<_> = dev.iter().zip(&sizes).map(|(t, &n)| (t, n)).collect();
    let got = c.download_f32_async(&src, dst).unwrap().wait().unwrap();
    let mut at = 0;
    for (t, &n) in dev.iter().zip(&sizes) {
        let want = c.download_f32(t, n).unwrap();
        assert_eq!(
            got[at..at + n]
                .iter()
                .map(|x| x.to_bits())
                .collect::<Vec<_>>(),
            want.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            "download of {n} values at {at}"
        );
        at += n;
    }
    assert!(
        got[total..].iter().all(|x| x.is_nan()),
        "past the copied values"
    );
    assert!(c
        .download_f32_async(&src, c.host_f32(total - 1).unwrap())
        .is_err());

    let mut stage = c.host_f32(total).unwrap();
    stage.iter_mut().for_each(|x| *x = f32::NAN);
    let slices: Vec<&[f32]> = vals.iter().map(|v| &v[..]).collect();
    let (ts, mut copy) = c.upload_async(&slices, stage).unwrap();
    copy.order().unwrap();
    let want: Vec<Vec<u32>> = vals
        .iter()
        .map(|v| {
            let t = c.upload(v).unwrap();
            c.download(&t, v.len())
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect()
        })
        .collect();
    let down = |ts: &[<Cuda as Backend>::T]| -> Vec<Vec<u32>> {
        ts.iter()
            .zip(&sizes)
            .map(|(t, &n)| {
                c.download(t, n)
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect()
            })
            .collect()
    };
    assert_eq!(down(&ts), want, "bf16 uploads");
    // The staging buffer back after its copy, reused: the first tensors keep their values.
    let stage = copy.wait().unwrap();
    let other: Vec<Vec<f32>> = sizes.iter().map(|&n| randv(&mut r, n, 1.0)).collect();
    let slices2: Vec<&[f32]> = other.iter().map(|v| &v[..]).collect();
    let (ts2, copy2) = c.upload_async(&slices2, stage).unwrap();
    drop(copy2.wait().unwrap());
    assert_eq!(
        down(&ts),
        want,
        "bf16 uploads after the staging buffer was reused"
    );
    assert_ne!(down(&ts2), want);
    assert!(c
        .upload_async(&slices, c.host_f32(total - 1).unwrap())
        .is_err());
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
