//! The shared-prompt layout on the CPU backend: the prefixed attention op against a naive
//! reference (each response as its own prompt + response sequence) in f64 and f32, its backward
//! against f64 finite differences, thread-count independence, the row scatter-add; then the
//! model and the GRPO passes: shared and per-sequence passes give the same logprobs, GRPO loss
//! and parameter gradients, and response-only logits give the full pass's numbers.
//! Seeds are printed; `TOOLN1_TEST_SEED=<n>` replays one.

mod common;

use common::{check, check32, to32, Rng};
use tooln1::backend::cpu::{math, Cpu};
use tooln1::backend::{AttnGrads, AttnSaved, Qkv};
use tooln1::backend::{Backend, GrpoLossCfg, Heads, KlKind, LossAgg, Packed, Prefix};
use tooln1::model::{init, Group, Model, PackedBatch};
use tooln1::train::grpo::{self, Layout, TrainSeq};

/// One group of a [`Packing`]: prompt start, prompt length, response segments as
/// (start, length).
type GroupRows = (usize, usize, Vec<(usize, usize)>);

/// A random shared layout; segment lengths may be 0 (a one-token response).
struct Packing {
    cu: Vec<u32>,
    prefix: Vec<u32>,
    groups: Vec<GroupRows>,
}

fn packing(r: &mut Rng, n_groups: usize, max_p: usize, max_r: usize) -> Packing {
    let mut p = Packing {
        cu: vec![0],
        prefix: Vec::new(),
        groups: Vec::new(),
    };
    let mut at = 0usize;
    for _ in 0..n_groups {
        let plen = 1 + r.below(max_p);
        let n = 1 + r.below(6);
        let p0 = at;
        at += plen;
        p.cu.push(at as u32);
        p.prefix.extend([p0 as u32, p0 as u32]);
        let mut resp = Vec::new();
        for _ in 0..n {
            let len = r.below(max_r + 1);
            resp.push((at, len));
            at += len;
            p.cu.push(at as u32);
            p.prefix.extend([p0 as u32, (p0 + plen) as u32]);
        }
        p.groups.push((p0, plen, resp));
    }
    p
}

fn f64v(r: &mut Rng, n: usize) -> Vec<f64> {
    r.vec(n, 1.0).into_iter().map(|x| x as f64).collect()
}

fn rows(x: &[f64], rows: &[usize], w: usize) -> Vec<f64> {
    rows.iter()
        .flat_map(|&i| x[i * w..(i + 1) * w].iter().copied())
        .collect()
}

