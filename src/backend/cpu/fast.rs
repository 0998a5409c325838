//! The fast f32 paths of the CPU ops: multi-threaded (a rayon pool), blocked, and checked
//! against the generic [`super::math`] (which stays the oracle, run in f64 by the
//! finite-difference tests) by `tests/cpu_ops.rs`.
//!
//! - GEMMs: the `gemm` crate's single-threaded f32 kernels (AVX-512 where the CPU has it, else
//!   AVX2/FMA, chosen at run time) on disjoint row (or column) blocks of C,
//!   one block per thread. The reduction over k is the same whatever the split, so a GEMM gives
//!   the same bits for every thread count. `x · wᵀ` (a linear's forward) transposes w once
//!   first: the kernels gather a k-contiguous operand element by element while packing it.
//! - Vocabulary ops (lm_head + log-softmax): tiles of [`LP_ROWS`] rows × [`LP_VT`] vocabulary
//!   columns, in parallel over the vocabulary tiles; each tile transposes only its slice of the
//!   lm_head weight, and the log-sum-exp is combined across tiles (online softmax). The [n_tok,
//!   vocab] logits are never formed.
//! - Exponentials (log-softmax, attention, SwiGLU): `exp_f32`, a branch-free polynomial, in
//!   loops with explicit lanes, compiled for AVX-512, AVX2 or plain code (chosen at run time).
//! - Attention: flash-attention style (Dao et al. 2022, "FlashAttention", arXiv:2205.14135;
//!   Dao 2023, "FlashAttention-2", arXiv:2307.08691): tiles of [`BQ`] queries × [`BK`] keys, in
//!   parallel over (sequence, head, query block) for the forward and dq, and over
//!   (sequence, kv head, key block) for dk and dv, so no [seq, seq] matrix and no atomics.
//! - Row ops: fixed-size chunks of rows in parallel; reductions across rows (RMSNorm's dw) sum
//!   per-chunk partials in chunk order.
//!
//! Every partition depends on the shapes only, never on the thread count, so results are
//! bit-identical for every thread count (tested in `tests/cpu_ops.rs`).
//!
//! Threads: [`set_num_threads`], else `TOOLN1_NUM_THREADS`, else `RAYON_NUM_THREADS`, else the
//! available parallelism.

use std::cell::RefCell;
use std::sync::{Arc, Mutex, RwLock};

use rayon::prelude::*;

use super::math::{self, Gemm};
use crate::backend::{
    AttnGrads, AttnSaved, Cached, GemmDims, Heads, LinearGrads, LmHead, LogprobsGrads, LogprobsOut,
    NormDims, NormGrads, NormOut, Qkv, RopeRows, VocabDims,
};

// ------------------------------------------------------------------------------------ threads

static POOL: RwLock<Option<Arc<rayon::ThreadPool>>> = RwLock::new(None);

/// The thread count used when none was set: `TOOLN1_NUM_THREADS`, else `RAYON_NUM_THREADS`
/// (positive integers; anything else is ignored), else the available parallelism.
pub fn default_num_threads() -> usize {
    for var in ["TOOLN1_NUM_THREADS", "RAYON_NUM_THREADS"] {
        if let Some(n) = std::env::var(var)
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .filter(|&n| n > 0)
        {
            return n;
        }
    }
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn build_pool(n: usize) -> Arc<rayon::ThreadPool> {
    Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .thread_name(|i| format!("tooln1-cpu-{i}"))
            .build()
            .expect("tooln1: cannot start the CPU thread pool"),
    )
}

/// Use `n` threads for the CPU backend from now on (0: [`default_num_threads`]). Ops already
/// running finish on the previous pool.
pub fn set_num_threads(n: usize) {
    let n = if n == 0 { default_num_threads() } else { n };
    *POOL.write().unwrap_or_else(|e| e.into_inner()) = Some(build_pool(n));
}

/// The number of threads the CPU backend uses.
pub fn num_threads() -> usize {
    pool().current_num_threads()
}

fn pool() -> Arc<rayon::ThreadPool> {
    if let Some(p) = POOL.read().unwrap_or_else(|e| e.into_inner()).as_ref() {
        return p.clone();
    }
    let mut w = POOL.write().unwrap_or_else(|e| e.into_inner());
    w.get_or_insert_with(|| build_pool(default_num_threads()))
        .clone()
}

/// Run `f` on the CPU backend's pool (its parallel iterators use that pool).
pub fn run<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    pool().install(f)
}

// ------------------------------------------------------------------------------------ scratch

thread_local! {
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Run `f` on this thread's scratch buffer of at least `n` elements (contents unspecified);
/// kept between calls, so the hot loops do not allocate. Not re-entrant.
fn with_scratch<T>(n: usize, f: impl FnOnce(&mut [f32]) -> T) -> T {
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < n {
            s.resize(n, 0.0);
        }
        f(&mut s[..n])
    })
}

/// Buffers shared by the tasks of one op, reused across calls (taken out while in use, so
/// concurrent callers each get their own).
static SHARED: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());

fn take_buf(n: usize) -> Vec<f32> {
    let mut v = SHARED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .pop()
        .unwrap_or_default();
    if v.len() < n {
        v.resize(n, 0.0);
    }
    v
}

fn give_buf(v: Vec<f32>) {
    let mut s = SHARED.lock().unwrap_or_else(|e| e.into_inner());
    if s.len() < 8 {
        s.push(v);
    }
}

/// A raw pointer that tasks writing disjoint elements of one buffer may share.
#[derive(Clone, Copy)]
struct Ptr(*mut f32);
// SAFETY: every use writes element sets that are disjoint between tasks (documented at each
// use), and the buffer outlives the parallel section.
unsafe impl Send for Ptr {}
unsafe impl Sync for Ptr {}

impl Ptr {
    /// The pointer (a method, so that closures capture the whole `Ptr`, which is `Send`).
    fn get(self) -> *mut f32 {
        self.0
    }
}

// ------------------------------------------------------------------------------------ vector math

/// Lanes of the explicit-lane loops below: sums over a row accumulate in this many partial sums
/// (lane j takes elements j, j + LANES, ...), added in lane order at the end, so the bits
/// depend on the row length only and not on the vector width the CPU offers.
const LANES: usize = 16;

/// 0: plain code; 1: AVX2 + FMA; 2: AVX-512 (detected once).
#[cfg(target_arch = "x86_64")]
fn simd_level() -> u8 {
    use std::sync::atomic::{AtomicU8, Ordering};
    static LEVEL: AtomicU8 = AtomicU8::new(u8::MAX);
    let l = LEVEL.load(Ordering::Relaxed);
    if l != u8::MAX {
        return l;
    }
    let l = if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vl") {
        2
    } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        1
    } else {
        0
    };
    LEVEL.store(l, Ordering::Relaxed);
    l
}

