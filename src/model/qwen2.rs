//! The Qwen2 layer schedule, written once over [`Backend`].
//!
//! Per layer: RMSNorm -> q/k/v (with bias) -> RoPE -> causal GQA attention -> o_proj ->
//! residual add -> RMSNorm -> SwiGLU MLP -> residual add; then the final RMSNorm and the fused
//! lm_head + log-softmax + gather.

use crate::backend::Backend;
use crate::model::{ParamLayout, Qwen2Config};
use crate::{Error, Result};

/// A host-side batch of sequences packed for a teacher-forced pass. Position `t` predicts
/// `targets[t]` from `tokens[..=t]` of its own sequence.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PackedBatch {
    pub tokens: Vec<u32>,
    pub targets: Vec<u32>,
    /// n_seq + 1 offsets into `tokens`.
    pub cu_seqlens: Vec<u32>,
    /// Position of each token inside its sequence (0-based).
    pub positions: Vec<u32>,
}

impl PackedBatch {
    /// Pack whole sequences: sequence `s` of length L contributes L-1 positions, inputs
    /// `s[..L-1]` and targets `s[1..]`. Sequences shorter than 2 tokens are an error.
    pub fn from_sequences(seqs: &[Vec<u32>]) -> Result<Self> {
        let mut b = PackedBatch {
            cu_seqlens: vec![0],
            ..Default::default()
        };
        for (i, s) in seqs.iter().enumerate() {
            if s.len() < 2 {
                return Err(Error::Invalid(format!(
                    "sequence {i} has {} tokens; a teacher-forced pass needs at least 2",
                    s.len()
                )));
            }
            b.tokens.extend_from_slice(&s[..s.len() - 1]);
            b.targets.extend_from_slice(&s[1..]);
            b.positions.extend(0..(s.len() - 1) as u32);
            b.cu_seqlens.push(b.tokens.len() as u32);
        }
        Ok(b)
    }

    pub fn n_tok(&self) -> usize {
        self.tokens.len()
    }

    pub fn n_seq(&self) -> usize {
        self.cu_seqlens.len().saturating_sub(1)
    }

    pub fn max_len(&self) -> usize {
        self.cu_seqlens
            .windows(2)
            .map(|w| (w[1] - w[0]) as usize)
            .max()
            .unwrap_or(0)
    }
}

/// A [`PackedBatch`] on the backend.
pub struct DeviceBatch<B: Backend> {
    pub tokens: B::I,
    pub targets: B::I,
    pub cu_seqlens: B::I,
    pub positions: B::I,
    pub cu_host: Vec<u32>,
    pub n_tok: usize,
    pub max_len: usize,
}

/// A Qwen2 model whose parameters live on backend `B`, indexed by [`ParamLayout`].
pub struct Model<B: Backend> {
    pub cfg: Qwen2Config,
    pub layout: ParamLayout,
    pub params: Vec<B::T>,
}

/// What a training forward keeps for the backward: per-token logprobs (and entropy when asked
/// for) plus the saved activations, or only each layer's input when recomputing.
pub struct Tape<B: Backend> {
    /// log p(target_t | prefix), f32, n_tok entries.
    pub logp: B::F,
    pub entropy: Option<B::F>,
    pub n_tok: usize,
    #[allow(dead_code)]
    saved: Vec<B::T>,
    #[allow(dead_code)]
    saved_f32: Vec<B::F>,
    #[allow(dead_code)]
    recompute: bool,
}

/// Per-layer key/value cache for `slots` sequences of at most `max_len` tokens.
pub struct KvCache<B: Backend> {
    pub k: Vec<B::T>,
    pub v: Vec<B::T>,
    /// Tokens cached so far per slot.
    pub lens: Vec<u32>,
    pub slots: usize,
    pub max_len: usize,
}

impl<B: Backend> Model<B> {
    /// Wrap parameters already on the backend; checks their count against the layout.
    pub fn new(cfg: Qwen2Config, params: Vec<B::T>) -> Result<Self> {
        let layout = ParamLayout::new(&cfg);
        if params.len() != layout.specs.len() {
            return Err(Error::Invalid(format!(
                "model has {} parameter tensors, the config's layout expects {}",
                params.len(),
                layout.specs.len()
            )));
        }
        Ok(Model {
            cfg,
            layout,
            params,
        })
    }

