//! Data-parallel training over the GPUs of one machine.
//!
//! Process model: one process drives every local GPU, with one worker thread per GPU (rank),
//! each with its own CUDA context, streams, model replica and optimizer shard. One process
//! rather than one per GPU because everything above the model is shared host state (the
//! tokenizer, the dataset order, the reward, the run folder and its lock, the metrics line):
//! kept once, it needs no launcher and no broadcast of configuration, host-side sums
//! (metrics, token counts, norms) are a rendezvous of threads instead of a collective, and
//! when one rank fails the process sees it and stops the others (their NCCL communicators
//! aborted) instead of leaving peers waiting on a dead process. NCCL supports one communicator
//! per thread in one process (`ncclCommInitAll`). A single GPU runs the plain path, with no
//! communication at all.
//!
//! - [`host`]: the thread rendezvous and host-memory collectives (the CPU backend's ranks).
//! - [`collective`]: the collectives training needs, over a backend's buffers.
//! - [`shard`]: how tensors are cut into per-rank shards, and the buckets of communication.
//! - [`split`]: which prompt groups each rank runs.
//!
//! AdamW over the shards (ZeRO stage 2) is `train::zero`, above this layer.

pub mod collective;
pub mod host;
pub mod shard;
pub mod split;

/// Backward groups whose gradient reductions may still be in flight (queued on a rank's
/// communication stream, their full-size gradient buffers alive) while the next group's
/// backward runs; the CUDA ranks wait on the device for the oldest beyond this, and the memory
/// planner counts them.
pub const REDUCE_GROUPS_IN_FLIGHT: usize = 1;

pub use collective::Collective;
pub use host::{host_group, HostRank};
pub use shard::{ShardPlan, TensorShards};

use crate::{Error, Result};

/// How many GPUs a run asks for (`--gpus N|all`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GpuRequest {
    /// Every visible device (CUDA_VISIBLE_DEVICES, when set, decides which are visible).
    All,
    Count(usize),
}

impl std::str::FromStr for GpuRequest {
    type Err = Error;
    fn from_str(s: &str) -> Result<GpuRequest> {
        let t = s.trim();
        if t.eq_ignore_ascii_case("all") {
            return Ok(GpuRequest::All);
        }
        match t.parse::<usize>() {
            Ok(n) if n >= 1 => Ok(GpuRequest::Count(n)),
            _ => Err(Error::Invalid(format!(
                "--gpus {s:?}: expected `all` or a whole number of GPUs, at least 1"
            ))),
        }
    }
}

impl GpuRequest {
    /// The number of ranks for `visible` devices. More than are visible is an error that says
    /// how many are and where that comes from.
    pub fn resolve(self, visible: usize) -> Result<usize> {
        let env = std::env::var("CUDA_VISIBLE_DEVICES").ok();
        let whence = match &env {
            Some(v) => format!(" (CUDA_VISIBLE_DEVICES={v:?})"),
            None => String::new(),
        };
        match self {
            GpuRequest::All if visible == 0 => Err(Error::NoCuda(format!(
                "--gpus all: no CUDA device is visible{whence}"
            ))),
            GpuRequest::All => Ok(visible),
            GpuRequest::Count(n) if n > visible => Err(Error::Invalid(format!(
                "--gpus {n}: only {visible} CUDA device(s) are visible{whence}"
            ))),
            GpuRequest::Count(n) => Ok(n),
        }
    }
}
