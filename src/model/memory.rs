//! GPU memory estimate of a GRPO run, computed from a model config.
//!
//! Every figure is derived from the config's shapes: parameter count from [`ParamLayout`], KV
//! cache from layers × kv heads × head_dim, activations from the tensors one decoder layer keeps
//! for its backward. Storage follows the CUDA backend's numerics: bf16 weights and activations,
//! f32 gradients, AdamW moments, master weights and per-token statistics.
//!
//! These are the bytes the tensors need. On CUDA the caching pool takes more from the driver:
//! each buffer is rounded up to its size class (`backend::cuda::size_class`: a power of two
//! up to 1 MiB, then a multiple of 2 MiB), and a freed block stays cached for the next request
//! of its class. The memory planner (`model::plan`) counts every parameter-shaped and
//! activation buffer at its size class ([`layer_saved_buffers`] lists the activation buffers of
//! a layer). Cached blocks of one phase that the next phase cannot reuse are released at the
//! phase boundaries by the trainers (`Backend::release_cached`: after the rollout, between a
//! micro-batch's loss and its backward, before the optimizer update), so the training peak is
//! the live buffers plus what stays cached inside a phase: the backward's own vocabulary tile,
//! which the estimate counts in its vocabulary buffers, and the blocks one layer frees for the
//! next. `tests/cuda_memory_plan.rs` checks the planner's peak against the peak the virtual GPU
//! measures, within 10% either way.

use crate::model::{ParamLayout, Qwen2Config};
use std::fmt;

const BF16: u64 = 2;
const F32: u64 = 4;

/// The run shape the estimate is made for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryInputs {
    /// Tokens in one training micro-batch (packed sequences).
    pub micro_batch_tokens: u64,
    /// Sequences decoded at once during rollout (KV-cache slots).
    pub rollout_seqs: u64,
    /// Longest sequence (prompt + response) a KV-cache slot holds.
    pub max_len: u64,
    /// Token rows of one vocabulary tile in the fused lm_head + log-softmax.
    pub vocab_tile_rows: u64,
    /// The frozen reference model lives in host memory and is streamed in layer by layer.
    pub offload_reference: bool,
}

impl Default for MemoryInputs {
    fn default() -> Self {
        MemoryInputs {
            micro_batch_tokens: 16384,
            rollout_seqs: 64,
            max_len: 4096,
            vocab_tile_rows: 1024,
            offload_reference: false,
        }
    }
}

/// Bytes needed by each part of a GRPO step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryEstimate {
    pub inputs: MemoryInputs,
    pub num_params: u64,
    /// Policy weights in bf16.
    pub weights: u64,
    /// Parameter gradients in f32.
    pub grads: u64,
    /// AdamW first and second moments in f32.
    pub adam: u64,
    /// f32 master copy of the weights.
    pub master: u64,
    /// Reference model in bf16 on the GPU (with offloading: one layer's weights).
    pub reference: u64,
    /// Key/value cache of `rollout_seqs` × `max_len` tokens, bf16.
    pub kv_cache: u64,
    /// f32 logits of one decode step for every rollout sequence.
    pub rollout_logits: u64,
    /// Activations kept for the backward of one micro-batch, every layer saved.
    pub activations_full: u64,
    /// Activations with per-layer recomputation: each layer's input plus one layer's working set.
    pub activations_recompute: u64,
    /// Fused vocabulary logprob buffers: one f32 logits tile plus per-token logp, lse, entropy
    /// and dlogp, and the final hidden states.
    pub vocab_buffers: u64,
}

/// Saturating product: every figure here is a product of user-given sizes, and a size that
/// does not fit in 64 bits must read as "too large", never wrap to a small number.
pub(crate) fn mul(xs: &[u64]) -> u64 {
    xs.iter().fold(1u64, |a, &x| a.saturating_mul(x))
}

/// Saturating sum (see [`mul`]).
pub(crate) fn add(xs: &[u64]) -> u64 {
    xs.iter().fold(0u64, |a, &x| a.saturating_add(x))
}

pub(crate) fn to64(v: usize) -> u64 {
    u64::try_from(v).unwrap_or(u64::MAX)
}

/// The buffers one decoder layer saves for its backward, as elements per token: the bf16
/// tensors (layer input, normed input, q, k, v, attention output, residual after attention,
/// normed residual, gate, up, silu(gate)*up) and the f32 statistics (two RMSNorm rstd values
/// and one attention logsumexp per head). Each is one device buffer of tokens x width.
pub fn layer_saved_buffers(cfg: &Qwen2Config) -> ([u64; 11], [u64; 3]) {
    let h = to64(cfg.hidden_size);
    let q = mul(&[to64(cfg.num_attention_heads), to64(cfg.head_dim)]);
    let kv = mul(&[to64(cfg.num_key_value_heads), to64(cfg.head_dim)]);
    let i = to64(cfg.intermediate_size);
    (
        [h, h, q, kv, kv, q, h, h, i, i, i],
        [1, 1, to64(cfg.num_attention_heads)],
    )
}