/// Reference forward and backward of the shared layout from plain causal attention over each
/// response's own prompt + response sequence (and the prompt alone for the prompt rows). The
/// prompt rows carry their upstream gradient in the first response's copy only, so summing the
/// copies' prompt gradients gives the shared layout's.
#[allow(clippy::type_complexity)]
fn reference(
    p: &Packing,
    (q, k, v, dout): (&[f64], &[f64], &[f64], &[f64]),
    (nh, nkv, hd): (usize, usize, usize),
) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let n_tok = *p.cu.last().unwrap() as usize;
    let (qs, ks) = (nh * hd, nkv * hd);
    let mut out = vec![f64::NAN; n_tok * qs];
    let mut lse = vec![f64::NAN; nh * n_tok];
    let (mut dq, mut dk, mut dv) = (
        vec![0.0; n_tok * qs],
        vec![0.0; n_tok * ks],
        vec![0.0; n_tok * ks],
    );
    for (p0, plen, resp) in &p.groups {
        for (j, &(s0, len)) in resp.iter().enumerate() {
            let idx: Vec<usize> = (*p0..p0 + plen).chain(s0..s0 + len).collect();
            let m = idx.len();
            let (qq, kk, vv) = (rows(q, &idx, qs), rows(k, &idx, ks), rows(v, &idx, ks));
            let mut dd = rows(dout, &idx, qs);
            if j > 0 {
                dd[..plen * qs].fill(0.0);
            }
            let cu = [0u32, m as u32];
            let (mut o, mut l) = (vec![f64::NAN; m * qs], vec![f64::NAN; nh * m]);
            math::attention(
                Qkv {
                    q: &qq,
                    k: &kk,
                    v: &vv,
                },
                &mut o,
                &mut l,
                &cu,
                Heads {
                    n_heads: nh,
                    n_kv: nkv,
                    head_dim: hd,
                },
            );
            let (mut gq, mut gk, mut gv) =
                (vec![0.0; m * qs], vec![0.0; m * ks], vec![0.0; m * ks]);
            math::attention_bwd(
                Qkv {
                    q: &qq,
                    k: &kk,
                    v: &vv,
                },
                AttnSaved {
                    dout: &dd,
                    out: &o,
                    lse: &l,
                },
                AttnGrads {
                    dq: &mut gq,
                    dk: &mut gk,
                    dv: &mut gv,
                },
                &cu,
                Heads {
                    n_heads: nh,
                    n_kv: nkv,
                    head_dim: hd,
                },
            );
            for (a, &i) in idx.iter().enumerate() {
                if a >= *plen || j == 0 {
                    out[i * qs..(i + 1) * qs].copy_from_slice(&o[a * qs..(a + 1) * qs]);
                    for h in 0..nh {
                        lse[h * n_tok + i] = l[h * m + a];
                    }
                }
                for c in 0..qs {
                    dq[i * qs + c] += gq[a * qs + c];
                }
                for c in 0..ks {
                    dk[i * ks + c] += gk[a * ks + c];
                    dv[i * ks + c] += gv[a * ks + c];
                }
            }
        }
    }
    (out, lse, dq, dk, dv)
}

fn close64(name: &str, a: &[f64], b: &[f64], tol: f64) {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    let e = (num / den.max(1e-300)).sqrt();
    println!("{name}: rel err {e:.3e} (bound {tol:.0e})");
    assert!(e.is_finite() && e < tol, "{name}: rel err {e} >= {tol}");
}

