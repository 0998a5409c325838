//! The CPU reference ops: finite-difference checks of every backward in f64 (the same generic
//! code the f32 backend runs), forward checks against naive implementations, sampling
//! statistics, AdamW, the KV-cache decode path and argument validation.
//!
//! Inputs are random and fresh on every run; the seed is printed (and shown on failure), and
//! `TOOLN1_TEST_SEED=<n>` replays it.

#![allow(clippy::needless_range_loop, clippy::too_many_arguments)]

mod common;

use common::to32;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tooln1::backend::cpu::{math, Cpu};
use tooln1::backend::{
    AdamWState, AdamWStep, Backend, Cached, DType, GemmDims, GrpoLossCfg, GrpoTokens, Heads,
    KlKind, LinearGrads, LossAgg, Packed,
};
use tooln1::backend::{AttnGrads, AttnSaved, Qkv};
use tooln1::backend::{
    KeptLogits, KvRows, LmHead, LogprobsGrads, LogprobsOut, NormDims, NormGrads, NormOut, RopeRows,
    VocabDims,
};

/// The test's random stream from [`common::seed`] (printed; `TOOLN1_TEST_SEED` replays it).
fn rng(test: &str) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(common::seed(test))
}

fn randv(r: &mut ChaCha8Rng, n: usize, a: f64) -> Vec<f64> {
    (0..n).map(|_| r.random_range(-a..a)).collect()
}

fn nan(n: usize) -> Vec<f64> {
    vec![f64::NAN; n]
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Central differences of `f` at `x`, compared with `analytic`: max |a − n| / max |n|.
fn fd_check(name: &str, x: &[f64], analytic: &[f64], f: impl Fn(&[f64]) -> f64, tol: f64) {
    assert_eq!(x.len(), analytic.len(), "{name}: gradient length");
    let mut xp = x.to_vec();
    let mut num = vec![0.0; x.len()];
    for i in 0..x.len() {
        let h = 1e-5 * x[i].abs().max(1.0);
        xp[i] = x[i] + h;
        let fp = f(&xp);
        xp[i] = x[i] - h;
        let fm = f(&xp);
        xp[i] = x[i];
        num[i] = (fp - fm) / (2.0 * h);
    }
    let scale = num.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let err = analytic
        .iter()
        .zip(&num)
        .fold(0.0f64, |m, (a, n)| m.max((a - n).abs()));
    assert!(
        analytic.iter().all(|v| v.is_finite()),
        "{name}: non-finite gradient"
    );
    assert!(
        scale > 1e-8,
        "{name}: gradient vanishes, the check would be empty"
    );
    let rel = err / scale;
    println!("{name}: max rel err {rel:.2e} over {} entries", x.len());
    assert!(rel < tol, "{name}: rel err {rel:.3e} >= {tol:e}");
}

const CU: [u32; 4] = [0, 1, 6, 13]; // 3 sequences of lengths 1, 5, 7

fn positions(cu: &[u32]) -> Vec<u32> {
    cu.windows(2).flat_map(|w| 0..w[1] - w[0]).collect()
}

// ------------------------------------------------------------------------------------ linear

#[test]
fn linear_grad() {
    let mut r = rng("linear_grad");
    let (m, n, k) = (7, 5, 9);
    let x = randv(&mut r, m * k, 1.0);
    let w = randv(&mut r, n * k, 1.0);
    let bias = randv(&mut r, n, 1.0);
    let c = randv(&mut r, m * n, 1.0);
    let fwd = |x: &[f64], w: &[f64], b: &[f64]| {
        let mut y = nan(m * n);
        math::linear(x, w, Some(b), &mut y, m, n, k);
        dot(&y, &c)
    };
    // forward vs explicit sums
    let mut y = nan(m * n);
    math::linear(&x, &w, Some(&bias), &mut y, m, n, k);
    for i in 0..m {
        for j in 0..n {
            let e: f64 = (0..k).map(|p| x[i * k + p] * w[j * k + p]).sum::<f64>() + bias[j];
            assert!((y[i * n + j] - e).abs() < 1e-12);
        }
    }
    let mut dx = nan(m * k);
    let dw0 = randv(&mut r, n * k, 1.0);
    let db0 = randv(&mut r, n, 1.0);
    let (mut dw, mut db) = (dw0.clone(), db0.clone());
    math::linear_bwd(
        &c,
        &x,
        &w,
        LinearGrads {
            dx: Some(&mut dx),
            accumulate_dx: false,
            dw: Some(&mut dw),
            dbias: Some(&mut db),
        },
        GemmDims { m, n, k },
    );
    let dw: Vec<f64> = dw.iter().zip(&dw0).map(|(a, b)| a - b).collect();
    let db: Vec<f64> = db.iter().zip(&db0).map(|(a, b)| a - b).collect();
    fd_check("linear dx", &x, &dx, |v| fwd(v, &w, &bias), 1e-7);
    fd_check("linear dw", &w, &dw, |v| fwd(&x, v, &bias), 1e-7);
    fd_check("linear dbias", &bias, &db, |v| fwd(&x, &w, v), 1e-7);
    // accumulate_dx adds to what is there
    let base = randv(&mut r, m * k, 1.0);
    let mut dx2 = base.clone();
    math::linear_bwd(
        &c,
        &x,
        &w,
        LinearGrads {
            dx: Some(&mut dx2),
            accumulate_dx: true,
            dw: None,
            dbias: None,
        },
        GemmDims { m, n, k },
    );
    for i in 0..m * k {
        assert!((dx2[i] - base[i] - dx[i]).abs() < 1e-12);
    }
}

// ------------------------------------------------------------------------------------ embedding

#[test]
fn embedding_grad() {
    let mut r = rng("embedding_grad");
    let (vocab, dim, n) = (11, 5, 13);
    let ids: Vec<u32> = (0..n).map(|_| r.random_range(0..vocab as u32)).collect();
    let table = randv(&mut r, vocab * dim, 1.0);
    let c = randv(&mut r, n * dim, 1.0);
    let mut out = nan(n * dim);
    math::embedding(&ids, &table, &mut out, n, dim);
    for t in 0..n {
        assert_eq!(
            &out[t * dim..(t + 1) * dim],
            &table[ids[t] as usize * dim..][..dim]
        );
    }
    let mut dt = vec![0.0; vocab * dim];
    math::embedding_bwd(&ids, &c, &mut dt, n, dim);
    fd_check(
        "embedding dtable",
        &table,
        &dt,
        |v| {
            let mut o = nan(n * dim);
            math::embedding(&ids, v, &mut o, n, dim);
            dot(&o, &c)
        },
        1e-7,
    );
}

// ------------------------------------------------------------------------------------ RMSNorm

#[test]
fn rmsnorm_grad() {
    let mut r = rng("rmsnorm_grad");
    let (rows, dim, eps) = (7, 9, 1e-6);
    let x = randv(&mut r, rows * dim, 1.0);
    let w = randv(&mut r, dim, 1.5);
    let c = randv(&mut r, rows * dim, 1.0);
    let fwd = |x: &[f64], w: &[f64]| {
        let mut o = nan(rows * dim);
        let mut s = nan(rows);
        math::rmsnorm(x, w, &mut o, &mut s, NormDims { rows, dim }, eps);
        dot(&o, &c)
    };
    let mut o = nan(rows * dim);
    let mut rstd = nan(rows);
    math::rmsnorm(&x, &w, &mut o, &mut rstd, NormDims { rows, dim }, eps);
    for i in 0..rows {
        let ms: f64 = x[i * dim..(i + 1) * dim].iter().map(|v| v * v).sum::<f64>() / dim as f64;
        let s = 1.0 / (ms + eps).sqrt();
        assert!((rstd[i] - s).abs() < 1e-12 * s);
        for j in 0..dim {
            assert!((o[i * dim + j] - x[i * dim + j] * s * w[j]).abs() < 1e-12);
        }
    }
    let base = randv(&mut r, rows * dim, 1.0);
    let mut dx = base.clone();
    let mut dw = vec![0.0; dim];
    math::rmsnorm_bwd(
        &c,
        &x,
        &w,
        &rstd,
        NormGrads {
            dx: &mut dx,
            dw: Some(&mut dw),
        },
        NormDims { rows, dim },
    );
    let dx: Vec<f64> = dx.iter().zip(&base).map(|(a, b)| a - b).collect();
    fd_check("rmsnorm dx", &x, &dx, |v| fwd(v, &w), 1e-6);
    fd_check("rmsnorm dw", &w, &dw, |v| fwd(&x, v), 1e-6);
}

// ------------------------------------------------------------------------------------ RoPE

#[test]
fn rope_grad_and_transpose() {
    let mut r = rng("rope_grad_and_transpose");
    let (nh, hd, theta) = (3, 8, 10000.0);
    let pos: Vec<u32> = (0..7).map(|_| r.random_range(0..5000)).collect();
    let n = pos.len();
    let x = randv(&mut r, n * nh * hd, 1.0);
    let c = randv(&mut r, n * nh * hd, 1.0);
    // forward vs the formula
    let mut y = x.clone();
    math::rope(
        &mut y,
        &pos,
        RopeRows {
            n_tok: n,
            n_heads: nh,
            head_dim: hd,
        },
        theta,
        false,
    );
    for t in 0..n {
        for h in 0..nh {
            for i in 0..hd / 2 {
                let ang = pos[t] as f64 / theta.powf(2.0 * i as f64 / hd as f64);
                let b = (t * nh + h) * hd;
                let (a0, a1) = (x[b + i], x[b + i + hd / 2]);
                assert!((y[b + i] - (a0 * ang.cos() - a1 * ang.sin())).abs() < 1e-9);
                assert!((y[b + i + hd / 2] - (a1 * ang.cos() + a0 * ang.sin())).abs() < 1e-9);
            }
        }
    }
    let mut g = c.clone();
    math::rope(
        &mut g,
        &pos,
        RopeRows {
            n_tok: n,
            n_heads: nh,
            head_dim: hd,
        },
        theta,
        true,
    );
    fd_check(
        "rope dx",
        &x,
        &g,
        |v| {
            let mut y = v.to_vec();
            math::rope(
                &mut y,
                &pos,
                RopeRows {
                    n_tok: n,
                    n_heads: nh,
                    head_dim: hd,
                },
                theta,
                false,
            );
            dot(&y, &c)
        },
        1e-7,
    );
    // rope_bwd is the exact transpose: <rope(x), c> == <x, rope_bwd(c)>, and in f32 through
    // the backend too.
    assert!((dot(&y, &c) - dot(&x, &g)).abs() < 1e-10 * (1.0 + dot(&y, &c).abs()));
    let b = Cpu;
    let xf: Vec<f32> = x.iter().map(|&v| v as f32).collect();
    let cf: Vec<f32> = c.iter().map(|&v| v as f32).collect();
    let mut yf = xf.clone();
    b.rope(&mut yf, &pos, n, nh, hd, theta as f32).unwrap();
    let mut gf = cf.clone();
    b.rope_bwd(&mut gf, &pos, n, nh, hd, theta as f32).unwrap();
    let lhs: f64 = yf.iter().zip(&cf).map(|(a, b)| *a as f64 * *b as f64).sum();
    let rhs: f64 = xf.iter().zip(&gf).map(|(a, b)| *a as f64 * *b as f64).sum();
    assert!(
        (lhs - rhs).abs() < 1e-4 * (1.0 + lhs.abs()),
        "{lhs} vs {rhs}"
    );
}

// ------------------------------------------------------------------------------------ attention

/// Naive causal GQA attention with an explicit masked score matrix per sequence and head.
fn naive_attention(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    cu: &[u32],
    nh: usize,
    nkv: usize,
    hd: usize,
) -> (Vec<f64>, Vec<f64>) {
    let n = *cu.last().unwrap() as usize;
    let mut out = vec![0.0; n * nh * hd];
    let mut lse = vec![0.0; nh * n];
    for w in cu.windows(2) {
        let (s0, s1) = (w[0] as usize, w[1] as usize);
        let l = s1 - s0;
        for h in 0..nh {
            let kh = h * nkv / nh;
            let mut s = vec![vec![f64::NEG_INFINITY; l]; l];
            for i in 0..l {
                for j in 0..l {
                    if j <= i {
                        let qi = &q[((s0 + i) * nh + h) * hd..][..hd];
                        let kj = &k[((s0 + j) * nkv + kh) * hd..][..hd];
                        s[i][j] = dot(qi, kj) / (hd as f64).sqrt();
                    }
                }
                let z: f64 = s[i].iter().map(|x| x.exp()).sum();
                lse[h * n + s0 + i] = z.ln();
                for j in 0..l {
                    let p = s[i][j].exp() / z;
                    for d in 0..hd {
                        out[((s0 + i) * nh + h) * hd + d] += p * v[((s0 + j) * nkv + kh) * hd + d];
                    }
                }
            }
        }
    }
    (out, lse)
}

#[test]
fn attention_forward_and_grad() {
    let mut r = rng("attention_forward_and_grad");
    let (nh, nkv, hd) = (4, 2, 6);
    let n = CU[3] as usize;
    let q = randv(&mut r, n * nh * hd, 1.5);
    let k = randv(&mut r, n * nkv * hd, 1.5);
    let v = randv(&mut r, n * nkv * hd, 1.0);
    let c = randv(&mut r, n * nh * hd, 1.0);
    let mut out = nan(n * nh * hd);
    let mut lse = nan(nh * n);
    math::attention(
        Qkv {
            q: &q,
            k: &k,
            v: &v,
        },
        &mut out,
        &mut lse,
        &CU,
        Heads {
            n_heads: nh,
            n_kv: nkv,
            head_dim: hd,
        },
    );
    let (o2, l2) = naive_attention(&q, &k, &v, &CU, nh, nkv, hd);
    let e1 = out
        .iter()
        .zip(&o2)
        .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
    let e2 = lse
        .iter()
        .zip(&l2)
        .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
    println!("attention vs naive: out {e1:.2e}, lse {e2:.2e}");
    assert!(e1 < 1e-12 && e2 < 1e-12);
    let (mut dq, mut dk, mut dv) = (nan(q.len()), nan(k.len()), nan(v.len()));
    math::attention_bwd(
        Qkv {
            q: &q,
            k: &k,
            v: &v,
        },
        AttnSaved {
            dout: &c,
            out: &out,
            lse: &lse,
        },
        AttnGrads {
            dq: &mut dq,
            dk: &mut dk,
            dv: &mut dv,
        },
        &CU,
        Heads {
            n_heads: nh,
            n_kv: nkv,
            head_dim: hd,
        },
    );
    let f = |q: &[f64], k: &[f64], v: &[f64]| {
        let mut o = nan(n * nh * hd);
        let mut l = nan(nh * n);
        math::attention(
            Qkv { q, k, v },
            &mut o,
            &mut l,
            &CU,
            Heads {
                n_heads: nh,
                n_kv: nkv,
                head_dim: hd,
            },
        );
        dot(&o, &c)
    };
    fd_check("attention dq", &q, &dq, |x| f(x, &k, &v), 1e-6);
    fd_check("attention dk", &k, &dk, |x| f(&q, x, &v), 1e-6);
    fd_check("attention dv", &v, &dv, |x| f(&q, &k, x), 1e-6);
}

#[test]
fn kv_cache_decode_matches_attention() {
    let mut r = rng("kv_cache_decode_matches_attention");
    let b = Cpu;
    let (nh, nkv, hd, max_len) = (4, 2, 8, 9);
    let lens = [1usize, 5, 7, 9];
    let slots = lens.len();
    let kvd = nkv * hd;
    let mut k_cache = vec![f32::NAN; slots * max_len * kvd];
    let mut v_cache = vec![f32::NAN; slots * max_len * kvd];
    let mut q_last = Vec::new();
    let mut expect = Vec::new();
    for (s, &l) in lens.iter().enumerate() {
        let q: Vec<f32> = (0..l * nh * hd)
            .map(|_| r.random_range(-1.5..1.5))
            .collect();
        let k: Vec<f32> = (0..l * kvd).map(|_| r.random_range(-1.5..1.5)).collect();
        let v: Vec<f32> = (0..l * kvd).map(|_| r.random_range(-1.0..1.0)).collect();
        let cu = vec![0, l as u32];
        let mut out = vec![f32::NAN; l * nh * hd];
        let mut lse = vec![f32::NAN; nh * l];
        b.attention(
            Qkv {
                q: &q,
                k: &k,
                v: &v,
            },
            &mut out,
            &mut lse,
            &Packed {
                cu_seqlens: &cu,
                cu_host: &cu,
                max_len: l,
            },
            Heads {
                n_heads: nh,
                n_kv: nkv,
                head_dim: hd,
            },
        )
        .unwrap();
        expect.extend_from_slice(&out[(l - 1) * nh * hd..]);
        q_last.extend_from_slice(&q[(l - 1) * nh * hd..]);
        // store all tokens but the last one first, then the last one (as decode does)
        let dst: Vec<u32> = (0..l).map(|t| (s * max_len + t) as u32).collect();
        b.kv_store(
            &k,
            &v,
            &dst[..l - 1].to_vec(),
            &mut k_cache,
            &mut v_cache,
            KvRows {
                n_tok: l - 1,
                kv_dim: kvd,
            },
        )
        .unwrap();
        let tail = (l - 1) * kvd;
        b.kv_store(
            &k[tail..].to_vec(),
            &v[tail..].to_vec(),
            &vec![dst[l - 1]],
            &mut k_cache,
            &mut v_cache,
            KvRows {
                n_tok: 1,
                kv_dim: kvd,
            },
        )
        .unwrap();
    }
    let lens_u: Vec<u32> = lens.iter().map(|&l| l as u32).collect();
    let mut out = vec![f32::NAN; slots * nh * hd];
    b.attention_decode(
        &q_last,
        &k_cache,
        &v_cache,
        &Cached {
            lens: &lens_u,
            table: &(0..slots as u32).collect(),
            n_seq: slots,
            max_blocks: 1,
            block_size: max_len,
        },
        &mut out,
        Heads {
            n_heads: nh,
            n_kv: nkv,
            head_dim: hd,
        },
    )
    .unwrap();
    let err = out
        .iter()
        .zip(&expect)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    println!("decode vs full attention: max abs err {err:.2e}");
    assert!(err < 1e-5);
}

/// Paged decode (blocks in a shuffled order, odd block sizes, unused table entries out of
/// range) gives the contiguous cache's bits, for GQA ratios 1, 2 and 7 and head dims 64, 128.
#[test]
fn paged_decode_matches_contiguous() {
    let mut r = common::Rng::new("paged_decode_matches_contiguous");
    let lens = [1u32, 37, 16, 150, 5];
    for (hd, nh, nkv) in [(64, 4, 4), (128, 4, 2), (64, 7, 1)] {
        let heads = Heads {
            n_heads: nh,
            n_kv: nkv,
            head_dim: hd,
        };
        let case = common::paged::DecodeCase::random(&mut r, heads, &lens);
        let want = case.contiguous(&Cpu);
        assert!(want.iter().all(|x| x.is_finite()));
        for bs in [1usize, 5, 16, 33] {
            let got = case.paged(&Cpu, &mut r, bs);
            common::paged::same_bits(&format!("d{hd} h{nh} kv{nkv} block {bs}"), &got, &want);
        }
    }
}

// ------------------------------------------------------------------------------------ SwiGLU

#[test]
fn swiglu_grad() {
    let mut r = rng("swiglu_grad");
    let n = 37;
    let g = randv(&mut r, n, 4.0);
    let u = randv(&mut r, n, 2.0);
    let c = randv(&mut r, n, 1.0);
    let mut o = nan(n);
    math::swiglu(&g, &u, &mut o, n);
    for i in 0..n {
        assert!((o[i] - g[i] / (1.0 + (-g[i]).exp()) * u[i]).abs() < 1e-12);
    }
    let (mut dg, mut du) = (nan(n), nan(n));
    math::swiglu_bwd(&c, &g, &u, &mut dg, &mut du, n);
    let f = |g: &[f64], u: &[f64]| {
        let mut o = nan(n);
        math::swiglu(g, u, &mut o, n);
        dot(&o, &c)
    };
    fd_check("swiglu dgate", &g, &dg, |x| f(x, &u), 1e-7);
    fd_check("swiglu dup", &u, &du, |x| f(&g, x), 1e-7);
}

// ------------------------------------------------------------------------------------ logprobs

/// Explicit log-softmax rows: (logp of target, lse, entropy, full log-softmax).
fn explicit_logprobs(
    h: &[f64],
    w: &[f64],
    tg: &[u32],
    n: usize,
    dim: usize,
    vocab: usize,
) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let (mut lp, mut lse, mut ent, mut full) = (vec![], vec![], vec![], vec![]);
    for t in 0..n {
        let z: Vec<f64> = (0..vocab)
            .map(|v| dot(&h[t * dim..(t + 1) * dim], &w[v * dim..(v + 1) * dim]))
            .collect();
        let l = z.iter().map(|x| x.exp()).sum::<f64>().ln();
        let ls: Vec<f64> = z.iter().map(|x| x - l).collect();
        lp.push(ls[tg[t] as usize]);
        lse.push(l);
        ent.push(-ls.iter().map(|x| x.exp() * x).sum::<f64>());
        full.extend(ls);
    }
    (lp, lse, ent, full)
}

