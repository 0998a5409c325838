//! The shared-prompt layout on the CPU backend: the prefixed attention op against a naive
//! reference (each response as its own prompt + response sequence) in f64 and f32, its backward
//! against f64 finite differences, thread-count independence, the row scatter-add.
//! Seeds are printed; `TOOLN1_TEST_SEED=<n>` replays one.

mod common;

use common::{check, Rng};
use tooln1::backend::cpu::{math, Cpu};
use tooln1::backend::Backend;

/// A random shared layout: per group (prompt start, prompt length, response segments as
/// (start, length)); segment lengths may be 0 (a one-token response).
struct Packing {
    cu: Vec<u32>,
    prefix: Vec<u32>,
    groups: Vec<(usize, usize, Vec<(usize, usize)>)>,
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
            math::attention(&qq, &kk, &vv, &mut o, &mut l, &cu, nh, nkv, hd);
            let (mut gq, mut gk, mut gv) =
                (vec![0.0; m * qs], vec![0.0; m * ks], vec![0.0; m * ks]);
            math::attention_bwd(
                &dd, &qq, &kk, &vv, &o, &l, &mut gq, &mut gk, &mut gv, &cu, nh, nkv, hd,
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

fn to32(x: &[f64]) -> Vec<f32> {
    x.iter().map(|&v| v as f32).collect()
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
        math::attention_prefixed(&q, &k, &v, &mut o, &mut l, &p.cu, &p.prefix, nh, nkv, hd);
        close64(&format!("case {case}: f64 out"), &o, &ro, 1e-12);
        close64(&format!("case {case}: f64 lse"), &l, &rl, 1e-12);
        let (mut dq, mut dk, mut dv) = (
            vec![f64::NAN; n_tok * qs],
            vec![f64::NAN; n_tok * ks],
            vec![f64::NAN; n_tok * ks],
        );
        math::attention_prefixed_bwd(
            &dout, &q, &k, &v, &o, &l, &mut dq, &mut dk, &mut dv, &p.cu, &p.prefix, nh, nkv, hd,
        );
        close64(&format!("case {case}: f64 dq"), &dq, &rdq, 1e-11);
        close64(&format!("case {case}: f64 dk"), &dk, &rdk, 1e-11);
        close64(&format!("case {case}: f64 dv"), &dv, &rdv, 1e-11);
        // the CPU backend (f32 fast path), outputs poisoned first
        let b = Cpu;
        let (mut fo, mut fl) = (vec![f32::NAN; n_tok * qs], vec![f32::NAN; nh * n_tok]);
        b.attention_prefixed(
            &to32(&q),
            &to32(&k),
            &to32(&v),
            &mut fo,
            &mut fl,
            &p.cu,
            &p.cu,
            &p.prefix,
            &p.prefix,
            max_len,
            nh,
            nkv,
            hd,
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
            &to32(&dout),
            &to32(&q),
            &to32(&k),
            &to32(&v),
            &to32(&o),
            &to32(&l),
            &mut fdq,
            &mut fdk,
            &mut fdv,
            &p.cu,
            &p.cu,
            &p.prefix,
            &p.prefix,
            max_len,
            nh,
            nkv,
            hd,
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
        math::attention_prefixed(q, k, v, &mut o, &mut l, &p.cu, &p.prefix, nh, nkv, hd);
        o.iter().zip(&w).map(|(a, b)| a * b).sum()
    };
    let (mut o, mut l) = (vec![f64::NAN; n_tok * qs], vec![f64::NAN; nh * n_tok]);
    math::attention_prefixed(&q, &k, &v, &mut o, &mut l, &p.cu, &p.prefix, nh, nkv, hd);
    let (mut dq, mut dk, mut dv) = (
        vec![f64::NAN; n_tok * qs],
        vec![f64::NAN; n_tok * ks],
        vec![f64::NAN; n_tok * ks],
    );
    math::attention_prefixed_bwd(
        &w, &q, &k, &v, &o, &l, &mut dq, &mut dk, &mut dv, &p.cu, &p.prefix, nh, nkv, hd,
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
            &q, &k, &v, &mut o, &mut l, &p.cu, &p.cu, &p.prefix, &p.prefix, max_len, nh, nkv, hd,
        )
        .unwrap();
        let (mut dq, mut dk, mut dv) = (
            vec![f32::NAN; n_tok * qs],
            vec![f32::NAN; n_tok * ks],
            vec![f32::NAN; n_tok * ks],
        );
        b.attention_prefixed_bwd(
            &dout, &q, &k, &v, &o, &l, &mut dq, &mut dk, &mut dv, &p.cu, &p.cu, &p.prefix,
            &p.prefix, max_len, nh, nkv, hd,
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
            &q,
            &kv,
            &kv,
            &mut o,
            &mut l,
            &cu,
            &cu,
            prefix_dev,
            prefix_host,
            3,
            nh,
            nkv,
            hd,
        )
    };
    let good = vec![0u32, 0, 0, 3, 0, 3];
    run(&good, &good).unwrap();
    for (bad, want) in [
        (vec![0u32, 0, 0, 3], "2 entries per segment"),
        (vec![0u32, 0, 0, 4, 0, 3], "expected lo <= hi <= 3"),
        (vec![0u32, 0, 2, 1, 0, 3], "expected lo <= hi"),
        (vec![0u32, 1, 0, 3, 0, 3], "expected lo <= hi <= 0"),
    ] {
        let e = run(&bad, &bad).unwrap_err().to_string();
        assert!(e.contains("prefix") && e.contains(want), "{e}");
    }
    let e = run(&vec![0u32, 0, 0, 2, 0, 3], &good)
        .unwrap_err()
        .to_string();
    assert!(e.contains("`prefix` and `prefix_host` differ"), "{e}");
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
    assert!(e.contains("`ids[0]`") && e.contains("dst_rows"), "{e}");
}
