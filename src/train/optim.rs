//! AdamW over a model's parameters: f32 moments, an f32 master copy where the backend stores
//! parameters narrower than f32 (`Backend::needs_master`), the global gradient norm
//! (`sum_squares_f32`) and its clip. The state lives on the backend (the `adamw` op) or, with
//! `memory.optimizer = "host"`, in host memory ([`HostState`]: page-locked on CUDA,
//! `Backend::host_f32`): then the update runs on the host ([`crate::backend::host_adamw`], the
//! device kernel's math) as a pipeline over the backward's parameter groups (the decoder
//! layers, the embedding, the head: `model::grad_sink::close_order`). With the clip scale known
//! from the global norm, group i + 1's f32 gradients download into a page-locked staging buffer
//! on the device-to-host copy stream (after the compute stream's work, by an event) while the
//! host updates group i, and group i - 1's new weights (rounded to bf16 on CUDA, to nearest
//! even as the kernel does) upload from another staging buffer on the host-to-device copy
//! stream (one update takes at most [`HOST_STAGES`] buffers of the largest group); a staging buffer is
//! reused only after its copy completed (`Backend::download_f32_async`,
//! `Backend::upload_async`, [`crate::backend::HostCopy`]). The last uploads are ordered before
//! the next step's work on the compute stream by their events. The CPU backend runs the same
//! code with synchronous copies. In a data-parallel run the state is sharded over the ranks
//! ([`ShardedAdamW`], ZeRO stage 2) and every update is [`AdamW::step_shards`] after the
//! backward summed into [`ShardedAdamW::sink`].

use std::borrow::Cow;
use std::collections::VecDeque;
use std::ops::Range;

use crate::backend::{host_adamw, AdamWStep, Backend, HostCopy, HostF32};
use crate::dist::{Collective, ShardPlan};
use crate::model::Model;
use crate::train::config::OptimConfig;
use crate::train::host_grads::Grads;
use crate::train::zero::ShardedAdamW;
use crate::{Error, Result};

/// Optimizer state, one entry per parameter tensor in layout order.
pub struct AdamW<B: Backend> {
    pub m: Vec<B::F>,
    pub v: Vec<B::F>,
    /// f32 master copies (only where the backend needs them).
    pub master: Option<Vec<B::F>>,
    /// The state in host memory (`m`, `v` empty and `master` None then).
    pub host: Option<HostState>,
    /// This rank's shards of the state in a data-parallel run (`m`, `v` empty, `master` and
    /// `host` None then).
    pub shards: Option<ShardedAdamW<B>>,
    /// Updates taken so far (the bias-correction step is `updates + 1` for the next one).
    pub updates: u64,
    pub cfg: OptimConfig,
}

/// Host-resident optimizer state, one entry per parameter tensor in layout order, in
/// `Backend::host_f32` memory (page-locked on CUDA), with the update's staging buffers.
pub struct HostState {
    pub m: Vec<HostF32>,
    pub v: Vec<HostF32>,
    /// f32 master copies where the backend needs them (else the parameters are f32 and the
    /// update downloads them).
    pub master: Option<Vec<HostF32>>,
    /// The pipeline's parameter groups, in update order (every tensor in exactly one).
    pub groups: Vec<Range<usize>>,
    /// Whether the update overlaps the copies of neighbouring groups with the host update
    /// (true), or waits for each group's download and upload before going on (false: the
    /// synchronous schedule, same values).
    pub pipelined: bool,
    /// Free staging buffers, each of `stage_len` values (the largest group's).
    stages: Vec<HostF32>,
    stage_len: usize,
    /// The last update's uploads, ordered before later compute-stream work; waited for before
    /// their staging buffers are used again.
    inflight: Vec<HostCopy>,
}

/// Staging buffers of the host update: two for gradient downloads (group i + 1 arriving while
/// group i is updated), two for weight uploads (group i's leaving while group i - 1's may still
/// be queued).
pub const HOST_STAGES: usize = 4;

impl HostState {
    /// Host bytes of the state of `numel` parameters (`master`: with f32 master copies) and its
    /// staging buffers for groups of at most `largest_group` values.
    pub fn bytes(numel: u64, master: bool, largest_group: u64) -> Option<u64> {
        let per = if master { 12 } else { 8 };
        numel
            .checked_mul(per)?
            .checked_add(largest_group.checked_mul(4 * HOST_STAGES as u64)?)
    }

