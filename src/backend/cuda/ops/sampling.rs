//! Launchers of kernels/sampling.cu: one block of 512 threads per row.

use super::super::runtime::gen::launch::sampling as k;
use super::super::runtime::CudaBuf;
use super::super::Cuda;
use super::{blocks, i32_of};
use crate::backend::check::{self, arg_error};
use crate::Result;

/// One token per row of f32 logits (greedy, or temperature / top-k / top-p sampling with the
/// counter-based stream of the CPU backend).
#[allow(clippy::too_many_arguments)]
pub(crate) fn sample(
    c: &Cuda,
    logits: &CudaBuf<f32>,
    out: &mut CudaBuf<u32>,
    rows: usize,
    vocab: usize,
    temperature: f32,
    top_p: f32,
    top_k: usize,
    seed: u64,
    offset: u64,
) -> Result<()> {
    let op = "sample";
    check::sample(logits, out, rows, vocab, temperature, top_p)?;
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
    let top_k = if top_k >= vocab { 0 } else { top_k };
    k::sample_rows(
        &c.gpu,
        blocks(rows, 512),
        k::SampleRows {
            logits,
            out,
            rows: i32_of(op, "rows", rows)?,
            vocab: i32_of(op, "vocab", vocab)?,
            temperature,
            top_p,
            top_k: i32_of(op, "top_k", top_k)?,
            seed,
            offset,
            err: c.gpu.err(),
        },
    )
}
