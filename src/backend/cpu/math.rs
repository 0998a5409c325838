//! The math of every CPU op, generic over a small float trait [`Real`] so that the backend runs
//! it in f32 and the tests run exactly the same code in f64 (finite differences).
//!
//! These functions assume their arguments were validated (lengths checked against the shape
//! arguments, indices in range): the [`super::Cpu`] backend does that ([`crate::backend::check`])
//! and returns `Error::Arg` otherwise. Called directly with inconsistent shapes they panic.
//! Layouts are those of [`crate::backend::Backend`].

// Index loops are kept where they mirror the formulas they implement.
#![allow(clippy::needless_range_loop)]

use std::fmt::Debug;
use std::ops::{Add, AddAssign, Div, DivAssign, Mul, MulAssign, Neg, Sub, SubAssign};

use crate::backend::loss::Aggregation;
use crate::backend::{
    AttnGrads, AttnSaved, Cached, GemmDims, GrpoLossCfg, GrpoTokens, Heads, KlKind, LinearGrads,
    LmHead, LogprobsGrads, LogprobsOut, NormDims, NormGrads, NormOut, Qkv, RopeRows, VocabDims,
};

/// The float operations the CPU math needs (implemented for f32 and f64).
pub trait Real:
    Copy
    + PartialOrd
    + Debug
    + Default
    + Send
    + Sync
    + 'static
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
    + MulAssign
    + DivAssign
{
    fn from_f64(x: f64) -> Self;
    fn to_f64(self) -> f64;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn sqrt(self) -> Self;
    fn sin(self) -> Self;
    fn cos(self) -> Self;
    fn powf(self, e: Self) -> Self;
    fn abs(self) -> Self;
    fn neg_infinity() -> Self;
    /// `C[m,n] = alpha · A[m,k] · B[k,n] + beta · C`, with arbitrary row/column strides
    /// (beta = 0 overwrites C, whatever it held, NaN included).
    fn gemm_raw(g: Gemm, alpha: Self, a: &[Self], b: &[Self], beta: Self, c: &mut [Self]);

    fn zero() -> Self {
        Self::from_f64(0.0)
    }
    fn one() -> Self {
        Self::from_f64(1.0)
    }
    fn from_usize(x: usize) -> Self {
        Self::from_f64(x as f64)
    }
    fn max(self, o: Self) -> Self {
        if o > self {
            o
        } else {
            self
        }
    }
    fn min(self, o: Self) -> Self {
        if o < self {
            o
        } else {
            self
        }
    }
    fn clamp(self, lo: Self, hi: Self) -> Self {
        self.max(lo).min(hi)
    }
}

/// Shape and strides of one GEMM call (see [`Real::gemm_raw`]).
#[derive(Clone, Copy, Debug)]
pub struct Gemm {
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub rsa: usize,
    pub csa: usize,
    pub rsb: usize,
    pub csb: usize,
    pub rsc: usize,
    pub csc: usize,
}

/// Number of elements a strided [rows, cols] matrix spans (0 when empty).
fn span(rows: usize, cols: usize, rs: usize, cs: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * rs + (cols - 1) * cs + 1
    }
}

impl Gemm {
    /// Panics unless every slice covers the elements the strides reach (keeps the unsafe
    /// matrixmultiply calls in bounds).
    pub(crate) fn check<T>(&self, a: &[T], b: &[T], c: &[T]) {
        assert!(
            span(self.m, self.k, self.rsa, self.csa) <= a.len(),
            "gemm: A too short"
        );
        assert!(
            span(self.k, self.n, self.rsb, self.csb) <= b.len(),
            "gemm: B too short"
        );
        assert!(
            span(self.m, self.n, self.rsc, self.csc) <= c.len(),
            "gemm: C too short"
        );
        assert!(
            self.rsc > 0 && self.csc > 0,
            "gemm: C strides must be non-zero"
        );
    }
}

macro_rules! impl_real {
    ($t:ty, $gemm:path) => {
        impl Real for $t {
            fn from_f64(x: f64) -> Self {
                x as $t
            }
            fn to_f64(self) -> f64 {
                self as f64
            }
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            fn sin(self) -> Self {
                <$t>::sin(self)
            }
            fn cos(self) -> Self {
                <$t>::cos(self)
            }
            fn powf(self, e: Self) -> Self {
                <$t>::powf(self, e)
            }
            fn abs(self) -> Self {
                <$t>::abs(self)
            }
            fn neg_infinity() -> Self {
                <$t>::NEG_INFINITY
            }
            fn gemm_raw(g: Gemm, alpha: Self, a: &[Self], b: &[Self], beta: Self, c: &mut [Self]) {
                g.check(a, b, c);
                if g.m == 0 || g.n == 0 {
                    return;
                }
                if g.k == 0 {
                    for i in 0..g.m {
                        for j in 0..g.n {
                            let x = &mut c[i * g.rsc + j * g.csc];
                            *x = if beta == 0.0 { 0.0 } else { *x * beta };
                        }
                    }
                    return;
                }
                // SAFETY: `check` proved that every element reached through the strides lies
                // inside the slices; C is a distinct &mut slice so it aliases neither A nor B.
                unsafe {
                    $gemm(
                        g.m,
                        g.k,
                        g.n,
                        alpha,
                        a.as_ptr(),
                        g.rsa as isize,
                        g.csa as isize,
                        b.as_ptr(),
                        g.rsb as isize,
                        g.csb as isize,
                        beta,
                        c.as_mut_ptr(),
                        g.rsc as isize,
                        g.csc as isize,
                    )
                }
            }
        }
    };
}
impl_real!(f32, matrixmultiply::sgemm);
impl_real!(f64, matrixmultiply::dgemm);