    /// A free staging buffer: the oldest in-flight upload's, after waiting for it, when none is
    /// free (a new one only if an earlier update stopped on an error with buffers in flight).
    fn stage<B: Backend>(&mut self, b: &B, uploads: &mut VecDeque<HostCopy>) -> Result<HostF32> {
        if let Some(s) = self.stages.pop() {
            return Ok(s);
        }
        match uploads.pop_front() {
            Some(u) => u.wait(),
            None => b.host_f32(self.stage_len),
        }
    }
}

/// The groups of the host update: the backward's groups (`model::grad_sink::close_order`) in
/// layout order (embedding first), or one per tensor if they do not cover every tensor once.
fn host_groups(layout: &crate::model::ParamLayout) -> Vec<Range<usize>> {
    let n = layout.specs.len();
    let mut groups = crate::model::grad_sink::close_order(layout);
    groups.reverse();
    let mut seen = vec![0u8; n];
    for g in &groups {
        for i in g.clone() {
            if let Some(s) = seen.get_mut(i) {
                *s += 1;
            }
        }
    }
    if groups.iter().all(|g| g.end <= n) && seen.iter().all(|&s| s == 1) {
        groups
    } else {
        (0..n).map(|i| i..i + 1).collect()
    }
}

/// The optimizer tensor groups of a checkpoint, in file order.
pub const STATE_GROUPS: [&str; 3] = ["m", "v", "master"];

/// What one optimizer update did.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct UpdateStats {
    /// Global L2 norm of the gradient before clipping.
    pub grad_norm: f64,
    pub lr: f32,
    /// Factor the gradient was scaled by (1.0 = not clipped).
    pub grad_scale: f32,
}

impl<B: Backend> AdamW<B> {
    /// Fresh state on the backend: zero moments and, where needed, a master copy of the
    /// current parameters.
    pub fn new(b: &B, model: &Model<B>, cfg: OptimConfig) -> Result<Self> {
        Self::placed(b, model, cfg, false)
    }

    /// Fresh state on the backend (`host` false) or in host memory (`host` true).
    pub fn placed(b: &B, model: &Model<B>, cfg: OptimConfig, host: bool) -> Result<Self> {
        let specs = &model.layout.specs;
        if host {
            let groups = host_groups(&model.layout);
            let largest = groups
                .iter()
                .map(|g| specs[g.clone()].iter().map(|s| s.numel()).sum::<usize>())
                .max()
                .unwrap_or(0);
            let numel = specs.iter().map(|s| s.numel() as u64).sum::<u64>();
            let total = HostState::bytes(numel, b.needs_master(), largest as u64);
            crate::safefs::check_host_memory(total, "the host-resident optimizer state")?;
            let zeros = || {
                specs
                    .iter()
                    .map(|s| b.host_f32(s.numel()))
                    .collect::<Result<Vec<_>>>()
            };
            let master = if b.needs_master() {
                let mut ms = Vec::with_capacity(specs.len());
                for (s, p) in specs.iter().zip(&model.params) {
                    let mut h = b.host_f32(s.numel())?;
                    h.copy_from_slice(&b.download(p, s.numel())?);
                    ms.push(h);
                }
                Some(ms)
            } else {
                None
            };
            let stages = (0..HOST_STAGES)
                .map(|_| b.host_f32(largest))
                .collect::<Result<_>>()?;
            return Ok(AdamW {
                m: Vec::new(),
                v: Vec::new(),
                master: None,
                host: Some(HostState {
                    m: zeros()?,
                    v: zeros()?,
                    master,
                    groups,
                    pipelined: true,
                    stages,
                    stage_len: largest,
                    inflight: Vec::new(),
                }),
                shards: None,
                updates: 0,
                cfg,
            });
        }
        let m = specs
            .iter()
            .map(|s| b.zeros_f32(s.numel()))
            .collect::<Result<Vec<_>>>()?;
        let v = specs
            .iter()
            .map(|s| b.zeros_f32(s.numel()))
            .collect::<Result<Vec<_>>>()?;
        let master = if b.needs_master() {
            let mut ms = Vec::with_capacity(specs.len());
            for (s, p) in specs.iter().zip(&model.params) {
                let host = b.download(p, s.numel())?;
                ms.push(b.upload_f32(&host)?);
            }
            Some(ms)
        } else {
            None
        };
        Ok(AdamW {
            m,
            v,
            master,
            host: None,
            shards: None,
            updates: 0,
            cfg,
        })
    }

