//! Launchers of kernels/sampling.cu: one block of 512 threads per row.

use super::super::runtime::gen::launch::sampling as k;
use super::super::runtime::CudaBuf;
use super::super::Cuda;
use super::{blocks, i32_of, need};
use crate::{ensure, Result};

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
    need(logits, rows * vocab, "sample logits")?;
    need(out, rows, "sample out")?;
    ensure!(vocab > 0, "sample: vocab must be > 0");
    ensure!(
        temperature >= 0.0 && temperature.is_finite(),
        "sample: temperature {temperature} must be finite and >= 0"
    );
    ensure!(
        (0.0..=1.0).contains(&top_p),
        "sample: top_p {top_p} must be in [0, 1]"
    );
    // The kernel's fixed-point masses sum up to 2^24 entries of at most 2^40 in 64 bits.
    ensure!(vocab < 1 << 24, "sample: vocab {vocab} must be below 2^24");
    // top_k >= vocab keeps everything, like top_k = 0.
    let top_k = if top_k >= vocab { 0 } else { top_k };
    k::sample_rows(
        &c.gpu,
        blocks(rows, 512),
        logits,
        out,
        rows as i32,
        i32_of(vocab, "vocab")?,
        temperature,
        top_p,
        i32_of(top_k, "top_k")?,
        seed,
        offset,
        c.gpu.err(),
    )
}