/// `y[m,n] = x[m,k] · w[n,k]ᵀ + beta · y`
pub fn matmul_nt<R: Real>(x: &[R], w: &[R], y: &mut [R], m: usize, n: usize, k: usize, beta: R) {
    let g = Gemm {
        m,
        k,
        n,
        rsa: k,
        csa: 1,
        rsb: 1,
        csb: k,
        rsc: n,
        csc: 1,
    };
    R::gemm_raw(g, R::one(), x, w, beta, y);
}

/// `dx[m,k] = dy[m,n] · w[n,k] + beta · dx`
pub fn matmul_nn<R: Real>(dy: &[R], w: &[R], dx: &mut [R], m: usize, n: usize, k: usize, beta: R) {
    let g = Gemm {
        m,
        k: n,
        n: k,
        rsa: n,
        csa: 1,
        rsb: k,
        csb: 1,
        rsc: k,
        csc: 1,
    };
    R::gemm_raw(g, R::one(), dy, w, beta, dx);
}

/// `dw[n,k] += dy[m,n]ᵀ · x[m,k]`
pub fn matmul_tn_acc<R: Real>(dy: &[R], x: &[R], dw: &mut [R], m: usize, n: usize, k: usize) {
    let g = Gemm {
        m: n,
        k: m,
        n: k,
        rsa: 1,
        csa: n,
        rsb: k,
        csb: 1,
        rsc: k,
        csc: 1,
    };
    R::gemm_raw(g, R::one(), dy, x, R::one(), dw);
}

// ------------------------------------------------------------------------------------ linear

/// `y[m,n] = x[m,k] · w[n,k]ᵀ (+ bias[n])`
pub fn linear<R: Real>(
    x: &[R],
    w: &[R],
    bias: Option<&[R]>,
    y: &mut [R],
    m: usize,
    n: usize,
    k: usize,
) {
    matmul_nt(x, w, y, m, n, k, R::zero());
    if let Some(b) = bias {
        for row in y[..m * n].chunks_exact_mut(n) {
            for (yv, &bv) in row.iter_mut().zip(&b[..n]) {
                *yv += bv;
            }
        }
    }
}

/// dx (=, or += when `accumulate_dx`) dy·w; dw += dyᵀ·x; dbias += Σ_m dy.
pub fn linear_bwd<R: Real>(
    dy: &[R],
    x: &[R],
    w: &[R],
    grads: LinearGrads<'_, [R], [R]>,
    d: GemmDims,
) {
    let LinearGrads {
        dx,
        accumulate_dx,
        dw,
        dbias,
    } = grads;
    let GemmDims { m, n, k } = d;
    if let Some(dx) = dx {
        let beta = if accumulate_dx { R::one() } else { R::zero() };
        matmul_nn(dy, w, dx, m, n, k, beta);
    }
    if let Some(dw) = dw {
        matmul_tn_acc(dy, x, dw, m, n, k);
    }
    if let Some(db) = dbias {
        for row in dy[..m * n].chunks_exact(n) {
            for (d, &g) in db[..n].iter_mut().zip(row) {
                *d += g;
            }
        }
    }
}

// ------------------------------------------------------------------------------------ embedding

/// `out[t,:] = table[ids[t],:]`
pub fn embedding<R: Real>(ids: &[u32], table: &[R], out: &mut [R], n_tok: usize, dim: usize) {
    for t in 0..n_tok {
        let id = ids[t] as usize;
        out[t * dim..(t + 1) * dim].copy_from_slice(&table[id * dim..(id + 1) * dim]);
    }
}

/// `dtable[ids[t],:] += dout[t,:]`
pub fn embedding_bwd<R: Real>(ids: &[u32], dout: &[R], dtable: &mut [R], n_tok: usize, dim: usize) {
    for t in 0..n_tok {
        let id = ids[t] as usize;
        for (d, &g) in dtable[id * dim..(id + 1) * dim]
            .iter_mut()
            .zip(&dout[t * dim..(t + 1) * dim])
        {
            *d += g;
        }
    }
}