/// bf16 elements one decoder layer saves per token for its backward, and f32 statistics.
fn layer_saved_per_token(cfg: &Qwen2Config) -> (u64, u64) {
    let (bf16, f32s) = layer_saved_buffers(cfg);
    (add(&bf16), add(&f32s))
}

/// Device bytes per token of one decoder layer's working set in a forward without a tape
/// (prefill, scoring): the tensors a layer keeps for its backward, plus the residual stream
/// in and out (bf16).
pub fn layer_work_per_token(cfg: &Qwen2Config) -> u64 {
    let (saved_bf16, saved_f32) = layer_saved_per_token(cfg);
    add(&[
        mul(&[saved_bf16, BF16]),
        mul(&[saved_f32, F32]),
        mul(&[2, to64(cfg.hidden_size), BF16]),
    ])
}

impl MemoryEstimate {
    /// The estimate for `cfg` (a validated config, see `Qwen2Config::validate`). All arithmetic
    /// saturates at `u64::MAX`, so an absurd run shape gives an absurd figure that fails every
    /// fit check instead of a wrapped one that passes.
    pub fn new(cfg: &Qwen2Config, inputs: MemoryInputs) -> Self {
        let layout = ParamLayout::new(cfg);
        let p = layout.num_params();
        let layers = to64(cfg.num_hidden_layers);
        let h = to64(cfg.hidden_size);
        let vocab = to64(cfg.vocab_size);
        let kv = mul(&[to64(cfg.num_key_value_heads), to64(cfg.head_dim)]);
        let t = inputs.micro_batch_tokens;

        let per_layer_params: u64 = layout
            .layers
            .first()
            .map(|l| {
                l.all()
                    .iter()
                    .map(|&ix| layout.specs[ix].numel() as u64)
                    .sum()
            })
            .unwrap_or(0);
        let reference = if inputs.offload_reference {
            // Double-buffered layer streaming plus the embedding, final norm and lm_head.
            let resident = p.saturating_sub(mul(&[layers, per_layer_params]));
            mul(&[add(&[mul(&[2, per_layer_params]), resident]), BF16])
        } else {
            mul(&[p, BF16])
        };

        let (saved_bf16, saved_f32) = layer_saved_per_token(cfg);
        let per_layer_act = mul(&[t, add(&[mul(&[saved_bf16, BF16]), mul(&[saved_f32, F32])])]);
        // Gradient buffers of the residual stream and of one layer's intermediates while its
        // backward runs.
        let backward_work = add(&[per_layer_act, mul(&[2, t, h, BF16])]);
        let activations_full = add(&[mul(&[layers, per_layer_act]), backward_work]);
        let activations_recompute =
            add(&[mul(&[layers, t, h, BF16]), per_layer_act, backward_work]);

        let tile = inputs.vocab_tile_rows.min(t.max(1));
        let vocab_buffers = add(&[
            mul(&[tile, vocab, F32]),
            mul(&[4, t, F32]),
            mul(&[2, t, h, BF16]),
        ]);

        MemoryEstimate {
            inputs,
            num_params: p,
            weights: mul(&[p, BF16]),
            grads: mul(&[p, F32]),
            adam: mul(&[2, p, F32]),
            master: mul(&[p, F32]),
            reference,
            kv_cache: mul(&[inputs.rollout_seqs, inputs.max_len, layers, 2, kv, BF16]),
            rollout_logits: mul(&[inputs.rollout_seqs, vocab, F32]),
            activations_full,
            activations_recompute,
            vocab_buffers,
        }
    }

    /// Weights, gradients, optimizer state, master copy and reference model: held all run.
    pub fn resident(&self) -> u64 {
        add(&[
            self.weights,
            self.grads,
            self.adam,
            self.master,
            self.reference,
        ])
    }

    /// Peak during rollout (resident + KV cache + decode logits).
    pub fn rollout_peak(&self) -> u64 {
        add(&[self.resident(), self.kv_cache, self.rollout_logits])
    }

    /// Peak during a training micro-batch, with or without per-layer recomputation.
    pub fn train_peak(&self, recompute: bool) -> u64 {
        let act = if recompute {
            self.activations_recompute
        } else {
            self.activations_full
        };
        add(&[self.resident(), act, self.vocab_buffers])
    }

    /// The larger of the rollout and training peaks.
    pub fn peak(&self, recompute: bool) -> u64 {
        self.rollout_peak().max(self.train_peak(recompute))
    }

    /// Peak on the CPU backend, which keeps weights, activations and the KV cache in f32 (twice
    /// the bf16 figures) and needs no master copy.
    pub fn cpu_peak(&self, recompute: bool) -> u64 {
        let act = if recompute {
            self.activations_recompute
        } else {
            self.activations_full
        };
        add(&[
            self.peak(recompute).saturating_sub(self.master),
            self.weights,
            self.reference,
            self.kv_cache,
            act,
        ])
    }
}