#[test]
fn prefixed_attention_matches_per_sequence_reference() {
    let mut r = Rng::new("prefixed_attention_matches_per_sequence_reference");
    for (case, (nh, nkv, hd, groups, max_p, max_r)) in [
        (4, 2, 8, 3, 9, 6),
        (2, 1, 6, 2, 150, 90),
        (3, 3, 4, 4, 70, 70),
    ]
    .into_iter()
    .enumerate()
    {
        let p = packing(&mut r, groups, max_p, max_r);
        let n_tok = *p.cu.last().unwrap() as usize;
        let max_len =
            p.cu.windows(2)
                .map(|w| (w[1] - w[0]) as usize)
                .max()
                .unwrap();
        let (qs, ks) = (nh * hd, nkv * hd);
        let (q, k, v, dout) = (
            f64v(&mut r, n_tok * qs),
            f64v(&mut r, n_tok * ks),
            f64v(&mut r, n_tok * ks),
            f64v(&mut r, n_tok * qs),
        );
        let (ro, rl, rdq, rdk, rdv) = reference(&p, (&q, &k, &v, &dout), (nh, nkv, hd));
        // f64 generic math against the reference
        let (mut o, mut l) = (vec![f64::NAN; n_tok * qs], vec![f64::NAN; nh * n_tok]);
        math::attention_prefixed(
            Qkv {
                q: &q,
                k: &k,
                v: &v,
            },
            &mut o,
            &mut l,
            &p.cu,
            &p.prefix,
            Heads {
                n_heads: nh,
                n_kv: nkv,
                head_dim: hd,
            },
        );
        close64(&format!("case {case}: f64 out"), &o, &ro, 1e-12);
        close64(&format!("case {case}: f64 lse"), &l, &rl, 1e-12);
        let (mut dq, mut dk, mut dv) = (
            vec![f64::NAN; n_tok * qs],
            vec![f64::NAN; n_tok * ks],
            vec![f64::NAN; n_tok * ks],
        );
        math::attention_prefixed_bwd(
            Qkv {
                q: &q,
                k: &k,
                v: &v,
            },
            AttnSaved {
                dout: &dout,
                out: &o,
                lse: &l,
            },
            AttnGrads {
                dq: &mut dq,
                dk: &mut dk,
                dv: &mut dv,
            },
            &p.cu,
            &p.prefix,
            Heads {
                n_heads: nh,
                n_kv: nkv,
                head_dim: hd,
            },
        );
        close64(&format!("case {case}: f64 dq"), &dq, &rdq, 1e-11);
        close64(&format!("case {case}: f64 dk"), &dk, &rdk, 1e-11);
        close64(&format!("case {case}: f64 dv"), &dv, &rdv, 1e-11);
        // the CPU backend (f32 fast path), outputs poisoned first
        let b = Cpu;
        let (mut fo, mut fl) = (vec![f32::NAN; n_tok * qs], vec![f32::NAN; nh * n_tok]);
        b.attention_prefixed(
            Qkv {
                q: &to32(&q),
                k: &to32(&k),
                v: &to32(&v),
            },
            &mut fo,
            &mut fl,
            &Packed {
                cu_seqlens: &p.cu,
                cu_host: &p.cu,
                max_len,
            },
            &Prefix {
                prefix: &p.prefix,
                prefix_host: &p.prefix,
            },
            Heads {
                n_heads: nh,
                n_kv: nkv,
                head_dim: hd,
            },
        )
        .unwrap();
        check(&format!("case {case}: f32 out"), &fo, &ro, 1e-5);
        check(&format!("case {case}: f32 lse"), &fl, &rl, 1e-5);
        let (mut fdq, mut fdk, mut fdv) = (
            vec![f32::NAN; n_tok * qs],
            vec![f32::NAN; n_tok * ks],
            vec![f32::NAN; n_tok * ks],
        );
        b.attention_prefixed_bwd(
            Qkv {
                q: &to32(&q),
                k: &to32(&k),
                v: &to32(&v),
            },
            AttnSaved {
                dout: &to32(&dout),
                out: &to32(&o),
                lse: &to32(&l),
            },
            AttnGrads {
                dq: &mut fdq,
                dk: &mut fdk,
                dv: &mut fdv,
            },
            &Packed {
                cu_seqlens: &p.cu,
                cu_host: &p.cu,
                max_len,
            },
            &Prefix {
                prefix: &p.prefix,
                prefix_host: &p.prefix,
            },
            Heads {
                n_heads: nh,
                n_kv: nkv,
                head_dim: hd,
            },
        )
        .unwrap();
        check(&format!("case {case}: f32 dq"), &fdq, &rdq, 1e-4);
        check(&format!("case {case}: f32 dk"), &fdk, &rdk, 1e-4);
        check(&format!("case {case}: f32 dv"), &fdv, &rdv, 1e-4);
    }
}