#[test]
fn logprobs_forward_and_grad() {
    let mut r = rng("logprobs_forward_and_grad");
    let (n, dim, vocab) = (13, 6, 37);
    let h = randv(&mut r, n * dim, 1.0);
    let w = randv(&mut r, vocab * dim, 1.0);
    let tg: Vec<u32> = (0..n).map(|_| r.random_range(0..vocab as u32)).collect();
    let c = randv(&mut r, n, 1.0);
    let (mut lp, mut lse, mut ent) = (nan(n), nan(n), nan(n));
    math::logprobs(
        LmHead {
            h: &h,
            w: &w,
            targets: &tg,
        },
        LogprobsOut {
            logp: &mut lp,
            lse: &mut lse,
            entropy: Some(&mut ent),
        },
        VocabDims {
            n_tok: n,
            dim,
            vocab,
        },
        1.0,
    );
    let (lp2, lse2, ent2, _) = explicit_logprobs(&h, &w, &tg, n, dim, vocab);
    for t in 0..n {
        assert!((lp[t] - lp2[t]).abs() < 1e-12, "logp[{t}]");
        assert!((lse[t] - lse2[t]).abs() < 1e-12, "lse[{t}]");
        assert!((ent[t] - ent2[t]).abs() < 1e-12, "entropy[{t}]");
    }
    let mut dh = nan(n * dim);
    let dw0 = randv(&mut r, vocab * dim, 1.0);
    let mut dw = dw0.clone();
    math::logprobs_bwd(
        &c,
        LmHead {
            h: &h,
            w: &w,
            targets: &tg,
        },
        &lse,
        LogprobsGrads {
            dh: &mut dh,
            dw: Some(&mut dw),
        },
        VocabDims {
            n_tok: n,
            dim,
            vocab,
        },
        1.0,
    );
    let dw: Vec<f64> = dw.iter().zip(&dw0).map(|(a, b)| a - b).collect();
    let f = |h: &[f64], w: &[f64]| {
        let (mut lp, mut lse) = (nan(n), nan(n));
        math::logprobs(
            LmHead { h, w, targets: &tg },
            LogprobsOut {
                logp: &mut lp,
                lse: &mut lse,
                entropy: None,
            },
            VocabDims {
                n_tok: n,
                dim,
                vocab,
            },
            1.0,
        );
        dot(&lp, &c)
    };
    fd_check("logprobs dh", &h, &dh, |x| f(x, &w), 1e-6);
    fd_check("logprobs dw", &w, &dw, |x| f(&h, x), 1e-6);
}

