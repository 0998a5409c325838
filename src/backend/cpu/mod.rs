//! The f32 CPU backend.
//!
//! The math of every op lives in [`math`], generic over [`math::Real`], so that the tests run
//! the very same code in f64 for finite-difference checks: it is the oracle. The ops run the
//! multi-threaded, blocked f32 paths of [`fast`] (tested against [`math`] op by op). This file
//! validates the arguments of each op (lengths against shape arguments, indices against their
//! ranges) and returns `Error::Invalid` naming the op and the argument at fault.
//!
//! Threads: all available cores unless [`set_num_threads`] or the `TOOLN1_NUM_THREADS` (else
//! `RAYON_NUM_THREADS`) environment variable says otherwise. Results are the same bits for
//! every thread count.

pub mod fast;
pub mod math;

pub use fast::{default_num_threads, num_threads, set_num_threads};

use crate::backend::{AdamWStep, Backend, DType, GrpoLossCfg, GrpoLossOut};
use crate::{Error, Result};

/// The CPU backend (f32 everywhere).
#[derive(Clone, Debug, Default)]
pub struct Cpu;

/// `Err` unless buffer `arg` of `op` holds at least `need` elements.
fn need(op: &str, arg: &str, have: usize, need: usize) -> Result<()> {
    if have < need {
        return Err(Error::Invalid(format!(
            "{op}: `{arg}` holds {have} elements, the shape arguments need {need}"
        )));
    }
    Ok(())
}

/// `Err` unless every one of the first `n` ids is below `bound`.
fn ids_below(op: &str, arg: &str, ids: &[u32], n: usize, bound: usize, what: &str) -> Result<()> {
    if let Some((t, &id)) = ids[..n]
        .iter()
        .enumerate()
        .find(|(_, &id)| id as usize >= bound)
    {
        return Err(Error::Invalid(format!(
            "{op}: `{arg}[{t}]` = {id} is out of range ({what} = {bound})"
        )));
    }
    Ok(())
}

/// `Err` unless the inverse temperature of a vocabulary op is finite and > 0.
fn check_inv_t(op: &str, inv_t: f32) -> Result<()> {
    if !(inv_t.is_finite() && inv_t > 0.0) {
        return Err(Error::Invalid(format!(
            "{op}: `inv_t` = {inv_t}, expected a finite value > 0"
        )));
    }
    Ok(())
}

/// Validate packed-sequence offsets: n_seq+1 non-decreasing entries starting at 0; returns the
/// token count they describe.
fn check_cu(op: &str, cu_dev: &[u32], cu_host: &[u32], max_len: usize) -> Result<usize> {
    if cu_host.is_empty() || cu_host[0] != 0 {
        return Err(Error::Invalid(format!(
            "{op}: `cu_host` must start with 0 and hold n_seq + 1 offsets, got {:?}",
            &cu_host[..cu_host.len().min(4)]
        )));
    }
    need(op, "cu_seqlens", cu_dev.len(), cu_host.len())?;
    if cu_dev[..cu_host.len()] != *cu_host {
        return Err(Error::Invalid(format!(
            "{op}: `cu_seqlens` and `cu_host` differ"
        )));
    }
    for (i, w) in cu_host.windows(2).enumerate() {
        if w[1] < w[0] {
            return Err(Error::Invalid(format!(
                "{op}: `cu_host` decreases at entry {} ({} -> {})",
                i + 1,
                w[0],
                w[1]
            )));
        }
        if (w[1] - w[0]) as usize > max_len {
            return Err(Error::Invalid(format!(
                "{op}: sequence {i} has {} tokens, more than `max_len` = {max_len}",
                w[1] - w[0]
            )));
        }
    }
    Ok(*cu_host.last().unwrap_or(&0) as usize)
}

/// Check a shared-prefix table (see [`crate::backend::check_prefix_table`]) and that its
/// device and host copies agree.
fn check_prefix(
    op: &str,
    dev: &[u32],
    host: &[u32],
    cu_host: &[u32],
    max_len: usize,
) -> Result<()> {
    crate::backend::check_prefix_table(op, host, cu_host, max_len)?;
    need(op, "prefix", dev.len(), host.len())?;
    if dev[..host.len()] != *host {
        return Err(Error::Invalid(format!(
            "{op}: `prefix` and `prefix_host` differ"
        )));
    }
    Ok(())
}