/// Defines `fn name(args) -> ret` that runs `body` compiled for AVX-512 or AVX2 where the CPU
/// has them (chosen at run time), else as plain code. Rust never fuses a multiply and an add
/// on its own, so every variant computes the same bits.
macro_rules! simd_fn {
    ($(#[$m:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        simd_fn! { $(#[$m])* fn $name($($arg: $ty),*) -> () $body }
    };
    ($(#[$m:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty $body:block) => {
        $(#[$m])*
        fn $name($($arg: $ty),*) -> $ret {
            #[inline(always)]
            fn imp($($arg: $ty),*) -> $ret $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                unsafe fn v4($($arg: $ty),*) -> $ret {
                    imp($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($arg: $ty),*) -> $ret {
                    imp($($arg),*)
                }
                match simd_level() {
                    // SAFETY: the CPU has the features these variants were compiled for.
                    2 => return unsafe { v4($($arg),*) },
                    1 => return unsafe { v3($($arg),*) },
                    _ => {}
                }
            }
            imp($($arg),*)
        }
    };
}

/// `e^x` in f32 with no branches and no calls, so that loops over it vectorize: Cody-Waite
/// reduction x = n·ln 2 + r (|r| <= ln 2 / 2), the degree-6 polynomial of Cephes' `expf` for
/// e^r (about 1 ulp), and 2^n put into the exponent bits. Below ln(2^-126) it returns 0 (so
/// e^-inf = 0); above ln(f32::MAX) it returns inf; NaN stays NaN.
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    const LO: f32 = -87.336_55;
    const HI: f32 = 88.722_84;
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 · 2^23: adding it rounds to an integer, which lands in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    let xc = x.clamp(LO, HI);
    let t = xc * LOG2E + MAGIC;
    let n = t - MAGIC;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_2e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    p = p * (r * r) + r + 1.0;
    // t's low bits hold n + 0x400000; (n + 127) << 23 is 2^n (the high bits shift out).
    let scale = f32::from_bits(t.to_bits().wrapping_add(127) << 23);
    if x < LO {
        0.0
    } else {
        p * scale
    }
}

/// Sums the lanes of `a` in lane order.
#[inline(always)]
fn lane_sum(a: &[f32; LANES]) -> f32 {
    a.iter().fold(0.0, |s, &x| s + x)
}

/// The largest element (ignoring NaN, as `f32::max` does), from `init`.
#[inline(always)]
fn row_max(z: &[f32], init: f32) -> f32 {
    let mut m = [init; LANES];
    let mut ch = z.chunks_exact(LANES);
    for c in &mut ch {
        for j in 0..LANES {
            m[j] = m[j].max(c[j]);
        }
    }
    for (j, &v) in ch.remainder().iter().enumerate() {
        m[j] = m[j].max(v);
    }
    m.iter().fold(init, |a, &b| a.max(b))
}

simd_fn! {
    /// A row's (max, Σ e^(z − max), Σ e^(z − max)·z); the last is 0 unless `want_pz`.
    fn softmax_stats(z: &[f32], want_pz: bool) -> (f32, f32, f32) {
        let mx = row_max(z, f32::NEG_INFINITY);
        let (mut s, mut pz) = ([0.0f32; LANES], [0.0f32; LANES]);
        let mut ch = z.chunks_exact(LANES);
        if want_pz {
            for c in &mut ch {
                for j in 0..LANES {
                    let e = exp_f32(c[j] - mx);
                    s[j] += e;
                    pz[j] += e * c[j];
                }
            }
            for (j, &v) in ch.remainder().iter().enumerate() {
                let e = exp_f32(v - mx);
                s[j] += e;
                pz[j] += e * v;
            }
        } else {
            for c in &mut ch {
                for j in 0..LANES {
                    s[j] += exp_f32(c[j] - mx);
                }
            }
            for (j, &v) in ch.remainder().iter().enumerate() {
                s[j] += exp_f32(v - mx);
            }
        }
        (mx, lane_sum(&s), lane_sum(&pz))
    }
}

simd_fn! {
    /// `z = −g · e^(z − l)` element-wise.
    fn neg_scaled_exp(z: &mut [f32], g: f32, l: f32) {
        for v in z.iter_mut() {
            *v = -g * exp_f32(*v - l);
        }
    }
}

simd_fn! {
    /// One online-softmax step of an attention row: the new max m = max(m_prev, row[c0..c1]),
    /// row[c0..c1] = e^(row − m), zeros elsewhere; returns (m, Σ row[c0..c1]).
    fn attn_row_exp(row: &mut [f32], c0: usize, c1: usize, m_prev: f32) -> (f32, f32) {
        let mx = row_max(&row[c0..c1], m_prev);
        let mut s = [0.0f32; LANES];
        let mut ch = row[c0..c1].chunks_exact_mut(LANES);
        for c in &mut ch {
            for j in 0..LANES {
                c[j] = exp_f32(c[j] - mx);
                s[j] += c[j];
            }
        }
        for (j, v) in ch.into_remainder().iter_mut().enumerate() {
            *v = exp_f32(*v - mx);
            s[j] += *v;
        }
        row[..c0].fill(0.0);
        row[c1..].fill(0.0);
        (mx, lane_sum(&s))
    }
}

simd_fn! {
    /// One row of the attention backward: p[c0..c1] = e^(p − l), ds[c0..c1] = p·(ds − d),
    /// zeros elsewhere in both.
    fn attn_row_bwd(p: &mut [f32], ds: &mut [f32], c0: usize, c1: usize, l: f32, d: f32) {
        for (pv, dv) in p[c0..c1].iter_mut().zip(&mut ds[c0..c1]) {
            *pv = exp_f32(*pv - l);
            *dv = *pv * (*dv - d);
        }
        p[..c0].fill(0.0);
        ds[..c0].fill(0.0);
        p[c1..].fill(0.0);
        ds[c1..].fill(0.0);
    }
}

simd_fn! {
    /// `dst[c, r] = src[r, c]` for `src` of `rows` × `cols` with row stride `ld` (dst is
    /// `cols` × `rows`, packed), in 16 × 16 blocks.
    fn transpose(src: &[f32], rows: usize, cols: usize, ld: usize, dst: &mut [f32]) {
        const B: usize = 16;
        assert!(ld >= cols && dst.len() >= rows * cols);
        assert!(rows == 0 || src.len() >= (rows - 1) * ld + cols);
        for r0 in (0..rows).step_by(B) {
            let r1 = (r0 + B).min(rows);
            for c0 in (0..cols).step_by(B) {
                if r1 - r0 == B && c0 + B <= cols {
                    // A whole block through fixed-size arrays (no bounds checks, vector loads
                    // and stores).
                    let mut t = [[0.0f32; B]; B];
                    for (i, tr) in t.iter_mut().enumerate() {
                        tr.copy_from_slice(&src[(r0 + i) * ld + c0..][..B]);
                    }
                    for c in 0..B {
                        let mut col = [0.0f32; B];
                        for (i, v) in col.iter_mut().enumerate() {
                            *v = t[i][c];
                        }
                        dst[(c0 + c) * rows + r0..][..B].copy_from_slice(&col);
                    }
                    continue;
                }
                for c in c0..(c0 + B).min(cols) {
                    let d = &mut dst[c * rows + r0..c * rows + r1];
                    for (i, dv) in d.iter_mut().enumerate() {
                        *dv = src[(r0 + i) * ld + c];
                    }
                }
            }
        }
    }
}

/// [`transpose`] (packed `src`) in parallel over blocks of 64 columns of `src` (rows of `dst`).
fn transpose_par(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    const CB: usize = 64;
    dst[..rows * cols]
        .par_chunks_mut(CB * rows)
        .enumerate()
        .for_each(|(b, d)| {
            let (c0, nc) = (b * CB, d.len() / rows.max(1));
            transpose(&src[c0..], rows, nc, cols, d);
        });
}

// ------------------------------------------------------------------------------------ GEMM

/// Single-threaded `C = alpha·A·B + beta·C` on raw pointers, shapes and strides in `g` (beta = 0
/// overwrites C).
///
/// # Safety
/// Every element the strides reach must be in bounds, and C must not alias A or B.
unsafe fn sgemm(g: Gemm, alpha: f32, a: *const f32, b: *const f32, beta: f32, c: *mut f32) {
    let Gemm {
        m,
        k,
        n,
        rsa,
        csa,
        rsb,
        csb,
        rsc,
        csc,
    } = g;
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        for i in 0..m {
            for j in 0..n {
                let x = c.add(i * rsc + j * csc);
                *x = if beta == 0.0 { 0.0 } else { *x * beta };
            }
        }
        return;
    }
    // gemm computes dst = alpha_dst * dst + beta_ab * (lhs · rhs), reading dst only when asked;
    // its strides are (column stride, row stride).
    gemm::gemm(
        m,
        n,
        k,
        c,
        csc as isize,
        rsc as isize,
        beta != 0.0,
        a,
        csa as isize,
        rsa as isize,
        b,
        csb as isize,
        rsb as isize,
        beta,
        alpha,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

/// Below this many multiply-adds a GEMM runs on the calling thread.
const PAR_GEMM_MIN: usize = 1 << 18;

/// Rows (or columns) of C per parallel block of a GEMM. Fixed, so that the sub-GEMMs, and
/// therefore the bits of C, depend on the shapes only and never on the thread count (the
/// kernels' reduction over k may depend on a call's m and n).
const GEMM_BLOCK: usize = 256;

/// Multi-threaded [`math::Real::gemm_raw`] for f32: C split into blocks of [`GEMM_BLOCK`] rows
/// (or columns, whichever dimension is larger; two halves when that dimension is at most
/// [`GEMM_BLOCK`]), the blocks in parallel.
pub fn gemm(g: Gemm, alpha: f32, a: &[f32], b: &[f32], beta: f32, c: &mut [f32]) {
    g.check(a, b, c);
    let (ap, bp, cp) = (a.as_ptr(), b.as_ptr(), Ptr(c.as_mut_ptr()));
    let split_m = g.m >= g.n;
    let len = if split_m { g.m } else { g.n };
    let work = g.m * g.n * g.k;
    // Up to GEMM_BLOCK, a GEMM with work for two threads (a 256 x 256 weight gradient over
    // 1,024 tokens) is split in two halves; a smaller one runs on the calling thread.
    let halves = len > GEMM_BLOCK / 2 && work >= 2 * PAR_GEMM_MIN;
    if work < PAR_GEMM_MIN || (len <= GEMM_BLOCK && !halves) {
        // SAFETY: `check` proved every reached element in bounds; c is a distinct &mut.
        unsafe { sgemm(g, alpha, ap, bp, beta, cp.get()) };
        return;
    }
    let block = if len <= GEMM_BLOCK {
        len.div_ceil(2).next_multiple_of(16)
    } else {
        GEMM_BLOCK
    };
    let parts = len.div_ceil(block);
    let (ap, bp) = (ap as usize, bp as usize);
    (0..parts).into_par_iter().for_each(move |p| {
        let lo = p * block;
        let hi = (lo + block).min(len);
        if lo >= hi {
            return;
        }
        let (a, b) = (ap as *const f32, bp as *const f32);
        // SAFETY: a sub-block of a GEMM whose whole extent `check` proved in bounds; the
        // blocks write disjoint rows (or columns) of C.
        unsafe {
            if split_m {
                sgemm(
                    Gemm { m: hi - lo, ..g },
                    alpha,
                    a.add(lo * g.rsa),
                    b,
                    beta,
                    cp.get().add(lo * g.rsc),
                )
            } else {
                sgemm(
                    Gemm { n: hi - lo, ..g },
                    alpha,
                    a,
                    b.add(lo * g.csb),
                    beta,
                    cp.get().add(lo * g.csc),
                )
            }
        }
    });
}

/// From this many rows of x, [`matmul_nt`] transposes w first.
const NT_TRANSPOSE_MIN_ROWS: usize = 32;
/// The most elements of w that [`matmul_nt`] transposes at once (64 MiB); a larger w goes in
/// slabs of rows.
const NT_SLAB_ELEMS: usize = 1 << 24;

/// `y[m,n] = x[m,k] · w[n,k]ᵀ + beta · y`. The GEMM kernels want w with unit stride along n:
/// given w as stored (unit stride along k) they gather it while packing, element by element,
/// once per block of C; from `NT_TRANSPOSE_MIN_ROWS` rows w is transposed once instead (in
/// slabs of at most `NT_SLAB_ELEMS`), and the blocks read the transposed copy.
pub fn matmul_nt(x: &[f32], w: &[f32], y: &mut [f32], m: usize, n: usize, k: usize, beta: f32) {
    if m >= NT_TRANSPOSE_MIN_ROWS && n > 0 && k > 0 {
        assert!(x.len() >= m * k && w.len() >= n * k && y.len() >= m * n);
        let slab = ((NT_SLAB_ELEMS / k) / GEMM_BLOCK * GEMM_BLOCK)
            .max(GEMM_BLOCK)
            .min(n);
        let mut wt = take_buf(slab * k);
        let mut n0 = 0;
        while n0 < n {
            let nn = slab.min(n - n0);
            transpose_par(&w[n0 * k..(n0 + nn) * k], nn, k, &mut wt[..nn * k]);
            let g = Gemm {
                m,
                k,
                n: nn,
                rsa: k,
                csa: 1,
                rsb: nn,
                csb: 1,
                rsc: n,
                csc: 1,
            };
            gemm(g, 1.0, x, &wt[..nn * k], beta, &mut y[n0..]);
            n0 += nn;
        }
        give_buf(wt);
        return;
    }
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
    gemm(g, 1.0, x, w, beta, y);
}

/// `y[m,n] = x[m,k] · w[n,k]ᵀ (+ bias[n])`
pub fn linear(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    y: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
) {
    matmul_nt(x, w, y, m, n, k, 0.0);
    if let Some(b) = bias {
        y[..m * n].par_chunks_mut(n).for_each(|row| {
            for (yv, &bv) in row.iter_mut().zip(&b[..n]) {
                *yv += bv;
            }
        });
    }
}

/// dx (=, or += when `accumulate_dx`) dy·w; dw += dyᵀ·x; dbias += Σ_m dy (rows summed in
/// order, columns in parallel).
pub fn linear_bwd(
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    grads: LinearGrads<'_, [f32], [f32]>,
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
        let beta = if accumulate_dx { 1.0 } else { 0.0 };
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
        gemm(g, 1.0, dy, w, beta, dx);
    }
    if let Some(dw) = dw {
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
        gemm(g, 1.0, dy, x, 1.0, dw);
    }
    if let Some(db) = dbias {
        const COLS: usize = 256;
        db[..n]
            .par_chunks_mut(COLS)
            .enumerate()
            .for_each(|(c, dbc)| {
                for row in dy[..m * n].chunks_exact(n) {
                    for (d, &g) in dbc.iter_mut().zip(&row[c * COLS..]) {
                        *d += g;
                    }
                }
            });
    }
}

// ------------------------------------------------------------------------------------ vocabulary

/// Rows of a vocabulary tile (the row block the lm_head weight tiles are streamed against).
/// The GEMM packs (transposes) its slice of the lm_head weight once per row block, so a tall
/// block packs the weight fewer times: 1024 rows measured 6-8% less CPU time for forward +
/// backward than 256 at hidden 896, vocab 32000, 1024 tokens, on one thread.
pub const LP_ROWS: usize = 1024;
/// Vocabulary columns of a tile.
pub const LP_VT: usize = 512;
/// The backward sums dh over this many groups of vocabulary tiles (fixed, so the result does
/// not depend on the thread count).
const LP_GROUPS: usize = 8;

/// A vocabulary tile: `rows` hidden rows of width `dim` against the `vn` vocabulary rows of
/// the lm_head weight from `v0`.
#[derive(Clone, Copy)]
struct VocabTile {
    rows: usize,
    dim: usize,
    v0: usize,
    vn: usize,
}

/// `z[rows, vn] = h[rows, dim] · w[v0..v0+vn, dim]ᵀ · inv_t` on this thread (the GEMM's alpha,
/// so the tile is scaled as it is written; alpha = 1 is the plain product); `wt` is scratch
/// for the transposed weight slice.
fn tile_logits(h: &[f32], w: &[f32], (z, wt): (&mut [f32], &mut [f32]), t: VocabTile, inv_t: f32) {
    let VocabTile { rows, dim, v0, vn } = t;
    assert!(h.len() >= rows * dim && w.len() >= (v0 + vn) * dim && z.len() >= rows * vn);
    // The weight slice transposed to [dim, vn] (unit stride along the vocabulary, which the
    // GEMM kernels read without packing).
    transpose(&w[v0 * dim..(v0 + vn) * dim], vn, dim, dim, wt);
    // SAFETY: bounds asserted above (wt by `transpose`); z is a distinct &mut.
    unsafe {
        sgemm(
            Gemm {
                m: rows,
                k: dim,
                n: vn,
                rsa: dim,
                csa: 1,
                rsb: vn,
                csb: 1,
                rsc: vn,
                csc: 1,
            },
            inv_t,
            h.as_ptr(),
            wt.as_ptr(),
            0.0,
            z.as_mut_ptr(),
        )
    }
}

/// Fused lm_head + log-softmax + gather at inverse temperature `inv_t` (see
/// [`math::logprobs`]).
///
/// With `kept` ([n_tok * vocab]), each tile's scaled logits are written there instead of
/// scratch, for [`logprobs_bwd`]: row block b (rows t0..t0+rows) holds its tiles one after the
/// other from t0 * vocab, tile i ([rows, vn], row-major) from t0 * vocab + i * LP_VT * rows.
pub fn logprobs(
    head: LmHead<'_, [f32], [u32]>,
    out: LogprobsOut<'_, [f32]>,
    d: VocabDims,
    inv_t: f32,
    mut kept: Option<&mut [f32]>,
) {
    let (LmHead { h, w, targets }, VocabDims { n_tok, dim, vocab }) = (head, d);
    let LogprobsOut {
        logp,
        lse,
        mut entropy,
    } = out;
    let n_tiles = vocab.div_ceil(LP_VT);
    let want_ent = entropy.is_some();
    // Per (tile, row): max, Σ exp(z − max), Σ exp(z − max)·z, z[target] (NaN if elsewhere).
    let mut stats = take_buf(n_tiles * LP_ROWS * 4);
    let mut t0 = 0;
    while t0 < n_tok {
        let rows = LP_ROWS.min(n_tok - t0);
        let hb = &h[t0 * dim..(t0 + rows) * dim];
        let tg = &targets[t0..t0 + rows];
        let kept_b = kept
            .as_deref_mut()
            .map(|k| Ptr(k[t0 * vocab..(t0 + rows) * vocab].as_mut_ptr()));
        stats[..n_tiles * LP_ROWS * 4]
            .par_chunks_mut(LP_ROWS * 4)
            .enumerate()
            .for_each(|(tile, st)| {
                let v0 = tile * LP_VT;
                let vn = LP_VT.min(vocab - v0);
                let keep = kept_b.map(|k| {
                    // SAFETY: tile `tile` of this row block owns rows * vn entries from
                    // v0 * rows, inside the block's rows * vocab (asserted by the caller's
                    // slice above); tiles never overlap.
                    unsafe { std::slice::from_raw_parts_mut(k.get().add(v0 * rows), rows * vn) }
                });
                let scratch = if keep.is_some() {
                    dim * vn
                } else {
                    rows * vn + dim * vn
                };
                with_scratch(scratch, |buf| {
                    let (z, wt) = match keep {
                        Some(k) => (k, buf),
                        None => buf.split_at_mut(rows * vn),
                    };
                    tile_logits(hb, w, (&mut *z, wt), VocabTile { rows, dim, v0, vn }, inv_t);
                    for r in 0..rows {
                        let zr = &z[r * vn..(r + 1) * vn];
                        let (mx, s, pz) = softmax_stats(zr, want_ent);
                        let t = tg[r] as usize;
                        let zt = if (v0..v0 + vn).contains(&t) {
                            zr[t - v0]
                        } else {
                            f32::NAN
                        };
                        st[r * 4..r * 4 + 4].copy_from_slice(&[mx, s, pz, zt]);
                    }
                });
            });
        let stats = &stats;
        let ent = entropy.as_deref_mut().map(|e| &mut e[t0..t0 + rows]);
        let lse_b = &mut lse[t0..t0 + rows];
        let lp_b = &mut logp[t0..t0 + rows];
        let combine = |r: usize| -> (f32, f32, f32) {
            let at = |tile: usize, f: usize| stats[(tile * LP_ROWS + r) * 4 + f];
            let mx = (0..n_tiles).fold(f32::NEG_INFINITY, |m, t| m.max(at(t, 0)));
            let (mut s, mut pz, mut zt) = (0.0f32, 0.0f32, f32::NAN);
            for t in 0..n_tiles {
                let c = (at(t, 0) - mx).exp();
                s += at(t, 1) * c;
                pz += at(t, 2) * c;
                if !at(t, 3).is_nan() {
                    zt = at(t, 3);
                }
            }
            let l = mx + s.ln();
            (l, zt - l, l - pz / s)
        };
        match ent {
            Some(e) => {
                for r in 0..rows {
                    let (l, lp, en) = combine(r);
                    (lse_b[r], lp_b[r], e[r]) = (l, lp, en);
                }
            }
            None => {
                for r in 0..rows {
                    let (l, lp, _) = combine(r);
                    (lse_b[r], lp_b[r]) = (l, lp);
                }
            }
        }
        t0 += rows;
    }
    give_buf(stats);
}

/// Backward of [`logprobs`] (see [`math::logprobs_bwd`]): dh overwritten, dw accumulated.
/// With `kept` (the logits [`logprobs`] kept for the same inputs), each tile's logits are
/// copied from there instead of recomputed: the same values, so the same result bit for bit.
pub fn logprobs_bwd(
    dlogp: &[f32],
    head: LmHead<'_, [f32], [u32]>,
    saved: (&[f32], Option<&[f32]>),
    grads: LogprobsGrads<'_, [f32], [f32]>,
    d: VocabDims,
    inv_t: f32,
) {
    let (lse, kept) = saved;
    let (LmHead { h, w, targets }, VocabDims { n_tok, dim, vocab }) = (head, d);
    let LogprobsGrads { dh, dw } = grads;
    let n_tiles = vocab.div_ceil(LP_VT);
    let groups = LP_GROUPS.min(n_tiles);
    let per_group = n_tiles.div_ceil(groups);
    if let Some(d) = &dw {
        assert!(d.len() >= vocab * dim);
    }
    let dwp = dw.map(|d| Ptr(d.as_mut_ptr()));
    let mut parts = take_buf(groups * LP_ROWS * dim);
    let mut t0 = 0;
    while t0 < n_tok {
        let rows = LP_ROWS.min(n_tok - t0);
        let hb = &h[t0 * dim..(t0 + rows) * dim];
        parts[..groups * LP_ROWS * dim]
            .par_chunks_mut(LP_ROWS * dim)
            .enumerate()
            .for_each(|(gi, part)| {
                let tiles = gi * per_group..((gi + 1) * per_group).min(n_tiles);
                part[..rows * dim].fill(0.0);
                for tile in tiles {
                    let v0 = tile * LP_VT;
                    let vn = LP_VT.min(vocab - v0);
                    let scratch = if kept.is_some() {
                        rows * vn
                    } else {
                        rows * vn + dim * vn
                    };
                    with_scratch(scratch, |buf| {
                        let (z, wt) = buf.split_at_mut(rows * vn);
                        match kept {
                            Some(k) => {
                                let at = t0 * vocab + v0 * rows;
                                z.copy_from_slice(&k[at..at + rows * vn]);
                            }
                            None => {
                                let t = VocabTile { rows, dim, v0, vn };
                                tile_logits(hb, w, (&mut *z, wt), t, inv_t)
                            }
                        }
                        for r in 0..rows {
                            let t = t0 + r;
                            // The chain rule through z·inv_t (exact at inv_t = 1).
                            let (g, l) = (dlogp[t] * inv_t, lse[t]);
                            let zr = &mut z[r * vn..(r + 1) * vn];
                            neg_scaled_exp(zr, g, l);
                            let tg = targets[t] as usize;
                            if (v0..v0 + vn).contains(&tg) {
                                zr[tg - v0] += g;
                            }
                        }
                        // SAFETY: z is [rows, vn], w rows v0..v0+vn and part [rows, dim] are
                        // in bounds; dw rows v0..v0+vn belong to this tile alone.
                        unsafe {
                            sgemm(
                                Gemm {
                                    m: rows,
                                    k: vn,
                                    n: dim,
                                    rsa: vn,
                                    csa: 1,
                                    rsb: dim,
                                    csb: 1,
                                    rsc: dim,
                                    csc: 1,
                                },
                                1.0,
                                z.as_ptr(),
                                w.as_ptr().add(v0 * dim),
                                1.0,
                                part.as_mut_ptr(),
                            );
                            if let Some(dwp) = dwp {
                                sgemm(
                                    Gemm {
                                        m: vn,
                                        k: rows,
                                        n: dim,
                                        rsa: 1,
                                        csa: vn,
                                        rsb: dim,
                                        csb: 1,
                                        rsc: dim,
                                        csc: 1,
                                    },
                                    1.0,
                                    z.as_ptr(),
                                    hb.as_ptr(),
                                    1.0,
                                    dwp.get().add(v0 * dim),
                                );
                            }
                        }
                    });
                }
            });
        let parts = &parts;
        dh[t0 * dim..(t0 + rows) * dim]
            .par_chunks_mut(dim)
            .enumerate()
            .for_each(|(r, dhr)| {
                dhr.copy_from_slice(&parts[r * dim..(r + 1) * dim]);
                for gi in 1..groups {
                    let p = &parts[(gi * LP_ROWS + r) * dim..][..dim];
                    for (d, &x) in dhr.iter_mut().zip(p) {
                        *d += x;
                    }
                }
            });
        t0 += rows;
    }
    give_buf(parts);
}

// ------------------------------------------------------------------------------------ attention

/// Queries per attention tile.
pub const BQ: usize = 64;
/// Keys per attention tile (equal to [`BQ`], so query and key blocks line up).
pub const BK: usize = BQ;

/// (segment, segment start, segment end, block start) of every BQ-block of every segment.
fn blocks(cu: &[u32]) -> impl Iterator<Item = (usize, usize, usize, usize)> + '_ {
    cu.windows(2).enumerate().flat_map(|(g, w)| {
        let (s, e) = (w[0] as usize, w[1] as usize);
        (s..e).step_by(BQ).map(move |b| (g, s, e, b))
    })
}

/// Which keys of a tile a query row may read: causally (key <= query, keys of its own
/// segment) or every key in rows lo..hi (a shared prefix).
#[derive(Clone, Copy)]
enum Mask {
    Causal,
    Range(usize, usize),
}

impl Mask {
    /// Valid columns c0..c1 of a tile of nk keys from j0 for query row i.
    fn cols(self, i: usize, j0: usize, nk: usize) -> (usize, usize) {
        match self {
            Mask::Causal => (0, (i + 1).saturating_sub(j0).min(nk)),
            Mask::Range(lo, hi) => {
                let c1 = hi.saturating_sub(j0).min(nk);
                (lo.saturating_sub(j0).min(c1), c1)
            }
        }
    }
}

/// Key tiles (j0, nk, mask) a query block i0..i1 of a segment starting at `start` with
/// prefix rows `pre` reads, in a fixed order: the prefix, then its own causal keys.
fn key_tiles(
    pre: std::ops::Range<usize>,
    start: usize,
    i1: usize,
) -> impl Iterator<Item = (usize, usize, Mask)> {
    let (lo, hi) = (pre.start, pre.end);
    (lo..hi)
        .step_by(BK)
        .map(move |j0| (j0, BK.min(hi - j0), Mask::Range(lo, hi)))
        .chain(
            (start..i1)
                .step_by(BK)
                .map(move |j0| (j0, BK.min(i1 - j0), Mask::Causal)),
        )
}

/// Causal GQA attention over packed sequences (see [`math::attention`]).
pub fn attention(qkv: Qkv<'_, [f32]>, out: &mut [f32], lse: &mut [f32], cu: &[u32], heads: Heads) {
    attention_prefixed(qkv, out, lse, cu, &[], heads)
}

/// Attention with a shared prefix per segment (see [`math::attention_prefixed`]): each query
/// block runs an online softmax over the prefix's key tiles, then its own causal tiles.
pub fn attention_prefixed(
    qkv: Qkv<'_, [f32]>,
    out: &mut [f32],
    lse: &mut [f32],
    cu: &[u32],
    prefix: &[u32],
    heads: Heads,
) {
    let Qkv { q, k, v } = qkv;
    let Heads {
        n_heads,
        n_kv,
        head_dim: hd,
    } = heads;
    let n_tok = *cu.last().unwrap_or(&0) as usize;
    let group = n_heads / n_kv;
    let scale = 1.0 / (hd as f32).sqrt();
    let (qs, ks) = (n_heads * hd, n_kv * hd);
    assert!(q.len() >= n_tok * qs && k.len() >= n_tok * ks && v.len() >= n_tok * ks);
    assert!(out.len() >= n_tok * qs && lse.len() >= n_tok * n_heads);
    assert!(prefix.is_empty() || prefix.len() + 2 == 2 * cu.len());
    assert!(prefix.iter().all(|&p| p as usize <= n_tok));
    let (op, lp) = (Ptr(out.as_mut_ptr()), Ptr(lse.as_mut_ptr()));
    let tasks: Vec<(usize, usize, usize, usize)> = blocks(cu).collect();
    (0..tasks.len() * n_heads)
        .into_par_iter()
        .for_each(move |ti| {
            let (seg, start, end, i0) = tasks[ti / n_heads];
            let h = ti % n_heads;
            let kh = h / group;
            let i1 = (i0 + BQ).min(end);
            let nq = i1 - i0;
            with_scratch(BQ * BK + BQ * hd + 2 * BQ, |buf| {
                let (s, rest) = buf.split_at_mut(BQ * BK);
                let (acc, rest) = rest.split_at_mut(BQ * hd);
                let (mrow, lrow) = rest.split_at_mut(BQ);
                acc[..nq * hd].fill(0.0);
                mrow.fill(f32::NEG_INFINITY);
                lrow.fill(0.0);
                for (j0, nk, mask) in key_tiles(math::prefix_range(prefix, seg), start, i1) {
                    // SAFETY: rows i0..i1 / j0..j0+nk of head h / kh are inside q / k / v
                    // (asserted above); s and acc are this task's scratch.
                    unsafe {
                        sgemm(
                            Gemm {
                                m: nq,
                                k: hd,
                                n: nk,
                                rsa: qs,
                                csa: 1,
                                rsb: 1,
                                csb: ks,
                                rsc: nk,
                                csc: 1,
                            },
                            scale,
                            q.as_ptr().add(i0 * qs + h * hd),
                            k.as_ptr().add(j0 * ks + kh * hd),
                            0.0,
                            s.as_mut_ptr(),
                        );
                    }
                    for r in 0..nq {
                        let row = &mut s[r * nk..(r + 1) * nk];
                        let (c0, c1) = mask.cols(i0 + r, j0, nk);
                        let (mx, sum) = attn_row_exp(row, c0, c1, mrow[r]);
                        let alpha = if mx == f32::NEG_INFINITY {
                            1.0
                        } else {
                            (mrow[r] - mx).exp()
                        };
                        lrow[r] = lrow[r] * alpha + sum;
                        mrow[r] = mx;
                        if alpha != 1.0 {
                            for a in acc[r * hd..(r + 1) * hd].iter_mut() {
                                *a *= alpha;
                            }
                        }
                    }
                    // SAFETY: as above.
                    unsafe {
                        sgemm(
                            Gemm {
                                m: nq,
                                k: nk,
                                n: hd,
                                rsa: nk,
                                csa: 1,
                                rsb: ks,
                                csb: 1,
                                rsc: hd,
                                csc: 1,
                            },
                            1.0,
                            s.as_ptr(),
                            v.as_ptr().add(j0 * ks + kh * hd),
                            1.0,
                            acc.as_mut_ptr(),
                        );
                    }
                }
                for r in 0..nq {
                    let i = i0 + r;
                    let inv = 1.0 / lrow[r];
                    // SAFETY: (token i, head h) belongs to this task alone.
                    unsafe {
                        let o = std::slice::from_raw_parts_mut(op.get().add(i * qs + h * hd), hd);
                        for (o, &a) in o.iter_mut().zip(&acc[r * hd..(r + 1) * hd]) {
                            *o = a * inv;
                        }
                        *lp.get().add(h * n_tok + i) = mrow[r] + lrow[r].ln();
                    }
                }
            });
        });
}

/// What every tile of the attention backward reads: q, k, v [n_tok, heads, hd], dout like q,
/// lse [n_heads, n_tok], D = rowsum(dO∘O) [n_tok, n_heads]; qs, ks the row strides of q and k,
/// `scale` the score scale.
#[derive(Clone, Copy)]
struct BwdIn<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    dout: &'a [f32],
    lse: &'a [f32],
    dd: &'a [f32],
    n_tok: usize,
    n_heads: usize,
    hd: usize,
    qs: usize,
    ks: usize,
    scale: f32,
}

