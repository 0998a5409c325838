//! Every CUDA op, forward and backward, against a plain f64 host reference written from the
//! `Backend` docs, on fresh random inputs (seed printed, replayable with TOOLN1_TEST_SEED),
//! sizes that are not tile multiples, and NaN-poisoned outputs. Bounds: bf16 paths < 1e-2
//! relative-norm error, f32 paths < 1e-5, and beside the norm an elementwise bound (see
//! tests/common/mod.rs); NaN never passes. Without a GPU every test prints
//! "skipped: no CUDA device (...)"; TOOLN1_REQUIRE_CUDA=1 makes that a failure.
//!
//! Shapes are kept small (hidden sizes of a few hundred, vocabularies of a few thousand) so
//! that the suite also runs on a CPU-simulated device; one test uses the full 151,936-token
//! Qwen2.5 vocabulary with few rows.

mod common;

use common::{bf16_round, check, gpu, poison, poison_f32, up, Rng};
use tooln1::backend::cpu::Cpu;
use tooln1::backend::cuda::Cuda;
use tooln1::backend::{
    AdamWState, AdamWStep, Backend, Cached, GemmDims, GrpoLossCfg, GrpoTokens, Heads, KlKind,
    LinearGrads, LossAgg, Packed,
};
use tooln1::backend::{AttnGrads, AttnSaved, Qkv};
use tooln1::backend::{
    KvRows, LmHead, LogprobsGrads, LogprobsOut, NormDims, NormGrads, NormOut, VocabDims,
};
use tooln1::tooln1_skip;

#[test]
fn linear_fwd_bwd() {
    let Some(c) = gpu() else { return };
    let mut r = Rng::new("linear");
    let (m, n, k) = (37, 53, 70);
    let (x, xh) = up(&c, &r.vec(m * k, 1.0));
    let (w, wh) = up(&c, &r.vec(n * k, 0.2));
    let (b, bh) = up(&c, &r.vec(n, 0.5));
    let mut y = poison(&c, m * n);
    c.linear(&x, &w, Some(&b), &mut y, GemmDims { m, n, k })
        .unwrap();
    let mut yr = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            yr[i * n + j] = bh[j] as f64
                + (0..k)
                    .map(|q| xh[i * k + q] as f64 * wh[j * k + q] as f64)
                    .sum::<f64>();
        }
    }
    check("linear y", &c.download(&y, m * n).unwrap(), &yr, 1e-2);

    let (dy, dyh) = up(&c, &r.vec(m * n, 1.0));
    let mut dx = poison(&c, m * k);
    let init_dw = r.vec(n * k, 1.0);
    let mut dw = c.upload_f32(&init_dw).unwrap();
    let mut db = c.zeros_f32(n).unwrap();
    c.linear_bwd(
        &dy,
        &x,
        &w,
        LinearGrads {
            dx: Some(&mut dx),
            accumulate_dx: false,
            dw: Some(&mut dw),
            dbias: Some(&mut db),
        },
        GemmDims { m, n, k },
    )
    .unwrap();
    let mut dxr = vec![0f64; m * k];
    let mut dwr: Vec<f64> = init_dw.iter().map(|&v| v as f64).collect();
    let mut dbr = vec![0f64; n];
    for i in 0..m {
        for j in 0..n {
            let g = dyh[i * n + j] as f64;
            dbr[j] += g;
            for q in 0..k {
                dxr[i * k + q] += g * wh[j * k + q] as f64;
                dwr[j * k + q] += g * xh[i * k + q] as f64;
            }
        }
    }
    check("linear dx", &c.download(&dx, m * k).unwrap(), &dxr, 1e-2);
    check(
        "linear dw (f32, accumulated)",
        &c.download_f32(&dw, n * k).unwrap(),
        &dwr,
        1e-5,
    );
    check("linear dbias", &c.download_f32(&db, n).unwrap(), &dbr, 1e-5);
}

#[test]
fn rmsnorm_fwd_bwd() {
    let Some(c) = gpu() else { return };
    let mut r = Rng::new("rmsnorm");
    let (rows, dim, eps) = (19, 333, 1e-6f32);
    let (x, xh) = up(&c, &r.vec(rows * dim, 2.0));
    let (w, wh) = up(&c, &r.vec(dim, 1.0));
    let mut out = poison(&c, rows * dim);
    let mut rstd = poison_f32(&c, rows);
    c.rmsnorm(&x, &w, &mut out, &mut rstd, NormDims { rows, dim }, eps)
        .unwrap();
    let mut outr = vec![0f64; rows * dim];
    let mut rsr = vec![0f64; rows];
    for i in 0..rows {
        let ms = (0..dim)
            .map(|j| (xh[i * dim + j] as f64).powi(2))
            .sum::<f64>()
            / dim as f64;
        rsr[i] = 1.0 / (ms + eps as f64).sqrt();
        for j in 0..dim {
            outr[i * dim + j] = xh[i * dim + j] as f64 * rsr[i] * wh[j] as f64;
        }
    }
    check(
        "rmsnorm out",
        &c.download(&out, rows * dim).unwrap(),
        &outr,
        1e-2,
    );
    check(
        "rmsnorm rstd",
        &c.download_f32(&rstd, rows).unwrap(),
        &rsr,
        1e-5,
    );

    let (g, gh) = up(&c, &r.vec(rows * dim, 1.0));
    let (mut dx, dx0) = up(&c, &r.vec(rows * dim, 1.0));
    let mut dw = c.zeros_f32(dim).unwrap();
    c.rmsnorm_bwd(
        &g,
        &x,
        &w,
        &rstd,
        NormGrads {
            dx: &mut dx,
            dw: Some(&mut dw),
        },
        NormDims { rows, dim },
    )
    .unwrap();
    let mut dxr: Vec<f64> = dx0.iter().map(|&v| v as f64).collect();
    let mut dwr = vec![0f64; dim];
    for i in 0..rows {
        let rs = rsr[i];
        let cdot: f64 = (0..dim)
            .map(|j| gh[i * dim + j] as f64 * wh[j] as f64 * xh[i * dim + j] as f64)
            .sum();
        for j in 0..dim {
            let xv = xh[i * dim + j] as f64;
            dxr[i * dim + j] +=
                rs * wh[j] as f64 * gh[i * dim + j] as f64 - xv * rs.powi(3) * cdot / dim as f64;
            dwr[j] += gh[i * dim + j] as f64 * xv * rs;
        }
    }
    check(
        "rmsnorm dx (accumulated)",
        &c.download(&dx, rows * dim).unwrap(),
        &dxr,
        1e-2,
    );
    check("rmsnorm dw", &c.download_f32(&dw, dim).unwrap(), &dwr, 1e-4);
}

/// The fused residual add + RMSNorm against the two ops it replaces (add_inplace then rmsnorm:
/// the same bits for the new residual, the normed rows and rstd) and against the CPU backend
/// (the sum rounded to bf16, then the f32 norm), at Qwen2.5 hidden sizes and odd ones, outputs
/// poisoned.
#[test]
fn add_rmsnorm_fused() {
    let Some(c) = gpu() else { return };
    let mut r = Rng::new("add_rmsnorm");
    let eps = 1e-6f32;
    for (rows, dim) in [(5, 896), (3, 3584), (17, 200), (2, 1), (1, 333)] {
        let at = format!("add_rmsnorm rows {rows} dim {dim}");
        let d = NormDims { rows, dim };
        let (mut xs, xh) = up(&c, &r.vec(rows * dim, 2.0));
        let (delta, dh) = up(&c, &r.vec(rows * dim, 2.0));
        let (w, wh) = up(&c, &r.vec(dim, 1.0));
        // Separate: add_inplace, then rmsnorm.
        c.add_inplace(&mut xs, &delta, rows * dim).unwrap();
        let (mut outs, mut rstds) = (poison(&c, rows * dim), poison_f32(&c, rows));
        c.rmsnorm(&xs, &w, &mut outs, &mut rstds, d, eps).unwrap();
        // Fused.
        let mut xf = c.upload(&xh).unwrap();
        let (mut outf, mut rstdf) = (poison(&c, rows * dim), poison_f32(&c, rows));
        let y = NormOut {
            out: &mut outf,
            rstd: &mut rstdf,
        };
        c.add_rmsnorm(&mut xf, &delta, &w, y, d, eps).unwrap();
        let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
        let n = rows * dim;
        let (x_f, out_f) = (c.download(&xf, n).unwrap(), c.download(&outf, n).unwrap());
        let rstd_f = c.download_f32(&rstdf, rows).unwrap();
        assert_eq!(
            bits(x_f.clone()),
            bits(c.download(&xs, n).unwrap()),
            "{at}: residual differs from add_inplace"
        );
        assert_eq!(
            bits(out_f.clone()),
            bits(c.download(&outs, n).unwrap()),
            "{at}: out differs from rmsnorm"
        );
        assert_eq!(
            bits(rstd_f.clone()),
            bits(c.download_f32(&rstds, rows).unwrap()),
            "{at}: rstd differs from rmsnorm"
        );
        // The CPU backend: the f32 sum rounded to bf16 is the device's residual exactly; the
        // norm of that residual within the bf16 bound.
        let cpu = Cpu;
        let mut xc = xh.clone();
        cpu.add_inplace(&mut xc, &dh, n).unwrap();
        let xc = bf16_round(&xc);
        assert_eq!(bits(x_f), bits(xc.clone()), "{at}: residual vs the CPU sum");
        let (mut outc, mut rstdc) = (vec![f32::NAN; n], vec![f32::NAN; rows]);
        cpu.rmsnorm(&xc, &wh, &mut outc, &mut rstdc, d, eps)
            .unwrap();
        let want = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
        check(&format!("{at} out"), &out_f, &want(&outc), 1e-2);
        check(&format!("{at} rstd"), &rstd_f, &want(&rstdc), 1e-5);
    }
}

/// Bad fused add + RMSNorm sizes: each call rejected by both backends (see [`BadCalls`]).
#[test]
fn both_backends_reject_bad_add_rmsnorm() {
    let Some((c, cpu, mut r, mut calls)) = bad_calls("add + RMSNorm sizes") else {
        return;
    };
    for (what, dim, delta_len) in [("dim 0", 0usize, 2 * 64), ("short delta", 64, 64)] {
        let xr = r.vec(2 * 64, 1.0);
        let mut xc = xr.clone();
        let mut xg = c.upload(&xr).unwrap();
        let dr = r.vec(delta_len, 1.0);
        let dg = c.upload(&dr).unwrap();
        let (mut oo, mut rs) = (vec![0f32; 2 * 64], vec![0f32; 2]);
        let (mut oog, mut rsg) = (poison(&c, 2 * 64), poison_f32(&c, 2));
        let d = NormDims { rows: 2, dim };
        let w = xr[..64].to_vec();
        let wg = c.upload(&w).unwrap();
        let y = NormOut {
            out: &mut oo,
            rstd: &mut rs,
        };
        let cr = cpu.add_rmsnorm(&mut xc, &dr, &w, y, d, 1e-6);
        let y = NormOut {
            out: &mut oog,
            rstd: &mut rsg,
        };
        let gr = c.add_rmsnorm(&mut xg, &dg, &wg, y, d, 1e-6);
        calls.both(&format!("add_rmsnorm: {what}"), cr, cuda_rejects(&c, gr));
    }
}

fn rope_ref(x: &[f32], pos: &[u32], nh: usize, hd: usize, theta: f32, sign: f64) -> Vec<f64> {
    let mut o: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    let half = hd / 2;
    for (t, &p) in pos.iter().enumerate() {
        for h in 0..nh {
            let base = (t * nh + h) * hd;
            for i in 0..half {
                let inv = (theta as f64).powf(-((2 * i) as f64) / hd as f64);
                let (s, co) = (p as f64 * inv).sin_cos();
                let s = s * sign;
                let (a, b) = (o[base + i], o[base + i + half]);
                o[base + i] = a * co - b * s;
                o[base + i + half] = b * co + a * s;
            }
        }
    }
    o
}

#[test]
fn rope_fwd_bwd() {
    let Some(c) = gpu() else { return };
    let mut r = Rng::new("rope");
    for hd in [64usize, 128] {
        let (n_tok, nh, theta) = (29, 3, 1e6f32);
        let pos: Vec<u32> = (0..n_tok).map(|_| (r.next() % 4000) as u32).collect();
        let pd = c.upload_u32(&pos).unwrap();
        let (mut x, xh) = up(&c, &r.vec(n_tok * nh * hd, 1.0));
        c.rope(&mut x, &pd, n_tok, nh, hd, theta).unwrap();
        check(
            &format!("rope fwd d{hd}"),
            &c.download(&x, xh.len()).unwrap(),
            &rope_ref(&xh, &pos, nh, hd, theta, 1.0),
            1e-2,
        );
        let (mut g, gh) = up(&c, &r.vec(n_tok * nh * hd, 1.0));
        c.rope_bwd(&mut g, &pd, n_tok, nh, hd, theta).unwrap();
        check(
            &format!("rope bwd d{hd}"),
            &c.download(&g, gh.len()).unwrap(),
            &rope_ref(&gh, &pos, nh, hd, theta, -1.0),
            1e-2,
        );
    }
}

