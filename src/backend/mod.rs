//! The narrow op set the model code calls.
//!
//! The Qwen2 layer schedule (`crate::model::qwen2`) is written once over this trait. Two
//! implementations exist:
//! - [`cpu::Cpu`]: the readable f32 oracle (plain loops), used for tests, tiny models and demos;
//! - `cuda::Cuda`: bf16 storage, f32 accumulation, cuBLAS GEMMs and the kernels in `kernels/`.
//!
//! Conventions shared by every op:
//! - All matrices are row-major. A linear weight is `[out, in]` (HF layout).
//! - Tokens of several sequences are *packed*: `n_tok` rows, sequence `b` owning rows
//!   `cu_seqlens[b]..cu_seqlens[b+1]`. Attention never crosses a sequence boundary.
//! - Buffers may be longer than an op needs (allocators round up); an op only touches the
//!   leading elements its shape arguments describe.
//! - Parameter gradients (`Self::F`) are always *accumulated* (`+=`) so that micro-batches add
//!   up; activation gradients are overwritten unless the op says `accumulate`.
//! - Ops return `Result` so that launch failures surface as values, never panics. Both
//!   backends check every op's arguments against the one shape contract in [`check`] before any
//!   work, so they reject the same calls with the same `Error::Arg` (op, argument, expected,
//!   got); what only the data shows (an id out of range, a NaN logit) the CPU backend checks on
//!   the host and the CUDA kernels on the device, reported at the next synchronisation.

pub mod check;
pub mod cpu;
pub mod cuda;
pub mod host_adamw;
pub mod loss;
pub mod select;

use crate::Result;

/// Storage dtype of a tensor read from or written to a checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
}

/// Host bytes kept for repeated uploads (a streamed model's layers), page-locked where the
/// backend can ([`Backend::host_buffer`]) so that a copy from them runs beside queued work.
pub trait HostMem: Send + Sync {
    fn bytes(&self) -> &[u8];
    /// Whether the memory is page-locked (pinned) for the backend's copies.
    fn pinned(&self) -> bool;
}

impl HostMem for Vec<u8> {
    fn bytes(&self) -> &[u8] {
        self
    }
    fn pinned(&self) -> bool {
        false
    }
}

/// An upload started by [`Backend::upload_raw_async`]: [`PendingUpload::wait`] orders it before
/// any work queued afterwards (dropping it does the same).
pub struct PendingUpload(Option<Box<dyn FnOnce() -> Result<()>>>);

impl PendingUpload {
    /// An upload that is already complete.
    pub fn done() -> Self {
        PendingUpload(None)
    }
    /// An upload that `wait` orders before later work.
    pub fn new(wait: Box<dyn FnOnce() -> Result<()>>) -> Self {
        PendingUpload(Some(wait))
    }
    pub fn wait(mut self) -> Result<()> {
        match self.0.take() {
            Some(w) => w(),
            None => Ok(()),
        }
    }
}

impl Drop for PendingUpload {
    fn drop(&mut self) {
        if let Some(w) = self.0.take() {
            let _ = w();
        }
    }
}

/// Host f32 storage ([`Backend::host_f32`]): page-locked where the backend can, so that
/// [`Backend::download_f32_async`] and [`Backend::upload_async`] copies to and from it run on a
/// copy stream beside queued work; plain memory otherwise.
pub trait HostF32Mem: Send + Sync {
    fn as_slice(&self) -> &[f32];
    fn as_mut_slice(&mut self) -> &mut [f32];
    /// Whether the memory is page-locked (pinned) for the backend's copies.
    fn pinned(&self) -> bool;
}

impl HostF32Mem for Vec<f32> {
    fn as_slice(&self) -> &[f32] {
        self
    }
    fn as_mut_slice(&mut self) -> &mut [f32] {
        self
    }
    fn pinned(&self) -> bool {
        false
    }
}

/// A buffer of host f32 values from [`Backend::host_f32`] (zeros when made).
pub struct HostF32(Box<dyn HostF32Mem>);

impl HostF32 {
    pub fn new(mem: Box<dyn HostF32Mem>) -> Self {
        HostF32(mem)
    }
    /// Plain (pageable) memory holding `data`.
    pub fn pageable(data: Vec<f32>) -> Self {
        HostF32(Box::new(data))
    }
    pub fn pinned(&self) -> bool {
        self.0.pinned()
    }
}

impl std::ops::Deref for HostF32 {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        self.0.as_slice()
    }
}

impl std::ops::DerefMut for HostF32 {
    fn deref_mut(&mut self) -> &mut [f32] {
        self.0.as_mut_slice()
    }
}

/// The completion of a queued copy ([`HostCopy`]).
pub trait CopyDone: Send {
    /// Work queued on the backend's compute stream from now on runs after the copy (the host
    /// does not wait).
    fn order(&mut self) -> Result<()>;
    /// Blocks the host until the copy has completed.
    fn wait(self: Box<Self>) -> Result<()>;
}

/// A copy started by [`Backend::download_f32_async`] or [`Backend::upload_async`]; it owns the
/// host buffer the copy reads or writes, and gives it back only once the copy has completed
/// ([`HostCopy::wait`]), so the buffer is never read, reused or freed while the copy is queued.
/// Dropping it waits too.
pub struct HostCopy {
    host: Option<HostF32>,
    done: Option<Box<dyn CopyDone>>,
}

impl HostCopy {
    /// A copy that has completed already.
    pub fn done(host: HostF32) -> Self {
        HostCopy {
            host: Some(host),
            done: None,
        }
    }
    /// A queued copy of `host` whose completion is `done`.
    pub fn queued(host: HostF32, done: Box<dyn CopyDone>) -> Self {
        HostCopy {
            host: Some(host),
            done: Some(done),
        }
    }
    /// Orders the copy before work queued on the compute stream from now on, without waiting.
    pub fn order(&mut self) -> Result<()> {
        match &mut self.done {
            Some(d) => d.order(),
            None => Ok(()),
        }
    }
    /// Waits for the copy, then gives the host buffer back (a download's values are in it).
    pub fn wait(mut self) -> Result<HostF32> {
        if let Some(d) = self.done.take() {
            d.wait()?;
        }
        self.host
            .take()
            .ok_or_else(|| crate::Error::Invalid("HostCopy: buffer already taken".into()))
    }
}