    /// Fresh state of rank `rank` of `plan`, sharded (see [`ShardedAdamW::new`]).
    pub fn sharded(
        b: &B,
        model: &Model<B>,
        cfg: OptimConfig,
        plan: ShardPlan,
        rank: usize,
    ) -> Result<Self> {
        let z = ShardedAdamW::new(b, model, cfg.clone(), plan, rank)?;
        Ok(AdamW {
            m: Vec::new(),
            v: Vec::new(),
            master: None,
            host: None,
            shards: Some(z),
            updates: 0,
            cfg,
        })
    }

    /// Zeroed gradients for the model's backward ([`Grads::new`], in host memory when `host`);
    /// none for a sharded state, whose backward writes into [`ShardedAdamW::sink`].
    pub fn alloc_grads(&self, b: &B, model: &Model<B>, host: bool) -> Result<Grads<B>> {
        match &self.shards {
            Some(_) => {
                crate::ensure!(
                    !host,
                    "memory.grads = \"host\" is not available with more than one rank (the \
                     gradients are reduced into shards per layer instead)"
                );
                Ok(Grads::Device(Vec::new()))
            }
            None => Grads::new(b, model, host),
        }
    }

    /// Sets the count of updates taken (a resumed run's).
    pub fn set_updates(&mut self, updates: u64) {
        self.updates = updates;
        if let Some(z) = &mut self.shards {
            z.updates = updates;
        }
    }

    /// Tensor `i` (of `n` elements) of `group` on the host, whole: from every rank's shard
    /// through `comm` when the state is sharded (every rank calls it, in the same order), else
    /// [`AdamW::state_to_host`].
    pub fn gather_state(
        &self,
        b: &B,
        comm: Option<&dyn Collective<B>>,
        group: &str,
        i: usize,
        n: usize,
    ) -> Result<Vec<f32>> {
        let (Some(z), Some(comm)) = (&self.shards, comm) else {
            return self.state_to_host(b, group, i, n);
        };
        let t = z.plan.tensors.get(i).copied().ok_or_else(|| {
            Error::Invalid(format!("optimizer state has no `{group}` tensor {i}"))
        })?;
        let shard = match group {
            "m" => z.m.get(i),
            "v" => z.v.get(i),
            "master" => z.master.as_ref().and_then(|ms| ms.get(i)),
            _ => None,
        };
        let r = match shard {
            Some(s) => b.download_f32(s, t.shard),
            None => Err(Error::Invalid(format!(
                "optimizer state has no `{group}` tensor {i}"
            ))),
        };
        let local = match r {
            Ok(v) => v,
            Err(e) => {
                comm.abort(&e.to_string());
                return Err(e);
            }
        };
        let mut full = comm.all_gather_host(&local)?;
        full.truncate(n.min(t.numel));
        Ok(full)
    }

    /// Whether the state lives in host memory.
    pub fn on_host(&self) -> bool {
        self.host.is_some()
    }

    /// Whether the state has a master copy (saved as the `master` group).
    pub fn has_master(&self) -> bool {
        if let Some(z) = &self.shards {
            return z.master.is_some();
        }
        match &self.host {
            Some(h) => h.master.is_some(),
            None => self.master.is_some(),
        }
    }

