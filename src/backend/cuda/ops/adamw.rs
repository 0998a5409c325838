//! Launchers of kernels/adamw.cu: the AdamW step (grid-stride blocks of 256) and the partial
//! sums of squares of the global gradient norm (at most 1024 blocks of 256, summed on the host).

use super::super::runtime::gen::launch::adamw as k;
use super::super::runtime::{Bf16, CudaBuf, Out};
use super::super::Cuda;
use super::{blocks, ew};
use crate::backend::host_adamw::HostStep;
use crate::backend::{check, AdamWState, AdamWStep};
use crate::Result;

/// One AdamW step on n elements, through the f32 master copy when given.
pub(crate) fn adamw(
    c: &Cuda,
    state: AdamWState<'_, CudaBuf<Bf16>, CudaBuf<f32>>,
    grad: &CudaBuf<f32>,
    n: usize,
    hp: &AdamWStep,
) -> Result<()> {
    check::adamw(&state, grad, n, hp.step)?;
    let AdamWState {
        param,
        master,
        m,
        v,
    } = state;
    let master: Out<'_, f32> = master.into();
    // The same f32 constants as the host update (bias corrections rounded once from f64).
    let h = HostStep::new(hp);
    k::adamw_step(
        &c.gpu,
        ew(n),
        k::AdamwStep {
            param,
            master,
            grad,
            m,
            v,
            n: n as i64,
            lr: h.lr,
            b1: h.beta1,
            b2: h.beta2,
            eps: h.eps,
            wd: h.weight_decay,
            grad_scale: h.grad_scale,
            bc1: h.bc1,
            bc2: h.bc2,
        },
    )
}

/// Σ t[..n]² in f64.
pub(crate) fn sum_squares(c: &Cuda, t: &CudaBuf<f32>, n: usize) -> Result<f64> {
    check::first_n("sum_squares_f32", t, n)?;
    if n == 0 {
        return Ok(0.0);
    }
    let g = n.div_ceil(256).clamp(1, 1024);
    let mut part = c.gpu.alloc::<f64>(g)?;
    let a = k::SumsqPartial {
        x: t,
        n: n as i64,
        partial: &mut part,
    };
    k::sumsq_partial(&c.gpu, blocks(g, 256), a)?;
    let v: Vec<f64> = c.gpu.dtoh(part.ptr(), g)?;
    Ok(v.iter().sum())
}
