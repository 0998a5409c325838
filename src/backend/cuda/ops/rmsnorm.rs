//! Launchers of kernels/rmsnorm.cu: one block of 256 threads per row (forward, dx); dw in blocks
//! of 256 columns by 64 rows.

use super::super::runtime::gen::launch::rmsnorm as k;
use super::super::runtime::{Bf16, CudaBuf, Launch};
use super::super::Cuda;
use super::{blocks, i32_of, need};
use crate::{ensure, Result};

/// out = x * rstd * w per row, rstd saved.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward(
    c: &Cuda,
    x: &CudaBuf<Bf16>,
    w: &CudaBuf<Bf16>,
    out: &mut CudaBuf<Bf16>,
    rstd: &mut CudaBuf<f32>,
    rows: usize,
    dim: usize,
    eps: f32,
) -> Result<()> {
    need(x, rows * dim, "rmsnorm x")?;
    need(w, dim, "rmsnorm w")?;
    need(out, rows * dim, "rmsnorm out")?;
    need(rstd, rows, "rmsnorm rstd")?;
    ensure!(dim > 0, "rmsnorm: dim must be > 0");
    k::rmsnorm_fwd(
        &c.gpu,
        blocks(rows, 256),
        x,
        w,
        out,
        rstd,
        i32_of(rows, "rows")?,
        i32_of(dim, "dim")?,
        eps,
    )
}

/// dx += ∂L/∂x; dw += Σ_r dout * x * rstd.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    c: &Cuda,
    dout: &CudaBuf<Bf16>,
    x: &CudaBuf<Bf16>,
    w: &CudaBuf<Bf16>,
    rstd: &CudaBuf<f32>,
    dx: &mut CudaBuf<Bf16>,
    dw: Option<&mut CudaBuf<f32>>,
    rows: usize,
    dim: usize,
) -> Result<()> {
    need(dout, rows * dim, "rmsnorm_bwd dout")?;
    need(x, rows * dim, "rmsnorm_bwd x")?;
    need(w, dim, "rmsnorm_bwd w")?;
    need(rstd, rows, "rmsnorm_bwd rstd")?;
    need(dx, rows * dim, "rmsnorm_bwd dx")?;
    let (r, d) = (i32_of(rows, "rows")?, i32_of(dim, "dim")?);
    if let Some(dw) = dw {
        need(dw, dim, "rmsnorm_bwd dw")?;
        let grid = (dim.div_ceil(256) as u32, rows.div_ceil(64).max(1) as u32, 1);
        k::rmsnorm_bwd_dw(&c.gpu, Launch::new(grid, 256), dout, x, rstd, dw, r, d)?;
    }
    k::rmsnorm_bwd_dx(&c.gpu, blocks(rows, 256), dout, x, w, rstd, dx, r, d)
}
