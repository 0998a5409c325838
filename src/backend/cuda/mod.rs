//! The CUDA backend: bf16 storage, f32 accumulation, cuBLAS GEMMs (bf16 inputs, f32 compute)
//! and the hand-written kernels of `kernels/` for everything else.
//!
//! - `T` = bf16 device buffer, `F` = f32, `I` = u32 (all [`CudaBuf`], from a caching pool).
//! - Parameter gradients are f32 and accumulated: `linear_bwd`'s dW is a GemmEx with bf16 A/B,
//!   f32 C and beta = 1.
//! - AdamW keeps an f32 master copy of the bf16 parameters (`needs_master() == true`).
//! - The vocabulary projection is streamed in token x vocabulary chunks ([`Cuda::set_logprob_chunks`]).
//! - Sampling reproduces the CPU backend's counter-based random stream.
//!
//! Each method below is one call into `ops::<op>`, the launchers of `kernels/<op>.cu`.

mod comm;
mod graph;
mod ops;
mod runtime;

pub use comm::{nccl_available, nccl_group, nccl_group_on, NcclRank, NcclStream, PENDING_GROUPS};
pub use graph::CudaGraph;
pub use ops::mma_check::TensorCoreCheck;
pub use runtime::size_class;
pub use runtime::{
    device_count, device_memory, nvrtc_check, Bf16, CudaBuf, Elem, PoolStats, Timer, KERNEL_KIND,
    NVCC_PINNED, PTXAS_REPORT,
};

use runtime::Gpu;