/// One tile of the attention backward: for queries i0..i0+nq of head h against keys
/// j0..j0+nk, P (into `p`) and dS = P∘(dO·Vᵀ − D) (into `ds`), both [nq, nk] with P = 0 where
/// `mask` hides a key from the query.
fn bwd_tile(
    x: &BwdIn<'_>,
    (p, ds): (&mut [f32], &mut [f32]),
    (i0, nq, j0, nk): (usize, usize, usize, usize),
    (h, kh): (usize, usize),
    mask: Mask,
) {
    let BwdIn {
        q,
        k,
        v,
        dout,
        lse,
        dd,
        n_tok,
        n_heads,
        hd,
        qs,
        ks,
        scale,
    } = *x;
    // SAFETY: rows i0..i0+nq and j0..j0+nk lie inside q, dout and k, v (asserted by the
    // callers); p and ds are the task's scratch, at least [nq, nk].
    unsafe {
        sgemm(
            Gemm {
                m: nq,
                k: hd,
                n: nk,
                rsa: qs,
                csa: 1,
                rsb: 1,
                csb: ks,
                rsc: nk,
                csc: 1,
            },
            scale,
            q.as_ptr().add(i0 * qs + h * hd),
            k.as_ptr().add(j0 * ks + kh * hd),
            0.0,
            p.as_mut_ptr(),
        );
        sgemm(
            Gemm {
                m: nq,
                k: hd,
                n: nk,
                rsa: qs,
                csa: 1,
                rsb: 1,
                csb: ks,
                rsc: nk,
                csc: 1,
            },
            1.0,
            dout.as_ptr().add(i0 * qs + h * hd),
            v.as_ptr().add(j0 * ks + kh * hd),
            0.0,
            ds.as_mut_ptr(),
        );
    }
    for r in 0..nq {
        let i = i0 + r;
        let l = lse[h * n_tok + i];
        let di = dd[i * n_heads + h];
        let (c0, c1) = mask.cols(i, j0, nk);
        let (pr, dr) = (&mut p[r * nk..(r + 1) * nk], &mut ds[r * nk..(r + 1) * nk]);
        attn_row_bwd(pr, dr, c0, c1, l, di);
    }
}

