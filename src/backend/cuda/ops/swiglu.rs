//! Launchers of kernels/swiglu.cu (grid-stride elementwise).

use super::super::runtime::gen::launch::swiglu as k;
use super::super::runtime::{Bf16, CudaBuf};
use super::super::Cuda;
use super::ew;
use crate::backend::check;
use crate::Result;

/// out = silu(gate) * up
pub(crate) fn forward(
    c: &Cuda,
    gate: &CudaBuf<Bf16>,
    up: &CudaBuf<Bf16>,
    out: &mut CudaBuf<Bf16>,
    n: usize,
) -> Result<()> {
    check::swiglu(gate, up, out, n)?;
    k::swiglu_fwd(
        &c.gpu,
        ew(n),
        k::SwigluFwd {
            gate,
            up,
            out,
            n: n as i64,
        },
    )
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
    check::swiglu_bwd(dout, gate, up, dgate, dup, n)?;
    let a = k::SwigluBwd {
        dout,
        gate,
        up,
        dgate,
        dup,
        n: n as i64,
    };
    k::swiglu_bwd(&c.gpu, ew(n), a)
}