impl Drop for HostCopy {
    fn drop(&mut self) {
        // The copy completes before its buffer is freed (fields drop after this).
        if let Some(d) = self.done.take() {
            let _ = d.wait();
        }
    }
}

/// The sum of `lens`, checked against a host buffer of `have` values (`op` names the op).
pub fn host_copy_len(
    op: &str,
    mut lens: impl Iterator<Item = usize>,
    have: usize,
) -> Result<usize> {
    let total = lens
        .try_fold(0usize, |a, n| a.checked_add(n))
        .ok_or_else(|| crate::Error::Invalid(format!("{op}: the total length overflows")))?;
    crate::ensure!(
        total <= have,
        "{op}: {total} values for a host buffer of {have}"
    );
    Ok(total)
}

/// Little-endian tensor bytes of `dtype` as f32 values (the one decoding of checkpoint bytes:
/// safetensors reading and both backends' `upload_raw`).
pub fn bytes_to_f32(dtype: DType, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        DType::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
    }
}

/// Sizes of one GEMM: y[m, n] = x[m, k] · w[n, k]ᵀ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmDims {
    pub m: usize,
    pub n: usize,
    pub k: usize,
}

/// Attention heads: `n_heads` query heads sharing `n_kv` key/value heads (query head h reads kv
/// head h / (n_heads / n_kv)), each `head_dim` wide.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Heads {
    pub n_heads: usize,
    pub n_kv: usize,
    pub head_dim: usize,
}

/// Rows a rotary embedding turns: `n_tok` tokens of `n_heads` heads of `head_dim` (the shape
/// arguments of [`Backend::rope`] and [`Backend::rope_bwd`], as their implementations pass them
/// on).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RopeRows {
    pub n_tok: usize,
    pub n_heads: usize,
    pub head_dim: usize,
}

/// Packed sequences: sequence b owns token rows `cu_host[b]..cu_host[b+1]`. `cu_seqlens` is the
/// backend's copy of the same n_seq + 1 offsets (the device reads it), `cu_host` the host copy
/// (checks and launch shapes); `max_len` bounds every sequence's length. The token count is the
/// last offset ([`Packed::n_tok`]), so it cannot disagree with the offsets.
#[derive(Debug)]
pub struct Packed<'a, I> {
    pub cu_seqlens: &'a I,
    pub cu_host: &'a [u32],
    pub max_len: usize,
}

impl<I> Clone for Packed<'_, I> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<I> Copy for Packed<'_, I> {}

/// A shared-prefix table for [`Backend::attention_prefixed`]: 2 entries per packed segment,
/// the rows lo..hi whose keys the segment attends to fully; `prefix` is the backend's copy (the
/// device reads it), `prefix_host` the host copy.
#[derive(Debug)]
pub struct Prefix<'a, I> {
    pub prefix: &'a I,
    pub prefix_host: &'a [u32],
}

impl<I> Clone for Prefix<'_, I> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<I> Copy for Prefix<'_, I> {}

/// A paged KV cache for decode (PagedAttention, Kwon et al., SOSP 2023, arXiv 2309.06180):
/// the caches hold `n_blocks` blocks of `block_size` rows ([n_blocks * block_size, kv_dim]);
/// sequence b < n_seq has `lens[b]` cached positions (the new token's key and value already
/// stored), and its position j lives in cache row `table[b * max_blocks + j / block_size] *
/// block_size + j % block_size`. Only the first ceil(lens[b] / block_size) entries of a
/// sequence's table row are read. A contiguous cache of `max_len` rows per slot is the table
/// `[0, 1, .., n_seq - 1]` with `block_size = max_len`, `max_blocks = 1`.
#[derive(Debug)]
pub struct Cached<'a, I: ?Sized> {
    pub lens: &'a I,
    /// Block ids, `max_blocks` per sequence (row-major).
    pub table: &'a I,
    pub n_seq: usize,
    pub max_blocks: usize,
    pub block_size: usize,
}

impl<I: ?Sized> Cached<'_, I> {
    /// The most positions one sequence can hold (max_blocks * block_size, saturating).
    pub fn max_len(&self) -> usize {
        self.max_blocks.saturating_mul(self.block_size)
    }
}

impl<I: ?Sized> Clone for Cached<'_, I> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<I: ?Sized> Copy for Cached<'_, I> {}

/// The gradients [`Backend::linear_bwd`] writes: `dx` (overwritten, or accumulated when
/// `accumulate_dx`), `dw` and `dbias` (accumulated); `None` skips one.
#[derive(Debug)]
pub struct LinearGrads<'a, T: ?Sized, F: ?Sized> {
    pub dx: Option<&'a mut T>,
    pub accumulate_dx: bool,
    pub dw: Option<&'a mut F>,
    pub dbias: Option<&'a mut F>,
}

impl<'a, T: ?Sized, F: ?Sized> LinearGrads<'a, T, F> {
    /// `dx` overwritten, `dw` accumulated, no bias gradient.
    pub fn new(dx: &'a mut T, dw: &'a mut F) -> Self {
        LinearGrads {
            dx: Some(dx),
            accumulate_dx: false,
            dw: Some(dw),
            dbias: None,
        }
    }
    /// `dx` accumulated (`+=`) instead of overwritten.
    pub fn accumulate(self) -> Self {
        LinearGrads {
            accumulate_dx: true,
            ..self
        }
    }
    /// With the bias gradient `dbias` (accumulated).
    pub fn bias(self, dbias: &'a mut F) -> Self {
        LinearGrads {
            dbias: Some(dbias),
            ..self
        }
    }
}

/// The inputs of attention: q [n_tok, n_heads, head_dim], k and v [n_tok, n_kv, head_dim].
#[derive(Debug)]
pub struct Qkv<'a, T: ?Sized> {
    pub q: &'a T,
    pub k: &'a T,
    pub v: &'a T,
}

impl<T: ?Sized> Clone for Qkv<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T: ?Sized> Copy for Qkv<'_, T> {}

/// What the attention backward reads besides q, k, v: the upstream gradient `dout` (like q)
/// and the forward's `out` and `lse`.
#[derive(Debug)]
pub struct AttnSaved<'a, T: ?Sized, F: ?Sized> {
    pub dout: &'a T,
    pub out: &'a T,
    pub lse: &'a F,
}

