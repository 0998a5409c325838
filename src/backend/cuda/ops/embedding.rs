//! Launchers of kernels/embedding.cu: one block of 256 threads per token row.

use super::super::runtime::gen::launch::embedding as k;
use super::super::runtime::{Bf16, CudaBuf, Launch};
use super::super::Cuda;
use super::{blocks, i32_of};
use crate::backend::check;
use crate::Result;

/// out[t, :] = table[ids[t], :]; an id outside the table sets ERR_EMBED_ID.
pub(crate) fn forward(
    c: &Cuda,
    ids: &CudaBuf<u32>,
    table: &CudaBuf<Bf16>,
    out: &mut CudaBuf<Bf16>,
    n_tok: usize,
    dim: usize,
) -> Result<()> {
    let op = "embedding";
    let rows = check::embedding(op, ids, out, table, n_tok, dim)?;
    k::embedding_fwd(
        &c.gpu,
        blocks(n_tok, 256),
        k::EmbeddingFwd {
            ids,
            table,
            out,
            n_tok: i32_of(op, "n_tok", n_tok)?,
            dim: i32_of(op, "dim", dim)?,
            vocab: u32_rows(op, rows)?,
            err: c.gpu.err(),
        },
    )
}

/// dtable[ids[t], :] += dout[t, :] (f32 atomics).
pub(crate) fn backward(
    c: &Cuda,
    ids: &CudaBuf<u32>,
    dout: &CudaBuf<Bf16>,
    dtable: &mut CudaBuf<f32>,
    n_tok: usize,
    dim: usize,
) -> Result<()> {
    let op = "embedding_bwd";
    let rows = check::embedding(op, ids, dout, dtable, n_tok, dim)?;
    k::embedding_bwd(
        &c.gpu,
        Launch::new((dim.div_ceil(256) as u32, 1, 1), 256),
        k::EmbeddingBwd {
            ids,
            dout,
            dtable,
            n_tok: i32_of(op, "n_tok", n_tok)?,
            dim: i32_of(op, "dim", dim)?,
            vocab: u32_rows(op, rows)?,
            err: c.gpu.err(),
        },
    )
}

/// The table's row count as the kernels' `u32` vocabulary bound.
fn u32_rows(op: &'static str, rows: usize) -> Result<u32> {
    u32::try_from(rows).map_err(|_| {
        check::arg_error(
            op,
            "table",
            "at most 2^32 - 1 rows (the kernels compare ids as u32)",
            format!("{rows} rows"),
        )
    })
}

/// dst[ids[t], :] += src[t, :] over activation rows (one thread per column walks t in order,
/// so the sums are deterministic); an id outside dst sets ERR_EMBED_ID.
pub(crate) fn scatter_add_rows(
    c: &Cuda,
    ids: &CudaBuf<u32>,
    src: &CudaBuf<Bf16>,
    dst: &mut CudaBuf<Bf16>,
    n: usize,
    dst_rows: usize,
    dim: usize,
) -> Result<()> {
    let op = "scatter_add_rows";
    check::scatter_add_rows(ids, src, dst, n, dst_rows, dim)?;
    if n == 0 {
        return Ok(());
    }
    k::scatter_add_rows(
        &c.gpu,
        blocks(dim.div_ceil(256), 256),
        k::ScatterAddRows {
            ids,
            src,
            dst,
            n: i32_of(op, "n", n)?,
            dim: i32_of(op, "dim", dim)?,
            dst_rows: u32_rows(op, dst_rows)?,
            err: c.gpu.err(),
        },
    )
}
