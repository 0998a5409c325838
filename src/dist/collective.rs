//! The collectives data-parallel training needs, over a backend's buffers: the gradient
//! reduce-scatter into shards, the weight all-gather, and host sums (metrics, token counts,
//! norms).
//!
//! Implementations: [`HostRank`] for the CPU backend (rank threads of one process, sums in rank
//! order, so a run is deterministic) and `backend::cuda::NcclRank` for CUDA devices (NCCL).
//! Every collective must be called by every rank of the group in the same order with the same
//! sizes; a rank that fails calls [`Collective::abort`] so that the others get an error
//! instead of waiting for it.

use super::host::HostRank;
use crate::backend::cpu::Cpu;
use crate::backend::{check, Backend};
use crate::Result;

pub trait Collective<B: Backend> {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// v = Σ_ranks v on every rank (host values, f64).
    fn all_reduce_host(&self, v: &mut [f64]) -> Result<()>;
    /// acc[..n] += Σ_ranks send[rank*n .. (rank+1)*n]: this rank's shard of the summed
    /// `send` (world * n elements on every rank) added into its accumulator.
    /// Work queued on `b` after the call sees the sum, and `send` may be reused or dropped.
    fn reduce_scatter_add(&self, b: &B, send: &B::F, acc: &mut B::F, n: usize) -> Result<()>;
    /// [`Collective::reduce_scatter_add`] of `sends[i]` into `accs[i]` with `ns[i]` elements
    /// per rank, for every tensor of one gradient group, taking the `send` buffers. It may
    /// return before the sums are done (NCCL on a stream of its own, beside the compute work
    /// that follows): it then keeps the buffers until they are, and nothing else may read or
    /// write the `accs` before [`Collective::wait_reduced`]. The default runs
    /// [`Collective::reduce_scatter_add`] on each in order.
    fn reduce_scatter_add_group(
        &self,
        b: &B,
        sends: Vec<B::F>,
        accs: &mut [B::F],
        ns: &[usize],
    ) -> Result<()> {
        crate::ensure!(
            sends.len() == accs.len() && accs.len() == ns.len(),
            "reduce_scatter_add_group: {} send buffers, {} accumulators, {} lengths",
            sends.len(),
            accs.len(),
            ns.len()
        );
        for ((send, acc), &n) in sends.iter().zip(accs.iter_mut()).zip(ns) {
            self.reduce_scatter_add(b, send, acc, n)?;
        }
        Ok(())
    }
    /// Work queued on `b` from now on runs after every reduction queued so far (call it before
    /// anything reads or writes the accumulators of [`Collective::reduce_scatter_add_group`]).
    /// The default has nothing to wait for.
    fn wait_reduced(&self, _b: &B) -> Result<()> {
        Ok(())
    }
    /// out[r*n .. (r+1)*n] = the n-element `shard` of rank r, for every rank r.
    fn all_gather(&self, b: &B, shard: &B::T, out: &mut B::T, n: usize) -> Result<()>;
    /// The concatenation of every rank's `v` in rank order, on every rank (host values; every
    /// rank passes the same length).
    fn all_gather_host(&self, v: &[f32]) -> Result<Vec<f32>>;
    /// Stops the group (see the module doc).
    fn abort(&self, why: &str);

    /// v = the elementwise maximum over the ranks of v (host values), through
    /// [`Collective::all_reduce_host`]: each rank places its values in its own row of a
    /// world x len table of zeros, so the sum holds every rank's values exactly.
    fn all_max_host(&self, v: &mut [f64]) -> Result<()> {
        let (k, world, rank) = (v.len(), self.world(), self.rank());
        let mut table = vec![0.0f64; k * world];
        table[rank * k..(rank + 1) * k].copy_from_slice(v);
        self.all_reduce_host(&mut table)?;
        for (j, x) in v.iter_mut().enumerate() {
            *x = (0..world)
                .map(|r| table[r * k + j])
                .fold(f64::NEG_INFINITY, f64::max);
        }
        Ok(())
    }
}

impl Collective<Cpu> for HostRank {
    fn rank(&self) -> usize {
        HostRank::rank(self)
    }
    fn world(&self) -> usize {
        HostRank::world(self)
    }
    fn all_reduce_host(&self, v: &mut [f64]) -> Result<()> {
        self.all_reduce_f64(v)
    }
    fn reduce_scatter_add(
        &self,
        _b: &Cpu,
        send: &Vec<f32>,
        acc: &mut Vec<f32>,
        n: usize,
    ) -> Result<()> {
        let world = HostRank::world(self);
        self.checked(check::reduce_scatter(send, acc, n, world))?;
        self.reduce_scatter_add_f32(&send[..n * world], &mut acc[..n], n)
    }
    fn all_gather(&self, _b: &Cpu, shard: &Vec<f32>, out: &mut Vec<f32>, n: usize) -> Result<()> {
        let world = HostRank::world(self);
        self.checked(check::all_gather(shard, out, n, world))?;
        self.all_gather_f32(&shard[..n], &mut out[..n * world])
    }
    fn all_gather_host(&self, v: &[f32]) -> Result<Vec<f32>> {
        self.all_gather_host_f32(v)
    }
    fn abort(&self, why: &str) {
        HostRank::abort(self, why)
    }
}
