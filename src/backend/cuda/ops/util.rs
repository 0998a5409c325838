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

/// db[j] += Σ_r dy[r, j] over dy[m, n], deterministically: per-chunk column sums of 64 rows
/// into a scratch buffer (a block of 256 columns by 64 rows each), then the chunks added in
/// order ([`sum_partials`]).
pub(crate) fn colsum_accum(
    c: &Cuda,
    dy: &CudaBuf<Bf16>,
    db: &mut CudaBuf<f32>,
    m: i32,
    n: i32,
) -> Result<()> {
    let chunks = (m.max(0) as usize).div_ceil(64).max(1);
    let mut part = c.gpu.alloc::<f32>(chunks * n.max(0) as usize)?;
    let grid = ((n as usize).div_ceil(256) as u32, chunks as u32, 1);
    k::colsum_accum(
        &c.gpu,
        Launch::new(grid, 256),
        k::ColsumAccum {
            dy,
            part: &mut part,
            m,
            n,
        },
    )?;
    sum_partials(c, &part, db, chunks, n)
}

/// out[j] += Σ_c part[c, j] for c < parts, in increasing c.
pub(crate) fn sum_partials(
    c: &Cuda,
    part: &CudaBuf<f32>,
    out: &mut CudaBuf<f32>,
    parts: usize,
    n: i32,
) -> Result<()> {
    let parts = i32::try_from(parts)
        .map_err(|_| crate::Error::Invalid(format!("sum_partials: {parts} parts")))?;
    let grid = ((n.max(0) as usize).div_ceil(256).max(1) as u32, 1, 1);
    k::sum_partials(
        &c.gpu,
        Launch::new(grid, 256),
        k::SumPartials {
            part,
            out,
            parts,
            n,
        },
    )
}
