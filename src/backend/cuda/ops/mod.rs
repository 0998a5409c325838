//! The launchers of the CUDA backend, one file per kernel file: `ops/<op>.rs` holds the block
//! size, grid, shared memory and launch of every kernel in `kernels/<op>.cu`, through the typed
//! launchers that build.rs generates from the kernel signatures (`runtime::gen::launch::<op>`).
//! `linear.rs` (cuBLAS GEMMs, with the bias kernels of `util.cu`) and `memory.rs` (uploads,
//! downloads, copies) are the two without a kernel file of their own.

pub(crate) mod adamw;
pub(crate) mod attention;
pub(crate) mod embedding;
pub(crate) mod grpo_loss;
pub(crate) mod linear;
pub(crate) mod logprobs;
pub(crate) mod memory;
pub(crate) mod mma_check;
pub(crate) mod rmsnorm;
pub(crate) mod rope;
pub(crate) mod sampling;
pub(crate) mod swiglu;
pub(crate) mod util;

use super::runtime::{CudaBuf, Elem, Launch};
use crate::{ensure, Error, Result};

/// Threads per block of the grid-stride elementwise kernels.
pub(crate) const EW_THREADS: u32 = 256;

/// Launch shape of a grid-stride elementwise kernel over `n` elements: one thread per element,
/// at most 65535 * 8 blocks (the kernels loop over the rest).
pub(crate) fn ew(n: usize) -> Launch {
    Launch::new(
        (
            n.div_ceil(EW_THREADS as usize).clamp(1, 65535 * 8) as u32,
            1,
            1,
        ),
        EW_THREADS,
    )
}

/// `grid` blocks along x of `threads` threads.
pub(crate) fn blocks(grid: usize, threads: u32) -> Launch {
    Launch::new((grid as u32, 1, 1), threads)
}

pub(crate) fn need<E: Elem>(b: &CudaBuf<E>, n: usize, what: &str) -> Result<()> {
    ensure!(
        b.len() >= n,
        "{what}: buffer holds {} elements, the op needs {n}",
        b.len()
    );
    Ok(())
}

pub(crate) fn i32_of(x: usize, what: &str) -> Result<i32> {
    i32::try_from(x).map_err(|_| Error::Invalid(format!("{what} = {x} does not fit in i32")))
}
