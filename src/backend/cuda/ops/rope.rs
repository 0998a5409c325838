//! Launchers of kernels/rope.cu: one block of 64 threads per (token, head), reading the
//! inverse-frequency table of (theta, head_dim), uploaded once per backend and kept.

use super::super::runtime::gen::launch::rope as k;
use super::super::runtime::{Bf16, CudaBuf};
use super::super::Cuda;
use super::{blocks, i32_of};
use crate::backend::{check, RopeRows};
use crate::{Error, Result};

/// The forward rotation, or (`backward`) the inverse rotation of a gradient, in place.
pub(crate) fn rotate(
    c: &Cuda,
    backward: bool,
    x: &mut CudaBuf<Bf16>,
    pos: &CudaBuf<u32>,
    d: RopeRows,
    theta: f32,
) -> Result<()> {
    let op = if backward { "rope_bwd" } else { "rope" };
    check::rope(op, x, pos, d, theta)?;
    let RopeRows {
        n_tok,
        n_heads,
        head_dim,
    } = d;
    let nt = i32_of(op, "n_tok", n_tok)?;
    let (nh, hd) = (
        i32_of(op, "n_heads", n_heads)?,
        i32_of(op, "head_dim", head_dim)?,
    );
    let mut tables = c
        .rope_tables
        .lock()
        .map_err(|_| Error::msg("rope table lock poisoned"))?;
    let inv_freq = match tables.entry((theta.to_bits(), head_dim)) {
        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
        std::collections::hash_map::Entry::Vacant(e) => {
            let inv = crate::backend::cpu::math::rope_inv_freq(head_dim, theta);
            let buf = c.gpu.htod::<f32, f32>(&inv)?;
            // The upload reads `inv` (freed at the end of this block) asynchronously.
            c.gpu.sync()?;
            e.insert(buf)
        }
    };
    let grid = blocks(n_tok * n_heads, 64);
    let inv_freq = &*inv_freq;
    if backward {
        let a = k::RopeBwd {
            dx: x,
            pos,
            n_tok: nt,
            n_heads: nh,
            head_dim: hd,
            inv_freq,
        };
        k::rope_bwd(&c.gpu, grid, a)
    } else {
        let a = k::RopeFwd {
            x,
            pos,
            n_tok: nt,
            n_heads: nh,
            head_dim: hd,
            inv_freq,
        };
        k::rope_fwd(&c.gpu, grid, a)
    }
}
