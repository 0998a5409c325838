//! Launchers of kernels/embedding.cu: one block of 256 threads per token row.

use super::super::runtime::gen::launch::embedding as k;
use super::super::runtime::{Bf16, CudaBuf};
use super::super::Cuda;
use super::{blocks, i32_of, need};
use crate::{ensure, Result};

/// out[t, :] = table[ids[t], :]; an id outside the table sets ERR_EMBED_ID.
pub(crate) fn forward(
    c: &Cuda,
    ids: &CudaBuf<u32>,
    table: &CudaBuf<Bf16>,
    out: &mut CudaBuf<Bf16>,
    n_tok: usize,
    dim: usize,
) -> Result<()> {
    need(ids, n_tok, "embedding ids")?;
    need(out, n_tok * dim, "embedding out")?;
    ensure!(dim > 0, "embedding: dim must be > 0");
    let vocab = (table.len() / dim) as u32;
    k::embedding_fwd(
        &c.gpu,
        blocks(n_tok, 256),
        ids,
        table,
        out,
        i32_of(n_tok, "n_tok")?,
        i32_of(dim, "dim")?,
        vocab,
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
    need(ids, n_tok, "embedding_bwd ids")?;
    need(dout, n_tok * dim, "embedding_bwd dout")?;
    ensure!(dim > 0, "embedding_bwd: dim must be > 0");
    let vocab = (dtable.len() / dim) as u32;
    k::embedding_bwd(
        &c.gpu,
        blocks(n_tok, 256),
        ids,
        dout,
        dtable,
        i32_of(n_tok, "n_tok")?,
        i32_of(dim, "dim")?,
        vocab,
        c.gpu.err(),
    )
}
