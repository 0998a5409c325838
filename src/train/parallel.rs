//! Data-parallel runs: one [`crate::train::Trainer`] per rank, each in its own thread with its
//! own backend (a CUDA device, or the CPU for rank groups in tests) and its rank's communicator
//! (see [`crate::dist`] for the process model).
//!
//! [`on_ranks`] runs a closure per rank and returns every rank's result, or the error that
//! stopped the group: a rank that fails aborts its communicator (dropping it does the same), so
//! the others get an error at their next collective instead of waiting for it.

use crate::backend::cpu::Cpu;
use crate::backend::cuda::{nccl_group, Cuda};
use crate::dist::host_group;
use crate::train::runner::RankComm;
use crate::{Error, Result};

/// Runs `f(rank, comm)` for every communicator of `comms` (index = rank) on threads of its own;
/// the results by rank, or the first rank's own error (ahead of the errors of ranks that only
/// saw the group stop).
pub fn on_ranks<C: Send, R: Send>(
    comms: Vec<C>,
    f: impl Fn(usize, C) -> Result<R> + Sync,
) -> Result<Vec<R>> {
    let results: Vec<Result<R>> = std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .enumerate()
            .map(|(rank, c)| {
                let f = &f;
                std::thread::Builder::new()
                    .name(format!("rank-{rank}"))
                    .spawn_scoped(s, move || f(rank, c))
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(rank, h)| match h {
                Ok(h) => h.join().unwrap_or_else(|p| {
                    let why = p
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "a panic".into());
                    Err(Error::msg(format!("rank {rank} panicked: {why}")))
                }),
                Err(e) => Err(Error::msg(format!(
                    "cannot start the thread of rank {rank}: {e}"
                ))),
            })
            .collect()
    });
    let mut out = Vec::with_capacity(results.len());
    let mut errors = Vec::new();
    for r in results {
        match r {
            Ok(v) => out.push(v),
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        return Ok(out);
    }
    // A rank's own failure, rather than another rank's report that the group stopped.
    let own = errors
        .iter()
        .position(|e| !e.to_string().contains("stopped the rank group"));
    Err(errors.swap_remove(own.unwrap_or(0)))
}

/// A group of `world` CPU ranks (threads of this process, host collectives in rank order).
pub fn cpu_group(world: usize) -> Result<Vec<(Cpu, RankComm<Cpu>)>> {
    Ok(host_group(world)?
        .into_iter()
        .map(|h| (Cpu, Box::new(h) as RankComm<Cpu>))
        .collect())
}

/// CUDA devices 0..world, one rank each, with their NCCL communicators.
pub fn cuda_group(world: usize) -> Result<Vec<(Cuda, RankComm<Cuda>)>> {
    let devices = (0..world)
        .map(Cuda::with_device)
        .collect::<Result<Vec<_>>>()?;
    let comms = nccl_group(&devices)?;
    Ok(devices
        .into_iter()
        .zip(comms)
        .map(|(d, c)| (d, Box::new(c) as RankComm<Cuda>))
        .collect())
}
