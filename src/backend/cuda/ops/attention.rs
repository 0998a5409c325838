//! Launchers of kernels/attention.cu: training/prefill attention (forward, and the backward's
//! dot, dq and dk/dv passes), the KV-cache store and decode attention. The attention kernels
//! are built for head_dim 64 and 128 (one entry point each) and run blocks of 128 threads.

use super::super::runtime::gen::launch::attention as k;
use super::super::runtime::{Bf16, CudaBuf, Launch};
use super::super::Cuda;
use super::{blocks, grid_yz, i32_of};
use crate::backend::check::{self, arg_error};
use crate::backend::{Cached, Heads, Packed};
use crate::{Error, Result};

/// Calls the head_dim 64 or 128 entry point of a kernel with the same arguments (the head
/// size was checked by [`kernel_limits`]).
macro_rules! by_head_dim {
    ($op:expr, $hd:expr, $d64:path, $d128:path, $($arg:expr),* $(,)?) => {
        match $hd {
            64 => $d64($($arg),*),
            128 => $d128($($arg),*),
            hd => Err(head_dim_error($op, hd)),
        }
    };
}

fn head_dim_error(op: &'static str, hd: usize) -> Error {
    arg_error(
        op,
        "head_dim",
        "64 or 128 (the head sizes the CUDA attention kernels are built for)",
        hd,
    )
}

/// What the CUDA attention kernels support beyond the shared contract: head_dim 64 or 128,
/// at most 65535 heads and sequences (launch-grid dimensions), sizes that fit in `int`.
fn kernel_limits(op: &'static str, h: Heads, n_seq: usize, n_tok: usize) -> Result<()> {
    if h.head_dim != 64 && h.head_dim != 128 {
        return Err(head_dim_error(op, h.head_dim));
    }
    grid_yz(op, "n_heads", h.n_heads)?;
    grid_yz(op, "n_seq", n_seq)?;
    i32_of(op, "n_tok", n_tok)?;
    Ok(())
}

/// The device offsets against the host copy: the kernels read `cu_seqlens`, the host copy
/// drives the checks and the launch grid, so the two must agree. Compared in debug builds and
/// with TOOLN1_CUDA_SYNC=1 (a download, hence a synchronisation, so not on by default).
fn device_offsets(c: &Cuda, op: &'static str, seqs: &Packed<'_, CudaBuf<u32>>) -> Result<()> {
    if c.gpu.sync_each {
        let dev: Vec<u32> = c.gpu.dtoh(seqs.cu_seqlens.ptr(), seqs.cu_host.len())?;
        check::same_offsets(op, &dev, seqs.cu_host)?;
    }
    Ok(())
}

/// Causal GQA attention: grid (query blocks of 16, heads, sequences).
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward(
    c: &Cuda,
    q: &CudaBuf<Bf16>,
    kk: &CudaBuf<Bf16>,
    v: &CudaBuf<Bf16>,
    out: &mut CudaBuf<Bf16>,
    lse: &mut CudaBuf<f32>,
    seqs: &Packed<'_, CudaBuf<u32>>,
    heads: Heads,
) -> Result<()> {
    let op = "attention";
    let n_tok = check::attention(q, kk, v, out, lse, seqs, heads)?;
    let n_seq = seqs.n_seq();
    kernel_limits(op, heads, n_seq, n_tok)?;
    device_offsets(c, op, seqs)?;
    let Heads {
        n_heads,
        n_kv,
        head_dim,
    } = heads;
    let (cu_seqlens, max_len) = (seqs.cu_seqlens, seqs.max_len);
    let grid = (max_len.div_ceil(16) as u32, n_heads as u32, n_seq as u32);
    by_head_dim!(
        op,
        head_dim,
        k::attn_fwd_d64,
        k::attn_fwd_d128,
        &c.gpu,
        Launch::new(grid, 128),
        q,
        kk,
        v,
        out,
        lse,
        cu_seqlens,
        n_tok as i32,
        n_heads as i32,
        n_kv as i32,
    )
}

