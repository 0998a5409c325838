//! Launchers of kernels/util.cu: fill, bf16 and f32 adds, f32 -> bf16, and the bias row broadcast and
//! column sums of the linear layer.

use super::super::runtime::gen::launch::util as k;
use super::super::runtime::{Bf16, CudaBuf, In, Launch, Out};
use super::super::Cuda;
use super::ew;
use crate::backend::check;
use crate::Result;

/// t[..n] = value
pub(crate) fn fill_f32(c: &Cuda, t: &mut CudaBuf<f32>, n: usize, value: f32) -> Result<()> {
    check::first_n("fill_f32", t, n)?;
    let a = k::FillF32 {
        x: t,
        n: n as i64,
        value,
    };
    k::fill_f32(&c.gpu, ew(n), a)
}

/// a[..n] += b[..n]
pub(crate) fn add_inplace(
    c: &Cuda,
    a: &mut CudaBuf<Bf16>,
    b: &CudaBuf<Bf16>,
    n: usize,
) -> Result<()> {
    check::add_inplace(a, b, n)?;
    k::add_bf16(&c.gpu, ew(n), k::AddBf16 { a, b, n: n as i64 })
}

/// a[..n] += b[..n] (f32; the caller checked the lengths)
pub(crate) fn add_f32(c: &Cuda, a: &mut CudaBuf<f32>, b: &CudaBuf<f32>, n: usize) -> Result<()> {
    k::add_f32(&c.gpu, ew(n), k::AddF32 { a, b, n: n as i64 })
}

/// y[..n] = bf16(x[..n])
pub(crate) fn f32_to_bf16(c: &Cuda, x: In<'_, f32>, y: Out<'_, Bf16>, n: usize) -> Result<()> {
    k::f32_to_bf16(&c.gpu, ew(n), k::F32ToBf16 { x, y, n: n as i64 })
}

/// y[r, :] = bias for every row r < m of y[m, n].
pub(crate) fn bias_rows(
    c: &Cuda,
    bias: &CudaBuf<Bf16>,
    y: &mut CudaBuf<Bf16>,
    m: i32,
    n: i32,
) -> Result<()> {
    k::bias_rows(
        &c.gpu,
        ew(m as usize * n as usize),
        k::BiasRows { bias, y, m, n },
    )
}

/// db[j] += Σ_r dy[r, j] over dy[m, n]: a block of 256 columns by 64 rows each.
pub(crate) fn colsum_accum(
    c: &Cuda,
    dy: &CudaBuf<Bf16>,
    db: &mut CudaBuf<f32>,
    m: i32,
    n: i32,
) -> Result<()> {
    let grid = (
        (n as usize).div_ceil(256) as u32,
        (m as usize).div_ceil(64).max(1) as u32,
        1,
    );
    k::colsum_accum(
        &c.gpu,
        Launch::new(grid, 256),
        k::ColsumAccum { dy, db, m, n },
    )
}