#[test]
fn prefixed_attention_backward_matches_finite_differences() {
    let mut r = Rng::new("prefixed_attention_backward_matches_finite_differences");
    let (nh, nkv, hd) = (2, 1, 4);
    let p = packing(&mut r, 2, 5, 4);
    let n_tok = *p.cu.last().unwrap() as usize;
    let (qs, ks) = (nh * hd, nkv * hd);
    let (q, k, v, w) = (
        f64v(&mut r, n_tok * qs),
        f64v(&mut r, n_tok * ks),
        f64v(&mut r, n_tok * ks),
        f64v(&mut r, n_tok * qs),
    );
    let loss = |q: &[f64], k: &[f64], v: &[f64]| -> f64 {
        let (mut o, mut l) = (vec![f64::NAN; n_tok * qs], vec![f64::NAN; nh * n_tok]);
        math::attention_prefixed(
            Qkv { q, k, v },
            &mut o,
            &mut l,
            &p.cu,
            &p.prefix,
            Heads {
                n_heads: nh,
                n_kv: nkv,
                head_dim: hd,
            },
        );
        o.iter().zip(&w).map(|(a, b)| a * b).sum()
    };
    let (mut o, mut l) = (vec![f64::NAN; n_tok * qs], vec![f64::NAN; nh * n_tok]);
    math::attention_prefixed(
        Qkv {
            q: &q,
            k: &k,
            v: &v,
        },
        &mut o,
        &mut l,
        &p.cu,
        &p.prefix,
        Heads {
            n_heads: nh,
            n_kv: nkv,
            head_dim: hd,
        },
    );
    let (mut dq, mut dk, mut dv) = (
        vec![f64::NAN; n_tok * qs],
        vec![f64::NAN; n_tok * ks],
        vec![f64::NAN; n_tok * ks],
    );
    math::attention_prefixed_bwd(
        Qkv {
            q: &q,
            k: &k,
            v: &v,
        },
        AttnSaved {
            dout: &w,
            out: &o,
            lse: &l,
        },
        AttnGrads {
            dq: &mut dq,
            dk: &mut dk,
            dv: &mut dv,
        },
        &p.cu,
        &p.prefix,
        Heads {
            n_heads: nh,
            n_kv: nkv,
            head_dim: hd,
        },
    );
    let eps = 1e-6;
    let fd = |which: usize| -> Vec<f64> {
        let base = [&q, &k, &v][which];
        (0..base.len())
            .map(|i| {
                let mut xs = [q.clone(), k.clone(), v.clone()];
                xs[which][i] += eps;
                let up = loss(&xs[0], &xs[1], &xs[2]);
                xs[which][i] -= 2.0 * eps;
                let dn = loss(&xs[0], &xs[1], &xs[2]);
                (up - dn) / (2.0 * eps)
            })
            .collect()
    };
    close64("fd dq", &dq, &fd(0), 1e-7);
    close64("fd dk", &dk, &fd(1), 1e-7);
    close64("fd dv", &dv, &fd(2), 1e-7);
}

#[test]
fn prefixed_attention_is_independent_of_the_thread_count() {
    let mut r = Rng::new("prefixed_attention_is_independent_of_the_thread_count");
    let (nh, nkv, hd) = (4, 2, 8);
    let p = packing(&mut r, 3, 140, 80);
    let n_tok = *p.cu.last().unwrap() as usize;
    let max_len =
        p.cu.windows(2)
            .map(|w| (w[1] - w[0]) as usize)
            .max()
            .unwrap();
    let (qs, ks) = (nh * hd, nkv * hd);
    let (q, k, v, dout) = (
        r.vec(n_tok * qs, 1.0),
        r.vec(n_tok * ks, 1.0),
        r.vec(n_tok * ks, 1.0),
        r.vec(n_tok * qs, 1.0),
    );
    let b = Cpu;
    let mut runs: Vec<Vec<Vec<f32>>> = Vec::new();
    for threads in [1, 2, 3] {
        tooln1::backend::cpu::set_num_threads(threads);
        let (mut o, mut l) = (vec![f32::NAN; n_tok * qs], vec![f32::NAN; nh * n_tok]);
        b.attention_prefixed(
            Qkv {
                q: &q,
                k: &k,
                v: &v,
            },
            &mut o,
            &mut l,
            &Packed {
                cu_seqlens: &p.cu,
                cu_host: &p.cu,
                max_len,
            },
            &Prefix {
                prefix: &p.prefix,
                prefix_host: &p.prefix,
            },
            Heads {
                n_heads: nh,
                n_kv: nkv,
                head_dim: hd,
            },
        )
        .unwrap();
        let (mut dq, mut dk, mut dv) = (
            vec![f32::NAN; n_tok * qs],
            vec![f32::NAN; n_tok * ks],
            vec![f32::NAN; n_tok * ks],
        );
        b.attention_prefixed_bwd(
            Qkv {
                q: &q,
                k: &k,
                v: &v,
            },
            AttnSaved {
                dout: &dout,
                out: &o,
                lse: &l,
            },
            AttnGrads {
                dq: &mut dq,
                dk: &mut dk,
                dv: &mut dv,
            },
            &Packed {
                cu_seqlens: &p.cu,
                cu_host: &p.cu,
                max_len,
            },
            &Prefix {
                prefix: &p.prefix,
                prefix_host: &p.prefix,
            },
            Heads {
                n_heads: nh,
                n_kv: nkv,
                head_dim: hd,
            },
        )
        .unwrap();
        runs.push(vec![o, l, dq, dk, dv]);
    }
    tooln1::backend::cpu::set_num_threads(0);
    for (t, run) in runs.iter().enumerate().skip(1) {
        for (i, (a, b)) in run.iter().zip(&runs[0]).enumerate() {
            assert!(a.iter().all(|x| x.is_finite()), "output {i} not finite");
            let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "output {i}: {} threads differ from 1", t + 1);
        }
    }
}