impl<T: ?Sized, F: ?Sized> Clone for AttnSaved<'_, T, F> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T: ?Sized, F: ?Sized> Copy for AttnSaved<'_, T, F> {}

/// The gradients the attention backward writes (overwrites): dq like q, dk and dv like k.
#[derive(Debug)]
pub struct AttnGrads<'a, T: ?Sized> {
    pub dq: &'a mut T,
    pub dk: &'a mut T,
    pub dv: &'a mut T,
}

/// Rows of an RMSNorm: `rows` rows of `dim` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NormDims {
    pub rows: usize,
    pub dim: usize,
}

/// The outputs of [`Backend::add_rmsnorm`]: the normed rows `out` [rows, dim] and `rstd`
/// [rows] (f32, saved for [`Backend::rmsnorm_bwd`]), as [`Backend::rmsnorm`] writes them.
#[derive(Debug)]
pub struct NormOut<'a, T: ?Sized, F: ?Sized> {
    pub out: &'a mut T,
    pub rstd: &'a mut F,
}

/// The gradients [`Backend::rmsnorm_bwd`] writes: `dx` (accumulated into the residual stream's
/// gradient) and `dw` (accumulated; `None` skips it).
#[derive(Debug)]
pub struct NormGrads<'a, T: ?Sized, F: ?Sized> {
    pub dx: &'a mut T,
    pub dw: Option<&'a mut F>,
}

/// Rows written by [`Backend::kv_store`]: `n_tok` rows of `kv_dim` (= n_kv * head_dim).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvRows {
    pub n_tok: usize,
    pub kv_dim: usize,
}

/// Sizes of the vocabulary ops: `n_tok` hidden rows of width `dim` against an lm_head weight
/// [vocab, dim] (for [`Backend::logits`], `n_tok` is its row count).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VocabDims {
    pub n_tok: usize,
    pub dim: usize,
    pub vocab: usize,
}

/// The inputs [`Backend::logprobs`] and its backward share: hidden rows `h` [n_tok, dim], the
/// lm_head weight `w` [vocab, dim] and one target id per row.
#[derive(Debug)]
pub struct LmHead<'a, T: ?Sized, I: ?Sized> {
    pub h: &'a T,
    pub w: &'a T,
    pub targets: &'a I,
}

impl<T: ?Sized, I: ?Sized> Clone for LmHead<'_, T, I> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T: ?Sized, I: ?Sized> Copy for LmHead<'_, T, I> {}

/// What [`Backend::logprobs`] writes per token: `logp`, `lse` (saved for the backward) and,
/// when given, `entropy`.
#[derive(Debug)]
pub struct LogprobsOut<'a, F: ?Sized> {
    pub logp: &'a mut F,
    pub lse: &'a mut F,
    pub entropy: Option<&'a mut F>,
}

/// The gradients [`Backend::logprobs_bwd`] writes: `dh` (overwritten) and `dw` (accumulated;
/// `None` skips it).
#[derive(Debug)]
pub struct LogprobsGrads<'a, T: ?Sized, F: ?Sized> {
    pub dh: &'a mut T,
    pub dw: Option<&'a mut F>,
}

/// What [`Backend::logprobs_bwd_kept`] reads from its forward: `lse` and the `logits` that
/// [`Backend::logprobs_keep`] kept.
#[derive(Debug)]
pub struct KeptLogits<'a, F: ?Sized> {
    pub lse: &'a F,
    pub logits: &'a F,
}

impl<F: ?Sized> Clone for KeptLogits<'_, F> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<F: ?Sized> Copy for KeptLogits<'_, F> {}

/// The per-token inputs of [`Backend::grpo_loss`]: `n_tok` tokens of `n_seq` sequences.
#[derive(Debug)]
pub struct GrpoTokens<'a, F: ?Sized, I: ?Sized> {
    pub logp: &'a F,
    pub old_logp: &'a F,
    pub ref_logp: &'a F,
    pub adv: &'a F,
    /// Token weights (0 excludes a token; usually 0/1).
    pub mask: &'a F,
    /// 0-based sequence index of every token, below `n_seq`.
    pub seq_id: &'a I,
    pub n_tok: usize,
    pub n_seq: usize,
}

impl<I> Packed<'_, I> {
    /// Number of tokens: the last offset (0 without offsets).
    pub fn n_tok(&self) -> usize {
        self.cu_host.last().copied().unwrap_or(0) as usize
    }
    /// Number of sequences.
    pub fn n_seq(&self) -> usize {
        self.cu_host.len().saturating_sub(1)
    }
}

/// A [`Backend::copy_rows`] block: `n` rows of `width` elements from row `src` to row `dst`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowCopy {
    pub src: usize,
    pub dst: usize,
    pub n: usize,
    pub width: usize,
}

/// The draws of one [`Backend::sample`] call: `offsets.len()` draws over logits of `n_rows`
/// rows of `vocab`; draw r reads row `src[r]` (< n_rows; row r when None, then n_rows >= the
/// number of draws) with the random stream (seed, offsets[r]).
#[derive(Clone, Copy, Debug)]
pub struct SampleRows<'a> {
    pub offsets: &'a [u64],
    pub src: Option<&'a [u32]>,
    pub n_rows: usize,
    pub vocab: usize,
}

impl<'a> SampleRows<'a> {
    /// Draw r from row r of [offsets.len(), vocab] logits.
    pub fn each(offsets: &'a [u64], vocab: usize) -> Self {
        SampleRows {
            offsets,
            src: None,
            n_rows: offsets.len(),
            vocab,
        }
    }
    /// Number of draws.
    pub fn draws(&self) -> usize {
        self.offsets.len()
    }
    /// The logits row of draw r.
    pub fn row(&self, r: usize) -> usize {
        self.src.map_or(r, |s| s[r] as usize)
    }
}

/// The shape of a [`Backend::sample_table`] call: `draws` draws from logits [n_rows, vocab].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SampleDims {
    pub draws: usize,
    pub n_rows: usize,
    pub vocab: usize,
}

/// The sampling settings of a [`Backend::sample`] call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SampleParams {
    /// 0 = greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// 0 = no top-k cut.
    pub top_k: usize,
    pub seed: u64,
}