#[test]
fn swiglu_fwd_bwd() {
    let Some(c) = gpu() else { return };
    let mut r = Rng::new("swiglu");
    let n = 1003;
    let (g, gh) = up(&c, &r.vec(n, 4.0));
    let (u, uh) = up(&c, &r.vec(n, 2.0));
    let mut o = poison(&c, n);
    c.swiglu(&g, &u, &mut o, n).unwrap();
    let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
    let orf: Vec<f64> = (0..n)
        .map(|i| gh[i] as f64 * sig(gh[i] as f64) * uh[i] as f64)
        .collect();
    check("swiglu fwd", &c.download(&o, n).unwrap(), &orf, 1e-2);
    let (d, dh) = up(&c, &r.vec(n, 1.0));
    let (mut dg, mut du) = (poison(&c, n), poison(&c, n));
    c.swiglu_bwd(&d, &g, &u, &mut dg, &mut du, n).unwrap();
    let dgr: Vec<f64> = (0..n)
        .map(|i| {
            let (x, s) = (gh[i] as f64, sig(gh[i] as f64));
            dh[i] as f64 * uh[i] as f64 * s * (1.0 + x * (1.0 - s))
        })
        .collect();
    let dur: Vec<f64> = (0..n)
        .map(|i| dh[i] as f64 * gh[i] as f64 * sig(gh[i] as f64))
        .collect();
    check("swiglu dgate", &c.download(&dg, n).unwrap(), &dgr, 1e-2);
    check("swiglu dup", &c.download(&du, n).unwrap(), &dur, 1e-2);
}

#[test]
fn embedding_fwd_bwd() {
    let Some(c) = gpu() else { return };
    let mut r = Rng::new("embedding");
    let (vocab, dim, n_tok) = (101, 77, 45);
    let (table, th) = up(&c, &r.vec(vocab * dim, 1.0));
    let ids: Vec<u32> = (0..n_tok)
        .map(|_| (r.next() % vocab as u64) as u32)
        .collect();
    let idd = c.upload_u32(&ids).unwrap();
    let mut out = poison(&c, n_tok * dim);
    c.embedding(&idd, &table, &mut out, n_tok, dim).unwrap();
    let er: Vec<f64> = ids
        .iter()
        .flat_map(|&i| {
            th[i as usize * dim..(i as usize + 1) * dim]
                .iter()
                .map(|&v| v as f64)
        })
        .collect();
    check(
        "embedding fwd",
        &c.download(&out, n_tok * dim).unwrap(),
        &er,
        1e-6,
    );
    let (dout, doh) = up(&c, &r.vec(n_tok * dim, 1.0));
    let mut dt = c.zeros_f32(vocab * dim).unwrap();
    c.embedding_bwd(&idd, &dout, &mut dt, n_tok, dim).unwrap();
    let mut dtr = vec![0f64; vocab * dim];
    for (t, &i) in ids.iter().enumerate() {
        for j in 0..dim {
            dtr[i as usize * dim + j] += doh[t * dim + j] as f64;
        }
    }
    check(
        "embedding bwd",
        &c.download_f32(&dt, vocab * dim).unwrap(),
        &dtr,
        1e-5,
    );
    // An out-of-range id is an error value at the next synchronisation, not a crash.
    let bad = c.upload_u32(&[vocab as u32 + 3]).unwrap();
    let mut o1 = poison(&c, dim);
    let r1 = c.embedding(&bad, &table, &mut o1, 1, dim);
    let r2 = c.synchronize();
    assert!(
        r1.is_err() || r2.is_err(),
        "out-of-range id must be reported"
    );
    c.synchronize().unwrap();
}

#[test]
fn prefixed_attention_matches_cpu_math() {
    // The shared-prompt layout: per group a prompt segment, then its responses, each reading
    // the prompt in full (prefix) and itself causally; odd lengths across the 32-row key tiles
    // and 64-row query blocks (the first group's prompt of 65..100 rows: three or four key
    // tiles and two query blocks, and its first response of 65..74 rows: two query blocks;
    // the other prompts 1..50, responses 0..39), empty response segments, groups of 1..5
    // responses; GQA ratios 7 and 1.
    let Some(c) = gpu() else { return };
    let mut r = Rng::new("prefixed_attention");
    for (hd, nh, nkv) in [(64, 14, 2), (128, 2, 2)] {
        let (mut cu, mut prefix) = (vec![0u32], Vec::new());
        let mut at = 0u32;
        for grp in 0..3 {
            let p0 = at;
            at += if grp == 0 {
                65 + r.below(36)
            } else {
                1 + r.below(50)
            } as u32;
            let p1 = at;
            cu.push(at);
            prefix.extend([p0, p0]);
            for resp in 0..1 + r.below(5) {
                at += if grp == 0 && resp == 0 {
                    65 + r.below(10)
                } else {
                    r.below(40)
                } as u32;
                cu.push(at);
                prefix.extend([p0, p1]);
            }
        }
        let n_tok = at as usize;
        let max_len = cu.windows(2).map(|w| (w[1] - w[0]) as usize).max().unwrap();
        let (qn, kn) = (n_tok * nh * hd, n_tok * nkv * hd);
        let (q, qh) = up(&c, &r.vec(qn, 1.0));
        let (k, kh) = up(&c, &r.vec(kn, 1.0));
        let (v, vh) = up(&c, &r.vec(kn, 1.0));
        let (dout, dh) = up(&c, &r.vec(qn, 1.0));
        let f64v = |x: &[f32]| x.iter().map(|&y| y as f64).collect::<Vec<f64>>();
        let (q64, k64, v64, d64) = (f64v(&qh), f64v(&kh), f64v(&vh), f64v(&dh));
        let (mut o64, mut l64) = (vec![f64::NAN; qn], vec![f64::NAN; nh * n_tok]);
        tooln1::backend::cpu::math::attention_prefixed(
            Qkv {
                q: &q64,
                k: &k64,
                v: &v64,
            },
            &mut o64,
            &mut l64,
            &cu,
            &prefix,
            Heads {
                n_heads: nh,
                n_kv: nkv,
                head_dim: hd,
            },
        );
        let (cud, pd) = (c.upload_u32(&cu).unwrap(), c.upload_u32(&prefix).unwrap());
        let mut out = poison(&c, qn);
        let mut lse = poison_f32(&c, nh * n_tok);
        let seqs = tooln1::backend::Packed {
            cu_seqlens: &cud,
            cu_host: &cu,
            max_len,
        };
        let pre = tooln1::backend::Prefix {
            prefix: &pd,
            prefix_host: &prefix,
        };
        let heads = tooln1::backend::Heads {
            n_heads: nh,
            n_kv: nkv,
            head_dim: hd,
        };
        c.attention_prefixed(
            Qkv {
                q: &q,
                k: &k,
                v: &v,
            },
            &mut out,
            &mut lse,
            &seqs,
            &pre,
            heads,
        )
        .unwrap();
        let tag = format!("prefixed attention hd{hd}");
        let og = c.download(&out, qn).unwrap();
        check(&format!("{tag} out"), &og, &o64, 1e-2);
        check(
            &format!("{tag} lse"),
            &c.download_f32(&lse, nh * n_tok).unwrap(),
            &l64,
            1e-2,
        );
        // backward from the device's own out/lse, against the f64 math at the f64 forward
        let (mut dq64, mut dk64, mut dv64) =
            (vec![f64::NAN; qn], vec![f64::NAN; kn], vec![f64::NAN; kn]);
        tooln1::backend::cpu::math::attention_prefixed_bwd(
            Qkv {
                q: &q64,
                k: &k64,
                v: &v64,
            },
            AttnSaved {
                dout: &d64,
                out: &o64,
                lse: &l64,
            },
            AttnGrads {
                dq: &mut dq64,
                dk: &mut dk64,
                dv: &mut dv64,
            },
            &cu,
            &prefix,
            Heads {
                n_heads: nh,
                n_kv: nkv,
                head_dim: hd,
            },
        );
        let (mut dq, mut dk, mut dv) = (poison(&c, qn), poison(&c, kn), poison(&c, kn));
        c.attention_prefixed_bwd(
            Qkv {
                q: &q,
                k: &k,
                v: &v,
            },
            AttnSaved {
                dout: &dout,
                out: &out,
                lse: &lse,
            },
            AttnGrads {
                dq: &mut dq,
                dk: &mut dk,
                dv: &mut dv,
            },
            &seqs,
            &pre,
            heads,
        )
        .unwrap();
        check(
            &format!("{tag} dq"),
            &c.download(&dq, qn).unwrap(),
            &dq64,
            1e-2,
        );
        check(
            &format!("{tag} dk"),
            &c.download(&dk, kn).unwrap(),
            &dk64,
            1e-2,
        );
        check(
            &format!("{tag} dv"),
            &c.download(&dv, kn).unwrap(),
            &dv64,
            1e-2,
        );
    }
}

#[test]
fn scatter_add_rows_matches_reference() {
    let Some(c) = gpu() else { return };
    let mut r = Rng::new("scatter_add_rows");
    // repeated ids (the shared layout's prompt row is read n times), a dim over one block
    let (rows, dim, n) = (13, 300, 41);
    let ids: Vec<u32> = (0..n).map(|_| r.below(rows) as u32).collect();
    let idd = c.upload_u32(&ids).unwrap();
    let (src, sh) = up(&c, &r.vec(n * dim, 1.0));
    let (mut dst, dh) = up(&c, &r.vec(rows * dim, 1.0));
    c.scatter_add_rows(&idd, &src, &mut dst, n, rows, dim)
        .unwrap();
    let mut want: Vec<f64> = dh.iter().map(|&x| x as f64).collect();
    for (t, &i) in ids.iter().enumerate() {
        for j in 0..dim {
            want[i as usize * dim + j] += sh[t * dim + j] as f64;
        }
    }
    // each sum is rounded to bf16 after every row
    check(
        "scatter_add_rows",
        &c.download(&dst, rows * dim).unwrap(),
        &want,
        1e-2,
    );
    // an id past dst_rows is an error at the next synchronisation, not a write out of bounds
    let bad = c.upload_u32(&[rows as u32]).unwrap();
    let r1 = c.scatter_add_rows(&bad, &src, &mut dst, 1, rows, dim);
    let r2 = c.synchronize();
    assert!(
        r1.is_err() || r2.is_err(),
        "out-of-range id must be reported"
    );
    c.synchronize().unwrap();
}

/// The f64 reference of attention: out, lse, dq, dk, dv.
type AttnRef = (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>);

/// Naive causal GQA attention and its backward in f64 over packed sequences.
#[allow(clippy::too_many_arguments)]
fn attn_ref(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dout: &[f32],
    cu: &[u32],
    nh: usize,
    nkv: usize,
    d: usize,
) -> AttnRef {
    let n = *cu.last().unwrap() as usize;
    let (mut o, mut lse) = (vec![0f64; n * nh * d], vec![0f64; nh * n]);
    let (mut dq, mut dk, mut dv) = (
        vec![0f64; n * nh * d],
        vec![0f64; n * nkv * d],
        vec![0f64; n * nkv * d],
    );
    let sc = 1.0 / (d as f64).sqrt();
    for b in 0..cu.len() - 1 {
        let (s0, s1) = (cu[b] as usize, cu[b + 1] as usize);
        for h in 0..nh {
            let g = h / (nh / nkv);
            for i in s0..s1 {
                let qi = &q[(i * nh + h) * d..][..d];
                let sc_row: Vec<f64> = (s0..=i)
                    .map(|j| {
                        (0..d)
                            .map(|x| qi[x] as f64 * k[(j * nkv + g) * d + x] as f64)
                            .sum::<f64>()
                            * sc
                    })
                    .collect();
                let m = sc_row.iter().cloned().fold(f64::MIN, f64::max);
                let z: f64 = sc_row.iter().map(|s| (s - m).exp()).sum();
                lse[h * n + i] = m + z.ln();
                let p: Vec<f64> = sc_row.iter().map(|s| (s - m).exp() / z).collect();
                for x in 0..d {
                    o[(i * nh + h) * d + x] = p
                        .iter()
                        .enumerate()
                        .map(|(jj, pj)| pj * v[((s0 + jj) * nkv + g) * d + x] as f64)
                        .sum();
                }
                let go = &dout[(i * nh + h) * d..][..d];
                let dp: Vec<f64> = (s0..=i)
                    .map(|j| {
                        (0..d)
                            .map(|x| go[x] as f64 * v[(j * nkv + g) * d + x] as f64)
                            .sum()
                    })
                    .collect();
                let dd: f64 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
                for (jj, j) in (s0..=i).enumerate() {
                    let ds = p[jj] * (dp[jj] - dd);
                    for x in 0..d {
                        dv[(j * nkv + g) * d + x] += p[jj] * go[x] as f64;
                        dq[(i * nh + h) * d + x] += sc * ds * k[(j * nkv + g) * d + x] as f64;
                        dk[(j * nkv + g) * d + x] += sc * ds * qi[x] as f64;
                    }
                }
            }
        }
    }
    (o, lse, dq, dk, dv)
}

/// Random attention inputs over packed sequences of `lens`, on the device and (bf16-rounded)
/// on the host, with the f64 reference of the forward and backward.
struct AttnCase {
    cu: Vec<u32>,
    n: usize,
    q: <Cuda as Backend>::T,
    qh: Vec<f32>,
    k: <Cuda as Backend>::T,
    v: <Cuda as Backend>::T,
    /// The upstream gradient dout.
    g: <Cuda as Backend>::T,
    /// Reference out, lse, dq, dk, dv.
    reference: AttnRef,
}

/// Random q, k, v, dout for heads (`nh`, `nkv`, `d`) over sequences of `lens`.
fn attention_inputs(
    c: &Cuda,
    r: &mut Rng,
    d: usize,
    nh: usize,
    nkv: usize,
    lens: &[u32],
) -> AttnCase {
    let mut cu = vec![0u32];
    for &l in lens {
        cu.push(cu.last().unwrap() + l);
    }
    let n = *cu.last().unwrap() as usize;
    let (q, qh) = up(c, &r.vec(n * nh * d, 1.0));
    let (k, kh) = up(c, &r.vec(n * nkv * d, 1.0));
    let (v, vh) = up(c, &r.vec(n * nkv * d, 1.0));
    let (g, gh) = up(c, &r.vec(n * nh * d, 1.0));
    let reference = attn_ref(&qh, &kh, &vh, &gh, &cu, nh, nkv, d);
    AttnCase {
        cu,
        n,
        q,
        qh,
        k,
        v,
        g,
        reference,
    }
}