/// At an inverse temperature (T = 0.7 as in Tool-N1, and T = 2.5): the forward is the explicit
/// log-softmax of h·(w·inv_t), and the backward (dh, dw) matches f64 finite differences of
/// Σ c_t logp_t at that temperature.
#[test]
fn logprobs_temperature_forward_and_grad() {
    let mut r = rng("logprobs_temperature_forward_and_grad");
    let (n, dim, vocab) = (11, 5, 29);
    for inv_t in [1.0 / 0.7, 0.4] {
        let h = randv(&mut r, n * dim, 1.0);
        let w = randv(&mut r, vocab * dim, 1.0);
        let tg: Vec<u32> = (0..n).map(|_| r.random_range(0..vocab as u32)).collect();
        let c = randv(&mut r, n, 1.0);
        let (mut lp, mut lse, mut ent) = (nan(n), nan(n), nan(n));
        math::logprobs(
            LmHead {
                h: &h,
                w: &w,
                targets: &tg,
            },
            LogprobsOut {
                logp: &mut lp,
                lse: &mut lse,
                entropy: Some(&mut ent),
            },
            VocabDims {
                n_tok: n,
                dim,
                vocab,
            },
            inv_t,
        );
        let ws: Vec<f64> = w.iter().map(|x| x * inv_t).collect();
        let (lp2, lse2, ent2, _) = explicit_logprobs(&h, &ws, &tg, n, dim, vocab);
        let (lp1, _, ent1, _) = explicit_logprobs(&h, &w, &tg, n, dim, vocab);
        for t in 0..n {
            assert!((lp[t] - lp2[t]).abs() < 1e-12, "inv_t {inv_t}: logp[{t}]");
            assert!((lse[t] - lse2[t]).abs() < 1e-12, "inv_t {inv_t}: lse[{t}]");
            assert!(
                (ent[t] - ent2[t]).abs() < 1e-12,
                "inv_t {inv_t}: entropy[{t}]"
            );
        }
        // the temperature really changes the result (not the plain log-softmax)
        let moved = (0..n).map(|t| (lp[t] - lp1[t]).abs().max((ent[t] - ent1[t]).abs()));
        assert!(
            moved.fold(0.0, f64::max) > 1e-2,
            "inv_t {inv_t} had no effect"
        );
        let mut dh = nan(n * dim);
        let dw0 = randv(&mut r, vocab * dim, 1.0);
        let mut dw = dw0.clone();
        math::logprobs_bwd(
            &c,
            LmHead {
                h: &h,
                w: &w,
                targets: &tg,
            },
            &lse,
            LogprobsGrads {
                dh: &mut dh,
                dw: Some(&mut dw),
            },
            VocabDims {
                n_tok: n,
                dim,
                vocab,
            },
            inv_t,
        );
        let dw: Vec<f64> = dw.iter().zip(&dw0).map(|(a, b)| a - b).collect();
        let f = |h: &[f64], w: &[f64]| {
            let (mut lp, mut lse) = (nan(n), nan(n));
            math::logprobs(
                LmHead { h, w, targets: &tg },
                LogprobsOut {
                    logp: &mut lp,
                    lse: &mut lse,
                    entropy: None,
                },
                VocabDims {
                    n_tok: n,
                    dim,
                    vocab,
                },
                inv_t,
            );
            dot(&lp, &c)
        };
        fd_check("logprobs dh (temperature)", &h, &dh, |x| f(x, &w), 1e-6);
        fd_check("logprobs dw (temperature)", &w, &dw, |x| f(&h, x), 1e-6);
    }
    // The backend refuses an inverse temperature that is not finite and > 0, naming it.
    let b = Cpu;
    let x = vec![0.5f32; 10];
    let (mut lp, mut l2, mut dh) = (vec![0.0f32; 2], vec![0.0f32; 2], vec![0.0f32; 2]);
    for bad in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        let e = b
            .logprobs(
                LmHead {
                    h: &x,
                    w: &x,
                    targets: &vec![0, 1],
                },
                LogprobsOut {
                    logp: &mut lp,
                    lse: &mut l2,
                    entropy: None,
                },
                VocabDims {
                    n_tok: 2,
                    dim: 1,
                    vocab: 5,
                },
                bad,
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("logprobs") && e.contains("inv_t"), "{e}");
        let e = b
            .logprobs_bwd(
                &x,
                LmHead {
                    h: &x,
                    w: &x,
                    targets: &vec![0, 1],
                },
                &l2,
                LogprobsGrads {
                    dh: &mut dh,
                    dw: None,
                },
                VocabDims {
                    n_tok: 2,
                    dim: 1,
                    vocab: 5,
                },
                bad,
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("logprobs_bwd") && e.contains("inv_t"), "{e}");
    }
}

/// Several row chunks (vocab large enough that a chunk holds fewer rows than n_tok), through
/// the f32 backend, against the explicit f64 softmax.
#[test]
fn logprobs_chunked_large_vocab() {
    let mut r = rng("logprobs_chunked_large_vocab");
    let (n, dim, vocab) = (23, 5, 100_003);
    assert!(math::LOGIT_CHUNK_ELEMS / vocab < n);
    let h: Vec<f32> = (0..n * dim).map(|_| r.random_range(-1.0..1.0)).collect();
    let w: Vec<f32> = (0..vocab * dim)
        .map(|_| r.random_range(-1.0..1.0))
        .collect();
    let tg: Vec<u32> = (0..n).map(|_| r.random_range(0..vocab as u32)).collect();
    let b = Cpu;
    let (mut lp, mut lse, mut ent) = (vec![f32::NAN; n], vec![f32::NAN; n], vec![f32::NAN; n]);
    b.logprobs(
        LmHead {
            h: &h,
            w: &w,
            targets: &tg,
        },
        LogprobsOut {
            logp: &mut lp,
            lse: &mut lse,
            entropy: Some(&mut ent),
        },
        VocabDims {
            n_tok: n,
            dim,
            vocab,
        },
        1.0,
    )
    .unwrap();
    let h64: Vec<f64> = h.iter().map(|&x| x as f64).collect();
    let w64: Vec<f64> = w.iter().map(|&x| x as f64).collect();
    let (lp2, _, ent2, full) = explicit_logprobs(&h64, &w64, &tg, n, dim, vocab);
    for t in 0..n {
        assert!(
            (lp[t] as f64 - lp2[t]).abs() < 1e-4,
            "logp[{t}] {} vs {}",
            lp[t],
            lp2[t]
        );
        assert!((ent[t] as f64 - ent2[t]).abs() < 1e-3, "entropy[{t}]");
    }
    // backward: dh = Σ_v dlogp (1[v=target] − p_v) w_v
    let c: Vec<f32> = (0..n).map(|_| r.random_range(-1.0..1.0)).collect();
    let mut dh = vec![f32::NAN; n * dim];
    b.logprobs_bwd(
        &c,
        LmHead {
            h: &h,
            w: &w,
            targets: &tg,
        },
        &lse,
        LogprobsGrads {
            dh: &mut dh,
            dw: None,
        },
        VocabDims {
            n_tok: n,
            dim,
            vocab,
        },
        1.0,
    )
    .unwrap();
    for t in 0..n {
        for j in 0..dim {
            let mut e = 0.0;
            for v in 0..vocab {
                let ind = if v == tg[t] as usize { 1.0 } else { 0.0 };
                e += c[t] as f64 * (ind - full[t * vocab + v].exp()) * w64[v * dim + j];
            }
            assert!((dh[t * dim + j] as f64 - e).abs() < 1e-4, "dh[{t},{j}]");
        }
    }
}

/// The kept-logits pair (`logprobs_keep` + `logprobs_bwd_kept`) gives the same bits as
/// `logprobs` + `logprobs_bwd`, which recompute the logits: odd sizes, several vocabulary tiles
/// (vocab over 512) and row blocks (over 1024 rows), a temperature, entropy, dw accumulated
/// and skipped; a `kept` buffer shorter than n_tok * vocab is an error.
#[test]
fn logprobs_kept_logits_match_recompute() {
    let mut r = rng("logprobs_kept_logits_match_recompute");
    let b = Cpu;
    assert!(b.keeps_logits());
    for &(n, dim, vocab, inv_t, with_dw) in &[
        (1, 3, 7, 1.0f32, true),
        (37, 19, 1_337, 1.0 / 0.7, true),
        (1_029, 9, 613, 1.0, false),
    ] {
        let h: Vec<f32> = (0..n * dim).map(|_| r.random_range(-1.0..1.0)).collect();
        let w: Vec<f32> = (0..vocab * dim)
            .map(|_| r.random_range(-1.0..1.0))
            .collect();
        let tg: Vec<u32> = (0..n).map(|_| r.random_range(0..vocab as u32)).collect();
        let c: Vec<f32> = (0..n).map(|_| r.random_range(-1.0..1.0)).collect();
        let dw0: Vec<f32> = (0..vocab * dim)
            .map(|_| r.random_range(-1.0..1.0))
            .collect();
        let head = LmHead {
            h: &h,
            w: &w,
            targets: &tg,
        };
        let d = VocabDims {
            n_tok: n,
            dim,
            vocab,
        };
        // (logp, lse, entropy, dh, dw) with and without kept logits.
        let run = |keep: bool| {
            let (mut lp, mut lse, mut ent) = (poisoned(n), poisoned(n), poisoned(n));
            let out = LogprobsOut {
                logp: &mut lp,
                lse: &mut lse,
                entropy: Some(&mut ent),
            };
            let mut kept = vec![f32::NAN; n * vocab];
            if keep {
                b.logprobs_keep(head, out, d, inv_t, &mut kept).unwrap();
                assert!(kept.iter().all(|x| x.is_finite()), "every logit kept");
            } else {
                b.logprobs(head, out, d, inv_t).unwrap();
            }
            let (mut dh, mut dw) = (poisoned(n * dim), dw0.clone());
            let grads = LogprobsGrads {
                dh: &mut dh,
                dw: with_dw.then_some(&mut dw),
            };
            if keep {
                let saved = KeptLogits {
                    lse: &lse,
                    logits: &kept,
                };
                b.logprobs_bwd_kept(&c, head, saved, grads, d, inv_t)
                    .unwrap();
            } else {
                b.logprobs_bwd(&c, head, &lse, grads, d, inv_t).unwrap();
            }
            for (name, v, len) in [("logp", &lp, n), ("lse", &lse, n), ("dh", &dh, n * dim)] {
                untouched(name, v, len);
            }
            (lp, lse, ent, dh, dw)
        };
        let (a, k) = (run(false), run(true));
        let tag = format!("n {n}, dim {dim}, vocab {vocab}");
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&a.0), bits(&k.0), "logp, {tag}");
        assert_eq!(bits(&a.1), bits(&k.1), "lse, {tag}");
        assert_eq!(bits(&a.2), bits(&k.2), "entropy, {tag}");
        assert_eq!(bits(&a.3), bits(&k.3), "dh, {tag}");
        assert_eq!(bits(&a.4), bits(&k.4), "dw, {tag}");
        assert_eq!(with_dw, a.4 != dw0, "dw accumulated only when asked, {tag}");
    }
    // A short kept buffer is an argument error naming it, in both directions.
    let (n, dim, vocab) = (4, 3, 5);
    let (h, w, tg) = (vec![0.5; n * dim], vec![0.25; vocab * dim], vec![1u32; n]);
    let head = LmHead {
        h: &h,
        w: &w,
        targets: &tg,
    };
    let d = VocabDims {
        n_tok: n,
        dim,
        vocab,
    };
    let (mut lp, mut lse) = (vec![0.0; n], vec![0.0; n]);
    let mut short = vec![0.0; n * vocab - 1];
    let out = LogprobsOut {
        logp: &mut lp,
        lse: &mut lse,
        entropy: None,
    };
    let e = b
        .logprobs_keep(head, out, d, 1.0, &mut short)
        .unwrap_err()
        .to_string();
    assert!(e.contains("logprobs_keep") && e.contains("kept"), "{e}");
    let mut dh = vec![0.0; n * dim];
    let saved = KeptLogits {
        lse: &lse,
        logits: &short,
    };
    let grads = LogprobsGrads {
        dh: &mut dh,
        dw: None,
    };
    let e = b
        .logprobs_bwd_kept(&lp, head, saved, grads, d, 1.0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("logprobs_bwd_kept") && e.contains("kept"), "{e}");
}

// ------------------------------------------------------------------------------------ GRPO loss

/// Per-token loss written independently of the library (verl's formulas), aggregated per mode.
fn naive_grpo(
    lp: &[f64],
    old: &[f64],
    rf: &[f64],
    adv: &[f64],
    mask: &[f64],
    sid: &[u32],
    n_seq: usize,
    cfg: &GrpoLossCfg,
) -> (f64, f64) {
    let n = lp.len();
    let mut tok = vec![0.0; n];
    let mut clipped = 0.0;
    for t in 0..n {
        let ratio = (lp[t] - old[t]).clamp(-20.0, 20.0).exp();
        let a = adv[t];
        let l1 = -a * ratio;
        let l2 = -a * ratio.clamp(1.0 - cfg.clip_low as f64, 1.0 + cfg.clip_high as f64);
        if l2 > l1 {
            clipped += mask[t];
        }
        let d = lp[t] - rf[t];
        let kl = match cfg.kl_kind {
            KlKind::K1 => d,
            KlKind::Abs => d.abs(),
            KlKind::K2 => 0.5 * d * d,
            KlKind::K3 => {
                let x = (rf[t] - lp[t]).clamp(-20.0, 20.0);
                (x.exp() - x - 1.0).clamp(-10.0, 10.0)
            }
        };
        tok[t] = l1.max(l2) + cfg.kl_coef as f64 * kl;
    }
    let mut sums = vec![0.0; n_seq];
    let mut cnts = vec![0.0; n_seq];
    for t in 0..n {
        sums[sid[t] as usize] += tok[t] * mask[t];
        cnts[sid[t] as usize] += mask[t];
    }
    let total: f64 = cnts.iter().sum();
    let loss = match cfg.agg {
        LossAgg::TokenMean => sums.iter().sum::<f64>() / total,
        LossAgg::SeqMeanTokenSum => sums.iter().sum::<f64>() / n_seq as f64,
        LossAgg::SeqMeanTokenMean => {
            let per: Vec<f64> = (0..n_seq)
                .filter(|&s| cnts[s] > 0.0)
                .map(|s| sums[s] / cnts[s])
                .collect();
            per.iter().sum::<f64>() / per.len() as f64
        }
        LossAgg::SeqMeanTokenSumNorm => sums.iter().sum::<f64>() / cfg.norm_len as f64,
    };
    (loss / cfg.loss_scale_div as f64, clipped / total)
}

