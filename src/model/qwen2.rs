//! The Qwen2 layer schedule, written once over [`Backend`].
//!
//! Per layer: RMSNorm -> q/k/v (with bias) -> RoPE -> causal GQA attention -> o_proj ->
//! residual add -> RMSNorm -> SwiGLU MLP -> residual add; then the final RMSNorm and the fused
//! lm_head + log-softmax + gather.

use crate::backend::{
    AttnGrads, AttnSaved, Backend, Cached, GemmDims, Heads, KeptLogits, KvRows, LinearGrads,
    LmHead, LogprobsGrads, LogprobsOut, NormDims, NormGrads, NormOut, Packed, Prefix, Qkv,
    VocabDims,
};
use crate::model::grad_sink::GradSink;
use crate::model::kv_cache::{KvCache, KvShape, DEFAULT_BLOCK_SIZE};
use crate::model::stream::HostLayers;
use crate::model::{ParamLayout, Qwen2Config};
use crate::{Error, Result};

/// A host-side batch of sequences packed for a teacher-forced pass. Position `t` predicts
/// `targets[t]` from `tokens[..=t]` of its own sequence (segment), plus, in the shared-prompt
/// layout, the rows of its segment's prefix.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PackedBatch {
    pub tokens: Vec<u32>,
    /// One per token, or, when `logit_rows` is set, one per entry of `logit_rows`.
    pub targets: Vec<u32>,
    /// n_seq + 1 offsets into `tokens`.
    pub cu_seqlens: Vec<u32>,
    /// RoPE position of each token (0-based inside its sequence; a response segment of the
    /// shared layout continues from its prompt's length).
    pub positions: Vec<u32>,
    /// Shared-prefix table (see [`crate::backend::Backend::attention_prefixed`]): 2 entries per
    /// segment, the rows it attends to fully before its own causal keys. Empty = plain packed
    /// sequences.
    pub prefix: Vec<u32>,
    /// The rows whose logprob is taken, in output order (a row may repeat: in the shared layout
    /// a prompt's last row predicts each response's first token); `targets[i]` is the target of
    /// row `logit_rows[i]`. Empty = every row. The lm_head and log-softmax run on these rows
    /// only.
    pub logit_rows: Vec<u32>,
}

/// A GRPO group for [`PackedBatch::shared_groups`]: one prompt and its sampled responses.
#[derive(Clone, Copy, Debug)]
pub struct Group<'a> {
    pub prompt: &'a [u32],
    pub responses: &'a [&'a [u32]],
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

    /// Pack whole sequences like [`PackedBatch::from_sequences`], but take logprobs only at
    /// the positions whose target lies at or after `starts[i]` in sequence i (the response or
    /// assistant tokens): position t of sequence i is a logit row when t + 1 >= starts[i].
    /// `starts[i]` must be in 1..len (at least one target).
    pub fn from_sequences_from(seqs: &[Vec<u32>], starts: &[usize]) -> Result<Self> {
        if starts.len() != seqs.len() {
            return Err(Error::Invalid(format!(
                "from_sequences_from: {} sequences but {} start offsets",
                seqs.len(),
                starts.len()
            )));
        }
        let mut b = Self::from_sequences(seqs)?;
        let mut targets = Vec::new();
        for (i, (s, &st)) in seqs.iter().zip(starts).enumerate() {
            if st == 0 || st >= s.len() {
                return Err(Error::Invalid(format!(
                    "sequence {i}: target start {st} must be in 1..{} (at least one target)",
                    s.len()
                )));
            }
            let base = b.cu_seqlens[i];
            for t in st - 1..s.len() - 1 {
                b.logit_rows.push(base + t as u32);
                targets.push(s[t + 1]);
            }
        }
        b.targets = targets;
        Ok(b)
    }

    /// Pack GRPO groups in the shared-prompt layout (Prefix Grouper, arXiv 2506.05433): per
    /// group a prompt segment (all its tokens, positions 0..p) followed by one segment per
    /// response holding its tokens but the last (positions p.., the prompt as prefix). The
    /// logit rows are, per response in order, the prompt's last row (predicting the response's
    /// first token) and then the response segment's rows, so the logprobs come out response by
    /// response, one per response token, exactly those of the per-sequence pass over
    /// prompt + response. Prompts and responses must be non-empty.
    pub fn shared_groups(groups: &[Group<'_>]) -> Result<Self> {
        let mut b = PackedBatch {
            cu_seqlens: vec![0],
            ..Default::default()
        };
        for (gi, g) in groups.iter().enumerate() {
            if g.prompt.is_empty() || g.responses.is_empty() {
                return Err(Error::Invalid(format!(
                    "group {gi}: {} prompt tokens and {} responses; expected at least one of each",
                    g.prompt.len(),
                    g.responses.len()
                )));
            }
            let p0 = b.tokens.len() as u32;
            let p = g.prompt.len() as u32;
            b.tokens.extend_from_slice(g.prompt);
            b.positions.extend(0..p);
            b.cu_seqlens.push(p0 + p);
            b.prefix.extend([p0, p0]);
            for (ri, r) in g.responses.iter().enumerate() {
                if r.is_empty() {
                    return Err(Error::Invalid(format!(
                        "group {gi}: response {ri} is empty"
                    )));
                }
                let s0 = b.tokens.len() as u32;
                b.logit_rows.push(p0 + p - 1);
                b.targets.push(r[0]);
                for (t, &tok) in r[..r.len() - 1].iter().enumerate() {
                    b.tokens.push(tok);
                    b.positions.push(p + t as u32);
                    b.logit_rows.push(s0 + t as u32);
                    b.targets.push(r[t + 1]);
                }
                b.cu_seqlens.push(b.tokens.len() as u32);
                b.prefix.extend([p0, p0 + p]);
            }
        }
        Ok(b)
    }

    pub fn n_tok(&self) -> usize {
        self.tokens.len()
    }

    /// Rows whose logprob is taken (`logit_rows.len()`, or every token when that is empty).
    pub fn n_logits(&self) -> usize {
        if self.logit_rows.is_empty() {
            self.tokens.len()
        } else {
            self.logit_rows.len()
        }
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
    /// The shared-prefix table (device, host), when the batch has one.
    pub prefix: Option<(B::I, Vec<u32>)>,
    /// The logit rows, when not every row.
    pub logit_rows: Option<B::I>,
    /// Logprob entries of a pass (`PackedBatch::n_logits`).
    pub n_logits: usize,
}

impl<B: Backend> DeviceBatch<B> {
    /// The batch's sequences as the attention ops take them.
    pub fn seqs(&self) -> Packed<'_, B::I> {
        Packed {
            cu_seqlens: &self.cu_seqlens,
            cu_host: &self.cu_host,
            max_len: self.max_len,
        }
    }

    /// The batch's shared-prefix table as the attention ops take it, when it has one.
    pub fn prefix(&self) -> Option<Prefix<'_, B::I>> {
        self.prefix.as_ref().map(|(d, h)| Prefix {
            prefix: d,
            prefix_host: h,
        })
    }
}

/// Tensors of one decoder layer ([`crate::model::LayerParams::all`]).
const LAYER_TENSORS: usize = 12;

/// What one decoder layer's forward reads: the layer's index, its twelve weights (layout
/// order), its input and the rows' positions.
struct LayerIn<'a, B: Backend> {
    l: usize,
    ws: &'a [B::T],
    x: &'a B::T,
    pos: &'a B::I,
}