/// The tensors one [`Backend::adamw`] step updates in place: the parameter, its f32 master
/// copy where `T` is narrower than f32 (None where `T` is f32), and the two moments.
#[derive(Debug)]
pub struct AdamWState<'a, T: ?Sized, F: ?Sized> {
    pub param: &'a mut T,
    pub master: Option<&'a mut F>,
    pub m: &'a mut F,
    pub v: &'a mut F,
}

/// Hyper-parameters of one AdamW update (already including the schedule's lr for this step).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// 1-based step count, for bias correction.
    pub step: u64,
    /// Multiplier applied to the gradient before the update (grad-norm clipping), 1.0 = none.
    pub grad_scale: f32,
}

/// How per-token GRPO losses are reduced to one scalar (verl's `loss_agg_mode`), over a whole
/// mini-batch whatever its micro-batch split (`loss::micro_batch_scale`). The Tool-N1 verl fork
/// instead takes each micro-batch's token mean and scales it by the micro-batch's share of the
/// mini-batch's sequences (`verl/workers/actor/dp_actor.py`, `update_policy`), which equals
/// this token mean only when every micro-batch has the same tokens per sequence. Leaving
/// zero-signal groups out (`grpo.skip_zero_adv_groups`, off by default) changes the token
/// mean's denominator and drops those groups' KL terms. Both in `docs/loss-aggregation.md`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LossAgg {
    /// sum over all masked tokens / their count (verl default, Tool-N1).
    TokenMean,
    /// mean over sequences of the per-sequence masked token sum.
    SeqMeanTokenSum,
    /// mean over sequences of the per-sequence masked token mean.
    SeqMeanTokenMean,
    /// Dr.GRPO (verl): sum over sequences of the masked token sums / norm_len (the horizon).
    SeqMeanTokenSumNorm,
}

impl LossAgg {
    /// Every mode, so that a loop over the modes cannot forget one.
    pub const ALL: [LossAgg; 4] = [
        LossAgg::TokenMean,
        LossAgg::SeqMeanTokenSum,
        LossAgg::SeqMeanTokenMean,
        LossAgg::SeqMeanTokenSumNorm,
    ];
}

/// KL estimator between policy and reference (the estimators of verl's `kl_penalty`,
/// `verl/trainer/ppo/core_algos.py`; k1, k2, k3 as in J. Schulman, "Approximating KL
/// Divergence", 2020).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KlKind {
    /// k1: logp - ref
    K1,
    /// abs(logp - ref)
    Abs,
    /// k2: 0.5 * (logp - ref)^2
    K2,
    /// k3, verl's "low_var_kl": exp(ref - logp) - (ref - logp) - 1, clamped.
    K3,
}

impl KlKind {
    /// Every estimator, so that a loop over them cannot forget one.
    pub const ALL: [KlKind; 4] = [KlKind::K1, KlKind::Abs, KlKind::K2, KlKind::K3];
}

/// Scalar settings of the GRPO loss.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GrpoLossCfg {
    pub clip_low: f32,
    pub clip_high: f32,
    pub kl_coef: f32,
    pub kl_kind: KlKind,
    pub agg: LossAgg,
    /// Only for `SeqMeanTokenSumNorm`: the constant length the token sums are divided by.
    pub norm_len: f32,
    /// Divide the final loss (and gradient) by this, e.g. number of micro-batches whose
    /// gradients are accumulated; 1.0 for none.
    pub loss_scale_div: f32,
}

/// Scalars returned by the GRPO loss (all already reduced with the masked token count).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct GrpoLossOut {
    /// pg_loss + kl_coef * kl (aggregated), divided by `loss_scale_div`.
    pub loss: f32,
    pub pg_loss: f32,
    /// Mean KL over masked tokens.
    pub kl: f32,
    /// Fraction of masked tokens where the clipped branch was taken.
    pub clip_frac: f32,
    /// Mean (ratio) over masked tokens.
    pub ratio_mean: f32,
    /// Number of masked tokens.
    pub n_tokens: f32,
}

/// The op set. `T` holds weights and activations (f32 on the CPU, bf16 on CUDA); `F` is always
/// f32 (parameter gradients, optimizer moments, logprobs, normalisation statistics); `I` holds
/// u32 indices (token ids, positions, sequence offsets).
/// Work captured by [`Backend::capture_begin`] .. [`Backend::capture_end`], replayed in the
/// order it was captured by each `launch`, reading and writing the buffers it was captured
/// with (it keeps those it allocated alive; the caller keeps the others alive and in place).
pub trait ReplayGraph {
    fn launch(&self) -> Result<()>;
    /// The graph as its backend's type (for [`Backend::capture_begin`]'s `share`).
    fn as_any(&self) -> &dyn std::any::Any;
}

pub trait Backend {
    type T;
    type F;
    type I;

    fn name(&self) -> String;