/// Backward of [`attention`] (see [`math::attention_bwd`]); dq, dk, dv overwritten.
pub fn attention_bwd(
    qkv: Qkv<'_, [f32]>,
    saved: AttnSaved<'_, [f32], [f32]>,
    grads: AttnGrads<'_, [f32]>,
    cu: &[u32],
    heads: Heads,
) {
    attention_prefixed_bwd(qkv, saved, grads, cu, &[], heads)
}

/// Backward of [`attention_prefixed`] (see [`math::attention_prefixed_bwd`]); dq, dk, dv
/// overwritten. A key block's task sums, in a fixed order, its own segment's causal query
/// blocks and then every query block of each segment (in segment order) that reads it as
/// prefix, so the result does not depend on the thread count.
pub fn attention_prefixed_bwd(
    qkv: Qkv<'_, [f32]>,
    saved: AttnSaved<'_, [f32], [f32]>,
    grads: AttnGrads<'_, [f32]>,
    cu: &[u32],
    prefix: &[u32],
    heads: Heads,
) {
    let (Qkv { q, k, v }, AttnSaved { dout, out, lse }) = (qkv, saved);
    let AttnGrads { dq, dk, dv } = grads;
    let Heads {
        n_heads,
        n_kv,
        head_dim: hd,
    } = heads;
    let n_tok = *cu.last().unwrap_or(&0) as usize;
    let group = n_heads / n_kv;
    let scale = 1.0 / (hd as f32).sqrt();
    let (qs, ks) = (n_heads * hd, n_kv * hd);
    assert!(q.len() >= n_tok * qs && dout.len() >= n_tok * qs && out.len() >= n_tok * qs);
    assert!(k.len() >= n_tok * ks && v.len() >= n_tok * ks);
    assert!(dq.len() >= n_tok * qs && dk.len() >= n_tok * ks && dv.len() >= n_tok * ks);
    assert!(lse.len() >= n_tok * n_heads);
    assert!(prefix.is_empty() || prefix.len() + 2 == 2 * cu.len());
    assert!(prefix.iter().all(|&p| p as usize <= n_tok));
    // D[i, h] = dO_i · O_i
    let mut dd = take_buf(n_tok * n_heads);
    dd[..n_tok * n_heads]
        .par_chunks_mut(n_heads)
        .enumerate()
        .for_each(|(i, di)| {
            for (h, d) in di.iter_mut().enumerate() {
                let o = i * qs + h * hd;
                *d = dout[o..o + hd]
                    .iter()
                    .zip(&out[o..o + hd])
                    .map(|(a, b)| a * b)
                    .sum();
            }
        });
    let dd = &dd[..];
    let tasks: Vec<(usize, usize, usize, usize)> = blocks(cu).collect();
    let n_seg = cu.len().saturating_sub(1);
    // Segments reading each key block as (part of) their prefix, in segment order.
    let readers: Vec<Vec<usize>> = tasks
        .iter()
        .map(|&(_, _, end, j0)| {
            let j1 = (j0 + BK).min(end);
            (0..n_seg)
                .filter(|&g| {
                    let r = math::prefix_range(prefix, g);
                    r.start < j1 && j0 < r.end && cu[g] < cu[g + 1]
                })
                .collect()
        })
        .collect();
    let tile_in = BwdIn {
        q,
        k,
        v,
        dout,
        lse,
        dd,
        n_tok,
        n_heads,
        hd,
        qs,
        ks,
        scale,
    };
    // dk, dv: one task per (key block, kv head), over the query blocks that read it.
    let (dkp, dvp) = (Ptr(dk.as_mut_ptr()), Ptr(dv.as_mut_ptr()));
    (0..tasks.len() * n_kv).into_par_iter().for_each(|ti| {
        let (_, _, end, j0) = tasks[ti / n_kv];
        let kh = ti % n_kv;
        let nk = BK.min(end - j0);
        // (query block start, query block end, mask): own causal blocks, then the readers'.
        let qblocks: Vec<(usize, usize, Mask)> = (j0..end)
            .step_by(BQ)
            .map(|i0| (i0, (i0 + BQ).min(end), Mask::Causal))
            .chain(readers[ti / n_kv].iter().flat_map(|&g| {
                let (s, e) = (cu[g] as usize, cu[g + 1] as usize);
                let r = math::prefix_range(prefix, g);
                (s..e)
                    .step_by(BQ)
                    .map(move |i0| (i0, (i0 + BQ).min(e), Mask::Range(r.start, r.end)))
            }))
            .collect();
        with_scratch(2 * BQ * BK + 2 * BK * hd, |buf| {
            let (p, rest) = buf.split_at_mut(BQ * BK);
            let (ds, rest) = rest.split_at_mut(BQ * BK);
            let (dkl, dvl) = rest.split_at_mut(BK * hd);
            dkl.fill(0.0);
            dvl.fill(0.0);
            for h in kh * group..(kh + 1) * group {
                for &(i0, i1, mask) in &qblocks {
                    let nq = i1 - i0;
                    bwd_tile(
                        &tile_in,
                        (&mut *p, &mut *ds),
                        (i0, nq, j0, nk),
                        (h, kh),
                        mask,
                    );
                    // SAFETY: p, ds are [nq, nk]; q, dout rows i0..i0+nq in bounds;
                    // dkl, dvl are [nk, hd] scratch.
                    unsafe {
                        sgemm(
                            Gemm {
                                m: nk,
                                k: nq,
                                n: hd,
                                rsa: 1,
                                csa: nk,
                                rsb: qs,
                                csb: 1,
                                rsc: hd,
                                csc: 1,
                            },
                            1.0,
                            p.as_ptr(),
                            dout.as_ptr().add(i0 * qs + h * hd),
                            1.0,
                            dvl.as_mut_ptr(),
                        );
                        sgemm(
                            Gemm {
                                m: nk,
                                k: nq,
                                n: hd,
                                rsa: 1,
                                csa: nk,
                                rsb: qs,
                                csb: 1,
                                rsc: hd,
                                csc: 1,
                            },
                            scale,
                            ds.as_ptr(),
                            q.as_ptr().add(i0 * qs + h * hd),
                            1.0,
                            dkl.as_mut_ptr(),
                        );
                    }
                }
            }
            for c in 0..nk {
                let o = (j0 + c) * ks + kh * hd;
                // SAFETY: (key j0 + c, kv head kh) belongs to this task alone.
                unsafe {
                    std::slice::from_raw_parts_mut(dkp.get().add(o), hd)
                        .copy_from_slice(&dkl[c * hd..(c + 1) * hd]);
                    std::slice::from_raw_parts_mut(dvp.get().add(o), hd)
                        .copy_from_slice(&dvl[c * hd..(c + 1) * hd]);
                }
            }
        });
    });
    // dq: one task per (query block, head), over the prefix tiles and its causal key blocks.
    let dqp = Ptr(dq.as_mut_ptr());
    (0..tasks.len() * n_heads).into_par_iter().for_each(|ti| {
        let (seg, start, end, i0) = tasks[ti / n_heads];
        let h = ti % n_heads;
        let kh = h / group;
        let nq = BQ.min(end - i0);
        with_scratch(2 * BQ * BK + BQ * hd, |buf| {
            let (p, rest) = buf.split_at_mut(BQ * BK);
            let (ds, rest) = rest.split_at_mut(BQ * BK);
            let dql = &mut rest[..BQ * hd];
            dql.fill(0.0);
            for (j0, nk, mask) in key_tiles(math::prefix_range(prefix, seg), start, i0 + nq) {
                bwd_tile(
                    &tile_in,
                    (&mut *p, &mut *ds),
                    (i0, nq, j0, nk),
                    (h, kh),
                    mask,
                );
                // SAFETY: ds is [nq, nk]; k rows j0..j0+nk in bounds; dql is [nq, hd].
                unsafe {
                    sgemm(
                        Gemm {
                            m: nq,
                            k: nk,
                            n: hd,
                            rsa: nk,
                            csa: 1,
                            rsb: ks,
                            csb: 1,
                            rsc: hd,
                            csc: 1,
                        },
                        scale,
                        ds.as_ptr(),
                        k.as_ptr().add(j0 * ks + kh * hd),
                        1.0,
                        dql.as_mut_ptr(),
                    );
                }
            }
            for r in 0..nq {
                // SAFETY: (query i0 + r, head h) belongs to this task alone.
                unsafe {
                    std::slice::from_raw_parts_mut(dqp.get().add((i0 + r) * qs + h * hd), hd)
                        .copy_from_slice(&dql[r * hd..(r + 1) * hd]);
                }
            }
        });
    });
}

