//! NCCL collectives between the CUDA devices of one process ([`crate::dist::Collective`] for
//! [`Cuda`]), through cudarc's dynamically loaded NCCL bindings: a machine without NCCL still
//! builds and runs on one GPU, and asking for more says what is missing.
//!
//! Gradient reductions run on a communication stream of each rank's own ([`NcclStream::Own`],
//! the default), so that a backward group's reduce-scatter overlaps the backward of the groups
//! after it (PyTorch DDP's bucketed all-reduce, Li et al., "PyTorch Distributed", VLDB 2020;
//! ZeRO-2's reduce-scatter per bucket, Rajbhandari et al., SC 2020). For each group
//! ([`Collective::reduce_scatter_add_group`]):
//! 1. an event on the compute stream, which the communication stream waits for (the group's
//!    gradients are written, and the accumulators' last readers and writers, the previous
//!    update's AdamW and zeroing, are done);
//! 2. on the communication stream, per tensor, the reduce-scatter into a scratch shard kept by
//!    the rank and the `add_f32` kernel adding it into the tensor's accumulating shard (the
//!    next tensor's reduce-scatter reuses the scratch after that add, in stream order, and the
//!    next micro-batch's reduction into the same shard comes after this one on the same
//!    stream);
//! 3. an event on the communication stream after them. The group's full-size gradient
//!    buffers (and a scratch shard outgrown meanwhile) are kept in a list with that event: the
//!    caching allocator knows only the compute stream and would hand them to compute work at
//!    once. An entry is dropped when its event has completed (queried, never waited for on the
//!    host) or, when more than [`PENDING_GROUPS`] groups are in flight, after the compute
//!    stream is made to wait for it (on the device), which bounds the gradient memory;
//! 4. [`Collective::wait_reduced`] (before the gradient norm and AdamW read the shards) makes
//!    the compute stream wait for the communication stream's last work and drops the list.
//!
//! No step adds a host synchronisation. The single-tensor [`Collective::reduce_scatter_add`]
//! is steps 1-3 followed by 4, so its `send` is free on return. The weight all-gather after the
//! update stays on the compute stream, behind the wait of step 4: each tensor's gather reads
//! the shard AdamW has just written and is copied into the weights before the next tensor's
//! gather reuses the one gather buffer, so there is no compute work for it to overlap.
//! `TOOLN1_NCCL_STREAM=compute` ([`NcclStream::Compute`]) queues everything on the compute
//! stream in program order instead (the same operations, so the same bits), for debugging.
//!
//! Host sums (metrics, norms) go through the ranks' thread rendezvous, not NCCL. Before each
//! NCCL call the ranks check on the host that they all make the same call (op and count): a
//! rank whose arguments fail the contract, or that stopped, makes the call an error on every
//! rank instead of an NCCL collective that waits forever for it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use cudarc::nccl::{result as nr, sys as ns};

use super::ops;
use super::runtime::{Bf16, CudaBuf, Gpu, SideStream, StreamMark};
use super::Cuda;
use crate::backend::check;
use crate::dist::{host_group, Collective, HostRank};
use crate::{Error, Result};

/// Groups whose reductions may be in flight on the communication stream before the compute
/// stream waits for the oldest: one, so that a layer's reduce-scatter runs beside the next
/// layer's backward while at most one reduced group's full-size gradients wait to be freed.
pub const PENDING_GROUPS: usize = crate::dist::REDUCE_GROUPS_IN_FLIGHT;

/// Which stream an [`NcclRank`]'s gradient reductions are queued on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NcclStream {
    /// A communication stream of the rank's own, ordered against the compute stream by events
    /// (the default; `TOOLN1_NCCL_STREAM=own`).
    Own,
    /// The compute stream, in program order (`TOOLN1_NCCL_STREAM=compute`).
    Compute,
}

