//! Launchers of kernels/sampling.cu: one block of 512 threads per draw.

use super::super::runtime::gen::launch::sampling as k;
use super::super::runtime::CudaBuf;
use super::super::Cuda;
use super::{blocks, i32_of};
use crate::backend::check::{self, arg_error};
use crate::backend::{SampleDims, SampleParams, SampleRows};
use crate::Result;

/// One token per draw from f32 logits (greedy, or temperature / top-k / top-p sampling with the
/// counter-based stream of the CPU backend). The draws' logits rows and stream offsets go up
/// as one u32 table: the row, then the offset's low and high words, per draw.
pub(crate) fn sample(
    c: &Cuda,
    logits: &CudaBuf<f32>,
    out: &mut CudaBuf<u32>,
    rows: &SampleRows<'_>,
    p: &SampleParams,
) -> Result<()> {
    check::sample(logits, out, rows, p)?;
    let draws = rows.draws();
    if draws == 0 {
        return Ok(());
    }
    let mut table = Vec::with_capacity(3 * draws);
    for (d, &off) in rows.offsets.iter().enumerate() {
        table.extend_from_slice(&[rows.row(d) as u32, off as u32, (off >> 32) as u32]);
    }
    let table = c.gpu.htod::<u32, u32>(&table)?;
    let d = SampleDims {
        draws,
        n_rows: rows.n_rows,
        vocab: rows.vocab,
    };
    launch(c, logits, out, &table, d, p, "sample")
}

/// [`sample`] with the draws' table on the device (row ids checked by the kernel).
pub(crate) fn sample_table(
    c: &Cuda,
    logits: &CudaBuf<f32>,
    out: &mut CudaBuf<u32>,
    table: &CudaBuf<u32>,
    d: SampleDims,
    p: &SampleParams,
) -> Result<()> {
    check::sample_table(logits, out, table, d, p)?;
    if d.draws == 0 {
        return Ok(());
    }
    launch(c, logits, out, table, d, p, "sample_table")
}

fn launch(
    c: &Cuda,
    logits: &CudaBuf<f32>,
    out: &mut CudaBuf<u32>,
    table: &CudaBuf<u32>,
    d: SampleDims,
    p: &SampleParams,
    op: &'static str,
) -> Result<()> {
    let SampleDims {
        draws,
        n_rows,
        vocab,
    } = d;
    // The kernel's fixed-point masses sum up to 2^24 entries of at most 2^40 in 64 bits.
    if vocab >= 1 << 24 {
        return Err(arg_error(
            op,
            "vocab",
            "below 2^24 (the CUDA sampler's fixed-point sums)",
            vocab,
        ));
    }
    // top_k >= vocab keeps everything, like top_k = 0.
    let top_k = if p.top_k >= vocab { 0 } else { p.top_k };
    k::sample_rows(
        &c.gpu,
        blocks(draws, 512),
        k::SampleRows {
            logits,
            out,
            table,
            rows: i32_of(op, "draws", draws)?,
            n_rows: i32_of(op, "n_rows", n_rows)?,
            vocab: i32_of(op, "vocab", vocab)?,
            temperature: p.temperature,
            top_p: p.top_p,
            top_k: i32_of(op, "top_k", top_k)?,
            seed: p.seed,
            err: c.gpu.err(),
        },
    )
}