/// Decode attention (see [`math::attention_decode`]), one sequence per task.
pub fn attention_decode(
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    cached: &Cached<'_, [u32]>,
    out: &mut [f32],
    heads: Heads,
) {
    let Cached {
        lens,
        table,
        n_seq,
        max_blocks,
        block_size,
    } = *cached;
    let qs = heads.n_heads * heads.head_dim;
    out[..n_seq * qs]
        .par_chunks_mut(qs)
        .enumerate()
        .for_each(|(b, o)| {
            math::attention_decode(
                &q[b * qs..(b + 1) * qs],
                k_cache,
                v_cache,
                &Cached {
                    lens: &lens[b..b + 1],
                    table: &table[b * max_blocks..(b + 1) * max_blocks],
                    n_seq: 1,
                    max_blocks,
                    block_size,
                },
                o,
                heads,
            )
        });
}

// ------------------------------------------------------------------------------------ row ops

/// Rows per task of the row ops.
const ROWS: usize = 32;
/// Elements per task of the element-wise ops.
const ELEMS: usize = 1 << 14;

/// [`math::rmsnorm`] on chunks of rows in parallel (bit-identical to it).
pub fn rmsnorm(x: &[f32], w: &[f32], out: &mut [f32], rstd: &mut [f32], d: NormDims, eps: f32) {
    let NormDims { rows, dim } = d;
    out[..rows * dim]
        .par_chunks_mut(ROWS * dim)
        .zip(rstd[..rows].par_chunks_mut(ROWS))
        .enumerate()
        .for_each(|(c, (o, s))| {
            let n = s.len();
            math::rmsnorm(
                &x[c * ROWS * dim..],
                w,
                o,
                s,
                NormDims { rows: n, dim },
                eps,
            );
        });
}