/// Bytes in the largest binary unit that keeps the figure at or above 1 (two decimals).
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut x = bytes as f64;
    let mut u = 0;
    while x >= 1024.0 && u + 1 < UNITS.len() {
        x /= 1024.0;
        u += 1;
    }
    if bytes == u64::MAX {
        "more than 16 EiB (the size overflows)".to_string()
    } else if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{x:.2} {}", UNITS[u])
    }
}

impl fmt::Display for MemoryEstimate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &self.inputs;
        let row = |f: &mut fmt::Formatter<'_>, what: &str, bytes: u64| {
            writeln!(f, "  {what:<58} {:>12}", human_bytes(bytes))
        };
        writeln!(
            f,
            "GRPO memory estimate ({} parameters; micro-batch {} tokens; rollout {} x {} tokens)",
            self.num_params, i.micro_batch_tokens, i.rollout_seqs, i.max_len
        )?;
        row(f, "policy weights (bf16)", self.weights)?;
        row(f, "gradients (f32)", self.grads)?;
        row(f, "AdamW m + v (f32)", self.adam)?;
        row(f, "master weights (f32)", self.master)?;
        let ref_label = if i.offload_reference {
            "reference model (bf16, offloaded: 2 layers + embeddings)"
        } else {
            "reference model (bf16)"
        };
        row(f, ref_label, self.reference)?;
        row(f, "= resident all run", self.resident())?;
        row(
            f,
            &format!(
                "KV cache (bf16, {} seqs x {} tokens)",
                i.rollout_seqs, i.max_len
            ),
            self.kv_cache,
        )?;
        row(f, "decode logits (f32)", self.rollout_logits)?;
        row(f, "= rollout peak", self.rollout_peak())?;
        row(f, "activations, all layers saved", self.activations_full)?;
        row(
            f,
            "activations, per-layer recomputation",
            self.activations_recompute,
        )?;
        row(
            f,
            &format!(
                "fused vocab logprob buffers ({}-row tile)",
                i.vocab_tile_rows
            ),
            self.vocab_buffers,
        )?;
        row(f, "= training peak, all saved", self.train_peak(false))?;
        row(f, "= training peak, recompute", self.train_peak(true))?;
        row(f, "peak (recompute)", self.peak(true))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg_7b() -> Qwen2Config {
        crate::model::init::tiny_config(3584, 28, 28, 4, 18944, 152064, false)
    }

    #[test]
    fn figures_follow_the_config() {
        let cfg = cfg_7b();
        let e = MemoryEstimate::new(&cfg, MemoryInputs::default());
        assert_eq!(e.num_params, 7_615_616_512);
        assert_eq!(e.weights, 2 * e.num_params);
        assert_eq!(e.adam, 8 * e.num_params);
        // 64 seqs x 4096 tokens x 28 layers x (k+v) x 512 x 2 bytes
        assert_eq!(e.kv_cache, 64 * 4096 * 28 * 2 * 512 * 2);
        assert!(e.activations_recompute < e.activations_full);
        let off = MemoryEstimate::new(
            &cfg,
            MemoryInputs {
                offload_reference: true,
                ..Default::default()
            },
        );
        assert!(off.reference < e.reference / 4);
        let text = e.to_string();
        assert!(text.contains("KV cache"), "{text}");
        assert!(text.contains("7615616512"), "{text}");
        assert_eq!(cfg.checked_num_params(), Some(e.num_params));
        for tied in [false, true] {
            let c = crate::model::init::tiny_config(24, 3, 4, 2, 40, 50, tied);
            assert_eq!(
                c.checked_num_params(),
                Some(ParamLayout::new(&c).num_params()),
                "tied {tied}"
            );
        }
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 << 29), "1.50 GiB");
    }

    #[test]
    fn activations_scale_with_tokens() {
        let cfg = cfg_7b();
        let a = MemoryEstimate::new(
            &cfg,
            MemoryInputs {
                micro_batch_tokens: 1000,
                ..Default::default()
            },
        );
        let b = MemoryEstimate::new(
            &cfg,
            MemoryInputs {
                micro_batch_tokens: 2000,
                ..Default::default()
            },
        );
        assert_eq!(b.activations_full, 2 * a.activations_full);
        assert_eq!(b.activations_recompute, 2 * a.activations_recompute);
    }

    #[test]
    fn huge_run_shapes_saturate_instead_of_wrapping() {
        // 2^55 sequences x 2^20 tokens wrapped the KV-cache figure to 0 B with plain u64 math.
        let cfg = cfg_7b();
        let e = MemoryEstimate::new(
            &cfg,
            MemoryInputs {
                rollout_seqs: 1 << 55,
                max_len: 1 << 20,
                micro_batch_tokens: u64::MAX / 3,
                ..Default::default()
            },
        );
        assert_eq!(e.kv_cache, u64::MAX);
        assert_eq!(e.peak(true), u64::MAX);
        assert_eq!(e.cpu_peak(true), u64::MAX);
        assert!(human_bytes(e.peak(true)).contains("overflows"));
    }
}