#[test]
fn prefixed_attention_rejects_bad_tables() {
    let b = Cpu;
    let (nh, nkv, hd) = (2, 1, 4);
    let cu = vec![0u32, 3, 5, 6];
    let n_tok = 6;
    let q = vec![0.5f32; n_tok * nh * hd];
    let kv = vec![0.5f32; n_tok * nkv * hd];
    let run = |prefix_dev: &Vec<u32>, prefix_host: &[u32]| {
        let (mut o, mut l) = (vec![0f32; q.len()], vec![0f32; nh * n_tok]);
        b.attention_prefixed(
            Qkv {
                q: &q,
                k: &kv,
                v: &kv,
            },
            &mut o,
            &mut l,
            &Packed {
                cu_seqlens: &cu,
                cu_host: &cu,
                max_len: 3,
            },
            &Prefix {
                prefix: prefix_dev,
                prefix_host,
            },
            Heads {
                n_heads: nh,
                n_kv: nkv,
                head_dim: hd,
            },
        )
    };
    let good = vec![0u32, 0, 0, 3, 0, 3];
    run(&good, &good).unwrap();
    for (bad, want) in [
        (vec![0u32, 0, 0, 3], "2 entries per segment"),
        (vec![0u32, 0, 0, 4, 0, 3], "lo <= hi <= 3"),
        (vec![0u32, 0, 2, 1, 0, 3], "lo <= hi"),
        (vec![0u32, 1, 0, 3, 0, 3], "lo <= hi <= 0"),
    ] {
        let e = run(&bad, &bad).unwrap_err().to_string();
        assert!(e.contains("prefix") && e.contains(want), "{e}");
    }
    let e = run(&vec![0u32, 0, 0, 2, 0, 3], &good)
        .unwrap_err()
        .to_string();
    assert!(e.contains("the entries of prefix_host"), "{e}");
}

#[test]
fn scatter_add_rows_sums_repeated_rows() {
    let mut r = Rng::new("scatter_add_rows_sums_repeated_rows");
    let (n, rows_n, dim) = (23, 7, 5);
    let ids: Vec<u32> = (0..n).map(|_| r.below(rows_n) as u32).collect();
    let src = r.vec(n * dim, 1.0);
    let base = r.vec(rows_n * dim, 1.0);
    let mut want: Vec<f64> = base.iter().map(|&x| x as f64).collect();
    for t in 0..n {
        for d in 0..dim {
            want[ids[t] as usize * dim + d] += src[t * dim + d] as f64;
        }
    }
    let mut dst = base.clone();
    Cpu.scatter_add_rows(&ids, &src, &mut dst, n, rows_n, dim)
        .unwrap();
    check("scatter_add_rows", &dst, &want, 1e-6);
    let bad: Vec<u32> = vec![rows_n as u32; n];
    let e = Cpu
        .scatter_add_rows(&bad, &src, &mut dst, n, rows_n, dim)
        .unwrap_err()
        .to_string();
    assert!(e.contains("ids[0] = ") && e.contains("dst_rows"), "{e}");
}

