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

/// (free, total) bytes of CUDA device 0, or None when there is no usable device. Probes the
/// driver exactly as the CUDA backend does when it opens the device.
pub fn cuda_memory() -> Option<(u64, u64)> {
    crate::backend::cuda::device_memory(0).ok()
}

/// Run `job` on the backend `kind` selects. `cuda` never falls back; `auto` falls back to the
/// CPU only when there is no CUDA device (`Error::NoCuda`), and says so on stderr. Any other
/// CUDA failure (a kernel module that does not load, cuBLAS missing next to a working driver)
/// is an error under `auto` too: a broken GPU setup must not silently train on the CPU.
pub fn run_on<J: BackendJob>(kind: DeviceKind, job: J) -> Result<J::Output> {
    match kind {
        DeviceKind::Cpu => job.run(Cpu),
        DeviceKind::Cuda => run_cuda(job),
        DeviceKind::Auto => match auto_backend()? {
            Some(c) => job.run(c),
            None => job.run(Cpu),
        },
    }
}

/// The CUDA backend for `--device auto`, or None (after a one-line notice on stderr) when this
/// machine has no CUDA device.
pub fn auto_backend() -> Result<Option<Cuda>> {
    match Cuda::new() {
        Ok(c) => Ok(Some(c)),
        Err(Error::NoCuda(why)) => {
            eprintln!("--device auto: no CUDA device ({why}); running on the CPU backend");
            Ok(None)
        }
        Err(e) => Err(Error::Cuda(format!(
            "--device auto found a CUDA driver but could not open the device: {e} \
             (fix the CUDA setup, or pass --device cpu)"
        ))),
    }
}

fn run_cuda<J: BackendJob>(job: J) -> Result<J::Output> {
    let c = Cuda::new().map_err(|e| match e {
        Error::NoCuda(m) => Error::NoCuda(format!("{m} (use --device cpu or auto)")),
        other => other,
    })?;
    job.run(c)
}
