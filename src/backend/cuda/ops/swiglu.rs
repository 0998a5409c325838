//! Launchers of kernels/swiglu.cu (grid-stride elementwise).

use super::super::runtime::gen::launch::swiglu as k;
use super::super::runtime::{Bf16, CudaBuf};
use super::super::Cuda;
use super::{ew, need};
use crate::Result;

/// out = silu(gate) * up
pub(crate) fn forward(
    c: &Cuda,
    gate: &CudaBuf<Bf16>,
    up: &CudaBuf<Bf16>,
    out: &mut CudaBuf<Bf16>,
    n: usize,
) -> Result<()> {
    need(gate, n, "swiglu gate")?;
    need(up, n, "swiglu up")?;
    need(out, n, "swiglu out")?;
    k::swiglu_fwd(&c.gpu, ew(n), gate, up, out, n as i64)
}

/// dgate, dup from dout.
pub(crate) fn backward(
    c: &Cuda,
    dout: &CudaBuf<Bf16>,
    gate: &CudaBuf<Bf16>,
    up: &CudaBuf<Bf16>,
    dgate: &mut CudaBuf<Bf16>,
    dup: &mut CudaBuf<Bf16>,
    n: usize,
) -> Result<()> {
    need(dout, n, "swiglu_bwd dout")?;
    need(gate, n, "swiglu_bwd gate")?;
    need(up, n, "swiglu_bwd up")?;
    need(dgate, n, "swiglu_bwd dgate")?;
    need(dup, n, "swiglu_bwd dup")?;
    k::swiglu_bwd(&c.gpu, ew(n), dout, gate, up, dgate, dup, n as i64)
}