    /// The groups of [`STATE_GROUPS`] this state has.
    pub fn groups(&self) -> Vec<&'static str> {
        let n = if self.has_master() { 3 } else { 2 };
        STATE_GROUPS[..n].to_vec()
    }

    /// Tensor `i` (of `n` elements) of `group` on the host.
    pub fn state_to_host(&self, b: &B, group: &str, i: usize, n: usize) -> Result<Vec<f32>> {
        let missing = || Error::Invalid(format!("optimizer state has no `{group}` tensor {i}"));
        if self.shards.is_some() {
            return Err(Error::Invalid(format!(
                "optimizer tensor `{group}` {i} is sharded over ranks: gather it \
                 (AdamW::gather_state)"
            )));
        }
        match &self.host {
            Some(h) => {
                let t = match group {
                    "m" => h.m.get(i),
                    "v" => h.v.get(i),
                    "master" => h.master.as_ref().and_then(|ms| ms.get(i)),
                    _ => None,
                }
                .ok_or_else(missing)?;
                Ok(t[..n.min(t.len())].to_vec())
            }
            None => {
                let t = match group {
                    "m" => self.m.get(i),
                    "v" => self.v.get(i),
                    "master" => self.master.as_ref().and_then(|ms| ms.get(i)),
                    _ => None,
                }
                .ok_or_else(missing)?;
                b.download_f32(t, n)
            }
        }
    }

    /// Replace tensor `i` of `group` with `data` (the whole tensor: a sharded state keeps its
    /// rank's shard of it).
    pub fn set_state(&mut self, b: &B, group: &str, i: usize, data: Vec<f32>) -> Result<()> {
        let missing = || Error::Invalid(format!("optimizer state has no `{group}` tensor {i}"));
        if let Some(z) = &mut self.shards {
            let t = z.plan.tensors.get(i).copied().ok_or_else(missing)?;
            crate::ensure!(
                data.len() == t.numel,
                "optimizer tensor `{group}` {i}: {} values for a tensor of {}",
                data.len(),
                t.numel
            );
            let own = t.owned(z.rank);
            let mut shard = vec![0.0f32; t.shard];
            shard[..own.len()].copy_from_slice(&data[own]);
            let slot = match group {
                "m" => z.m.get_mut(i),
                "v" => z.v.get_mut(i),
                "master" => z.master.as_mut().and_then(|ms| ms.get_mut(i)),
                _ => None,
            }
            .ok_or_else(missing)?;
            *slot = b.upload_f32(&shard)?;
            return Ok(());
        }
        match &mut self.host {
            Some(h) => {
                let t = match group {
                    "m" => h.m.get_mut(i),
                    "v" => h.v.get_mut(i),
                    "master" => h.master.as_mut().and_then(|ms| ms.get_mut(i)),
                    _ => None,
                }
                .ok_or_else(missing)?;
                crate::ensure!(
                    data.len() == t.len(),
                    "optimizer tensor `{group}` {i}: {} values for a tensor of {}",
                    data.len(),
                    t.len()
                );
                t.copy_from_slice(&data);
            }
            None => {
                let t = match group {
                    "m" => self.m.get_mut(i),
                    "v" => self.v.get_mut(i),
                    "master" => self.master.as_mut().and_then(|ms| ms.get_mut(i)),
                    _ => None,
                }
                .ok_or_else(missing)?;
                *t = b.upload_f32(&data)?;
            }
        }
        Ok(())
    }

    /// Sum of squares of every parameter (f64): a NaN or Inf anywhere makes it non-finite. It
    /// reads the f32 master copy where there is one (one reduction pass, cheaper than the
    /// AdamW update that precedes it); otherwise the parameters themselves, which are f32 on
    /// such a backend, through a download.
    pub fn param_sum_squares(&self, b: &B, model: &Model<B>) -> Result<f64> {
        let mut total = 0.0f64;
        if let Some(h) = &self.host {
            for (i, s) in model.layout.specs.iter().enumerate() {
                let host;
                let x: &[f32] = match &h.master {
                    Some(ms) => &ms[i],
                    None => {
                        host = b.download(&model.params[i], s.numel())?;
                        &host
                    }
                };
                total += x.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>();
            }
            return Ok(total);
        }
        let lens: Vec<usize> = model.layout.specs.iter().map(|s| s.numel()).collect();
        weights_sum_squares(b, self.master.as_deref(), &model.params, &lens)
    }

    /// Global gradient L2 norm over every parameter.
    pub fn grad_norm(b: &B, model: &Model<B>, grads: &[B::F]) -> Result<f64> {
        let mut total = 0.0f64;
        for (s, g) in model.layout.specs.iter().zip(grads) {
            total += b.sum_squares_f32(g, s.numel())?;
        }
        Ok(total.sqrt())
    }

    /// Clip by global norm, then one AdamW step on every parameter. `total_updates` sizes the
    /// learning-rate schedule. A non-finite gradient norm is an error (the update is skipped).
    pub fn step(
        &mut self,
        b: &B,
        model: &mut Model<B>,
        grads: &[B::F],
        total_updates: u64,
    ) -> Result<UpdateStats> {
        if self.shards.is_some() {
            return Err(Error::Invalid(
                "AdamW: a sharded optimizer steps with its rank group (AdamW::step_shards)".into(),
            ));
        }
        if grads.len() != model.params.len() {
            return Err(Error::Invalid(format!(
                "AdamW: {} gradients for {} parameters",
                grads.len(),
                model.params.len()
            )));
        }
        let grad_norm = Self::grad_norm(b, model, grads)?;
        self.update(b, model, grad_norm, total_updates, |i| {
            Ok(Grad::Device(&grads[i]))
        })
    }

    /// [`AdamW::step`] on the gradients of a run, on the backend or in host memory. Host
    /// gradients are uploaded one tensor at a time for the norm (so it is the backend's
    /// reduction, the same as for resident gradients) and, with the state on the backend, again
    /// for the update; with the state on the host the update reads them where they are.
    pub fn step_grads(
        &mut self,
        b: &B,
        model: &mut Model<B>,
        grads: &Grads<B>,
        total_updates: u64,
    ) -> Result<UpdateStats> {
        if self.shards.is_some() {
            return Err(Error::Invalid(
                "AdamW: a sharded optimizer steps with its rank group (AdamW::step_shards)".into(),
            ));
        }
        // The backward's activation blocks are free now: released before the update allocates
        // buffers of other sizes (host gradients uploaded for the norm, new weights from the
        // host update), which the norm's host readback waits for anyway.
        b.release_cached()?;
        let h = match grads {
            Grads::Device(g) => return self.step(b, model, g, total_updates),
            Grads::Host(h) => h,
        };
        if h.len() != model.params.len() {
            return Err(Error::Invalid(format!(
                "AdamW: {} gradients for {} parameters",
                h.len(),
                model.params.len()
            )));
        }
        let mut total = 0.0f64;
        for (i, s) in model.layout.specs.iter().enumerate() {
            let g = b.upload_f32(&h.tensor(i))?;
            total += b.sum_squares_f32(&g, s.numel())?;
        }
        let grad_norm = total.sqrt();
        self.update(b, model, grad_norm, total_updates, |i| {
            Ok(Grad::Host(h.tensor(i)))
        })
    }

    /// The clip and AdamW update after the gradient norm, tensor `i`'s gradient from `grad(i)`.
    fn update<'g>(
        &mut self,
        b: &B,
        model: &mut Model<B>,
        grad_norm: f64,
        total_updates: u64,
        grad: impl Fn(usize) -> Result<Grad<'g, B>>,
    ) -> Result<UpdateStats>
    where
        B::F: 'g,
    {
        check_grad_norm(grad_norm, self.updates)?;
        let hp = step_hparams(&self.cfg, self.updates, total_updates, grad_norm);
        let (lr, grad_scale) = (hp.lr, hp.grad_scale);
        if let Some(h) = &mut self.host {
            host_update(b, h, model, &hp, &grad)?;
        }
        for i in 0..self.m.len().min(model.params.len()) {
            let n = model.layout.specs[i].numel();
            let master = self.master.as_mut().map(|ms| &mut ms[i]);
            let uploaded;
            let g = match grad(i)? {
                Grad::Device(d) => d,
                Grad::Host(h) => {
                    uploaded = b.upload_f32(&h)?;
                    &uploaded
                }
            };
            b.adamw(
                crate::backend::AdamWState {
                    param: &mut model.params[i],
                    master,
                    m: &mut self.m[i],
                    v: &mut self.v[i],
                },
                g,
                n,
                &hp,
            )?;
        }
        self.updates += 1;
        let sq = self.param_sum_squares(b, model)?;
        check_weights(&self.cfg, sq, self.updates, grad_norm, lr)?;
        Ok(UpdateStats {
            grad_norm,
            lr,
            grad_scale,
        })
    }
}