/// Random GRPO groups: each `n` consecutive sequences share one prompt.
fn groups(r: &mut Rng, vocab: usize, n_groups: usize, max_p: usize, max_r: usize) -> Vec<TrainSeq> {
    let mut out = Vec::new();
    for _ in 0..n_groups {
        let plen = 1 + r.below(max_p);
        let prompt: Vec<u32> = (0..plen).map(|_| r.below(vocab) as u32).collect();
        let n = 1 + r.below(6);
        for _ in 0..n {
            let rl = 1 + r.below(max_r);
            let mut tokens = prompt.clone();
            tokens.extend((0..rl).map(|_| r.below(vocab) as u32));
            out.push(TrainSeq {
                tokens,
                prompt_len: plen,
                adv: r.uni() * 4.0 - 2.0,
            });
        }
    }
    out
}

fn model(r: &mut Rng, vocab: usize) -> Model<Cpu> {
    let tied = r.below(2) == 1;
    let cfg = init::tiny_config(32, 2, 4, 2, 40, vocab, tied);
    Model::random(&Cpu, cfg, r.next()).unwrap()
}

#[test]
fn shared_layout_gives_the_per_sequence_logprobs() {
    let mut r = Rng::new("shared_layout_gives_the_per_sequence_logprobs");
    let vocab = 53;
    let m = model(&mut r, vocab);
    let seqs = groups(&mut r, vocab, 4, 80, 30);
    let n_groups = grpo::prompt_groups(&seqs).len();
    assert_eq!(n_groups, 4);
    for inv_t in [1.0f32, 1.0 / 0.7] {
        let naive =
            grpo::response_logprobs(&Cpu, &m, &seqs, 100_000, inv_t, Layout::PerSequence).unwrap();
        for budget in [100_000, 60, 1] {
            let shared =
                grpo::response_logprobs(&Cpu, &m, &seqs, budget, inv_t, Layout::Shared).unwrap();
            for (i, (a, b)) in shared.iter().zip(&naive).enumerate() {
                assert_eq!(a.len(), seqs[i].n_response());
                check32(
                    &format!("seq {i} logprobs (1/T {inv_t}, budget {budget})"),
                    a,
                    b,
                    1e-5,
                );
            }
        }
    }
    let (rows, logits) = grpo::pass_rows(&seqs, Layout::Shared);
    let (rows_n, logits_n) = grpo::pass_rows(&seqs, Layout::PerSequence);
    assert!(rows < rows_n || seqs.len() == n_groups);
    assert_eq!(logits, seqs.iter().map(|s| s.n_response()).sum::<usize>());
    assert_eq!(logits_n, rows_n);
    // The FLOP count's work: the same rows, and the attention pairs of the per-sequence pass
    // less the prompt's own causal pairs, counted once per group instead of once per response.
    let w = grpo::pass_work(&seqs, Layout::Shared);
    let wn = grpo::pass_work(&seqs, Layout::PerSequence);
    assert_eq!((w.rows as usize, w.logit_rows as usize), (rows, logits));
    assert_eq!(
        (wn.rows as usize, wn.logit_rows as usize),
        (rows_n, logits_n)
    );
    let saved: u64 = grpo::prompt_groups(&seqs)
        .iter()
        .map(|g| {
            let p = seqs[g.start].prompt_len as u64;
            (g.len() as u64 - 1) * p * (p + 1) / 2
        })
        .sum();
    assert_eq!(w.attn_pairs, wn.attn_pairs - saved);
}

