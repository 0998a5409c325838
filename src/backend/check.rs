//! The shape contract of every op, checked once for both backends.
//!
//! Each backend calls the function of the op it runs before doing any work, so the CPU and the
//! CUDA backend accept and reject exactly the same arguments, with the same error:
//! [`Error::Arg`] naming the op, the argument, what the contract expects and what was given.
//! Checked here: buffer lengths against the shape arguments (products overflow-checked), sizes
//! that must be positive, head counts, packed-sequence offsets, RoPE theta, sampling settings,
//! GRPO settings, the AdamW step.
//!
//! What only the data can tell (an id against the vocabulary, a decode length, a NaN logit, a
//! mask weight) is checked by the CPU backend on the host with [`ids_below`] and the other
//! helpers at the end of this file, and by the CUDA kernels on the device, reported at the next
//! synchronisation (a host check would download the data after every op). Limits of one
//! backend's implementation (the CUDA kernels' head sizes, launch-grid limits) are that
//! backend's own checks, with the same error variant.

use super::{
    AdamWState, AttnGrads, AttnSaved, Cached, DType, GemmDims, GrpoLossCfg, GrpoTokens, Heads,
    KvRows, LmHead, LogprobsGrads, LogprobsOut, LossAgg, NormDims, NormGrads, NormOut, Packed,
    Prefix, Qkv, RopeRows, RowCopy, SampleDims, SampleParams, SampleRows, VocabDims,
};
use crate::{Error, Result};

