//! AdamW with sharded gradients and optimizer state (ZeRO stage 2): each rank keeps, for its
//! shard of every tensor (see [`crate::dist::shard`]), the f32 gradient accumulator, the AdamW moments
//! and (where the backend stores narrower weights) the f32 master copy; the full weights stay
//! replicated on every rank.
//!
//! One optimizer update on every rank:
//! 1. during each micro-batch's backward, [`ShardSink`] sums each closed group's gradients
//!    over the ranks into the shards (a reduce-scatter added into the accumulators, which may
//!    run beside the rest of the backward); [`ShardedAdamW::reduce_bucket`] does the same for
//!    a bucket of whole-model gradient buffers and zeroes them;
//! 2. [`ShardedAdamW::step`] waits for the queued reductions
//!    ([`Collective::wait_reduced`]), takes the global gradient norm from the shards (one host sum over
//!    the ranks), clips as [`crate::train::optim::AdamW`] does, runs the backend's AdamW on each
//!    shard, all-gathers the new weights into every rank's full tensors and zeroes the shards.
//!
//! The update of an element depends only on that element's gradient sum, moments and weight,
//! so on the CPU backend, where the rank sums run in rank order, the weights equal those of a
//! single-rank AdamW given the same summed gradient bit for bit (when clipping is off; with
//! clipping, the norm's f64 sum runs in a different order, which can move the clip scale by an
//! ulp).

use crate::backend::Backend;
use crate::dist::{Collective, ShardPlan};
use crate::model::grad_sink::OpenGroups;
use crate::model::{GradSink, Model};
use crate::train::config::OptimConfig;
use crate::train::optim::{
    check_grad_norm, check_weights, step_hparams, weights_sum_squares, UpdateStats,
};
use crate::{Error, Result};

/// Sharded optimizer state of one rank, one entry per tensor in layout order; every buffer
/// holds `plan.tensors[i].shard` elements.
pub struct ShardedAdamW<B: Backend> {
    pub plan: ShardPlan,
    pub rank: usize,
    /// The rank's shard of every parameter, the one AdamW updates (then gathered).
    pub param: Vec<B::T>,
    /// f32 master shards (only where the backend needs them).
    pub master: Option<Vec<B::F>>,
    pub m: Vec<B::F>,
    pub v: Vec<B::F>,
    /// Gradient shards, summed over ranks and micro-batches since the last update.
    pub grad: Vec<B::F>,
    /// Gather buffer of the largest padded tensor.
    gather: B::T,
    /// Updates taken so far.
    pub updates: u64,
    pub cfg: OptimConfig,
}

impl<B: Backend> ShardedAdamW<B> {
    /// Fresh state for rank `rank` of `plan`: zero moments and gradient shards, and the rank's
    /// shard of the model's current weights (zero-padded past the tensor's end).
    pub fn new(
        b: &B,
        model: &Model<B>,
        cfg: OptimConfig,
        plan: ShardPlan,
        rank: usize,
    ) -> Result<Self> {
        crate::ensure!(
            rank < plan.world,
            "sharded AdamW: rank {rank} of a {}-rank plan",
            plan.world
        );
        crate::ensure!(
            plan.tensors.len() == model.params.len(),
            "sharded AdamW: a plan of {} tensors for a model of {}",
            plan.tensors.len(),
            model.params.len()
        );
        let needs_master = b.needs_master();
        let (mut param, mut master) = (Vec::new(), Vec::new());
        let (mut m, mut v, mut grad) = (Vec::new(), Vec::new(), Vec::new());
        let mut widest = 0;
        for (t, p) in plan.tensors.iter().zip(&model.params) {
            let full = b.download(p, t.numel)?;
            let mut shard = vec![0.0f32; t.shard];
            let own = t.owned(rank);
            shard[..own.len()].copy_from_slice(&full[own]);
            param.push(b.upload(&shard)?);
            if needs_master {
                master.push(b.upload_f32(&shard)?);
            }
            m.push(b.zeros_f32(t.shard)?);
            v.push(b.zeros_f32(t.shard)?);
            grad.push(b.zeros_f32(t.shard)?);
            widest = widest.max(t.padded(plan.world));
        }
        let gather = b.zeros(widest)?;
        Ok(ShardedAdamW {
            plan,
            rank,
            param,
            master: needs_master.then_some(master),
            m,
            v,
            grad,
            gather,
            updates: 0,
            cfg,
        })
    }

    /// Zeroed full-size gradient buffers for the model's backward, padded to world * shard
    /// elements (the backward writes the first numel; the padding stays zero).
    pub fn alloc_grads(&self, b: &B) -> Result<Vec<B::F>> {
        self.plan
            .tensors
            .iter()
            .map(|t| b.zeros_f32(t.padded(self.plan.world)))
            .collect()
    }