    // ---------------------------------------------------------------- memory
    /// A buffer of `n` zeros.
    fn zeros(&self, n: usize) -> Result<Self::T>;
    fn zeros_f32(&self, n: usize) -> Result<Self::F>;
    fn upload(&self, data: &[f32]) -> Result<Self::T>;
    fn upload_f32(&self, data: &[f32]) -> Result<Self::F>;
    fn upload_u32(&self, data: &[u32]) -> Result<Self::I>;
    /// A tensor from checkpoint bytes (`n` elements of `dtype`, little endian).
    fn upload_raw(&self, dtype: DType, bytes: &[u8], n: usize) -> Result<Self::T>;
    /// The first `n` elements as f32 on the host.
    fn download(&self, t: &Self::T, n: usize) -> Result<Vec<f32>>;
    fn download_f32(&self, t: &Self::F, n: usize) -> Result<Vec<f32>>;
    fn download_u32(&self, t: &Self::I, n: usize) -> Result<Vec<u32>>;
    /// dst[..n] = src[..n]
    fn copy(&self, src: &Self::T, dst: &mut Self::T, n: usize) -> Result<()>;
    /// dst[..n] = src[..n] (f32 buffers)
    fn copy_f32(&self, src: &Self::F, dst: &mut Self::F, n: usize) -> Result<()>;
    fn fill_f32(&self, t: &mut Self::F, n: usize, value: f32) -> Result<()>;
    /// Row block copy inside one buffer viewed as rows of `c.width` elements: rows
    /// c.dst..c.dst + c.n take the values of rows c.src..c.src + c.n (the two ranges must not
    /// overlap; c.n = 0 copies nothing). A rollout gives a prompt's cached keys/values to the
    /// KV-cache slots of its other samples with it.
    fn copy_rows(&self, t: &mut Self::T, c: RowCopy) -> Result<()>;
    /// `data` as host memory for repeated uploads: page-locked where the backend can (CUDA,
    /// when the driver grants it), else the vector itself (the CPU backend).
    fn host_buffer(&self, data: Vec<u8>) -> Result<Box<dyn HostMem>> {
        Ok(Box::new(data))
    }
    /// [`Backend::upload_raw`] of `src.bytes()[range]`, possibly asynchronous: the copy may run
    /// beside work already queued (CUDA: bf16 bytes from page-locked memory, on a copy stream
    /// that first waits for the work queued so far), and the tensor may be used only by work
    /// queued after the returned upload's [`PendingUpload::wait`]. `src` must outlive the copy.
    fn upload_raw_async(
        &self,
        dtype: DType,
        src: &dyn HostMem,
        range: std::ops::Range<usize>,
        n: usize,
    ) -> Result<(Self::T, PendingUpload)> {
        let bytes = src.bytes().get(range.clone()).ok_or_else(|| {
            crate::Error::Invalid(format!(
                "upload_raw_async: bytes {range:?} of a {}-byte host buffer",
                src.bytes().len()
            ))
        })?;
        Ok((self.upload_raw(dtype, bytes, n)?, PendingUpload::done()))
    }
    /// Wait for all queued work (no-op on the CPU).
    fn synchronize(&self) -> Result<()>;
    /// A phase of the step is over and the next one allocates buffers of other sizes: give
    /// cached free device memory back (CUDA: waits for the queued work, then frees the caching
    /// pool's unused blocks, as `torch.cuda.empty_cache()` between the rollout and training
    /// phases of verl's `fsdp_workers.py`). The trainers call it where they wait for the
    /// device anyway (after the rollout, and between a micro-batch's loss and its backward).
    /// No-op on the CPU.
    fn release_cached(&self) -> Result<()> {
        Ok(())
    }

    /// dst[..data.len()] = data, keeping dst's storage where the backend captures graphs (the
    /// inputs of a replayed graph are read at their captured addresses). The default replaces
    /// `*dst` with a new buffer holding `data`, enough for a backend that never captures.
    fn write_u32(&self, dst: &mut Self::I, data: &[u32]) -> Result<()> {
        *dst = self.upload_u32(data)?;
        Ok(())
    }
    /// dst[..n] = src[off..off + n] (u32 buffers). The default goes through the host and
    /// replaces `*dst` (see [`Backend::write_u32`]).
    fn copy_u32_at(&self, src: &Self::I, off: usize, dst: &mut Self::I, n: usize) -> Result<()> {
        let all = self.download_u32(src, off.saturating_add(n))?;
        self.write_u32(dst, &all[off..])
    }
    /// Starts capturing the work queued on this backend into a graph, replayed later by
    /// [`ReplayGraph::launch`] (CUDA: stream capture into a CUDA graph). `Ok(false)`: the
    /// backend has no graphs (the CPU) and nothing changed; the caller runs its work plainly.
    /// Between this and [`Backend::capture_end`] the work is recorded, not run: nothing may be
    /// downloaded or waited for, and host data may reach the device only through buffers
    /// written before the capture (or before each replay, with [`Backend::write_u32`]).
    /// `share`: allocate the captured work's buffers from the memory of that live graph (CUDA:
    /// its private arena, as PyTorch's shared graph pools), reusing what its capture freed; the
    /// two graphs' replays must then not overlap, and a buffer allocated inside one may be
    /// overwritten by a replay of the other (read a replay's outputs before the next replay).
    fn capture_begin(&self, share: Option<&dyn ReplayGraph>) -> Result<bool> {
        let _ = share;
        Ok(false)
    }
    /// Ends the capture begun by [`Backend::capture_begin`] (always: also when it fails) and
    /// returns the graph; an error when the capture was refused or invalidated.
    fn capture_end(&self) -> Result<Box<dyn ReplayGraph>> {
        Err(crate::Error::Invalid(format!(
            "capture_end: the {} backend has no graphs",
            self.name()
        )))
    }
    // ------------------------------------------ asynchronous copies through host f32 buffers
    /// `n` zeros in host f32 memory: page-locked where the backend can (CUDA, when the driver
    /// grants it; else, said once on stderr, pageable memory with synchronous copies), plain
    /// memory on the CPU backend.
    fn host_f32(&self, n: usize) -> Result<HostF32> {
        Ok(HostF32::pageable(vec![0.0; n]))
    }
    /// The first `n` values of each `(tensor, n)` of `src`, one after another from `dst[0]`,
    /// possibly asynchronous: the copies run after the work queued so far (CUDA: into
    /// page-locked `dst`, on a copy stream that first waits for an event of the compute stream)
    /// and the values are in the buffer [`HostCopy::wait`] returns. Errors when `dst` holds
    /// fewer values than the sum of the `n`s or a tensor fewer than its `n`. Synchronous by
    /// default.
    fn download_f32_async(&self, src: &[(&Self::F, usize)], mut dst: HostF32) -> Result<HostCopy> {
        let total = host_copy_len("download_f32_async", src.iter().map(|s| s.1), dst.len())?;
        let mut at = 0;
        for &(t, n) in src {
            let v = self.download_f32(t, n)?;
            dst[at..at + n].copy_from_slice(&v);
            at += n;
        }
        debug_assert_eq!(at, total);
        Ok(HostCopy::done(dst))
    }
    /// [`Backend::upload`] of each slice of `src` through the host buffer `stage` (at least the
    /// sum of their lengths in values; the backend writes its device format of `src` into it:
    /// bf16 bits on CUDA), possibly asynchronous: the copies run after the work queued so far
    /// (CUDA: from page-locked `stage`, on the copy stream) and the tensors may be used only by
    /// work queued after the returned copy's [`HostCopy::order`] or [`HostCopy::wait`]; `wait`
    /// gives `stage` back. Synchronous by default.
    fn upload_async(&self, src: &[&[f32]], stage: HostF32) -> Result<(Vec<Self::T>, HostCopy)> {
        host_copy_len("upload_async", src.iter().map(|s| s.len()), stage.len())?;
        let ts = src.iter().map(|s| self.upload(s)).collect::<Result<_>>()?;
        Ok((ts, HostCopy::done(stage)))
    }