#[test]
fn shared_layout_gives_the_per_sequence_loss_and_gradients() {
    let mut r = Rng::new("shared_layout_gives_the_per_sequence_loss_and_gradients");
    let vocab = 41;
    let m = model(&mut r, vocab);
    let seqs = groups(&mut r, vocab, 3, 70, 12);
    let inv_t = 1.0 / 0.7;
    let cur =
        grpo::response_logprobs(&Cpu, &m, &seqs, 100_000, inv_t, Layout::PerSequence).unwrap();
    // old and reference away from the current logprobs so ratios clip and the KL is non-zero
    let old: Vec<Vec<f32>> = cur
        .iter()
        .map(|v| v.iter().map(|x| x + (r.uni() - 0.5) * 0.8).collect())
        .collect();
    let reference: Vec<Vec<f32>> = cur
        .iter()
        .map(|v| v.iter().map(|x| x + (r.uni() - 0.5) * 0.6).collect())
        .collect();
    for (agg, entropy_coef) in [
        (LossAgg::TokenMean, 0.01),
        (LossAgg::SeqMeanTokenSum, 0.0),
        (LossAgg::SeqMeanTokenMean, 0.0),
        (LossAgg::SeqMeanTokenSumNorm, 0.0),
    ] {
        let cfg = GrpoLossCfg {
            clip_low: 0.2,
            clip_high: 0.2,
            kl_coef: 0.1,
            kl_kind: KlKind::K3,
            agg,
            norm_len: 8.0,
            loss_scale_div: 1.0,
        };
        let mut g_naive = m.zero_grads(&Cpu).unwrap();
        let naive = grpo::accumulate_responses(
            &Cpu,
            &m,
            grpo::Scored {
                seqs: &seqs,
                old: &old,
                reference: &reference,
            },
            &grpo::PassCfg {
                loss: cfg,
                entropy_coef,
                budget: 100_000,
                recompute: false,
                inv_t,
                layout: Layout::PerSequence,
            },
            &mut g_naive,
        )
        .unwrap();
        for (budget, recompute) in [(100_000, false), (50, true), (1, false)] {
            let mut g = m.zero_grads(&Cpu).unwrap();
            let shared = grpo::accumulate_responses(
                &Cpu,
                &m,
                grpo::Scored {
                    seqs: &seqs,
                    old: &old,
                    reference: &reference,
                },
                &grpo::PassCfg {
                    loss: cfg,
                    entropy_coef,
                    budget,
                    recompute,
                    inv_t,
                    layout: Layout::Shared,
                },
                &mut g,
            )
            .unwrap();
            let tag = format!("{agg:?} budget {budget}");
            println!("{tag}: loss {} vs {}", shared.loss, naive.loss);
            assert!(
                (shared.loss - naive.loss).abs() < 1e-5 * (1.0 + naive.loss.abs()),
                "{tag}: loss {} vs {}",
                shared.loss,
                naive.loss
            );
            assert_eq!(shared.tokens, naive.tokens, "{tag}: tokens");
            for (name, a, b) in [
                ("pg_loss", shared.pg_loss, naive.pg_loss),
                ("kl_sum", shared.kl_sum, naive.kl_sum),
                ("clip_sum", shared.clip_sum, naive.clip_sum),
                ("ratio_sum", shared.ratio_sum, naive.ratio_sum),
                ("entropy_sum", shared.entropy_sum, naive.entropy_sum),
            ] {
                assert!(
                    (a - b).abs() < 1e-4 * (1.0 + b.abs()),
                    "{tag}: {name} {a} vs {b}"
                );
            }
            for (i, (a, b)) in g.iter().zip(&g_naive).enumerate() {
                let name = &m.layout.specs[i].name;
                check32(&format!("{tag}: grad {name}"), a, b, 2e-5);
            }
        }
        assert!(naive.clip_sum > 0.0, "{agg:?}: no clipped token");
    }
}

