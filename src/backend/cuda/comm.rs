//! NCCL collectives between the CUDA devices of one process ([`crate::dist::Collective`] for
//! [`Cuda`]), through cudarc's dynamically loaded NCCL bindings: a machine without NCCL still
//! builds and runs on one GPU, and asking for more says what is missing.
//!
//! Every collective is queued on the rank's compute stream, so it is ordered after the
//! kernels that wrote its inputs and before those that read its outputs, and a buffer the
//! caching allocator hands out again is never still being read by NCCL. The reduce-scatter
//! lands in a scratch shard kept by the rank and is added into the accumulator by a kernel.
//! Host sums (metrics, norms) go through the ranks' thread rendezvous, not NCCL. Before each
//! NCCL call the ranks check on the host that they all make the same call (op and count): a
//! rank whose arguments fail the contract, or that stopped, makes the call an error on every
//! rank instead of an NCCL collective that waits forever for it.

use std::sync::{Arc, Mutex};

use cudarc::nccl::{result as nr, sys as ns};

use super::ops;
use super::runtime::{Bf16, CudaBuf, Gpu};
use super::Cuda;
use crate::backend::check;
use crate::dist::{host_group, Collective, HostRank};
use crate::{Error, Result};

/// One rank of a group of CUDA devices: its NCCL communicator, its device and its handle on
/// the host rendezvous.
pub struct NcclRank {
    comm: ns::ncclComm_t,
    gpu: Arc<Gpu>,
    host: HostRank,
    world: usize,
    /// Scratch f32 shard the reduce-scatter writes before the add.
    scratch: Mutex<Option<CudaBuf<f32>>>,
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
/// take one each. Two entries on the same device, or no NCCL library, are errors.
pub fn nccl_group(devices: &[Cuda]) -> Result<Vec<NcclRank>> {
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
    let mut comms: Vec<ns::ncclComm_t> = vec![std::ptr::null_mut(); n];
    unsafe { nr::comm_init_all(comms.as_mut_ptr(), n as i32, ords.as_ptr()) }
        .map_err(|e| nccl("ncclCommInitAll", e))?;
    let hosts = host_group(n)?;
    Ok(comms
        .into_iter()
        .zip(hosts)
        .zip(devices)
        .map(|((comm, host), d)| NcclRank {
            comm,
            gpu: d.gpu.clone(),
            host,
            world: n,
            scratch: Mutex::new(None),
        })
        .collect())
}

impl NcclRank {
    /// `r`, stopping the group first when it is an error.
    fn checked<T>(&self, r: Result<T>) -> Result<T> {
        self.host.checked(r)
    }

    fn stream(&self) -> ns::cudaStream_t {
        self.gpu.stream as ns::cudaStream_t
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
        self.checked(check::reduce_scatter(send, acc, n, self.world))?;
        self.host.agree("reduce_scatter", &[1, n as u64])?;
        self.checked(self.gpu.bind())?;
        let mut scratch = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        if scratch.as_ref().is_none_or(|s| s.len() < n) {
            *scratch = Some(self.checked(self.gpu.alloc::<f32>(n))?);
        }
        let tmp = scratch.as_mut().expect("scratch allocated above");
        self.checked(
            unsafe {
                nr::reduce_scatter(
                    send.ptr() as *const _,
                    tmp.ptr() as *mut _,
                    n,
                    ns::ncclDataType_t::ncclFloat32,
                    ns::ncclRedOp_t::ncclSum,
                    self.comm,
                    self.stream(),
                )
            }
            .map(|_| ())
            .map_err(|e| nccl("ncclReduceScatter", e)),
        )?;
        self.checked(ops::util::add_f32(c, acc, tmp, n))
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
        self.checked(self.gpu.bind())?;
        self.checked(
            unsafe {
                nr::all_gather(
                    shard.ptr() as *const _,
                    out.ptr() as *mut _,
                    n,
                    ns::ncclDataType_t::ncclBfloat16,
                    self.comm,
                    self.stream(),
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
        let _ = self.gpu.sync();
        *self.scratch.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let _ = unsafe { nr::comm_destroy(self.comm) };
    }
}
