//! The Qwen2 schedule on the CPU backend, on tiny random models: full-model gradients against
//! finite differences, recomputation, KV-cache generation against the teacher-forced pass, and
//! the fused logprobs/entropy against explicit softmaxes. Fresh random models and inputs on
//! every run (the seed is printed).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tooln1::backend::cpu::Cpu;
use tooln1::backend::Backend;
use tooln1::model::{Model, PackedBatch, Qwen2Config};

fn seed(test: &str) -> u64 {
    let s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    println!("{test}: seed = {s}");
    s
}

fn tiny_cfg(tied: bool) -> Qwen2Config {
    Qwen2Config {
        architectures: vec!["Qwen2ForCausalLM".into()],
        hidden_size: 24,
        intermediate_size: 20,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 6,
        vocab_size: 37,
        rms_norm_eps: 1e-6,
        rope_theta: 10000.0,
        max_position_embeddings: 64,
        tie_word_embeddings: tied,
        bos_token_id: None,
        eos_token_id: vec![1],
        torch_dtype: "float32".into(),
        hidden_act: "silu".into(),
    }
}

fn random_seqs(r: &mut ChaCha8Rng, lens: &[usize], vocab: usize) -> Vec<Vec<u32>> {
    lens.iter()
        .map(|&l| (0..l).map(|_| r.random_range(0..vocab as u32)).collect())
        .collect()
}

/// L = Σ_t w_t · logp_t in f64 from the no-grad path.
fn objective(b: &Cpu, m: &Model<Cpu>, batch: &PackedBatch, w: &[f32]) -> f64 {
    let db = m.upload_batch(b, batch).unwrap();
    let (lp, _) = m.logprobs(b, &db, false).unwrap();
    lp.iter().zip(w).map(|(a, b)| *a as f64 * *b as f64).sum()
}

fn grads_of(
    b: &Cpu,
    m: &Model<Cpu>,
    batch: &PackedBatch,
    w: &[f32],
    recompute: bool,
) -> Vec<Vec<f32>> {
    let db = m.upload_batch(b, batch).unwrap();
    let tape = m.forward_train(b, &db, false, recompute).unwrap();
    let mut g = m.zero_grads(b).unwrap();
    let dl = b.upload_f32(w).unwrap();
    m.backward(b, &db, tape, &dl, &mut g).unwrap();
    g
}

fn full_model_grad_check(tied: bool) {
    let s = seed(if tied {
        "grad_fd_tied"
    } else {
        "grad_fd_untied"
    });
    let mut r = ChaCha8Rng::seed_from_u64(s);
    let b = Cpu;
    let cfg = tiny_cfg(tied);
    let mut m = Model::random(&b, cfg.clone(), r.random()).unwrap();
    let seqs = random_seqs(&mut r, &[2, 6, 8], cfg.vocab_size);
    let batch = PackedBatch::from_sequences(&seqs).unwrap();
    let w: Vec<f32> = (0..batch.n_tok())
        .map(|_| r.random_range(-1.0..1.0))
        .collect();
    let g = grads_of(&b, &m, &batch, &w, false);
    let h = 1e-2f32;
    let (mut checked, mut worst) = (0, 0.0f64);
    for (pi, spec) in m.layout.specs.clone().iter().enumerate() {
        let n = spec.numel();
        // the entries with the largest gradients plus a few random ones
        let mut idx: Vec<usize> = (0..n).collect();
        idx.sort_by(|&a, &c| g[pi][c].abs().total_cmp(&g[pi][a].abs()));
        let mut pick: Vec<usize> = idx[..3.min(n)].to_vec();
        for _ in 0..3 {
            pick.push(r.random_range(0..n));
        }
        for &j in &pick {
            let x0 = m.params[pi][j];
            m.params[pi][j] = x0 + h;
            let fp = objective(&b, &m, &batch, &w);
            m.params[pi][j] = x0 - h;
            let fm = objective(&b, &m, &batch, &w);
            m.params[pi][j] = x0;
            let num = (fp - fm) / (2.0 * h as f64);
            let ana = g[pi][j] as f64;
            assert!(ana.is_finite(), "{}[{j}] gradient is not finite", spec.name);
            let err = (ana - num).abs();
            if num.abs() > 0.05 {
                let rel = err / num.abs();
                worst = worst.max(rel);
                checked += 1;
                assert!(
                    rel < 2e-2,
                    "{}[{j}]: analytic {ana}, numeric {num} (rel {rel:.3e})",
                    spec.name
                );
            } else {
                assert!(
                    err < 2e-3,
                    "{}[{j}]: analytic {ana}, numeric {num}",
                    spec.name
                );
            }
        }
    }
    println!("tied = {tied}: {checked} entries with |g| > 0.05, worst rel err {worst:.2e}");
    assert!(
        checked >= 20,
        "too few meaningful entries checked ({checked})"
    );
}