impl<B: Backend> AdamW<B> {
    /// This rank's shards of a sharded state (their gradient sink for the backward).
    pub fn shards_mut(&mut self) -> Result<&mut ShardedAdamW<B>> {
        self.shards.as_mut().ok_or_else(|| {
            Error::Invalid("AdamW: the optimizer state is not sharded over ranks".into())
        })
    }

    /// One update of a sharded state from the gradient shards the ranks' backward passes
    /// summed (through [`ShardedAdamW::sink`]): global-norm clip, AdamW on the shards, the new
    /// weights gathered into `model` on every rank.
    pub fn step_shards(
        &mut self,
        b: &B,
        comm: &dyn Collective<B>,
        model: &mut Model<B>,
        total_updates: u64,
    ) -> Result<UpdateStats> {
        let z = self.shards_mut()?;
        let u = z.step(b, comm, model, total_updates)?;
        self.updates = z.updates;
        Ok(u)
    }
}

/// One tensor's gradient as the update reads it.
enum Grad<'a, B: Backend>
where
    B::F: 'a,
{
    Device(&'a B::F),
    Host(Cow<'a, [f32]>),
}

/// A group's gradients as the host update reads them: downloading into a staging buffer, or
/// in host memory already.
enum GroupGrads<'a> {
    Download(HostCopy),
    Host(Vec<Cow<'a, [f32]>>),
}

/// Queues (or takes) the gradients of `group`.
fn fetch_group<'g, B: Backend>(
    b: &B,
    h: &mut HostState,
    uploads: &mut VecDeque<HostCopy>,
    model: &Model<B>,
    group: Range<usize>,
    grad: &impl Fn(usize) -> Result<Grad<'g, B>>,
) -> Result<GroupGrads<'g>>
where
    B::F: 'g,
{
    let mut dev = Vec::new();
    let mut host = Vec::new();
    for i in group {
        let n = model.layout.specs[i].numel();
        match grad(i)? {
            Grad::Device(d) => dev.push((d, n)),
            Grad::Host(c) => host.push(c),
        }
    }
    if dev.is_empty() {
        return Ok(GroupGrads::Host(host));
    }
    crate::ensure!(
        host.is_empty(),
        "host optimizer: a group mixes device and host gradients"
    );
    let stage = h.stage(b, uploads)?;
    Ok(GroupGrads::Download(b.download_f32_async(&dev, stage)?))
}

/// The host AdamW update of every group of `h` (see the module docs for the pipeline).
fn host_update<'g, B: Backend>(
    b: &B,
    h: &mut HostState,
    model: &mut Model<B>,
    hp: &AdamWStep,
    grad: &impl Fn(usize) -> Result<Grad<'g, B>>,
) -> Result<()>
where
    B::F: 'g,
{
    // The previous update's uploads completed before their staging buffers are reused.
    for u in std::mem::take(&mut h.inflight) {
        h.stages.push(u.wait()?);
    }
    let groups = h.groups.clone();
    let mut uploads: VecDeque<HostCopy> = VecDeque::new();
    let mut next = match groups.first() {
        Some(g) => Some(fetch_group(b, h, &mut uploads, model, g.clone(), grad)?),
        None => None,
    };
    for (gi, group) in groups.iter().enumerate() {
        let this = next.take();
        if h.pipelined {
            if let Some(g) = groups.get(gi + 1) {
                next = Some(fetch_group(b, h, &mut uploads, model, g.clone(), grad)?);
            }
        }
        let (staged, host) = match this {
            Some(GroupGrads::Download(c)) => (Some(c.wait()?), Vec::new()),
            Some(GroupGrads::Host(v)) => (None, v),
            None => (None, Vec::new()),
        };
        let has_master = h.master.is_some();
        let mut at = 0;
        let mut news = Vec::with_capacity(group.len());
        for (k, i) in group.clone().enumerate() {
            let n = model.layout.specs[i].numel();
            let g: &[f32] = match &staged {
                Some(s) => &s[at..at + n],
                None => &host[k],
            };
            at += n;
            let mut downloaded;
            let p: &mut [f32] = match &mut h.master {
                Some(ms) => &mut ms[i],
                None => {
                    downloaded = b.download(&model.params[i], n)?;
                    &mut downloaded
                }
            };
            host_adamw::adamw(p, g, &mut h.m[i], &mut h.v[i], n, hp);
            if !has_master {
                news.push(b.upload(p)?);
            }
        }
        if let Some(s) = staged {
            h.stages.push(s);
        }
        let stage = match has_master {
            true => Some(h.stage(b, &mut uploads)?),
            false => None,
        };
        let mut up = None;
        if let (Some(ms), Some(stage)) = (&h.master, stage) {
            let src: Vec<&[f32]> = group.clone().map(|i| &ms[i][..]).collect();
            let (ts, copy) = b.upload_async(&src, stage)?;
            news = ts;
            up = Some(copy);
        }
        if let Some(up) = up {
            if h.pipelined {
                uploads.push_back(up);
            } else {
                h.stages.push(up.wait()?);
            }
        }
        for (i, t) in group.clone().zip(news) {
            model.params[i] = t;
        }
        if !h.pipelined {
            if let Some(g) = groups.get(gi + 1) {
                next = Some(fetch_group(b, h, &mut uploads, model, g.clone(), grad)?);
            }
        }
    }
    // Nothing on the compute stream reads the new weights during the update. The next step's
    // work runs after the uploads still in flight (events on the compute stream); the host
    // waits for them only before their staging buffers are used again.
    for u in uploads.iter_mut() {
        u.order()?;
    }
    h.inflight = uploads.into_iter().collect();
    Ok(())
}

