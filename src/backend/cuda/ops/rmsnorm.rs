//! Launchers of kernels/rmsnorm.cu: one block of 256 threads per row (forward, the fused
//! residual add + forward, dx); dw in blocks of 256 columns by 64 rows.

use super::super::runtime::gen::launch::rmsnorm as k;
use super::super::runtime::{Bf16, CudaBuf, Launch};
use super::super::Cuda;
use super::{blocks, i32_of};
use crate::backend::{check, NormDims, NormGrads, NormOut};
use crate::Result;

/// out = x * rstd * w per row, rstd saved.
pub(crate) fn forward(
    c: &Cuda,
    x: &CudaBuf<Bf16>,
    w: &CudaBuf<Bf16>,
    out: &mut CudaBuf<Bf16>,
    rstd: &mut CudaBuf<f32>,
    d: NormDims,
    eps: f32,
) -> Result<()> {
    check::rmsnorm(x, w, out, rstd, d)?;
    let NormDims { rows, dim } = d;
    k::rmsnorm_fwd(
        &c.gpu,
        blocks(rows, 256),
        k::RmsnormFwd {
            x,
            w,
            out,
            rstd,
            rows: i32_of("rmsnorm", "rows", rows)?,
            dim: i32_of("rmsnorm", "dim", dim)?,
            eps,
        },
    )
}

/// x += delta (bf16 of the f32 sum, as add_bf16), then out = x * rstd * w per row, rstd saved:
/// one kernel, the bits of `add_inplace` followed by [`forward`].
pub(crate) fn add_forward(
    c: &Cuda,
    x: &mut CudaBuf<Bf16>,
    delta: &CudaBuf<Bf16>,
    w: &CudaBuf<Bf16>,
    y: NormOut<'_, CudaBuf<Bf16>, CudaBuf<f32>>,
    d: NormDims,
    eps: f32,
) -> Result<()> {
    check::add_rmsnorm(x, delta, w, &y, d)?;
    let (NormOut { out, rstd }, NormDims { rows, dim }) = (y, d);
    k::add_rmsnorm_fwd(
        &c.gpu,
        blocks(rows, 256),
        k::AddRmsnormFwd {
            x,
            delta,
            w,
            out,
            rstd,
            rows: i32_of("add_rmsnorm", "rows", rows)?,
            dim: i32_of("add_rmsnorm", "dim", dim)?,
            eps,
        },
    )
}

/// dx += ∂L/∂x; dw += Σ_r dout * x * rstd.
pub(crate) fn backward(
    c: &Cuda,
    dout: &CudaBuf<Bf16>,
    x: &CudaBuf<Bf16>,
    w: &CudaBuf<Bf16>,
    rstd: &CudaBuf<f32>,
    grads: NormGrads<'_, CudaBuf<Bf16>, CudaBuf<f32>>,
    d: NormDims,
) -> Result<()> {
    check::rmsnorm_bwd(dout, x, w, rstd, &grads, d)?;
    let (NormGrads { dx, dw }, NormDims { rows, dim }) = (grads, d);
    let op = "rmsnorm_bwd";
    let (r, d) = (i32_of(op, "rows", rows)?, i32_of(op, "dim", dim)?);
    if let Some(dw) = dw {
        // Per-chunk column sums of 64 rows, then the chunks added in order: deterministic.
        let chunks = rows.div_ceil(64).max(1);
        let mut part = c.gpu.alloc::<f32>(chunks * dim)?;
        let grid = (dim.div_ceil(256) as u32, chunks as u32, 1);
        let a = k::RmsnormBwdDw {
            dout,
            x,
            rstd,
            part: &mut part,
            rows: r,
            dim: d,
        };
        k::rmsnorm_bwd_dw(&c.gpu, Launch::new(grid, 256), a)?;
        super::util::sum_partials(c, &part, dw, chunks, d)?;
    }
    let a = k::RmsnormBwdDx {
        dout,
        x,
        w,
        rstd,
        dx,
        rows: r,
        dim: d,
    };
    k::rmsnorm_bwd_dx(&c.gpu, blocks(rows, 256), a)
}
