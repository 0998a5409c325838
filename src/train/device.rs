//! Backend selection: `auto` (CUDA when a device is present, else the CPU), `cpu`, `cuda`.
//! A job is written once, generic over the backend, as a [`BackendJob`].

use crate::backend::cpu::Cpu;
use crate::backend::cuda::Cuda;
use crate::backend::Backend;
use crate::train::config::DeviceKind;
use crate::{Error, Result};

/// Work that runs on any backend.
pub trait BackendJob {
    type Output;
    fn run<B: Backend + 'static>(self, b: B) -> Result<Self::Output>;
}

/// Whether the CUDA driver library can be loaded and device 0 opened.
pub fn cuda_present() -> bool {
    cuda_memory().is_some()
}

/// (free, total) bytes of CUDA device 0, or None when there is no usable device.
pub fn cuda_memory() -> Option<(u64, u64)> {
    // SAFETY: only probes whether the driver library can be loaded.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return None;
    }
    std::panic::catch_unwind(|| {
        let ctx = cudarc::driver::CudaContext::new(0).ok()?;
        ctx.mem_get_info().ok()
    })
    .ok()
    .flatten()
    .map(|(f, t)| (f as u64, t as u64))
}

/// Run `job` on the backend `kind` selects.
pub fn run_on<J: BackendJob>(kind: DeviceKind, job: J) -> Result<J::Output> {
    match kind {
        DeviceKind::Cpu => job.run(Cpu),
        DeviceKind::Cuda => run_cuda(job),
        DeviceKind::Auto => match Cuda::new() {
            Ok(c) => job.run(c),
            Err(_) => job.run(Cpu),
        },
    }
}

fn run_cuda<J: BackendJob>(job: J) -> Result<J::Output> {
    let c = Cuda::new().map_err(|e| match e {
        Error::NoCuda(m) => Error::NoCuda(format!("{m} (use --device cpu or auto)")),
        other => other,
    })?;
    job.run(c)
}