/// Zero every gradient buffer.
pub fn zero_grads<B: Backend>(b: &B, model: &Model<B>, grads: &mut [B::F]) -> Result<()> {
    for (s, g) in model.layout.specs.iter().zip(grads.iter_mut()) {
        b.fill_f32(g, s.numel(), 0.0)?;
    }
    Ok(())
}

/// The hyper-parameters of optimizer update `updates + 1` of `total_updates`, with global-norm
/// clipping: the gradient is scaled by clip / (norm + 1e-6) when its norm exceeds
/// `cfg.grad_clip` > 0, else by 1.
pub fn step_hparams(
    cfg: &OptimConfig,
    updates: u64,
    total_updates: u64,
    grad_norm: f64,
) -> AdamWStep {
    let clip = cfg.grad_clip as f64;
    let grad_scale = if clip > 0.0 && grad_norm > clip {
        (clip / (grad_norm + 1e-6)) as f32
    } else {
        1.0
    };
    AdamWStep {
        lr: cfg.lr_at(updates, total_updates),
        beta1: cfg.beta1,
        beta2: cfg.beta2,
        eps: cfg.eps,
        weight_decay: cfg.weight_decay,
        step: updates + 1,
        grad_scale,
    }
}

/// A non-finite gradient norm stops the update (`updates`: updates taken before it).
pub fn check_grad_norm(grad_norm: f64, updates: u64) -> Result<()> {
    if grad_norm.is_finite() {
        return Ok(());
    }
    Err(Error::msg(format!(
        "gradient norm is {grad_norm} at optimizer update {}; the update was skipped (lower \
         optim.lr or check the data)",
        updates + 1
    )))
}

