//! Backend selection: `auto` (CUDA when a device is present, else the CPU), `cpu`, `cuda`.
//! A job is written once, generic over the backend, as a [`BackendJob`], and [`run_on`] runs it
//! on the backend a [`DeviceKind`] selects.

use crate::backend::cpu::Cpu;
use crate::backend::cuda::Cuda;
use crate::backend::Backend;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};

/// Which backend runs the job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceKind {
    /// CUDA when a device is present, else the CPU.
    #[default]
    Auto,
    Cpu,
    Cuda,
}

impl std::str::FromStr for DeviceKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(DeviceKind::Auto),
            "cpu" => Ok(DeviceKind::Cpu),
            "cuda" => Ok(DeviceKind::Cuda),
            _ => Err(format!("unknown device `{s}`; expected auto, cpu or cuda")),
        }
    }
}

/// Work that runs on any backend.
pub trait BackendJob {
    type Output;
    fn run<B: Backend + 'static>(self, b: B) -> Result<Self::Output>;
}

/// (free, total) bytes of CUDA device 0, or None when there is no usable device. Probes the
/// driver exactly as the CUDA backend does when it opens the device.
pub fn cuda_memory() -> Option<(u64, u64)> {
    crate::backend::cuda::device_memory(0).ok()
}

/// Whether a job for `kind` will run on CUDA, given device 0's memory as [`cuda_memory`]
/// reports it (`auto` picks CUDA exactly when a device is present).
pub fn uses_cuda(kind: DeviceKind, cuda: Option<(u64, u64)>) -> bool {
    match kind {
        DeviceKind::Cuda => true,
        DeviceKind::Cpu => false,
        DeviceKind::Auto => cuda.is_some(),
    }
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