#[test]
fn grpo_loss_grad_every_mode() {
    let mut r = rng("grpo_loss_grad_every_mode");
    let n_seq = 4;
    let sid: Vec<u32> = [0u32, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 3, 3].to_vec();
    let n = sid.len();
    // Log-ratios: some inside the clip range, some far outside (clip active both ways),
    // kept away from the kinks at 1 ± eps.
    let (cl, ch) = (0.2f64, 0.28f64);
    let mut lr = Vec::new();
    while lr.len() < n {
        let x: f64 = r.random_range(-0.6..0.6);
        let rt = x.exp();
        if (rt - (1.0 - cl)).abs() > 0.02 && (rt - (1.0 + ch)).abs() > 0.02 {
            lr.push(x);
        }
    }
    // tokens 1 and 2 always take the clipped branch (A > 0 with r > 1 + eps_high, A < 0 with
    // r < 1 - eps_low)
    lr[1] = 0.5;
    lr[2] = -0.5;
    let lp = randv(&mut r, n, 1.0)
        .iter()
        .map(|v| v - 2.0)
        .collect::<Vec<_>>();
    let old: Vec<f64> = lp.iter().zip(&lr).map(|(a, b)| a - b).collect();
    // reference: small and large gaps (large ones exercise the k3 clamp at 10), none near 0
    let rf: Vec<f64> = (0..n)
        .map(|t| {
            let gap = if t % 5 == 0 {
                13.0
            } else {
                r.random_range(0.1..1.5)
            };
            let sign = if r.random_bool(0.5) { 1.0 } else { -1.0 };
            lp[t] + sign * gap
        })
        .collect();
    let mut adv: Vec<f64> = (0..n)
        .map(|_| r.random_range(0.3..2.0) * if r.random_bool(0.5) { 1.0 } else { -1.0 })
        .collect();
    let mut mask: Vec<f64> = (0..n)
        .map(|_| if r.random_bool(0.8) { 1.0 } else { 0.0 })
        .collect();
    mask[0] = 1.0;
    mask[1] = 1.0;
    mask[2] = 1.0;
    adv[1] = adv[1].abs();
    adv[2] = -adv[2].abs();
    mask[15] = 0.0;
    mask[16] = 0.0; // sequence 3 fully masked out
    let mut any_clip = false;
    for agg in LossAgg::ALL {
        for kind in KlKind::ALL {
            let cfg = GrpoLossCfg {
                clip_low: cl as f32,
                clip_high: ch as f32,
                kl_coef: 0.37,
                kl_kind: kind,
                agg,
                norm_len: 11.0,
                loss_scale_div: 3.0,
            };
            let mut d = nan(n);
            let st = math::grpo_loss(
                &GrpoTokens {
                    logp: &lp,
                    old_logp: &old,
                    ref_logp: &rf,
                    adv: &adv,
                    mask: &mask,
                    seq_id: &sid,
                    n_tok: n,
                    n_seq,
                },
                &mut d,
                &cfg,
            );
            let (want, clipfrac) = naive_grpo(&lp, &old, &rf, &adv, &mask, &sid, n_seq, &cfg);
            assert!(
                (st.loss - want).abs() < 1e-12 * (1.0 + want.abs()),
                "{agg:?}/{kind:?}: loss {} vs {want}",
                st.loss
            );
            assert!((st.clip_frac - clipfrac).abs() < 1e-12);
            any_clip |= clipfrac > 0.0;
            for t in 0..n {
                if mask[t] == 0.0 {
                    assert_eq!(d[t], 0.0, "masked token {t} has a gradient");
                }
            }
            fd_check(
                &format!("grpo {agg:?}/{kind:?} dlogp"),
                &lp,
                &d,
                |x| {
                    let mut dd = nan(n);
                    math::grpo_loss(
                        &GrpoTokens {
                            logp: x,
                            old_logp: &old,
                            ref_logp: &rf,
                            adv: &adv,
                            mask: &mask,
                            seq_id: &sid,
                            n_tok: n,
                            n_seq,
                        },
                        &mut dd,
                        &cfg,
                    )
                    .loss
                },
                1e-6,
            );
        }
    }
    assert!(any_clip, "no token exercised the clipped branch");
}

#[test]
fn grpo_loss_backend_stats() {
    let b = Cpu;
    // Two tokens, token-mean: r = e^{0.5} > 1.2 with A = 1 -> clipped; r = 1 with A = -1.
    let logp = vec![-1.0f32, -2.0];
    let old = vec![-1.5f32, -2.0];
    let rf = logp.clone();
    let adv = vec![1.0f32, -1.0];
    let mask = vec![1.0f32, 1.0];
    let sid = vec![0u32, 1];
    let cfg = GrpoLossCfg {
        clip_low: 0.2,
        clip_high: 0.2,
        kl_coef: 0.001,
        kl_kind: KlKind::K3,
        agg: LossAgg::TokenMean,
        norm_len: 1.0,
        loss_scale_div: 1.0,
    };
    let mut d = vec![f32::NAN; 2];
    let st = b
        .grpo_loss(
            &GrpoTokens {
                logp: &logp,
                old_logp: &old,
                ref_logp: &rf,
                adv: &adv,
                mask: &mask,
                seq_id: &sid,
                n_tok: 2,
                n_seq: 2,
            },
            &mut d,
            &cfg,
        )
        .unwrap();
    // pg: token 0: max(-e^.5, -1.2) = -1.2 (clipped, grad 0); token 1: max(1, 1) = 1.
    assert!((st.pg_loss - (-0.1)).abs() < 1e-6, "{st:?}");
    assert!((st.loss - (-0.1)).abs() < 1e-6);
    assert_eq!(st.clip_frac, 0.5);
    assert!((st.ratio_mean - (0.5f32.exp() + 1.0) / 2.0).abs() < 1e-6);
    assert_eq!(st.n_tokens, 2.0);
    assert_eq!(d[0], 0.0);
    assert!((d[1] - 0.5).abs() < 1e-6); // -A r / 2 = 0.5
}

// ------------------------------------------------------------------------------------ sampling

#[test]
fn sample_greedy_top_p_and_determinism() {
    let mut r = rng("sample_greedy_top_p_and_determinism");
    let b = Cpu;
    let (rows, vocab) = (6, 37);
    let mut logits: Vec<f32> = (0..rows * vocab)
        .map(|_| r.random_range(-3.0..3.0))
        .collect();
    // a tie in row 0: the lowest index wins
    let mx = logits[..vocab].iter().cloned().fold(f32::MIN, f32::max);
    logits[5] = mx + 1.0;
    logits[20] = mx + 1.0;
    let argmax: Vec<u32> = (0..rows)
        .map(|i| {
            let row = &logits[i * vocab..(i + 1) * vocab];
            let m = row.iter().cloned().fold(f32::MIN, f32::max);
            row.iter().position(|&z| z == m).unwrap() as u32
        })
        .collect();
    assert_eq!(argmax[0], 5);
    let mut out = vec![u32::MAX; rows];
    common::sample_at(&b, &logits, &mut out, rows, vocab, 0.0, 1.0, 0, 1, 0).unwrap();
    assert_eq!(out, argmax, "greedy");
    for seed in 0..20u64 {
        common::sample_at(&b, &logits, &mut out, rows, vocab, 0.7, 1e-6, 0, seed, 3).unwrap();
        assert_eq!(out, argmax, "top_p tiny");
        common::sample_at(&b, &logits, &mut out, rows, vocab, 1.3, 1.0, 1, seed, 3).unwrap();
        assert_eq!(out, argmax, "top_k = 1");
    }
    // same (seed, offset) -> same token; row r of a batch == a single row at offset + r
    let seed = r.random::<u64>();
    let mut a = vec![0u32; rows];
    let mut c = vec![0u32; rows];
    common::sample_at(&b, &logits, &mut a, rows, vocab, 1.0, 0.9, 0, seed, 100).unwrap();
    common::sample_at(&b, &logits, &mut c, rows, vocab, 1.0, 0.9, 0, seed, 100).unwrap();
    assert_eq!(a, c);
    for i in 0..rows {
        let mut one = vec![0u32];
        let row = logits[i * vocab..(i + 1) * vocab].to_vec();
        common::sample_at(
            &b,
            &row,
            &mut one,
            1,
            vocab,
            1.0,
            0.9,
            0,
            seed,
            100 + i as u64,
        )
        .unwrap();
        assert_eq!(one[0], a[i], "row {i} depends on the batch split");
    }
    // top_k restricts the support to the k largest
    let k = 4;
    let row = logits[vocab..2 * vocab].to_vec();
    let mut order: Vec<usize> = (0..vocab).collect();
    order.sort_by(|&x, &y| row[y].partial_cmp(&row[x]).unwrap().then(x.cmp(&y)));
    for s in 0..200u64 {
        let mut one = vec![0u32];
        common::sample_at(&b, &row, &mut one, 1, vocab, 5.0, 1.0, k, seed, s).unwrap();
        assert!(order[..k].contains(&(one[0] as usize)), "top-k escaped");
    }
}

/// Expected sampling distribution by the documented rule: sort (ties by index), top-k cut,
/// smallest nucleus with cumulative probability >= top_p, renormalised.
fn expected_dist(logits: &[f32], temp: f32, top_p: f32, top_k: usize) -> Vec<f64> {
    let v = logits.len();
    let mut order: Vec<usize> = (0..v).collect();
    order.sort_by(|&x, &y| logits[y].partial_cmp(&logits[x]).unwrap().then(x.cmp(&y)));
    if top_k > 0 {
        order.truncate(top_k);
    }
    let z: Vec<f64> = order
        .iter()
        .map(|&i| (logits[i] as f64 / temp as f64).exp())
        .collect();
    let s: f64 = z.iter().sum();
    let mut keep = z.len();
    let mut cum = 0.0;
    for (i, x) in z.iter().enumerate() {
        cum += x / s;
        if cum >= top_p as f64 {
            keep = i + 1;
            break;
        }
    }
    let ks: f64 = z[..keep].iter().sum();
    let mut p = vec![0.0; v];
    for j in 0..keep {
        p[order[j]] = z[j] / ks;
    }
    p
}

#[test]
fn sample_frequencies_match_softmax() {
    let mut r = rng("sample_frequencies_match_softmax");
    let b = Cpu;
    let vocab = 11;
    let temp = 0.8f32;
    let logits: Vec<f32> = (0..vocab).map(|_| r.random_range(-1.5..1.5)).collect();
    let draws = 40_000usize;
    let rows = 1000;
    let batch: Vec<f32> = (0..rows).flat_map(|_| logits.clone()).collect();
    for (top_k, top_p) in [(0usize, 1.0f32), (0, 0.6), (4, 0.9)] {
        let p = expected_dist(&logits, temp, top_p, top_k);
        let seed = r.random::<u64>();
        let mut counts = vec![0usize; vocab];
        let mut out = vec![0u32; rows];
        for off in (0..draws).step_by(rows) {
            common::sample_at(
                &b, &batch, &mut out, rows, vocab, temp, top_p, top_k, seed, off as u64,
            )
            .unwrap();
            for &t in &out {
                counts[t as usize] += 1;
            }
        }
        let mut chi2 = 0.0;
        let mut support = 0usize;
        for v in 0..vocab {
            if p[v] == 0.0 {
                assert_eq!(counts[v], 0, "token {v} outside the nucleus was drawn");
            } else {
                support += 1;
                let e = p[v] * draws as f64;
                chi2 += (counts[v] as f64 - e).powi(2) / e;
            }
        }
        let dof = (support - 1) as f64;
        // about a 1e-4 false-alarm rate for these degrees of freedom
        let limit = dof + 5.0 * (2.0 * dof).sqrt() + 5.0;
        println!("top_k {top_k} top_p {top_p}: chi2 = {chi2:.2} ({dof} dof, limit {limit:.1})");
        assert!(chi2 < limit, "chi2 {chi2}: {counts:?} vs {p:?}");
    }
}