// ------------------------------------------------------------------------------------ RMSNorm

/// out = x · rstd · w, rstd = 1/sqrt(mean(x²) + eps) saved per row.
pub fn rmsnorm<R: Real>(x: &[R], w: &[R], out: &mut [R], rstd: &mut [R], d: NormDims, eps: R) {
    let NormDims { rows, dim } = d;
    for r in 0..rows {
        let xr = &x[r * dim..(r + 1) * dim];
        let mut ss = R::zero();
        for &v in xr {
            ss += v * v;
        }
        let s = R::one() / (ss / R::from_usize(dim) + eps).sqrt();
        rstd[r] = s;
        for ((o, &xv), &wv) in out[r * dim..(r + 1) * dim]
            .iter_mut()
            .zip(xr)
            .zip(&w[..dim])
        {
            *o = xv * s * wv;
        }
    }
}

/// x += delta, then [`rmsnorm`] of the new x, one row at a time (the row is normed while it is
/// still in cache): the same bits as the add over all rows followed by [`rmsnorm`].
pub fn add_rmsnorm<R: Real>(
    x: &mut [R],
    delta: &[R],
    w: &[R],
    y: NormOut<'_, [R], [R]>,
    d: NormDims,
    eps: R,
) {
    let (NormOut { out, rstd }, NormDims { rows, dim }) = (y, d);
    for r in 0..rows {
        let row = r * dim..(r + 1) * dim;
        let xr = &mut x[row.clone()];
        for (a, &b) in xr.iter_mut().zip(&delta[row.clone()]) {
            *a += b;
        }
        let one = NormDims { rows: 1, dim };
        rmsnorm(xr, w, &mut out[row], &mut rstd[r..r + 1], one, eps);
    }
}

/// dx += rstd·(w∘dout) − x·rstd³/dim · Σ(w∘dout∘x); dw += Σ_r dout∘x·rstd.
pub fn rmsnorm_bwd<R: Real>(
    dout: &[R],
    x: &[R],
    w: &[R],
    rstd: &[R],
    grads: NormGrads<'_, [R], [R]>,
    d: NormDims,
) {
    let (NormGrads { dx, mut dw }, NormDims { rows, dim }) = (grads, d);
    for r in 0..rows {
        let xr = &x[r * dim..(r + 1) * dim];
        let gr = &dout[r * dim..(r + 1) * dim];
        let s = rstd[r];
        let mut dot = R::zero();
        for j in 0..dim {
            dot += gr[j] * w[j] * xr[j];
        }
        let c = s * s * s * dot / R::from_usize(dim);
        let dxr = &mut dx[r * dim..(r + 1) * dim];
        for j in 0..dim {
            dxr[j] += s * w[j] * gr[j] - c * xr[j];
        }
        if let Some(dw) = dw.as_deref_mut() {
            for j in 0..dim {
                dw[j] += gr[j] * xr[j] * s;
            }
        }
    }
}

// ------------------------------------------------------------------------------------ RoPE

/// The rotary inverse frequencies inv_freq_i = 1 / theta^(2i/head_dim), i < head_dim/2,
/// computed in R like HF computes them in f32. The CUDA backend uploads this very table (f32),
/// so both backends rotate by bit-identical angles `pos as f32 * inv_freq_i`.
pub fn rope_inv_freq<R: Real>(head_dim: usize, theta: R) -> Vec<R> {
    (0..head_dim / 2)
        .map(|i| R::one() / theta.powf(R::from_usize(2 * i) / R::from_usize(head_dim)))
        .collect()
}

/// Rotary embedding in place (half-split layout); `inverse` rotates by −angle, which is both
/// the inverse and the transpose of the forward rotation (so it is the backward).
pub fn rope<R: Real>(x: &mut [R], pos: &[u32], d: RopeRows, theta: R, inverse: bool) {
    let RopeRows {
        n_tok,
        n_heads,
        head_dim,
    } = d;
    let half = head_dim / 2;
    let inv_freq = rope_inv_freq(head_dim, theta);
    let mut cs = vec![(R::zero(), R::zero()); half];
    for t in 0..n_tok {
        let p = R::from_f64(pos[t] as f64);
        for (i, c) in cs.iter_mut().enumerate() {
            let a = p * inv_freq[i];
            let s = a.sin();
            *c = (a.cos(), if inverse { -s } else { s });
        }
        for h in 0..n_heads {
            let base = (t * n_heads + h) * head_dim;
            let v = &mut x[base..base + head_dim];
            for (i, &(c, s)) in cs.iter().enumerate() {
                let (a, b) = (v[i], v[i + half]);
                v[i] = a * c - b * s;
                v[i + half] = b * c + a * s;
            }
        }
    }
}