    // ---------------------------------------------------------------- elementwise
    /// a[..n] += b[..n]
    fn add_inplace(&self, a: &mut Self::T, b: &Self::T, n: usize) -> Result<()>;
    /// sum of squares of t[..n], in f64 on the host (for the global grad norm).
    fn sum_squares_f32(&self, t: &Self::F, n: usize) -> Result<f64>;

    // ---------------------------------------------------------------- GEMM
    /// y[m,n] = x[m,k] · w[n,k]ᵀ (+ bias[n])
    fn linear(
        &self,
        x: &Self::T,
        w: &Self::T,
        bias: Option<&Self::T>,
        y: &mut Self::T,
        d: GemmDims,
    ) -> Result<()>;
    /// Backward of [`Backend::linear`]:
    /// dx[m,k] (=, or += when `accumulate_dx`) dy[m,n] · w[n,k];
    /// dw[n,k] += dy[m,n]ᵀ · x[m,k]; dbias[n] += Σ_m dy[m,n].
    /// `dx = None` skips the input gradient, `dw = None` the weight gradient.
    fn linear_bwd(
        &self,
        dy: &Self::T,
        x: &Self::T,
        w: &Self::T,
        grads: LinearGrads<'_, Self::T, Self::F>,
        d: GemmDims,
    ) -> Result<()>;

    // ---------------------------------------------------------------- embedding
    /// out[t,:] = table[ids[t],:] for t < n_tok; table is [vocab, dim].
    fn embedding(
        &self,
        ids: &Self::I,
        table: &Self::T,
        out: &mut Self::T,
        n_tok: usize,
        dim: usize,
    ) -> Result<()>;
    /// dtable[ids[t],:] += dout[t,:]
    fn embedding_bwd(
        &self,
        ids: &Self::I,
        dout: &Self::T,
        dtable: &mut Self::F,
        n_tok: usize,
        dim: usize,
    ) -> Result<()>;

    /// dst[ids[t],:] += src[t,:] for t < n, activations in `T` (the backward of a row gather
    /// done with [`Backend::embedding`] on activations); `dst_rows` rows of `dim` in dst. A
    /// repeated id sums its rows in increasing t, so the result is deterministic.
    fn scatter_add_rows(
        &self,
        ids: &Self::I,
        src: &Self::T,
        dst: &mut Self::T,
        n: usize,
        dst_rows: usize,
        dim: usize,
    ) -> Result<()>;

    // ---------------------------------------------------------------- RMSNorm
    /// out[r,:] = x[r,:] * rstd[r] * w over `d.rows` rows of `d.dim`,
    /// rstd[r] = 1/sqrt(mean(x[r,:]²) + eps). `rstd` is saved for the backward (f32, one per
    /// row).
    fn rmsnorm(
        &self,
        x: &Self::T,
        w: &Self::T,
        out: &mut Self::T,
        rstd: &mut Self::F,
        d: NormDims,
        eps: f32,
    ) -> Result<()>;
    /// The residual add fused into the norm that reads it: x[r,:] += delta[r,:] in place (the
    /// bits of [`Backend::add_inplace`]: an f32 sum, rounded to bf16 on CUDA), then
    /// [`Backend::rmsnorm`] of the new x into `y.out` and `y.rstd` (the same bits as that op on
    /// the updated x). One pass over the rows instead of two; the backward is
    /// [`Backend::rmsnorm_bwd`] with the updated x (the add's gradient is the identity, which
    /// `rmsnorm_bwd`'s accumulating dx already is). `x` and `delta` are [rows, dim].
    fn add_rmsnorm(
        &self,
        x: &mut Self::T,
        delta: &Self::T,
        w: &Self::T,
        y: NormOut<'_, Self::T, Self::F>,
        d: NormDims,
        eps: f32,
    ) -> Result<()>;
    /// grads.dx[r,:] += ∂L/∂x (accumulates: it is added to the residual stream's gradient);
    /// grads.dw += Σ_r dout[r,:] * x[r,:] * rstd[r].
    fn rmsnorm_bwd(
        &self,
        dout: &Self::T,
        x: &Self::T,
        w: &Self::T,
        rstd: &Self::F,
        grads: NormGrads<'_, Self::T, Self::F>,
        d: NormDims,
    ) -> Result<()>;

    // ---------------------------------------------------------------- RoPE
    /// In-place rotary embedding, half-split layout (HF `rotate_half`), on x viewed as
    /// [n_tok, n_heads, head_dim], token t at position pos[t]:
    /// inv_freq_i = theta^(-2i/head_dim), angle = pos * inv_freq_i, for i < head_dim/2:
    /// (x_i, x_{i+h/2}) <- (x_i cos - x_{i+h/2} sin, x_{i+h/2} cos + x_i sin).
    /// head_dim must be even and positive, theta finite and positive.
    fn rope(
        &self,
        x: &mut Self::T,
        pos: &Self::I,
        n_tok: usize,
        n_heads: usize,
        head_dim: usize,
        theta: f32,
    ) -> Result<()>;
    /// Backward of [`Backend::rope`], in place on the gradient (the inverse rotation).
    fn rope_bwd(
        &self,
        dx: &mut Self::T,
        pos: &Self::I,
        n_tok: usize,
        n_heads: usize,
        head_dim: usize,
        theta: f32,
    ) -> Result<()>;

    // ---------------------------------------------------------------- attention
    /// Causal GQA attention over the packed sequences `seqs` (n_tok = `seqs.n_tok()`).
    /// q: [n_tok, n_heads, head_dim]; k, v: [n_tok, n_kv, head_dim]; out like q;
    /// lse: [n_heads, n_tok] f32 logsumexp of the scaled scores (saved for the backward).
    /// Scale = 1/sqrt(head_dim). Query head h reads kv head h / (n_heads/n_kv).
    fn attention(
        &self,
        qkv: Qkv<'_, Self::T>,
        out: &mut Self::T,
        lse: &mut Self::F,
        seqs: &Packed<'_, Self::I>,
        heads: Heads,
    ) -> Result<()>;
    /// Backward of [`Backend::attention`] from `saved` (dout, and out, lse of the forward):
    /// writes (overwrites) dq, dk, dv.
    fn attention_bwd(
        &self,
        qkv: Qkv<'_, Self::T>,
        saved: AttnSaved<'_, Self::T, Self::F>,
        grads: AttnGrads<'_, Self::T>,
        seqs: &Packed<'_, Self::I>,
        heads: Heads,
    ) -> Result<()>;