/// Attention forward and backward over packed sequences of `lens` (random q, k, v, dout;
/// poisoned outputs) against the f64 reference: out and dv 1e-2, lse 1e-5, dq and dk 2e-2 (the
/// bounds of the f32 kernels before the tensor-core ones: P and dS rounded to bf16 for the
/// mma, a relative 2^-9 per element, stay well inside them). The backward runs twice and must
/// repeat bit for bit (no float atomics).
#[allow(clippy::too_many_arguments)]
fn attention_case(
    c: &Cuda,
    r: &mut Rng,
    d: usize,
    nh: usize,
    nkv: usize,
    lens: &[u32],
    max_len: usize,
    tag: &str,
) {
    let AttnCase {
        cu,
        n,
        q,
        k,
        v,
        g,
        reference: (or, lr, dqr, dkr, dvr),
        ..
    } = attention_inputs(c, r, d, nh, nkv, lens);
    let cud = c.upload_u32(&cu).unwrap();
    let mut out = poison(c, n * nh * d);
    let mut lse = poison_f32(c, nh * n);
    c.attention(
        Qkv {
            q: &q,
            k: &k,
            v: &v,
        },
        &mut out,
        &mut lse,
        &Packed {
            cu_seqlens: &cud,
            cu_host: &cu,
            max_len,
        },
        Heads {
            n_heads: nh,
            n_kv: nkv,
            head_dim: d,
        },
    )
    .unwrap();
    check(
        &format!("attention out {tag}"),
        &c.download(&out, n * nh * d).unwrap(),
        &or,
        1e-2,
    );
    check(
        &format!("attention lse {tag}"),
        &c.download_f32(&lse, nh * n).unwrap(),
        &lr,
        1e-5,
    );
    let (mut dq, mut dk, mut dv) = (
        poison(c, n * nh * d),
        poison(c, n * nkv * d),
        poison(c, n * nkv * d),
    );
    c.attention_bwd(
        Qkv {
            q: &q,
            k: &k,
            v: &v,
        },
        AttnSaved {
            dout: &g,
            out: &out,
            lse: &lse,
        },
        AttnGrads {
            dq: &mut dq,
            dk: &mut dk,
            dv: &mut dv,
        },
        &Packed {
            cu_seqlens: &cud,
            cu_host: &cu,
            max_len,
        },
        Heads {
            n_heads: nh,
            n_kv: nkv,
            head_dim: d,
        },
    )
    .unwrap();
    let (mut dq2, mut dk2, mut dv2) = (
        poison(c, n * nh * d),
        poison(c, n * nkv * d),
        poison(c, n * nkv * d),
    );
    c.attention_bwd(
        Qkv {
            q: &q,
            k: &k,
            v: &v,
        },
        AttnSaved {
            dout: &g,
            out: &out,
            lse: &lse,
        },
        AttnGrads {
            dq: &mut dq2,
            dk: &mut dk2,
            dv: &mut dv2,
        },
        &Packed {
            cu_seqlens: &cud,
            cu_host: &cu,
            max_len,
        },
        Heads {
            n_heads: nh,
            n_kv: nkv,
            head_dim: d,
        },
    )
    .unwrap();
    for (what, a, b, len) in [
        ("dq", &dq, &dq2, n * nh * d),
        ("dk", &dk, &dk2, n * nkv * d),
        ("dv", &dv, &dv2, n * nkv * d),
    ] {
        let (x, y) = (c.download(a, len).unwrap(), c.download(b, len).unwrap());
        let same = x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits());
        assert!(same, "attention {what} {tag}: a second backward differs");
    }
    for (what, got, want, bound) in [
        ("dq", c.download(&dq, n * nh * d).unwrap(), &dqr, 2e-2),
        ("dk", c.download(&dk, n * nkv * d).unwrap(), &dkr, 2e-2),
        ("dv", c.download(&dv, n * nkv * d).unwrap(), &dvr, 1e-2),
    ] {
        check(&format!("attention {what} {tag}"), &got, want, bound);
    }
}

/// The head shapes the attention tests run: head_dim 64 and 128, GQA ratios 7 (14 heads over
/// 2 kv heads, 7 over 1) and 2, and MHA.
const ATTN_SHAPES: [(usize, usize, usize); 4] = [(64, 14, 2), (64, 4, 2), (128, 4, 4), (128, 7, 1)];

/// Several packed sequences of odd lengths: one over two 64-row query blocks (131: three query
/// blocks, five 32-row key tiles), a single-token one, partial tiles.
#[test]
fn attention_fwd_bwd() {
    let Some(c) = gpu() else { return };
    let mut r = Rng::new("attention");
    for (d, nh, nkv) in ATTN_SHAPES {
        let lens = [37u32, 5, 131, 1];
        let max_len = *lens.iter().max().unwrap() as usize;
        let tag = format!("d{d} h{nh} kv{nkv}");
        attention_case(&c, &mut r, d, nh, nkv, &lens, max_len, &tag);
    }
}

/// kv_store then decode attention: the last token of each sequence against its cached
/// keys/values, against the f64 reference of full attention at that row.
#[test]
fn kv_store_and_attention_decode() {
    let Some(c) = gpu() else { return };
    let mut r = Rng::new("attention_decode");
    for (d, nh, nkv) in ATTN_SHAPES {
        let lens = [37u32, 5, 70, 1];
        let max_len = *lens.iter().max().unwrap() as usize;
        let tag = format!("d{d} h{nh} kv{nkv}");
        let AttnCase {
            cu,
            n,
            qh,
            k,
            v,
            reference: (or, ..),
            ..
        } = attention_inputs(&c, &mut r, d, nh, nkv, &lens);
        let n_seq = lens.len();
        let cache_len = max_len + 3;
        let kvd = nkv * d;
        let mut kc = poison(&c, n_seq * cache_len * kvd);
        let mut vc = poison(&c, n_seq * cache_len * kvd);
        let dst: Vec<u32> = (0..n_seq)
            .flat_map(|b| (0..lens[b]).map(move |p| (b * cache_len) as u32 + p))
            .collect();
        let dstd = c.upload_u32(&dst).unwrap();
        c.kv_store(
            &k,
            &v,
            &dstd,
            &mut kc,
            &mut vc,
            KvRows {
                n_tok: n,
                kv_dim: kvd,
            },
        )
        .unwrap();
        let last: Vec<usize> = (0..n_seq).map(|b| cu[b + 1] as usize - 1).collect();
        let qd: Vec<f32> = last
            .iter()
            .flat_map(|&t| qh[t * nh * d..(t + 1) * nh * d].to_vec())
            .collect();
        let (qdev, _) = up(&c, &qd);
        let lensd = c.upload_u32(&lens).unwrap();
        let mut od = poison(&c, n_seq * nh * d);
        c.attention_decode(
            &qdev,
            &kc,
            &vc,
            &Cached {
                lens: &lensd,
                table: &c
                    .upload_u32(&(0..n_seq as u32).collect::<Vec<_>>())
                    .unwrap(),
                n_seq,
                max_blocks: 1,
                block_size: cache_len,
            },
            &mut od,
            Heads {
                n_heads: nh,
                n_kv: nkv,
                head_dim: d,
            },
        )
        .unwrap();
        let odr: Vec<f64> = last
            .iter()
            .flat_map(|&t| or[t * nh * d..(t + 1) * nh * d].to_vec())
            .collect();
        check(
            &format!("attention decode {tag}"),
            &c.download(&od, n_seq * nh * d).unwrap(),
            &odr,
            1e-2,
        );
    }
}

/// Paged decode (flash-decoding through the block table: shuffled blocks, odd block sizes,
/// lengths giving 1 to 3 splits) gives the contiguous cache's bits, for GQA ratios 1, 2 and 7
/// and head dims 64 and 128; a sequence decoded alone gives its bits in the batch; and the
/// output is within bf16 bounds of the CPU backend.
#[test]
fn paged_attention_decode_matches_contiguous() {
    let Some(c) = gpu() else { return };
    let mut r = Rng::new("paged_attention_decode");
    let lens = [1u32, 37, 16, 300, 5, 129];
    for (hd, nh, nkv) in [(64, 4, 4), (128, 4, 2), (64, 7, 1), (128, 7, 1)] {
        let heads = Heads {
            n_heads: nh,
            n_kv: nkv,
            head_dim: hd,
        };
        let tag = format!("d{hd} h{nh} kv{nkv}");
        let case = common::paged::DecodeCase::random(&mut r, heads, &lens);
        let want = case.contiguous(&c);
        let cpu = case.contiguous(&tooln1::backend::cpu::Cpu);
        common::check32(&format!("paged decode {tag} vs CPU"), &want, &cpu, 1e-2);
        for bs in [16usize, 5, 33] {
            let got = case.paged(&c, &mut r, bs);
            common::paged::same_bits(&format!("paged decode {tag} block {bs}"), &got, &want);
        }
        // Sequence 3 (300 positions, 3 splits) alone.
        let row = nh * hd;
        let alone = common::paged::DecodeCase {
            heads,
            lens: vec![lens[3]],
            q: case.q[3 * row..4 * row].to_vec(),
            k: vec![case.k[3].clone()],
            v: vec![case.v[3].clone()],
        };
        let got = alone.paged(&c, &mut r, 7);
        common::paged::same_bits(
            &format!("decode {tag}: a sequence alone"),
            &got,
            &want[3 * row..4 * row],
        );
    }
}

#[test]
fn logprobs_fwd_bwd_chunked() {
    let Some(mut c) = gpu() else { return };
    let mut r = Rng::new("logprobs");
    let (n_tok, dim, vocab) = (23, 67, 1001);
    c.set_logprob_chunks(7, 300); // several token and vocabulary chunks, ragged last ones
    let (h, hh) = up(&c, &r.vec(n_tok * dim, 1.0));
    let (w, wh) = up(&c, &r.vec(vocab * dim, 0.5));
    let tg: Vec<u32> = (0..n_tok)
        .map(|_| (r.next() % vocab as u64) as u32)
        .collect();
    let tgd = c.upload_u32(&tg).unwrap();
    let (mut lp, mut lse, mut ent) = (
        poison_f32(&c, n_tok),
        poison_f32(&c, n_tok),
        poison_f32(&c, n_tok),
    );
    c.logprobs(
        LmHead {
            h: &h,
            w: &w,
            targets: &tgd,
        },
        LogprobsOut {
            logp: &mut lp,
            lse: &mut lse,
            entropy: Some(&mut ent),
        },
        VocabDims { n_tok, dim, vocab },
        1.0,
    )
    .unwrap();
    let mut lpr = vec![0f64; n_tok];
    let mut lser = vec![0f64; n_tok];
    let mut entr = vec![0f64; n_tok];
    let mut probs = vec![0f64; n_tok * vocab];
    for t in 0..n_tok {
        let lg: Vec<f64> = (0..vocab)
            .map(|v| {
                (0..dim)
                    .map(|x| hh[t * dim + x] as f64 * wh[v * dim + x] as f64)
                    .sum()
            })
            .collect();
        let m = lg.iter().cloned().fold(f64::MIN, f64::max);
        let l = m + lg.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
        lser[t] = l;
        lpr[t] = lg[tg[t] as usize] - l;
        entr[t] = -lg.iter().map(|x| (x - l).exp() * (x - l)).sum::<f64>();
        for v in 0..vocab {
            probs[t * vocab + v] = (lg[v] - l).exp();
        }
    }
    check(
        "logprobs logp",
        &c.download_f32(&lp, n_tok).unwrap(),
        &lpr,
        1e-4,
    );
    check(
        "logprobs lse",
        &c.download_f32(&lse, n_tok).unwrap(),
        &lser,
        1e-5,
    );
    check(
        "logprobs entropy",
        &c.download_f32(&ent, n_tok).unwrap(),
        &entr,
        1e-4,
    );

    let dl: Vec<f32> = r.vec(n_tok, 1.0);
    let dld = c.upload_f32(&dl).unwrap();
    let mut dh = poison(&c, n_tok * dim);
    let mut dw = c.zeros_f32(vocab * dim).unwrap();
    c.logprobs_bwd(
        &dld,
        LmHead {
            h: &h,
            w: &w,
            targets: &tgd,
        },
        &lse,
        LogprobsGrads {
            dh: &mut dh,
            dw: Some(&mut dw),
        },
        VocabDims { n_tok, dim, vocab },
        1.0,
    )
    .unwrap();
    let mut dhr = vec![0f64; n_tok * dim];
    let mut dwr = vec![0f64; vocab * dim];
    for t in 0..n_tok {
        for v in 0..vocab {
            let g =
                dl[t] as f64 * (if v == tg[t] as usize { 1.0 } else { 0.0 } - probs[t * vocab + v]);
            for x in 0..dim {
                dhr[t * dim + x] += g * wh[v * dim + x] as f64;
                dwr[v * dim + x] += g * hh[t * dim + x] as f64;
            }
        }
    }
    check(
        "logprobs dh",
        &c.download(&dh, n_tok * dim).unwrap(),
        &dhr,
        1e-2,
    );
    check(
        "logprobs dw",
        &c.download_f32(&dw, vocab * dim).unwrap(),
        &dwr,
        1e-2,
    );

    let mut lg = poison_f32(&c, 3 * vocab);
    c.logits(
        &h,
        &w,
        &mut lg,
        VocabDims {
            n_tok: 3,
            dim,
            vocab,
        },
    )
    .unwrap();
    let lgr: Vec<f64> = (0..3)
        .flat_map(|t| (0..vocab).map(move |v| (t, v)))
        .map(|(t, v)| {
            (0..dim)
                .map(|x| hh[t * dim + x] as f64 * wh[v * dim + x] as f64)
                .sum()
        })
        .collect();
    check(
        "logits",
        &c.download_f32(&lg, 3 * vocab).unwrap(),
        &lgr,
        1e-5,
    );
}