/// The device inputs of a decode step of `n` rows: token ids, positions, the cache row each
/// new token is stored in, the lengths after the step, and the block tables ([n, max_blocks]).
pub(crate) struct DecodeIn<'a, B: Backend> {
    pub tokens: &'a B::I,
    pub pos: &'a B::I,
    pub dst: &'a B::I,
    pub lens: &'a B::I,
    pub table: &'a B::I,
    pub n: usize,
}

/// What one decoder layer's backward reads: the layer's index, its input, the activations
/// its forward saved and the gradient of its output.
struct LayerBwdIn<'a, B: Backend> {
    l: usize,
    x: &'a B::T,
    a: &'a LayerActs<B>,
    dout: &'a B::T,
}

/// What one decoder layer's backward writes: the gradient of its input, its scratch, and the
/// layer's twelve parameter gradients (accumulated).
struct LayerBwdOut<'a, B: Backend> {
    dx: &'a mut B::T,
    g: &'a mut LayerGrads<B>,
    grads: &'a mut [B::F],
}

/// The token ids and positions of a pass's rows.
struct Rows<'a, B: Backend> {
    tokens: &'a B::I,
    pos: &'a B::I,
}

/// A Qwen2 model whose parameters live on backend `B`, indexed by [`ParamLayout`].
///
/// A streamed model ([`Model::into_streamed`]) keeps its decoder layers in host memory: their
/// entries of `params` are then empty buffers, and every forward uploads each layer as it
/// reaches it (the backward needs resident weights).
pub struct Model<B: Backend> {
    pub cfg: Qwen2Config,
    pub layout: ParamLayout,
    pub params: Vec<B::T>,
    host_layers: Option<HostLayers>,
}

/// What a training forward keeps for the backward: per-token logprobs (and entropy when asked
/// for) plus the saved activations, or only each layer's input when recomputing.
pub struct Tape<B: Backend> {
    /// log p(target | prefix) per logit row, f32, n_logits entries.
    pub logp: B::F,
    pub entropy: Option<B::F>,
    pub n_tok: usize,
    /// Entries of `logp` (the batch's logit rows; n_tok when every row).
    pub n_logits: usize,
    /// Residual-stream rows gathered at the logit rows (the final norm's input), when the batch
    /// has logit rows.
    x_head: Option<B::T>,
    /// Residual stream entering each layer, plus the final one (num_layers + 1 buffers).
    inputs: Vec<B::T>,
    /// Every layer's activations (empty when recomputing).
    acts: Vec<LayerActs<B>>,
    /// Final-norm output, its rstd and the vocabulary logsumexp per logit row.
    x_final: B::T,
    rstd_final: B::F,
    lse: B::F,
    recompute: bool,
    /// Inverse temperature the logprobs were taken at (the backward uses the same).
    inv_t: f32,
    /// The lm_head logits the forward kept for the backward ([`KEEP_LOGITS_MAX_BYTES`]).
    kept_logits: Option<B::F>,
}

/// Activations of one decoder layer: what its backward reads. `q` and `k` are stored after
/// RoPE; `h1` is the residual stream after attention.
struct LayerActs<B: Backend> {
    xn1: B::T,
    rstd1: B::F,
    q: B::T,
    k: B::T,
    v: B::T,
    attn: B::T,
    lse: B::F,
    h1: B::T,
    xn2: B::T,
    rstd2: B::F,
    gate: B::T,
    up: B::T,
    act: B::T,
}

/// Activation gradients of one layer's backward (scratch, reused across layers).
struct LayerGrads<B: Backend> {
    dact: B::T,
    dgate: B::T,
    dup: B::T,
    dxn2: B::T,
    dh1: B::T,
    dattn: B::T,
    dq: B::T,
    dk: B::T,
    dv: B::T,
    dxn1: B::T,
}

/// What the lm_head pass gives per logit row: logp, lse (for the backward) and, when asked,
/// the entropy.
type HeadLogprobs<B> = (
    <B as Backend>::F,
    <B as Backend>::F,
    Option<<B as Backend>::F>,
);

/// The most bytes of lm_head logits a training forward keeps for its backward (on a backend
/// that [keeps logits](Backend::keeps_logits)); above it the backward recomputes them. Keeping
/// them saves a quarter of the lm_head's training FLOPs (the backward's recomputed product).
pub const KEEP_LOGITS_MAX_BYTES: usize = 1 << 30;

/// Sizes of one pass over `n` token rows.
#[derive(Clone, Copy, Debug)]
struct Dims {
    n: usize,
    h: usize,
    nh: usize,
    nkv: usize,
    hd: usize,
    qd: usize,
    kvd: usize,
    inter: usize,
    vocab: usize,
    eps: f32,
    theta: f32,
}

impl Dims {
    /// The GEMM of a projection from `k` to `n` features over the pass's rows.
    fn gemm(&self, n: usize, k: usize) -> GemmDims {
        GemmDims { m: self.n, n, k }
    }

    fn heads(&self) -> Heads {
        Heads {
            n_heads: self.nh,
            n_kv: self.nkv,
            head_dim: self.hd,
        }
    }

    /// The RMSNorm of `rows` rows of the hidden size.
    fn norm(&self, rows: usize) -> NormDims {
        NormDims { rows, dim: self.h }
    }

    /// The pass's key/value rows into a KV cache.
    fn kv_rows(&self) -> KvRows {
        KvRows {
            n_tok: self.n,
            kv_dim: self.kvd,
        }
    }

    /// The vocabulary ops over `n_tok` rows.
    fn vocab(&self, n_tok: usize) -> VocabDims {
        VocabDims {
            n_tok,
            dim: self.h,
            vocab: self.vocab,
        }
    }
}

impl<B: Backend> LayerActs<B> {
    fn new(b: &B, d: &Dims) -> Result<Self> {
        let n = d.n;
        Ok(LayerActs {
            xn1: b.zeros(n * d.h)?,
            rstd1: b.zeros_f32(n)?,
            q: b.zeros(n * d.qd)?,
            k: b.zeros(n * d.kvd)?,
            v: b.zeros(n * d.kvd)?,
            attn: b.zeros(n * d.qd)?,
            lse: b.zeros_f32(n * d.nh)?,
            h1: b.zeros(n * d.h)?,
            xn2: b.zeros(n * d.h)?,
            rstd2: b.zeros_f32(n)?,
            gate: b.zeros(n * d.inter)?,
            up: b.zeros(n * d.inter)?,
            act: b.zeros(n * d.inter)?,
        })
    }
}

impl<B: Backend> LayerGrads<B> {
    fn new(b: &B, d: &Dims) -> Result<Self> {
        let n = d.n;
        Ok(LayerGrads {
            dact: b.zeros(n * d.inter)?,
            dgate: b.zeros(n * d.inter)?,
            dup: b.zeros(n * d.inter)?,
            dxn2: b.zeros(n * d.h)?,
            dh1: b.zeros(n * d.h)?,
            dattn: b.zeros(n * d.qd)?,
            dq: b.zeros(n * d.qd)?,
            dk: b.zeros(n * d.kvd)?,
            dv: b.zeros(n * d.kvd)?,
            dxn1: b.zeros(n * d.h)?,
        })
    }
}