/// [`math::add_rmsnorm`] on chunks of rows in parallel (bit-identical to it, and so to
/// [`add_inplace`] followed by [`rmsnorm`]).
pub fn add_rmsnorm(
    x: &mut [f32],
    delta: &[f32],
    w: &[f32],
    y: NormOut<'_, [f32], [f32]>,
    d: NormDims,
    eps: f32,
) {
    let (NormOut { out, rstd }, NormDims { rows, dim }) = (y, d);
    x[..rows * dim]
        .par_chunks_mut(ROWS * dim)
        .zip(out[..rows * dim].par_chunks_mut(ROWS * dim))
        .zip(rstd[..rows].par_chunks_mut(ROWS))
        .enumerate()
        .for_each(|(c, ((xc, o), s))| {
            let n = s.len();
            let y = NormOut { out: o, rstd: s };
            let d = NormDims { rows: n, dim };
            math::add_rmsnorm(xc, &delta[c * ROWS * dim..], w, y, d, eps);
        });
}

/// [`math::rmsnorm_bwd`] on chunks of rows in parallel; dw sums the per-chunk partials in
/// chunk order.
pub fn rmsnorm_bwd(
    dout: &[f32],
    x: &[f32],
    w: &[f32],
    rstd: &[f32],
    grads: NormGrads<'_, [f32], [f32]>,
    d: NormDims,
) {
    let (NormGrads { dx, dw }, NormDims { rows, dim }) = (grads, d);
    let chunks = rows.div_ceil(ROWS);
    let want_dw = dw.is_some();
    let mut parts = take_buf(if want_dw { chunks * dim } else { 0 });
    let pp = Ptr(parts.as_mut_ptr());
    dx[..rows * dim]
        .par_chunks_mut(ROWS * dim)
        .enumerate()
        .for_each(|(c, dxc)| {
            let n = dxc.len() / dim;
            let o = c * ROWS * dim;
            // SAFETY: chunk c alone uses partial c (dim elements of `parts`, which holds
            // chunks * dim when dw is wanted).
            let part = want_dw.then(|| unsafe {
                let p = std::slice::from_raw_parts_mut(pp.get().add(c * dim), dim);
                p.fill(0.0);
                p
            });
            let grads = NormGrads { dx: dxc, dw: part };
            let d = NormDims { rows: n, dim };
            math::rmsnorm_bwd(&dout[o..], &x[o..], w, &rstd[c * ROWS..], grads, d);
        });
    if let Some(dw) = dw {
        let parts = &parts;
        dw[..dim]
            .par_chunks_mut(256)
            .enumerate()
            .for_each(|(j, d)| {
                for c in 0..chunks {
                    for (dv, &p) in d.iter_mut().zip(&parts[c * dim + j * 256..]) {
                        *dv += p;
                    }
                }
            });
    }
    give_buf(parts);
}