impl NcclStream {
    /// `TOOLN1_NCCL_STREAM` (`own`, the default, or `compute`); another value is an error.
    pub fn from_env() -> Result<NcclStream> {
        match std::env::var("TOOLN1_NCCL_STREAM") {
            Err(_) => Ok(NcclStream::Own),
            Ok(v) if v.is_empty() || v == "own" => Ok(NcclStream::Own),
            Ok(v) if v == "compute" => Ok(NcclStream::Compute),
            Ok(v) => Err(Error::Invalid(format!(
                "TOOLN1_NCCL_STREAM={v:?}: expected `own` (collectives on their own stream) or \
                 `compute` (on the compute stream)"
            ))),
        }
    }
}

/// The communication stream of a rank and what its queued work still uses.
struct Lane {
    side: SideStream,
    /// Reductions queued on `side`, oldest first, with the buffers they read or write.
    pending: VecDeque<(StreamMark, Vec<CudaBuf<f32>>)>,
    /// Work was queued on `side` since the compute stream last waited for it.
    unjoined: bool,
}

struct State {
    /// Scratch f32 shard the reduce-scatter writes before the add.
    scratch: Option<CudaBuf<f32>>,
    /// `None` with [`NcclStream::Compute`].
    lane: Option<Lane>,
}

/// One rank of a group of CUDA devices: its NCCL communicator, its device, its communication
/// stream and its handle on the host rendezvous.
pub struct NcclRank {
    comm: ns::ncclComm_t,
    gpu: Arc<Gpu>,
    host: HostRank,
    world: usize,
    state: Mutex<State>,
}

// SAFETY: an NCCL communicator may be used from any one thread at a time; the rank is driven
// by its own worker thread, and every call binds the device's context first.
unsafe impl Send for NcclRank {}

fn nccl(call: &str, e: nr::NcclError) -> Error {
    Error::Cuda(format!("{call}: {e:?}"))
}

/// Whether the NCCL library (libnccl.so.2) can be loaded.
pub fn nccl_available() -> bool {
    unsafe { ns::is_culib_present() }
}

/// One communicator per device of `devices` (rank i = devices[i]), for worker threads to
/// take one each, with the reductions on the stream `TOOLN1_NCCL_STREAM` names
/// ([`NcclStream::from_env`]). Two entries on the same device, or no NCCL library, are errors.
pub fn nccl_group(devices: &[Cuda]) -> Result<Vec<NcclRank>> {
    nccl_group_on(devices, NcclStream::from_env()?)
}

/// [`nccl_group`] with the reductions on `stream`.
pub fn nccl_group_on(devices: &[Cuda], stream: NcclStream) -> Result<Vec<NcclRank>> {
    let n = devices.len();
    crate::ensure!(n >= 1, "an NCCL group needs at least one device");
    let ords: Vec<i32> = devices.iter().map(|d| d.gpu.ordinal as i32).collect();
    for (i, o) in ords.iter().enumerate() {
        crate::ensure!(
            !ords[..i].contains(o),
            "an NCCL group lists CUDA device {o} twice (one rank per device)"
        );
    }
    if !nccl_available() {
        return Err(Error::NoCuda(format!(
            "{n} GPUs need the NCCL library (libnccl.so.2), which was not found on the library \
             path: install NCCL 2 (for example the nvidia-nccl wheel matching the CUDA \
             version) or run on one GPU (--gpus 1)"
        )));
    }
    let lanes = devices
        .iter()
        .map(|d| match stream {
            NcclStream::Own => SideStream::new(&d.gpu).map(|side| {
                Some(Lane {
                    side,
                    pending: VecDeque::new(),
                    unjoined: false,
                })
            }),
            NcclStream::Compute => Ok(None),
        })
        .collect::<Result<Vec<_>>>()?;
    let mut comms: Vec<ns::ncclComm_t> = vec![std::ptr::null_mut(); n];
    unsafe { nr::comm_init_all(comms.as_mut_ptr(), n as i32, ords.as_ptr()) }
        .map_err(|e| nccl("ncclCommInitAll", e))?;
    let hosts = host_group(n)?;
    Ok(comms
        .into_iter()
        .zip(hosts)
        .zip(devices)
        .zip(lanes)
        .map(|(((comm, host), d), lane)| NcclRank {
            comm,
            gpu: d.gpu.clone(),
            host,
            world: n,
            state: Mutex::new(State {
                scratch: None,
                lane,
            }),
        })
        .collect())
}

