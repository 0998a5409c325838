//! The host AdamW update, the one implementation the CPU backend's `adamw` and the
//! host-offloaded optimizer (`train::optim`, `memory.optimizer = "host"`) both run.
//!
//! It is the math of the CUDA kernel `adamw_step` (kernels/adamw.cu) operation for operation,
//! in f32 and in the same order, per element:
//!
//! ```text
//! g = grad * grad_scale
//! m = b1 * m + (1 - b1) * g
//! v = b2 * v + (1 - b2) * g * g        // ((1 - b2) * g) * g
//! p -= lr * ((m / bc1) / (sqrt(v / bc2) + eps) + wd * p)
//! ```
//!
//! with the bias corrections bc1 = 1 - b1^t and bc2 = 1 - b2^t computed in f64 and rounded to
//! f32 once, as the kernel's launcher does (`t` = the update number, capped at `i32::MAX`).
//! Rust never contracts a multiply and an add into a fused multiply-add, and neither does the
//! virtual GPU's host build of the kernel (x86-64 without FMA flags), so there the two agree
//! bit for bit. nvcc contracts by default (`--fmad=true`): on a real GPU the kernel may round
//! `b1 * m + (1 - b1) * g` and the other multiply-adds once instead of twice, so the host and
//! device updates can differ in the last bit of an element there.
//!
//! Elements are independent, so the update runs in fixed 16384-element chunks on the CPU
//! backend's rayon pool with the same result for every thread count; the inner loop has no
//! branches and vectorises.

use crate::backend::AdamWStep;
use rayon::prelude::*;

/// Elements per parallel chunk.
const CHUNK: usize = 1 << 14;

/// The f32 constants of one update: the host update's, and the ones the CUDA launcher passes
/// to the kernel (`backend::cuda::ops::adamw`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HostStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    pub grad_scale: f32,
    /// 1 - beta1^t, computed in f64, rounded to f32.
    pub bc1: f32,
    /// 1 - beta2^t, computed in f64, rounded to f32.
    pub bc2: f32,
}

impl HostStep {
    pub fn new(hp: &AdamWStep) -> Self {
        let t = hp.step.min(i32::MAX as u64) as i32;
        HostStep {
            lr: hp.lr,
            beta1: hp.beta1,
            beta2: hp.beta2,
            eps: hp.eps,
            weight_decay: hp.weight_decay,
            grad_scale: hp.grad_scale,
            bc1: (1.0 - (hp.beta1 as f64).powi(t)) as f32,
            bc2: (1.0 - (hp.beta2 as f64).powi(t)) as f32,
        }
    }
}

/// One update of `p`, `m`, `v` from `grad` on this thread (all four the same length).
pub fn update_serial(p: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32], h: &HostStep) {
    let n = p.len().min(grad.len()).min(m.len()).min(v.len());
    let (p, grad, m, v) = (&mut p[..n], &grad[..n], &mut m[..n], &mut v[..n]);
    let (b1, b2) = (h.beta1, h.beta2);
    let (c1, c2) = (1.0 - b1, 1.0 - b2);
    for i in 0..n {
        let g = grad[i] * h.grad_scale;
        let mi = b1 * m[i] + c1 * g;
        let vi = b2 * v[i] + c2 * g * g;
        m[i] = mi;
        v[i] = vi;
        let pi = p[i];
        p[i] = pi - h.lr * ((mi / h.bc1) / ((vi / h.bc2).sqrt() + h.eps) + h.weight_decay * pi);
    }
}

/// One AdamW step on the first `n` elements, in parallel on the CPU backend's pool. The
/// caller checks the lengths (`check::adamw`); shorter slices are cut to the shortest.
pub fn adamw(p: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32], n: usize, hp: &AdamWStep) {
    let h = HostStep::new(hp);
    let n = n.min(p.len()).min(grad.len()).min(m.len()).min(v.len());
    let (p, grad, m, v) = (&mut p[..n], &grad[..n], &mut m[..n], &mut v[..n]);
    crate::backend::cpu::fast::run(|| {
        p.par_chunks_mut(CHUNK)
            .zip(grad.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .for_each(|(((p, g), m), v)| update_serial(p, g, m, v, &h));
    });
}