fn check_heads(op: &str, n_heads: usize, n_kv: usize, head_dim: usize) -> Result<()> {
    if n_kv == 0 || n_heads == 0 || n_heads % n_kv != 0 {
        return Err(Error::Invalid(format!(
            "{op}: `n_heads` = {n_heads} must be a positive multiple of `n_kv` = {n_kv}"
        )));
    }
    if head_dim == 0 {
        return Err(Error::Invalid(format!("{op}: `head_dim` must be positive")));
    }
    Ok(())
}

fn check_rope(
    op: &str,
    x: usize,
    pos: usize,
    n_tok: usize,
    n_heads: usize,
    head_dim: usize,
    theta: f32,
) -> Result<()> {
    need(op, "x", x, n_tok * n_heads * head_dim)?;
    need(op, "pos", pos, n_tok)?;
    if head_dim % 2 != 0 || head_dim == 0 {
        return Err(Error::Invalid(format!(
            "{op}: `head_dim` = {head_dim} must be even and positive"
        )));
    }
    if !(theta.is_finite() && theta > 0.0) {
        return Err(Error::Invalid(format!(
            "{op}: `theta` = {theta} must be positive"
        )));
    }
    Ok(())
}

impl Backend for Cpu {
    type T = Vec<f32>;
    type F = Vec<f32>;
    type I = Vec<u32>;

    fn name(&self) -> String {
        "cpu (f32)".into()
    }