#[test]
fn grpo_loss_all_modes_vs_cpu() {
    let Some(c) = gpu() else { return };
    let cpu = Cpu;
    let mut r = Rng::new("grpo");
    let (n, n_seq) = (301, 7);
    let logp: Vec<f32> = r.vec(n, 2.0).iter().map(|x| x - 2.0).collect();
    let old: Vec<f32> = logp.iter().map(|x| x + (r.uni() - 0.5) * 0.8).collect();
    let refp: Vec<f32> = logp.iter().map(|x| x + (r.uni() - 0.5)).collect();
    let adv: Vec<f32> = r.vec(n, 1.5);
    // 0/1 masks plus a few fractional weights; sequence 3 left empty.
    let mut mask: Vec<f32> = (0..n)
        .map(|_| if r.uni() < 0.8 { 1.0 } else { 0.0 })
        .collect();
    mask[10] = 0.5;
    let seq: Vec<u32> = (0..n).map(|t| (t * n_seq / n) as u32).collect();
    for t in 0..n {
        if seq[t] == 3 {
            mask[t] = 0.0;
        }
    }
    let up32 = |v: &[f32]| c.upload_f32(v).unwrap();
    let (lpd, od, rd, ad, md) = (
        up32(&logp),
        up32(&old),
        up32(&refp),
        up32(&adv),
        up32(&mask),
    );
    let sd = c.upload_u32(&seq).unwrap();
    for agg in LossAgg::ALL {
        for kind in KlKind::ALL {
            let cfg = GrpoLossCfg {
                clip_low: 0.2,
                clip_high: 0.28,
                kl_coef: 0.05,
                kl_kind: kind,
                agg,
                norm_len: 50.0,
                loss_scale_div: 2.0,
            };
            let mut dl = poison_f32(&c, n);
            let out = c
                .grpo_loss(
                    &GrpoTokens {
                        logp: &lpd,
                        old_logp: &od,
                        ref_logp: &rd,
                        adv: &ad,
                        mask: &md,
                        seq_id: &sd,
                        n_tok: n,
                        n_seq,
                    },
                    &mut dl,
                    &cfg,
                )
                .unwrap();
            let mut dref = vec![f32::NAN; n];
            let want = cpu
                .grpo_loss(
                    &GrpoTokens {
                        logp: &logp,
                        old_logp: &old,
                        ref_logp: &refp,
                        adv: &adv,
                        mask: &mask,
                        seq_id: &seq,
                        n_tok: n,
                        n_seq,
                    },
                    &mut dref,
                    &cfg,
                )
                .unwrap();
            let tag = format!("{agg:?}/{kind:?}");
            let close = |a: f32, b: f32, what: &str| {
                assert!(
                    (a - b).abs() <= 1e-5 * b.abs().max(0.1),
                    "{tag} {what}: cuda {a} vs cpu {b}"
                );
            };
            close(out.loss, want.loss, "loss");
            close(out.pg_loss, want.pg_loss, "pg_loss");
            close(out.kl, want.kl, "kl");
            close(out.clip_frac, want.clip_frac, "clip_frac");
            close(out.ratio_mean, want.ratio_mean, "ratio_mean");
            close(out.n_tokens, want.n_tokens, "n_tokens");
            let dr: Vec<f64> = dref.iter().map(|&x| x as f64).collect();
            check(
                &format!("grpo dlogp {tag}"),
                &c.download_f32(&dl, n).unwrap(),
                &dr,
                1e-5,
            );
        }
    }
}

#[test]
fn adamw_with_master_copy() {
    let Some(c) = gpu() else { return };
    let mut r = Rng::new("adamw");
    let n = 5001;
    let (mut p, ph) = up(&c, &r.vec(n, 1.0));
    let mut master = c.upload_f32(&ph).unwrap();
    let g = r.vec(n, 0.1);
    let gd = c.upload_f32(&g).unwrap();
    let m0 = r.vec(n, 0.01);
    let v0: Vec<f32> = r.vec(n, 0.01).iter().map(|x| x.abs()).collect();
    let (mut m, mut v) = (c.upload_f32(&m0).unwrap(), c.upload_f32(&v0).unwrap());
    let hp = AdamWStep {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
        step: 7,
        grad_scale: 0.5,
    };
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
    let (mut pr, mut mr, mut vr) = (vec![0f64; n], vec![0f64; n], vec![0f64; n]);
    let bc1 = 1.0 - 0.9f64.powi(7);
    let bc2 = 1.0 - 0.999f64.powi(7);
    for i in 0..n {
        let gg = g[i] as f64 * 0.5;
        mr[i] = 0.9 * m0[i] as f64 + 0.1 * gg;
        vr[i] = 0.999 * v0[i] as f64 + 0.001 * gg * gg;
        let p0 = ph[i] as f64;
        pr[i] = p0 - 1e-3 * ((mr[i] / bc1) / ((vr[i] / bc2).sqrt() + 1e-8) + 0.01 * p0);
    }
    check("adamw m", &c.download_f32(&m, n).unwrap(), &mr, 1e-5);
    check("adamw v", &c.download_f32(&v, n).unwrap(), &vr, 1e-5);
    check(
        "adamw master",
        &c.download_f32(&master, n).unwrap(),
        &pr,
        1e-5,
    );
    check("adamw param (bf16)", &c.download(&p, n).unwrap(), &pr, 1e-2);
}

/// The global gradient norm's sum of squares (f64 partial sums on the device).
#[test]
fn sum_squares_f32_in_f64() {
    let Some(c) = gpu() else { return };
    let mut r = Rng::new("sum_squares");
    let n = 5001;
    let g = r.vec(n, 0.1);
    let gd = c.upload_f32(&g).unwrap();
    let ss = c.sum_squares_f32(&gd, n).unwrap();
    let ssr: f64 = g.iter().map(|&x| (x as f64).powi(2)).sum();
    assert!((ss - ssr).abs() <= 1e-9 * ssr, "sum_squares {ss} vs {ssr}");
}

#[test]
fn sampling_matches_cpu() {
    let Some(c) = gpu() else { return };
    let cpu = Cpu;
    let mut r = Rng::new("sampling");
    let (rows, vocab) = (64, 3001);
    let mut lg = r.vec(rows * vocab, 4.0);
    lg[5 * vocab + 17] = 9.0; // ties for greedy: lowest index wins
    lg[5 * vocab + 2000] = 9.0;
    for i in 0..40 {
        lg[9 * vocab + 100 + i] = 3.5; // a block of equal logits: ties ordered by index
    }
    let ld = c.upload_f32(&lg).unwrap();
    let seed = r.next();
    for (temp, top_p, top_k) in [
        (0.0f32, 1.0f32, 0usize),
        (1.0, 1.0, 0),
        (0.7, 0.9, 0),
        (1.0, 0.5, 50),
        (1.3, 1.0, 7),
        (2.0, 0.3, 0),
        (0.9, 0.0, 0),
    ] {
        let mut out = c.upload_u32(&vec![u32::MAX; rows]).unwrap();
        common::sample_at(
            &c, &ld, &mut out, rows, vocab, temp, top_p, top_k, seed, 100,
        )
        .unwrap();
        let got = c.download_u32(&out, rows).unwrap();
        // Deterministic: the same call gives the same tokens (the kernel's masses are integer
        // sums, independent of the order in which threads add them).
        for _ in 0..2 {
            let mut again = c.upload_u32(&vec![u32::MAX; rows]).unwrap();
            common::sample_at(
                &c, &ld, &mut again, rows, vocab, temp, top_p, top_k, seed, 100,
            )
            .unwrap();
            assert_eq!(
                c.download_u32(&again, rows).unwrap(),
                got,
                "T={temp} p={top_p} k={top_k}: sampling differs between identical calls"
            );
        }
        let mut want = vec![u32::MAX; rows];
        common::sample_at(
            &cpu, &lg, &mut want, rows, vocab, temp, top_p, top_k, seed, 100,
        )
        .unwrap();
        let agree = got.iter().zip(&want).filter(|(a, b)| a == b).count();
        println!("sample T={temp} p={top_p} k={top_k}: {agree}/{rows} rows agree with the CPU");
        // f32 vs f64 cumulative sums may flip a row sitting on a boundary; more than 2 of 64
        // means a different rule.
        assert!(
            agree + 2 >= rows,
            "T={temp} p={top_p} k={top_k}: got {got:?}\nwant {want:?}"
        );
        if temp == 0.0 || top_p == 0.0 {
            assert_eq!(got, want, "greedy and top_p = 0 must match exactly");
            assert_eq!(got[5], 17);
        }
    }
}

/// Per-draw logits rows and stream offsets (the rollout's shared first-token draws): the device
/// against the CPU, output poisoned.
#[test]
fn sampling_row_map_matches_cpu() {
    let Some(c) = gpu() else { return };
    let mut r = Rng::new("sampling_row_map");
    let (n_rows, vocab, draws) = (3, 1009, 29);
    let lg = r.vec(n_rows * vocab, 4.0);
    let ld = c.upload_f32(&lg).unwrap();
    let src: Vec<u32> = (0..draws).map(|_| r.below(n_rows) as u32).collect();
    let offsets: Vec<u64> = (0..draws).map(|_| r.next()).collect();
    let rows = tooln1::backend::SampleRows {
        offsets: &offsets,
        src: Some(&src),
        n_rows,
        vocab,
    };
    for temperature in [0.0f32, 1.0] {
        let p = tooln1::backend::SampleParams {
            temperature,
            top_p: 1.0,
            top_k: 0,
            seed: r.next(),
        };
        let mut out = c.upload_u32(&vec![u32::MAX; draws]).unwrap();
        c.sample(&ld, &mut out, &rows, &p).unwrap();
        let got = c.download_u32(&out, draws).unwrap();
        let mut want = vec![u32::MAX; draws];
        Cpu.sample(&lg, &mut want, &rows, &p).unwrap();
        let agree = got.iter().zip(&want).filter(|(a, b)| a == b).count();
        println!("sample row map T={temperature}: {agree}/{draws} draws agree with the CPU");
        // f32 vs f64 cumulative sums may flip a draw sitting on a boundary.
        assert!(agree + 1 >= draws, "got {got:?}\nwant {want:?}");
        if temperature == 0.0 {
            assert_eq!(got, want);
        }
    }
}

/// sample_table (the draws' table in a device buffer, as a replayed graph writes it): the same
/// tokens as `sample` with those rows and offsets, on both backends (the CPU through the
/// trait's default); a row id not below n_rows is an error on both, and out stays unwritten.
#[test]
fn sample_table_matches_sample() {
    let Some(c) = gpu() else { return };
    let mut r = Rng::new("sample_table");
    let (n_rows, vocab, draws) = (5, 777, 13);
    let lg = r.vec(n_rows * vocab, 4.0);
    let ld = c.upload_f32(&lg).unwrap();
    let src: Vec<u32> = (0..draws).map(|_| r.below(n_rows) as u32).collect();
    let offsets: Vec<u64> = (0..draws).map(|_| r.next()).collect();
    let mut table = Vec::new();
    for (s, o) in src.iter().zip(&offsets) {
        table.extend_from_slice(&[*s, *o as u32, (*o >> 32) as u32]);
    }
    let rows = tooln1::backend::SampleRows {
        offsets: &offsets,
        src: Some(&src),
        n_rows,
        vocab,
    };
    let d = tooln1::backend::SampleDims {
        draws,
        n_rows,
        vocab,
    };
    for temperature in [0.0f32, 0.7] {
        let p = tooln1::backend::SampleParams {
            temperature,
            top_p: 0.9,
            top_k: 50,
            seed: r.next(),
        };
        let td = c.upload_u32(&table).unwrap();
        let mut a = c.upload_u32(&vec![u32::MAX; draws]).unwrap();
        let mut b = c.upload_u32(&vec![u32::MAX; draws]).unwrap();
        c.sample(&ld, &mut a, &rows, &p).unwrap();
        c.sample_table(&ld, &mut b, &td, d, &p).unwrap();
        let (a, b) = (
            c.download_u32(&a, draws).unwrap(),
            c.download_u32(&b, draws).unwrap(),
        );
        assert_eq!(a, b, "T={temperature}");
        let mut want = vec![u32::MAX; draws];
        let mut got = vec![u32::MAX; draws];
        Cpu.sample(&lg, &mut want, &rows, &p).unwrap();
        Cpu.sample_table(&lg, &mut got, &table, d, &p).unwrap();
        assert_eq!(got, want, "CPU T={temperature}");
    }
    // A row id out of range: the CUDA kernel's flag, the CPU default's check.
    let mut bad = table.clone();
    bad[3 * (draws - 1)] = n_rows as u32;
    let p = tooln1::backend::SampleParams {
        temperature: 1.0,
        top_p: 1.0,
        top_k: 0,
        seed: 1,
    };
    let td = c.upload_u32(&bad).unwrap();
    let mut out = c.upload_u32(&vec![u32::MAX; draws]).unwrap();
    let e = c
        .sample_table(&ld, &mut out, &td, d, &p)
        .and_then(|_| c.download_u32(&out, draws))
        .unwrap_err()
        .to_string();
    assert!(e.contains("sample_table") && e.contains("n_rows"), "{e}");
    let mut out = vec![u32::MAX; draws];
    let e = Cpu
        .sample_table(&lg, &mut out, &bad, d, &p)
        .unwrap_err()
        .to_string();
    assert!(e.contains("n_rows"), "{e}");
    // A table shorter than 3 * draws.
    let short = c.upload_u32(&table[..3 * draws - 1]).unwrap();
    let mut out = c.upload_u32(&vec![u32::MAX; draws]).unwrap();
    let e = c
        .sample_table(&ld, &mut out, &short, d, &p)
        .unwrap_err()
        .to_string();
    assert!(e.contains("table"), "{e}");
}