#[test]
fn sample_uniform_is_documented_function() {
    // splitmix64 reference values (seed 0 stream: first output of splitmix64 from state 0).
    assert_eq!(math::splitmix64(0), 0xE220_A839_7B1D_CDAF);
    let u = math::sample_uniform(7, 9);
    let want = (math::splitmix64(7 ^ math::splitmix64(9)) >> 40) as f64 / 16_777_216.0;
    assert_eq!(u, want);
    assert!((0.0..1.0).contains(&u));
}

// ------------------------------------------------------------------------------------ AdamW

#[test]
fn adamw_hand_computed() {
    let b = Cpu;
    // step 1, m = v = 0: m̂ = g, v̂ = g², update = g/(|g| + eps) + wd p
    let hp = AdamWStep {
        lr: 0.1,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
        step: 1,
        grad_scale: 0.5,
    };
    let mut p = vec![1.0f32, -2.0];
    let g = vec![1.0f32, -4.0]; // scaled: 0.5, -2
    let mut m = vec![0.0f32; 2];
    let mut v = vec![0.0f32; 2];
    b.adamw(
        AdamWState {
            param: &mut p,
            master: None,
            m: &mut m,
            v: &mut v,
        },
        &g,
        2,
        &hp,
    )
    .unwrap();
    assert!((m[0] - 0.05).abs() < 1e-7 && (m[1] + 0.2).abs() < 1e-7);
    // (1 - b2) is 0.00099998713 in f32
    assert!((v[0] - 0.00025).abs() < 1e-4 * 0.00025 && (v[1] - 0.004).abs() < 1e-4 * 0.004);
    assert!((p[0] - (1.0 - 0.1 * (1.0 + 0.01))).abs() < 1e-6, "{}", p[0]);
    assert!(
        (p[1] - (-2.0 - 0.1 * (-1.0 - 0.02))).abs() < 1e-6,
        "{}",
        p[1]
    );
    // step 3 from given moments, by the formula
    let hp3 = AdamWStep {
        step: 3,
        grad_scale: 1.0,
        ..hp
    };
    let (p0, g0, m0, v0) = (0.3f64, -0.7f64, 0.2f64, 0.05f64);
    let (mut p, mut m, mut v) = (vec![p0 as f32], vec![m0 as f32], vec![v0 as f32]);
    b.adamw(
        AdamWState {
            param: &mut p,
            master: None,
            m: &mut m,
            v: &mut v,
        },
        &vec![g0 as f32],
        1,
        &hp3,
    )
    .unwrap();
    let m1 = 0.9 * m0 + 0.1 * g0;
    let v1 = 0.999 * v0 + 0.001 * g0 * g0;
    let mh = m1 / (1.0 - 0.9f64.powi(3));
    let vh = v1 / (1.0 - 0.999f64.powi(3));
    let want = p0 - 0.1 * (mh / (vh.sqrt() + 1e-8) + 0.01 * p0);
    assert!((p[0] as f64 - want).abs() < 1e-6, "{} vs {want}", p[0]);
    // master copy: honoured when given, refused when too short
    let mut p = vec![1.0f32; 3];
    let mut master = vec![1.0f32; 3];
    let (mut m, mut v) = (vec![0.0f32; 3], vec![0.0f32; 3]);
    b.adamw(
        AdamWState {
            param: &mut p,
            master: Some(&mut master),
            m: &mut m,
            v: &mut v,
        },
        &vec![1.0; 3],
        3,
        &hp,
    )
    .unwrap();
    assert_eq!(p, master);
    let mut short = vec![0.0f32; 2];
    assert!(b
        .adamw(
            AdamWState {
                param: &mut p,
                master: Some(&mut short),
                m: &mut m,
                v: &mut v
            },
            &vec![1.0; 3],
            3,
            &hp
        )
        .is_err());
}

// ------------------------------------------------------------------------------------ backend

#[test]
fn backend_f32_matches_f64_math() {
    let mut r = rng("backend_f32_matches_f64_math");
    let b = Cpu;
    let (nh, nkv, hd) = (4, 2, 8);
    let n = CU[3] as usize;
    let q = randv(&mut r, n * nh * hd, 1.0);
    let k = randv(&mut r, n * nkv * hd, 1.0);
    let v = randv(&mut r, n * nkv * hd, 1.0);
    let f = |x: &[f64]| x.iter().map(|&v| v as f32).collect::<Vec<f32>>();
    let mut out = vec![f32::NAN; n * nh * hd + 5]; // longer than needed is fine
    let mut lse = vec![f32::NAN; n * nh];
    let cu = CU.to_vec();
    b.attention(
        Qkv {
            q: &f(&q),
            k: &f(&k),
            v: &f(&v),
        },
        &mut out,
        &mut lse,
        &Packed {
            cu_seqlens: &cu,
            cu_host: &cu,
            max_len: 7,
        },
        Heads {
            n_heads: nh,
            n_kv: nkv,
            head_dim: hd,
        },
    )
    .unwrap();
    let (o2, _) = naive_attention(&q, &k, &v, &CU, nh, nkv, hd);
    let err = o2
        .iter()
        .zip(&out)
        .fold(0.0f64, |m, (a, b)| m.max((a - *b as f64).abs()));
    assert!(err < 1e-5, "attention f32 vs f64: {err}");
    assert!(
        out[n * nh * hd..].iter().all(|x| x.is_nan()),
        "wrote past the shape"
    );
    // positions of the packed layout are what the model uses
    assert_eq!(positions(&CU), vec![0, 0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]);
}

#[test]
fn upload_raw_dtypes() {
    let b = Cpu;
    let vals = [1.5f32, -0.25, 3.0];
    let f32b: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
    assert_eq!(b.upload_raw(DType::F32, &f32b, 3).unwrap(), vals);
    let f16b: Vec<u8> = vals
        .iter()
        .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
        .collect();
    assert_eq!(b.upload_raw(DType::F16, &f16b, 3).unwrap(), vals);
    let bf16b: Vec<u8> = vals
        .iter()
        .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
        .collect();
    assert_eq!(b.upload_raw(DType::BF16, &bf16b, 3).unwrap(), vals);
    let e = b
        .upload_raw(DType::BF16, &bf16b, 4)
        .unwrap_err()
        .to_string();
    assert!(e.contains("upload_raw"), "{e}");
}

/// A bad `linear` call (an output shorter than m * n) is an error naming it.
#[test]
fn bad_linear_arguments_are_errors() {
    let b = Cpu;
    let x = vec![0.0f32; 10];
    let mut y = vec![0.0f32; 3];
    let e = b
        .linear(&x, &x, None, &mut y, GemmDims { m: 2, n: 2, k: 5 })
        .unwrap_err()
        .to_string();
    assert!(e.contains("linear") && e.contains("`y`"), "{e}");
}

/// A bad `embedding` call (an id outside the table) is an error naming it.
#[test]
fn bad_embedding_arguments_are_errors() {
    let b = Cpu;
    let x = vec![0.0f32; 10];
    let mut out = vec![0.0f32; 10];
    let e = b
        .embedding(&vec![7u32], &x, &mut out, 1, 5)
        .unwrap_err()
        .to_string();
    assert!(e.contains("embedding") && e.contains("ids"), "{e}");
}

/// A bad `attention` call (offsets that decrease) is an error naming it.
#[test]
fn bad_attention_offsets_arguments_are_errors() {
    let b = Cpu;
    let x = vec![0.0f32; 10];
    let mut out = vec![0.0f32; 10];
    let mut lse = vec![0.0f32; 4];
    let cu = vec![0u32, 3, 2];
    let e = b
        .attention(
            Qkv {
                q: &x,
                k: &x,
                v: &x,
            },
            &mut out,
            &mut lse,
            &Packed {
                cu_seqlens: &cu,
                cu_host: &cu,
                max_len: 3,
            },
            Heads {
                n_heads: 2,
                n_kv: 1,
                head_dim: 1,
            },
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("attention"), "{e}");
}

/// A bad `attention` call (n_heads not a multiple of n_kv) is an error naming it.
#[test]
fn bad_attention_heads_arguments_are_errors() {
    let b = Cpu;
    let x = vec![0.0f32; 10];
    let mut out = vec![0.0f32; 10];
    let mut lse = vec![0.0f32; 4];
    let e = b
        .attention(
            Qkv {
                q: &x,
                k: &x,
                v: &x,
            },
            &mut out,
            &mut lse,
            &Packed {
                cu_seqlens: &vec![0, 2],
                cu_host: &[0, 2],
                max_len: 2,
            },
            Heads {
                n_heads: 3,
                n_kv: 2,
                head_dim: 1,
            },
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("n_kv"), "{e}");
}

/// A bad `logprobs` call (a target outside the vocabulary) is an error naming it.
#[test]
fn bad_logprobs_arguments_are_errors() {
    let b = Cpu;
    let x = vec![0.0f32; 10];
    let mut lp = vec![0.0f32; 2];
    let mut l2 = vec![0.0f32; 2];
    let e = b
        .logprobs(
            LmHead {
                h: &x,
                w: &x,
                targets: &vec![0, 9],
            },
            LogprobsOut {
                logp: &mut lp,
                lse: &mut l2,
                entropy: None,
            },
            VocabDims {
                n_tok: 2,
                dim: 1,
                vocab: 5,
            },
            1.0,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("targets[1]"), "{e}");
}

/// A bad `sample` call (a NaN logit) is an error naming it.
#[test]
fn bad_sample_arguments_are_errors() {
    let b = Cpu;
    let mut o = vec![0u32; 1];
    let e = common::sample_at(&b, &vec![f32::NAN, 0.0], &mut o, 1, 2, 1.0, 1.0, 0, 0, 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("sample"), "{e}");
}

/// A bad `rope` call (an odd head_dim) is an error naming it.
#[test]
fn bad_rope_arguments_are_errors() {
    let b = Cpu;
    let mut pos = vec![0.0f32; 6];
    let e = b
        .rope(&mut pos, &vec![0], 1, 2, 3, 1e4)
        .unwrap_err()
        .to_string();
    assert!(e.contains("head_dim"), "{e}");
}

/// A bad `kv_store` call (a cache row outside the cache) is an error naming it.
#[test]
fn bad_kv_store_arguments_are_errors() {
    let b = Cpu;
    let x = vec![0.0f32; 10];
    let mut kc = vec![0.0f32; 8];
    let mut vc = vec![0.0f32; 8];
    let e = b
        .kv_store(
            &x,
            &x,
            &vec![4],
            &mut kc,
            &mut vc,
            KvRows {
                n_tok: 1,
                kv_dim: 2,
            },
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("dst"), "{e}");
}

/// Every call of the shared contract list (tests/common/contract.rs) is rejected with the
/// structured error of its op and argument.
#[test]
fn contract_rejects_bad_calls_with_structured_errors() {
    let cases = common::contract::bad_calls(&Cpu);
    for (what, r) in &cases {
        let (_, _, expected, got) = common::contract::fields(what, r);
        assert!(!expected.is_empty() && !got.is_empty(), "{what}");
    }
    assert!(cases.len() >= 60, "{} cases", cases.len());
}

/// Max |a − b| / max |b| between an f32 backend output and the f64 math.
fn close(name: &str, a: &[f32], b: &[f64], tol: f64) {
    assert!(a.iter().all(|v| v.is_finite()), "{name}: non-finite output");
    let scale = b.iter().fold(1e-30f64, |m, v| m.max(v.abs()));
    let err = a
        .iter()
        .zip(b)
        .fold(0.0f64, |m, (x, y)| m.max((*x as f64 - y).abs()));
    assert!(err / scale < tol, "{name}: rel err {:.3e}", err / scale);
}

const PAD: usize = 3;

/// A NaN-poisoned output buffer `PAD` elements longer than the shape needs.
fn poisoned(n: usize) -> Vec<f32> {
    vec![f32::NAN; n + PAD]
}

/// Everything past the shape is still NaN.
fn untouched(name: &str, v: &[f32], n: usize) {
    assert!(
        v[n..].iter().all(|x| x.is_nan()),
        "{name}: wrote past the shape"
    );
}