    /// Sums bucket `bucket`'s gradients over the ranks into this rank's shards, then zeroes
    /// those full gradients. Every rank calls it for the same buckets in the same order.
    pub fn reduce_bucket(
        &mut self,
        b: &B,
        comm: &dyn Collective<B>,
        grads: &mut [B::F],
        bucket: usize,
    ) -> Result<()> {
        let range = self.plan.buckets.get(bucket).cloned().ok_or_else(|| {
            let msg = format!(
                "sharded AdamW: bucket {bucket} of a plan with {}",
                self.plan.buckets.len()
            );
            comm.abort(&msg);
            Error::Invalid(msg)
        })?;
        if grads.len() != self.plan.tensors.len() {
            let msg = format!(
                "sharded AdamW: {} gradients for {} tensors",
                grads.len(),
                self.plan.tensors.len()
            );
            comm.abort(&msg);
            return Err(Error::Invalid(msg));
        }
        for i in range {
            let t = self.plan.tensors[i];
            let r = comm
                .reduce_scatter_add(b, &grads[i], &mut self.grad[i], t.shard)
                .and_then(|_| b.fill_f32(&mut grads[i], t.numel, 0.0));
            if let Err(e) = r {
                comm.abort(&e.to_string());
                return Err(e);
            }
        }
        Ok(())
    }

    /// [`ShardedAdamW::reduce_bucket`] for every bucket.
    pub fn reduce_all(
        &mut self,
        b: &B,
        comm: &dyn Collective<B>,
        grads: &mut [B::F],
    ) -> Result<()> {
        for k in 0..self.plan.buckets.len() {
            self.reduce_bucket(b, comm, grads, k)?;
        }
        Ok(())
    }

    /// The sink a backward writes this rank's gradients into ([`ShardSink`]).
    pub fn sink<'a>(&'a mut self, comm: &'a dyn Collective<B>, embed: usize) -> ShardSink<'a, B> {
        ShardSink::new(self, comm, embed)
    }

    /// Global-norm clipping and one AdamW step on the shards, then the new weights gathered into
    /// `model` on every rank. `total_updates` sizes the learning-rate schedule. A non-finite
    /// gradient norm is an error on every rank (the norm is the same everywhere), and the
    /// update is skipped.
    pub fn step(
        &mut self,
        b: &B,
        comm: &dyn Collective<B>,
        model: &mut Model<B>,
        total_updates: u64,
    ) -> Result<UpdateStats> {
        let r = self.step_inner(b, comm, model, total_updates);
        if let Err(e) = &r {
            comm.abort(&e.to_string());
        }
        r
    }

    fn step_inner(
        &mut self,
        b: &B,
        comm: &dyn Collective<B>,
        model: &mut Model<B>,
        total_updates: u64,
    ) -> Result<UpdateStats> {
        // The shards' reductions may still be running beside the compute work.
        comm.wait_reduced(b)?;
        let mut sq = [0.0f64];
        for (t, g) in self.plan.tensors.iter().zip(&self.grad) {
            sq[0] += b.sum_squares_f32(g, t.shard)?;
        }
        comm.all_reduce_host(&mut sq)?;
        let grad_norm = sq[0].sqrt();
        check_grad_norm(grad_norm, self.updates)?;
        let hp = step_hparams(&self.cfg, self.updates, total_updates, grad_norm);
        for i in 0..self.plan.tensors.len() {
            let t = self.plan.tensors[i];
            let master = self.master.as_mut().map(|ms| &mut ms[i]);
            b.adamw(
                crate::backend::AdamWState {
                    param: &mut self.param[i],
                    master,
                    m: &mut self.m[i],
                    v: &mut self.v[i],
                },
                &self.grad[i],
                t.shard,
                &hp,
            )?;
            comm.all_gather(b, &self.param[i], &mut self.gather, t.shard)?;
            b.copy(&self.gather, &mut model.params[i], t.numel)?;
            b.fill_f32(&mut self.grad[i], t.shard, 0.0)?;
        }
        self.updates += 1;
        let mut psq = [self.param_sum_squares(b)?];
        comm.all_reduce_host(&mut psq)?;
        check_weights(&self.cfg, psq[0], self.updates, grad_norm, hp.lr)?;
        Ok(UpdateStats {
            grad_norm,
            lr: hp.lr,
            grad_scale: hp.grad_scale,
        })
    }

    /// Sum of squares of this rank's weight shards (the master where there is one).
    fn param_sum_squares(&self, b: &B) -> Result<f64> {
        let lens: Vec<usize> = self.plan.tensors.iter().map(|t| t.shard).collect();
        weights_sum_squares(b, self.master.as_deref(), &self.param, &lens)
    }
}