/// copy_rows on the device: the rows moved, everything else untouched.
#[test]
fn copy_rows_matches_cpu() {
    let Some(c) = gpu() else { return };
    let mut r = Rng::new("copy_rows");
    let (rows, width) = (17, 13);
    let host = bf16_round(&r.vec(rows * width, 2.0));
    for (src, dst, n) in [(0usize, 9usize, 5usize), (11, 2, 6), (3, 4, 1), (5, 5, 0)] {
        let (mut t, _) = up(&c, &host);
        let rc = tooln1::backend::RowCopy { src, dst, n, width };
        c.copy_rows(&mut t, rc).unwrap();
        let mut want = host.clone();
        Cpu.copy_rows(&mut want, rc).unwrap();
        assert_eq!(c.download(&t, rows * width).unwrap(), want, "{rc:?}");
    }
}

#[test]
fn allocator_reuses_blocks() {
    let Some(c) = gpu() else { return };
    if c.pool_is_exact() {
        tooln1_skip!(
            "allocator_reuses_blocks: not applicable with TOOLN1_CUDA_POOL=exact (no caching)"
        );
        return;
    }
    for _ in 0..3 {
        let a = c.zeros_f32(1 << 20).unwrap();
        let b = c.zeros(12345).unwrap();
        drop((a, b));
    }
    let s0 = c.pool_stats();
    for _ in 0..10 {
        let a = c.zeros_f32(1 << 20).unwrap();
        let b = c.zeros(12345).unwrap();
        drop((a, b));
    }
    let s1 = c.pool_stats();
    assert_eq!(
        s0.driver_allocs, s1.driver_allocs,
        "steady state must not call cuMemAlloc"
    );
    let t = c.timer().unwrap();
    t.start().unwrap();
    let ms = t.stop_ms().unwrap();
    assert!(ms >= 0.0);
}

/// The NVRTC fallback (builds without nvcc) must compile every kernel; needs only libnvrtc.
#[test]
fn nvrtc_compiles_every_kernel() {
    match tooln1::backend::cuda::nvrtc_check((9, 0)) {
        Ok(m) => {
            println!("NVRTC compiled {} modules: {m:?}", m.len());
            assert!(m.iter().all(|(_, n)| *n > 0));
        }
        Err(tooln1::Error::NoCuda(e)) => tooln1_skip!("skipped: no NVRTC ({e})"),
        Err(e) => panic!("{e}"),
    }
}

/// With nvcc at build time, the ptxas report shows no register spills in the attention
/// (decode and flash), logprobs and RMSNorm kernels.
#[test]
fn ptxas_report_has_no_spills_in_hot_kernels() {
    let rep = tooln1::backend::cuda::PTXAS_REPORT;
    if rep.is_empty() {
        tooln1_skip!("skipped: built without nvcc (no ptxas report)");
        return;
    }
    let mut seen = 0;
    for line in rep.lines().filter(|l| {
        l.starts_with("| attention")
            || l.starts_with("| flash_attn")
            || l.starts_with("| logprobs")
            || l.starts_with("| rmsnorm")
    }) {
        let cols: Vec<&str> = line.split('|').map(|c| c.trim()).collect();
        assert_eq!(cols[7], "0", "spill stores in {line}");
        assert_eq!(cols[8], "0", "spill loads in {line}");
        seen += 1;
    }
    assert!(
        seen >= 20,
        "expected every attention/flash_attn/logprobs/rmsnorm kernel in the report, saw {seen}"
    );
}

/// docs/ptxas-report.md (which the virtual GPU reads for every kernel's registers and shared
/// memory) is this build's report, as `tools/ptxas-report.sh` copies it there. Checked when the
/// kernels were compiled by the pinned nvcc of tools/setup-cuda.sh, as in CI: another nvcc
/// version allocates registers differently.
#[test]
fn ptxas_report_in_docs_is_this_builds() {
    let rep = tooln1::backend::cuda::PTXAS_REPORT;
    if rep.is_empty() {
        tooln1_skip!("skipped: built without nvcc (no ptxas report)");
        return;
    }
    if !tooln1::backend::cuda::NVCC_PINNED {
        tooln1_skip!("skipped: kernels compiled by an nvcc other than tools/setup-cuda.sh's");
        return;
    }
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/ptxas-report.md");
    let doc = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        doc == rep,
        "{} is not this build's ptxas report: run tools/ptxas-report.sh",
        path.display()
    );
}

/// Linear paths `linear_fwd_bwd` does not take: no bias; linear_bwd accumulating into dx, and
/// with only dw.
#[test]
fn linear_without_bias_and_partial_grads() {
    let Some(c) = gpu() else { return };
    let mut r = Rng::new("linear other paths");
    let (m, n, k) = (29, 45, 67);
    let (x, xh) = up(&c, &r.vec(m * k, 1.0));
    let (w, wh) = up(&c, &r.vec(n * k, 0.2));
    let mut y = poison(&c, m * n);
    c.linear(&x, &w, None, &mut y, GemmDims { m, n, k })
        .unwrap();
    let yr: Vec<f64> = (0..m * n)
        .map(|e| {
            let (i, j) = (e / n, e % n);
            (0..k)
                .map(|q| xh[i * k + q] as f64 * wh[j * k + q] as f64)
                .sum()
        })
        .collect();
    check(
        "linear y (no bias)",
        &c.download(&y, m * n).unwrap(),
        &yr,
        1e-2,
    );

    let (dy, dyh) = up(&c, &r.vec(m * n, 1.0));
    let (mut dx, dx0) = up(&c, &r.vec(m * k, 1.0));
    c.linear_bwd(
        &dy,
        &x,
        &w,
        LinearGrads {
            dx: Some(&mut dx),
            accumulate_dx: true,
            dw: None,
            dbias: None,
        },
        GemmDims { m, n, k },
    )
    .unwrap();
    let dxr: Vec<f64> = (0..m * k)
        .map(|e| {
            let (i, q) = (e / k, e % k);
            dx0[e] as f64
                + (0..n)
                    .map(|j| dyh[i * n + j] as f64 * wh[j * k + q] as f64)
                    .sum::<f64>()
        })
        .collect();
    check(
        "linear dx (accumulated)",
        &c.download(&dx, m * k).unwrap(),
        &dxr,
        1e-2,
    );
    let mut dw = poison_f32(&c, n * k);
    c.fill_f32(&mut dw, n * k, 0.0).unwrap();
    c.linear_bwd(
        &dy,
        &x,
        &w,
        LinearGrads {
            dx: None,
            accumulate_dx: false,
            dw: Some(&mut dw),
            dbias: None,
        },
        GemmDims { m, n, k },
    )
    .unwrap();
    let dwr: Vec<f64> = (0..n * k)
        .map(|e| {
            let (j, q) = (e / k, e % k);
            (0..m)
                .map(|i| dyh[i * n + j] as f64 * xh[i * k + q] as f64)
                .sum()
        })
        .collect();
    check(
        "linear dw only",
        &c.download_f32(&dw, n * k).unwrap(),
        &dwr,
        1e-5,
    );
}

/// rmsnorm_bwd without the weight gradient (dx accumulates onto what it held).
#[test]
fn rmsnorm_bwd_without_dw() {
    let Some(c) = gpu() else { return };
    let mut r = Rng::new("rmsnorm other paths");
    let (rows, dim) = (7, 129);
    let (xr, xrh) = up(&c, &r.vec(rows * dim, 2.0));
    let (wr, wrh) = up(&c, &r.vec(dim, 1.0));
    let mut out = poison(&c, rows * dim);
    let mut rstd = poison_f32(&c, rows);
    c.rmsnorm(&xr, &wr, &mut out, &mut rstd, NormDims { rows, dim }, 1e-6)
        .unwrap();
    let rs = c.download_f32(&rstd, rows).unwrap();
    let (g, gh) = up(&c, &r.vec(rows * dim, 1.0));
    let (mut dxn, dxn0) = up(&c, &r.vec(rows * dim, 1.0));
    c.rmsnorm_bwd(
        &g,
        &xr,
        &wr,
        &rstd,
        NormGrads {
            dx: &mut dxn,
            dw: None,
        },
        NormDims { rows, dim },
    )
    .unwrap();
    let mut want: Vec<f64> = dxn0.iter().map(|&v| v as f64).collect();
    for i in 0..rows {
        let s = rs[i] as f64;
        let dot: f64 = (0..dim)
            .map(|j| gh[i * dim + j] as f64 * wrh[j] as f64 * xrh[i * dim + j] as f64)
            .sum();
        for j in 0..dim {
            want[i * dim + j] += s * wrh[j] as f64 * gh[i * dim + j] as f64
                - xrh[i * dim + j] as f64 * s.powi(3) * dot / dim as f64;
        }
    }
    check(
        "rmsnorm dx without dw",
        &c.download(&dxn, rows * dim).unwrap(),
        &want,
        1e-2,
    );
}

/// AdamW straight on the bf16 parameter (no master copy).
#[test]
fn adamw_without_master_copy() {
    let Some(c) = gpu() else { return };
    let mut r = Rng::new("adamw other paths");
    let na = 1001;
    let (mut p, ph) = up(&c, &r.vec(na, 1.0));
    let gr = r.vec(na, 0.1);
    let gd = c.upload_f32(&gr).unwrap();
    let (mut mm, mut vv) = (c.zeros_f32(na).unwrap(), c.zeros_f32(na).unwrap());
    let hp = AdamWStep {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        step: 1,
        grad_scale: 1.0,
    };
    c.adamw(
        AdamWState {
            param: &mut p,
            master: None,
            m: &mut mm,
            v: &mut vv,
        },
        &gd,
        na,
        &hp,
    )
    .unwrap();
    let pr: Vec<f64> = (0..na)
        .map(|i| {
            let g = gr[i] as f64;
            let (m1, v1) = (0.1 * g, 0.05 * g * g);
            let p0 = ph[i] as f64;
            p0 - 1e-2 * ((m1 / 0.1) / ((v1 / 0.05).sqrt() + 1e-8) + 0.1 * p0)
        })
        .collect();
    check(
        "adamw param without master",
        &c.download(&p, na).unwrap(),
        &pr,
        1e-2,
    );
}

/// Attention over empty sequences, a max_len above the longest sequence, and a sequence of
/// 101 tokens (more than three 32-row key tiles).
#[test]
fn attention_empty_sequences_long_sequence_and_slack_max_len() {
    let Some(c) = gpu() else { return };
    let mut r = Rng::new("attention edges");
    for (d, nh, nkv) in [(64usize, 4usize, 2usize), (128, 3, 1)] {
        let lens = [0u32, 37, 0, 101, 1, 0];
        let tag = format!("d{d} h{nh} kv{nkv} with empty sequences");
        attention_case(&c, &mut r, d, nh, nkv, &lens, 101 + 40, &tag);
    }
    // A batch of only empty sequences is a no-op on both backends.
    let cu = [0u32, 0, 0];
    let cud = c.upload_u32(&cu).unwrap();
    let (q, k, v) = (poison(&c, 1), poison(&c, 1), poison(&c, 1));
    let (mut o, mut l) = (poison(&c, 1), poison_f32(&c, 1));
    c.attention(
        Qkv {
            q: &q,
            k: &k,
            v: &v,
        },
        &mut o,
        &mut l,
        &Packed {
            cu_seqlens: &cud,
            cu_host: &cu,
            max_len: 4,
        },
        Heads {
            n_heads: 2,
            n_kv: 1,
            head_dim: 64,
        },
    )
    .unwrap();
    let (qc, mut oc, mut lc) = (vec![0f32; 1], vec![0f32; 1], vec![0f32; 1]);
    Cpu.attention(
        Qkv {
            q: &qc,
            k: &qc,
            v: &qc,
        },
        &mut oc,
        &mut lc,
        &Packed {
            cu_seqlens: &cu.to_vec(),
            cu_host: &cu,
            max_len: 4,
        },
        Heads {
            n_heads: 2,
            n_kv: 1,
            head_dim: 64,
        },
    )
    .unwrap();
    c.synchronize().unwrap();
}

/// `true` when the CUDA backend rejected a call: at once, or at the next synchronisation (the
/// device-side checks). Leaves the error flag clear.
fn cuda_rejects(c: &Cuda, r: tooln1::Result<()>) -> bool {
    let now = r.is_err();
    let later = c.synchronize().is_err();
    c.synchronize()
        .expect("the error flag must be cleared once reported");
    now || later
}

/// The bad calls of one test, each given to both backends: it must be rejected by both (the
/// CPU at once, CUDA at once or at the next synchronisation for what only the device sees).
/// The count is printed when the test ends.
struct BadCalls {
    what: &'static str,
    cases: usize,
}

/// The CUDA backend (None: skipped), the CPU backend, the random stream and the bad-call
/// counter of a test of bad `what` calls.
fn bad_calls(what: &'static str) -> Option<(Cuda, Cpu, Rng, BadCalls)> {
    let c = gpu()?;
    let calls = BadCalls { what, cases: 0 };
    Some((c, Cpu, Rng::new("bad calls"), calls))
}

impl Drop for BadCalls {
    fn drop(&mut self) {
        println!(
            "{} bad calls ({}) rejected by both backends",
            self.cases, self.what
        );
    }
}