impl NcclRank {
    /// `r`, stopping the group first when it is an error.
    fn checked<T>(&self, r: Result<T>) -> Result<T> {
        self.host.checked(r)
    }

    fn compute_stream(&self) -> ns::cudaStream_t {
        self.gpu.stream as ns::cudaStream_t
    }

    /// Which stream the reductions run on.
    pub fn stream_kind(&self) -> NcclStream {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.lane.is_some() {
            NcclStream::Own
        } else {
            NcclStream::Compute
        }
    }

    /// Steps 1 and 2 of the module docs for `accs[i] += Σ_ranks sends[i]` (`ns[i]` elements
    /// per rank); returns the scratch shard it replaced, if it grew it, for
    /// [`NcclRank::retire`]. The caller checked the arguments.
    fn queue_reductions(
        &self,
        c: &Cuda,
        sends: &[&CudaBuf<f32>],
        accs: &mut [CudaBuf<f32>],
        ns: &[usize],
    ) -> Result<Option<CudaBuf<f32>>> {
        self.gpu.bind()?;
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let st = &mut *guard;
        let widest = ns.iter().copied().max().unwrap_or(0);
        let mut old = None;
        if st.scratch.as_ref().is_none_or(|s| s.len() < widest) {
            let fresh = self.gpu.alloc::<f32>(widest)?;
            old = st.scratch.replace(fresh);
        }
        let tmp = st.scratch.as_mut().expect("scratch allocated above");
        let stream = match &st.lane {
            Some(lane) => {
                // After the allocation: compute work that used the scratch's pool block
                // before is done before the reductions write it.
                lane.side.wait_compute()?;
                lane.side.raw() as ns::cudaStream_t
            }
            None => self.compute_stream(),
        };
        for ((send, acc), &n) in sends.iter().zip(accs.iter_mut()).zip(ns) {
            unsafe {
                nr::reduce_scatter(
                    send.ptr() as *const _,
                    tmp.ptr() as *mut _,
                    n,
                    ns::ncclDataType_t::ncclFloat32,
                    ns::ncclRedOp_t::ncclSum,
                    self.comm,
                    stream,
                )
            }
            .map(|_| ())
            .map_err(|e| nccl("ncclReduceScatter", e))?;
            match &st.lane {
                Some(lane) => lane.side.launches(|| ops::util::add_f32(c, acc, tmp, n))?,
                None => ops::util::add_f32(c, acc, tmp, n)?,
            }
        }
        if let Some(lane) = st.lane.as_mut() {
            lane.unjoined = true;
        }
        Ok(old)
    }

    /// Step 3 of the module docs: `keep` (buffers the reductions queued so far read or write)
    /// stays alive until they are done.
    fn retire(&self, keep: Vec<CudaBuf<f32>>) -> Result<()> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let Some(lane) = st.lane.as_mut() else {
            // Everything ran on the compute stream: the buffers may go back to the pool now.
            return Ok(());
        };
        lane.pending.push_back((lane.side.mark()?, keep));
        // Entries whose reductions are done (queried, not waited for).
        while let Some((mark, _)) = lane.pending.front() {
            if !mark.done()? {
                break;
            }
            lane.pending.pop_front();
        }
        // Too many in flight: the compute stream waits (on the device) for the oldest, after
        // which its buffers are safe to hand to compute work.
        while lane.pending.len() > PENDING_GROUPS {
            if let Some((mark, bufs)) = lane.pending.pop_front() {
                mark.wait_on_compute()?;
                drop(bufs);
            }
        }
        Ok(())
    }

    /// Step 4 of the module docs.
    fn join(&self) -> Result<()> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(lane) = st.lane.as_mut() {
            if lane.unjoined {
                lane.side.join_compute()?;
                lane.unjoined = false;
            }
            // Compute work queued from now on comes after every queued reduction.
            lane.pending.clear();
        }
        Ok(())
    }

    /// The checks every rank agrees on before reduce-scattering `sends[i]` into `accs[i]`.
    fn check_group(
        &self,
        sends: &[&CudaBuf<f32>],
        accs: &[CudaBuf<f32>],
        ns: &[usize],
    ) -> Result<()> {
        self.checked(if sends.len() == accs.len() && accs.len() == ns.len() {
            Ok(())
        } else {
            Err(Error::Invalid(format!(
                "reduce_scatter_add_group: {} send buffers, {} accumulators, {} lengths",
                sends.len(),
                accs.len(),
                ns.len()
            )))
        })?;
        for ((send, acc), &n) in sends.iter().zip(accs).zip(ns) {
            self.checked(check::reduce_scatter(*send, acc, n, self.world))?;
        }
        // One key per reduce-scatter, whether it came alone or in a group (a rank padding its
        // passes reduces one tensor at a time what another reduces as a group).
        for &n in ns {
            self.host.agree("reduce_scatter", &[1, n as u64])?;
        }
        Ok(())
    }
}