/// The f32 backend's linear and linear_bwd (outputs poisoned with NaN, buffers longer than needed) agree
/// with the f64 math, and leave everything past the shape untouched.
#[test]
fn linear_backend_matches_f64_math() {
    let mut r = rng("linear_backend_matches_f64_math");
    let b = Cpu;
    let (m, n, k) = (7, 5, 9);
    let (x, w, bias, dy) = (
        randv(&mut r, m * k, 1.0),
        randv(&mut r, n * k, 1.0),
        randv(&mut r, n, 1.0),
        randv(&mut r, m * n, 1.0),
    );
    let mut y = poisoned(m * n);
    b.linear(
        &to32(&x),
        &to32(&w),
        Some(&to32(&bias)),
        &mut y,
        GemmDims { m, n, k },
    )
    .unwrap();
    let mut y64 = nan(m * n);
    math::linear(&x, &w, Some(&bias), &mut y64, m, n, k);
    close("linear", &y[..m * n], &y64, 1e-6);
    untouched("linear", &y, m * n);
    let mut dx = poisoned(m * k);
    let mut dw = vec![0.0f32; n * k];
    let mut db = vec![0.0f32; n];
    b.linear_bwd(
        &to32(&dy),
        &to32(&x),
        &to32(&w),
        LinearGrads {
            dx: Some(&mut dx),
            accumulate_dx: false,
            dw: Some(&mut dw),
            dbias: Some(&mut db),
        },
        GemmDims { m, n, k },
    )
    .unwrap();
    let (mut dx64, mut dw64, mut db64) = (nan(m * k), vec![0.0; n * k], vec![0.0; n]);
    math::linear_bwd(
        &dy,
        &x,
        &w,
        LinearGrads {
            dx: Some(&mut dx64),
            accumulate_dx: false,
            dw: Some(&mut dw64),
            dbias: Some(&mut db64),
        },
        GemmDims { m, n, k },
    );
    close("linear_bwd dx", &dx[..m * k], &dx64, 1e-6);
    close("linear_bwd dw", &dw, &dw64, 1e-6);
    close("linear_bwd dbias", &db, &db64, 1e-6);
    untouched("linear_bwd dx", &dx, m * k);
}

/// The f32 backend's rmsnorm and rmsnorm_bwd (outputs poisoned with NaN, buffers longer than needed) agree
/// with the f64 math, and leave everything past the shape untouched.
#[test]
fn rmsnorm_backend_matches_f64_math() {
    let mut r = rng("rmsnorm_backend_matches_f64_math");
    let b = Cpu;
    let (rows, dim) = (6, 10);
    let (xr, wr, dr) = (
        randv(&mut r, rows * dim, 1.0),
        randv(&mut r, dim, 1.0),
        randv(&mut r, rows * dim, 1.0),
    );
    let (mut o, mut s) = (poisoned(rows * dim), poisoned(rows));
    b.rmsnorm(
        &to32(&xr),
        &to32(&wr),
        &mut o,
        &mut s,
        NormDims { rows, dim },
        1e-6,
    )
    .unwrap();
    let (mut o64, mut s64) = (nan(rows * dim), nan(rows));
    math::rmsnorm(&xr, &wr, &mut o64, &mut s64, NormDims { rows, dim }, 1e-6);
    close("rmsnorm", &o[..rows * dim], &o64, 1e-6);
    close("rmsnorm rstd", &s[..rows], &s64, 1e-6);
    untouched("rmsnorm", &o, rows * dim);
    let mut dxr = vec![0.0f32; rows * dim];
    let mut dwr = vec![0.0f32; dim];
    b.rmsnorm_bwd(
        &to32(&dr),
        &to32(&xr),
        &to32(&wr),
        &s,
        NormGrads {
            dx: &mut dxr,
            dw: Some(&mut dwr),
        },
        NormDims { rows, dim },
    )
    .unwrap();
    let (mut dx64, mut dw64) = (vec![0.0; rows * dim], vec![0.0; dim]);
    math::rmsnorm_bwd(
        &dr,
        &xr,
        &wr,
        &s64,
        NormGrads {
            dx: &mut dx64,
            dw: Some(&mut dw64),
        },
        NormDims { rows, dim },
    );
    close("rmsnorm_bwd dx", &dxr, &dx64, 1e-5);
    close("rmsnorm_bwd dw", &dwr, &dw64, 1e-5);
}

/// The CPU backend's fused residual add + RMSNorm gives the bits of add_inplace then rmsnorm
/// (rows over several parallel row chunks, odd and Qwen2.5 hidden sizes, outputs poisoned and
/// longer than the shape, left untouched past it); the f64 math likewise.
#[test]
fn add_rmsnorm_matches_add_then_rmsnorm() {
    let mut r = rng("add_rmsnorm_matches_add_then_rmsnorm");
    let b = Cpu;
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for (rows, dim) in [(70, 200), (33, 896), (3, 3584), (2, 1)] {
        let (n, d, eps) = (rows * dim, NormDims { rows, dim }, 1e-6);
        let x = to32(&randv(&mut r, n + PAD, 2.0));
        let delta = to32(&randv(&mut r, n + PAD, 2.0));
        let w = to32(&randv(&mut r, dim, 1.0));
        let mut xs = x.clone();
        b.add_inplace(&mut xs, &delta, n).unwrap();
        let (mut os, mut ss) = (poisoned(n), poisoned(rows));
        b.rmsnorm(&xs, &w, &mut os, &mut ss, d, eps).unwrap();
        let mut xf = x.clone();
        let (mut of, mut sf) = (poisoned(n), poisoned(rows));
        let y = NormOut {
            out: &mut of,
            rstd: &mut sf,
        };
        b.add_rmsnorm(&mut xf, &delta, &w, y, d, eps).unwrap();
        let at = format!("add_rmsnorm rows {rows} dim {dim}");
        assert_eq!(bits(&xf), bits(&xs), "{at}: residual");
        assert_eq!(bits(&of[..n]), bits(&os[..n]), "{at}: out");
        assert_eq!(bits(&sf[..rows]), bits(&ss[..rows]), "{at}: rstd");
        untouched(&format!("{at} out"), &of, n);
        untouched(&format!("{at} rstd"), &sf, rows);
    }
    let (rows, dim) = (5, 7);
    let d = NormDims { rows, dim };
    let (x, delta, w) = (
        randv(&mut r, rows * dim, 2.0),
        randv(&mut r, rows * dim, 2.0),
        randv(&mut r, dim, 1.0),
    );
    let xs: Vec<f64> = x.iter().zip(&delta).map(|(a, b)| a + b).collect();
    let (mut os, mut ss) = (nan(rows * dim), nan(rows));
    math::rmsnorm(&xs, &w, &mut os, &mut ss, d, 1e-6);
    let mut xf = x.clone();
    let (mut of, mut sf) = (nan(rows * dim), nan(rows));
    let y = NormOut {
        out: &mut of[..],
        rstd: &mut sf[..],
    };
    math::add_rmsnorm(&mut xf, &delta, &w, y, d, 1e-6);
    assert_eq!(
        (xf, of, sf),
        (xs, os, ss),
        "f64 add_rmsnorm vs add then rmsnorm"
    );
}

/// The f32 backend's swiglu and swiglu_bwd (outputs poisoned with NaN, buffers longer than needed) agree
/// with the f64 math, and leave everything past the shape untouched.
#[test]
fn swiglu_backend_matches_f64_math() {
    let mut r = rng("swiglu_backend_matches_f64_math");
    let b = Cpu;
    let ns = 29;
    let (g, u, d) = (
        randv(&mut r, ns, 3.0),
        randv(&mut r, ns, 1.0),
        randv(&mut r, ns, 1.0),
    );
    let mut o = poisoned(ns);
    b.swiglu(&to32(&g), &to32(&u), &mut o, ns).unwrap();
    let mut o64 = nan(ns);
    math::swiglu(&g, &u, &mut o64, ns);
    close("swiglu", &o[..ns], &o64, 1e-6);
    untouched("swiglu", &o, ns);
    let (mut dg, mut du) = (poisoned(ns), poisoned(ns));
    b.swiglu_bwd(&to32(&d), &to32(&g), &to32(&u), &mut dg, &mut du, ns)
        .unwrap();
    let (mut dg64, mut du64) = (nan(ns), nan(ns));
    math::swiglu_bwd(&d, &g, &u, &mut dg64, &mut du64, ns);
    close("swiglu_bwd dgate", &dg[..ns], &dg64, 1e-6);
    close("swiglu_bwd dup", &du[..ns], &du64, 1e-6);
}

/// The f32 backend's attention_bwd (outputs poisoned with NaN, buffers longer than needed)
/// agrees with the f64 math, and leaves everything past the shape untouched.
#[test]
fn attention_bwd_backend_matches_f64_math() {
    let mut r = rng("attention_bwd_backend_matches_f64_math");
    let b = Cpu;
    let (nh, nkv, hd) = (4, 2, 6);
    let nt = CU[3] as usize;
    let (q, kk, v, dout) = (
        randv(&mut r, nt * nh * hd, 1.0),
        randv(&mut r, nt * nkv * hd, 1.0),
        randv(&mut r, nt * nkv * hd, 1.0),
        randv(&mut r, nt * nh * hd, 1.0),
    );
    let (mut o64, mut l64) = (nan(nt * nh * hd), nan(nh * nt));
    math::attention(
        Qkv {
            q: &q,
            k: &kk,
            v: &v,
        },
        &mut o64,
        &mut l64,
        &CU,
        Heads {
            n_heads: nh,
            n_kv: nkv,
            head_dim: hd,
        },
    );
    let (mut dq64, mut dk64, mut dv64) = (nan(q.len()), nan(kk.len()), nan(v.len()));
    math::attention_bwd(
        Qkv {
            q: &q,
            k: &kk,
            v: &v,
        },
        AttnSaved {
            dout: &dout,
            out: &o64,
            lse: &l64,
        },
        AttnGrads {
            dq: &mut dq64,
            dk: &mut dk64,
            dv: &mut dv64,
        },
        &CU,
        Heads {
            n_heads: nh,
            n_kv: nkv,
            head_dim: hd,
        },
    );
    let (mut dq, mut dk, mut dv) = (poisoned(q.len()), poisoned(kk.len()), poisoned(v.len()));
    let cu = CU.to_vec();
    b.attention_bwd(
        Qkv {
            q: &to32(&q),
            k: &to32(&kk),
            v: &to32(&v),
        },
        AttnSaved {
            dout: &to32(&dout),
            out: &to32(&o64),
            lse: &to32(&l64),
        },
        AttnGrads {
            dq: &mut dq,
            dk: &mut dk,
            dv: &mut dv,
        },
        &Packed {
            cu_seqlens: &cu,
            cu_host: &cu,
            max_len: 7,
        },
        Heads {
            n_heads: nh,
            n_kv: nkv,
            head_dim: hd,
        },
    )
    .unwrap();
    close("attention_bwd dq", &dq[..q.len()], &dq64, 1e-5);
    close("attention_bwd dk", &dk[..kk.len()], &dk64, 1e-5);
    close("attention_bwd dv", &dv[..v.len()], &dv64, 1e-5);
    untouched("attention_bwd dk", &dk, kk.len());
}

/// The f32 backend's logprobs and logprobs_bwd (outputs poisoned with NaN, buffers longer than
/// needed) agree with the f64 math, and leave everything past the shape untouched.
#[test]
fn logprobs_backend_matches_f64_math() {
    let mut r = rng("logprobs_backend_matches_f64_math");
    let b = Cpu;
    let (nt, dim, vocab) = (9, 7, 37);
    let (h, wl, dl) = (
        randv(&mut r, nt * dim, 1.0),
        randv(&mut r, vocab * dim, 1.0),
        randv(&mut r, nt, 1.0),
    );
    let tg: Vec<u32> = (0..nt).map(|_| r.random_range(0..vocab as u32)).collect();
    let (mut lp, mut lse, mut ent) = (poisoned(nt), poisoned(nt), poisoned(nt));
    b.logprobs(
        LmHead {
            h: &to32(&h),
            w: &to32(&wl),
            targets: &tg,
        },
        LogprobsOut {
            logp: &mut lp,
            lse: &mut lse,
            entropy: Some(&mut ent),
        },
        VocabDims {
            n_tok: nt,
            dim,
            vocab,
        },
        1.0,
    )
    .unwrap();
    let (mut lp64, mut lse64, mut ent64) = (nan(nt), nan(nt), nan(nt));
    math::logprobs(
        LmHead {
            h: &h,
            w: &wl,
            targets: &tg,
        },
        LogprobsOut {
            logp: &mut lp64,
            lse: &mut lse64,
            entropy: Some(&mut ent64),
        },
        VocabDims {
            n_tok: nt,
            dim,
            vocab,
        },
        1.0,
    );
    close("logprobs logp", &lp[..nt], &lp64, 1e-6);
    close("logprobs entropy", &ent[..nt], &ent64, 1e-5);
    untouched("logprobs logp", &lp, nt);
    let mut dh = poisoned(nt * dim);
    let mut dwl = vec![0.0f32; vocab * dim];
    b.logprobs_bwd(
        &to32(&dl),
        LmHead {
            h: &to32(&h),
            w: &to32(&wl),
            targets: &tg,
        },
        &lse,
        LogprobsGrads {
            dh: &mut dh,
            dw: Some(&mut dwl),
        },
        VocabDims {
            n_tok: nt,
            dim,
            vocab,
        },
        1.0,
    )
    .unwrap();
    let (mut dh64, mut dw64) = (nan(nt * dim), vec![0.0; vocab * dim]);
    math::logprobs_bwd(
        &dl,
        LmHead {
            h: &h,
            w: &wl,
            targets: &tg,
        },
        &lse64,
        LogprobsGrads {
            dh: &mut dh64,
            dw: Some(&mut dw64),
        },
        VocabDims {
            n_tok: nt,
            dim,
            vocab,
        },
        1.0,
    );
    close("logprobs_bwd dh", &dh[..nt * dim], &dh64, 1e-5);
    close("logprobs_bwd dw", &dwl, &dw64, 1e-5);
}