    fn zeros(&self, n: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; n])
    }
    fn zeros_f32(&self, n: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; n])
    }
    fn upload(&self, data: &[f32]) -> Result<Vec<f32>> {
        Ok(data.to_vec())
    }
    fn upload_f32(&self, data: &[f32]) -> Result<Vec<f32>> {
        Ok(data.to_vec())
    }
    fn upload_u32(&self, data: &[u32]) -> Result<Vec<u32>> {
        Ok(data.to_vec())
    }
    fn upload_raw(&self, dtype: DType, bytes: &[u8], n: usize) -> Result<Vec<f32>> {
        let want = n.checked_mul(dtype.size()).ok_or_else(|| {
            Error::Invalid(format!("upload_raw: {n} elements of {dtype:?} overflow"))
        })?;
        if bytes.len() != want {
            return Err(Error::Invalid(format!(
                "upload_raw: {} bytes given, {n} elements of {dtype:?} need {want}",
                bytes.len()
            )));
        }
        Ok(match dtype {
            DType::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            DType::F16 => bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            DType::BF16 => bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        })
    }
    fn download(&self, t: &Vec<f32>, n: usize) -> Result<Vec<f32>> {
        need("download", "t", t.len(), n)?;
        Ok(t[..n].to_vec())
    }
    fn download_f32(&self, t: &Vec<f32>, n: usize) -> Result<Vec<f32>> {
        need("download_f32", "t", t.len(), n)?;
        Ok(t[..n].to_vec())
    }
    fn download_u32(&self, t: &Vec<u32>, n: usize) -> Result<Vec<u32>> {
        need("download_u32", "t", t.len(), n)?;
        Ok(t[..n].to_vec())
    }
    fn copy(&self, src: &Vec<f32>, dst: &mut Vec<f32>, n: usize) -> Result<()> {
        need("copy", "src", src.len(), n)?;
        need("copy", "dst", dst.len(), n)?;
        dst[..n].copy_from_slice(&src[..n]);
        Ok(())
    }
    fn copy_f32(&self, src: &Vec<f32>, dst: &mut Vec<f32>, n: usize) -> Result<()> {
        need("copy_f32", "src", src.len(), n)?;
        need("copy_f32", "dst", dst.len(), n)?;
        dst[..n].copy_from_slice(&src[..n]);
        Ok(())
    }
    fn fill_f32(&self, t: &mut Vec<f32>, n: usize, value: f32) -> Result<()> {
        need("fill_f32", "t", t.len(), n)?;
        t[..n].fill(value);
        Ok(())
    }
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn add_inplace(&self, a: &mut Vec<f32>, b: &Vec<f32>, n: usize) -> Result<()> {
        need("add_inplace", "a", a.len(), n)?;
        need("add_inplace", "b", b.len(), n)?;
        fast::run(|| fast::add_inplace(&mut a[..n], &b[..n]));
        Ok(())
    }
    fn sum_squares_f32(&self, t: &Vec<f32>, n: usize) -> Result<f64> {
        need("sum_squares_f32", "t", t.len(), n)?;
        Ok(t[..n].iter().map(|&x| x as f64 * x as f64).sum())
    }

    fn linear(
        &self,
        x: &Vec<f32>,
        w: &Vec<f32>,
        bias: Option<&Vec<f32>>,
        y: &mut Vec<f32>,
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<()> {
        need("linear", "x", x.len(), m * k)?;
        need("linear", "w", w.len(), n * k)?;
        need("linear", "y", y.len(), m * n)?;
        if let Some(b) = bias {
            need("linear", "bias", b.len(), n)?;
        }
        fast::run(|| fast::linear(x, w, bias.map(|b| b.as_slice()), y, m, n, k));
        Ok(())
    }

    fn linear_bwd(
        &self,
        dy: &Vec<f32>,
        x: &Vec<f32>,
        w: &Vec<f32>,
        dx: Option<&mut Vec<f32>>,
        accumulate_dx: bool,
        dw: Option<&mut Vec<f32>>,
        dbias: Option<&mut Vec<f32>>,
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<()> {
        let op = "linear_bwd";
        need(op, "dy", dy.len(), m * n)?;
        need(op, "x", x.len(), m * k)?;
        need(op, "w", w.len(), n * k)?;
        if let Some(d) = &dx {
            need(op, "dx", d.len(), m * k)?;
        }
        if let Some(d) = &dw {
            need(op, "dw", d.len(), n * k)?;
        }
        if let Some(d) = &dbias {
            need(op, "dbias", d.len(), n)?;
        }
        fast::run(|| {
            fast::linear_bwd(
                dy,
                x,
                w,
                dx.map(|d| d.as_mut_slice()),
                accumulate_dx,
                dw.map(|d| d.as_mut_slice()),
                dbias.map(|d| d.as_mut_slice()),
                m,
                n,
                k,
            )
        });
        Ok(())
    }

    fn embedding(
        &self,
        ids: &Vec<u32>,
        table: &Vec<f32>,
        out: &mut Vec<f32>,
        n_tok: usize,
        dim: usize,
    ) -> Result<()> {
        need("embedding", "ids", ids.len(), n_tok)?;
        need("embedding", "out", out.len(), n_tok * dim)?;
        if dim == 0 {
            return Err(Error::Invalid("embedding: `dim` must be positive".into()));
        }
        let rows = table.len().checked_div(dim).unwrap_or(0);
        ids_below("embedding", "ids", ids, n_tok, rows, "table rows")?;
        math::embedding(ids, table, out, n_tok, dim);
        Ok(())
    }

    fn embedding_bwd(
        &self,
        ids: &Vec<u32>,
        dout: &Vec<f32>,
        dtable: &mut Vec<f32>,
        n_tok: usize,
        dim: usize,
    ) -> Result<()> {
        need("embedding_bwd", "ids", ids.len(), n_tok)?;
        need("embedding_bwd", "dout", dout.len(), n_tok * dim)?;
        if dim == 0 {
            return Err(Error::Invalid(
                "embedding_bwd: `dim` must be positive".into(),
            ));
        }
        let rows = dtable.len().checked_div(dim).unwrap_or(0);
        ids_below("embedding_bwd", "ids", ids, n_tok, rows, "dtable rows")?;
        math::embedding_bwd(ids, dout, dtable, n_tok, dim);
        Ok(())
    }

    fn scatter_add_rows(
        &self,
        ids: &Vec<u32>,
        src: &Vec<f32>,
        dst: &mut Vec<f32>,
        n: usize,
        dst_rows: usize,
        dim: usize,
    ) -> Result<()> {
        let op = "scatter_add_rows";
        if dim == 0 {
            return Err(Error::Invalid(format!("{op}: `dim` must be positive")));
        }
        need(op, "ids", ids.len(), n)?;
        need(op, "src", src.len(), n * dim)?;
        need(op, "dst", dst.len(), dst_rows * dim)?;
        ids_below(op, "ids", ids, n, dst_rows, "`dst_rows`")?;
        math::scatter_add_rows(ids, src, dst, n, dim);
        Ok(())
    }

    fn rmsnorm(
        &self,
        x: &Vec<f32>,
        w: &Vec<f32>,
        out: &mut Vec<f32>,
        rstd: &mut Vec<f32>,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<()> {
        need("rmsnorm", "x", x.len(), rows * dim)?;
        need("rmsnorm", "w", w.len(), dim)?;
        need("rmsnorm", "out", out.len(), rows * dim)?;
        need("rmsnorm", "rstd", rstd.len(), rows)?;
        if dim == 0 {
            return Err(Error::Invalid("rmsnorm: `dim` must be positive".into()));
        }
        fast::run(|| fast::rmsnorm(x, w, out, rstd, rows, dim, eps));
        Ok(())
    }

    fn rmsnorm_bwd(
        &self,
        dout: &Vec<f32>,
        x: &Vec<f32>,
        w: &Vec<f32>,
        rstd: &Vec<f32>,
        dx: &mut Vec<f32>,
        dw: Option<&mut Vec<f32>>,
        rows: usize,
        dim: usize,
    ) -> Result<()> {
        let op = "rmsnorm_bwd";
        need(op, "dout", dout.len(), rows * dim)?;
        need(op, "x", x.len(), rows * dim)?;
        need(op, "w", w.len(), dim)?;
        need(op, "rstd", rstd.len(), rows)?;
        need(op, "dx", dx.len(), rows * dim)?;
        if let Some(d) = &dw {
            need(op, "dw", d.len(), dim)?;
        }
        fast::run(|| {
            fast::rmsnorm_bwd(
                dout,
                x,
                w,
                rstd,
                dx,
                dw.map(|d| d.as_mut_slice()),
                rows,
                dim,
            )
        });
        Ok(())
    }

    fn rope(
        &self,
        x: &mut Vec<f32>,
        pos: &Vec<u32>,
        n_tok: usize,
        n_heads: usize,
        head_dim: usize,
        theta: f32,
    ) -> Result<()> {
        check_rope("rope", x.len(), pos.len(), n_tok, n_heads, head_dim, theta)?;
        fast::run(|| fast::rope(x, pos, n_tok, n_heads, head_dim, theta, false));
        Ok(())
    }

    fn rope_bwd(
        &self,
        dx: &mut Vec<f32>,
        pos: &Vec<u32>,
        n_tok: usize,
        n_heads: usize,
        head_dim: usize,
        theta: f32,
    ) -> Result<()> {
        check_rope(
            "rope_bwd",
            dx.len(),
            pos.len(),
            n_tok,
            n_heads,
            head_dim,
            theta,
        )?;
        fast::run(|| fast::rope(dx, pos, n_tok, n_heads, head_dim, theta, true));
        Ok(())
    }

    fn attention(
        &self,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        out: &mut Vec<f32>,
        lse: &mut Vec<f32>,
        cu_seqlens: &Vec<u32>,
        cu_host: &[u32],
        max_len: usize,
        n_heads: usize,
        n_kv: usize,
        head_dim: usize,
    ) -> Result<()> {
        let op = "attention";
        check_heads(op, n_heads, n_kv, head_dim)?;
        let n_tok = check_cu(op, cu_seqlens, cu_host, max_len)?;
        need(op, "q", q.len(), n_tok * n_heads * head_dim)?;
        need(op, "k", k.len(), n_tok * n_kv * head_dim)?;
        need(op, "v", v.len(), n_tok * n_kv * head_dim)?;
        need(op, "out", out.len(), n_tok * n_heads * head_dim)?;
        need(op, "lse", lse.len(), n_tok * n_heads)?;
        fast::run(|| fast::attention(q, k, v, out, lse, cu_host, n_heads, n_kv, head_dim));
        Ok(())
    }

    fn attention_bwd(
        &self,
        dout: &Vec<f32>,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        out: &Vec<f32>,
        lse: &Vec<f32>,
        dq: &mut Vec<f32>,
        dk: &mut Vec<f32>,
        dv: &mut Vec<f32>,
        cu_seqlens: &Vec<u32>,
        cu_host: &[u32],
        max_len: usize,
        n_heads: usize,
        n_kv: usize,
        head_dim: usize,
    ) -> Result<()> {
        let op = "attention_bwd";
        check_heads(op, n_heads, n_kv, head_dim)?;
        let n_tok = check_cu(op, cu_seqlens, cu_host, max_len)?;
        let (qn, kn) = (n_tok * n_heads * head_dim, n_tok * n_kv * head_dim);
        need(op, "dout", dout.len(), qn)?;
        need(op, "q", q.len(), qn)?;
        need(op, "k", k.len(), kn)?;
        need(op, "v", v.len(), kn)?;
        need(op, "out", out.len(), qn)?;
        need(op, "lse", lse.len(), n_tok * n_heads)?;
        need(op, "dq", dq.len(), qn)?;
        need(op, "dk", dk.len(), kn)?;
        need(op, "dv", dv.len(), kn)?;
        fast::run(|| {
            fast::attention_bwd(
                dout, q, k, v, out, lse, dq, dk, dv, cu_host, n_heads, n_kv, head_dim,
            )
        });
        Ok(())
    }

    fn attention_prefixed(
        &self,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        out: &mut Vec<f32>,
        lse: &mut Vec<f32>,
        cu_seqlens: &Vec<u32>,
        cu_host: &[u32],
        prefix: &Vec<u32>,
        prefix_host: &[u32],
        max_len: usize,
        n_heads: usize,
        n_kv: usize,
        head_dim: usize,
    ) -> Result<()> {
        let op = "attention_prefixed";
        check_heads(op, n_heads, n_kv, head_dim)?;
        let n_tok = check_cu(op, cu_seqlens, cu_host, max_len)?;
        check_prefix(op, prefix, prefix_host, cu_host, max_len)?;
        need(op, "q", q.len(), n_tok * n_heads * head_dim)?;
        need(op, "k", k.len(), n_tok * n_kv * head_dim)?;
        need(op, "v", v.len(), n_tok * n_kv * head_dim)?;
        need(op, "out", out.len(), n_tok * n_heads * head_dim)?;
        need(op, "lse", lse.len(), n_tok * n_heads)?;
        fast::run(|| {
            fast::attention_prefixed(
                q,
                k,
                v,
                out,
                lse,
                cu_host,
                prefix_host,
                n_heads,
                n_kv,
                head_dim,
            )
        });
        Ok(())
    }

    fn attention_prefixed_bwd(
        &self,
        dout: &Vec<f32>,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        out: &Vec<f32>,
        lse: &Vec<f32>,
        dq: &mut Vec<f32>,
        dk: &mut Vec<f32>,
        dv: &mut Vec<f32>,
        cu_seqlens: &Vec<u32>,
        cu_host: &[u32],
        prefix: &Vec<u32>,
        prefix_host: &[u32],
        max_len: usize,
        n_heads: usize,
        n_kv: usize,
        head_dim: usize,
    ) -> Result<()> {
        let op = "attention_prefixed_bwd";
        check_heads(op, n_heads, n_kv, head_dim)?;
        let n_tok = check_cu(op, cu_seqlens, cu_host, max_len)?;
        check_prefix(op, prefix, prefix_host, cu_host, max_len)?;
        let (qn, kn) = (n_tok * n_heads * head_dim, n_tok * n_kv * head_dim);
        need(op, "dout", dout.len(), qn)?;
        need(op, "q", q.len(), qn)?;
        need(op, "k", k.len(), kn)?;
        need(op, "v", v.len(), kn)?;
        need(op, "out", out.len(), qn)?;
        need(op, "lse", lse.len(), n_tok * n_heads)?;
        need(op, "dq", dq.len(), qn)?;
        need(op, "dk", dk.len(), kn)?;
        need(op, "dv", dv.len(), kn)?;
        fast::run(|| {
            fast::attention_prefixed_bwd(
                dout,
                q,
                k,
                v,
                out,
                lse,
                dq,
                dk,
                dv,
                cu_host,
                prefix_host,
                n_heads,
                n_kv,
                head_dim,
            )
        });
        Ok(())
    }

    fn kv_store(
        &self,
        k: &Vec<f32>,
        v: &Vec<f32>,
        dst: &Vec<u32>,
        k_cache: &mut Vec<f32>,
        v_cache: &mut Vec<f32>,
        n_tok: usize,
        kv_dim: usize,
    ) -> Result<()> {
        let op = "kv_store";
        need(op, "k", k.len(), n_tok * kv_dim)?;
        need(op, "v", v.len(), n_tok * kv_dim)?;
        need(op, "dst", dst.len(), n_tok)?;
        if kv_dim == 0 {
            return Err(Error::Invalid(format!("{op}: `kv_dim` must be positive")));
        }
        if k_cache.len() != v_cache.len() {
            return Err(Error::Invalid(format!(
                "{op}: `k_cache` holds {} elements but `v_cache` {}",
                k_cache.len(),
                v_cache.len()
            )));
        }
        ids_below(op, "dst", dst, n_tok, k_cache.len() / kv_dim, "cache rows")?;
        math::kv_store(k, v, dst, k_cache, v_cache, n_tok, kv_dim);
        Ok(())
    }

    fn attention_decode(
        &self,
        q: &Vec<f32>,
        k_cache: &Vec<f32>,
        v_cache: &Vec<f32>,
        lens: &Vec<u32>,
        out: &mut Vec<f32>,
        n_seq: usize,
        max_len: usize,
        n_heads: usize,
        n_kv: usize,
        head_dim: usize,
    ) -> Result<()> {
        let op = "attention_decode";
        check_heads(op, n_heads, n_kv, head_dim)?;
        need(op, "q", q.len(), n_seq * n_heads * head_dim)?;
        need(op, "out", out.len(), n_seq * n_heads * head_dim)?;
        need(op, "lens", lens.len(), n_seq)?;
        need(
            op,
            "k_cache",
            k_cache.len(),
            n_seq * max_len * n_kv * head_dim,
        )?;
        need(
            op,
            "v_cache",
            v_cache.len(),
            n_seq * max_len * n_kv * head_dim,
        )?;
        for (b, &l) in lens[..n_seq].iter().enumerate() {
            if l == 0 || l as usize > max_len {
                return Err(Error::Invalid(format!(
                    "{op}: `lens[{b}]` = {l} must be in 1..={max_len} (`max_len`)"
                )));
            }
        }
        fast::run(|| {
            fast::attention_decode(
                q, k_cache, v_cache, lens, out, n_seq, max_len, n_heads, n_kv, head_dim,
            )
        });
        Ok(())
    }

    fn swiglu(&self, gate: &Vec<f32>, up: &Vec<f32>, out: &mut Vec<f32>, n: usize) -> Result<()> {
        need("swiglu", "gate", gate.len(), n)?;
        need("swiglu", "up", up.len(), n)?;
        need("swiglu", "out", out.len(), n)?;
        fast::run(|| fast::swiglu(gate, up, out, n));
        Ok(())
    }

    fn swiglu_bwd(
        &self,
        dout: &Vec<f32>,
        gate: &Vec<f32>,
        up: &Vec<f32>,
        dgate: &mut Vec<f32>,
        dup: &mut Vec<f32>,
        n: usize,
    ) -> Result<()> {
        let op = "swiglu_bwd";
        need(op, "dout", dout.len(), n)?;
        need(op, "gate", gate.len(), n)?;
        need(op, "up", up.len(), n)?;
        need(op, "dgate", dgate.len(), n)?;
        need(op, "dup", dup.len(), n)?;
        fast::run(|| fast::swiglu_bwd(dout, gate, up, dgate, dup, n));
        Ok(())
    }

    fn logprobs(
        &self,
        h: &Vec<f32>,
        w: &Vec<f32>,
        targets: &Vec<u32>,
        logp: &mut Vec<f32>,
        lse: &mut Vec<f32>,
        entropy: Option<&mut Vec<f32>>,
        n_tok: usize,
        dim: usize,
        vocab: usize,
        inv_t: f32,
    ) -> Result<()> {
        let op = "logprobs";
        check_inv_t(op, inv_t)?;
        need(op, "h", h.len(), n_tok * dim)?;
        need(op, "w", w.len(), vocab * dim)?;
        need(op, "targets", targets.len(), n_tok)?;
        need(op, "logp", logp.len(), n_tok)?;
        need(op, "lse", lse.len(), n_tok)?;
        if let Some(e) = &entropy {
            need(op, "entropy", e.len(), n_tok)?;
        }
        if vocab == 0 || dim == 0 {
            return Err(Error::Invalid(format!(
                "{op}: `vocab` and `dim` must be positive"
            )));
        }
        ids_below(op, "targets", targets, n_tok, vocab, "vocab")?;
        fast::run(|| {
            fast::logprobs(
                h,
                w,
                targets,
                logp,
                lse,
                entropy.map(|e| e.as_mut_slice()),
                n_tok,
                dim,
                vocab,
                inv_t,
            )
        });
        Ok(())
    }

    fn logprobs_bwd(
        &self,
        dlogp: &Vec<f32>,
        h: &Vec<f32>,
        w: &Vec<f32>,
        targets: &Vec<u32>,
        lse: &Vec<f32>,
        dh: &mut Vec<f32>,
        dw: Option<&mut Vec<f32>>,
        n_tok: usize,
        dim: usize,
        vocab: usize,
        inv_t: f32,
    ) -> Result<()> {
        let op = "logprobs_bwd";
        check_inv_t(op, inv_t)?;
        need(op, "dlogp", dlogp.len(), n_tok)?;
        need(op, "h", h.len(), n_tok * dim)?;
        need(op, "w", w.len(), vocab * dim)?;
        need(op, "targets", targets.len(), n_tok)?;
        need(op, "lse", lse.len(), n_tok)?;
        need(op, "dh", dh.len(), n_tok * dim)?;
        if let Some(d) = &dw {
            need(op, "dw", d.len(), vocab * dim)?;
        }
        if vocab == 0 || dim == 0 {
            return Err(Error::Invalid(format!(
                "{op}: `vocab` and `dim` must be positive"
            )));
        }
        ids_below(op, "targets", targets, n_tok, vocab, "vocab")?;
        fast::run(|| {
            fast::logprobs_bwd(
                dlogp,
                h,
                w,
                targets,
                lse,
                dh,
                dw.map(|d| d.as_mut_slice()),
                n_tok,
                dim,
                vocab,
                inv_t,
            )
        });
        Ok(())
    }

    fn logits(
        &self,
        h: &Vec<f32>,
        w: &Vec<f32>,
        out: &mut Vec<f32>,
        rows: usize,
        dim: usize,
        vocab: usize,
    ) -> Result<()> {
        need("logits", "h", h.len(), rows * dim)?;
        need("logits", "w", w.len(), vocab * dim)?;
        need("logits", "out", out.len(), rows * vocab)?;
        fast::run(|| fast::matmul_nt(h, w, out, rows, vocab, dim, 0.0));
        Ok(())
    }

    fn sample(
        &self,
        logits: &Vec<f32>,
        out: &mut Vec<u32>,
        rows: usize,
        vocab: usize,
        temperature: f32,
        top_p: f32,
        top_k: usize,
        seed: u64,
        offset: u64,
    ) -> Result<()> {
        let op = "sample";
        need(op, "logits", logits.len(), rows * vocab)?;
        need(op, "out", out.len(), rows)?;
        if vocab == 0 {
            return Err(Error::Invalid(format!("{op}: `vocab` must be positive")));
        }
        if !(temperature.is_finite() && temperature >= 0.0) {
            return Err(Error::Invalid(format!(
                "{op}: `temperature` = {temperature}, expected a finite value >= 0"
            )));
        }
        if !(0.0..=1.0).contains(&top_p) {
            return Err(Error::Invalid(format!(
                "{op}: `top_p` = {top_p}, expected 0..=1"
            )));
        }
        for r in 0..rows {
            let row = &logits[r * vocab..(r + 1) * vocab];
            if let Some(i) = row.iter().position(|z| z.is_nan() || *z == f32::INFINITY) {
                return Err(Error::Invalid(format!(
                    "{op}: `logits[{r}, {i}]` = {}, expected a finite value or -inf",
                    row[i]
                )));
            }
            if temperature > 0.0 && row.iter().all(|z| *z == f32::NEG_INFINITY) {
                return Err(Error::Invalid(format!(
                    "{op}: row {r} of `logits` is all -inf"
                )));
            }
            let u = math::sample_uniform(seed, offset.wrapping_add(r as u64));
            out[r] = math::sample_row(row, temperature, top_p, top_k, u);
        }
        Ok(())
    }

    fn grpo_loss(
        &self,
        logp: &Vec<f32>,
        old_logp: &Vec<f32>,
        ref_logp: &Vec<f32>,
        adv: &Vec<f32>,
        mask: &Vec<f32>,
        seq_id: &Vec<u32>,
        dlogp: &mut Vec<f32>,
        n_tok: usize,
        n_seq: usize,
        cfg: &GrpoLossCfg,
    ) -> Result<GrpoLossOut> {
        let op = "grpo_loss";
        for (name, buf) in [
            ("logp", logp),
            ("old_logp", old_logp),
            ("ref_logp", ref_logp),
            ("adv", adv),
            ("mask", mask),
        ] {
            need(op, name, buf.len(), n_tok)?;
        }
        need(op, "seq_id", seq_id.len(), n_tok)?;
        need(op, "dlogp", dlogp.len(), n_tok)?;
        ids_below(op, "seq_id", seq_id, n_tok, n_seq, "n_seq")?;
        if !(cfg.loss_scale_div.is_finite() && cfg.loss_scale_div > 0.0) {
            return Err(Error::Invalid(format!(
                "{op}: `loss_scale_div` = {}, expected > 0",
                cfg.loss_scale_div
            )));
        }
        if cfg.agg == crate::backend::LossAgg::SeqMeanTokenSumNorm
            && !(cfg.norm_len.is_finite() && cfg.norm_len > 0.0)
        {
            return Err(Error::Invalid(format!(
                "{op}: `norm_len` = {}, expected > 0 for seq-mean-token-sum-norm",
                cfg.norm_len
            )));
        }
        if let Some(t) = mask[..n_tok]
            .iter()
            .position(|m| !(m.is_finite() && *m >= 0.0))
        {
            return Err(Error::Invalid(format!(
                "{op}: `mask[{t}]` = {}, expected a finite weight >= 0",
                mask[t]
            )));
        }
        let s = math::grpo_loss(
            logp, old_logp, ref_logp, adv, mask, seq_id, dlogp, n_tok, n_seq, cfg,
        );
        Ok(GrpoLossOut {
            loss: s.loss,
            pg_loss: s.pg_loss,
            kl: s.kl,
            clip_frac: s.clip_frac,
            ratio_mean: s.ratio_mean,
            n_tokens: s.n_tokens,
        })
    }

    fn adamw(
        &self,
        param: &mut Vec<f32>,
        master: Option<&mut Vec<f32>>,
        grad: &Vec<f32>,
        m: &mut Vec<f32>,
        v: &mut Vec<f32>,
        n: usize,
        hp: &AdamWStep,
    ) -> Result<()> {
        let op = "adamw";
        need(op, "param", param.len(), n)?;
        need(op, "grad", grad.len(), n)?;
        need(op, "m", m.len(), n)?;
        need(op, "v", v.len(), n)?;
        if hp.step == 0 {
            return Err(Error::Invalid(format!("{op}: `step` is 1-based, got 0")));
        }
        let h = math::AdamW {
            lr: hp.lr,
            beta1: hp.beta1,
            beta2: hp.beta2,
            eps: hp.eps,
            weight_decay: hp.weight_decay,
            step: hp.step,
            grad_scale: hp.grad_scale,
        };
        match master {
            None => fast::run(|| fast::adamw(param, grad, m, v, n, &h)),
            Some(master) => {
                // Not needed where T is f32, but honoured: update the master, copy it back.
                need(op, "master", master.len(), n)?;
                fast::run(|| fast::adamw(master, grad, m, v, n, &h));
                param[..n].copy_from_slice(&master[..n]);
            }
        }
        Ok(())
    }

    fn needs_master(&self) -> bool {
        false
    }
}
