//! Launchers of kernels/embedding.cu: one block of 256 threads per token row.

use super::super::runtime::gen::launch::embedding as k;
use super::super::runtime::{Bf16, CudaBuf};
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
        ids,
        table,
        out,
        i32_of(op, "n_tok", n_tok)?,
        i32_of(op, "dim", dim)?,
        u32_rows(op, rows)?,
        c.gpu.err(),
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
        blocks(n_tok, 256),
        ids,
        dout,
        dtable,
        i32_of(op, "n_tok", n_tok)?,
        i32_of(op, "dim", dim)?,
        u32_rows(op, rows)?,
        c.gpu.err(),
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