/// Anything an op reads or writes: its length in elements.
pub trait Buf {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<T> Buf for Vec<T> {
    fn len(&self) -> usize {
        Vec::len(self)
    }
}

/// The structured error of op `op`, argument `arg`.
pub fn arg_error(
    op: &'static str,
    arg: &'static str,
    expected: impl Into<String>,
    got: impl std::fmt::Display,
) -> Error {
    Error::Arg {
        op,
        arg,
        expected: expected.into(),
        got: got.to_string(),
    }
}

/// The product of `factors`, or an error naming `shape` when it overflows.
fn product(op: &'static str, arg: &'static str, factors: &[usize], shape: &str) -> Result<usize> {
    factors
        .iter()
        .try_fold(1usize, |p, &f| p.checked_mul(f))
        .ok_or_else(|| {
            arg_error(
                op,
                arg,
                format!("a size {shape} that fits in memory"),
                format!("{factors:?}, whose product overflows"),
            )
        })
}

/// `buf` holds at least the product of `factors` elements; `shape` spells the product out
/// ("m * k").
pub fn holds(
    op: &'static str,
    arg: &'static str,
    buf: &impl Buf,
    factors: &[usize],
    shape: &str,
) -> Result<()> {
    let need = product(op, arg, factors, shape)?;
    if buf.len() < need {
        return Err(arg_error(
            op,
            arg,
            format!("at least {need} elements ({shape})"),
            format!("{} elements", buf.len()),
        ));
    }
    Ok(())
}

/// `holds` for an optional buffer.
fn holds_opt(
    op: &'static str,
    arg: &'static str,
    buf: Option<&impl Buf>,
    factors: &[usize],
    shape: &str,
) -> Result<()> {
    match buf {
        Some(b) => holds(op, arg, b, factors, shape),
        None => Ok(()),
    }
}

/// A size argument that must be positive.
fn positive(op: &'static str, arg: &'static str, v: usize) -> Result<()> {
    if v == 0 {
        return Err(arg_error(op, arg, "a positive size", 0));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------- memory

/// `download`, `download_f32`, `download_u32`, `fill_f32`, `sum_squares_f32`: `t` holds `n`.
pub fn first_n(op: &'static str, t: &impl Buf, n: usize) -> Result<()> {
    holds(op, "t", t, &[n], "n")
}

/// `copy`, `copy_f32`: both buffers hold `n`.
pub fn copy(op: &'static str, src: &impl Buf, dst: &impl Buf, n: usize) -> Result<()> {
    holds(op, "src", src, &[n], "n")?;
    holds(op, "dst", dst, &[n], "n")
}

/// `copy_rows`: width positive, `t` holds rows up to max(src, dst) + n (overflow-checked), the
/// source and destination ranges disjoint.
pub fn copy_rows(t: &impl Buf, c: RowCopy) -> Result<()> {
    let op = "copy_rows";
    positive(op, "width", c.width)?;
    let end = c.src.max(c.dst).checked_add(c.n).ok_or_else(|| {
        arg_error(
            op,
            "n",
            "row ranges that fit in memory",
            format!("max(src, dst) = {} + n = {}", c.src.max(c.dst), c.n),
        )
    })?;
    holds(op, "t", t, &[end, c.width], "(max(src, dst) + n) * width")?;
    if c.n > 0 && c.src < c.dst + c.n && c.dst < c.src + c.n {
        return Err(arg_error(
            op,
            "dst",
            format!(
                "a row range disjoint from the source rows {}..{}",
                c.src,
                c.src + c.n
            ),
            format!("rows {}..{}", c.dst, c.dst + c.n),
        ));
    }
    Ok(())
}

/// `upload_raw`: exactly `n` elements of `dtype` in `bytes`.
pub fn upload_raw(dtype: DType, bytes: usize, n: usize) -> Result<()> {
    let op = "upload_raw";
    let want = product(op, "bytes", &[n, dtype.size()], "n * element size")?;
    if bytes != want {
        return Err(arg_error(
            op,
            "bytes",
            format!("{want} bytes ({n} elements of {dtype:?})"),
            format!("{bytes} bytes"),
        ));
    }
    Ok(())
}

/// `add_inplace`: both hold `n`.
pub fn add_inplace(a: &impl Buf, b: &impl Buf, n: usize) -> Result<()> {
    holds("add_inplace", "a", a, &[n], "n")?;
    holds("add_inplace", "b", b, &[n], "n")
}

// ---------------------------------------------------------------------------------- GEMM

/// `linear`: x [m, k], w [n, k], bias [n], y [m, n].
pub fn linear(
    x: &impl Buf,
    w: &impl Buf,
    bias: Option<&impl Buf>,
    y: &impl Buf,
    d: GemmDims,
) -> Result<()> {
    let op = "linear";
    holds(op, "x", x, &[d.m, d.k], "m * k")?;
    holds(op, "w", w, &[d.n, d.k], "n * k")?;
    holds(op, "y", y, &[d.m, d.n], "m * n")?;
    holds_opt(op, "bias", bias, &[d.n], "n")
}

/// `linear_bwd`: dy [m, n], x [m, k], w [n, k], dx [m, k], dw [n, k], dbias [n].
pub fn linear_bwd(
    dy: &impl Buf,
    x: &impl Buf,
    w: &impl Buf,
    dx: Option<&impl Buf>,
    dw: Option<&impl Buf>,
    dbias: Option<&impl Buf>,
    d: GemmDims,
) -> Result<()> {
    let op = "linear_bwd";
    holds(op, "dy", dy, &[d.m, d.n], "m * n")?;
    holds(op, "x", x, &[d.m, d.k], "m * k")?;
    holds(op, "w", w, &[d.n, d.k], "n * k")?;
    holds_opt(op, "dx", dx, &[d.m, d.k], "m * k")?;
    holds_opt(op, "dw", dw, &[d.n, d.k], "n * k")?;
    holds_opt(op, "dbias", dbias, &[d.n], "n")
}

/// `logits`: h [rows, dim], w [vocab, dim], out [rows, vocab] (rows = `d.n_tok`).
pub fn logits(h: &impl Buf, w: &impl Buf, out: &impl Buf, d: VocabDims) -> Result<()> {
    let op = "logits";
    let VocabDims {
        n_tok: rows,
        dim,
        vocab,
    } = d;
    holds(op, "h", h, &[rows, dim], "rows * dim")?;
    holds(op, "w", w, &[vocab, dim], "vocab * dim")?;
    holds(op, "out", out, &[rows, vocab], "rows * vocab")
}

// ---------------------------------------------------------------------------------- rows

/// `embedding` (`table` = the table) and `embedding_bwd` (`table` = dtable): ids [n_tok],
/// rows [n_tok, dim], dim > 0. Returns the number of table rows (`table.len() / dim`).
pub fn embedding(
    op: &'static str,
    ids: &impl Buf,
    rows: &impl Buf,
    table: &impl Buf,
    n_tok: usize,
    dim: usize,
) -> Result<usize> {
    let rows_arg = if op == "embedding" { "out" } else { "dout" };
    holds(op, "ids", ids, &[n_tok], "n_tok")?;
    holds(op, rows_arg, rows, &[n_tok, dim], "n_tok * dim")?;
    positive(op, "dim", dim)?;
    Ok(table.len() / dim)
}

/// `rmsnorm`: x, out [rows, dim], w [dim], rstd [rows], dim > 0.
pub fn rmsnorm(
    x: &impl Buf,
    w: &impl Buf,
    out: &impl Buf,
    rstd: &impl Buf,
    d: NormDims,
) -> Result<()> {
    let op = "rmsnorm";
    let NormDims { rows, dim } = d;
    holds(op, "x", x, &[rows, dim], "rows * dim")?;
    holds(op, "w", w, &[dim], "dim")?;
    holds(op, "out", out, &[rows, dim], "rows * dim")?;
    holds(op, "rstd", rstd, &[rows], "rows")?;
    positive(op, "dim", dim)
}

/// `add_rmsnorm`: x, delta, out [rows, dim], w [dim], rstd [rows], dim > 0.
pub fn add_rmsnorm(
    x: &impl Buf,
    delta: &impl Buf,
    w: &impl Buf,
    y: &NormOut<'_, impl Buf, impl Buf>,
    d: NormDims,
) -> Result<()> {
    let op = "add_rmsnorm";
    let NormDims { rows, dim } = d;
    holds(op, "x", x, &[rows, dim], "rows * dim")?;
    holds(op, "delta", delta, &[rows, dim], "rows * dim")?;
    holds(op, "w", w, &[dim], "dim")?;
    holds(op, "out", &*y.out, &[rows, dim], "rows * dim")?;
    holds(op, "rstd", &*y.rstd, &[rows], "rows")?;
    positive(op, "dim", dim)
}

/// `rmsnorm_bwd`: dout, x, dx [rows, dim], w, dw [dim], rstd [rows].
pub fn rmsnorm_bwd(
    dout: &impl Buf,
    x: &impl Buf,
    w: &impl Buf,
    rstd: &impl Buf,
    grads: &NormGrads<'_, impl Buf, impl Buf>,
    d: NormDims,
) -> Result<()> {
    let op = "rmsnorm_bwd";
    let NormDims { rows, dim } = d;
    let (dx, dw) = (&*grads.dx, grads.dw.as_deref());
    holds(op, "dout", dout, &[rows, dim], "rows * dim")?;
    holds(op, "x", x, &[rows, dim], "rows * dim")?;
    holds(op, "w", w, &[dim], "dim")?;
    holds(op, "rstd", rstd, &[rows], "rows")?;
    holds(op, "dx", dx, &[rows, dim], "rows * dim")?;
    holds_opt(op, "dw", dw, &[dim], "dim")
}

/// `rope` and `rope_bwd`: x [n_tok, n_heads, head_dim], pos [n_tok], head_dim even and
/// positive, theta finite and positive (inv_freq = theta^(-2i/head_dim) needs theta > 0).
pub fn rope(op: &'static str, x: &impl Buf, pos: &impl Buf, d: RopeRows, theta: f32) -> Result<()> {
    let RopeRows {
        n_tok,
        n_heads,
        head_dim,
    } = d;
    let x_arg = if op == "rope" { "x" } else { "dx" };
    if head_dim == 0 || head_dim % 2 != 0 {
        return Err(arg_error(
            op,
            "head_dim",
            "an even, positive size",
            head_dim,
        ));
    }
    if !(theta.is_finite() && theta > 0.0) {
        return Err(arg_error(op, "theta", "a finite value > 0", theta));
    }
    holds(
        op,
        x_arg,
        x,
        &[n_tok, n_heads, head_dim],
        "n_tok * n_heads * head_dim",
    )?;
    holds(op, "pos", pos, &[n_tok], "n_tok")
}

/// `swiglu`: gate, up, out hold `n`.
pub fn swiglu(gate: &impl Buf, up: &impl Buf, out: &impl Buf, n: usize) -> Result<()> {
    holds("swiglu", "gate", gate, &[n], "n")?;
    holds("swiglu", "up", up, &[n], "n")?;
    holds("swiglu", "out", out, &[n], "n")
}

/// `swiglu_bwd`: every buffer holds `n`.
pub fn swiglu_bwd(
    dout: &impl Buf,
    gate: &impl Buf,
    up: &impl Buf,
    dgate: &impl Buf,
    dup: &impl Buf,
    n: usize,
) -> Result<()> {
    let op = "swiglu_bwd";
    holds(op, "dout", dout, &[n], "n")?;
    holds(op, "gate", gate, &[n], "n")?;
    holds(op, "up", up, &[n], "n")?;
    holds(op, "dgate", dgate, &[n], "n")?;
    holds(op, "dup", dup, &[n], "n")
}

// ---------------------------------------------------------------------------------- attention

/// Head counts: n_heads a positive multiple of n_kv > 0, head_dim > 0.
pub fn heads(op: &'static str, h: Heads) -> Result<()> {
    if h.n_kv == 0 {
        return Err(arg_error(op, "n_kv", "a positive number of heads", 0));
    }
    if h.n_heads == 0 || h.n_heads % h.n_kv != 0 {
        return Err(arg_error(
            op,
            "n_heads",
            format!("a positive multiple of n_kv = {}", h.n_kv),
            h.n_heads,
        ));
    }
    positive(op, "head_dim", h.head_dim)
}

/// Packed-sequence offsets: `cu_host` holds n_seq + 1 non-decreasing offsets from 0, no
/// sequence longer than `max_len`, and the device copy holds as many entries. Returns the token
/// count (the last offset). That the two copies agree is a data check ([`same_offsets`]).
pub fn packed<I: Buf>(op: &'static str, p: &Packed<'_, I>) -> Result<usize> {
    let cu = p.cu_host;
    if cu.first() != Some(&0) {
        return Err(arg_error(
            op,
            "cu_host",
            "n_seq + 1 offsets starting with 0",
            format!("{:?}", &cu[..cu.len().min(4)]),
        ));
    }
    for (i, w) in cu.windows(2).enumerate() {
        if w[1] < w[0] {
            return Err(arg_error(
                op,
                "cu_host",
                "non-decreasing offsets",
                format!("cu_host[{}] = {} after {}", i + 1, w[1], w[0]),
            ));
        }
        if (w[1] - w[0]) as usize > p.max_len {
            return Err(arg_error(
                op,
                "max_len",
                format!("at least the longest sequence ({} tokens)", w[1] - w[0]),
                p.max_len,
            ));
        }
    }
    holds(op, "cu_seqlens", p.cu_seqlens, &[cu.len()], "n_seq + 1")?;
    Ok(p.n_tok())
}

/// `attention`: q, out [n_tok, n_heads, head_dim]; k, v [n_tok, n_kv, head_dim];
/// lse [n_heads, n_tok]. Returns n_tok.
pub fn attention<I: Buf>(
    qkv: Qkv<'_, impl Buf>,
    out: &impl Buf,
    lse: &impl Buf,
    p: &Packed<'_, I>,
    h: Heads,
) -> Result<usize> {
    let op = "attention";
    let Qkv { q, k, v } = qkv;
    heads(op, h)?;
    let n = packed(op, p)?;
    let (qs, ks) = ([n, h.n_heads, h.head_dim], [n, h.n_kv, h.head_dim]);
    holds(op, "q", q, &qs, "n_tok * n_heads * head_dim")?;
    holds(op, "k", k, &ks, "n_tok * n_kv * head_dim")?;
    holds(op, "v", v, &ks, "n_tok * n_kv * head_dim")?;
    holds(op, "out", out, &qs, "n_tok * n_heads * head_dim")?;
    holds(op, "lse", lse, &[n, h.n_heads], "n_tok * n_heads")?;
    Ok(n)
}

/// `attention_bwd`: the forward's shapes for dout, q, k, v, out, lse, and dq, dk, dv like q,
/// k, v. Returns n_tok.
pub fn attention_bwd<I: Buf>(
    qkv: Qkv<'_, impl Buf>,
    saved: AttnSaved<'_, impl Buf, impl Buf>,
    grads: &AttnGrads<'_, impl Buf>,
    p: &Packed<'_, I>,
    h: Heads,
) -> Result<usize> {
    let op = "attention_bwd";
    let (Qkv { q, k, v }, AttnSaved { dout, out, lse }) = (qkv, saved);
    let (dq, dk, dv) = (&*grads.dq, &*grads.dk, &*grads.dv);
    heads(op, h)?;
    let n = packed(op, p)?;
    let (qs, ks) = ([n, h.n_heads, h.head_dim], [n, h.n_kv, h.head_dim]);
    let (qd, kd) = ("n_tok * n_heads * head_dim", "n_tok * n_kv * head_dim");
    holds(op, "dout", dout, &qs, qd)?;
    holds(op, "q", q, &qs, qd)?;
    holds(op, "k", k, &ks, kd)?;
    holds(op, "v", v, &ks, kd)?;
    holds(op, "out", out, &qs, qd)?;
    holds(op, "lse", lse, &[n, h.n_heads], "n_tok * n_heads")?;
    holds(op, "dq", dq, &qs, qd)?;
    holds(op, "dk", dk, &ks, kd)?;
    holds(op, "dv", dv, &ks, kd)?;
    Ok(n)
}

/// A shared-prefix table against the packed segments: 2 entries per segment, each range
/// lo..hi with lo <= hi <= the segment's start (a prefix lies before its segment) and at most
/// `max_len` rows; the backend's copy holds as many entries. That the copies agree is a data
/// check ([`same_prefix`]).
pub fn prefix<I: Buf>(op: &'static str, pre: &Prefix<'_, I>, p: &Packed<'_, I>) -> Result<()> {
    let n_seg = p.cu_host.len().saturating_sub(1);
    let host = pre.prefix_host;
    if host.len() != 2 * n_seg {
        return Err(arg_error(
            op,
            "prefix_host",
            format!("2 entries per segment ({} for {n_seg} segments)", 2 * n_seg),
            format!("{} entries", host.len()),
        ));
    }
    for (s, (r, &start)) in host.chunks(2).zip(p.cu_host).enumerate() {
        let (lo, hi) = (r[0], r[1]);
        if lo > hi || hi > start || (hi - lo) as usize > p.max_len {
            return Err(arg_error(
                op,
                "prefix_host",
                format!(
                    "for segment {s}: lo <= hi <= {start} (its start), at most max_len = {} rows",
                    p.max_len
                ),
                format!("rows {lo}..{hi}"),
            ));
        }
    }
    holds(op, "prefix", pre.prefix, &[host.len()], "2 * n_seq")
}

/// `attention_prefixed` (`bwd` false) and `attention_prefixed_bwd` (`bwd` true): the shapes of
/// [`attention`] / [`attention_bwd`] plus the prefix table; `(out, lse)` are the forward's
/// outputs (the backward's inputs). Returns n_tok.
pub fn attention_prefixed<I: Buf>(
    op: &'static str,
    qkv: Qkv<'_, impl Buf>,
    (out, lse): (&impl Buf, &impl Buf),
    grads: Option<BwdGrads<'_>>,
    p: &Packed<'_, I>,
    pre: &Prefix<'_, I>,
    h: Heads,
) -> Result<usize> {
    let Qkv { q, k, v } = qkv;
    heads(op, h)?;
    let n = packed(op, p)?;
    prefix(op, pre, p)?;
    let (qs, ks) = ([n, h.n_heads, h.head_dim], [n, h.n_kv, h.head_dim]);
    let (qd, kd) = ("n_tok * n_heads * head_dim", "n_tok * n_kv * head_dim");
    holds(op, "q", q, &qs, qd)?;
    holds(op, "k", k, &ks, kd)?;
    holds(op, "v", v, &ks, kd)?;
    holds(op, "out", out, &qs, qd)?;
    holds(op, "lse", lse, &[n, h.n_heads], "n_tok * n_heads")?;
    if let Some((dout, dq, dk, dv)) = grads {
        holds(op, "dout", &Len(dout.len()), &qs, qd)?;
        holds(op, "dq", &Len(dq.len()), &qs, qd)?;
        holds(op, "dk", &Len(dk.len()), &ks, kd)?;
        holds(op, "dv", &Len(dv.len()), &ks, kd)?;
    }
    Ok(n)
}

/// The backward's dout, dq, dk, dv for [`attention_prefixed`].
pub type BwdGrads<'a> = (&'a dyn Buf, &'a dyn Buf, &'a dyn Buf, &'a dyn Buf);

/// A bare length, for buffers passed as `&dyn Buf`.
struct Len(usize);
impl Buf for Len {
    fn len(&self) -> usize {
        self.0
    }
}

/// `scatter_add_rows`: ids [n], src [n, dim], dst [dst_rows, dim], dim > 0.
pub fn scatter_add_rows(
    ids: &impl Buf,
    src: &impl Buf,
    dst: &impl Buf,
    n: usize,
    dst_rows: usize,
    dim: usize,
) -> Result<()> {
    let op = "scatter_add_rows";
    positive(op, "dim", dim)?;
    holds(op, "ids", ids, &[n], "n")?;
    holds(op, "src", src, &[n, dim], "n * dim")?;
    holds(op, "dst", dst, &[dst_rows, dim], "dst_rows * dim")
}

/// `kv_store`: k, v [n_tok, kv_dim], dst [n_tok], kv_dim > 0, caches of one size. Returns the
/// number of cache rows.
pub fn kv_store(
    k: &impl Buf,
    v: &impl Buf,
    dst: &impl Buf,
    k_cache: &impl Buf,
    v_cache: &impl Buf,
    rows: KvRows,
) -> Result<usize> {
    let op = "kv_store";
    let KvRows { n_tok, kv_dim } = rows;
    holds(op, "k", k, &[n_tok, kv_dim], "n_tok * kv_dim")?;
    holds(op, "v", v, &[n_tok, kv_dim], "n_tok * kv_dim")?;
    holds(op, "dst", dst, &[n_tok], "n_tok")?;
    positive(op, "kv_dim", kv_dim)?;
    if k_cache.len() != v_cache.len() {
        return Err(arg_error(
            op,
            "v_cache",
            format!("as many elements as k_cache ({})", k_cache.len()),
            format!("{} elements", v_cache.len()),
        ));
    }
    Ok(k_cache.len() / kv_dim)
}

/// `attention_decode`: q, out [n_seq, n_heads * head_dim], lens [n_seq], table [n_seq *
/// max_blocks], block_size and max_blocks positive, caches of equal length, a positive
/// multiple of block_size * n_kv * head_dim. Returns the pool's block count.
pub fn attention_decode<I: Buf>(
    q: &impl Buf,
    k_cache: &impl Buf,
    v_cache: &impl Buf,
    cached: &Cached<'_, I>,
    out: &impl Buf,
    h: Heads,
) -> Result<usize> {
    let op = "attention_decode";
    let Cached {
        lens,
        table,
        n_seq,
        max_blocks,
        block_size,
    } = *cached;
    heads(op, h)?;
    positive(op, "block_size", block_size)?;
    positive(op, "max_blocks", max_blocks)?;
    let qs = [n_seq, h.n_heads, h.head_dim];
    holds(op, "q", q, &qs, "n_seq * n_heads * head_dim")?;
    holds(op, "out", out, &qs, "n_seq * n_heads * head_dim")?;
    holds(op, "lens", lens, &[n_seq], "n_seq")?;
    holds(
        op,
        "table",
        table,
        &[n_seq, max_blocks],
        "n_seq * max_blocks",
    )?;
    let block = block_size
        .checked_mul(h.n_kv)
        .and_then(|x| x.checked_mul(h.head_dim))
        .ok_or_else(|| {
            arg_error(
                op,
                "block_size",
                "block_size * n_kv * head_dim below 2^64",
                block_size,
            )
        })?;
    for (arg, c) in [("k_cache", k_cache.len()), ("v_cache", v_cache.len())] {
        if c == 0 || c % block != 0 {
            return Err(arg_error(
                op,
                arg,
                format!(
                    "a positive multiple of block_size * n_kv * head_dim = {block} elements \
                     (whole blocks)"
                ),
                format!("{c} elements"),
            ));
        }
    }
    if k_cache.len() != v_cache.len() {
        return Err(arg_error(
            op,
            "v_cache",
            format!("as many elements as k_cache ({})", k_cache.len()),
            format!("{} elements", v_cache.len()),
        ));
    }
    Ok(k_cache.len() / block)
}

// ---------------------------------------------------------------------------------- vocabulary

/// The inverse temperature of a vocabulary op: finite and > 0.
fn inv_temperature(op: &'static str, inv_t: f32) -> Result<()> {
    if !(inv_t.is_finite() && inv_t > 0.0) {
        return Err(arg_error(op, "inv_t", "a finite value > 0", inv_t));
    }
    Ok(())
}

/// `logprobs`: inv_t finite and > 0, h [n_tok, dim], w [vocab, dim], targets, logp, lse,
/// entropy [n_tok], vocab and dim positive.
pub fn logprobs(
    head: LmHead<'_, impl Buf, impl Buf>,
    out: &LogprobsOut<'_, impl Buf>,
    d: VocabDims,
    inv_t: f32,
) -> Result<()> {
    let op = "logprobs";
    let LmHead { h, w, targets } = head;
    let (logp, lse, entropy) = (&*out.logp, &*out.lse, out.entropy.as_deref());
    let VocabDims { n_tok, dim, vocab } = d;
    inv_temperature(op, inv_t)?;
    positive(op, "vocab", vocab)?;
    positive(op, "dim", dim)?;
    holds(op, "h", h, &[n_tok, dim], "n_tok * dim")?;
    holds(op, "w", w, &[vocab, dim], "vocab * dim")?;
    holds(op, "targets", targets, &[n_tok], "n_tok")?;
    holds(op, "logp", logp, &[n_tok], "n_tok")?;
    holds(op, "lse", lse, &[n_tok], "n_tok")?;
    holds_opt(op, "entropy", entropy, &[n_tok], "n_tok")
}

/// `logprobs_bwd`: inv_t finite and > 0, dlogp, targets, lse [n_tok], h, dh [n_tok, dim], w,
/// dw [vocab, dim].
pub fn logprobs_bwd(
    dlogp: &impl Buf,
    head: LmHead<'_, impl Buf, impl Buf>,
    lse: &impl Buf,
    grads: &LogprobsGrads<'_, impl Buf, impl Buf>,
    d: VocabDims,
    inv_t: f32,
) -> Result<()> {
    let op = "logprobs_bwd";
    let LmHead { h, w, targets } = head;
    let (dh, dw) = (&*grads.dh, grads.dw.as_deref());
    let VocabDims { n_tok, dim, vocab } = d;
    inv_temperature(op, inv_t)?;
    positive(op, "vocab", vocab)?;
    positive(op, "dim", dim)?;
    holds(op, "dlogp", dlogp, &[n_tok], "n_tok")?;
    holds(op, "h", h, &[n_tok, dim], "n_tok * dim")?;
    holds(op, "w", w, &[vocab, dim], "vocab * dim")?;
    holds(op, "targets", targets, &[n_tok], "n_tok")?;
    holds(op, "lse", lse, &[n_tok], "n_tok")?;
    holds(op, "dh", dh, &[n_tok, dim], "n_tok * dim")?;
    holds_opt(op, "dw", dw, &[vocab, dim], "vocab * dim")
}

/// `sample`: logits [rows, vocab], out [rows], vocab > 0, temperature finite and >= 0 (0 is
/// greedy), top_p in [0, 1] (0 keeps the single most likely token).
pub fn sample(
    logits: &impl Buf,
    out: &impl Buf,
    rows: &SampleRows<'_>,
    p: &SampleParams,
) -> Result<()> {
    let op = "sample";
    let draws = rows.draws();
    positive(op, "vocab", rows.vocab)?;
    holds(
        op,
        "logits",
        logits,
        &[rows.n_rows, rows.vocab],
        "n_rows * vocab",
    )?;
    holds(op, "out", out, &[draws], "draws (offsets.len())")?;
    match rows.src {
        None => {
            if rows.n_rows < draws {
                return Err(arg_error(
                    op,
                    "n_rows",
                    format!("at least the {draws} draws (src = None reads row r for draw r)"),
                    rows.n_rows,
                ));
            }
        }
        Some(src) => {
            if src.len() != draws {
                return Err(arg_error(
                    op,
                    "src",
                    format!("one logits row per draw ({draws})"),
                    format!("{} rows", src.len()),
                ));
            }
            if let Some(r) = src.iter().position(|&s| s as usize >= rows.n_rows) {
                return Err(arg_error(
                    op,
                    "src",
                    format!("rows below n_rows = {}", rows.n_rows),
                    format!("src[{r}] = {}", src[r]),
                ));
            }
        }
    }
    sample_params(op, p)
}

/// `sample_table`: logits [n_rows, vocab], out [draws], table [3 * draws] u32; the settings
/// as [`sample`] checks them (the row ids are checked where the table is read).
pub fn sample_table(
    logits: &impl Buf,
    out: &impl Buf,
    table: &impl Buf,
    d: SampleDims,
    p: &SampleParams,
) -> Result<()> {
    let op = "sample_table";
    positive(op, "vocab", d.vocab)?;
    holds(op, "logits", logits, &[d.n_rows, d.vocab], "n_rows * vocab")?;
    holds(op, "out", out, &[d.draws], "draws")?;
    holds(op, "table", table, &[d.draws, 3], "3 * draws")?;
    sample_params(op, p)
}

fn sample_params(op: &'static str, p: &SampleParams) -> Result<()> {
    if !(p.temperature.is_finite() && p.temperature >= 0.0) {
        return Err(arg_error(
            op,
            "temperature",
            "a finite value >= 0",
            p.temperature,
        ));
    }
    if !(0.0..=1.0).contains(&p.top_p) {
        return Err(arg_error(op, "top_p", "a value in [0, 1]", p.top_p));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------- RL loss, optimiser

/// `grpo_loss`: logp, old_logp, ref_logp, adv, mask, seq_id, dlogp [n_tok]; loss_scale_div
/// finite and > 0; norm_len finite and > 0 for seq-mean-token-sum-norm (checked for 0 tokens
/// too).
pub fn grpo_loss<F: Buf, I: Buf>(
    t: &GrpoTokens<'_, F, I>,
    dlogp: &impl Buf,
    cfg: &GrpoLossCfg,
) -> Result<()> {
    let op = "grpo_loss";
    let n_tok = t.n_tok;
    holds(op, "logp", t.logp, &[n_tok], "n_tok")?;
    holds(op, "old_logp", t.old_logp, &[n_tok], "n_tok")?;
    holds(op, "ref_logp", t.ref_logp, &[n_tok], "n_tok")?;
    holds(op, "adv", t.adv, &[n_tok], "n_tok")?;
    holds(op, "mask", t.mask, &[n_tok], "n_tok")?;
    holds(op, "seq_id", t.seq_id, &[n_tok], "n_tok")?;
    holds(op, "dlogp", dlogp, &[n_tok], "n_tok")?;
    if !(cfg.loss_scale_div.is_finite() && cfg.loss_scale_div > 0.0) {
        return Err(arg_error(
            op,
            "loss_scale_div",
            "a finite value > 0",
            cfg.loss_scale_div,
        ));
    }
    if cfg.agg == LossAgg::SeqMeanTokenSumNorm && !(cfg.norm_len.is_finite() && cfg.norm_len > 0.0)
    {
        return Err(arg_error(
            op,
            "norm_len",
            "a finite value > 0 for seq-mean-token-sum-norm",
            cfg.norm_len,
        ));
    }
    Ok(())
}

/// `adamw`: param, grad, m, v (and master when given) hold `n`; step is 1-based.
pub fn adamw<T: Buf, F: Buf>(
    state: &AdamWState<'_, T, F>,
    grad: &F,
    n: usize,
    step: u64,
) -> Result<()> {
    let op = "adamw";
    holds(op, "param", &*state.param, &[n], "n")?;
    holds(op, "grad", grad, &[n], "n")?;
    holds(op, "m", &*state.m, &[n], "n")?;
    holds(op, "v", &*state.v, &[n], "n")?;
    holds_opt(op, "master", state.master.as_deref(), &[n], "n")?;
    if step == 0 {
        return Err(arg_error(op, "step", "a 1-based step count", 0));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------- data checks

/// Every one of the first `n` ids is below `bound` (`what` names the bound).
pub fn ids_below(
    op: &'static str,
    arg: &'static str,
    ids: &[u32],
    n: usize,
    bound: usize,
    what: &str,
) -> Result<()> {
    if let Some((t, &id)) = ids[..n]
        .iter()
        .enumerate()
        .find(|(_, &id)| id as usize >= bound)
    {
        return Err(arg_error(
            op,
            arg,
            format!("entries below {what} = {bound}"),
            format!("{arg}[{t}] = {id}"),
        ));
    }
    Ok(())
}

/// The device and host copies of packed offsets agree.
pub fn same_offsets(op: &'static str, cu_dev: &[u32], cu_host: &[u32]) -> Result<()> {
    if let Some(i) = (0..cu_host.len()).find(|&i| cu_dev[i] != cu_host[i]) {
        return Err(arg_error(
            op,
            "cu_seqlens",
            "the offsets of cu_host",
            format!(
                "cu_seqlens[{i}] = {} where cu_host[{i}] = {}",
                cu_dev[i], cu_host[i]
            ),
        ));
    }
    Ok(())
}

/// The device and host copies of a prefix table agree.
pub fn same_prefix(op: &'static str, dev: &[u32], host: &[u32]) -> Result<()> {
    if let Some(i) = (0..host.len()).find(|&i| dev[i] != host[i]) {
        return Err(arg_error(
            op,
            "prefix",
            "the entries of prefix_host",
            format!(
                "prefix[{i}] = {} where prefix_host[{i}] = {}",
                dev[i], host[i]
            ),
        ));
    }
    Ok(())
}

/// Decode lengths and block tables (host copies): every lens[b] in 1..=max_blocks *
/// block_size, and every block id a sequence reads (the first ceil(lens[b] / block_size) of
/// its row) below `n_blocks`.
pub fn decode_table(cached: &Cached<'_, [u32]>, n_blocks: usize) -> Result<()> {
    let op = "attention_decode";
    let max_len = cached.max_len();
    let (bs, mb) = (cached.block_size, cached.max_blocks);
    for (b, &l) in cached.lens[..cached.n_seq].iter().enumerate() {
        if l == 0 || l as usize > max_len {
            return Err(arg_error(
                op,
                "lens",
                format!("lengths in 1..={max_len} (max_blocks * block_size)"),
                format!("lens[{b}] = {l}"),
            ));
        }
        let row = &cached.table[b * mb..b * mb + (l as usize).div_ceil(bs)];
        if let Some((j, &id)) = row
            .iter()
            .enumerate()
            .find(|(_, &id)| id as usize >= n_blocks)
        {
            return Err(arg_error(
                op,
                "table",
                format!("block ids below {n_blocks} (the caches' blocks)"),
                format!("table[{b} * {mb} + {j}] = {id}"),
            ));
        }
    }
    Ok(())
}

/// Sampling logits: finite or -inf, and (temperature > 0) not a whole row of -inf.
pub fn sample_logits(logits: &[f32], rows: &SampleRows<'_>, temperature: f32) -> Result<()> {
    let vocab = rows.vocab;
    for d in 0..rows.draws() {
        let r = rows.row(d);
        let row = &logits[r * vocab..(r + 1) * vocab];
        if let Some(i) = row.iter().position(|z| z.is_nan() || *z == f32::INFINITY) {
            return Err(arg_error(
                "sample",
                "logits",
                "finite values or -inf",
                format!("logits[{r}, {i}] = {}", row[i]),
            ));
        }
        if temperature > 0.0 && row.iter().all(|z| *z == f32::NEG_INFINITY) {
            return Err(arg_error(
                "sample",
                "logits",
                "at least one finite logit per row at temperature > 0",
                format!("row {r} all -inf"),
            ));
        }
    }
    Ok(())
}

/// GRPO mask weights: finite and >= 0.
pub fn mask_weights(mask: &[f32]) -> Result<()> {
    if let Some(t) = mask.iter().position(|m| !(m.is_finite() && *m >= 0.0)) {
        return Err(arg_error(
            "grpo_loss",
            "mask",
            "finite weights >= 0",
            format!("mask[{t}] = {}", mask[t]),
        ));
    }
    Ok(())
}

/// A collective's reduce-scatter (`dist::Collective::reduce_scatter_add`): `send` holds world
/// shards of n elements, `acc` one.
pub fn reduce_scatter(send: &impl Buf, acc: &impl Buf, n: usize, world: usize) -> Result<()> {
    const OP: &str = "reduce_scatter";
    positive(OP, "n", n)?;
    holds(OP, "send", send, &[world, n], "world * n")?;
    holds(OP, "acc", acc, &[n], "n")
}

/// A collective's all-gather (`dist::Collective::all_gather`): `shard` holds n elements, `out`
/// world shards of them.
pub fn all_gather(shard: &impl Buf, out: &impl Buf, n: usize, world: usize) -> Result<()> {
    const OP: &str = "all_gather";
    positive(OP, "n", n)?;
    holds(OP, "shard", shard, &[n], "n")?;
    holds(OP, "out", out, &[world, n], "world * n")
}