impl BadCalls {
    fn both(&mut self, what: &str, cpu_r: tooln1::Result<()>, cuda_r: bool) {
        println!(
            "{what}: cpu {:?}, cuda rejects {cuda_r}",
            cpu_r.as_ref().err()
        );
        assert!(cpu_r.is_err(), "{what}: the CPU backend accepted it");
        assert!(cuda_r, "{what}: the CUDA backend accepted it");
        self.cases += 1;
    }
}

/// Bad attention offsets: each call rejected by both backends (see [`BadCalls`]), the good neighbours
/// of the bad values accepted by both.
#[test]
fn both_backends_reject_bad_attention_offsets() {
    let Some((c, cpu, mut r, mut calls)) = bad_calls("attention offsets") else {
        return;
    };

    // Attention offsets.
    let (nh, nkv, d) = (2usize, 1usize, 64usize);
    let n = 12;
    let q = r.vec(n * nh * d, 1.0);
    let kv = r.vec(n * nkv * d, 1.0);
    let (qg, kg) = (c.upload(&q).unwrap(), c.upload(&kv).unwrap());
    let mut og = poison(&c, n * nh * d);
    let mut lg = poison_f32(&c, n * nh);
    let mut oc = vec![0f32; n * nh * d];
    let mut lc = vec![0f32; n * nh];
    for (what, cu_host, cu_dev, max_len, heads) in [
        (
            "cu_host not starting at 0",
            vec![1u32, 5, 12],
            vec![1u32, 5, 12],
            12,
            nh,
        ),
        ("cu_host decreasing", vec![0, 7, 5], vec![0, 7, 5], 12, nh),
        (
            "a sequence longer than max_len",
            vec![0, 9, 12],
            vec![0, 9, 12],
            8,
            nh,
        ),
        (
            "n_heads not a multiple of n_kv",
            vec![0, 5, 12],
            vec![0, 5, 12],
            12,
            0,
        ),
        ("no offsets at all", vec![], vec![0], 12, nh),
    ] {
        let cud = c.upload_u32(&cu_dev).unwrap();
        let cr = cpu.attention(
            Qkv {
                q: &q,
                k: &kv,
                v: &kv,
            },
            &mut oc,
            &mut lc,
            &Packed {
                cu_seqlens: &cu_dev,
                cu_host: &cu_host,
                max_len,
            },
            Heads {
                n_heads: heads,
                n_kv: nkv,
                head_dim: d,
            },
        );
        let gr = c.attention(
            Qkv {
                q: &qg,
                k: &kg,
                v: &kg,
            },
            &mut og,
            &mut lg,
            &Packed {
                cu_seqlens: &cud,
                cu_host: &cu_host,
                max_len,
            },
            Heads {
                n_heads: heads,
                n_kv: nkv,
                head_dim: d,
            },
        );
        calls.both(&format!("attention: {what}"), cr, cuda_rejects(&c, gr));
    }
    if c.syncs_each_op() {
        let (host, dev) = (vec![0u32, 5, 12], vec![0u32, 6, 12]);
        let cud = c.upload_u32(&dev).unwrap();
        let cr = cpu.attention(
            Qkv {
                q: &q,
                k: &kv,
                v: &kv,
            },
            &mut oc,
            &mut lc,
            &Packed {
                cu_seqlens: &dev,
                cu_host: &host,
                max_len: 12,
            },
            Heads {
                n_heads: nh,
                n_kv: nkv,
                head_dim: d,
            },
        );
        let gr = c.attention(
            Qkv {
                q: &qg,
                k: &kg,
                v: &kg,
            },
            &mut og,
            &mut lg,
            &Packed {
                cu_seqlens: &cud,
                cu_host: &host,
                max_len: 12,
            },
            Heads {
                n_heads: nh,
                n_kv: nkv,
                head_dim: d,
            },
        );
        calls.both(
            "attention: device cu_seqlens differ from cu_host",
            cr,
            cuda_rejects(&c, gr),
        );
    } else {
        println!(
            "(device cu_seqlens are compared only with TOOLN1_CUDA_SYNC=1 or in debug builds)"
        );
    }
}

/// Bad decode lengths: each call rejected by both backends (see [`BadCalls`]), the good neighbours
/// of the bad values accepted by both.
#[test]
fn both_backends_reject_bad_decode_lengths() {
    let Some((c, cpu, mut r, mut calls)) = bad_calls("decode lengths") else {
        return;
    };

    // Decode lengths: 0 and above max_len.
    let (nh, nkv, d) = (2usize, 1usize, 64usize);
    let (n_seq, max_len) = (2usize, 5usize);
    let cache = r.vec(n_seq * max_len * nkv * d, 1.0);
    let qd = r.vec(n_seq * nh * d, 1.0);
    let (cg, qdg) = (c.upload(&cache).unwrap(), c.upload(&qd).unwrap());
    let mut odg = poison(&c, n_seq * nh * d);
    let mut odc = vec![0f32; n_seq * nh * d];
    let ident: Vec<u32> = (0..n_seq as u32).collect();
    let identd = c.upload_u32(&ident).unwrap();
    for lens in [[3u32, 0], [6, 2]] {
        let lg_ = c.upload_u32(&lens).unwrap();
        let cr = cpu.attention_decode(
            &qd,
            &cache,
            &cache,
            &Cached {
                lens: &lens.to_vec(),
                table: &ident,
                n_seq,
                max_blocks: 1,
                block_size: max_len,
            },
            &mut odc,
            Heads {
                n_heads: nh,
                n_kv: nkv,
                head_dim: d,
            },
        );
        let gr = c.attention_decode(
            &qdg,
            &cg,
            &cg,
            &Cached {
                lens: &lg_,
                table: &identd,
                n_seq,
                max_blocks: 1,
                block_size: max_len,
            },
            &mut odg,
            Heads {
                n_heads: nh,
                n_kv: nkv,
                head_dim: d,
            },
        );
        let rej = cuda_rejects(&c, gr);
        // The rejected slot's row is NaN, never a plausible output.
        let bad = if lens[0] == 0 || lens[0] as usize > max_len {
            0
        } else {
            1
        };
        let row = c.download(&odg, n_seq * nh * d).unwrap();
        assert!(row[bad * nh * d..(bad + 1) * nh * d]
            .iter()
            .all(|x| x.is_nan()));
        calls.both(&format!("attention_decode: lens {lens:?}"), cr, rej);
    }
    // A block id outside the cache's 2 blocks in a row the sequence reads.
    let lens = [2u32, 5];
    let bad_table = [0u32, 7];
    let cr = cpu.attention_decode(
        &qd,
        &cache,
        &cache,
        &Cached {
            lens: &lens.to_vec(),
            table: &bad_table.to_vec(),
            n_seq,
            max_blocks: 1,
            block_size: max_len,
        },
        &mut odc,
        Heads {
            n_heads: nh,
            n_kv: nkv,
            head_dim: d,
        },
    );
    let gr = c.attention_decode(
        &qdg,
        &cg,
        &cg,
        &Cached {
            lens: &c.upload_u32(&lens).unwrap(),
            table: &c.upload_u32(&bad_table).unwrap(),
            n_seq,
            max_blocks: 1,
            block_size: max_len,
        },
        &mut odg,
        Heads {
            n_heads: nh,
            n_kv: nkv,
            head_dim: d,
        },
    );
    let rej = cuda_rejects(&c, gr);
    let row = c.download(&odg, n_seq * nh * d).unwrap();
    assert!(row[nh * d..].iter().all(|x| x.is_nan()));
    calls.both("attention_decode: table block 7 of 2", cr, rej);
    let ok = [1u32, 5];
    let okd = c.upload_u32(&ok).unwrap();
    cpu.attention_decode(
        &qd,
        &cache,
        &cache,
        &Cached {
            lens: &ok.to_vec(),
            table: &ident,
            n_seq,
            max_blocks: 1,
            block_size: max_len,
        },
        &mut odc,
        Heads {
            n_heads: nh,
            n_kv: nkv,
            head_dim: d,
        },
    )
    .unwrap();
    c.attention_decode(
        &qdg,
        &cg,
        &cg,
        &Cached {
            lens: &okd,
            table: &identd,
            n_seq,
            max_blocks: 1,
            block_size: max_len,
        },
        &mut odg,
        Heads {
            n_heads: nh,
            n_kv: nkv,
            head_dim: d,
        },
    )
    .unwrap();
    c.synchronize().unwrap();
}

/// Bad kv_store rows and caches: each call rejected by both backends (see [`BadCalls`]), the good neighbours
/// of the bad values accepted by both.
#[test]
fn both_backends_reject_bad_kv_store() {
    let Some((c, cpu, mut r, mut calls)) = bad_calls("kv_store rows and caches") else {
        return;
    };

    // kv_store: a destination row outside the cache; caches of different sizes.
    let (nkv, d, n) = (1usize, 64usize, 12);
    let kv = r.vec(n * nkv * d, 1.0);
    let kg = c.upload(&kv).unwrap();
    let kvd = nkv * d;
    let (mut kc, mut vc) = (vec![0f32; 4 * kvd], vec![0f32; 4 * kvd]);
    let (mut kcg, mut vcg) = (poison(&c, 4 * kvd), poison(&c, 4 * kvd));
    let dst = vec![1u32, 4];
    let dstg = c.upload_u32(&dst).unwrap();
    let cr = cpu.kv_store(
        &kv,
        &kv,
        &dst,
        &mut kc,
        &mut vc,
        KvRows {
            n_tok: 2,
            kv_dim: kvd,
        },
    );
    let gr = c.kv_store(
        &kg,
        &kg,
        &dstg,
        &mut kcg,
        &mut vcg,
        KvRows {
            n_tok: 2,
            kv_dim: kvd,
        },
    );
    calls.both("kv_store: dst row 4 of 4", cr, cuda_rejects(&c, gr));
    let mut vshort = vec![0f32; 3 * kvd];
    let mut vshortg = poison(&c, 3 * kvd);
    let ok_dst = vec![0u32, 1];
    let ok_dstg = c.upload_u32(&ok_dst).unwrap();
    let cr = cpu.kv_store(
        &kv,
        &kv,
        &ok_dst,
        &mut kc,
        &mut vshort,
        KvRows {
            n_tok: 2,
            kv_dim: kvd,
        },
    );
    let gr = c.kv_store(
        &kg,
        &kg,
        &ok_dstg,
        &mut kcg,
        &mut vshortg,
        KvRows {
            n_tok: 2,
            kv_dim: kvd,
        },
    );
    calls.both(
        "kv_store: caches of different sizes",
        cr,
        cuda_rejects(&c, gr),
    );
}

/// Bad targets and ids out of range: each call rejected by both backends (see [`BadCalls`]), the good neighbours
/// of the bad values accepted by both.
#[test]
fn both_backends_reject_bad_targets_and_ids() {
    let Some((c, cpu, mut r, mut calls)) = bad_calls("targets and ids out of range") else {
        return;
    };

    // Targets and ids out of range.
    let (vocab, dim) = (37usize, 16usize);
    let h = r.vec(2 * dim, 1.0);
    let w = r.vec(vocab * dim, 1.0);
    let (hg, wg) = (c.upload(&h).unwrap(), c.upload(&w).unwrap());
    let tg = vec![3u32, vocab as u32];
    let tgg = c.upload_u32(&tg).unwrap();
    let (mut lp, mut ls) = (vec![0f32; 2], vec![0f32; 2]);
    let (mut lpg, mut lsg) = (poison_f32(&c, 2), poison_f32(&c, 2));
    let cr = cpu.logprobs(
        LmHead {
            h: &h,
            w: &w,
            targets: &tg,
        },
        LogprobsOut {
            logp: &mut lp,
            lse: &mut ls,
            entropy: None,
        },
        VocabDims {
            n_tok: 2,
            dim,
            vocab,
        },
        1.0,
    );
    let gr = c.logprobs(
        LmHead {
            h: &hg,
            w: &wg,
            targets: &tgg,
        },
        LogprobsOut {
            logp: &mut lpg,
            lse: &mut lsg,
            entropy: None,
        },
        VocabDims {
            n_tok: 2,
            dim,
            vocab,
        },
        1.0,
    );
    calls.both("logprobs: target == vocab", cr, cuda_rejects(&c, gr));
    let mut e = vec![0f32; 2 * dim];
    let mut eg = poison(&c, 2 * dim);
    let cr = cpu.embedding(&tg, &w, &mut e, 2, dim);
    let gr = c.embedding(&tgg, &wg, &mut eg, 2, dim);
    calls.both("embedding: id == vocab", cr, cuda_rejects(&c, gr));
}

