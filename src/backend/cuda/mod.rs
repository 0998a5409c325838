//! The CUDA backend: bf16 storage, f32 accumulation, cuBLAS GEMMs (bf16 inputs, f32 compute)
//! and the hand-written kernels of `kernels/` for everything else.
//!
//! - `T` = bf16 device buffer, `F` = f32, `I` = u32 (all [`CudaBuf`], from a caching pool).
//! - Parameter gradients are f32 and accumulated: `linear_bwd`'s dW is a GemmEx with bf16 A/B,
//!   f32 C and beta = 1.
//! - AdamW keeps an f32 master copy of the bf16 parameters (`needs_master() == true`).
//! - The vocabulary projection is streamed in token x vocabulary chunks ([`Cuda::set_logprob_chunks`]).
//! - Sampling reproduces the CPU backend's counter-based random stream.

mod runtime;
mod selftest;

pub use runtime::{
    device_memory, nvrtc_check, Bf16, CudaBuf, Elem, PoolStats, Timer, KERNEL_KIND, PTXAS_REPORT,
};
pub use selftest::TensorCoreCheck;

use runtime::{Args, Gpu};

use super::{AdamWStep, Backend, DType, GrpoLossCfg, GrpoLossOut, KlKind, LossAgg};
use crate::{ensure, Error, Result};

const EW_THREADS: u32 = 256;

fn ew_grid(n: usize) -> (u32, u32, u32) {
    (
        n.div_ceil(EW_THREADS as usize).clamp(1, 65535 * 8) as u32,
        1,
        1,
    )
}

fn blk(n: u32) -> (u32, u32, u32) {
    (n, 1, 1)
}

fn need<E: Elem>(b: &CudaBuf<E>, n: usize, what: &str) -> Result<()> {
    ensure!(
        b.len() >= n,
        "{what}: buffer holds {} elements, the op needs {n}",
        b.len()
    );
    Ok(())
}

fn i32_of(x: usize, what: &str) -> Result<i32> {
    i32::try_from(x).map_err(|_| Error::Invalid(format!("{what} = {x} does not fit in i32")))
}

/// The CUDA backend on one device. Clones share the device context, stream and allocator.
#[derive(Clone)]
pub struct Cuda {
    gpu: std::sync::Arc<Gpu>,
    tok_chunk: usize,
    vocab_chunk: usize,
    /// RoPE inverse-frequency tables by (theta bits, head_dim), uploaded once.
    rope_tables: RopeTables,
}

type RopeTables =
    std::sync::Arc<std::sync::Mutex<std::collections::HashMap<(u32, usize), CudaBuf<f32>>>>;

impl std::fmt::Debug for Cuda {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Cuda({}, sm_{}{})",
            self.gpu.name, self.gpu.cc.0, self.gpu.cc.1
        )
    }
}

impl Cuda {
    /// Opens device 0. `Err(Error::NoCuda)` on a machine without a usable CUDA device.
    pub fn new() -> Result<Cuda> {
        Self::with_device(0)
    }

    pub fn with_device(ordinal: usize) -> Result<Cuda> {
        let gpu = std::sync::Arc::new(Gpu::open(ordinal)?);
        Ok(Cuda {
            gpu,
            tok_chunk: 1024,
            vocab_chunk: 32768,
            rope_tables: Default::default(),
        })
    }

    /// Whether every kernel is followed by a synchronisation and the device-side argument
    /// checks (debug builds, or TOOLN1_CUDA_SYNC=1).
    pub fn syncs_each_op(&self) -> bool {
        self.gpu.sync_each
    }

    /// Token and vocabulary chunk sizes of the fused logprobs (workspace = tok x vocab f32 +
    /// tok x vocab bf16 + tok x dim f32).
    pub fn set_logprob_chunks(&mut self, tok: usize, vocab: usize) {
        self.tok_chunk = tok.max(1);
        self.vocab_chunk = vocab.max(1);
    }

    /// Device name and compute capability.
    pub fn device(&self) -> String {
        format!("{} (sm_{}{})", self.gpu.name, self.gpu.cc.0, self.gpu.cc.1)
    }

    /// Counters of the caching allocator.
    pub fn pool_stats(&self) -> PoolStats {
        self.gpu.pool.stats()
    }

    /// Whether the allocator hands out exact-size, uncached buffers (`TOOLN1_CUDA_POOL=exact`,
    /// for memory checkers) instead of cached size classes.
    pub fn pool_is_exact(&self) -> bool {
        self.gpu.pool.is_exact()
    }

    /// CUDA events for timing work queued on this backend.
    pub fn timer(&self) -> Result<Timer> {
        self.gpu.timer()
    }

    /// Releases cached device memory back to the driver.
    pub fn trim(&self) -> Result<()> {
        self.gpu.sync()?;
        self.gpu.pool.trim()
    }

    fn bf16_fill(&self, data: &[f32]) -> Result<CudaBuf<Bf16>> {
        let h: Vec<u16> = data
            .iter()
            .map(|&x| half::bf16::from_f32(x).to_bits())
            .collect();
        self.gpu.htod::<Bf16, u16>(&h)
    }

    #[allow(clippy::too_many_arguments)]
    fn gemm_rm_xwt(
        &self,
        x: u64,
        w: u64,
        y: u64,
        m: usize,
        n: usize,
        k: usize,
        beta: f32,
        y_f32: bool,
        ldy: usize,
    ) -> Result<()> {
        // Row-major y[m,n] = x[m,k] w[n,k]^T  <=>  column-major y^T[n,m] = w^T x^T.
        self.gpu
            .gemm(true, false, n, m, k, w, k, x, k, beta, y, ldy, y_f32)
    }
}

fn kl_code(k: KlKind) -> i32 {
    match k {
        KlKind::K1 => 0,
        KlKind::Abs => 1,
        KlKind::K2 => 2,
        KlKind::K3 => 3,
    }
}

impl Backend for Cuda {
    type T = CudaBuf<Bf16>;
    type F = CudaBuf<f32>;
    type I = CudaBuf<u32>;

    fn name(&self) -> String {
        format!("cuda:{}", self.device())
    }

