//! The launchers of the CUDA backend, one file per kernel file: `ops/<op>.rs` holds the block
//! size, grid, shared memory and launch of every kernel in `kernels/<op>.cu`, through the typed
//! launchers that build.rs generates from the kernel signatures (`runtime::gen::launch::<op>`).
//! `linear.rs` (cuBLAS GEMMs, with the bias kernels of `util.cu`) and `memory.rs` (uploads,
//! downloads, copies) are the two without a kernel file of their own.

pub(crate) mod adamw;
pub(crate) mod decode;
pub(crate) mod embedding;
pub(crate) mod flash_attn;
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

use super::runtime::Launch;
use crate::backend::check::arg_error;
use crate::Result;

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

/// A size as the kernels' `int`: an error (naming the op and argument) above `i32::MAX`.
pub(crate) fn i32_of(op: &'static str, arg: &'static str, x: usize) -> Result<i32> {
    i32::try_from(x).map_err(|_| {
        arg_error(
            op,
            arg,
            format!("at most {} (the CUDA kernels index with int)", i32::MAX),
            x,
        )
    })
}

/// The CUDA launch grid's limit on its y and z dimensions (the attention kernels put heads and
/// sequences there).
pub(crate) const GRID_YZ: usize = 65535;

/// `x` fits in the y or z dimension of a launch grid.
pub(crate) fn grid_yz(op: &'static str, arg: &'static str, x: usize) -> Result<()> {
    if x > GRID_YZ {
        return Err(arg_error(
            op,
            arg,
            format!("at most {GRID_YZ} (a CUDA launch grid dimension)"),
            x,
        ));
    }
    Ok(())
}