/// Bad sampling settings and logits: each call rejected by both backends (see [`BadCalls`]), the good neighbours
/// of the bad values accepted by both.
#[test]
fn both_backends_reject_bad_sampling() {
    let Some((c, cpu, mut r, mut calls)) = bad_calls("sampling settings and logits") else {
        return;
    };

    // Sampling: bad settings and bad logits.
    let sv = 301;
    let good = r.vec(2 * sv, 3.0);
    let mut outc = vec![0u32; 2];
    let mut outg = c.upload_u32(&[0, 0]).unwrap();
    for (what, temp, top_p) in [
        ("top_p 1.5", 1.0f32, 1.5f32),
        ("top_p NaN", 1.0, f32::NAN),
        ("temperature -1", -1.0, 1.0),
        ("temperature inf", f32::INFINITY, 1.0),
    ] {
        let gd = c.upload_f32(&good).unwrap();
        let cr = common::sample_at(&cpu, &good, &mut outc, 2, sv, temp, top_p, 0, 1, 0);
        let gr = common::sample_at(&c, &gd, &mut outg, 2, sv, temp, top_p, 0, 1, 0);
        calls.both(&format!("sample: {what}"), cr, cuda_rejects(&c, gr));
    }
    for (what, val, temp) in [
        ("a NaN logit (greedy)", f32::NAN, 0.0f32),
        ("a NaN logit", f32::NAN, 1.0),
        ("a +inf logit", f32::INFINITY, 0.8),
    ] {
        let mut bad = good.clone();
        bad[sv + 17] = val;
        let gd = c.upload_f32(&bad).unwrap();
        let cr = common::sample_at(&cpu, &bad, &mut outc, 2, sv, temp, 1.0, 0, 1, 0);
        let gr = common::sample_at(&c, &gd, &mut outg, 2, sv, temp, 1.0, 0, 1, 0);
        calls.both(&format!("sample: {what}"), cr, cuda_rejects(&c, gr));
    }
    let mut ninf = good.clone();
    ninf[sv..].fill(f32::NEG_INFINITY);
    let gd = c.upload_f32(&ninf).unwrap();
    let cr = common::sample_at(&cpu, &ninf, &mut outc, 2, sv, 1.0, 1.0, 0, 1, 0);
    let gr = common::sample_at(&c, &gd, &mut outg, 2, sv, 1.0, 1.0, 0, 1, 0);
    calls.both(
        "sample: a row all -inf at temperature 1",
        cr,
        cuda_rejects(&c, gr),
    );
    // ... which greedy decoding accepts on both (token 0), as it accepts -inf entries.
    common::sample_at(&cpu, &ninf, &mut outc, 2, sv, 0.0, 1.0, 0, 1, 0).unwrap();
    common::sample_at(&c, &gd, &mut outg, 2, sv, 0.0, 1.0, 0, 1, 0).unwrap();
    assert_eq!(c.download_u32(&outg, 2).unwrap(), outc);
    assert_eq!(outc[1], 0);
    // top_p = 0 keeps the single most likely token on both.
    let gd = c.upload_f32(&good).unwrap();
    common::sample_at(&cpu, &good, &mut outc, 2, sv, 1.0, 0.0, 0, 1, 0).unwrap();
    common::sample_at(&c, &gd, &mut outg, 2, sv, 1.0, 0.0, 0, 1, 0).unwrap();
    assert_eq!(c.download_u32(&outg, 2).unwrap(), outc, "top_p = 0");
}

/// Bad GRPO loss settings and data: each call rejected by both backends (see [`BadCalls`]), the good neighbours
/// of the bad values accepted by both.
#[test]
fn both_backends_reject_bad_grpo_loss() {
    let Some((c, cpu, _, mut calls)) = bad_calls("GRPO loss settings and data") else {
        return;
    };

    // GRPO loss settings, also with no tokens at all; a seq_id out of range; a negative mask.
    let base = GrpoLossCfg {
        clip_low: 0.2,
        clip_high: 0.2,
        kl_coef: 0.0,
        kl_kind: KlKind::K3,
        agg: LossAgg::TokenMean,
        norm_len: 1.0,
        loss_scale_div: 1.0,
    };
    let z = vec![0f32; 3];
    let zg = c.upload_f32(&z).unwrap();
    let sid = vec![0u32, 0, 1];
    let sidg = c.upload_u32(&sid).unwrap();
    let mut dl = vec![0f32; 3];
    let mut dlg = poison_f32(&c, 3);
    for (what, cfg, n_tok, n_seq, mask) in [
        (
            "loss_scale_div 0",
            GrpoLossCfg {
                loss_scale_div: 0.0,
                ..base
            },
            3usize,
            2usize,
            vec![1f32; 3],
        ),
        (
            "loss_scale_div 0 with no tokens",
            GrpoLossCfg {
                loss_scale_div: 0.0,
                ..base
            },
            0,
            2,
            vec![1f32; 3],
        ),
        (
            "norm_len 0 for seq-mean-token-sum-norm",
            GrpoLossCfg {
                agg: LossAgg::SeqMeanTokenSumNorm,
                norm_len: 0.0,
                ..base
            },
            3,
            2,
            vec![1f32; 3],
        ),
        ("seq_id 1 with one sequence", base, 3, 1, vec![1f32; 3]),
        ("a negative mask", base, 3, 2, vec![1.0, -1.0, 1.0]),
    ] {
        let mg = c.upload_f32(&mask).unwrap();
        let cr = cpu
            .grpo_loss(
                &GrpoTokens {
                    logp: &z,
                    old_logp: &z,
                    ref_logp: &z,
                    adv: &z,
                    mask: &mask,
                    seq_id: &sid,
                    n_tok,
                    n_seq,
                },
                &mut dl,
                &cfg,
            )
            .map(|_| ());
        let gr = c
            .grpo_loss(
                &GrpoTokens {
                    logp: &zg,
                    old_logp: &zg,
                    ref_logp: &zg,
                    adv: &zg,
                    mask: &mg,
                    seq_id: &sidg,
                    n_tok,
                    n_seq,
                },
                &mut dlg,
                &cfg,
            )
            .map(|_| ());
        calls.both(&format!("grpo_loss: {what}"), cr, cuda_rejects(&c, gr));
    }
}

/// Bad RoPE settings: each call rejected by both backends (see [`BadCalls`]), the good neighbours
/// of the bad values accepted by both.
#[test]
fn both_backends_reject_bad_rope() {
    let Some((c, cpu, mut r, mut calls)) = bad_calls("RoPE settings") else {
        return;
    };

    // RoPE, RMSNorm, AdamW settings.
    let pos = vec![0u32, 1];
    let posg = c.upload_u32(&pos).unwrap();
    let mut xr = r.vec(2 * 64, 1.0);
    let mut xg = c.upload(&xr).unwrap();
    for (what, hd, theta) in [("theta 0", 64usize, 0.0f32), ("head_dim 0", 0, 1e4)] {
        let cr = cpu.rope(&mut xr, &pos, 2, 1, hd, theta);
        let gr = c.rope(&mut xg, &posg, 2, 1, hd, theta);
        calls.both(&format!("rope: {what}"), cr, cuda_rejects(&c, gr));
    }
}

/// Bad RMSNorm sizes: each call rejected by both backends (see [`BadCalls`]), the good neighbours
/// of the bad values accepted by both.
#[test]
fn both_backends_reject_bad_rmsnorm() {
    let Some((c, cpu, mut r, mut calls)) = bad_calls("RMSNorm sizes") else {
        return;
    };

    // RMSNorm: dim 0.
    let xr = r.vec(2 * 64, 1.0);
    let xg = c.upload(&xr).unwrap();
    let mut rs = vec![0f32; 2];
    let mut rsg = poison_f32(&c, 2);
    let mut oo = vec![0f32; 2];
    let mut oog = poison(&c, 2);
    let cr = cpu.rmsnorm(
        &xr,
        &xr,
        &mut oo,
        &mut rs,
        NormDims { rows: 2, dim: 0 },
        1e-6,
    );
    let gr = c.rmsnorm(
        &xg,
        &xg,
        &mut oog,
        &mut rsg,
        NormDims { rows: 2, dim: 0 },
        1e-6,
    );
    calls.both("rmsnorm: dim 0", cr, cuda_rejects(&c, gr));
}

/// Bad the AdamW step: each call rejected by both backends (see [`BadCalls`]), the good neighbours
/// of the bad values accepted by both.
#[test]
fn both_backends_reject_bad_adamw() {
    let Some((c, cpu, _, mut calls)) = bad_calls("the AdamW step") else {
        return;
    };

    // AdamW: step 0.
    let hp = AdamWStep {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
        step: 0,
        grad_scale: 1.0,
    };
    let mut pc = vec![0f32; 2];
    let (mut m1, mut v1) = (vec![0f32; 2], vec![0f32; 2]);
    let (mut pg, mut m1g, mut v1g) = (
        c.zeros(2).unwrap(),
        c.zeros_f32(2).unwrap(),
        c.zeros_f32(2).unwrap(),
    );
    let gz = c.zeros_f32(2).unwrap();
    let cr = cpu.adamw(
        AdamWState {
            param: &mut pc,
            master: None,
            m: &mut m1,
            v: &mut v1,
        },
        &vec![0f32; 2],
        2,
        &hp,
    );
    let gr = c.adamw(
        AdamWState {
            param: &mut pg,
            master: None,
            m: &mut m1g,
            v: &mut v1g,
        },
        &gz,
        2,
        &hp,
    );
    calls.both("adamw: step 0", cr, cuda_rejects(&c, gr));
}

/// The shared list of contract violations (tests/common/contract.rs): the CUDA backend rejects
/// each at once with the very error the CPU backend gives (op, argument, expected, got), and
/// leaves no device error behind.
#[test]
fn both_backends_give_the_same_contract_errors() {
    let Some(c) = gpu() else { return };
    let cpu = common::contract::bad_calls(&Cpu);
    let cuda = common::contract::bad_calls(&c);
    assert_eq!(cpu.len(), cuda.len());
    for ((what, rc), (_, rg)) in cpu.iter().zip(&cuda) {
        let want = common::contract::fields(what, rc);
        let got = common::contract::fields(what, rg);
        assert_eq!(got, want, "{what}");
    }
    c.synchronize()
        .expect("a rejected call must leave no device error");
    println!(
        "{} contract violations rejected alike by both backends",
        cpu.len()
    );
}

/// f64 reference of the fused logprobs: (logp, lse, entropy) per token, and softmax rows.
#[allow(clippy::type_complexity)]
fn logprobs_ref(
    hh: &[f32],
    wh: &[f32],
    tg: &[u32],
    dim: usize,
    vocab: usize,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let n_tok = tg.len();
    let (mut lp, mut ls, mut en) = (vec![0f64; n_tok], vec![0f64; n_tok], vec![0f64; n_tok]);
    for t in 0..n_tok {
        let lg: Vec<f64> = (0..vocab)
            .map(|v| {
                (0..dim)
                    .map(|x| hh[t * dim + x] as f64 * wh[v * dim + x] as f64)
                    .sum()
            })
            .collect();
        let m = lg.iter().cloned().fold(f64::MIN, f64::max);
        let l = m + lg.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
        ls[t] = l;
        lp[t] = lg[tg[t] as usize] - l;
        en[t] = -lg.iter().map(|x| (x - l).exp() * (x - l)).sum::<f64>();
    }
    (lp, ls, en)
}

/// More than 1024 tokens with the default chunks (1024 tokens x 32768 vocabulary entries), so
/// the token loop runs twice with a ragged last chunk.
#[test]
fn logprobs_over_1024_tokens_default_chunks() {
    let Some(c) = gpu() else { return };
    let mut r = Rng::new("logprobs 1100 tokens");
    let (n_tok, dim, vocab) = (1100, 24, 257);
    let (h, hh) = up(&c, &r.vec(n_tok * dim, 1.0));
    let (w, wh) = up(&c, &r.vec(vocab * dim, 0.5));
    let tg: Vec<u32> = (0..n_tok).map(|_| r.below(vocab) as u32).collect();
    let tgd = c.upload_u32(&tg).unwrap();
    let (mut lp, mut lse, mut ent) = (
        poison_f32(&c, n_tok),
        poison_f32(&c, n_tok),
        poison_f32(&c, n_tok),
    );
    c.logprobs(
        LmHead {
            h: &h,
            w: &w,
            targets: &tgd,
        },
        LogprobsOut {
            logp: &mut lp,
            lse: &mut lse,
            entropy: Some(&mut ent),
        },
        VocabDims { n_tok, dim, vocab },
        1.0,
    )
    .unwrap();
    let (lpr, lsr, enr) = logprobs_ref(&hh, &wh, &tg, dim, vocab);
    check(
        "logp (1100 tokens)",
        &c.download_f32(&lp, n_tok).unwrap(),
        &lpr,
        1e-4,
    );
    check(
        "lse (1100 tokens)",
        &c.download_f32(&lse, n_tok).unwrap(),
        &lsr,
        1e-5,
    );
    check(
        "entropy (1100 tokens)",
        &c.download_f32(&ent, n_tok).unwrap(),
        &enr,
        1e-4,
    );
    // The backward through the same two token chunks: dh rows of the second chunk.
    let dl = r.vec(n_tok, 1.0);
    let dld = c.upload_f32(&dl).unwrap();
    let mut dh = poison(&c, n_tok * dim);
    c.logprobs_bwd(
        &dld,
        LmHead {
            h: &h,
            w: &w,
            targets: &tgd,
        },
        &lse,
        LogprobsGrads {
            dh: &mut dh,
            dw: None,
        },
        VocabDims { n_tok, dim, vocab },
        1.0,
    )
    .unwrap();
    let mut dhr = vec![0f64; n_tok * dim];
    for t in 0..n_tok {
        for v in 0..vocab {
            let z: f64 = (0..dim)
                .map(|x| hh[t * dim + x] as f64 * wh[v * dim + x] as f64)
                .sum();
            let g = dl[t] as f64 * ((v == tg[t] as usize) as u8 as f64 - (z - lsr[t]).exp());
            for x in 0..dim {
                dhr[t * dim + x] += g * wh[v * dim + x] as f64;
            }
        }
    }
    check(
        "logprobs dh (1100 tokens)",
        &c.download(&dh, n_tok * dim).unwrap(),
        &dhr,
        1e-2,
    );
}