/// Backward: dot = rowsum(dout * out) (8 rows of heads per block of 256), then dq (grid over
/// query blocks of 8, heads, sequences) and dk/dv (over key blocks of 8, kv heads, sequences).
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    c: &Cuda,
    dout: &CudaBuf<Bf16>,
    q: &CudaBuf<Bf16>,
    kk: &CudaBuf<Bf16>,
    v: &CudaBuf<Bf16>,
    out: &CudaBuf<Bf16>,
    lse: &CudaBuf<f32>,
    dq: &mut CudaBuf<Bf16>,
    dk: &mut CudaBuf<Bf16>,
    dv: &mut CudaBuf<Bf16>,
    seqs: &Packed<'_, CudaBuf<u32>>,
    heads: Heads,
) -> Result<()> {
    let op = "attention_bwd";
    let n_tok = check::attention_bwd(dout, q, kk, v, out, lse, dq, dk, dv, seqs, heads)?;
    let n_seq = seqs.n_seq();
    kernel_limits(op, heads, n_seq, n_tok)?;
    device_offsets(c, op, seqs)?;
    let Heads {
        n_heads,
        n_kv,
        head_dim,
    } = heads;
    let (cu_seqlens, max_len) = (seqs.cu_seqlens, seqs.max_len);
    let mut dot = c.gpu.alloc::<f32>(n_heads * n_tok)?;
    let (nt, nh, nkv) = (n_tok as i32, n_heads as i32, n_kv as i32);
    k::attn_bwd_dot(
        &c.gpu,
        blocks((n_tok * n_heads).div_ceil(8), 256),
        dout,
        out,
        &mut dot,
        nt,
        nh,
        head_dim as i32,
    )?;
    let grid = (max_len.div_ceil(8) as u32, n_heads as u32, n_seq as u32);
    by_head_dim!(
        op,
        head_dim,
        k::attn_bwd_dq_d64,
        k::attn_bwd_dq_d128,
        &c.gpu,
        Launch::new(grid, 128),
        dout,
        q,
        kk,
        v,
        lse,
        &dot,
        &mut *dq,
        cu_seqlens,
        nt,
        nh,
        nkv,
    )?;
    let grid = (max_len.div_ceil(8) as u32, n_kv as u32, n_seq as u32);
    by_head_dim!(
        op,
        head_dim,
        k::attn_bwd_dkdv_d64,
        k::attn_bwd_dkdv_d128,
        &c.gpu,
        Launch::new(grid, 128),
        dout,
        q,
        kk,
        v,
        lse,
        &dot,
        &mut *dk,
        &mut *dv,
        cu_seqlens,
        nt,
        nh,
        nkv,
    )
}

/// Rows of k/v into cache rows dst[t] (one block of 256 per token); a row outside the cache
/// sets ERR_KV_ROW.
#[allow(clippy::too_many_arguments)]
pub(crate) fn kv_store(
    c: &Cuda,
    kk: &CudaBuf<Bf16>,
    v: &CudaBuf<Bf16>,
    dst: &CudaBuf<u32>,
    k_cache: &mut CudaBuf<Bf16>,
    v_cache: &mut CudaBuf<Bf16>,
    n_tok: usize,
    kv_dim: usize,
) -> Result<()> {
    let op = "kv_store";
    let rows = check::kv_store(kk, v, dst, k_cache, v_cache, n_tok, kv_dim)?;
    let rows = u32::try_from(rows).map_err(|_| {
        arg_error(
            op,
            "k_cache",
            "at most 2^32 - 1 rows (the kernel compares rows as u32)",
            format!("{rows} rows"),
        )
    })?;
    k::kv_store(
        &c.gpu,
        blocks(n_tok, 256),
        kk,
        v,
        dst,
        k_cache,
        v_cache,
        i32_of(op, "n_tok", n_tok)?,
        i32_of(op, "kv_dim", kv_dim)?,
        rows,
        c.gpu.err(),
    )
}

/// One query per slot against its cached keys: grid (heads, slots), 128 threads; a length
/// outside 1..=max_len sets ERR_DECODE_LEN.
pub(crate) fn decode(
    c: &Cuda,
    q: &CudaBuf<Bf16>,
    k_cache: &CudaBuf<Bf16>,
    v_cache: &CudaBuf<Bf16>,
    cached: &Cached<'_, CudaBuf<u32>>,
    out: &mut CudaBuf<Bf16>,
    heads: Heads,
) -> Result<()> {
    let op = "attention_decode";
    check::attention_decode(q, k_cache, v_cache, cached, out, heads)?;
    let Cached {
        lens,
        n_seq,
        max_len,
    } = *cached;
    kernel_limits(op, heads, n_seq, n_seq)?;
    let Heads {
        n_heads,
        n_kv,
        head_dim,
    } = heads;
    by_head_dim!(
        op,
        head_dim,
        k::attn_decode_d64,
        k::attn_decode_d128,
        &c.gpu,
        Launch::new((n_heads as u32, n_seq as u32, 1), 128),
        q,
        k_cache,
        v_cache,
        lens,
        &mut *out,
        i32_of(op, "max_len", max_len)?,
        n_heads as i32,
        n_kv as i32,
        c.gpu.err(),
    )
}