// ------------------------------------------------------------------------------------ attention

/// Causal GQA attention over the packed sequences of offsets `cu`; lse saved per
/// [head, token].
pub fn attention<R: Real>(
    qkv: Qkv<'_, [R]>,
    out: &mut [R],
    lse: &mut [R],
    cu: &[u32],
    heads: Heads,
) {
    attention_prefixed(qkv, out, lse, cu, &[], heads)
}

/// Key rows a query of segment `s` attends to fully before its own causal keys: rows
/// `prefix[2s]..prefix[2s+1]` (none when `prefix` is empty).
pub fn prefix_range(prefix: &[u32], s: usize) -> std::ops::Range<usize> {
    if prefix.is_empty() {
        0..0
    } else {
        prefix[2 * s] as usize..prefix[2 * s + 1] as usize
    }
}

/// [`attention`] with a shared prefix per segment: query i of segment s (rows
/// `cu[s]..cu[s+1]`) attends to every key of `prefix_range(prefix, s)` and causally to the keys
/// `cu[s]..=i` of its own segment (the shared-prompt layout of Prefix Grouper,
/// arXiv 2506.05433: a prompt segment, then its responses, each with the prompt as prefix).
pub fn attention_prefixed<R: Real>(
    qkv: Qkv<'_, [R]>,
    out: &mut [R],
    lse: &mut [R],
    cu: &[u32],
    prefix: &[u32],
    heads: Heads,
) {
    let Qkv { q, k, v } = qkv;
    let Heads {
        n_heads,
        n_kv,
        head_dim,
    } = heads;
    let n_tok = *cu.last().unwrap_or(&0) as usize;
    let group = n_heads / n_kv;
    let scale = R::one() / R::from_usize(head_dim).sqrt();
    let (qs, ks) = (n_heads * head_dim, n_kv * head_dim);
    let mut s = Vec::new();
    let mut keys = Vec::new();
    for (seg, w) in cu.windows(2).enumerate() {
        let (start, end) = (w[0] as usize, w[1] as usize);
        let pre = prefix_range(prefix, seg);
        for h in 0..n_heads {
            let kh = h / group;
            for i in start..end {
                let qi = &q[i * qs + h * head_dim..][..head_dim];
                s.clear();
                keys.clear();
                keys.extend(pre.clone().chain(start..=i));
                let mut mx = R::neg_infinity();
                for &j in &keys {
                    let kj = &k[j * ks + kh * head_dim..][..head_dim];
                    let sc = dot(qi, kj) * scale;
                    mx = mx.max(sc);
                    s.push(sc);
                }
                let mut sum = R::zero();
                for &sc in &s {
                    sum += (sc - mx).exp();
                }
                let l = mx + sum.ln();
                lse[h * n_tok + i] = l;
                let o = &mut out[i * qs + h * head_dim..][..head_dim];
                o.fill(R::zero());
                for (&j, &sc) in keys.iter().zip(&s) {
                    let p = (sc - l).exp();
                    let vj = &v[j * ks + kh * head_dim..][..head_dim];
                    for d in 0..head_dim {
                        o[d] += p * vj[d];
                    }
                }
            }
        }
    }
}

fn dot<R: Real>(a: &[R], b: &[R]) -> R {
    let mut s = R::zero();
    for (&x, &y) in a.iter().zip(b) {
        s += x * y;
    }
    s
}

/// Backward of [`attention`] (flash-attention style): P recomputed from lse,
/// D_i = dO_i·O_i, dS = P∘(dO·Vᵀ − D); dq, dk, dv overwritten.
pub fn attention_bwd<R: Real>(
    qkv: Qkv<'_, [R]>,
    saved: AttnSaved<'_, [R], [R]>,
    grads: AttnGrads<'_, [R]>,
    cu: &[u32],
    heads: Heads,
) {
    attention_prefixed_bwd(qkv, saved, grads, cu, &[], heads)
}