/// The gradient sink of a data-parallel rank's backward (ZeRO stage 2): each group the backward
/// opens gets zeroed full-size buffers (padded to whole shards); when it closes, its buffers
/// go to [`Collective::reduce_scatter_add_group`], which reduce-scatters them into this rank's
/// gradient shards (on NCCL's own stream, beside the backward of the next groups) and drops
/// them once that is done. A rank thus holds the full-size gradients of the groups open at
/// once (the head or one decoder layer, plus a tied embedding) and of the groups still being
/// reduced (at most `backend::cuda::PENDING_GROUPS` on CUDA), not the whole model's, and a
/// layer's reduction is queued as soon as its backward is done. [`ShardedAdamW::step`] waits
/// for the reductions before it reads the shards.
///
/// Every rank must close the same groups in the same order, so every rank runs the same
/// number of backward passes per update: a rank with fewer micro-batches than another calls
/// [`ShardSink::pad_passes`], which replays the backward's close order
/// ([`crate::model::grad_sink::close_order`]) with zero gradients.
pub struct ShardSink<'a, B: Backend> {
    opt: &'a mut ShardedAdamW<B>,
    comm: &'a dyn Collective<B>,
    /// The groups now open, with their full-size buffers.
    open: OpenGroups<B::F>,
    /// Backward passes completed (closes of the embedding's group, always the last).
    passes: usize,
    embed: usize,
}

impl<'a, B: Backend> ShardSink<'a, B> {
    /// A sink adding into `opt`'s gradient shards through `comm`; `embed` is the layout's
    /// embedding index (its group's close ends a backward).
    pub fn new(opt: &'a mut ShardedAdamW<B>, comm: &'a dyn Collective<B>, embed: usize) -> Self {
        ShardSink {
            opt,
            comm,
            open: OpenGroups::default(),
            passes: 0,
            embed,
        }
    }

    /// Backward passes completed into this sink.
    pub fn passes(&self) -> usize {
        self.passes
    }

    /// Replays the backward's group closes with zero gradients until `passes` passes are done
    /// (see the type's docs).
    pub fn pad_passes(
        &mut self,
        b: &B,
        layout: &crate::model::ParamLayout,
        passes: usize,
    ) -> Result<()> {
        if self.passes >= passes {
            return Ok(());
        }
        let order = crate::model::grad_sink::close_order(layout);
        while self.passes < passes {
            for g in &order {
                // Whole groups, as the backward closes them: every rank makes the same calls
                // in the same grouping (a collective may block the host until the other ranks
                // have queued the whole group).
                let bufs = self.opt.plan.tensors[g.clone()]
                    .iter()
                    .map(|t| b.zeros_f32(t.padded(self.opt.plan.world)))
                    .collect::<Result<Vec<_>>>();
                let r = bufs.and_then(|bufs| self.reduce_group(b, bufs, g.start));
                if let Err(e) = &r {
                    self.comm.abort(&e.to_string());
                }
                r?;
            }
            self.passes += 1;
        }
        Ok(())
    }

    /// Hands group `first..first + bufs.len()`'s full gradients (padded) to
    /// [`Collective::reduce_scatter_add_group`], summing them over the ranks into this rank's
    /// shards.
    fn reduce_group(&mut self, b: &B, bufs: Vec<B::F>, first: usize) -> Result<()> {
        let end = first + bufs.len();
        let ns: Vec<usize> = self.opt.plan.tensors[first..end]
            .iter()
            .map(|t| t.shard)
            .collect();
        self.comm
            .reduce_scatter_add_group(b, bufs, &mut self.opt.grad[first..end], &ns)
    }
}
impl<B: Backend> GradSink<B> for ShardSink<'_, B> {
    fn tensors(&self) -> usize {
        self.opt.plan.tensors.len()
    }

    fn open(&mut self, b: &B, first: usize, n: usize) -> Result<&mut [B::F]> {
        let plan = &self.opt.plan;
        self.open.open(first, n, plan.tensors.len(), |range| {
            plan.tensors[range]
                .iter()
                .map(|t| b.zeros_f32(t.padded(plan.world)))
                .collect()
        })
    }

    fn close(&mut self, b: &B, first: usize, n: usize) -> Result<()> {
        let bufs = self.open.close(first, n)?;
        let r = self.reduce_group(b, bufs, first);
        if let Err(e) = &r {
            self.comm.abort(&e.to_string());
        }
        r?;
        if first == self.embed {
            self.passes += 1;
        }
        Ok(())
    }
}