    /// [`Backend::attention`] in the shared-prefix layout (Prefix Grouper, arXiv 2506.05433):
    /// query i of segment s (rows cu[s]..cu[s+1]) attends to every key of rows
    /// prefix[2s]..prefix[2s+1] and causally to the keys cu[s]..=i of its own segment. A GRPO
    /// group is packed as its prompt (no prefix) followed by its n responses, each with the
    /// prompt's rows as prefix, so a response never reads a sibling. The table holds 2 entries
    /// per segment, lo == hi for none, and needs lo <= hi <= cu[s] (a prefix lies before its
    /// segment); `seqs.max_len` bounds the segments and the prefixes. Empty segments are
    /// allowed. With every prefix empty this is [`Backend::attention`].
    fn attention_prefixed(
        &self,
        qkv: Qkv<'_, Self::T>,
        out: &mut Self::T,
        lse: &mut Self::F,
        seqs: &Packed<'_, Self::I>,
        prefix: &Prefix<'_, Self::I>,
        heads: Heads,
    ) -> Result<()>;
    /// Backward of [`Backend::attention_prefixed`]: writes (overwrites) dq, dk, dv; a prefix
    /// key's dk/dv sum the contributions of every segment that reads it.
    fn attention_prefixed_bwd(
        &self,
        qkv: Qkv<'_, Self::T>,
        saved: AttnSaved<'_, Self::T, Self::F>,
        grads: AttnGrads<'_, Self::T>,
        seqs: &Packed<'_, Self::I>,
        prefix: &Prefix<'_, Self::I>,
        heads: Heads,
    ) -> Result<()>;

    /// Write new keys/values into the KV cache: row t < rows.n_tok of k/v
    /// ([n_tok, kv_dim], kv_dim = n_kv*head_dim) goes to cache row dst[t] of k_cache/v_cache
    /// ([cache rows, kv_dim]); for a paged cache (see [`Cached`]) the caller computes dst[t] =
    /// table[position / block_size] * block_size + position % block_size. A dst row outside
    /// the cache is an error (on the device, reported at the next synchronisation).
    fn kv_store(
        &self,
        k: &Self::T,
        v: &Self::T,
        dst: &Self::I,
        k_cache: &mut Self::T,
        v_cache: &mut Self::T,
        rows: KvRows,
    ) -> Result<()>;
    /// Decode attention: one query token per sequence b < n_seq against its first lens[b]
    /// cached positions, read through the block table of `cached` (see [`Cached`]; the new
    /// token's k/v already stored). q/out: [n_seq, n_heads*head_dim]; caches: [n_blocks *
    /// block_size, n_kv*head_dim] (their length a positive multiple of block_size * kv_dim).
    /// Every lens[b] must be in 1..=max_blocks * block_size and every block id read below
    /// n_blocks (errors; where `lens`/`table` live on the device they are reported at the
    /// next synchronisation and the sequence's output row is NaN). A sequence's output depends
    /// only on its own query, length and cached rows: not on the block layout, the batch or
    /// the other sequences (the CUDA backend's split count is a function of lens[b] alone).
    fn attention_decode(
        &self,
        q: &Self::T,
        k_cache: &Self::T,
        v_cache: &Self::T,
        cached: &Cached<'_, Self::I>,
        out: &mut Self::T,
        heads: Heads,
    ) -> Result<()>;

    // ---------------------------------------------------------------- MLP
    /// out = silu(gate) * up, n elements.
    fn swiglu(&self, gate: &Self::T, up: &Self::T, out: &mut Self::T, n: usize) -> Result<()>;
    /// dgate, dup (overwritten) from dout.
    fn swiglu_bwd(
        &self,
        dout: &Self::T,
        gate: &Self::T,
        up: &Self::T,
        dgate: &mut Self::T,
        dup: &mut Self::T,
        n: usize,
    ) -> Result<()>;