use super::{
    AdamWState, AdamWStep, AttnGrads, AttnSaved, Backend, Cached, DType, GemmDims, GrpoLossCfg,
    GrpoLossOut, GrpoTokens, Heads, KvRows, LinearGrads, LmHead, LogprobsGrads, LogprobsOut,
    NormDims, NormGrads, NormOut, Packed, Prefix, Qkv, RopeRows, RowCopy, SampleParams, SampleRows,
    VocabDims,
};
use crate::Result;

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

    /// Starts a new peak of the allocator's counters ([`PoolStats::peak_held`]).
    pub fn reset_pool_peak(&self) {
        self.gpu.pool.reset_peak()
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
        ops::memory::upload_bf16(self, data)
    }
    fn upload_f32(&self, data: &[f32]) -> Result<Self::F> {
        self.gpu.htod::<f32, f32>(data)
    }
    fn upload_u32(&self, data: &[u32]) -> Result<Self::I> {
        self.gpu.htod::<u32, u32>(data)
    }
    fn upload_raw(&self, dtype: DType, bytes: &[u8], n: usize) -> Result<Self::T> {
        ops::memory::upload_raw(self, dtype, bytes, n)
    }
    fn host_buffer(&self, data: Vec<u8>) -> Result<Box<dyn crate::backend::HostMem>> {
        // Pageable when the driver refuses to lock that much memory.
        Ok(match self.gpu.pinned(&data) {
            Ok(p) => Box::new(p),
            Err(_) => Box::new(data),
        })
    }
    fn upload_raw_async(
        &self,
        dtype: DType,
        src: &dyn crate::backend::HostMem,
        range: std::ops::Range<usize>,
        n: usize,
    ) -> Result<(Self::T, crate::backend::PendingUpload)> {
        ops::memory::upload_raw_async(self, dtype, src, range, n)
    }
    fn download(&self, t: &Self::T, n: usize) -> Result<Vec<f32>> {
        ops::memory::download_bf16(self, t, n)
    }
    fn download_f32(&self, t: &Self::F, n: usize) -> Result<Vec<f32>> {
        ops::memory::download(self, t, n, "download_f32")
    }
    fn download_u32(&self, t: &Self::I, n: usize) -> Result<Vec<u32>> {
        ops::memory::download(self, t, n, "download_u32")
    }
    fn copy(&self, src: &Self::T, dst: &mut Self::T, n: usize) -> Result<()> {
        ops::memory::copy(self, src, dst, n, "copy")
    }
    fn copy_f32(&self, src: &Self::F, dst: &mut Self::F, n: usize) -> Result<()> {
        ops::memory::copy(self, src, dst, n, "copy_f32")
    }
    fn copy_rows(&self, t: &mut Self::T, c: RowCopy) -> Result<()> {
        ops::memory::copy_rows(self, t, c)
    }
    fn fill_f32(&self, t: &mut Self::F, n: usize, value: f32) -> Result<()> {
        ops::util::fill_f32(self, t, n, value)
    }
    fn synchronize(&self) -> Result<()> {
        self.gpu.bind().and_then(|_| self.gpu.sync())
    }

    fn release_cached(&self) -> Result<()> {
        self.gpu.bind()?;
        self.trim()
    }

    fn write_u32(&self, dst: &mut Self::I, data: &[u32]) -> Result<()> {
        ops::memory::write(self, dst, data, "write_u32")
    }
    fn copy_u32_at(&self, src: &Self::I, off: usize, dst: &mut Self::I, n: usize) -> Result<()> {
        ops::memory::copy_at(self, src, off, dst, n, "copy_u32_at")
    }
    fn capture_begin(&self, share: Option<&dyn crate::backend::ReplayGraph>) -> Result<bool> {
        let share = match share {
            None => None,
            Some(g) => Some(g.as_any().downcast_ref::<CudaGraph>().ok_or_else(|| {
                crate::Error::Invalid("capture_begin: `share` is not a CUDA graph".into())
            })?),
        };
        self.gpu.begin_capture(share).map(|_| true)
    }
    fn capture_end(&self) -> Result<Box<dyn crate::backend::ReplayGraph>> {
        Ok(Box::new(self.gpu.end_capture()?))
    }
    fn host_f32(&self, n: usize) -> Result<crate::backend::HostF32> {
        ops::memory::host_f32(self, n)
    }
    fn download_f32_async(
        &self,
        src: &[(&Self::F, usize)],
        dst: crate::backend::HostF32,
    ) -> Result<crate::backend::HostCopy> {
        ops::memory::download_f32_async(self, src, dst)
    }
    fn upload_async(
        &self,
        src: &[&[f32]],
        stage: crate::backend::HostF32,
    ) -> Result<(Vec<Self::T>, crate::backend::HostCopy)> {
        ops::memory::upload_async(self, src, stage)
    }

    fn add_inplace(&self, a: &mut Self::T, b: &Self::T, n: usize) -> Result<()> {
        ops::util::add_inplace(self, a, b, n)
    }
    fn sum_squares_f32(&self, t: &Self::F, n: usize) -> Result<f64> {
        ops::adamw::sum_squares(self, t, n)
    }

    fn linear(
        &self,
        x: &Self::T,
        w: &Self::T,
        bias: Option<&Self::T>,
        y: &mut Self::T,
        d: GemmDims,
    ) -> Result<()> {
        ops::linear::forward(self, x, w, bias, y, d)
    }
    fn linear_bwd(
        &self,
        dy: &Self::T,
        x: &Self::T,
        w: &Self::T,
        grads: LinearGrads<'_, Self::T, Self::F>,
        d: GemmDims,
    ) -> Result<()> {
        ops::linear::backward(self, dy, x, w, grads, d)
    }

    fn embedding(
        &self,
        ids: &Self::I,
        table: &Self::T,
        out: &mut Self::T,
        n_tok: usize,
        dim: usize,
    ) -> Result<()> {
        ops::embedding::forward(self, ids, table, out, n_tok, dim)
    }
    fn embedding_bwd(
        &self,
        ids: &Self::I,
        dout: &Self::T,
        dtable: &mut Self::F,
        n_tok: usize,
        dim: usize,
    ) -> Result<()> {
        ops::embedding::backward(self, ids, dout, dtable, n_tok, dim)
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
        ops::embedding::scatter_add_rows(self, ids, src, dst, n, dst_rows, dim)
    }

    fn rmsnorm(
        &self,
        x: &Self::T,
        w: &Self::T,
        out: &mut Self::T,
        rstd: &mut Self::F,
        d: NormDims,
        eps: f32,
    ) -> Result<()> {
        ops::rmsnorm::forward(self, x, w, out, rstd, d, eps)
    }
    fn add_rmsnorm(
        &self,
        x: &mut Self::T,
        delta: &Self::T,
        w: &Self::T,
        y: NormOut<'_, Self::T, Self::F>,
        d: NormDims,
        eps: f32,
    ) -> Result<()> {
        ops::rmsnorm::add_forward(self, x, delta, w, y, d, eps)
    }
    fn rmsnorm_bwd(
        &self,
        dout: &Self::T,
        x: &Self::T,
        w: &Self::T,
        rstd: &Self::F,
        grads: NormGrads<'_, Self::T, Self::F>,
        d: NormDims,
    ) -> Result<()> {
        ops::rmsnorm::backward(self, dout, x, w, rstd, grads, d)
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
        let d = RopeRows {
            n_tok,
            n_heads,
            head_dim,
        };
        ops::rope::rotate(self, false, x, pos, d, theta)
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
        let d = RopeRows {
            n_tok,
            n_heads,
            head_dim,
        };
        ops::rope::rotate(self, true, dx, pos, d, theta)
    }

    fn attention(
        &self,
        qkv: Qkv<'_, Self::T>,
        out: &mut Self::T,
        lse: &mut Self::F,
        seqs: &Packed<'_, Self::I>,
        heads: Heads,
    ) -> Result<()> {
        ops::flash_attn::forward(self, qkv, out, lse, seqs, heads)
    }
    fn attention_bwd(
        &self,
        qkv: Qkv<'_, Self::T>,
        saved: AttnSaved<'_, Self::T, Self::F>,
        grads: AttnGrads<'_, Self::T>,
        seqs: &Packed<'_, Self::I>,
        heads: Heads,
    ) -> Result<()> {
        ops::flash_attn::backward(self, qkv, saved, grads, seqs, heads)
    }
    fn attention_prefixed(
        &self,
        qkv: Qkv<'_, Self::T>,
        out: &mut Self::T,
        lse: &mut Self::F,
        seqs: &Packed<'_, Self::I>,
        prefix: &Prefix<'_, Self::I>,
        heads: Heads,
    ) -> Result<()> {
        ops::flash_attn::forward_prefixed(self, qkv, out, lse, seqs, prefix, heads)
    }
    fn attention_prefixed_bwd(
        &self,
        qkv: Qkv<'_, Self::T>,
        saved: AttnSaved<'_, Self::T, Self::F>,
        grads: AttnGrads<'_, Self::T>,
        seqs: &Packed<'_, Self::I>,
        prefix: &Prefix<'_, Self::I>,
        heads: Heads,
    ) -> Result<()> {
        ops::flash_attn::backward_prefixed(self, qkv, saved, grads, seqs, prefix, heads)
    }
    fn kv_store(
        &self,
        k: &Self::T,
        v: &Self::T,
        dst: &Self::I,
        k_cache: &mut Self::T,
        v_cache: &mut Self::T,
        rows: KvRows,
    ) -> Result<()> {
        ops::decode::kv_store(self, k, v, dst, k_cache, v_cache, rows)
    }
    fn attention_decode(
        &self,
        q: &Self::T,
        k_cache: &Self::T,
        v_cache: &Self::T,
        cached: &Cached<'_, Self::I>,
        out: &mut Self::T,
        heads: Heads,
    ) -> Result<()> {
        ops::decode::attention(self, q, k_cache, v_cache, cached, out, heads)
    }

    fn swiglu(&self, gate: &Self::T, up: &Self::T, out: &mut Self::T, n: usize) -> Result<()> {
        ops::swiglu::forward(self, gate, up, out, n)
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
        ops::swiglu::backward(self, dout, gate, up, dgate, dup, n)
    }

    fn logprobs(
        &self,
        head: LmHead<'_, Self::T, Self::I>,
        out: LogprobsOut<'_, Self::F>,
        d: VocabDims,
        inv_t: f32,
    ) -> Result<()> {
        ops::logprobs::forward(self, head, out, d, inv_t)
    }
    fn logprobs_bwd(
        &self,
        dlogp: &Self::F,
        head: LmHead<'_, Self::T, Self::I>,
        lse: &Self::F,
        grads: LogprobsGrads<'_, Self::T, Self::F>,
        d: VocabDims,
        inv_t: f32,
    ) -> Result<()> {
        ops::logprobs::backward(self, dlogp, head, lse, grads, d, inv_t)
    }
    fn logits(&self, h: &Self::T, w: &Self::T, out: &mut Self::F, d: VocabDims) -> Result<()> {
        ops::linear::logits(self, h, w, out, d)
    }
    fn sample(
        &self,
        logits: &Self::F,
        out: &mut Self::I,
        rows: &SampleRows<'_>,
        p: &SampleParams,
    ) -> Result<()> {
        ops::sampling::sample(self, logits, out, rows, p)
    }
    fn sample_table(
        &self,
        logits: &Self::F,
        out: &mut Self::I,
        table: &Self::I,
        d: crate::backend::SampleDims,
        p: &SampleParams,
    ) -> Result<()> {
        ops::sampling::sample_table(self, logits, out, table, d, p)
    }

    fn grpo_loss(
        &self,
        tokens: &GrpoTokens<'_, Self::F, Self::I>,
        dlogp: &mut Self::F,
        cfg: &GrpoLossCfg,
    ) -> Result<GrpoLossOut> {
        ops::grpo_loss::grpo_loss(self, tokens, dlogp, cfg)
    }
    fn adamw(
        &self,
        state: AdamWState<'_, Self::T, Self::F>,
        grad: &Self::F,
        n: usize,
        hp: &AdamWStep,
    ) -> Result<()> {
        ops::adamw::adamw(self, state, grad, n, hp)
    }
    fn needs_master(&self) -> bool {
        true
    }
}