/// The f32 backend's logits agree with the f64 GEMM and leave everything past the shape
/// untouched.
#[test]
fn logits_backend_matches_f64_math() {
    let mut r = rng("logits_backend_matches_f64_math");
    let b = Cpu;
    let (nt, dim, vocab) = (9, 7, 37);
    let (h, wl) = (
        randv(&mut r, nt * dim, 1.0),
        randv(&mut r, vocab * dim, 1.0),
    );
    let mut lg = poisoned(nt * vocab);
    b.logits(
        &to32(&h),
        &to32(&wl),
        &mut lg,
        VocabDims {
            n_tok: nt,
            dim,
            vocab,
        },
    )
    .unwrap();
    let mut lg64 = nan(nt * vocab);
    math::matmul_nt(&h, &wl, &mut lg64, nt, vocab, dim, 0.0);
    close("logits", &lg[..nt * vocab], &lg64, 1e-6);
    untouched("logits", &lg, nt * vocab);
}

/// Outputs of a fast f32 op and the f64 math's, in the same order.
type Outputs = (Vec<Vec<f32>>, Vec<Vec<f64>>);

/// Serialises the tests that set the global thread count.
static THREADS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// `outputs` (named `names`) agree with the f64 math at multi-tile sizes, and give the same bits
/// for 1, 2 and 3 threads (the same random inputs each time).
fn fast_multi_tile(tag: &str, names: &[&str], outputs: fn(&mut ChaCha8Rng) -> Outputs) {
    let _lock = THREADS.lock().unwrap_or_else(|e| e.into_inner());
    let mut runs = Vec::new();
    let r0 = rng(tag);
    for threads in [1, 2, 3] {
        tooln1::backend::cpu::set_num_threads(threads);
        let mut r = r0.clone();
        let (got, want) = outputs(&mut r);
        assert_eq!(got.len(), names.len());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            close(names[i], g, w, 1e-5);
        }
        runs.push(got);
    }
    tooln1::backend::cpu::set_num_threads(0);
    for (t, run) in runs.iter().enumerate().skip(1) {
        for (i, (a, b)) in run.iter().zip(&runs[0]).enumerate() {
            let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "{}: {} threads differ from 1", names[i], t + 1);
        }
    }
}

/// The fast path of linear and linear_bwd, split over rows (m > n) and over columns (n > m): (outputs, f64 math).
fn fast_linear(r: &mut ChaCha8Rng) -> Outputs {
    let b = Cpu;
    let (mut got, mut want) = (Vec::new(), Vec::new());
    // linear, split over rows (m > n) and over columns (n > m)
    for (m, n, k) in [(301, 67, 129), (13, 517, 129)] {
        let (x, w, bias, dy) = (
            randv(r, m * k, 1.0),
            randv(r, n * k, 1.0),
            randv(r, n, 1.0),
            randv(r, m * n, 1.0),
        );
        let mut y = vec![f32::NAN; m * n];
        b.linear(
            &to32(&x),
            &to32(&w),
            Some(&to32(&bias)),
            &mut y,
            GemmDims { m, n, k },
        )
        .unwrap();
        let mut y64 = nan(m * n);
        math::linear(&x, &w, Some(&bias), &mut y64, m, n, k);
        let mut dx = vec![0.5f32; m * k];
        let mut dw = vec![0.25f32; n * k];
        let mut db = vec![0.0f32; n];
        b.linear_bwd(
            &to32(&dy),
            &to32(&x),
            &to32(&w),
            LinearGrads {
                dx: Some(&mut dx),
                accumulate_dx: true,
                dw: Some(&mut dw),
                dbias: Some(&mut db),
            },
            GemmDims { m, n, k },
        )
        .unwrap();
        let (mut dx64, mut dw64, mut db64) = (vec![0.5; m * k], vec![0.25; n * k], vec![0.0; n]);
        math::linear_bwd(
            &dy,
            &x,
            &w,
            LinearGrads {
                dx: Some(&mut dx64),
                accumulate_dx: true,
                dw: Some(&mut dw64),
                dbias: Some(&mut db64),
            },
            GemmDims { m, n, k },
        );
        got.extend([y, dx, dw, db]);
        want.extend([y64, dx64, dw64, db64]);
    }
    (got, want)
}

/// The fast path of rmsnorm and rmsnorm_bwd over rows that are not a multiple of the row chunk: (outputs, f64 math).
fn fast_rmsnorm(r: &mut ChaCha8Rng) -> Outputs {
    let b = Cpu;
    let (mut got, mut want) = (Vec::new(), Vec::new());
    // rmsnorm + bwd (rows not a multiple of the row chunk)
    let (rows, dim) = (70, 33);
    let (xr, wr, dr) = (
        randv(r, rows * dim, 1.0),
        randv(r, dim, 1.0),
        randv(r, rows * dim, 1.0),
    );
    let (mut o, mut s) = (vec![f32::NAN; rows * dim], vec![f32::NAN; rows]);
    b.rmsnorm(
        &to32(&xr),
        &to32(&wr),
        &mut o,
        &mut s,
        NormDims { rows, dim },
        1e-6,
    )
    .unwrap();
    let (mut o64, mut s64) = (nan(rows * dim), nan(rows));
    math::rmsnorm(&xr, &wr, &mut o64, &mut s64, NormDims { rows, dim }, 1e-6);
    let (mut dxr, mut dwr) = (vec![0.0f32; rows * dim], vec![0.0f32; dim]);
    b.rmsnorm_bwd(
        &to32(&dr),
        &to32(&xr),
        &to32(&wr),
        &s,
        NormGrads {
            dx: &mut dxr,
            dw: Some(&mut dwr),
        },
        NormDims { rows, dim },
    )
    .unwrap();
    let (mut dx64, mut dw64) = (vec![0.0; rows * dim], vec![0.0; dim]);
    math::rmsnorm_bwd(
        &dr,
        &xr,
        &wr,
        &s64,
        NormGrads {
            dx: &mut dx64,
            dw: Some(&mut dw64),
        },
        NormDims { rows, dim },
    );
    got.extend([o, s, dxr, dwr]);
    want.extend([o64, s64, dx64, dw64]);
    (got, want)
}

/// The fast path of rope on 70 tokens: (outputs, f64 math).
fn fast_rope(r: &mut ChaCha8Rng) -> Outputs {
    let b = Cpu;
    let (mut got, mut want) = (Vec::new(), Vec::new());
    // rope on 70 tokens
    let (nt, nh, hd) = (70, 3, 8);
    let xq = randv(r, nt * nh * hd, 1.0);
    let pos: Vec<u32> = (0..nt as u32).map(|t| t * 3 % 50).collect();
    let mut xf = to32(&xq);
    b.rope(&mut xf, &pos, nt, nh, hd, 10000.0).unwrap();
    let mut x64 = xq.clone();
    math::rope(
        &mut x64,
        &pos,
        RopeRows {
            n_tok: nt,
            n_heads: nh,
            head_dim: hd,
        },
        10000.0,
        false,
    );
    got.push(xf);
    want.push(x64);
    (got, want)
}

/// The fast path of swiglu and swiglu_bwd over several element chunks: (outputs, f64 math).
fn fast_swiglu(r: &mut ChaCha8Rng) -> Outputs {
    let b = Cpu;
    let (mut got, mut want) = (Vec::new(), Vec::new());
    // swiglu + bwd over several element chunks
    let ns = 40_003;
    let (g, u, d) = (randv(r, ns, 3.0), randv(r, ns, 1.0), randv(r, ns, 1.0));
    let mut o = vec![f32::NAN; ns];
    b.swiglu(&to32(&g), &to32(&u), &mut o, ns).unwrap();
    let mut o64 = nan(ns);
    math::swiglu(&g, &u, &mut o64, ns);
    let (mut dg, mut du) = (vec![f32::NAN; ns], vec![f32::NAN; ns]);
    b.swiglu_bwd(&to32(&d), &to32(&g), &to32(&u), &mut dg, &mut du, ns)
        .unwrap();
    let (mut dg64, mut du64) = (nan(ns), nan(ns));
    math::swiglu_bwd(&d, &g, &u, &mut dg64, &mut du64, ns);
    got.extend([o, dg, du]);
    want.extend([o64, dg64, du64]);
    (got, want)
}

/// The fast path of adamw over several element chunks: (outputs, f64 math).
fn fast_adamw(r: &mut ChaCha8Rng) -> Outputs {
    let b = Cpu;
    let (mut got, mut want) = (Vec::new(), Vec::new());
    let ns = 40_003;
    let g = randv(r, ns, 3.0);
    let hp = AdamWStep {
        lr: 0.01,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
        step: 3,
        grad_scale: 0.5,
    };
    let (p0, m0, v0) = (randv(r, ns, 1.0), randv(r, ns, 0.1), randv(r, ns, 0.01));
    let v0: Vec<f64> = v0.iter().map(|x| x.abs()).collect();
    let (mut p, mut m, mut v) = (to32(&p0), to32(&m0), to32(&v0));
    b.adamw(
        AdamWState {
            param: &mut p,
            master: None,
            m: &mut m,
            v: &mut v,
        },
        &to32(&g),
        ns,
        &hp,
    )
    .unwrap();
    let (mut p64, mut m64, mut v64) = (p0.clone(), m0.clone(), v0.clone());
    let h64 = math::AdamW {
        lr: 0.01,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
        step: 3,
        grad_scale: 0.5,
    };
    math::adamw(&mut p64, &g, &mut m64, &mut v64, ns, &h64);
    got.extend([p, m, v]);
    want.extend([p64, m64, v64]);
    (got, want)
}

/// The fast path of attention and attention_bwd over sequences of 150 (three 64-blocks, ragged), 1 and 129 tokens: (outputs, f64 math).
fn fast_attention(r: &mut ChaCha8Rng) -> Outputs {
    let b = Cpu;
    let (mut got, mut want) = (Vec::new(), Vec::new());
    // attention + bwd: sequences of 150 (three 64-blocks, ragged), 1 and 129 tokens
    let cu: Vec<u32> = vec![0, 150, 151, 280];
    let (nh, nkv, hd) = (4, 2, 16);
    let nt = 280;
    let (q, kk, v, dout) = (
        randv(r, nt * nh * hd, 1.0),
        randv(r, nt * nkv * hd, 1.0),
        randv(r, nt * nkv * hd, 1.0),
        randv(r, nt * nh * hd, 1.0),
    );
    let (mut o, mut l) = (vec![f32::NAN; nt * nh * hd], vec![f32::NAN; nh * nt]);
    b.attention(
        Qkv {
            q: &to32(&q),
            k: &to32(&kk),
            v: &to32(&v),
        },
        &mut o,
        &mut l,
        &Packed {
            cu_seqlens: &cu,
            cu_host: &cu,
            max_len: 150,
        },
        Heads {
            n_heads: nh,
            n_kv: nkv,
            head_dim: hd,
        },
    )
    .unwrap();
    let (mut o64, mut l64) = (nan(nt * nh * hd), nan(nh * nt));
    math::attention(
        Qkv {
            q: &q,
            k: &kk,
            v: &v,
        },
        &mut o64,
        &mut l64,
        &cu,
        Heads {
            n_heads: nh,
            n_kv: nkv,
            head_dim: hd,
        },
    );
    let (mut dq, mut dk, mut dv) = (
        vec![f32::NAN; q.len()],
        vec![f32::NAN; kk.len()],
        vec![f32::NAN; v.len()],
    );
    b.attention_bwd(
        Qkv {
            q: &to32(&q),
            k: &to32(&kk),
            v: &to32(&v),
        },
        AttnSaved {
            dout: &to32(&dout),
            out: &o,
            lse: &l,
        },
        AttnGrads {
            dq: &mut dq,
            dk: &mut dk,
            dv: &mut dv,
        },
        &Packed {
            cu_seqlens: &cu,
            cu_host: &cu,
            max_len: 150,
        },
        Heads {
            n_heads: nh,
            n_kv: nkv,
            head_dim: hd,
        },
    )
    .unwrap();
    let (mut dq64, mut dk64, mut dv64) = (nan(q.len()), nan(kk.len()), nan(v.len()));
    math::attention_bwd(
        Qkv {
            q: &q,
            k: &kk,
            v: &v,
        },
        AttnSaved {
            dout: &dout,
            out: &o64,
            lse: &l64,
        },
        AttnGrads {
            dq: &mut dq64,
            dk: &mut dk64,
            dv: &mut dv64,
        },
        &cu,
        Heads {
            n_heads: nh,
            n_kv: nkv,
            head_dim: hd,
        },
    );
    got.extend([o, l, dq, dk, dv]);
    want.extend([o64, l64, dq64, dk64, dv64]);
    (got, want)
}