impl Collective<Cuda> for NcclRank {
    fn rank(&self) -> usize {
        self.host.rank()
    }
    fn world(&self) -> usize {
        self.world
    }
    fn all_reduce_host(&self, v: &mut [f64]) -> Result<()> {
        self.host.all_reduce_f64(v)
    }

    fn reduce_scatter_add(
        &self,
        c: &Cuda,
        send: &CudaBuf<f32>,
        acc: &mut CudaBuf<f32>,
        n: usize,
    ) -> Result<()> {
        self.check_group(&[send], std::slice::from_ref(acc), &[n])?;
        let r = self
            .queue_reductions(c, &[send], std::slice::from_mut(acc), &[n])
            .and_then(|old| self.retire(old.into_iter().collect()))
            .and_then(|_| self.join());
        self.checked(r)
    }

    fn reduce_scatter_add_group(
        &self,
        c: &Cuda,
        sends: Vec<CudaBuf<f32>>,
        accs: &mut [CudaBuf<f32>],
        ns: &[usize],
    ) -> Result<()> {
        let queued = {
            let refs: Vec<&CudaBuf<f32>> = sends.iter().collect();
            self.check_group(&refs, accs, ns)?;
            self.queue_reductions(c, &refs, accs, ns)
        };
        let r = queued.and_then(|old| {
            let mut keep = sends;
            keep.extend(old);
            self.retire(keep)
        });
        self.checked(r)
    }

    fn wait_reduced(&self, _c: &Cuda) -> Result<()> {
        self.checked(self.gpu.bind().and_then(|_| self.join()))
    }

    fn all_gather(
        &self,
        _c: &Cuda,
        shard: &CudaBuf<Bf16>,
        out: &mut CudaBuf<Bf16>,
        n: usize,
    ) -> Result<()> {
        self.checked(check::all_gather(shard, out, n, self.world))?;
        self.host.agree("all_gather", &[2, n as u64])?;
        // On the compute stream, after every queued reduction (see the module docs).
        self.checked(self.gpu.bind().and_then(|_| self.join()))?;
        self.checked(
            unsafe {
                nr::all_gather(
                    shard.ptr() as *const _,
                    out.ptr() as *mut _,
                    n,
                    ns::ncclDataType_t::ncclBfloat16,
                    self.comm,
                    self.compute_stream(),
                )
            }
            .map(|_| ())
            .map_err(|e| nccl("ncclAllGather", e)),
        )
    }

    fn all_gather_host(&self, v: &[f32]) -> Result<Vec<f32>> {
        self.host.all_gather_host_f32(v)
    }
    fn abort(&self, why: &str) {
        self.host.abort(why)
    }
}

impl Drop for NcclRank {
    fn drop(&mut self) {
        let _ = self.gpu.bind();
        let st = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        if let Some(lane) = &st.lane {
            let _ = lane.side.sync();
        }
        let _ = self.gpu.sync();
        st.lane = None;
        st.scratch = None;
        let _ = unsafe { nr::comm_destroy(self.comm) };
    }
}
