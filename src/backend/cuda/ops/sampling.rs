//! Launchers of kernels/sampling.cu: one block of 512 threads per draw.

use super::super::runtime::gen::launch::sampling as k;
use super::super::runtime::CudaBuf;
use super::super::Cuda;
use super::{blocks, i32_of};
use crate::backend::check::{self, arg_error};
use crate::backend::{SampleParams, SampleRows};
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
    let op = "sample";
    check::sample(logits, out, rows, p)?;
    let vocab = rows.vocab;
    // The kernel's fixed-point masses sum up to 2^24 entries of at most 2^40 in 64 bits.
    if vocab >= 1 << 24 {
        return Err(arg_error(
            op,
            "vocab",
            "below 2^24 (the CUDA sampler's fixed-point sums)",
            vocab,
        ));
    }
    let draws = rows.draws();
    if draws == 0 {
        return Ok(());
    }
    // top_k >= vocab keeps everything, like top_k = 0.
    let top_k = if p.top_k >= vocab { 0 } else { p.top_k };
    let mut table = Vec::with_capacity(3 * draws);
    for (d, &off) in rows.offsets.iter().enumerate() {
        table.extend_from_slice(&[rows.row(d) as u32, off as u32, (off >> 32) as u32]);
    }
    let table = c.gpu.htod::<u32, u32>(&table)?;
    k::sample_rows(
        &c.gpu,
        blocks(draws, 512),
        k::SampleRows {
            logits,
            out,
            table: &table,
            rows: i32_of(op, "draws", draws)?,
            vocab: i32_of(op, "vocab", vocab)?,
            temperature: p.temperature,
            top_p: p.top_p,
            top_k: i32_of(op, "top_k", top_k)?,
            seed: p.seed,
            err: c.gpu.err(),
        },
    )
}