#[test]
fn logit_rows_give_the_full_pass_numbers() {
    // Response-only logits (SFT's assistant tokens) against the every-row pass.
    let mut r = Rng::new("logit_rows_give_the_full_pass_numbers");
    let vocab = 37;
    let m = model(&mut r, vocab);
    let seqs: Vec<Vec<u32>> = (0..4)
        .map(|_| {
            let l = 2 + r.below(40);
            (0..l).map(|_| r.below(vocab) as u32).collect()
        })
        .collect();
    let starts: Vec<usize> = seqs.iter().map(|s| 1 + r.below(s.len() - 1)).collect();
    let full = PackedBatch::from_sequences(&seqs).unwrap();
    let part = PackedBatch::from_sequences_from(&seqs, &starts).unwrap();
    let (db_full, db_part) = (
        m.upload_batch(&Cpu, &full).unwrap(),
        m.upload_batch(&Cpu, &part).unwrap(),
    );
    // per-row weights: nonzero only where the row is a logit row
    let mut w_full = vec![0f32; full.n_tok()];
    let mut w_part = Vec::new();
    for &row in &part.logit_rows {
        let w = r.uni() - 0.5;
        w_full[row as usize] = w;
        w_part.push(w);
    }
    let (lp_full, _) = m.logprobs(&Cpu, &db_full, false).unwrap();
    let (lp_part, _) = m.logprobs(&Cpu, &db_part, false).unwrap();
    let want: Vec<f32> = part
        .logit_rows
        .iter()
        .map(|&i| lp_full[i as usize])
        .collect();
    check32("logit-row logprobs", &lp_part, &want, 1e-6);
    let mut g_full = m.zero_grads(&Cpu).unwrap();
    let mut g_part = m.zero_grads(&Cpu).unwrap();
    for (db, w, g) in [
        (&db_full, &w_full, &mut g_full),
        (&db_part, &w_part, &mut g_part),
    ] {
        let tape = m.forward_train(&Cpu, db, false, true).unwrap();
        assert_eq!(tape.n_logits, w.len());
        let d = Cpu.upload_f32(w).unwrap();
        m.backward(&Cpu, db, tape, &d, g).unwrap();
    }
    for (i, (a, b)) in g_part.iter().zip(&g_full).enumerate() {
        check32(&format!("grad {}", m.layout.specs[i].name), a, b, 1e-5);
    }
    // a batch whose targets do not match its logit rows is an error, not a panic
    let mut bad = part.clone();
    bad.targets.pop();
    assert!(m.upload_batch(&Cpu, &bad).is_err());
    let mut bad = part.clone();
    bad.logit_rows[0] = full.n_tok() as u32;
    let e = m.upload_batch(&Cpu, &bad).err().unwrap().to_string();
    assert!(e.contains("logit_rows[0]"), "{e}");
}

#[test]
fn shared_groups_packs_prompt_then_responses() {
    let prompt = [5u32, 6, 7];
    let (r1, r2) = ([8u32, 9], [10u32]);
    let resp: [&[u32]; 2] = [&r1, &r2];
    let b = PackedBatch::shared_groups(&[Group {
        prompt: &prompt,
        responses: &resp,
    }])
    .unwrap();
    assert_eq!(b.tokens, vec![5, 6, 7, 8]);
    assert_eq!(b.cu_seqlens, vec![0, 3, 4, 4]);
    assert_eq!(b.positions, vec![0, 1, 2, 3]);
    assert_eq!(b.prefix, vec![0, 0, 0, 3, 0, 3]);
    assert_eq!(b.logit_rows, vec![2, 3, 2]);
    assert_eq!(b.targets, vec![8, 9, 10]);
    let empty: [&[u32]; 1] = [&[]];
    assert!(PackedBatch::shared_groups(&[Group {
        prompt: &prompt,
        responses: &empty,
    }])
    .is_err());
}