#[test]
fn full_model_gradient_matches_finite_differences_untied() {
    full_model_grad_check(false);
}

#[test]
fn full_model_gradient_matches_finite_differences_tied() {
    full_model_grad_check(true);
}

#[test]
fn recompute_gives_the_same_gradients_and_grads_accumulate() {
    let s = seed("recompute");
    let mut r = ChaCha8Rng::seed_from_u64(s);
    let b = Cpu;
    for tied in [false, true] {
        let cfg = tiny_cfg(tied);
        let m = Model::random(&b, cfg.clone(), r.random()).unwrap();
        let seqs = random_seqs(&mut r, &[3, 9, 5, 2], cfg.vocab_size);
        let batch = PackedBatch::from_sequences(&seqs).unwrap();
        let w: Vec<f32> = (0..batch.n_tok())
            .map(|_| r.random_range(-1.0..1.0))
            .collect();
        let g1 = grads_of(&b, &m, &batch, &w, false);
        let g2 = grads_of(&b, &m, &batch, &w, true);
        for (i, (a, c)) in g1.iter().zip(&g2).enumerate() {
            let scale = a.iter().fold(0.0f32, |x, v| x.max(v.abs())).max(1e-30);
            let err = a
                .iter()
                .zip(c)
                .fold(0.0f32, |x, (p, q)| x.max((p - q).abs()));
            assert!(
                err / scale < 1e-6,
                "{}: recompute differs by {err}",
                m.layout.specs[i].name
            );
        }
        // two backward passes into the same buffers add up
        let db = m.upload_batch(&b, &batch).unwrap();
        let dl = b.upload_f32(&w).unwrap();
        let mut g = m.zero_grads(&b).unwrap();
        for rc in [false, true] {
            let tape = m.forward_train(&b, &db, false, rc).unwrap();
            m.backward(&b, &db, tape, &dl, &mut g).unwrap();
        }
        for (a, c) in g.iter().zip(&g1) {
            for (p, q) in a.iter().zip(c) {
                assert!((p - 2.0 * q).abs() <= 1e-5 * (1.0 + q.abs()));
            }
        }
    }
}

fn log_softmax_row(z: &[f32]) -> Vec<f64> {
    let mx = z.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
    let l = mx + z.iter().map(|&v| (v as f64 - mx).exp()).sum::<f64>().ln();
    z.iter().map(|&v| v as f64 - l).collect()
}

#[test]
fn logprobs_and_entropy_match_explicit_softmax() {
    let s = seed("logprobs_entropy");
    let mut r = ChaCha8Rng::seed_from_u64(s);
    let b = Cpu;
    for tied in [false, true] {
        let cfg = tiny_cfg(tied);
        let v = cfg.vocab_size;
        let m = Model::random(&b, cfg.clone(), r.random()).unwrap();
        let seqs = random_seqs(&mut r, &[2, 7, 4], v);
        let batch = PackedBatch::from_sequences(&seqs).unwrap();
        let db = m.upload_batch(&b, &batch).unwrap();
        let logits = m.forward_logits(&b, &db).unwrap();
        let (lp, ent) = m.logprobs(&b, &db, true).unwrap();
        let ent = ent.unwrap();
        let tape = m.forward_train(&b, &db, true, false).unwrap();
        let tlp = b.download_f32(&tape.logp, tape.n_tok).unwrap();
        let tent = b
            .download_f32(tape.entropy.as_ref().unwrap(), tape.n_tok)
            .unwrap();
        for t in 0..batch.n_tok() {
            let ls = log_softmax_row(&logits[t * v..(t + 1) * v]);
            let want = ls[batch.targets[t] as usize];
            assert!(
                (lp[t] as f64 - want).abs() < 1e-5,
                "logp[{t}] {} vs {want}",
                lp[t]
            );
            let h: f64 = -ls.iter().map(|x| x.exp() * x).sum::<f64>();
            assert!(
                (ent[t] as f64 - h).abs() < 1e-4,
                "entropy[{t}] {} vs {h}",
                ent[t]
            );
            assert_eq!(tlp[t], lp[t]);
            assert_eq!(tent[t], ent[t]);
        }
    }
}

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

