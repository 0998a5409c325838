//! Launchers of kernels/attention.cu: the KV-cache store and decode attention (built for
//! head_dim 64 and 128, one entry point each, blocks of 128 threads). Training and prefill
//! attention are in `flash_attn.rs`.

use super::super::runtime::gen::launch::attention as k;
use super::super::runtime::{Bf16, CudaBuf, Launch};
use super::super::Cuda;
use super::{blocks, grid_yz, i32_of};
use crate::backend::check::{self, arg_error};
use crate::backend::{Cached, Heads, KvRows};
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

/// Rows of k/v into cache rows dst[t] (one block of 256 per token); a row outside the cache
/// sets ERR_KV_ROW.
pub(crate) fn kv_store(
    c: &Cuda,
    kk: &CudaBuf<Bf16>,
    v: &CudaBuf<Bf16>,
    dst: &CudaBuf<u32>,
    k_cache: &mut CudaBuf<Bf16>,
    v_cache: &mut CudaBuf<Bf16>,
    kv: KvRows,
) -> Result<()> {
    let op = "kv_store";
    let rows = check::kv_store(kk, v, dst, k_cache, v_cache, kv)?;
    let KvRows { n_tok, kv_dim } = kv;
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
        k::KvStore {
            k: kk,
            v,
            dst,
            k_cache,
            v_cache,
            n_tok: i32_of(op, "n_tok", n_tok)?,
            kv_dim: i32_of(op, "kv_dim", kv_dim)?,
            cache_rows: rows,
            err: c.gpu.err(),
        },
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
        &c.gpu,
        Launch::new((n_heads as u32, n_seq as u32, 1), 128),
        attn_decode_d64,
        AttnDecodeD64,
        attn_decode_d128,
        AttnDecodeD128,
        {
            q,
            kc: k_cache,
            vc: v_cache,
            lens,
            out: &mut *out,
            max_len: i32_of(op, "max_len", max_len)?,
            n_heads: n_heads as i32,
            n_kv: n_kv as i32,
            err: c.gpu.err(),
        },
    )
}