/// Backward of [`attention_prefixed`]: a prefix key's dK/dV collect the contributions of every
/// segment that reads it (and of its own segment's causal queries); dq, dk, dv overwritten.
pub fn attention_prefixed_bwd<R: Real>(
    qkv: Qkv<'_, [R]>,
    saved: AttnSaved<'_, [R], [R]>,
    grads: AttnGrads<'_, [R]>,
    cu: &[u32],
    prefix: &[u32],
    heads: Heads,
) {
    let (Qkv { q, k, v }, AttnSaved { dout, out, lse }) = (qkv, saved);
    let AttnGrads { dq, dk, dv } = grads;
    let Heads {
        n_heads,
        n_kv,
        head_dim,
    } = heads;
    let n_tok = *cu.last().unwrap_or(&0) as usize;
    let group = n_heads / n_kv;
    let scale = R::one() / R::from_usize(head_dim).sqrt();
    let (qs, ks) = (n_heads * head_dim, n_kv * head_dim);
    dq[..n_tok * qs].fill(R::zero());
    dk[..n_tok * ks].fill(R::zero());
    dv[..n_tok * ks].fill(R::zero());
    for (seg, w) in cu.windows(2).enumerate() {
        let (start, end) = (w[0] as usize, w[1] as usize);
        let pre = prefix_range(prefix, seg);
        for h in 0..n_heads {
            let kh = h / group;
            for i in start..end {
                let qi = &q[i * qs + h * head_dim..][..head_dim];
                let doi = &dout[i * qs + h * head_dim..][..head_dim];
                let oi = &out[i * qs + h * head_dim..][..head_dim];
                let di = dot(doi, oi);
                let l = lse[h * n_tok + i];
                for j in pre.clone().chain(start..=i) {
                    let kb = j * ks + kh * head_dim;
                    let p = (dot(qi, &k[kb..kb + head_dim]) * scale - l).exp();
                    let dp = dot(doi, &v[kb..kb + head_dim]);
                    let ds = p * (dp - di) * scale;
                    for d in 0..head_dim {
                        dq[i * qs + h * head_dim + d] += ds * k[kb + d];
                        dk[kb + d] += ds * qi[d];
                        dv[kb + d] += p * doi[d];
                    }
                }
            }
        }
    }
}

/// dst[ids[t],:] += src[t,:] for t < n in increasing t (a repeated id sums its rows in order).
pub fn scatter_add_rows<R: Real>(ids: &[u32], src: &[R], dst: &mut [R], n: usize, dim: usize) {
    for t in 0..n {
        let r = ids[t] as usize;
        for (d, &s) in dst[r * dim..(r + 1) * dim]
            .iter_mut()
            .zip(&src[t * dim..(t + 1) * dim])
        {
            *d += s;
        }
    }
}

/// Copy k/v rows into cache rows `dst[t]`.
pub fn kv_store<R: Real>(
    k: &[R],
    v: &[R],
    dst: &[u32],
    k_cache: &mut [R],
    v_cache: &mut [R],
    n_tok: usize,
    kv_dim: usize,
) {
    for t in 0..n_tok {
        let d = dst[t] as usize * kv_dim;
        k_cache[d..d + kv_dim].copy_from_slice(&k[t * kv_dim..(t + 1) * kv_dim]);
        v_cache[d..d + kv_dim].copy_from_slice(&v[t * kv_dim..(t + 1) * kv_dim]);
    }
}

/// One query per slot b < n_seq against cache rows `b*max_len .. b*max_len + lens[b]`.
pub fn attention_decode<R: Real>(
    q: &[R],
    k_cache: &[R],
    v_cache: &[R],
    cached: &Cached<'_, [u32]>,
    out: &mut [R],
    heads: Heads,
) {
    let Cached {
        lens,
        table,
        n_seq,
        max_blocks,
        block_size,
    } = *cached;
    // The cache row of sequence b's position j, through its block table.
    let row_of = |b: usize, j: usize| {
        table[b * max_blocks + j / block_size] as usize * block_size + j % block_size
    };
    let Heads {
        n_heads,
        n_kv,
        head_dim,
    } = heads;
    let group = n_heads / n_kv;
    let scale = R::one() / R::from_usize(head_dim).sqrt();
    let (qs, ks) = (n_heads * head_dim, n_kv * head_dim);
    let mut s = Vec::new();
    for b in 0..n_seq {
        let len = lens[b] as usize;
        for h in 0..n_heads {
            let kh = h / group;
            let qb = &q[b * qs + h * head_dim..][..head_dim];
            s.clear();
            let mut mx = R::neg_infinity();
            for j in 0..len {
                let row = row_of(b, j) * ks + kh * head_dim;
                let sc = dot(qb, &k_cache[row..row + head_dim]) * scale;
                mx = mx.max(sc);
                s.push(sc);
            }
            let mut sum = R::zero();
            for &sc in &s {
                sum += (sc - mx).exp();
            }
            let l = mx + sum.ln();
            let o = &mut out[b * qs + h * head_dim..][..head_dim];
            o.fill(R::zero());
            for (j, &sc) in s.iter().enumerate() {
                let p = (sc - l).exp();
                let row = row_of(b, j) * ks + kh * head_dim;
                for d in 0..head_dim {
                    o[d] += p * v_cache[row + d];
                }
            }
        }
    }
}

// ------------------------------------------------------------------------------------ SwiGLU

fn sigmoid<R: Real>(x: R) -> R {
    R::one() / (R::one() + (-x).exp())
}

/// out = silu(gate) * up
pub fn swiglu<R: Real>(gate: &[R], up: &[R], out: &mut [R], n: usize) {
    for i in 0..n {
        out[i] = gate[i] * sigmoid(gate[i]) * up[i];
    }
}