    fn zeros(&self, n: usize) -> Result<Self::T> {
        self.gpu.alloc_zeros::<Bf16>(n)
    }
    fn zeros_f32(&self, n: usize) -> Result<Self::F> {
        self.gpu.alloc_zeros::<f32>(n)
    }
    fn upload(&self, data: &[f32]) -> Result<Self::T> {
        self.bf16_fill(data)
    }
    fn upload_f32(&self, data: &[f32]) -> Result<Self::F> {
        self.gpu.htod::<f32, f32>(data)
    }
    fn upload_u32(&self, data: &[u32]) -> Result<Self::I> {
        self.gpu.htod::<u32, u32>(data)
    }
    fn upload_raw(&self, dtype: DType, bytes: &[u8], n: usize) -> Result<Self::T> {
        ensure!(
            bytes.len() == n * dtype.size(),
            "upload_raw: {} bytes given for {n} elements of {dtype:?} ({} expected)",
            bytes.len(),
            n * dtype.size()
        );
        let h: Vec<u16> = match dtype {
            DType::BF16 => bytes
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect(),
            DType::F16 => bytes
                .chunks_exact(2)
                .map(|c| {
                    half::bf16::from_f32(
                        half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32(),
                    )
                    .to_bits()
                })
                .collect(),
            DType::F32 => bytes
                .chunks_exact(4)
                .map(|c| {
                    half::bf16::from_f32(f32::from_le_bytes([c[0], c[1], c[2], c[3]])).to_bits()
                })
                .collect(),
        };
        self.gpu.htod::<Bf16, u16>(&h)
    }
    fn download(&self, t: &Self::T, n: usize) -> Result<Vec<f32>> {
        need(t, n, "download")?;
        let h: Vec<u16> = self.gpu.dtoh(t.ptr(), n)?;
        Ok(h.into_iter()
            .map(|b| half::bf16::from_bits(b).to_f32())
            .collect())
    }
    fn download_f32(&self, t: &Self::F, n: usize) -> Result<Vec<f32>> {
        need(t, n, "download_f32")?;
        self.gpu.dtoh(t.ptr(), n)
    }
    fn download_u32(&self, t: &Self::I, n: usize) -> Result<Vec<u32>> {
        need(t, n, "download_u32")?;
        self.gpu.dtoh(t.ptr(), n)
    }
    fn copy(&self, src: &Self::T, dst: &mut Self::T, n: usize) -> Result<()> {
        need(src, n, "copy src")?;
        need(dst, n, "copy dst")?;
        self.gpu.bind()?;
        self.gpu.dtod(src.ptr(), dst.ptr(), n * 2)
    }
    fn copy_f32(&self, src: &Self::F, dst: &mut Self::F, n: usize) -> Result<()> {
        need(src, n, "copy_f32 src")?;
        need(dst, n, "copy_f32 dst")?;
        self.gpu.bind()?;
        self.gpu.dtod(src.ptr(), dst.ptr(), n * 4)
    }
    fn fill_f32(&self, t: &mut Self::F, n: usize, value: f32) -> Result<()> {
        need(t, n, "fill_f32")?;
        self.gpu.launch(
            "util",
            "fill_f32",
            ew_grid(n),
            blk(EW_THREADS),
            0,
            Args::new().p(t.ptr()).l(n as i64).f(value),
        )
    }
    fn synchronize(&self) -> Result<()> {
        self.gpu.bind()?;
        self.gpu.sync()
    }

    fn add_inplace(&self, a: &mut Self::T, b: &Self::T, n: usize) -> Result<()> {
        need(a, n, "add_inplace a")?;
        need(b, n, "add_inplace b")?;
        self.gpu.launch(
            "util",
            "add_bf16",
            ew_grid(n),
            blk(EW_THREADS),
            0,
            Args::new().p(a.ptr()).p(b.ptr()).l(n as i64),
        )
    }
    fn sum_squares_f32(&self, t: &Self::F, n: usize) -> Result<f64> {
        need(t, n, "sum_squares_f32")?;
        if n == 0 {
            return Ok(0.0);
        }
        let g = n.div_ceil(256).clamp(1, 1024);
        let part = self.gpu.alloc::<f64>(g)?;
        self.gpu.launch(
            "adamw",
            "sumsq_partial",
            (g as u32, 1, 1),
            blk(256),
            0,
            Args::new().p(t.ptr()).l(n as i64).p(part.ptr()),
        )?;
        let v: Vec<f64> = self.gpu.dtoh(part.ptr(), g)?;
        Ok(v.iter().sum())
    }