    /// Upload parameters given as host f32 vectors in layout order.
    pub fn from_host(b: &B, cfg: Qwen2Config, host: &[Vec<f32>]) -> Result<Self> {
        let params = host
            .iter()
            .map(|p| b.upload(p))
            .collect::<Result<Vec<_>>>()?;
        Self::new(cfg, params)
    }

    /// Parameters as host f32 vectors in layout order.
    pub fn to_host(&self, b: &B) -> Result<Vec<Vec<f32>>> {
        self.layout
            .specs
            .iter()
            .zip(&self.params)
            .map(|(s, p)| b.download(p, s.numel()))
            .collect()
    }

    /// One zeroed f32 gradient buffer per parameter.
    pub fn zero_grads(&self, b: &B) -> Result<Vec<B::F>> {
        self.layout
            .specs
            .iter()
            .map(|s| b.zeros_f32(s.numel()))
            .collect()
    }

    pub fn upload_batch(&self, b: &B, batch: &PackedBatch) -> Result<DeviceBatch<B>> {
        let _ = (b, batch);
        Err(Error::msg("Model::upload_batch: not implemented yet"))
    }

    /// Teacher-forced log-probabilities without gradient (old/reference logprobs, eval).
    /// Returns per-token logprobs and, when `entropy`, per-token entropies (host vectors).
    pub fn logprobs(
        &self,
        b: &B,
        batch: &DeviceBatch<B>,
        entropy: bool,
    ) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
        let _ = (b, batch, entropy);
        Err(Error::msg("Model::logprobs: not implemented yet"))
    }

    /// Full f32 logits [n_tok, vocab] of a teacher-forced pass (tests, small vocabularies).
    pub fn forward_logits(&self, b: &B, batch: &DeviceBatch<B>) -> Result<Vec<f32>> {
        let _ = (b, batch);
        Err(Error::msg("Model::forward_logits: not implemented yet"))
    }

    /// Training forward: keeps what the backward needs (everything, or only the layer inputs
    /// when `recompute`, in which case each layer is recomputed during the backward).
    pub fn forward_train(
        &self,
        b: &B,
        batch: &DeviceBatch<B>,
        entropy: bool,
        recompute: bool,
    ) -> Result<Tape<B>> {
        let _ = (b, batch, entropy, recompute);
        Err(Error::msg("Model::forward_train: not implemented yet"))
    }

    /// Backward from dL/dlogp (n_tok f32 entries on the backend); accumulates (+=) into
    /// `grads` (one per parameter, as from [`Model::zero_grads`]).
    pub fn backward(
        &self,
        b: &B,
        batch: &DeviceBatch<B>,
        tape: Tape<B>,
        dlogp: &B::F,
        grads: &mut [B::F],
    ) -> Result<()> {
        let _ = (b, batch, tape, dlogp, grads);
        Err(Error::msg("Model::backward: not implemented yet"))
    }

    pub fn new_cache(&self, b: &B, slots: usize, max_len: usize) -> Result<KvCache<B>> {
        let _ = (b, slots, max_len);
        Err(Error::msg("Model::new_cache: not implemented yet"))
    }

    /// Prefill slot i with prompts[i] (slots.len() == prompts.len() <= cache.slots); returns f32
    /// logits [prompts.len(), vocab] of each prompt's last token.
    pub fn prefill(&self, b: &B, cache: &mut KvCache<B>, prompts: &[Vec<u32>]) -> Result<B::F> {
        let _ = (b, cache, prompts);
        Err(Error::msg("Model::prefill: not implemented yet"))
    }

    /// Append tokens[i] to slot i at position cache.lens[i] for every slot (a finished slot
    /// may be fed any token; its output is ignored by the caller); returns f32 logits
    /// [slots, vocab].
    pub fn decode(&self, b: &B, cache: &mut KvCache<B>, tokens: &[u32]) -> Result<B::F> {
        let _ = (b, cache, tokens);
        Err(Error::msg("Model::decode: not implemented yet"))
    }
}