/// dgate = dout·up·σ(g)(1 + g(1−σ(g))); dup = dout·silu(g)
pub fn swiglu_bwd<R: Real>(
    dout: &[R],
    gate: &[R],
    up: &[R],
    dgate: &mut [R],
    dup: &mut [R],
    n: usize,
) {
    for i in 0..n {
        let g = gate[i];
        let sg = sigmoid(g);
        dgate[i] = dout[i] * up[i] * sg * (R::one() + g * (R::one() - sg));
        dup[i] = dout[i] * g * sg;
    }
}

// ------------------------------------------------------------------------------------ vocabulary

/// Rows of logits computed at once by the vocabulary ops: never [n_tok, vocab].
pub const LOGIT_CHUNK_ELEMS: usize = 1 << 20;

fn chunk_rows(vocab: usize) -> usize {
    (LOGIT_CHUNK_ELEMS / vocab.max(1)).max(1)
}

/// Multiplies a logits chunk by the inverse temperature in place (nothing to do at exactly 1).
fn scale_logits<R: Real>(z: &mut [R], inv_t: R) {
    if inv_t != R::one() {
        for v in z {
            *v *= inv_t;
        }
    }
}

/// Fused lm_head + log-softmax + gather at inverse temperature `inv_t` (logits = h·wᵀ·inv_t),
/// chunk of rows by chunk of rows.
pub fn logprobs<R: Real>(
    head: LmHead<'_, [R], [u32]>,
    out: LogprobsOut<'_, [R]>,
    d: VocabDims,
    inv_t: R,
) {
    let (LmHead { h, w, targets }, VocabDims { n_tok, dim, vocab }) = (head, d);
    let LogprobsOut {
        logp,
        lse,
        mut entropy,
    } = out;
    let cr = chunk_rows(vocab);
    let mut buf = vec![R::zero(); cr.min(n_tok) * vocab];
    let mut t0 = 0;
    while t0 < n_tok {
        let rows = cr.min(n_tok - t0);
        matmul_nt(
            &h[t0 * dim..(t0 + rows) * dim],
            w,
            &mut buf,
            rows,
            vocab,
            dim,
            R::zero(),
        );
        scale_logits(&mut buf[..rows * vocab], inv_t);
        for r in 0..rows {
            let t = t0 + r;
            let z = &buf[r * vocab..(r + 1) * vocab];
            let (l, ent) = row_lse_entropy(z, entropy.is_some());
            lse[t] = l;
            logp[t] = z[targets[t] as usize] - l;
            if let Some(e) = entropy.as_deref_mut() {
                e[t] = ent;
            }
        }
        t0 += rows;
    }
}

/// logsumexp of a row and, when asked, the entropy −Σ p log p = lse − Σ p·z.
fn row_lse_entropy<R: Real>(z: &[R], want_entropy: bool) -> (R, R) {
    let mut mx = R::neg_infinity();
    for &v in z {
        mx = mx.max(v);
    }
    let mut sum = R::zero();
    for &v in z {
        sum += (v - mx).exp();
    }
    let l = mx + sum.ln();
    let mut ent = R::zero();
    if want_entropy {
        let mut pz = R::zero();
        for &v in z {
            pz += (v - l).exp() * v;
        }
        ent = l - pz;
    }
    (l, ent)
}

/// Backward of [`logprobs`] (same `inv_t`): with z = h·wᵀ and p = softmax(z·inv_t),
/// dz = inv_t·dlogp·(onehot − p), recomputed chunk by chunk; dh overwritten, dw accumulated.
pub fn logprobs_bwd<R: Real>(
    dlogp: &[R],
    head: LmHead<'_, [R], [u32]>,
    lse: &[R],
    grads: LogprobsGrads<'_, [R], [R]>,
    d: VocabDims,
    inv_t: R,
) {
    let (LmHead { h, w, targets }, VocabDims { n_tok, dim, vocab }) = (head, d);
    let LogprobsGrads { dh, mut dw } = grads;
    let cr = chunk_rows(vocab);
    let mut buf = vec![R::zero(); cr.min(n_tok) * vocab];
    let mut t0 = 0;
    while t0 < n_tok {
        let rows = cr.min(n_tok - t0);
        let hc = &h[t0 * dim..(t0 + rows) * dim];
        matmul_nt(hc, w, &mut buf, rows, vocab, dim, R::zero());
        scale_logits(&mut buf[..rows * vocab], inv_t);
        for r in 0..rows {
            let t = t0 + r;
            // The chain rule through z·inv_t (exact at inv_t = 1).
            let g = dlogp[t] * inv_t;
            let l = lse[t];
            let z = &mut buf[r * vocab..(r + 1) * vocab];
            for v in z.iter_mut() {
                *v = -g * (*v - l).exp();
            }
            z[targets[t] as usize] += g;
        }
        matmul_nn(
            &buf,
            w,
            &mut dh[t0 * dim..(t0 + rows) * dim],
            rows,
            vocab,
            dim,
            R::zero(),
        );
        if let Some(dw) = dw.as_deref_mut() {
            matmul_tn_acc(&buf, hc, dw, rows, vocab, dim);
        }
        t0 += rows;
    }
}