/// The fast path of logprobs and logprobs_bwd over 1100 rows (two blocks of `fast::LP_ROWS` = 1024) and vocab 1500 (three tiles, the last ragged), at temperature 1 and 0.7: (outputs, f64 math).
fn fast_logprobs(r: &mut ChaCha8Rng) -> Outputs {
    let b = Cpu;
    let (mut got, mut want) = (Vec::new(), Vec::new());
    // logprobs + bwd: 1100 rows (two row blocks of 1024), vocab 1500 (three tiles of 512, the
    // last ragged)
    const {
        assert!(
            1100 > tooln1::backend::cpu::fast::LP_ROWS
                && 1500 > 2 * tooln1::backend::cpu::fast::LP_VT
        )
    };
    let (nt, dim, vocab) = (1100, 24, 1500);
    let (h, wl, dl) = (
        randv(r, nt * dim, 0.5),
        randv(r, vocab * dim, 0.5),
        randv(r, nt, 1.0),
    );
    let tg: Vec<u32> = (0..nt).map(|_| r.random_range(0..vocab as u32)).collect();
    let (mut lp, mut lse, mut ent) = (vec![f32::NAN; nt], vec![f32::NAN; nt], vec![f32::NAN; nt]);
    b.logprobs(
        LmHead {
            h: &to32(&h),
            w: &to32(&wl),
            targets: &tg,
        },
        LogprobsOut {
            logp: &mut lp,
            lse: &mut lse,
            entropy: Some(&mut ent),
        },
        VocabDims {
            n_tok: nt,
            dim,
            vocab,
        },
        1.0,
    )
    .unwrap();
    let (mut lp64, mut lse64, mut ent64) = (nan(nt), nan(nt), nan(nt));
    math::logprobs(
        LmHead {
            h: &h,
            w: &wl,
            targets: &tg,
        },
        LogprobsOut {
            logp: &mut lp64,
            lse: &mut lse64,
            entropy: Some(&mut ent64),
        },
        VocabDims {
            n_tok: nt,
            dim,
            vocab,
        },
        1.0,
    );
    let mut dh = vec![f32::NAN; nt * dim];
    let mut dwl = vec![0.125f32; vocab * dim];
    b.logprobs_bwd(
        &to32(&dl),
        LmHead {
            h: &to32(&h),
            w: &to32(&wl),
            targets: &tg,
        },
        &lse,
        LogprobsGrads {
            dh: &mut dh,
            dw: Some(&mut dwl),
        },
        VocabDims {
            n_tok: nt,
            dim,
            vocab,
        },
        1.0,
    )
    .unwrap();
    let (mut dh64, mut dw64) = (nan(nt * dim), vec![0.125; vocab * dim]);
    math::logprobs_bwd(
        &dl,
        LmHead {
            h: &h,
            w: &wl,
            targets: &tg,
        },
        &lse64,
        LogprobsGrads {
            dh: &mut dh64,
            dw: Some(&mut dw64),
        },
        VocabDims {
            n_tok: nt,
            dim,
            vocab,
        },
        1.0,
    );
    got.extend([lp, lse, ent, dh, dwl]);
    want.extend([lp64, lse64, ent64, dh64, dw64]);
    // the same at temperature 0.7 (the logits tiles scaled by 1/0.7 in the fused pass)
    let inv_t = 1.0f32 / 0.7;
    let (mut lp, mut lse, mut ent) = (vec![f32::NAN; nt], vec![f32::NAN; nt], vec![f32::NAN; nt]);
    b.logprobs(
        LmHead {
            h: &to32(&h),
            w: &to32(&wl),
            targets: &tg,
        },
        LogprobsOut {
            logp: &mut lp,
            lse: &mut lse,
            entropy: Some(&mut ent),
        },
        VocabDims {
            n_tok: nt,
            dim,
            vocab,
        },
        inv_t,
    )
    .unwrap();
    let (mut lp64, mut lse64, mut ent64) = (nan(nt), nan(nt), nan(nt));
    math::logprobs(
        LmHead {
            h: &h,
            w: &wl,
            targets: &tg,
        },
        LogprobsOut {
            logp: &mut lp64,
            lse: &mut lse64,
            entropy: Some(&mut ent64),
        },
        VocabDims {
            n_tok: nt,
            dim,
            vocab,
        },
        inv_t as f64,
    );
    let mut dh = vec![f32::NAN; nt * dim];
    let mut dwl = vec![0.125f32; vocab * dim];
    b.logprobs_bwd(
        &to32(&dl),
        LmHead {
            h: &to32(&h),
            w: &to32(&wl),
            targets: &tg,
        },
        &lse,
        LogprobsGrads {
            dh: &mut dh,
            dw: Some(&mut dwl),
        },
        VocabDims {
            n_tok: nt,
            dim,
            vocab,
        },
        inv_t,
    )
    .unwrap();
    let (mut dh64, mut dw64) = (nan(nt * dim), vec![0.125; vocab * dim]);
    math::logprobs_bwd(
        &dl,
        LmHead {
            h: &h,
            w: &wl,
            targets: &tg,
        },
        &lse64,
        LogprobsGrads {
            dh: &mut dh64,
            dw: Some(&mut dw64),
        },
        VocabDims {
            n_tok: nt,
            dim,
            vocab,
        },
        inv_t as f64,
    );
    got.extend([lp, lse, ent, dh, dwl]);
    want.extend([lp64, lse64, ent64, dh64, dw64]);
    (got, want)
}

#[test]
fn fast_linear_multi_tile_matches_f64_math_and_thread_counts() {
    fast_multi_tile(
        "fast_linear_multi_tile",
        &[
            "linear y (split m)",
            "linear dx (split m)",
            "linear dw (split m)",
            "linear dbias (split m)",
            "linear y (split n)",
            "linear dx (split n)",
            "linear dw (split n)",
            "linear dbias (split n)",
        ],
        fast_linear,
    );
}

/// The fast path of a linear forward whose weight is transposed in slabs (more than 2^24
/// elements: 4200 x 4100 goes in two slabs, 3840 rows and a ragged 360): (outputs, f64 math).
fn fast_linear_slabs(r: &mut ChaCha8Rng) -> Outputs {
    let b = Cpu;
    let (m, n, k) = (33, 4200, 4100);
    assert!(n * k > 1 << 24, "the weight must exceed one slab");
    let (x, w, bias) = (
        randv(r, m * k, 1.0),
        randv(r, n * k, 0.05),
        randv(r, n, 1.0),
    );
    let mut y = vec![f32::NAN; m * n];
    b.linear(
        &to32(&x),
        &to32(&w),
        Some(&to32(&bias)),
        &mut y,
        GemmDims { m, n, k },
    )
    .unwrap();
    let mut y64 = nan(m * n);
    math::linear(&x, &w, Some(&bias), &mut y64, m, n, k);
    (vec![y], vec![y64])
}

#[test]
fn fast_linear_weight_slabs_match_f64_math_and_thread_counts() {
    fast_multi_tile(
        "fast_linear_slabs",
        &["linear y (weight in slabs)"],
        fast_linear_slabs,
    );
}

#[test]
fn fast_rmsnorm_multi_tile_matches_f64_math_and_thread_counts() {
    fast_multi_tile(
        "fast_rmsnorm_multi_tile",
        &[
            "rmsnorm",
            "rmsnorm rstd",
            "rmsnorm_bwd dx",
            "rmsnorm_bwd dw",
        ],
        fast_rmsnorm,
    );
}

#[test]
fn fast_rope_multi_tile_matches_f64_math_and_thread_counts() {
    fast_multi_tile("fast_rope_multi_tile", &["rope"], fast_rope);
}

#[test]
fn fast_swiglu_multi_tile_matches_f64_math_and_thread_counts() {
    fast_multi_tile(
        "fast_swiglu_multi_tile",
        &["swiglu", "swiglu_bwd dgate", "swiglu_bwd dup"],
        fast_swiglu,
    );
}

#[test]
fn fast_adamw_multi_tile_matches_f64_math_and_thread_counts() {
    fast_multi_tile(
        "fast_adamw_multi_tile",
        &["adamw p", "adamw m", "adamw v"],
        fast_adamw,
    );
}

#[test]
fn fast_attention_multi_tile_matches_f64_math_and_thread_counts() {
    fast_multi_tile(
        "fast_attention_multi_tile",
        &[
            "attention out",
            "attention lse",
            "attention_bwd dq",
            "attention_bwd dk",
            "attention_bwd dv",
        ],
        fast_attention,
    );
}

#[test]
fn fast_logprobs_multi_tile_matches_f64_math_and_thread_counts() {
    fast_multi_tile(
        "fast_logprobs_multi_tile",
        &[
            "logprobs logp",
            "logprobs lse",
            "logprobs entropy",
            "logprobs_bwd dh",
            "logprobs_bwd dw",
            "logprobs logp (T = 0.7)",
            "logprobs lse (T = 0.7)",
            "logprobs entropy (T = 0.7)",
            "logprobs_bwd dh (T = 0.7)",
            "logprobs_bwd dw (T = 0.7)",
        ],
        fast_logprobs,
    );
}

/// copy_rows against a plain row copy, odd widths and ranges, the rest of the buffer unchanged.
#[test]
fn copy_rows_moves_exactly_the_rows() {
    let mut r = common::Rng::new("copy_rows_moves_exactly_the_rows");
    for _ in 0..50 {
        let width = 1 + r.below(13);
        let n = r.below(6);
        let src = r.below(9);
        // a destination after or before the source rows, never overlapping
        let dst = if r.below(2) == 0 {
            src + n + r.below(4)
        } else if src >= n {
            r.below(src - n + 1)
        } else {
            src + n
        };
        let rows = src.max(dst) + n + r.below(3);
        let before = r.vec(rows * width, 3.0);
        let mut t = before.clone();
        Cpu.copy_rows(&mut t, tooln1::backend::RowCopy { src, dst, n, width })
            .unwrap();
        let mut want = before.clone();
        for i in 0..n * width {
            want[dst * width + i] = before[src * width + i];
        }
        assert_eq!(t, want, "src {src} dst {dst} n {n} width {width}");
    }
}

/// Per-draw offsets and logits rows: draw r equals a one-row call on row src[r] at offsets[r],
/// whatever the other draws of the call.
#[test]
fn sample_draws_follow_their_row_and_offset() {
    let mut r = common::Rng::new("sample_draws_follow_their_row_and_offset");
    let (n_rows, vocab) = (5, 37);
    let logits = r.vec(n_rows * vocab, 3.0);
    let draws = 23;
    let src: Vec<u32> = (0..draws).map(|_| r.below(n_rows) as u32).collect();
    let offsets: Vec<u64> = (0..draws).map(|_| r.next()).collect();
    for (temperature, top_p, top_k) in [(0.0f32, 1.0f32, 0usize), (1.0, 1.0, 0), (0.8, 0.9, 5)] {
        let p = tooln1::backend::SampleParams {
            temperature,
            top_p,
            top_k,
            seed: r.next(),
        };
        let rows = tooln1::backend::SampleRows {
            offsets: &offsets,
            src: Some(&src),
            n_rows,
            vocab,
        };
        let mut out = vec![u32::MAX; draws];
        Cpu.sample(&logits, &mut out, &rows, &p).unwrap();
        for (d, &s) in src.iter().enumerate() {
            let s = s as usize;
            let row = logits[s * vocab..(s + 1) * vocab].to_vec();
            let mut one = vec![u32::MAX];
            let single = tooln1::backend::SampleRows::each(&offsets[d..d + 1], vocab);
            Cpu.sample(&row, &mut one, &single, &p).unwrap();
            assert_eq!(one[0], out[d], "draw {d} (T = {temperature})");
            let u = math::sample_uniform(p.seed, offsets[d]);
            assert_eq!(out[d], math::sample_row(&row, temperature, top_p, top_k, u));
        }
    }
}
