//! Launchers of kernels/attention.cu: training/prefill attention (forward, and the backward's
//! dot, dq and dk/dv passes); the KV-cache store and decode attention are in `decode.rs`. The
//! attention kernels are built for head_dim 64 and 128 (one entry point each) and run blocks of
//! 128 threads.

use super::super::runtime::gen::launch::attention as k;
use super::super::runtime::{Bf16, CudaBuf, Launch};
use super::super::Cuda;
use super::{blocks, grid_yz, i32_of};
use crate::backend::check::{self, arg_error};
use crate::backend::{AttnGrads, AttnSaved, Heads, Packed, Prefix, Qkv};
use crate::{Error, Result};

/// Calls the head_dim 64 or 128 entry point of a kernel (launcher and argument struct of
/// each, in `k`) with the same named arguments (the head size was checked by
/// [`kernel_limits`]).
macro_rules! by_head_dim {
    (
        $op:expr, $hd:expr, $gpu:expr, $cfg:expr,
        $d64:ident, $a64:ident, $d128:ident, $a128:ident,
        { $($field:tt)* } $(,)?
    ) => {
        match $hd {
            64 => k::$d64($gpu, $cfg, k::$a64 { $($field)* }),
            128 => k::$d128($gpu, $cfg, k::$a128 { $($field)* }),
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

/// The checked layout of one attention call: the packed sequences, the prefix table if any,
/// and the token count.
struct Rows<'a> {
    seqs: &'a Packed<'a, CudaBuf<u32>>,
    pre: Option<&'a Prefix<'a, CudaBuf<u32>>>,
    n_tok: usize,
}

/// Causal GQA attention: grid (query blocks of 16, heads, sequences).
pub(crate) fn forward(
    c: &Cuda,
    qkv: Qkv<'_, CudaBuf<Bf16>>,
    out: &mut CudaBuf<Bf16>,
    lse: &mut CudaBuf<f32>,
    seqs: &Packed<'_, CudaBuf<u32>>,
    heads: Heads,
) -> Result<()> {
    let n_tok = check::attention(qkv, out, lse, seqs, heads)?;
    let rows = Rows {
        seqs,
        pre: None,
        n_tok,
    };
    launch_forward(c, "attention", qkv, (out, lse), rows, heads)
}

/// Attention with a shared prefix per sequence (see [`crate::backend::Backend::attention_prefixed`]).
pub(crate) fn forward_prefixed(
    c: &Cuda,
    qkv: Qkv<'_, CudaBuf<Bf16>>,
    out: &mut CudaBuf<Bf16>,
    lse: &mut CudaBuf<f32>,
    seqs: &Packed<'_, CudaBuf<u32>>,
    pre: &Prefix<'_, CudaBuf<u32>>,
    heads: Heads,
) -> Result<()> {
    let op = "attention_prefixed";
    let n_tok = check::attention_prefixed(op, qkv, (out, lse), None, seqs, pre, heads)?;
    let rows = Rows {
        seqs,
        pre: Some(pre),
        n_tok,
    };
    launch_forward(c, op, qkv, (out, lse), rows, heads)
}

/// The forward launch of checked arguments; without a prefix the kernels read no table (the
/// offsets buffer stands in for it).
fn launch_forward(
    c: &Cuda,
    op: &'static str,
    qkv: Qkv<'_, CudaBuf<Bf16>>,
    (out, lse): (&mut CudaBuf<Bf16>, &mut CudaBuf<f32>),
    rows: Rows<'_>,
    heads: Heads,
) -> Result<()> {
    let Qkv { q, k: kk, v } = qkv;
    let Rows { seqs, pre, n_tok } = rows;
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
        &c.gpu,
        Launch::new(grid, 128),
        attn_fwd_d64,
        AttnFwdD64,
        attn_fwd_d128,
        AttnFwdD128,
        {
            q,
            k: kk,
            v,
            out,
            lse,
            cu: cu_seqlens,
            prefix: pre.map_or(cu_seqlens, |p| p.prefix),
            has_prefix: pre.is_some() as i32,
            n_tok: n_tok as i32,
            n_heads: n_heads as i32,
            n_kv: n_kv as i32,
        },
    )
}

/// Backward: dot = rowsum(dout * out) (8 rows of heads per block of 256), then dq (grid over
/// query blocks of 8, heads, sequences) and dk/dv (over key blocks of 8, kv heads, sequences).
pub(crate) fn backward(
    c: &Cuda,
    qkv: Qkv<'_, CudaBuf<Bf16>>,
    saved: AttnSaved<'_, CudaBuf<Bf16>, CudaBuf<f32>>,
    grads: AttnGrads<'_, CudaBuf<Bf16>>,
    seqs: &Packed<'_, CudaBuf<u32>>,
    heads: Heads,
) -> Result<()> {
    let n_tok = check::attention_bwd(qkv, saved, &grads, seqs, heads)?;
    let rows = Rows {
        seqs,
        pre: None,
        n_tok,
    };
    launch_backward(c, "attention_bwd", qkv, saved, grads, rows, heads)
}

/// Backward of [`forward_prefixed`]: a prefix key's dk/dv also sum every query of each sequence
/// that reads it (the readers table built here from the host copy).
pub(crate) fn backward_prefixed(
    c: &Cuda,
    qkv: Qkv<'_, CudaBuf<Bf16>>,
    saved: AttnSaved<'_, CudaBuf<Bf16>, CudaBuf<f32>>,
    grads: AttnGrads<'_, CudaBuf<Bf16>>,
    seqs: &Packed<'_, CudaBuf<u32>>,
    pre: &Prefix<'_, CudaBuf<u32>>,
    heads: Heads,
) -> Result<()> {
    let op = "attention_prefixed_bwd";
    let bufs: check::BwdGrads<'_> = (saved.dout, &*grads.dq, &*grads.dk, &*grads.dv);
    let outs = (saved.out, saved.lse);
    let n_tok = check::attention_prefixed(op, qkv, outs, Some(bufs), seqs, pre, heads)?;
    let rows = Rows {
        seqs,
        pre: Some(pre),
        n_tok,
    };
    launch_backward(c, op, qkv, saved, grads, rows, heads)
}

/// The backward launches of checked arguments.
fn launch_backward(
    c: &Cuda,
    op: &'static str,
    qkv: Qkv<'_, CudaBuf<Bf16>>,
    saved: AttnSaved<'_, CudaBuf<Bf16>, CudaBuf<f32>>,
    grads: AttnGrads<'_, CudaBuf<Bf16>>,
    rows: Rows<'_>,
    heads: Heads,
) -> Result<()> {
    let (Qkv { q, k: kk, v }, AttnSaved { dout, out, lse }) = (qkv, saved);
    let AttnGrads { dq, dk, dv } = grads;
    let Rows { seqs, pre, n_tok } = rows;
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
    // each sequence's readers (the sequences whose prefix covers its rows), CSR
    let readers = match pre {
        Some(p) => {
            let (off, idx) = crate::backend::prefix_readers(p.prefix_host, seqs.cu_host);
            // one slack entry: an empty upload is no buffer
            let idx = if idx.is_empty() { vec![0] } else { idx };
            Some((c.gpu.htod::<u32, u32>(&off)?, c.gpu.htod::<u32, u32>(&idx)?))
        }
        None => None,
    };
    let table = pre.map_or(cu_seqlens, |p| p.prefix);
    let (rd_off, rd) = readers
        .as_ref()
        .map_or((cu_seqlens, cu_seqlens), |(o, r)| (o, r));
    let has = pre.is_some() as i32;
    let (nt, nh, nkv) = (n_tok as i32, n_heads as i32, n_kv as i32);
    k::attn_bwd_dot(
        &c.gpu,
        blocks((n_tok * n_heads).div_ceil(8), 256),
        k::AttnBwdDot {
            dout,
            out,
            dot: &mut dot,
            n_tok: nt,
            n_heads: nh,
            head_dim: head_dim as i32,
        },
    )?;
    let grid = (max_len.div_ceil(8) as u32, n_heads as u32, n_seq as u32);
    by_head_dim!(
        op,
        head_dim,
        &c.gpu,
        Launch::new(grid, 128),
        attn_bwd_dq_d64,
        AttnBwdDqD64,
        attn_bwd_dq_d128,
        AttnBwdDqD128,
        {
            dout,
            q,
            k: kk,
            v,
            lse,
            dot: &dot,
            dq: &mut *dq,
            cu: cu_seqlens,
            prefix: table,
            has_prefix: has,
            n_tok: nt,
            n_heads: nh,
            n_kv: nkv,
        },
    )?;
    let grid = (max_len.div_ceil(8) as u32, n_kv as u32, n_seq as u32);
    by_head_dim!(
        op,
        head_dim,
        &c.gpu,
        Launch::new(grid, 128),
        attn_bwd_dkdv_d64,
        AttnBwdDkdvD64,
        attn_bwd_dkdv_d128,
        AttnBwdDkdvD128,
        {
            dout,
            q,
            k: kk,
            v,
            lse,
            dot: &dot,
            dk: &mut *dk,
            dv: &mut *dv,
            cu: cu_seqlens,
            prefix: table,
            rd_off,
            rd,
            has_prefix: has,
            n_tok: nt,
            n_heads: nh,
            n_kv: nkv,
        },
    )
}