#[test]
fn prefill_and_decode_match_the_teacher_forced_pass() {
    let s = seed("prefill_decode");
    let mut r = ChaCha8Rng::seed_from_u64(s);
    let b = Cpu;
    let cfg = tiny_cfg(false);
    let v = cfg.vocab_size;
    let m = Model::random(&b, cfg, r.random()).unwrap();
    let prompts = random_seqs(&mut r, &[1, 4, 6], v);
    let steps = 6;
    let max_len = 6 + steps;
    let mut cache = m.new_cache(&b, 4, max_len).unwrap();
    let mut seqs = prompts.clone();
    // logits of the last token of a sequence from the whole-sequence pass
    let full_last = |seqs: &[Vec<u32>]| -> Vec<Vec<f32>> {
        seqs.iter()
            .map(|s| {
                let n = s.len();
                let batch = PackedBatch {
                    tokens: s.clone(),
                    targets: vec![0; n],
                    cu_seqlens: vec![0, n as u32],
                    positions: (0..n as u32).collect(),
                    ..Default::default()
                };
                let db = m.upload_batch(&b, &batch).unwrap();
                m.forward_logits(&b, &db).unwrap()[(n - 1) * v..].to_vec()
            })
            .collect()
    };
    let out = m.prefill(&b, &mut cache, &prompts).unwrap();
    let out = b.download_f32(&out, prompts.len() * v).unwrap();
    let mut worst = 0.0f64;
    for (i, want) in full_last(&seqs).iter().enumerate() {
        let e = rel_err(&out[i * v..(i + 1) * v], want);
        worst = worst.max(e);
        assert!(e < 1e-5, "prefill slot {i}: rel err {e:.3e}");
    }
    assert_eq!(&cache.lens[..3], &[1, 4, 6]);
    for step in 0..steps {
        let toks: Vec<u32> = (0..prompts.len())
            .map(|_| r.random_range(0..v as u32))
            .collect();
        for (s, &t) in seqs.iter_mut().zip(&toks) {
            s.push(t);
        }
        let out = m.decode(&b, &mut cache, &toks).unwrap();
        let out = b.download_f32(&out, toks.len() * v).unwrap();
        for (i, want) in full_last(&seqs).iter().enumerate() {
            let e = rel_err(&out[i * v..(i + 1) * v], want);
            worst = worst.max(e);
            assert!(e < 1e-5, "decode step {step} slot {i}: rel err {e:.3e}");
        }
    }
    println!("prefill/decode vs forward_logits: worst rel err {worst:.2e}");
    // the slot holding the longest sequence is now full
    assert_eq!(cache.lens[2] as usize, max_len);
    assert!(m.decode(&b, &mut cache, &[0, 0, 0]).is_err());
}

#[test]
fn bad_inputs_are_errors() {
    let b = Cpu;
    let cfg = tiny_cfg(true);
    let m = Model::random(&b, cfg, 1).unwrap();
    let mut batch = PackedBatch::from_sequences(&[vec![1, 2, 3]]).unwrap();
    batch.targets[1] = 99;
    let e = m.upload_batch(&b, &batch).err().unwrap().to_string();
    assert!(e.contains("targets[1]"), "{e}");
    let mut cache = m.new_cache(&b, 2, 4).unwrap();
    assert!(m.prefill(&b, &mut cache, &[vec![1; 5]]).is_err());
    assert!(m.prefill(&b, &mut cache, &[vec![], vec![1]]).is_err());
    assert!(m
        .prefill(&b, &mut cache, &[vec![1], vec![1], vec![1]])
        .is_err());
    assert!(m.decode(&b, &mut cache, &[1, 2, 3]).is_err());
    let good = PackedBatch::from_sequences(&[vec![1, 2, 3]]).unwrap();
    let db = m.upload_batch(&b, &good).unwrap();
    let tape = m.forward_train(&b, &db, false, true).unwrap();
    let mut too_few = vec![b.zeros_f32(1).unwrap()];
    let dl = b.upload_f32(&[1.0, 1.0]).unwrap();
    assert!(m.backward(&b, &db, tape, &dl, &mut too_few).is_err());
}