// ------------------------------------------------------------------------------------ GRPO loss

/// Statistics of [`grpo_loss`] (see [`crate::backend::GrpoLossOut`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct GrpoStats<R> {
    pub loss: R,
    pub pg_loss: R,
    pub kl: R,
    pub clip_frac: R,
    pub ratio_mean: R,
    pub n_tokens: R,
}

/// The KL estimator and its derivative with respect to logp (verl's `kl_penalty` in
/// `verl/trainer/ppo/core_algos.py`; k3 clamps x to [−20, 20] and the value to [−10, 10], the
/// gradient being 0 where a clamp is active).
pub fn kl_term<R: Real>(kind: KlKind, logp: R, ref_logp: R) -> (R, R) {
    let d = logp - ref_logp;
    match kind {
        KlKind::K1 => (d, R::one()),
        KlKind::Abs => {
            let s = if d > R::zero() {
                R::one()
            } else if d < R::zero() {
                -R::one()
            } else {
                R::zero()
            };
            (d.abs(), s)
        }
        KlKind::K2 => (R::from_f64(0.5) * d * d, d),
        KlKind::K3 => {
            let lim = R::from_f64(20.0);
            let raw = ref_logp - logp;
            let x = raw.clamp(-lim, lim);
            let dx = if raw >= -lim && raw <= lim {
                -R::one()
            } else {
                R::zero()
            };
            let kl = x.exp() - x - R::one();
            let klim = R::from_f64(10.0);
            let g = if kl >= -klim && kl <= klim {
                (x.exp() - R::one()) * dx
            } else {
                R::zero()
            };
            (kl.clamp(-klim, klim), g)
        }
    }
}

/// GRPO clipped surrogate + KL, aggregated per `cfg.agg` ([`crate::backend::loss`]); writes
/// dlogp. `mask[t]` weights token t (0 = excluded; verl's masked sums multiply by the mask, so
/// 0/1 masks are the usual case). With `L_t = pg_t + kl_coef·kl_t`, the loss is
/// Σ_t w_t L_t / `loss_scale_div`, w_t the token's weight in the aggregation.
///
/// Stats: `pg_loss` is the same aggregation of pg alone (not divided); `kl`, `clip_frac` and
/// `ratio_mean` are masked token means; `n_tokens` = Σ m_t.
pub fn grpo_loss<R: Real>(
    tokens: &GrpoTokens<'_, [R], [u32]>,
    dlogp: &mut [R],
    cfg: &GrpoLossCfg,
) -> GrpoStats<R> {
    let GrpoTokens {
        logp,
        old_logp,
        ref_logp,
        adv,
        mask,
        seq_id,
        n_tok,
        n_seq,
    } = *tokens;
    let lo = R::one() - R::from_f64(cfg.clip_low as f64);
    let hi = R::one() + R::from_f64(cfg.clip_high as f64);
    let kl_coef = R::from_f64(cfg.kl_coef as f64);
    let lim = R::from_f64(20.0);
    let mut seq_cnt = vec![R::zero(); n_seq];
    let mut total = R::zero();
    for t in 0..n_tok {
        seq_cnt[seq_id[t] as usize] += mask[t];
        total += mask[t];
    }
    let agg = Aggregation::new(cfg, seq_cnt, total);
    let div = agg.div();
    let mut st = GrpoStats {
        n_tokens: total,
        ..Default::default()
    };
    for t in 0..n_tok {
        let w = agg.token_weight(seq_id[t] as usize, mask[t]);
        if w == R::zero() {
            dlogp[t] = R::zero();
            continue;
        }
        let m = mask[t];
        let a = adv[t];
        let raw = logp[t] - old_logp[t];
        let r = raw.clamp(-lim, lim).exp();
        let dr = if raw >= -lim && raw <= lim {
            r
        } else {
            R::zero()
        };
        let unclipped = -a * r;
        let clipped = -a * r.clamp(lo, hi);
        let (pg, dpg) = if unclipped >= clipped {
            (unclipped, -a * dr)
        } else {
            (clipped, R::zero())
        };
        let (kl, dkl) = kl_term(cfg.kl_kind, logp[t], ref_logp[t]);
        st.loss += w * (pg + kl_coef * kl);
        st.pg_loss += w * pg;
        st.kl += m * kl;
        if clipped > unclipped {
            st.clip_frac += m;
        }
        st.ratio_mean += m * r;
        dlogp[t] = w * (dpg + kl_coef * dkl) / div;
    }
    st.loss /= div;
    st.kl = agg.token_mean(st.kl);
    st.clip_frac = agg.token_mean(st.clip_frac);
    st.ratio_mean = agg.token_mean(st.ratio_mean);
    st
}