/// Weights whose sum of squares `sq` is no longer finite after update `updates` stop the run
/// before anything is saved.
pub fn check_weights(
    cfg: &OptimConfig,
    sq: f64,
    updates: u64,
    grad_norm: f64,
    lr: f32,
) -> Result<()> {
    if sq.is_finite() {
        return Ok(());
    }
    Err(Error::msg(format!(
        "the weights are no longer finite after optimizer update {updates} (sum of squares \
         {sq}; gradient norm before it {grad_norm:.4e}, learning rate {lr:e}); the run stopped \
         before saving them. Likely cause: optim.lr = {:e} or optim.weight_decay = {:e} is too \
         large, or optim.eps = {:e} too small. The last checkpoint written is still the latest",
        cfg.lr, cfg.weight_decay, cfg.eps
    )))
}

/// Sum of squares (f64) of `lens[i]` elements of every tensor i: of its f32 master copy where
/// there are masters, else of the weights themselves (f32 on such a backend) through a
/// download.
pub fn weights_sum_squares<B: Backend>(
    b: &B,
    master: Option<&[B::F]>,
    params: &[B::T],
    lens: &[usize],
) -> Result<f64> {
    let mut total = 0.0f64;
    for (i, &n) in lens.iter().enumerate() {
        total += match master {
            Some(ms) => b.sum_squares_f32(&ms[i], n)?,
            None => b
                .download(&params[i], n)?
                .iter()
                .map(|&x| (x as f64) * (x as f64))
                .sum::<f64>(),
        };
    }
    Ok(total)
}