    // ---------------------------------------------------------------- vocabulary
    /// Fused lm_head + log-softmax + gather at inverse temperature `inv_t`, never materialising
    /// [n_tok, vocab]: with (h, w, targets) = `head`, logits[t,v] = (h[t,:]·w[v,:]) · inv_t
    /// (the product scaled in the tile); lse[t] = logsumexp_v logits[t,v];
    /// logp[t] = logits[t, targets[t]] - lse[t]. Optionally the entropy of that softmax per
    /// token. `inv_t` must be finite and > 0; at exactly 1 the scaling is skipped (the plain
    /// log-softmax, bit for bit).
    fn logprobs(
        &self,
        head: LmHead<'_, Self::T, Self::I>,
        out: LogprobsOut<'_, Self::F>,
        d: VocabDims,
        inv_t: f32,
    ) -> Result<()>;
    /// Backward of [`Backend::logprobs`] (same `head` and `inv_t`, `lse` from that forward) for
    /// an upstream gradient dlogp[t], with respect to the unscaled product z = h·wᵀ:
    /// dz[t,v] = inv_t * dlogp[t] * (1[v = target] - softmax(z·inv_t)[t,v]);
    /// dh (overwritten) = dz · w; dw += dzᵀ · h (skipped when None).
    fn logprobs_bwd(
        &self,
        dlogp: &Self::F,
        head: LmHead<'_, Self::T, Self::I>,
        lse: &Self::F,
        grads: LogprobsGrads<'_, Self::T, Self::F>,
        d: VocabDims,
        inv_t: f32,
    ) -> Result<()>;
    /// Whether [`Backend::logprobs_keep`] keeps the logits (else it is [`Backend::logprobs`] and
    /// [`Backend::logprobs_bwd_kept`] recomputes them). False by default.
    fn keeps_logits(&self) -> bool {
        false
    }
    /// [`Backend::logprobs`], also writing the scaled logits z·inv_t of every row into `kept`
    /// (n_tok * vocab f32 entries, in an order of the backend's choosing) for
    /// [`Backend::logprobs_bwd_kept`], which then skips recomputing them: trades that buffer for
    /// a quarter of the lm_head's training FLOPs. The default ignores `kept`.
    fn logprobs_keep(
        &self,
        head: LmHead<'_, Self::T, Self::I>,
        out: LogprobsOut<'_, Self::F>,
        d: VocabDims,
        inv_t: f32,
        kept: &mut Self::F,
    ) -> Result<()> {
        let _ = kept;
        self.logprobs(head, out, d, inv_t)
    }
    /// [`Backend::logprobs_bwd`] reading the logits [`Backend::logprobs_keep`] wrote into
    /// `saved.logits` (same `head`, `d` and `inv_t`; `saved.lse` from the same call) instead of
    /// recomputing them; the same result bit
    /// for bit. The default recomputes.
    fn logprobs_bwd_kept(
        &self,
        dlogp: &Self::F,
        head: LmHead<'_, Self::T, Self::I>,
        saved: KeptLogits<'_, Self::F>,
        grads: LogprobsGrads<'_, Self::T, Self::F>,
        d: VocabDims,
        inv_t: f32,
    ) -> Result<()> {
        self.logprobs_bwd(dlogp, head, saved.lse, grads, d, inv_t)
    }
    /// Full f32 logits for a few rows (sampling at decode time): out[r,v] = h[r,:]·w[v,:] for
    /// r < d.n_tok.
    fn logits(&self, h: &Self::T, w: &Self::T, out: &mut Self::F, d: VocabDims) -> Result<()>;
    /// Sample one token per draw from f32 logits [`rows.n_rows`, vocab]: draw r reads logits row
    /// `rows.src[r]` (row r when `src` is None) and writes out[r]; greedy when temperature == 0,
    /// else softmax(logits / temperature) restricted to the smallest top-p nucleus (top_k = 0
    /// means no top-k cut; top_k >= vocab likewise; top_p = 0 keeps the single most likely
    /// token). Draw r uses the counter-based random stream (seed, `rows.offsets[r]`), so its token
    /// depends only on its logits row and its offset, not on the other draws of the call (a
    /// rollout keys the offset by sequence and position). Logits must be finite or -inf, and not
    /// all -inf when temperature > 0: anything else is an error (on a device, reported at the
    /// next synchronisation, the draw's output left unwritten).
    fn sample(
        &self,
        logits: &Self::F,
        out: &mut Self::I,
        rows: &SampleRows<'_>,
        p: &SampleParams,
    ) -> Result<()>;
    /// [`Backend::sample`] with the draws' table in a backend buffer, for work that writes the
    /// table without the host (the inputs of a replayed graph): `table` [3 * draws] u32, per
    /// draw its logits row, then the low and the high word of its stream offset. A row id not
    /// below `d.n_rows` is an error (checked where the table is read: on the host by this
    /// default, on the device by CUDA's kernel, whose flag is checked at the next download).
    /// Same draws as `sample` with those rows (`SampleRows::src`) and offsets. The default
    /// downloads the table and calls `sample`.
    fn sample_table(
        &self,
        logits: &Self::F,
        out: &mut Self::I,
        table: &Self::I,
        d: SampleDims,
        p: &SampleParams,
    ) -> Result<()> {
        let n = d.draws.checked_mul(3).ok_or_else(|| {
            check::arg_error(
                "sample_table",
                "draws",
                "3 * draws to fit in usize",
                d.draws,
            )
        })?;
        let t = self.download_u32(table, n)?;
        let src: Vec<u32> = t.chunks_exact(3).map(|e| e[0]).collect();
        let offsets: Vec<u64> = t
            .chunks_exact(3)
            .map(|e| e[1] as u64 | (e[2] as u64) << 32)
            .collect();
        let rows = SampleRows {
            offsets: &offsets,
            src: Some(&src),
            n_rows: d.n_rows,
            vocab: d.vocab,
        };
        self.sample(logits, out, &rows, p)
    }

    // ---------------------------------------------------------------- RL loss and optimiser
    /// GRPO clipped surrogate + KL per token and its reduction (verl's `compute_policy_loss`,
    /// `kl_penalty` and `agg_loss` in `verl/trainer/ppo/core_algos.py`).
    /// Per token t with mask[t] != 0: r = exp(clamp(logp - old, -20, 20));
    /// pg = max(-A r, -A clip(r, 1-clip_low, 1+clip_high)); kl per `cfg.kl_kind`;
    /// token loss = pg + kl_coef * kl, aggregated per `cfg.agg` using `seq_id[t]` (0-based
    /// sequence index, n_seq sequences). Writes dlogp[t] = ∂loss/∂logp[t] (0 where masked out).
    fn grpo_loss(
        &self,
        tokens: &GrpoTokens<'_, Self::F, Self::I>,
        dlogp: &mut Self::F,
        cfg: &GrpoLossCfg,
    ) -> Result<GrpoLossOut>;
    /// One AdamW step on n elements of `state` (decoupled weight decay, bias-corrected
    /// moments): g = grad * grad_scale; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g²;
    /// p -= lr * (m/(1-b1^t) / (sqrt(v/(1-b2^t)) + eps) + wd * p).
    /// `state.master` is an f32 copy of the parameter used where `T` is narrower than f32 (the
    /// update is applied to the master and rounded into `param`); None where `T` is f32.
    fn adamw(
        &self,
        state: AdamWState<'_, Self::T, Self::F>,
        grad: &Self::F,
        n: usize,
        hp: &AdamWStep,
    ) -> Result<()>;
    /// Whether `adamw` needs an f32 master copy (true where `T` is narrower than f32).
    fn needs_master(&self) -> bool;
}

/// For a checked prefix table: per segment b, the non-empty segments whose prefix range
/// overlaps b's rows, in increasing order, as CSR (n_seg + 1 offsets, indices).
pub(crate) fn prefix_readers(prefix: &[u32], cu: &[u32]) -> (Vec<u32>, Vec<u32>) {
    let n_seg = cu.len().saturating_sub(1);
    let mut off = Vec::with_capacity(n_seg + 1);
    let mut idx = Vec::new();
    off.push(0);
    for b in 0..n_seg {
        let (s, e) = (cu[b], cu[b + 1]);
        for r in 0..n_seg {
            let (lo, hi) = (prefix[2 * r], prefix[2 * r + 1]);
            if lo < e && s < hi && cu[r] < cu[r + 1] {
                idx.push(r as u32);
            }
        }
        off.push(idx.len() as u32);
    }
    (off, idx)
}