/// [`math::rope`] on chunks of tokens in parallel (bit-identical to it).
pub fn rope(x: &mut [f32], pos: &[u32], d: RopeRows, theta: f32, inverse: bool) {
    let RopeRows {
        n_tok,
        n_heads,
        head_dim,
    } = d;
    let ts = n_heads * head_dim;
    x[..n_tok * ts]
        .par_chunks_mut(ROWS * ts)
        .enumerate()
        .for_each(|(c, xc)| {
            let n = xc.len() / ts;
            math::rope(
                xc,
                &pos[c * ROWS..c * ROWS + n],
                RopeRows { n_tok: n, ..d },
                theta,
                inverse,
            );
        });
}

simd_fn! {
    /// [`math::swiglu`] on one chunk with `exp_f32`.
    fn swiglu_chunk(gate: &[f32], up: &[f32], out: &mut [f32]) {
        for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
            *o = g * (1.0 / (1.0 + exp_f32(-g))) * u;
        }
    }
}

simd_fn! {
    /// [`math::swiglu_bwd`] on one chunk with `exp_f32`.
    fn swiglu_bwd_chunk(
        dout: &[f32],
        gate: &[f32],
        up: &[f32],
        dgate: &mut [f32],
        dup: &mut [f32]
    ) {
        let n = dgate.len().min(dup.len());
        for i in 0..n {
            let g = gate[i];
            let sg = 1.0 / (1.0 + exp_f32(-g));
            dgate[i] = dout[i] * up[i] * sg * (1.0 + g * (1.0 - sg));
            dup[i] = dout[i] * g * sg;
        }
    }
}

