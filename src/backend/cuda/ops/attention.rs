//! Launchers of kernels/attention.cu: training/prefill attention (forward, and the backward's
//! dot, dq and dk/dv passes), the KV-cache store and decode attention. The attention kernels
//! are built for head_dim 64 and 128 (one entry point each) and run blocks of 128 threads.

use super::super::runtime::gen::launch::attention as k;
use super::super::runtime::{Bf16, CudaBuf, Launch};
use super::super::Cuda;
use super::{blocks, i32_of, need};
use crate::{ensure, Error, Result};

/// Calls the head_dim 64 or 128 entry point of a kernel with the same arguments.
macro_rules! by_head_dim {
    ($hd:expr, $d64:path, $d128:path, $($arg:expr),* $(,)?) => {
        match $hd {
            64 => $d64($($arg),*),
            128 => $d128($($arg),*),
            hd => Err(Error::Invalid(format!(
                "attention: head_dim {hd} unsupported (the kernels are built for 64 and 128)"
            ))),
        }
    };
}

/// Checks the attention arguments like the CPU backend and returns the token count. The
/// kernels read the device offsets `cu_dev`; the host copy drives the checks and the launch
/// grid, so the two must agree: in debug builds and with TOOLN1_CUDA_SYNC=1 the device copy is
/// downloaded and compared (a synchronisation, hence not on by default).
fn check_attn(
    c: &Cuda,
    cu_dev: &CudaBuf<u32>,
    cu_host: &[u32],
    max_len: usize,
    n_heads: usize,
    n_kv: usize,
    head_dim: usize,
) -> Result<usize> {
    ensure!(
        head_dim == 64 || head_dim == 128,
        "attention: head_dim {head_dim} unsupported (the kernels are built for 64 and 128)"
    );
    ensure!(
        n_kv > 0 && n_heads > 0 && n_heads % n_kv == 0,
        "attention: n_heads {n_heads} must be a positive multiple of n_kv {n_kv}"
    );
    ensure!(
        !cu_host.is_empty(),
        "attention: cu_host must hold n_seq + 1 offsets starting with 0, got none"
    );
    ensure!(
        cu_host.len() - 1 <= 65535 && n_heads <= 65535,
        "attention: {} sequences x {n_heads} heads exceed the launch grid (65535 each)",
        cu_host.len() - 1
    );
    ensure!(
        cu_host[0] == 0,
        "attention: cu_seqlens[0] must be 0, got {}",
        cu_host[0]
    );
    for w in cu_host.windows(2) {
        ensure!(
            w[1] >= w[0],
            "attention: cu_seqlens must be non-decreasing ({} then {})",
            w[0],
            w[1]
        );
        ensure!(
            (w[1] - w[0]) as usize <= max_len,
            "attention: a sequence of {} tokens exceeds max_len {max_len}",
            w[1] - w[0]
        );
    }
    need(cu_dev, cu_host.len(), "attention cu_seqlens")?;
    if c.gpu.sync_each {
        let dev: Vec<u32> = c.gpu.dtoh(cu_dev.ptr(), cu_host.len())?;
        if let Some(i) = (0..cu_host.len()).find(|&i| dev[i] != cu_host[i]) {
            return Err(Error::Invalid(format!(
                "attention: `cu_seqlens` (device) and `cu_host` differ at entry {i} ({} vs {})",
                dev[i], cu_host[i]
            )));
        }
    }
    Ok(*cu_host.last().unwrap_or(&0) as usize)
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
    cu_seqlens: &CudaBuf<u32>,
    cu_host: &[u32],
    max_len: usize,
    n_heads: usize,
    n_kv: usize,
    head_dim: usize,
) -> Result<()> {
    let n_tok = check_attn(c, cu_seqlens, cu_host, max_len, n_heads, n_kv, head_dim)?;
    need(q, n_tok * n_heads * head_dim, "attention q")?;
    need(kk, n_tok * n_kv * head_dim, "attention k")?;
    need(v, n_tok * n_kv * head_dim, "attention v")?;
    need(out, n_tok * n_heads * head_dim, "attention out")?;
    need(lse, n_heads * n_tok, "attention lse")?;
    let n_seq = cu_host.len() - 1;
    let grid = (max_len.div_ceil(16) as u32, n_heads as u32, n_seq as u32);
    by_head_dim!(
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
    cu_seqlens: &CudaBuf<u32>,
    cu_host: &[u32],
    max_len: usize,
    n_heads: usize,
    n_kv: usize,
    head_dim: usize,
) -> Result<()> {
    let n_tok = check_attn(c, cu_seqlens, cu_host, max_len, n_heads, n_kv, head_dim)?;
    let qn = n_tok * n_heads * head_dim;
    let kn = n_tok * n_kv * head_dim;
    need(dout, qn, "attention_bwd dout")?;
    need(q, qn, "attention_bwd q")?;
    need(out, qn, "attention_bwd out")?;
    need(dq, qn, "attention_bwd dq")?;
    need(kk, kn, "attention_bwd k")?;
    need(v, kn, "attention_bwd v")?;
    need(dk, kn, "attention_bwd dk")?;
    need(dv, kn, "attention_bwd dv")?;
    need(lse, n_heads * n_tok, "attention_bwd lse")?;
    let n_seq = cu_host.len() - 1;
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
    need(kk, n_tok * kv_dim, "kv_store k")?;
    need(v, n_tok * kv_dim, "kv_store v")?;
    need(dst, n_tok, "kv_store dst")?;
    ensure!(kv_dim > 0, "kv_store: kv_dim must be > 0");
    ensure!(
        k_cache.len() == v_cache.len(),
        "kv_store: k_cache holds {} elements but v_cache {}",
        k_cache.len(),
        v_cache.len()
    );
    let rows = (k_cache.len().min(v_cache.len()) / kv_dim) as u32;
    k::kv_store(
        &c.gpu,
        blocks(n_tok, 256),
        kk,
        v,
        dst,
        k_cache,
        v_cache,
        n_tok as i32,
        kv_dim as i32,
        rows,
        c.gpu.err(),
    )
}

/// One query per slot against its cached keys: grid (heads, slots), 128 threads; a length
/// outside 1..=max_len sets ERR_DECODE_LEN.
#[allow(clippy::too_many_arguments)]
pub(crate) fn decode(
    c: &Cuda,
    q: &CudaBuf<Bf16>,
    k_cache: &CudaBuf<Bf16>,
    v_cache: &CudaBuf<Bf16>,
    lens: &CudaBuf<u32>,
    out: &mut CudaBuf<Bf16>,
    n_seq: usize,
    max_len: usize,
    n_heads: usize,
    n_kv: usize,
    head_dim: usize,
) -> Result<()> {
    ensure!(
        head_dim == 64 || head_dim == 128,
        "attention_decode: head_dim {head_dim} unsupported (64 or 128)"
    );
    ensure!(
        n_kv > 0 && n_heads > 0 && n_heads % n_kv == 0,
        "attention_decode: n_heads {n_heads} must be a positive multiple of n_kv {n_kv}"
    );
    ensure!(
        n_seq <= 65535 && n_heads <= 65535,
        "attention_decode: {n_seq} slots x {n_heads} heads exceed the launch grid (65535 each)"
    );
    need(q, n_seq * n_heads * head_dim, "attention_decode q")?;
    need(out, n_seq * n_heads * head_dim, "attention_decode out")?;
    need(
        k_cache,
        n_seq * max_len * n_kv * head_dim,
        "attention_decode k_cache",
    )?;
    need(
        v_cache,
        n_seq * max_len * n_kv * head_dim,
        "attention_decode v_cache",
    )?;
    need(lens, n_seq, "attention_decode lens")?;
    by_head_dim!(
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
        i32_of(max_len, "max_len")?,
        n_heads as i32,
        n_kv as i32,
        c.gpu.err(),
    )
}