/// At temperature 0.7 (inv_t = 1/0.7, scaled inside the fused kernels): logprobs, lse, entropy
/// and the backward (dh, dw) against the CPU backend on the same bf16-rounded inputs, through
/// several token and vocabulary chunks; an inverse temperature that is not finite and > 0 is
/// refused.
#[test]
fn logprobs_temperature_matches_cpu() {
    let Some(mut c) = gpu() else { return };
    let cpu = Cpu;
    let mut r = Rng::new("logprobs temperature");
    let (n_tok, dim, vocab) = (19, 40, 777);
    let inv_t = 1.0f32 / 0.7;
    c.set_logprob_chunks(7, 300);
    let (h, hh) = up(&c, &r.vec(n_tok * dim, 1.0));
    let (w, wh) = up(&c, &r.vec(vocab * dim, 0.5));
    let tg: Vec<u32> = (0..n_tok).map(|_| r.below(vocab) as u32).collect();
    let tgd = c.upload_u32(&tg).unwrap();
    let f64s = |v: &[f32]| -> Vec<f64> { v.iter().map(|&x| x as f64).collect() };
    // CPU reference at inv_t, and at 1 to show the temperature matters at these inputs.
    let cpu_fwd = |it: f32| {
        let (mut lp, mut ls, mut en) = (vec![0f32; n_tok], vec![0f32; n_tok], vec![0f32; n_tok]);
        cpu.logprobs(
            LmHead {
                h: &hh,
                w: &wh,
                targets: &tg,
            },
            LogprobsOut {
                logp: &mut lp,
                lse: &mut ls,
                entropy: Some(&mut en),
            },
            VocabDims { n_tok, dim, vocab },
            it,
        )
        .unwrap();
        (lp, ls, en)
    };
    let (lpc, lsc, enc) = cpu_fwd(inv_t);
    let (lp1, _, _) = cpu_fwd(1.0);
    assert!(
        common::rel(&lp1, &f64s(&lpc)) > 1e-2,
        "T = 0.7 and T = 1 agree"
    );
    let (mut lp, mut lse, mut ent) = (
        poison_f32(&c, n_tok),
        poison_f32(&c, n_tok),
        poison_f32(&c, n_tok),
    );
    c.logprobs(
        LmHead {
            h: &h,
            w: &w,
            targets: &tgd,
        },
        LogprobsOut {
            logp: &mut lp,
            lse: &mut lse,
            entropy: Some(&mut ent),
        },
        VocabDims { n_tok, dim, vocab },
        inv_t,
    )
    .unwrap();
    let lse_g = c.download_f32(&lse, n_tok).unwrap();
    check(
        "logp (T = 0.7)",
        &c.download_f32(&lp, n_tok).unwrap(),
        &f64s(&lpc),
        1e-4,
    );
    check("lse (T = 0.7)", &lse_g, &f64s(&lsc), 1e-5);
    check(
        "entropy (T = 0.7)",
        &c.download_f32(&ent, n_tok).unwrap(),
        &f64s(&enc),
        1e-4,
    );
    let dl = r.vec(n_tok, 1.0);
    let (mut dhc, mut dwc) = (vec![0f32; n_tok * dim], vec![0f32; vocab * dim]);
    cpu.logprobs_bwd(
        &dl,
        LmHead {
            h: &hh,
            w: &wh,
            targets: &tg,
        },
        &lsc,
        LogprobsGrads {
            dh: &mut dhc,
            dw: Some(&mut dwc),
        },
        VocabDims { n_tok, dim, vocab },
        inv_t,
    )
    .unwrap();
    let dld = c.upload_f32(&dl).unwrap();
    let mut dh = poison(&c, n_tok * dim);
    let mut dw = c.zeros_f32(vocab * dim).unwrap();
    c.logprobs_bwd(
        &dld,
        LmHead {
            h: &h,
            w: &w,
            targets: &tgd,
        },
        &lse,
        LogprobsGrads {
            dh: &mut dh,
            dw: Some(&mut dw),
        },
        VocabDims { n_tok, dim, vocab },
        inv_t,
    )
    .unwrap();
    check(
        "logprobs dh (T = 0.7)",
        &c.download(&dh, n_tok * dim).unwrap(),
        &f64s(&dhc),
        1e-2,
    );
    check(
        "logprobs dw (T = 0.7)",
        &c.download_f32(&dw, vocab * dim).unwrap(),
        &f64s(&dwc),
        1e-2,
    );
    for bad in [0.0, -0.5, f32::NAN, f32::INFINITY] {
        let e = c
            .logprobs(
                LmHead {
                    h: &h,
                    w: &w,
                    targets: &tgd,
                },
                LogprobsOut {
                    logp: &mut lp,
                    lse: &mut lse,
                    entropy: None,
                },
                VocabDims { n_tok, dim, vocab },
                bad,
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("inv_t"), "{e}");
        let e = c
            .logprobs_bwd(
                &dld,
                LmHead {
                    h: &h,
                    w: &w,
                    targets: &tgd,
                },
                &lse,
                LogprobsGrads {
                    dh: &mut dh,
                    dw: None,
                },
                VocabDims { n_tok, dim, vocab },
                bad,
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("inv_t"), "{e}");
    }
}

/// The full Qwen2.5 vocabulary (151,936) with few tokens: logprobs with the default chunks
/// (five vocabulary chunks, the last one ragged) and sampling, which must also be the same from
/// run to run.
#[test]
fn full_vocabulary_logprobs_and_sampling() {
    let Some(c) = gpu() else { return };
    let mut r = Rng::new("full vocabulary");
    let (n_tok, dim, vocab) = (3, 16, 151_936);
    let (h, hh) = up(&c, &r.vec(n_tok * dim, 1.0));
    let (w, wh) = up(&c, &r.vec(vocab * dim, 1.0));
    let tg: Vec<u32> = vec![0, vocab as u32 - 1, r.below(vocab) as u32];
    let tgd = c.upload_u32(&tg).unwrap();
    let (mut lp, mut lse) = (poison_f32(&c, n_tok), poison_f32(&c, n_tok));
    c.logprobs(
        LmHead {
            h: &h,
            w: &w,
            targets: &tgd,
        },
        LogprobsOut {
            logp: &mut lp,
            lse: &mut lse,
            entropy: None,
        },
        VocabDims { n_tok, dim, vocab },
        1.0,
    )
    .unwrap();
    let (lpr, lsr, _) = logprobs_ref(&hh, &wh, &tg, dim, vocab);
    check(
        "logp (full vocabulary)",
        &c.download_f32(&lp, n_tok).unwrap(),
        &lpr,
        1e-4,
    );
    check(
        "lse (full vocabulary)",
        &c.download_f32(&lse, n_tok).unwrap(),
        &lsr,
        1e-5,
    );

    let rows = 4;
    let mut lg = r.vec(rows * vocab, 6.0);
    lg[vocab + 151_000] = 20.0; // a clear winner near the end of the vocabulary
    lg[2 * vocab + 5] = 14.0; // two tied leaders: the lower index comes first
    lg[2 * vocab + 150_000] = 14.0;
    let ld = c.upload_f32(&lg).unwrap();
    let cpu = Cpu;
    let seed = r.next();
    for (temp, top_p, top_k) in [
        (0.0f32, 1.0f32, 0usize),
        (1.0, 1.0, 0),
        (0.8, 0.9, 40),
        (1.0, 0.0, 0),
    ] {
        let mut want = vec![u32::MAX; rows];
        common::sample_at(
            &cpu, &lg, &mut want, rows, vocab, temp, top_p, top_k, seed, 7,
        )
        .unwrap();
        let mut first = None;
        for run in 0..2 {
            let mut out = c.upload_u32(&vec![u32::MAX; rows]).unwrap();
            common::sample_at(&c, &ld, &mut out, rows, vocab, temp, top_p, top_k, seed, 7).unwrap();
            let got = c.download_u32(&out, rows).unwrap();
            println!(
                "full vocabulary T={temp} p={top_p} k={top_k} run {run}: cuda {got:?} cpu {want:?}"
            );
            assert!(got.iter().all(|&t| (t as usize) < vocab));
            if let Some(f) = &first {
                assert_eq!(&got, f, "sampling differs between two identical runs");
            }
            first = Some(got.clone());
            let agree = got.iter().zip(&want).filter(|(a, b)| a == b).count();
            assert!(
                agree + 1 >= rows,
                "T={temp} p={top_p} k={top_k}: {got:?} vs {want:?}"
            );
            if temp == 0.0 || top_p == 0.0 {
                assert_eq!(got, want, "greedy and top_p = 0 must match exactly");
                assert_eq!(got[1], 151_000);
                assert_eq!(got[2], 5);
            }
        }
    }
}

/// RoPE at positions near 32767 against the CPU backend on the same bf16 inputs. Both rotate
/// by bit-identical f32 angles (the same inverse-frequency table), so the CUDA result is the
/// CPU result rounded to bf16 except where sin/cos or FMA contraction differences (about 1e-7
/// relative) straddle a bf16 rounding boundary: a fraction of about 1e-4. Frequencies computed
/// differently in the last bit move the angle by up to ~4e-3 rad at these positions and flip
/// the rounding of roughly 1% of the elements.
#[test]
fn rope_at_positions_near_32k_matches_cpu() {
    let Some(c) = gpu() else { return };
    let cpu = Cpu;
    let mut r = Rng::new("rope 32k");
    for (hd, theta) in [(128usize, 1e6f32), (64, 1e4)] {
        let (n_tok, nh) = (61, 3);
        let mut pos: Vec<u32> = (0..n_tok).map(|_| 32767 - r.below(3000) as u32).collect();
        pos[0] = 32767;
        pos[1] = 32766;
        let pd = c.upload_u32(&pos).unwrap();
        let (mut x, xh) = up(&c, &r.vec(n_tok * nh * hd, 1.0));
        let mut xc = xh.clone();
        c.rope(&mut x, &pd, n_tok, nh, hd, theta).unwrap();
        cpu.rope(&mut xc, &pos, n_tok, nh, hd, theta).unwrap();
        let got = c.download(&x, xh.len()).unwrap();
        let want: Vec<f64> = xc.iter().map(|&v| v as f64).collect();
        check(&format!("rope d{hd} near 32k vs cpu"), &got, &want, 1e-2);
        let rounded = common::bf16_round(&xc);
        let differ = got
            .iter()
            .zip(&rounded)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        println!(
            "rope d{hd} theta {theta}: {differ} of {} elements differ from bf16(cpu)",
            got.len()
        );
        assert!(
            differ * 1000 <= got.len(),
            "rope d{hd}: {differ} of {} elements differ from the CPU result rounded to bf16",
            got.len()
        );
        let mut g = c.upload(&xc).unwrap();
        let mut gc = common::bf16_round(&xc);
        c.rope_bwd(&mut g, &pd, n_tok, nh, hd, theta).unwrap();
        cpu.rope_bwd(&mut gc, &pos, n_tok, nh, hd, theta).unwrap();
        let gw: Vec<f64> = gc.iter().map(|&v| v as f64).collect();
        check(
            &format!("rope_bwd d{hd} near 32k vs cpu"),
            &c.download(&g, xh.len()).unwrap(),
            &gw,
            1e-2,
        );
    }
}

/// The allocator's out-of-memory path: a cached block still used by queued work is freed only
/// after that work ran, and the retried allocation succeeds. Needs a device with a small memory
/// limit: the virtual GPU's TOOLN1_VGPU_MEM_BYTES.
#[test]
fn allocator_out_of_memory_trims_and_retries() {
    let Some(c) = gpu() else { return };
    if c.pool_is_exact() {
        tooln1_skip!(
            "allocator_out_of_memory_trims_and_retries: not applicable with TOOLN1_CUDA_POOL=exact (no cache to trim)"
        );
        return;
    }
    let limit: u64 = match std::env::var("TOOLN1_VGPU_MEM_BYTES") {
        Ok(v) => v
            .trim()
            .parse()
            .expect("TOOLN1_VGPU_MEM_BYTES must be a byte count"),
        Err(_) => {
            // Not a missing device: this case needs a device whose memory can be limited.
            tooln1_skip!(
                "skipped: allocator out-of-memory path (needs TOOLN1_VGPU_MEM_BYTES, the virtual GPU's memory limit)"
            );
            return;
        }
    };
    assert!(
        limit <= 4 << 30,
        "TOOLN1_VGPU_MEM_BYTES = {limit}: use a limit of at most 4 GiB for this test"
    );
    c.trim().unwrap();
    // Two f32 blocks of 45% of the memory each fit; a third of 60% does not until the
    // cached ones are freed.
    let n = (limit as usize / 4) * 45 / 100;
    let mut a = c.zeros_f32(n).unwrap();
    c.fill_f32(&mut a, n, 1.5).unwrap(); // queued work on the block about to be cached
    drop(a);
    let before = c.pool_stats();
    let m = (limit as usize / 4) * 60 / 100;
    let mut b = c
        .zeros_f32(m)
        .expect("the allocation after trimming the cache must succeed");
    let after = c.pool_stats();
    println!("pool before {before:?}, after {after:?}");
    assert!(
        after.bytes_held < before.bytes_held + (m as u64) * 4,
        "the cache was not trimmed"
    );
    c.fill_f32(&mut b, m, 2.0).unwrap();
    let tail = c.download_f32(&b, m).unwrap();
    assert!(tail.iter().all(|&x| x == 2.0));
    c.synchronize().unwrap();
}

/// `--device auto` takes the CPU only when there is no CUDA device.
#[test]
fn device_auto_falls_back_only_without_a_device() {
    use tooln1::backend::select::auto_backend;
    match (Cuda::new(), auto_backend()) {
        (Ok(_), Ok(Some(_))) => {}
        (Err(tooln1::Error::NoCuda(_)), Ok(None)) => {}
        (Err(e), Err(_)) if !matches!(e, tooln1::Error::NoCuda(_)) => {}
        (n, a) => panic!(
            "Cuda::new() = {:?} but auto_backend() = {:?}",
            n.err(),
            a.map(|c| c.is_some())
        ),
    }
}