/// [`math::swiglu`] in parallel, with the vectorized `exp_f32` for the sigmoid.
pub fn swiglu(gate: &[f32], up: &[f32], out: &mut [f32], n: usize) {
    out[..n]
        .par_chunks_mut(ELEMS)
        .enumerate()
        .for_each(|(c, o)| {
            let (m, at) = (o.len(), c * ELEMS);
            swiglu_chunk(&gate[at..at + m], &up[at..at + m], o);
        });
}

/// [`math::swiglu_bwd`] in parallel, with the vectorized `exp_f32` for the sigmoid.
pub fn swiglu_bwd(
    dout: &[f32],
    gate: &[f32],
    up: &[f32],
    dgate: &mut [f32],
    dup: &mut [f32],
    n: usize,
) {
    dgate[..n]
        .par_chunks_mut(ELEMS)
        .zip(dup[..n].par_chunks_mut(ELEMS))
        .enumerate()
        .for_each(|(c, (dg, du))| {
            let (m, o) = (dg.len(), c * ELEMS);
            swiglu_bwd_chunk(&dout[o..o + m], &gate[o..o + m], &up[o..o + m], dg, du);
        });
}

/// `a += b` in parallel.
pub fn add_inplace(a: &mut [f32], b: &[f32]) {
    a.par_chunks_mut(ELEMS)
        .zip(b.par_chunks(ELEMS))
        .for_each(|(a, b)| {
            for (x, &y) in a.iter_mut().zip(b) {
                *x += y;
            }
        });
}