    fn linear(
        &self,
        x: &Self::T,
        w: &Self::T,
        bias: Option<&Self::T>,
        y: &mut Self::T,
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<()> {
        need(x, m * k, "linear x")?;
        need(w, n * k, "linear w")?;
        need(y, m * n, "linear y")?;
        let beta = if let Some(b) = bias {
            need(b, n, "linear bias")?;
            self.gpu.launch(
                "util",
                "bias_rows",
                ew_grid(m * n),
                blk(EW_THREADS),
                0,
                Args::new()
                    .p(b.ptr())
                    .p(y.ptr())
                    .i(i32_of(m, "m")?)
                    .i(i32_of(n, "n")?),
            )?;
            1.0
        } else {
            0.0
        };
        self.gemm_rm_xwt(x.ptr(), w.ptr(), y.ptr(), m, n, k, beta, false, n)
    }

    fn linear_bwd(
        &self,
        dy: &Self::T,
        x: &Self::T,
        w: &Self::T,
        dx: Option<&mut Self::T>,
        accumulate_dx: bool,
        dw: Option<&mut Self::F>,
        dbias: Option<&mut Self::F>,
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<()> {
        need(dy, m * n, "linear_bwd dy")?;
        need(x, m * k, "linear_bwd x")?;
        need(w, n * k, "linear_bwd w")?;
        if let Some(dx) = dx {
            need(dx, m * k, "linear_bwd dx")?;
            // column-major dx^T[k,m] = w^T[k,n] dy^T[n,m]
            let beta = if accumulate_dx { 1.0 } else { 0.0 };
            self.gpu.gemm(
                false,
                false,
                k,
                m,
                n,
                w.ptr(),
                k,
                dy.ptr(),
                n,
                beta,
                dx.ptr(),
                k,
                false,
            )?;
        }
        if let Some(dw) = dw {
            need(dw, n * k, "linear_bwd dw")?;
            // column-major dw^T[k,n] += x^T[k,m] dy[m,n]
            self.gpu.gemm(
                false,
                true,
                k,
                n,
                m,
                x.ptr(),
                k,
                dy.ptr(),
                n,
                1.0,
                dw.ptr(),
                k,
                true,
            )?;
        }
        if let Some(db) = dbias {
            need(db, n, "linear_bwd dbias")?;
            self.gpu.launch(
                "util",
                "colsum_accum",
                (n.div_ceil(256) as u32, m.div_ceil(64).max(1) as u32, 1),
                blk(256),
                0,
                Args::new()
                    .p(dy.ptr())
                    .p(db.ptr())
                    .i(i32_of(m, "m")?)
                    .i(i32_of(n, "n")?),
            )?;
        }
        Ok(())
    }

    fn embedding(
        &self,
        ids: &Self::I,
        table: &Self::T,
        out: &mut Self::T,
        n_tok: usize,
        dim: usize,
    ) -> Result<()> {
        need(ids, n_tok, "embedding ids")?;
        need(out, n_tok * dim, "embedding out")?;
        ensure!(dim > 0, "embedding: dim must be > 0");
        let vocab = (table.len() / dim) as u32;
        self.gpu.launch(
            "embedding",
            "embedding_fwd",
            (n_tok as u32, 1, 1),
            blk(256),
            0,
            Args::new()
                .p(ids.ptr())
                .p(table.ptr())
                .p(out.ptr())
                .i(i32_of(n_tok, "n_tok")?)
                .i(i32_of(dim, "dim")?)
                .u(vocab)
                .p(self.gpu.err_flag.ptr()),
        )
    }
    fn embedding_bwd(
        &self,
        ids: &Self::I,
        dout: &Self::T,
        dtable: &mut Self::F,
        n_tok: usize,
        dim: usize,
    ) -> Result<()> {
        need(ids, n_tok, "embedding_bwd ids")?;
        need(dout, n_tok * dim, "embedding_bwd dout")?;
        ensure!(dim > 0, "embedding_bwd: dim must be > 0");
        let vocab = (dtable.len() / dim) as u32;
        self.gpu.launch(
            "embedding",
            "embedding_bwd",
            (n_tok as u32, 1, 1),
            blk(256),
            0,
            Args::new()
                .p(ids.ptr())
                .p(dout.ptr())
                .p(dtable.ptr())
                .i(i32_of(n_tok, "n_tok")?)
                .i(i32_of(dim, "dim")?)
                .u(vocab)
                .p(self.gpu.err_flag.ptr()),
        )
    }

    fn scatter_add_rows(
        &self,
        ids: &Self::I,
        src: &Self::T,
        dst: &mut Self::T,
        n: usize,
        dst_rows: usize,
        dim: usize,
    ) -> Result<()> {
        ensure!(dim > 0, "scatter_add_rows: dim must be > 0");
        need(ids, n, "scatter_add_rows ids")?;
        need(src, n * dim, "scatter_add_rows src")?;
        need(dst, dst_rows * dim, "scatter_add_rows dst")?;
        if n == 0 {
            return Ok(());
        }
        self.gpu.launch(
            "embedding",
            "scatter_add_rows",
            (dim.div_ceil(256) as u32, 1, 1),
            blk(256),
            0,
            Args::new()
                .p(ids.ptr())
                .p(src.ptr())
                .p(dst.ptr())
                .i(i32_of(n, "n")?)
                .i(i32_of(dim, "dim")?)
                .u(u32::try_from(dst_rows).map_err(|_| {
                    Error::Invalid(format!(
                        "scatter_add_rows: dst_rows = {dst_rows} exceeds u32"
                    ))
                })?)
                .p(self.gpu.err_flag.ptr()),
        )
    }

    fn rmsnorm(
        &self,
        x: &Self::T,
        w: &Self::T,
        out: &mut Self::T,
        rstd: &mut Self::F,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<()> {
        need(x, rows * dim, "rmsnorm x")?;
        need(w, dim, "rmsnorm w")?;
        need(out, rows * dim, "rmsnorm out")?;
        need(rstd, rows, "rmsnorm rstd")?;
        ensure!(dim > 0, "rmsnorm: dim must be > 0");
        self.gpu.launch(
            "rmsnorm",
            "rmsnorm_fwd",
            (rows as u32, 1, 1),
            blk(256),
            0,
            Args::new()
                .p(x.ptr())
                .p(w.ptr())
                .p(out.ptr())
                .p(rstd.ptr())
                .i(i32_of(rows, "rows")?)
                .i(i32_of(dim, "dim")?)
                .f(eps),
        )
    }
    fn rmsnorm_bwd(
        &self,
        dout: &Self::T,
        x: &Self::T,
        w: &Self::T,
        rstd: &Self::F,
        dx: &mut Self::T,
        dw: Option<&mut Self::F>,
        rows: usize,
        dim: usize,
    ) -> Result<()> {
        need(dout, rows * dim, "rmsnorm_bwd dout")?;
        need(x, rows * dim, "rmsnorm_bwd x")?;
        need(w, dim, "rmsnorm_bwd w")?;
        need(rstd, rows, "rmsnorm_bwd rstd")?;
        need(dx, rows * dim, "rmsnorm_bwd dx")?;
        let (r, d) = (i32_of(rows, "rows")?, i32_of(dim, "dim")?);
        if let Some(dw) = dw {
            need(dw, dim, "rmsnorm_bwd dw")?;
            self.gpu.launch(
                "rmsnorm",
                "rmsnorm_bwd_dw",
                (dim.div_ceil(256) as u32, rows.div_ceil(64).max(1) as u32, 1),
                blk(256),
                0,
                Args::new()
                    .p(dout.ptr())
                    .p(x.ptr())
                    .p(rstd.ptr())
                    .p(dw.ptr())
                    .i(r)
                    .i(d),
            )?;
        }
        self.gpu.launch(
            "rmsnorm",
            "rmsnorm_bwd_dx",
            (rows as u32, 1, 1),
            blk(256),
            0,
            Args::new()
                .p(dout.ptr())
                .p(x.ptr())
                .p(w.ptr())
                .p(rstd.ptr())
                .p(dx.ptr())
                .i(r)
                .i(d),
        )
    }

    fn rope(
        &self,
        x: &mut Self::T,
        pos: &Self::I,
        n_tok: usize,
        n_heads: usize,
        head_dim: usize,
        theta: f32,
    ) -> Result<()> {
        self.rope_impl("rope_fwd", x, pos, n_tok, n_heads, head_dim, theta)
    }
    fn rope_bwd(
        &self,
        dx: &mut Self::T,
        pos: &Self::I,
        n_tok: usize,
        n_heads: usize,
        head_dim: usize,
        theta: f32,
    ) -> Result<()> {
        self.rope_impl("rope_bwd", dx, pos, n_tok, n_heads, head_dim, theta)
    }

    fn attention(
        &self,
        q: &Self::T,
        k: &Self::T,
        v: &Self::T,
        out: &mut Self::T,
        lse: &mut Self::F,
        cu_seqlens: &Self::I,
        cu_host: &[u32],
        max_len: usize,
        n_heads: usize,
        n_kv: usize,
        head_dim: usize,
    ) -> Result<()> {
        self.attn_fwd(
            q, k, v, out, lse, cu_seqlens, cu_host, 0, max_len, n_heads, n_kv, head_dim,
        )
    }

    fn attention_bwd(
        &self,
        dout: &Self::T,
        q: &Self::T,
        k: &Self::T,
        v: &Self::T,
        out: &Self::T,
        lse: &Self::F,
        dq: &mut Self::T,
        dk: &mut Self::T,
        dv: &mut Self::T,
        cu_seqlens: &Self::I,
        cu_host: &[u32],
        max_len: usize,
        n_heads: usize,
        n_kv: usize,
        head_dim: usize,
    ) -> Result<()> {
        self.attn_bwd(
            dout, q, k, v, out, lse, dq, dk, dv, cu_seqlens, cu_host, None, max_len, n_heads, n_kv,
            head_dim,
        )
    }

    fn attention_prefixed(
        &self,
        q: &Self::T,
        k: &Self::T,
        v: &Self::T,
        out: &mut Self::T,
        lse: &mut Self::F,
        cu_seqlens: &Self::I,
        cu_host: &[u32],
        prefix: &Self::I,
        prefix_host: &[u32],
        max_len: usize,
        n_heads: usize,
        n_kv: usize,
        head_dim: usize,
    ) -> Result<()> {
        super::check_prefix_table("attention_prefixed", prefix_host, cu_host, max_len)?;
        need(prefix, prefix_host.len(), "attention_prefixed prefix")?;
        self.attn_fwd(
            q,
            k,
            v,
            out,
            lse,
            cu_seqlens,
            cu_host,
            prefix.ptr(),
            max_len,
            n_heads,
            n_kv,
            head_dim,
        )
    }

    fn attention_prefixed_bwd(
        &self,
        dout: &Self::T,
        q: &Self::T,
        k: &Self::T,
        v: &Self::T,
        out: &Self::T,
        lse: &Self::F,
        dq: &mut Self::T,
        dk: &mut Self::T,
        dv: &mut Self::T,
        cu_seqlens: &Self::I,
        cu_host: &[u32],
        prefix: &Self::I,
        prefix_host: &[u32],
        max_len: usize,
        n_heads: usize,
        n_kv: usize,
        head_dim: usize,
    ) -> Result<()> {
        super::check_prefix_table("attention_prefixed_bwd", prefix_host, cu_host, max_len)?;
        need(prefix, prefix_host.len(), "attention_prefixed_bwd prefix")?;
        self.attn_bwd(
            dout,
            q,
            k,
            v,
            out,
            lse,
            dq,
            dk,
            dv,
            cu_seqlens,
            cu_host,
            Some((prefix, prefix_host)),
            max_len,
            n_heads,
            n_kv,
            head_dim,
        )
    }

    fn kv_store(
        &self,
        k: &Self::T,
        v: &Self::T,
        dst: &Self::I,
        k_cache: &mut Self::T,
        v_cache: &mut Self::T,
        n_tok: usize,
        kv_dim: usize,
    ) -> Result<()> {
        need(k, n_tok * kv_dim, "kv_store k")?;
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
        self.gpu.launch(
            "attention",
            "kv_store",
            (n_tok as u32, 1, 1),
            blk(256),
            0,
            Args::new()
                .p(k.ptr())
                .p(v.ptr())
                .p(dst.ptr())
                .p(k_cache.ptr())
                .p(v_cache.ptr())
                .i(n_tok as i32)
                .i(kv_dim as i32)
                .u(rows)
                .p(self.gpu.err_flag.ptr()),
        )
    }

    fn attention_decode(
        &self,
        q: &Self::T,
        k_cache: &Self::T,
        v_cache: &Self::T,
        lens: &Self::I,
        out: &mut Self::T,
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
        self.gpu.launch(
            "attention",
            &format!("attn_decode_d{head_dim}"),
            (n_heads as u32, n_seq as u32, 1),
            blk(128),
            0,
            Args::new()
                .p(q.ptr())
                .p(k_cache.ptr())
                .p(v_cache.ptr())
                .p(lens.ptr())
                .p(out.ptr())
                .i(i32_of(max_len, "max_len")?)
                .i(n_heads as i32)
                .i(n_kv as i32)
                .p(self.gpu.err_flag.ptr()),
        )
    }

    fn swiglu(&self, gate: &Self::T, up: &Self::T, out: &mut Self::T, n: usize) -> Result<()> {
        need(gate, n, "swiglu gate")?;
        need(up, n, "swiglu up")?;
        need(out, n, "swiglu out")?;
        self.gpu.launch(
            "swiglu",
            "swiglu_fwd",
            ew_grid(n),
            blk(EW_THREADS),
            0,
            Args::new()
                .p(gate.ptr())
                .p(up.ptr())
                .p(out.ptr())
                .l(n as i64),
        )
    }
    fn swiglu_bwd(
        &self,
        dout: &Self::T,
        gate: &Self::T,
        up: &Self::T,
        dgate: &mut Self::T,
        dup: &mut Self::T,
        n: usize,
    ) -> Result<()> {
        need(dout, n, "swiglu_bwd dout")?;
        need(gate, n, "swiglu_bwd gate")?;
        need(up, n, "swiglu_bwd up")?;
        need(dgate, n, "swiglu_bwd dgate")?;
        need(dup, n, "swiglu_bwd dup")?;
        self.gpu.launch(
            "swiglu",
            "swiglu_bwd",
            ew_grid(n),
            blk(EW_THREADS),
            0,
            Args::new()
                .p(dout.ptr())
                .p(gate.ptr())
                .p(up.ptr())
                .p(dgate.ptr())
                .p(dup.ptr())
                .l(n as i64),
        )
    }

    fn logprobs(
        &self,
        h: &Self::T,
        w: &Self::T,
        targets: &Self::I,
        logp: &mut Self::F,
        lse: &mut Self::F,
        entropy: Option<&mut Self::F>,
        n_tok: usize,
        dim: usize,
        vocab: usize,
        inv_t: f32,
    ) -> Result<()> {
        ensure!(
            inv_t.is_finite() && inv_t > 0.0,
            "logprobs: inv_t = {inv_t}, expected a finite value > 0"
        );
        need(h, n_tok * dim, "logprobs h")?;
        need(w, vocab * dim, "logprobs w")?;
        need(targets, n_tok, "logprobs targets")?;
        need(logp, n_tok, "logprobs logp")?;
        need(lse, n_tok, "logprobs lse")?;
        ensure!(vocab > 0 && dim > 0, "logprobs: vocab and dim must be > 0");
        if let Some(e) = &entropy {
            need(e, n_tok, "logprobs entropy")?;
        }
        if n_tok == 0 {
            return Ok(());
        }
        let tc = self.tok_chunk.min(n_tok);
        let vc = self.vocab_chunk.min(vocab);
        let tile = self.gpu.alloc::<f32>(tc * vc)?;
        let m = self.gpu.alloc::<f32>(n_tok)?;
        let s = self.gpu.alloc::<f32>(n_tok)?;
        let wsum = self.gpu.alloc::<f32>(n_tok)?;
        let mut tgt = self.gpu.alloc::<f32>(n_tok)?;
        self.fill_f32(&mut tgt, n_tok, f32::NAN)?;
        for t0 in (0..n_tok).step_by(tc) {
            let rows = tc.min(n_tok - t0);
            for v0 in (0..vocab).step_by(vc) {
                let cols = vc.min(vocab - v0);
                self.gemm_rm_xwt(
                    h.at(t0 * dim),
                    w.at(v0 * dim),
                    tile.ptr(),
                    rows,
                    cols,
                    dim,
                    0.0,
                    true,
                    cols,
                )?;
                self.gpu.launch(
                    "logprobs",
                    "lp_chunk_fwd",
                    (rows as u32, 1, 1),
                    blk(256),
                    0,
                    Args::new()
                        .p(tile.ptr())
                        .i(rows as i32)
                        .i(cols as i32)
                        .i(v0 as i32)
                        .p(targets.ptr())
                        .i(t0 as i32)
                        .p(m.ptr())
                        .p(s.ptr())
                        .p(wsum.ptr())
                        .p(tgt.ptr())
                        .i((v0 == 0) as i32)
                        .f(inv_t),
                )?;
            }
        }
        let ent_ptr = match entropy {
            Some(e) => {
                need(e, n_tok, "logprobs entropy")?;
                e.ptr()
            }
            None => 0,
        };
        self.gpu.launch(
            "logprobs",
            "lp_finalize",
            ew_grid(n_tok),
            blk(EW_THREADS),
            0,
            Args::new()
                .p(m.ptr())
                .p(s.ptr())
                .p(wsum.ptr())
                .p(tgt.ptr())
                .p(targets.ptr())
                .u(vocab as u32)
                .p(logp.ptr())
                .p(lse.ptr())
                .p(ent_ptr)
                .i(n_tok as i32)
                .p(self.gpu.err_flag.ptr()),
        )
    }

    fn logprobs_bwd(
        &self,
        dlogp: &Self::F,
        h: &Self::T,
        w: &Self::T,
        targets: &Self::I,
        lse: &Self::F,
        dh: &mut Self::T,
        dw: Option<&mut Self::F>,
        n_tok: usize,
        dim: usize,
        vocab: usize,
        inv_t: f32,
    ) -> Result<()> {
        ensure!(
            inv_t.is_finite() && inv_t > 0.0,
            "logprobs_bwd: inv_t = {inv_t}, expected a finite value > 0"
        );
        need(dlogp, n_tok, "logprobs_bwd dlogp")?;
        need(h, n_tok * dim, "logprobs_bwd h")?;
        need(w, vocab * dim, "logprobs_bwd w")?;
        need(targets, n_tok, "logprobs_bwd targets")?;
        need(lse, n_tok, "logprobs_bwd lse")?;
        need(dh, n_tok * dim, "logprobs_bwd dh")?;
        ensure!(
            vocab > 0 && dim > 0,
            "logprobs_bwd: vocab and dim must be > 0"
        );
        let dw_ptr = match dw {
            Some(d) => {
                need(d, vocab * dim, "logprobs_bwd dw")?;
                Some(d.ptr())
            }
            None => None,
        };
        if n_tok == 0 {
            return Ok(());
        }
        let tc = self.tok_chunk.min(n_tok);
        let vc = self.vocab_chunk.min(vocab);
        let tile = self.gpu.alloc::<f32>(tc * vc)?;
        let dl = self.gpu.alloc::<Bf16>(tc * vc)?;
        let dh32 = self.gpu.alloc::<f32>(tc * dim)?;
        for t0 in (0..n_tok).step_by(tc) {
            let rows = tc.min(n_tok - t0);
            for v0 in (0..vocab).step_by(vc) {
                let cols = vc.min(vocab - v0);
                self.gemm_rm_xwt(
                    h.at(t0 * dim),
                    w.at(v0 * dim),
                    tile.ptr(),
                    rows,
                    cols,
                    dim,
                    0.0,
                    true,
                    cols,
                )?;
                self.gpu.launch(
                    "logprobs",
                    "lp_chunk_bwd",
                    (rows as u32, 1, 1),
                    blk(256),
                    0,
                    Args::new()
                        .p(tile.ptr())
                        .i(rows as i32)
                        .i(cols as i32)
                        .i(v0 as i32)
                        .p(targets.ptr())
                        .i(t0 as i32)
                        .p(lse.ptr())
                        .p(dlogp.ptr())
                        .p(dl.ptr())
                        .f(inv_t),
                )?;
                // dh32[rows, dim] (+)= dl[rows, cols] w[v0.., dim]: column-major dh^T = w^T dl^T
                let beta = if v0 == 0 { 0.0 } else { 1.0 };
                self.gpu.gemm(
                    false,
                    false,
                    dim,
                    rows,
                    cols,
                    w.at(v0 * dim),
                    dim,
                    dl.ptr(),
                    cols,
                    beta,
                    dh32.ptr(),
                    dim,
                    true,
                )?;
                if let Some(dwp) = dw_ptr {
                    // dw[v0.., dim] += dl^T h: column-major dw^T[dim, cols] += h^T[dim, rows] dl[rows, cols]
                    self.gpu.gemm(
                        false,
                        true,
                        dim,
                        cols,
                        rows,
                        h.at(t0 * dim),
                        dim,
                        dl.ptr(),
                        cols,
                        1.0,
                        dwp + (v0 * dim * 4) as u64,
                        dim,
                        true,
                    )?;
                }
            }
            self.gpu.launch(
                "util",
                "f32_to_bf16",
                ew_grid(rows * dim),
                blk(EW_THREADS),
                0,
                Args::new()
                    .p(dh32.ptr())
                    .p(dh.at(t0 * dim))
                    .l((rows * dim) as i64),
            )?;
        }
        Ok(())
    }

    fn logits(
        &self,
        h: &Self::T,
        w: &Self::T,
        out: &mut Self::F,
        rows: usize,
        dim: usize,
        vocab: usize,
    ) -> Result<()> {
        need(h, rows * dim, "logits h")?;
        need(w, vocab * dim, "logits w")?;
        need(out, rows * vocab, "logits out")?;
        self.gemm_rm_xwt(
            h.ptr(),
            w.ptr(),
            out.ptr(),
            rows,
            vocab,
            dim,
            0.0,
            true,
            vocab,
        )
    }

    fn sample(
        &self,
        logits: &Self::F,
        out: &mut Self::I,
        rows: usize,
        vocab: usize,
        temperature: f32,
        top_p: f32,
        top_k: usize,
        seed: u64,
        offset: u64,
    ) -> Result<()> {
        need(logits, rows * vocab, "sample logits")?;
        need(out, rows, "sample out")?;
        ensure!(vocab > 0, "sample: vocab must be > 0");
        ensure!(
            temperature >= 0.0 && temperature.is_finite(),
            "sample: temperature {temperature} must be finite and >= 0"
        );
        ensure!(
            (0.0..=1.0).contains(&top_p),
            "sample: top_p {top_p} must be in [0, 1]"
        );
        // The kernel's fixed-point masses sum up to 2^24 entries of at most 2^40 in 64 bits.
        ensure!(vocab < 1 << 24, "sample: vocab {vocab} must be below 2^24");
        // top_k >= vocab keeps everything, like top_k = 0.
        let top_k = if top_k >= vocab { 0 } else { top_k };
        self.gpu.launch(
            "sampling",
            "sample_rows",
            (rows as u32, 1, 1),
            blk(512),
            0,
            Args::new()
                .p(logits.ptr())
                .p(out.ptr())
                .i(rows as i32)
                .i(i32_of(vocab, "vocab")?)
                .f(temperature)
                .f(top_p)
                .i(i32_of(top_k, "top_k")?)
                .q(seed)
                .q(offset)
                .p(self.gpu.err_flag.ptr()),
        )
    }

    fn grpo_loss(
        &self,
        logp: &Self::F,
        old_logp: &Self::F,
        ref_logp: &Self::F,
        adv: &Self::F,
        mask: &Self::F,
        seq_id: &Self::I,
        dlogp: &mut Self::F,
        n_tok: usize,
        n_seq: usize,
        cfg: &GrpoLossCfg,
    ) -> Result<GrpoLossOut> {
        for (b, what) in [
            (logp, "logp"),
            (old_logp, "old_logp"),
            (ref_logp, "ref_logp"),
            (adv, "adv"),
            (mask, "mask"),
        ] {
            need(b, n_tok, &format!("grpo_loss {what}"))?;
        }
        need(seq_id, n_tok, "grpo_loss seq_id")?;
        need(dlogp, n_tok, "grpo_loss dlogp")?;
        check_grpo_cfg(cfg)?;
        if n_tok == 0 {
            return Ok(GrpoLossOut::default());
        }
        let stats = self.gpu.alloc::<f32>(6 * n_tok)?;
        self.gpu.launch(
            "grpo_loss",
            "grpo_token_fwd",
            ew_grid(n_tok),
            blk(EW_THREADS),
            0,
            Args::new()
                .p(logp.ptr())
                .p(old_logp.ptr())
                .p(ref_logp.ptr())
                .p(adv.ptr())
                .p(stats.ptr())
                .i(i32_of(n_tok, "n_tok")?)
                .f(cfg.clip_low)
                .f(cfg.clip_high)
                .f(cfg.kl_coef)
                .i(kl_code(cfg.kl_kind)),
        )?;
        let st: Vec<f32> = self.gpu.dtoh(stats.ptr(), 5 * n_tok)?;
        let mk: Vec<f32> = self.gpu.dtoh(mask.ptr(), n_tok)?;
        let sid: Vec<u32> = self.gpu.dtoh(seq_id.ptr(), n_tok)?;
        let (out, wseq) = grpo_reduce(&st, &mk, &sid, n_tok, n_seq, cfg)?;
        let wbuf = self.gpu.htod::<f32, f32>(&wseq)?;
        self.gpu.launch(
            "grpo_loss",
            "grpo_token_bwd",
            ew_grid(n_tok),
            blk(EW_THREADS),
            0,
            Args::new()
                .p(stats.ptr())
                .p(mask.ptr())
                .p(seq_id.ptr())
                .p(wbuf.ptr())
                .p(dlogp.ptr())
                .i(n_tok as i32),
        )?;
        Ok(out)
    }

    fn adamw(
        &self,
        param: &mut Self::T,
        master: Option<&mut Self::F>,
        grad: &Self::F,
        m: &mut Self::F,
        v: &mut Self::F,
        n: usize,
        hp: &AdamWStep,
    ) -> Result<()> {
        need(param, n, "adamw param")?;
        need(grad, n, "adamw grad")?;
        need(m, n, "adamw m")?;
        need(v, n, "adamw v")?;
        ensure!(hp.step >= 1, "adamw: step is 1-based, got {}", hp.step);
        let mp = match master {
            Some(ms) => {
                need(ms, n, "adamw master")?;
                ms.ptr()
            }
            None => 0,
        };
        let t = hp.step.min(i32::MAX as u64) as i32;
        let bc1 = (1.0 - (hp.beta1 as f64).powi(t)) as f32;
        let bc2 = (1.0 - (hp.beta2 as f64).powi(t)) as f32;
        self.gpu.launch(
            "adamw",
            "adamw_step",
            ew_grid(n),
            blk(EW_THREADS),
            0,
            Args::new()
                .p(param.ptr())
                .p(mp)
                .p(grad.ptr())
                .p(m.ptr())
                .p(v.ptr())
                .l(n as i64)
                .f(hp.lr)
                .f(hp.beta1)
                .f(hp.beta2)
                .f(hp.eps)
                .f(hp.weight_decay)
                .f(hp.grad_scale)
                .f(bc1)
                .f(bc2),
        )
    }

    fn needs_master(&self) -> bool {
        true
    }
}

impl Cuda {
    /// The forward attention launch; `prefix` is the device address of a checked prefix table
    /// or 0 for none.
    #[allow(clippy::too_many_arguments)]
    fn attn_fwd(
        &self,
        q: &CudaBuf<Bf16>,
        k: &CudaBuf<Bf16>,
        v: &CudaBuf<Bf16>,
        out: &mut CudaBuf<Bf16>,
        lse: &mut CudaBuf<f32>,
        cu_seqlens: &CudaBuf<u32>,
        cu_host: &[u32],
        prefix: u64,
        max_len: usize,
        n_heads: usize,
        n_kv: usize,
        head_dim: usize,
    ) -> Result<()> {
        let n_tok = self.check_attn(cu_seqlens, cu_host, max_len, n_heads, n_kv, head_dim)?;
        need(q, n_tok * n_heads * head_dim, "attention q")?;
        need(k, n_tok * n_kv * head_dim, "attention k")?;
        need(v, n_tok * n_kv * head_dim, "attention v")?;
        need(out, n_tok * n_heads * head_dim, "attention out")?;
        need(lse, n_heads * n_tok, "attention lse")?;
        let n_seq = cu_host.len() - 1;
        self.gpu.launch(
            "attention",
            &format!("attn_fwd_d{head_dim}"),
            (max_len.div_ceil(16) as u32, n_heads as u32, n_seq as u32),
            blk(128),
            0,
            Args::new()
                .p(q.ptr())
                .p(k.ptr())
                .p(v.ptr())
                .p(out.ptr())
                .p(lse.ptr())
                .p(cu_seqlens.ptr())
                .p(prefix)
                .i(n_tok as i32)
                .i(n_heads as i32)
                .i(n_kv as i32),
        )
    }

    /// The backward attention launches; `prefix` is a checked prefix table (device, host).
    #[allow(clippy::too_many_arguments)]
    fn attn_bwd(
        &self,
        dout: &CudaBuf<Bf16>,
        q: &CudaBuf<Bf16>,
        k: &CudaBuf<Bf16>,
        v: &CudaBuf<Bf16>,
        out: &CudaBuf<Bf16>,
        lse: &CudaBuf<f32>,
        dq: &mut CudaBuf<Bf16>,
        dk: &mut CudaBuf<Bf16>,
        dv: &mut CudaBuf<Bf16>,
        cu_seqlens: &CudaBuf<u32>,
        cu_host: &[u32],
        prefix: Option<(&CudaBuf<u32>, &[u32])>,
        max_len: usize,
        n_heads: usize,
        n_kv: usize,
        head_dim: usize,
    ) -> Result<()> {
        let n_tok = self.check_attn(cu_seqlens, cu_host, max_len, n_heads, n_kv, head_dim)?;
        let qn = n_tok * n_heads * head_dim;
        let kn = n_tok * n_kv * head_dim;
        need(dout, qn, "attention_bwd dout")?;
        need(q, qn, "attention_bwd q")?;
        need(out, qn, "attention_bwd out")?;
        need(dq, qn, "attention_bwd dq")?;
        need(k, kn, "attention_bwd k")?;
        need(v, kn, "attention_bwd v")?;
        need(dk, kn, "attention_bwd dk")?;
        need(dv, kn, "attention_bwd dv")?;
        need(lse, n_heads * n_tok, "attention_bwd lse")?;
        let n_seq = cu_host.len() - 1;
        let dot = self.gpu.alloc::<f32>(n_heads * n_tok)?;
        // the readers of each sequence's rows as prefix (CSR), for the dk/dv kernel
        let readers = match prefix {
            Some((_, ph)) => {
                let (off, idx) = super::prefix_readers(ph, cu_host);
                // keep one slack entry: an empty upload is no buffer
                let idx = if idx.is_empty() { vec![0] } else { idx };
                Some((self.upload_u32(&off)?, self.upload_u32(&idx)?))
            }
            None => None,
        };
        let pptr = prefix.map_or(0, |(p, _)| p.ptr());
        let (roff, rptr) = readers.as_ref().map_or((0, 0), |(o, r)| (o.ptr(), r.ptr()));
        self.gpu.launch(
            "attention",
            "attn_bwd_dot",
            ((n_tok * n_heads).div_ceil(8) as u32, 1, 1),
            blk(256),
            0,
            Args::new()
                .p(dout.ptr())
                .p(out.ptr())
                .p(dot.ptr())
                .i(n_tok as i32)
                .i(n_heads as i32)
                .i(head_dim as i32),
        )?;
        self.gpu.launch(
            "attention",
            &format!("attn_bwd_dq_d{head_dim}"),
            (max_len.div_ceil(8) as u32, n_heads as u32, n_seq as u32),
            blk(128),
            0,
            Args::new()
                .p(dout.ptr())
                .p(q.ptr())
                .p(k.ptr())
                .p(v.ptr())
                .p(lse.ptr())
                .p(dot.ptr())
                .p(dq.ptr())
                .p(cu_seqlens.ptr())
                .p(pptr)
                .i(n_tok as i32)
                .i(n_heads as i32)
                .i(n_kv as i32),
        )?;
        self.gpu.launch(
            "attention",
            &format!("attn_bwd_dkdv_d{head_dim}"),
            (max_len.div_ceil(8) as u32, n_kv as u32, n_seq as u32),
            blk(128),
            0,
            Args::new()
                .p(dout.ptr())
                .p(q.ptr())
                .p(k.ptr())
                .p(v.ptr())
                .p(lse.ptr())
                .p(dot.ptr())
                .p(dk.ptr())
                .p(dv.ptr())
                .p(cu_seqlens.ptr())
                .p(pptr)
                .p(roff)
                .p(rptr)
                .i(n_tok as i32)
                .i(n_heads as i32)
                .i(n_kv as i32),
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn rope_impl(
        &self,
        kernel: &str,
        x: &mut CudaBuf<Bf16>,
        pos: &CudaBuf<u32>,
        n_tok: usize,
        n_heads: usize,
        head_dim: usize,
        theta: f32,
    ) -> Result<()> {
        ensure!(
            head_dim % 2 == 0 && head_dim > 0,
            "rope: head_dim {head_dim} must be even and positive"
        );
        ensure!(
            theta.is_finite() && theta > 0.0,
            "rope: theta {theta} must be positive"
        );
        need(x, n_tok * n_heads * head_dim, "rope x")?;
        need(pos, n_tok, "rope pos")?;
        let mut tables = self
            .rope_tables
            .lock()
            .map_err(|_| Error::msg("rope table lock poisoned"))?;
        let inv_freq = match tables.entry((theta.to_bits(), head_dim)) {
            std::collections::hash_map::Entry::Occupied(e) => e.get().ptr(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let inv = super::cpu::math::rope_inv_freq(head_dim, theta);
                let buf = self.gpu.htod::<f32, f32>(&inv)?;
                // The upload reads `inv` (freed at the end of this block) asynchronously.
                self.gpu.sync()?;
                e.insert(buf).ptr()
            }
        };
        drop(tables);
        self.gpu.launch(
            "rope",
            kernel,
            ((n_tok * n_heads) as u32, 1, 1),
            blk(64),
            0,
            Args::new()
                .p(x.ptr())
                .p(pos.ptr())
                .i(i32_of(n_tok, "n_tok")?)
                .i(n_heads as i32)
                .i(head_dim as i32)
                .p(inv_freq),
        )
    }

    /// Checks the attention arguments like the CPU backend and returns the token count. The
    /// kernels read the device offsets `cu_dev`; the host copy drives the checks and the
    /// launch grid, so the two must agree: in debug builds and with TOOLN1_CUDA_SYNC=1 the
    /// device copy is downloaded and compared (a synchronisation, hence not on by default).
    fn check_attn(
        &self,
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
        if self.gpu.sync_each {
            let dev: Vec<u32> = self.gpu.dtoh(cu_dev.ptr(), cu_host.len())?;
            if let Some(i) = (0..cu_host.len()).find(|&i| dev[i] != cu_host[i]) {
                return Err(Error::Invalid(format!(
                    "attention: `cu_seqlens` (device) and `cu_host` differ at entry {i} ({} vs {})",
                    dev[i], cu_host[i]
                )));
            }
        }
        Ok(*cu_host.last().unwrap_or(&0) as usize)
    }
}

/// The scalar settings both backends reject (checked before any work, even for 0 tokens).
fn check_grpo_cfg(cfg: &GrpoLossCfg) -> Result<()> {
    ensure!(
        cfg.loss_scale_div.is_finite() && cfg.loss_scale_div > 0.0,
        "grpo_loss: `loss_scale_div` = {}, expected > 0",
        cfg.loss_scale_div
    );
    ensure!(
        cfg.agg != LossAgg::SeqMeanTokenSumNorm || (cfg.norm_len.is_finite() && cfg.norm_len > 0.0),
        "grpo_loss: `norm_len` = {}, expected > 0 for seq-mean-token-sum-norm",
        cfg.norm_len
    );
    Ok(())
}

/// Reduces the per-token GRPO rows (tok, pg, kl, clipped, ratio) to the loss scalars in f64 and
/// returns the per-sequence gradient weight w[s] = d loss / d tok_t for tokens of sequence s
/// (the mask value multiplies it on the device). Same aggregation as the CPU backend:
/// token-mean Σ m L / Σ m; seq-mean-token-sum Σ_s (Σ m L) / n_seq; seq-mean-token-mean mean over
/// non-empty sequences of (Σ m L / Σ m); seq-mean-token-sum-norm Σ m L / norm_len.
fn grpo_reduce(
    st: &[f32],
    mask: &[f32],
    seq: &[u32],
    n: usize,
    n_seq: usize,
    cfg: &GrpoLossCfg,
) -> Result<(GrpoLossOut, Vec<f32>)> {
    check_grpo_cfg(cfg)?;
    let row = |k: usize, t: usize| st[k * n + t] as f64;
    let mut cnt_s = vec![0f64; n_seq];
    let mut tok_s = vec![0f64; n_seq];
    let mut pg_s = vec![0f64; n_seq];
    let (mut cnt, mut kl, mut clip, mut ratio) = (0f64, 0f64, 0f64, 0f64);
    for t in 0..n {
        let s = seq[t] as usize;
        ensure!(
            s < n_seq,
            "grpo_loss: `seq_id[{t}]` = {s}, expected < n_seq = {n_seq}"
        );
        ensure!(
            mask[t].is_finite() && mask[t] >= 0.0,
            "grpo_loss: `mask[{t}]` = {}, expected a finite weight >= 0",
            mask[t]
        );
        let mk = mask[t] as f64;
        if mk == 0.0 {
            continue;
        }
        cnt_s[s] += mk;
        tok_s[s] += mk * row(0, t);
        pg_s[s] += mk * row(1, t);
        cnt += mk;
        kl += mk * row(2, t);
        clip += mk * row(3, t);
        ratio += mk * row(4, t);
    }
    let nonempty = cnt_s.iter().filter(|&&c| c != 0.0).count().max(1) as f64;
    let div = cfg.loss_scale_div as f64;
    // Weight of one unit of mask of sequence s in the aggregate.
    let w: Vec<f64> = (0..n_seq)
        .map(|s| match cfg.agg {
            LossAgg::TokenMean => {
                if cnt > 0.0 {
                    1.0 / cnt
                } else {
                    0.0
                }
            }
            LossAgg::SeqMeanTokenSum => 1.0 / n_seq.max(1) as f64,
            LossAgg::SeqMeanTokenMean => {
                if cnt_s[s] > 0.0 {
                    1.0 / (cnt_s[s] * nonempty)
                } else {
                    0.0
                }
            }
            LossAgg::SeqMeanTokenSumNorm => 1.0 / cfg.norm_len as f64,
        })
        .collect();
    let agg = |per: &[f64]| -> f64 { per.iter().zip(&w).map(|(x, ws)| x * ws).sum() };
    let mean = |x: f64| if cnt > 0.0 { x / cnt } else { 0.0 };
    let out = GrpoLossOut {
        loss: (agg(&tok_s) / div) as f32,
        pg_loss: agg(&pg_s) as f32,
        kl: mean(kl) as f32,
        clip_frac: mean(clip) as f32,
        ratio_mean: mean(ratio) as f32,
        n_tokens: cnt as f32,
    };
    Ok((out, w.into_iter().map(|x| (x / div) as f32).collect()))
}
