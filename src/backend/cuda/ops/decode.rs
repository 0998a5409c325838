//! Launchers of kernels/decode.cu: the KV-cache store and flash-decoding attention against the
//! paged KV cache (a split kernel writing each chunk's partial softmax state to scratch, then a
//! merge kernel combining the chunks in order). Built for head_dim 64 and 128.

use super::super::runtime::gen::launch::decode as k;
use super::super::runtime::{Bf16, CudaBuf, Launch};
use super::super::Cuda;
use super::{blocks, grid_yz, i32_of};
use crate::backend::check::{self, arg_error};
use crate::backend::{Cached, Heads, KvRows};
use crate::Result;

/// At most this many chunks per sequence (DEC_MAX_SPLITS in kernels/decode.cu).
pub(crate) const MAX_SPLITS: usize = 16;
/// The smallest chunk, in positions (DEC_MIN_CHUNK in kernels/decode.cu).
pub(crate) const MIN_CHUNK: usize = 128;
/// Threads per block of both decode attention kernels.
const THREADS: u32 = 128;

/// The chunks a sequence of `len` positions is split into: a function of its length alone, so
/// its output bits do not depend on the batch (the kernels compute the same).
pub(crate) fn splits(len: usize) -> usize {
    len.div_ceil(MIN_CHUNK).min(MAX_SPLITS)
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
    let rows = cache_rows(op, "k_cache", rows)?;
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

/// A cache's row count as the kernels' u32.
fn cache_rows(op: &'static str, arg: &'static str, rows: usize) -> Result<u32> {
    u32::try_from(rows).map_err(|_| {
        arg_error(
            op,
            arg,
            "at most 2^32 - 1 rows (the kernels index rows as u32)",
            format!("{rows} rows"),
        )
    })
}

/// Flash-decoding through the block table: the split kernel on grid (heads, sequences, the
/// most chunks any length up to max_blocks * block_size gets), then the merge on grid (heads,
/// sequences); 128 threads each. A length outside 1..=max_len sets ERR_DECODE_LEN, a block id
/// outside the cache ERR_DECODE_BLOCK.
pub(crate) fn attention(
    c: &Cuda,
    q: &CudaBuf<Bf16>,
    k_cache: &CudaBuf<Bf16>,
    v_cache: &CudaBuf<Bf16>,
    cached: &Cached<'_, CudaBuf<u32>>,
    out: &mut CudaBuf<Bf16>,
    heads: Heads,
) -> Result<()> {
    let op = "attention_decode";
    let n_blocks = check::attention_decode(q, k_cache, v_cache, cached, out, heads)?;
    let Cached {
        lens,
        table,
        n_seq,
        max_blocks,
        block_size,
    } = *cached;
    let Heads {
        n_heads,
        n_kv,
        head_dim,
    } = heads;
    if head_dim != 64 && head_dim != 128 {
        return Err(arg_error(
            op,
            "head_dim",
            "64 or 128 (the head sizes the CUDA decode kernels are built for)",
            head_dim,
        ));
    }
    grid_yz(op, "n_seq", n_seq)?;
    cache_rows(op, "k_cache", n_blocks.saturating_mul(block_size))?;
    let n_blocks = cache_rows(op, "k_cache", n_blocks)?;
    let max_len = cached.max_len();
    i32_of(op, "max_blocks * block_size", max_len)?;
    let (mb, bs) = (
        i32_of(op, "max_blocks", max_blocks)?,
        i32_of(op, "block_size", block_size)?,
    );
    let (nh, nkv) = (i32_of(op, "n_heads", n_heads)?, i32_of(op, "n_kv", n_kv)?);
    i32_of(op, "n_seq * n_heads", n_seq.saturating_mul(n_heads))?;
    let parts = n_seq * n_heads * MAX_SPLITS;
    let mut part_ml = c.gpu.alloc::<f32>(parts * 2)?;
    let mut part_acc = c.gpu.alloc::<f32>(parts * head_dim)?;
    let grid = (n_heads as u32, n_seq as u32, splits(max_len) as u32);
    let launch = Launch::new(grid, THREADS);
    macro_rules! split {
        ($f:ident, $a:ident) => {
            k::$f(
                &c.gpu,
                launch,
                k::$a {
                    q,
                    kc: k_cache,
                    vc: v_cache,
                    lens,
                    table,
                    part_ml: &mut part_ml,
                    part_acc: &mut part_acc,
                    max_blocks: mb,
                    block_size: bs,
                    n_blocks,
                    n_heads: nh,
                    n_kv: nkv,
                },
            )
        };
    }
    if head_dim == 64 {
        split!(attn_decode_split_d64, AttnDecodeSplitD64)?;
    } else {
        split!(attn_decode_split_d128, AttnDecodeSplitD128)?;
    }
    k::attn_decode_merge(
        &c.gpu,
        Launch::new((n_heads as u32, n_seq as u32, 1), THREADS),
        k::AttnDecodeMerge {
            part_ml: &part_ml,
            part_acc: &part_acc,
            lens,
            table,
            out,
            head_dim: head_dim as i32,
            max_blocks: mb,
            block_size: bs,
            n_blocks,
            n_heads: nh,
            err: c.gpu.err(),
        },
    )
}