/// How a layer attends: over packed sequences (training, scoring, prefill; prefill also writes
/// the keys/values into the cache), or one new token per slot against the KV cache (decode).
enum Attn<'a, B: Backend> {
    Packed {
        seqs: Packed<'a, B::I>,
        /// (cache row of each token, this layer's k cache, v cache)
        store: Option<(&'a B::I, &'a mut B::T, &'a mut B::T)>,
        /// Shared-prefix table, when the batch has one.
        prefix: Option<Prefix<'a, B::I>>,
    },
    Decode {
        dst: &'a B::I,
        /// Cached length per slot once the new token is stored.
        cached: Cached<'a, B::I>,
        k_cache: &'a mut B::T,
        v_cache: &'a mut B::T,
    },
}

/// Two distinct elements of a slice, both mutable.
fn two_mut<T>(s: &mut [T], i: usize, j: usize) -> (&mut T, &mut T) {
    assert_ne!(i, j, "two_mut: indices must differ");
    if i < j {
        let (a, b) = s.split_at_mut(j);
        (&mut a[i], &mut b[0])
    } else {
        let (a, b) = s.split_at_mut(i);
        (&mut b[0], &mut a[j])
    }
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
            host_layers: None,
        })
    }

    /// Move the decoder layers to host memory (see [`crate::model::stream`]); the embedding,
    /// final norm and lm_head stay on the backend. Forward passes give the same bits as before.
    pub fn into_streamed(mut self, b: &B) -> Result<Self> {
        if self.host_layers.is_some() {
            return Ok(self);
        }
        let host = HostLayers::from_device(b, &self.layout, &self.params)?;
        for lp in &self.layout.layers {
            for i in lp.all() {
                self.params[i] = b.zeros(0)?;
            }
        }
        self.host_layers = Some(host);
        Ok(self)
    }

    /// The host copy of the decoder layers when the model is streamed.
    pub fn host_layers(&self) -> Option<&HostLayers> {
        self.host_layers.as_ref()
    }

    /// Run `f(l, weights of layer l)` for every decoder layer in order: the resident tensors,
    /// or, streamed, each layer uploaded from the host, the next layer's upload issued before
    /// `f` queues the current layer's work, so that the copy can run beside it (two layers on
    /// the backend at a time; the upload reuses the memory of the layer before).
    fn each_layer(&self, b: &B, mut f: impl FnMut(usize, &[B::T]) -> Result<()>) -> Result<()> {
        let n = self.layout.layers.len();
        match &self.host_layers {
            None => {
                for l in 0..n {
                    f(l, self.layer_params(l))?;
                }
            }
            Some(host) => {
                let mut next = if n > 0 {
                    Some(host.upload(b, 0)?)
                } else {
                    None
                };
                for l in 0..n {
                    let (cur, pending) = next.take().ok_or_else(|| {
                        Error::Invalid(format!("streamed layer {l} was not uploaded"))
                    })?;
                    for p in pending {
                        p.wait()?;
                    }
                    if l + 1 < n {
                        next = Some(host.upload(b, l + 1)?);
                    }
                    f(l, &cur)?;
                }
            }
        }
        Ok(())
    }

    /// The resident tensors of layer `l` (its twelve entries of `params`, layout order).
    fn layer_params(&self, l: usize) -> &[B::T] {
        let first = self.layout.layers[l].input_norm;
        &self.params[first..first + LAYER_TENSORS]
    }

    /// An error for passes that need every weight on the backend.
    fn need_resident(&self, what: &str) -> Result<()> {
        if self.host_layers.is_some() {
            return Err(Error::Invalid(format!(
                "{what}: this model's layers are streamed from host memory (the frozen \
                 reference); only forward passes run on it"
            )));
        }
        Ok(())
    }

    /// Upload parameters given as host f32 vectors in layout order.
    pub fn from_host(b: &B, cfg: Qwen2Config, host: &[Vec<f32>]) -> Result<Self> {
        let params = host
            .iter()
            .map(|p| b.upload(p))
            .collect::<Result<Vec<_>>>()?;
        Self::new(cfg, params)
    }

    /// Parameters as host f32 vectors in layout order (a streamed model's layers from its host
    /// copy).
    pub fn to_host(&self, b: &B) -> Result<Vec<Vec<f32>>> {
        let mut out: Vec<Vec<f32>> = Vec::with_capacity(self.params.len());
        for (i, (s, p)) in self.layout.specs.iter().zip(&self.params).enumerate() {
            out.push(match &self.host_layers {
                Some(_) if self.layer_of(i).is_some() => Vec::new(),
                _ => b.download(p, s.numel())?,
            });
        }
        if let Some(host) = &self.host_layers {
            for (l, lp) in self.layout.layers.iter().enumerate() {
                for (i, t) in lp.all().into_iter().zip(host.layer_f32(l)?) {
                    out[i] = t;
                }
            }
        }
        Ok(out)
    }

    /// The decoder layer tensor `i` belongs to, if any.
    fn layer_of(&self, i: usize) -> Option<usize> {
        self.layout
            .layers
            .iter()
            .position(|lp| (lp.input_norm..lp.input_norm + LAYER_TENSORS).contains(&i))
    }

    /// One zeroed f32 gradient buffer per parameter.
    pub fn zero_grads(&self, b: &B) -> Result<Vec<B::F>> {
        self.layout
            .specs
            .iter()
            .map(|s| b.zeros_f32(s.numel()))
            .collect()
    }

    /// A model with random parameters fully determined by `seed`, for numerical tests: weights
    /// uniform with unit-variance outputs (scaled by fan-in), embeddings in [-1, 1], norm
    /// weights in [0.8, 1.2], biases in [-0.1, 0.1]. Unlike [`crate::model::init::random_params`]
    /// (HF's std-0.02 init, where a tiny model is nearly linear), every nonlinearity, softmax and
    /// normalisation is far from its small-input regime, so gradient checks exercise them.
    pub fn random(b: &B, cfg: Qwen2Config, seed: u64) -> Result<Self> {
        use rand::{Rng, SeedableRng};
        let layout = ParamLayout::new(&cfg);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut host = Vec::with_capacity(layout.specs.len());
        for spec in &layout.specs {
            let n = spec.numel();
            let v: Vec<f32> = if spec.name.ends_with("norm.weight") {
                (0..n)
                    .map(|_| 1.0 + rng.random_range(-0.2f32..0.2))
                    .collect()
            } else if spec.name.ends_with(".bias") {
                (0..n).map(|_| rng.random_range(-0.1f32..0.1)).collect()
            } else if spec.name == "model.embed_tokens.weight" {
                (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
            } else {
                let fan_in = *spec.shape.last().unwrap_or(&1) as f32;
                let a = (3.0 / fan_in).sqrt();
                (0..n).map(|_| rng.random_range(-a..a)).collect()
            };
            host.push(v);
        }
        Self::from_host(b, cfg, &host)
    }

    fn dims(&self, n: usize) -> Result<Dims> {
        let c = &self.cfg;
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        if nh == 0 || nkv == 0 || nh % nkv != 0 || hd == 0 || hd % 2 != 0 {
            return Err(Error::Config {
                file: "config.json".into(),
                field: "num_attention_heads".into(),
                msg: format!(
                    "{nh} heads, {nkv} kv heads, head_dim {hd}: expected heads a positive \
                     multiple of kv heads and an even head_dim"
                ),
            });
        }
        Ok(Dims {
            n,
            h: c.hidden_size,
            nh,
            nkv,
            hd,
            qd: nh * hd,
            kvd: nkv * hd,
            inter: c.intermediate_size,
            vocab: c.vocab_size,
            eps: c.rms_norm_eps as f32,
            theta: c.rope_theta as f32,
        })
    }

    /// Check that every id is a vocabulary row.
    fn check_ids(&self, what: &str, ids: &[u32]) -> Result<()> {
        let v = self.cfg.vocab_size;
        if let Some((i, id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= v) {
            return Err(Error::Invalid(format!(
                "{what}[{i}] = {id} is not below vocab_size = {v}"
            )));
        }
        Ok(())
    }

    pub fn upload_batch(&self, b: &B, batch: &PackedBatch) -> Result<DeviceBatch<B>> {
        let n = batch.n_tok();
        if n == 0 {
            return Err(Error::Invalid("batch: no tokens".into()));
        }
        let n_logits = batch.n_logits();
        if batch.targets.len() != n_logits || batch.positions.len() != n {
            return Err(Error::Invalid(format!(
                "batch: {n} tokens and {n_logits} logit rows but {} targets and {} positions \
                 (expected one target per logit row, one position per token)",
                batch.targets.len(),
                batch.positions.len()
            )));
        }
        if let Some((i, r)) = batch
            .logit_rows
            .iter()
            .enumerate()
            .find(|(_, &r)| r as usize >= n)
        {
            return Err(Error::Invalid(format!(
                "batch: logit_rows[{i}] = {r} is not below n_tok = {n}"
            )));
        }
        let cu = &batch.cu_seqlens;
        if cu.len() < 2 || cu[0] != 0 || *cu.last().unwrap_or(&0) as usize != n {
            return Err(Error::Invalid(format!(
                "batch: cu_seqlens must run from 0 to n_tok = {n} with at least one sequence"
            )));
        }
        if let Some(i) = cu.windows(2).position(|w| w[1] < w[0]) {
            return Err(Error::Invalid(format!(
                "batch: cu_seqlens decreases at entry {}",
                i + 1
            )));
        }
        let n_seq = cu.len() - 1;
        let max_len = batch.max_len();
        if !batch.prefix.is_empty() {
            if batch.prefix.len() != 2 * n_seq {
                return Err(Error::Invalid(format!(
                    "batch: prefix holds {} entries, expected 2 per sequence ({})",
                    batch.prefix.len(),
                    2 * n_seq
                )));
            }
            for (s, (p, &start)) in batch.prefix.chunks(2).zip(cu).enumerate() {
                let (lo, hi) = (p[0], p[1]);
                if lo > hi || hi > start || (hi - lo) as usize > max_len {
                    return Err(Error::Invalid(format!(
                        "batch: sequence {s} has prefix rows {lo}..{hi}; expected \
                         lo <= hi <= {start} (its start), at most {max_len} rows"
                    )));
                }
            }
        }
        self.check_ids("batch.tokens", &batch.tokens)?;
        self.check_ids("batch.targets", &batch.targets)?;
        let prefix = if batch.prefix.is_empty() {
            None
        } else {
            Some((b.upload_u32(&batch.prefix)?, batch.prefix.clone()))
        };
        let logit_rows = if batch.logit_rows.is_empty() {
            None
        } else {
            Some(b.upload_u32(&batch.logit_rows)?)
        };
        Ok(DeviceBatch {
            tokens: b.upload_u32(&batch.tokens)?,
            targets: b.upload_u32(&batch.targets)?,
            cu_seqlens: b.upload_u32(cu)?,
            positions: b.upload_u32(&batch.positions)?,
            cu_host: cu.clone(),
            n_tok: n,
            max_len,
            prefix,
            logit_rows,
            n_logits,
        })
    }

    fn p(&self, i: usize) -> &B::T {
        &self.params[i]
    }

    /// One decoder layer, the single place the layer schedule is written:
    /// RMSNorm -> q/k/v (+bias) -> RoPE -> attention -> o_proj -> +residual and RMSNorm (one
    /// fused op) -> SwiGLU MLP -> +residual. Reads `x`, fills `a`, writes the layer output to `out`.
    /// `ws` holds the layer's twelve tensors in layout order.
    fn layer_forward(
        &self,
        b: &B,
        d: &Dims,
        input: LayerIn<'_, B>,
        attn: Attn<'_, B>,
        a: &mut LayerActs<B>,
        out: &mut B::T,
    ) -> Result<()> {
        let LayerIn { l, ws, x, pos } = input;
        let p = self.layout.layers[l];
        if ws.len() != LAYER_TENSORS {
            return Err(Error::Invalid(format!(
                "layer {l}: {} weight tensors given, expected {LAYER_TENSORS}",
                ws.len()
            )));
        }
        let w = |i: usize| &ws[i - p.input_norm];
        let (n, h, eps) = (d.n, d.h, d.eps);
        b.rmsnorm(x, w(p.input_norm), &mut a.xn1, &mut a.rstd1, d.norm(n), eps)?;
        b.linear(&a.xn1, w(p.wq), Some(w(p.bq)), &mut a.q, d.gemm(d.qd, h))?;
        b.linear(&a.xn1, w(p.wk), Some(w(p.bk)), &mut a.k, d.gemm(d.kvd, h))?;
        b.linear(&a.xn1, w(p.wv), Some(w(p.bv)), &mut a.v, d.gemm(d.kvd, h))?;
        b.rope(&mut a.q, pos, n, d.nh, d.hd, d.theta)?;
        b.rope(&mut a.k, pos, n, d.nkv, d.hd, d.theta)?;
        match attn {
            Attn::Packed {
                seqs,
                store,
                prefix,
            } => {
                if let Some((dst, kc, vc)) = store {
                    b.kv_store(&a.k, &a.v, dst, kc, vc, d.kv_rows())?;
                }
                let qkv = Qkv {
                    q: &a.q,
                    k: &a.k,
                    v: &a.v,
                };
                let (attn, lse) = (&mut a.attn, &mut a.lse);
                match prefix {
                    Some(pre) => b.attention_prefixed(qkv, attn, lse, &seqs, &pre, d.heads())?,
                    None => b.attention(qkv, attn, lse, &seqs, d.heads())?,
                }
            }
            Attn::Decode {
                dst,
                cached,
                k_cache,
                v_cache,
            } => {
                b.kv_store(&a.k, &a.v, dst, k_cache, v_cache, d.kv_rows())?;
                b.attention_decode(&a.q, k_cache, v_cache, &cached, &mut a.attn, d.heads())?;
            }
        }
        b.linear(&a.attn, w(p.wo), None, &mut a.h1, d.gemm(h, d.qd))?;
        // h1 = o_proj(attn) + x and xn2 = norm(h1) in one pass (the residual add fused into
        // the post-attention norm; the bits of add_inplace then rmsnorm).
        let post = NormOut {
            out: &mut a.xn2,
            rstd: &mut a.rstd2,
        };
        b.add_rmsnorm(&mut a.h1, x, w(p.post_norm), post, d.norm(n), eps)?;
        b.linear(&a.xn2, w(p.w_gate), None, &mut a.gate, d.gemm(d.inter, h))?;
        b.linear(&a.xn2, w(p.w_up), None, &mut a.up, d.gemm(d.inter, h))?;
        b.swiglu(&a.gate, &a.up, &mut a.act, n * d.inter)?;
        b.linear(&a.act, w(p.w_down), None, out, d.gemm(h, d.inter))?;
        b.add_inplace(out, &a.h1, n * h)?;
        Ok(())
    }

    /// Backward of [`Model::layer_forward`]: from `dout` (gradient of the layer output) writes
    /// `dx` (gradient of the layer input) and accumulates the layer's parameter gradients into
    /// `grads` (the layer's twelve tensors, layout order).
    fn layer_backward(
        &self,
        b: &B,
        d: &Dims,
        batch: &DeviceBatch<B>,
        input: LayerBwdIn<'_, B>,
        output: LayerBwdOut<'_, B>,
    ) -> Result<()> {
        let LayerBwdIn { l, x, a, dout } = input;
        let LayerBwdOut { dx, g, grads } = output;
        let p = self.layout.layers[l];
        let w = |i: usize| self.p(i);
        let base = p.input_norm;
        let gi = |i: usize| i - base;
        if grads.len() != LAYER_TENSORS {
            return Err(Error::Invalid(format!(
                "layer {l} backward: {} gradient buffers given, expected {LAYER_TENSORS}",
                grads.len()
            )));
        }
        let (n, h) = (d.n, d.h);
        // MLP: out = h1 + down(silu(gate(xn2)) * up(xn2))
        let down = LinearGrads::new(&mut g.dact, &mut grads[gi(p.w_down)]);
        b.linear_bwd(dout, &a.act, w(p.w_down), down, d.gemm(h, d.inter))?;
        let (dgate, dup) = (&mut g.dgate, &mut g.dup);
        b.swiglu_bwd(&g.dact, &a.gate, &a.up, dgate, dup, n * d.inter)?;
        let gate = LinearGrads::new(&mut g.dxn2, &mut grads[gi(p.w_gate)]);
        b.linear_bwd(&g.dgate, &a.xn2, w(p.w_gate), gate, d.gemm(d.inter, h))?;
        let up = LinearGrads::new(&mut g.dxn2, &mut grads[gi(p.w_up)]).accumulate();
        b.linear_bwd(&g.dup, &a.xn2, w(p.w_up), up, d.gemm(d.inter, h))?;
        b.copy(dout, &mut g.dh1, n * h)?;
        let post = NormGrads {
            dx: &mut g.dh1,
            dw: Some(&mut grads[gi(p.post_norm)]),
        };
        b.rmsnorm_bwd(&g.dxn2, &a.h1, w(p.post_norm), &a.rstd2, post, d.norm(n))?;
        // Attention: h1 = x + o_proj(attn(rope(q), rope(k), v))
        let o = LinearGrads::new(&mut g.dattn, &mut grads[gi(p.wo)]);
        b.linear_bwd(&g.dh1, &a.attn, w(p.wo), o, d.gemm(h, d.qd))?;
        let qkv = Qkv {
            q: &a.q,
            k: &a.k,
            v: &a.v,
        };
        let saved = AttnSaved {
            dout: &g.dattn,
            out: &a.attn,
            lse: &a.lse,
        };
        let dqkv = AttnGrads {
            dq: &mut g.dq,
            dk: &mut g.dk,
            dv: &mut g.dv,
        };
        let (seqs, heads) = (batch.seqs(), d.heads());
        match batch.prefix() {
            Some(pre) => b.attention_prefixed_bwd(qkv, saved, dqkv, &seqs, &pre, heads)?,
            None => b.attention_bwd(qkv, saved, dqkv, &seqs, heads)?,
        }
        b.rope_bwd(&mut g.dq, &batch.positions, n, d.nh, d.hd, d.theta)?;
        b.rope_bwd(&mut g.dk, &batch.positions, n, d.nkv, d.hd, d.theta)?;
        for (dy, wi, bi, rows, first) in [
            (&g.dq, p.wq, p.bq, d.qd, true),
            (&g.dk, p.wk, p.bk, d.kvd, false),
            (&g.dv, p.wv, p.bv, d.kvd, false),
        ] {
            let (gw, gb) = two_mut(grads, gi(wi), gi(bi));
            let mut qkv = LinearGrads::new(&mut g.dxn1, gw).bias(gb);
            qkv.accumulate_dx = !first;
            b.linear_bwd(dy, &a.xn1, w(wi), qkv, d.gemm(rows, h))?;
        }
        b.copy(&g.dh1, dx, n * h)?;
        let input = NormGrads {
            dx,
            dw: Some(&mut grads[gi(p.input_norm)]),
        };
        b.rmsnorm_bwd(&g.dxn1, x, w(p.input_norm), &a.rstd1, input, d.norm(n))?;
        Ok(())
    }

    /// Residual stream after the last layer for a packed batch, without saving activations
    /// (one scratch set reused per layer). With `cache`, every layer's keys/values are also
    /// written to cache rows `dst`.
    fn hidden_packed(
        &self,
        b: &B,
        d: &Dims,
        rows: Rows<'_, B>,
        seqs: Packed<'_, B::I>,
        prefix: Option<Prefix<'_, B::I>>,
        mut cache: Option<(&B::I, &mut KvCache<B>)>,
    ) -> Result<B::T> {
        let Rows { tokens, pos } = rows;
        let mut x = b.zeros(d.n * d.h)?;
        b.embedding(tokens, self.p(self.layout.embed), &mut x, d.n, d.h)?;
        let mut y = b.zeros(d.n * d.h)?;
        let mut acts = LayerActs::new(b, d)?;
        self.each_layer(b, |l, ws| {
            let store = match cache.as_mut() {
                Some((dst, c)) => Some((*dst, &mut c.k[l], &mut c.v[l])),
                None => None,
            };
            let attn = Attn::Packed {
                seqs,
                store,
                prefix,
            };
            self.layer_forward(b, d, LayerIn { l, ws, x: &x, pos }, attn, &mut acts, &mut y)?;
            std::mem::swap(&mut x, &mut y);
            Ok(())
        })?;
        Ok(x)
    }

    /// Final RMSNorm of `rows` rows: (normed, rstd).
    fn final_norm(&self, b: &B, x: &B::T, rows: usize, d: &Dims) -> Result<(B::T, B::F)> {
        let mut xf = b.zeros(rows * d.h)?;
        let mut rstd = b.zeros_f32(rows)?;
        let norm = self.p(self.layout.norm);
        b.rmsnorm(x, norm, &mut xf, &mut rstd, d.norm(rows), d.eps)?;
        Ok((xf, rstd))
    }

    /// The lm_head log-probabilities of the batch's targets from the normed logit rows `xf`:
    /// (logp, lse, entropy when asked), on the backend; `opts` = (entropy, inv_t). With `kept`,
    /// the logits are also kept there for the backward ([`Backend::logprobs_keep`]).
    fn head_logprobs(
        &self,
        b: &B,
        xf: &B::T,
        batch: &DeviceBatch<B>,
        d: &Dims,
        (entropy, inv_t): (bool, f32),
        kept: Option<&mut B::F>,
    ) -> Result<HeadLogprobs<B>> {
        let m = batch.n_logits;
        let mut logp = b.zeros_f32(m)?;
        let mut lse = b.zeros_f32(m)?;
        let mut ent = if entropy { Some(b.zeros_f32(m)?) } else { None };
        let head = LmHead {
            h: xf,
            w: self.p(self.layout.lm_head),
            targets: &batch.targets,
        };
        let out = LogprobsOut {
            logp: &mut logp,
            lse: &mut lse,
            entropy: ent.as_mut(),
        };
        match kept {
            Some(k) => b.logprobs_keep(head, out, d.vocab(m), inv_t, k)?,
            None => b.logprobs(head, out, d.vocab(m), inv_t)?,
        }
        Ok((logp, lse, ent))
    }

    /// Teacher-forced log-probabilities without gradient (eval, tests) at temperature 1.
    /// Returns per-token logprobs and, when `entropy`, per-token entropies (host vectors).
    pub fn logprobs(
        &self,
        b: &B,
        batch: &DeviceBatch<B>,
        entropy: bool,
    ) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
        self.logprobs_at(b, batch, entropy, 1.0)
    }

    /// [`Model::logprobs`] of log_softmax(logits · inv_t), i.e. at temperature 1 / inv_t (the
    /// GRPO old/reference passes at the rollout temperature). `inv_t` finite and > 0.
    pub fn logprobs_at(
        &self,
        b: &B,
        batch: &DeviceBatch<B>,
        entropy: bool,
        inv_t: f32,
    ) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
        let d = self.dims(batch.n_tok)?;
        let x = self.hidden_packed(
            b,
            &d,
            Rows {
                tokens: &batch.tokens,
                pos: &batch.positions,
            },
            batch.seqs(),
            batch.prefix(),
            None,
        )?;
        let m = batch.n_logits;
        let xh = self.gather_head(b, &x, batch, &d)?;
        let (xf, _) = self.final_norm(b, xh.as_ref().unwrap_or(&x), m, &d)?;
        let (logp, _, ent) = self.head_logprobs(b, &xf, batch, &d, (entropy, inv_t), None)?;
        let ent = match ent {
            Some(e) => Some(b.download_f32(&e, m)?),
            None => None,
        };
        Ok((b.download_f32(&logp, m)?, ent))
    }

    /// The residual-stream rows at the batch's logit rows ([n_logits, hidden]; the embedding op
    /// is a row gather), or None when every row is a logit row.
    fn gather_head(
        &self,
        b: &B,
        x: &B::T,
        batch: &DeviceBatch<B>,
        d: &Dims,
    ) -> Result<Option<B::T>> {
        match &batch.logit_rows {
            Some(rows) => {
                let mut xh = b.zeros(batch.n_logits * d.h)?;
                b.embedding(rows, x, &mut xh, batch.n_logits, d.h)?;
                Ok(Some(xh))
            }
            None => Ok(None),
        }
    }

    /// Full f32 logits [n_tok, vocab] of a teacher-forced pass at every row, whatever the
    /// batch's logit rows (tests, small vocabularies).
    pub fn forward_logits(&self, b: &B, batch: &DeviceBatch<B>) -> Result<Vec<f32>> {
        let d = self.dims(batch.n_tok)?;
        let x = self.hidden_packed(
            b,
            &d,
            Rows {
                tokens: &batch.tokens,
                pos: &batch.positions,
            },
            batch.seqs(),
            batch.prefix(),
            None,
        )?;
        let (xf, _) = self.final_norm(b, &x, d.n, &d)?;
        let mut out = b.zeros_f32(d.n * d.vocab)?;
        b.logits(&xf, self.p(self.layout.lm_head), &mut out, d.vocab(d.n))?;
        b.download_f32(&out, d.n * d.vocab)
    }

    /// Training forward: keeps what the backward needs (everything, or only the layer inputs
    /// when `recompute`, in which case each layer is recomputed during the backward).
    /// Logprobs and entropy at temperature 1 (SFT).
    pub fn forward_train(
        &self,
        b: &B,
        batch: &DeviceBatch<B>,
        entropy: bool,
        recompute: bool,
    ) -> Result<Tape<B>> {
        self.forward_train_at(b, batch, entropy, recompute, 1.0)
    }

    /// [`Model::forward_train`] with logprobs and entropy of softmax(logits · inv_t) (GRPO at
    /// the rollout temperature); [`Model::backward`] then differentiates that same function.
    pub fn forward_train_at(
        &self,
        b: &B,
        batch: &DeviceBatch<B>,
        entropy: bool,
        recompute: bool,
        inv_t: f32,
    ) -> Result<Tape<B>> {
        let d = self.dims(batch.n_tok)?;
        let n_layers = self.layout.layers.len();
        let mut inputs = Vec::with_capacity(n_layers + 1);
        let mut x0 = b.zeros(d.n * d.h)?;
        b.embedding(&batch.tokens, self.p(self.layout.embed), &mut x0, d.n, d.h)?;
        inputs.push(x0);
        let mut acts = Vec::new();
        let mut scratch = if recompute {
            Some(LayerActs::new(b, &d)?)
        } else {
            None
        };
        self.need_resident("forward_train")?;
        for l in 0..n_layers {
            let mut out = b.zeros(d.n * d.h)?;
            let mut fresh = None;
            let a = match scratch.as_mut() {
                Some(s) => s,
                None => fresh.insert(LayerActs::new(b, &d)?),
            };
            let attn = Attn::Packed {
                seqs: batch.seqs(),
                store: None,
                prefix: batch.prefix(),
            };
            let (ws, x) = (self.layer_params(l), &inputs[l]);
            self.layer_forward(
                b,
                &d,
                LayerIn {
                    l,
                    ws,
                    x,
                    pos: &batch.positions,
                },
                attn,
                a,
                &mut out,
            )?;
            acts.extend(fresh);
            inputs.push(out);
        }
        let m = batch.n_logits;
        let x_head = self.gather_head(b, &inputs[n_layers], batch, &d)?;
        let (x_final, rstd_final) =
            self.final_norm(b, x_head.as_ref().unwrap_or(&inputs[n_layers]), m, &d)?;
        let keep = b.keeps_logits()
            && m.checked_mul(d.vocab)
                .and_then(|n| n.checked_mul(4))
                .is_some_and(|bytes| bytes <= KEEP_LOGITS_MAX_BYTES);
        let mut kept_logits = if keep {
            Some(b.zeros_f32(m * d.vocab)?)
        } else {
            None
        };
        let opts = (entropy, inv_t);
        let (logp, lse, ent) =
            self.head_logprobs(b, &x_final, batch, &d, opts, kept_logits.as_mut())?;
        Ok(Tape {
            logp,
            entropy: ent,
            n_tok: d.n,
            n_logits: m,
            x_head,
            inputs,
            acts,
            x_final,
            rstd_final,
            lse,
            recompute,
            inv_t,
            kept_logits,
        })
    }

    /// Backward from dL/dlogp (n_logits f32 entries on the backend); accumulates (+=) into
    /// `grads`: one buffer per parameter (as from [`Model::zero_grads`], a slice or a `Vec`), or
    /// any [`GradSink`], which is handed the head's, each layer's and the embedding's
    /// gradients group by group in the order [`crate::model::grad_sink`] describes.
    pub fn backward<G: GradSink<B> + ?Sized>(
        &self,
        b: &B,
        batch: &DeviceBatch<B>,
        tape: Tape<B>,
        dlogp: &B::F,
        grads: &mut G,
    ) -> Result<()> {
        self.need_resident("backward")?;
        if grads.tensors() != self.layout.specs.len() {
            return Err(Error::Invalid(format!(
                "backward: {} gradient buffers given, the model has {} parameters",
                grads.tensors(),
                self.layout.specs.len()
            )));
        }
        let n_layers = self.layout.layers.len();
        if tape.n_tok != batch.n_tok
            || tape.n_logits != batch.n_logits
            || tape.inputs.len() != n_layers + 1
        {
            return Err(Error::Invalid(format!(
                "backward: the tape holds {} tokens and {} logit rows, the batch {} and {}",
                tape.n_tok, tape.n_logits, batch.n_tok, batch.n_logits
            )));
        }
        let d = self.dims(batch.n_tok)?;
        let m = batch.n_logits;
        let (norm, lm_head, embed) = (self.layout.norm, self.layout.lm_head, self.layout.embed);
        let tied = lm_head == embed;
        // Head: logp = log_softmax(norm(x_L[rows]) · lm_headᵀ · inv_t)[target]. Untied, the
        // final norm and lm_head are one group (norm, lm_head adjacent in the layout).
        let mut dxf = b.zeros(m * d.h)?;
        let head = LmHead {
            h: &tape.x_final,
            w: self.p(lm_head),
            targets: &batch.targets,
        };
        let (head_first, head_n, w_at) = if tied {
            (embed, 1, 0)
        } else {
            (norm, 2, lm_head - norm)
        };
        if !tied && lm_head != norm + 1 {
            return Err(Error::Invalid(format!(
                "backward: lm_head is tensor {lm_head}, expected {} (after the final norm)",
                norm + 1
            )));
        }
        let g = grads.open(b, head_first, head_n)?;
        let head_grads = LogprobsGrads {
            dh: &mut dxf,
            dw: Some(&mut g[w_at]),
        };
        match &tape.kept_logits {
            Some(logits) => {
                let saved = KeptLogits {
                    lse: &tape.lse,
                    logits,
                };
                b.logprobs_bwd_kept(dlogp, head, saved, head_grads, d.vocab(m), tape.inv_t)?
            }
            None => b.logprobs_bwd(dlogp, head, &tape.lse, head_grads, d.vocab(m), tape.inv_t)?,
        }
        let mut dxh = b.zeros(m * d.h)?;
        let g = if tied {
            grads.open(b, norm, 1)?
        } else {
            grads.open(b, head_first, head_n)?
        };
        let norm_grads = NormGrads {
            dx: &mut dxh,
            dw: Some(&mut g[0]),
        };
        b.rmsnorm_bwd(
            &dxf,
            tape.x_head.as_ref().unwrap_or(&tape.inputs[n_layers]),
            self.p(norm),
            &tape.rstd_final,
            norm_grads,
            d.norm(m),
        )?;
        if tied {
            grads.close(b, norm, 1)?;
        } else {
            grads.close(b, head_first, head_n)?;
        }
        drop(dxf);
        // Scatter the logit rows' gradient back to their rows (a repeated row sums).
        let mut dx = match &batch.logit_rows {
            Some(rows) => {
                let mut dx = b.zeros(d.n * d.h)?;
                b.scatter_add_rows(rows, &dxh, &mut dx, m, d.n, d.h)?;
                dx
            }
            None => dxh,
        };
        let mut dx_in = b.zeros(d.n * d.h)?;
        let mut lg = LayerGrads::new(b, &d)?;
        let mut scratch = if tape.recompute {
            Some((LayerActs::new(b, &d)?, b.zeros(d.n * d.h)?))
        } else {
            None
        };
        for l in (0..n_layers).rev() {
            let ws = self.layer_params(l);
            let a = match scratch.as_mut() {
                Some((a, out)) => {
                    let attn = Attn::Packed {
                        seqs: batch.seqs(),
                        store: None,
                        prefix: batch.prefix(),
                    };
                    let (x, pos) = (&tape.inputs[l], &batch.positions);
                    self.layer_forward(b, &d, LayerIn { l, ws, x, pos }, attn, a, out)?;
                    &*a
                }
                None => &tape.acts[l],
            };
            let first = self.layout.layers[l].input_norm;
            let g = grads.open(b, first, LAYER_TENSORS)?;
            self.layer_backward(
                b,
                &d,
                batch,
                LayerBwdIn {
                    l,
                    x: &tape.inputs[l],
                    a,
                    dout: &dx,
                },
                LayerBwdOut {
                    dx: &mut dx_in,
                    g: &mut lg,
                    grads: g,
                },
            )?;
            grads.close(b, first, LAYER_TENSORS)?;
            std::mem::swap(&mut dx, &mut dx_in);
        }
        let g = grads.open(b, embed, 1)?;
        b.embedding_bwd(&batch.tokens, &dx, &mut g[0], d.n, d.h)?;
        grads.close(b, embed, 1)?;
        Ok(())
    }

    /// A paged KV cache with room for `slots` sequences of `max_len` positions at once
    /// (blocks of [`DEFAULT_BLOCK_SIZE`] rows, `slots * ceil(max_len / block_size)` of them).
    pub fn new_cache(&self, b: &B, slots: usize, max_len: usize) -> Result<KvCache<B>> {
        let block_size = DEFAULT_BLOCK_SIZE;
        let n_blocks = slots.saturating_mul(max_len.div_ceil(block_size));
        self.new_paged_cache(
            b,
            KvShape {
                slots,
                max_len,
                block_size,
                n_blocks,
            },
        )
    }

    /// A paged KV cache of the given shape, for this model's layers and key/value width.
    pub fn new_paged_cache(&self, b: &B, shape: KvShape) -> Result<KvCache<B>> {
        let kvd = self.cfg.num_key_value_heads * self.cfg.head_dim;
        KvCache::new(b, shape, self.layout.layers.len(), kvd)
    }

    /// Prefill slot i with `prompts[i]` (`prompts.len() <= cache.slots`); returns f32
    /// logits [prompts.len(), vocab] of each prompt's last token.
    pub fn prefill(&self, b: &B, cache: &mut KvCache<B>, prompts: &[Vec<u32>]) -> Result<B::F> {
        let slots: Vec<usize> = (0..prompts.len()).collect();
        let refs: Vec<&[u32]> = prompts.iter().map(|p| p.as_slice()).collect();
        self.prefill_slots(b, cache, &slots, &refs)
    }

    /// Prefill slot `slots[i]` with `prompts[i]` (distinct slots below `cache.slots`, at most
    /// `cache.slots` prompts), in one packed pass; other slots are untouched. Returns f32
    /// logits [prompts.len(), vocab] of each prompt's last token.
    pub fn prefill_slots(
        &self,
        b: &B,
        cache: &mut KvCache<B>,
        slots: &[usize],
        prompts: &[&[u32]],
    ) -> Result<B::F> {
        if prompts.is_empty() || prompts.len() > cache.slots || slots.len() != prompts.len() {
            return Err(Error::Invalid(format!(
                "prefill: {} prompts into {} slots of a cache of {} slots (expected 1..={} \
                 prompts, one slot each)",
                prompts.len(),
                slots.len(),
                cache.slots,
                cache.slots
            )));
        }
        let mut seen = vec![false; cache.slots];
        for &s in slots {
            if s >= cache.slots || std::mem::replace(&mut seen[s], true) {
                return Err(Error::Invalid(format!(
                    "prefill: slot {s} is out of range or repeated (cache of {} slots)",
                    cache.slots
                )));
            }
        }
        let mut tokens = Vec::new();
        let mut positions = Vec::new();
        let mut dst = Vec::new();
        let mut cu_host = vec![0u32];
        let mut last = Vec::new();
        for (i, p) in prompts.iter().enumerate() {
            if p.is_empty() || p.len() > cache.max_len {
                return Err(Error::Invalid(format!(
                    "prefill: prompt {i} has {} tokens, expected 1..={} (cache max_len)",
                    p.len(),
                    cache.max_len
                )));
            }
            self.check_ids(&format!("prefill: prompt {i}"), p)?;
        }
        let need: usize = prompts.iter().map(|p| cache.blocks_for(p.len())).sum();
        let held: usize = slots
            .iter()
            .map(|&s| {
                let t = &cache.tables[s];
                t.iter().filter(|&&id| cache.pool.refs(id) == 1).count()
            })
            .sum();
        if need > cache.pool.free() + held {
            return Err(Error::Invalid(format!(
                "prefill: {need} blocks of {} rows for {} prompts, {} of {} blocks free",
                cache.block_size,
                prompts.len(),
                cache.pool.free() + held,
                cache.pool.n_blocks()
            )));
        }
        for (i, p) in prompts.iter().enumerate() {
            cache.alloc_slot(slots[i], p.len())?;
            tokens.extend_from_slice(p);
            for t in 0..p.len() {
                positions.push(t as u32);
                dst.push(cache.row(slots[i], t));
            }
            cu_host.push(tokens.len() as u32);
            last.push(tokens.len() as u32 - 1);
        }
        let max_len = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
        let d = self.dims(tokens.len())?;
        let tok_d = b.upload_u32(&tokens)?;
        let pos_d = b.upload_u32(&positions)?;
        let cu_d = b.upload_u32(&cu_host)?;
        let dst_d = b.upload_u32(&dst)?;
        let seqs = Packed {
            cu_seqlens: &cu_d,
            cu_host: &cu_host,
            max_len,
        };
        let x = self.hidden_packed(
            b,
            &d,
            Rows {
                tokens: &tok_d,
                pos: &pos_d,
            },
            seqs,
            None,
            Some((&dst_d, cache)),
        )?;
        // Gather each prompt's last row (the embedding op is a row gather).
        let np = prompts.len();
        let mut xl = b.zeros(np * d.h)?;
        b.embedding(&b.upload_u32(&last)?, &x, &mut xl, np, d.h)?;
        let (xf, _) = self.final_norm(b, &xl, np, &d)?;
        let mut out = b.zeros_f32(np * d.vocab)?;
        b.logits(&xf, self.p(self.layout.lm_head), &mut out, d.vocab(np))?;
        Ok(out)
    }

    /// Append `tokens[i]` to slot i at position `cache.lens[i]` for every slot (a finished slot
    /// may be fed any token; its output is ignored by the caller); returns f32 logits
    /// [slots, vocab]. Fewer tokens than slots decode only the leading slots.
    pub fn decode(&self, b: &B, cache: &mut KvCache<B>, tokens: &[u32]) -> Result<B::F> {
        let (dst, after) = self.decode_rows(b, cache, tokens)?;
        self.decode_plain(b, cache, tokens, &dst, &after)
    }

    /// The device part of [`Model::decode`] with plain launches, after
    /// [`Model::decode_rows`] gave the step's destination rows and lengths: uploads the
    /// step's inputs, runs it and advances the slots' lengths.
    pub(crate) fn decode_plain(
        &self,
        b: &B,
        cache: &mut KvCache<B>,
        tokens: &[u32],
        dst: &[u32],
        after: &[u32],
    ) -> Result<B::F> {
        let n = tokens.len();
        let tok_d = b.upload_u32(tokens)?;
        let pos_d = b.upload_u32(&cache.lens[..n])?;
        let dst_d = b.upload_u32(dst)?;
        let lens_d = b.upload_u32(after)?;
        let table_d = b.upload_u32(&cache.flat_tables(n))?;
        let out = self.decode_run(
            b,
            cache,
            &DecodeIn {
                tokens: &tok_d,
                pos: &pos_d,
                dst: &dst_d,
                lens: &lens_d,
                table: &table_d,
                n,
            },
        )?;
        cache.lens[..n].copy_from_slice(after);
        Ok(out)
    }

    /// The host side of a decode step of the leading `tokens.len()` slots: the checks, each
    /// slot's next block allocated (or its shared last block copied), and per slot the cache
    /// row its new token goes to and its length after the step. `cache.lens` is unchanged.
    pub(crate) fn decode_rows(
        &self,
        b: &B,
        cache: &mut KvCache<B>,
        tokens: &[u32],
    ) -> Result<(Vec<u32>, Vec<u32>)> {
        let n = tokens.len();
        if n == 0 || n > cache.slots {
            return Err(Error::Invalid(format!(
                "decode: {n} tokens for a cache of {} slots (expected 1..={})",
                cache.slots, cache.slots
            )));
        }
        self.check_ids("decode: tokens", tokens)?;
        let mut dst = Vec::with_capacity(n);
        let mut after = Vec::with_capacity(n);
        if let Some(i) = (0..n).find(|&i| cache.lens[i] as usize >= cache.max_len) {
            return Err(Error::Invalid(format!(
                "decode: slot {i} is full ({} of max_len = {} tokens)",
                cache.lens[i], cache.max_len
            )));
        }
        let need = cache.step_needs(n);
        if need > cache.pool.free() {
            return Err(Error::Invalid(format!(
                "decode: {n} slots need {need} new KV-cache blocks, {} of {} are free",
                cache.pool.free(),
                cache.pool.n_blocks()
            )));
        }
        for i in 0..n {
            cache.prepare_append(b, i)?;
            let l = cache.lens[i];
            dst.push(cache.row(i, l as usize));
            after.push(l + 1);
        }
        Ok((dst, after))
    }

    /// The device side of a decode step over `inp.n` rows: embedding, every layer (kv_store +
    /// decode attention through the block tables), final norm, logits [n, vocab]. Reads only
    /// `inp`, the weights and the cache (so it can be captured as a graph); changes no host
    /// state.
    pub(crate) fn decode_run(
        &self,
        b: &B,
        cache: &mut KvCache<B>,
        inp: &DecodeIn<'_, B>,
    ) -> Result<B::F> {
        let n = inp.n;
        let d = self.dims(n)?;
        let (max_blocks, block_size) = (cache.max_blocks(), cache.block_size);
        let mut x = b.zeros(n * d.h)?;
        b.embedding(inp.tokens, self.p(self.layout.embed), &mut x, n, d.h)?;
        let mut y = b.zeros(n * d.h)?;
        let mut acts = LayerActs::new(b, &d)?;
        self.each_layer(b, |l, ws| {
            let attn = Attn::Decode {
                dst: inp.dst,
                cached: Cached {
                    lens: inp.lens,
                    table: inp.table,
                    n_seq: n,
                    max_blocks,
                    block_size,
                },
                k_cache: &mut cache.k[l],
                v_cache: &mut cache.v[l],
            };
            self.layer_forward(
                b,
                &d,
                LayerIn {
                    l,
                    ws,
                    x: &x,
                    pos: inp.pos,
                },
                attn,
                &mut acts,
                &mut y,
            )?;
            std::mem::swap(&mut x, &mut y);
            Ok(())
        })?;
        let (xf, _) = self.final_norm(b, &x, n, &d)?;
        let mut out = b.zeros_f32(n * d.vocab)?;
        b.logits(&xf, self.p(self.layout.lm_head), &mut out, d.vocab(n))?;
        Ok(out)
    }

    /// Whether the decoder layers are streamed from host memory ([`Model::into_streamed`]).
    pub fn is_streamed(&self) -> bool {
        self.host_layers.is_some()
    }
}