// ------------------------------------------------------------------------------------ AdamW

/// Hyper-parameters of [`adamw`] in R.
#[derive(Clone, Copy, Debug)]
pub struct AdamW<R> {
    pub lr: R,
    pub beta1: R,
    pub beta2: R,
    pub eps: R,
    pub weight_decay: R,
    pub step: u64,
    pub grad_scale: R,
}

/// One AdamW step: g = grad·scale; m = b1 m + (1−b1) g; v = b2 v + (1−b2) g²;
/// p −= lr·(m̂/(sqrt(v̂)+eps) + wd·p).
pub fn adamw<R: Real>(p: &mut [R], grad: &[R], m: &mut [R], v: &mut [R], n: usize, hp: &AdamW<R>) {
    let t = hp.step.min(i32::MAX as u64) as i32;
    let bc1 = R::one() - R::from_f64(hp.beta1.to_f64().powi(t));
    let bc2 = R::one() - R::from_f64(hp.beta2.to_f64().powi(t));
    for i in 0..n {
        let g = grad[i] * hp.grad_scale;
        m[i] = hp.beta1 * m[i] + (R::one() - hp.beta1) * g;
        v[i] = hp.beta2 * v[i] + (R::one() - hp.beta2) * g * g;
        let mh = m[i] / bc1;
        let vh = v[i] / bc2;
        p[i] -= hp.lr * (mh / (vh.sqrt() + hp.eps) + hp.weight_decay * p[i]);
    }
}

// ------------------------------------------------------------------------------------ sampling

/// splitmix64 (Steele, Lea, Flood 2014), the mixing function of the sampling RNG:
/// `z += 0x9E3779B97F4A7C15; z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9;
/// z = (z ^ (z >> 27)) * 0x94D049BB133111EB; z ^ (z >> 31)` (wrapping u64 arithmetic).
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The uniform draw of a [`sample_row`] call at stream counter `counter` (a draw's offset): the
/// top 24 bits of `splitmix64(seed ^ splitmix64(counter))` divided by 2^24, so u ∈ [0, 1) and
/// depends only on (seed, counter). The CUDA sampler reproduces exactly this function.
pub fn sample_uniform(seed: u64, counter: u64) -> f64 {
    let bits = splitmix64(seed ^ splitmix64(counter)) >> 40;
    bits as f64 / (1u64 << 24) as f64
}

/// Sample one token from one row of logits.
///
/// - `temperature == 0`: argmax (lowest index on ties); `u` unused.
/// - else p = softmax(z / temperature) over the candidates; candidates are all tokens sorted
///   by descending logit (ties: lower index first), cut to the first `top_k` when `top_k > 0`,
///   then to the smallest prefix whose cumulative probability (renormalised over the top-k set)
///   reaches `top_p` (always at least one token); the pick is the first candidate whose
///   cumulative probability exceeds `u · Σ kept` (inverse CDF, accumulated in f64).
///
/// `logits` must not hold NaN (checked by the caller).
pub fn sample_row(logits: &[f32], temperature: f32, top_p: f32, top_k: usize, u: f64) -> u32 {
    let vocab = logits.len();
    if temperature == 0.0 {
        let mut best = 0;
        for (i, &z) in logits.iter().enumerate() {
            if z > logits[best] {
                best = i;
            }
        }
        return best as u32;
    }
    let mut idx: Vec<u32> = (0..vocab as u32).collect();
    idx.sort_by(|&a, &b| {
        logits[b as usize]
            .partial_cmp(&logits[a as usize])
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.cmp(&b))
    });
    if top_k > 0 && top_k < vocab {
        idx.truncate(top_k);
    }
    let inv_t = 1.0 / temperature as f64;
    let zmax = logits[idx[0] as usize] as f64 * inv_t;
    let probs: Vec<f64> = idx
        .iter()
        .map(|&i| (logits[i as usize] as f64 * inv_t - zmax).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    // Nucleus: smallest prefix with cumulative probability >= top_p.
    let target = top_p as f64 * total;
    let mut keep = probs.len();
    let mut cum = 0.0;
    for (i, &p) in probs.iter().enumerate() {
        cum += p;
        if cum >= target {
            keep = i + 1;
            break;
        }
    }
    let kept: f64 = probs[..keep].iter().sum();
    let thresh = u * kept;
    let mut cum = 0.0;
    for (i, &p) in probs[..keep].iter().enumerate() {
        cum += p;
        if cum > thresh {
            return idx[i];
        }
    }
    idx[keep - 1]
}
