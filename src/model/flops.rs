//! Model FLOPs, written once: what a pass over some token rows costs, counted from the config.
//!
//! Forward FLOPs of a pass ([`Work::forward_flops`]):
//!
//! ```text
//! 2 * rows * P_layers                         every token row through the layers' GEMMs
//! + 2 * logit_rows * hidden * vocab           the lm_head at the rows whose logits are used
//! + 4 * layers * n_heads * head_dim * pairs   scores q·k and the weighted sum of v
//! ```
//!
//! with `P_layers` the weights of the layers' GEMMs (q, k, v, o projections and the gate, up and
//! down projections: `layers * (2 * hidden * (q_dim + kv_dim) + 3 * hidden * intermediate)`,
//! q_dim = n_heads * head_dim, kv_dim = n_kv * head_dim) and `pairs` the (query, key) pairs the
//! attention evaluates (a causal sequence of L rows has L (L + 1) / 2; a decode row with c cached
//! positions has c). Multiply-adds count 2; biases, norms, RoPE, the softmaxes and SwiGLU are
//! left out (lower order). A forward + backward pass is 3x the forward (the backward computes
//! the input and the weight gradients, each a GEMM of the forward's size), the convention of
//! model FLOP utilisation (Chowdhery et al., "PaLM", arXiv 2204.02311, appendix B): activation
//! recomputation redoes a forward but is not counted, so MFU measures useful work.

use crate::model::Qwen2Config;

/// The work of some passes: token rows through the layers, rows through the lm_head, and the
/// (query, key) pairs of attention. Counts add up over passes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Work {
    pub rows: u64,
    pub logit_rows: u64,
    pub attn_pairs: u64,
}

impl Work {
    /// A causal pass over one sequence of `len` rows, with logits at `logit_rows` of them.
    pub fn causal(len: u64, logit_rows: u64) -> Work {
        Work {
            rows: len,
            logit_rows,
            attn_pairs: len * (len + 1) / 2,
        }
    }

    pub fn add(&mut self, o: Work) {
        self.rows += o.rows;
        self.logit_rows += o.logit_rows;
        self.attn_pairs += o.attn_pairs;
    }

    /// Forward FLOPs of this work for `cfg` (the formula of the module doc).
    pub fn forward_flops(&self, cfg: &Qwen2Config) -> f64 {
        let h = cfg.hidden_size as f64;
        let qd = (cfg.num_attention_heads * cfg.head_dim) as f64;
        let kvd = (cfg.num_key_value_heads * cfg.head_dim) as f64;
        let layers = cfg.num_hidden_layers as f64;
        let p_layers = layers * (2.0 * h * (qd + kvd) + 3.0 * h * cfg.intermediate_size as f64);
        2.0 * self.rows as f64 * p_layers
            + 2.0 * self.logit_rows as f64 * h * cfg.vocab_size as f64
            + 4.0 * layers * qd * self.attn_pairs as f64
    }

    /// Forward + backward FLOPs (3x the forward).
    pub fn train_flops(&self, cfg: &Qwen2Config) -> f64 {
        3.0 * self.forward_flops(cfg)
    }
}

/// Model FLOP utilisation: `flops` done in `seconds` against a peak of `peak_tflops` TFLOP/s;
/// None without a peak or a positive time.
pub fn mfu(flops: f64, seconds: f64, peak_tflops: Option<f64>) -> Option<f64> {
    match peak_tflops {
        Some(p) if p > 0.0 && seconds > 0.0 => Some(flops / seconds / (p * 1e12)),
        _ => None,
    }
}

/// Dense bf16 tensor-core peak (TFLOP/s, without sparsity) of a CUDA device by its name, from
/// NVIDIA's data sheets: H100 / H200 SXM 989, H100 NVL 835, H100 PCIe 756, A100 312, L40S 362,
/// A10 125, L4 121. Unknown devices: None (no utilisation is reported).
pub fn cuda_peak_tflops(name: &str) -> Option<f64> {
    let n = name.to_ascii_uppercase();
    // More specific names first ("H100 PCIE" before "H100", "L40S" before "L4").
    let table: [(&str, f64); 7] = [
        ("H200", 989.0),
        ("H100 PCIE", 756.0),
        ("H100 NVL", 835.0),
        ("H100", 989.0),
        ("A100", 312.0),
        ("L40S", 362.0),
        ("A10", 125.0),
    ];
    table
        .iter()
        .find(|(k, _)| n.contains(k))
        .map(|&(_, v)| v)
        .or_else(|| n.contains(" L4").then_some(121.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::init;

    #[test]
    fn forward_flops_by_hand() {
        // hidden 32, 2 layers, 4 heads of 8 (q_dim 32), 2 kv heads (kv_dim 16), inter 48, vocab 61
        let cfg = init::tiny_config(32, 2, 4, 2, 48, 61, true);
        assert_eq!(cfg.head_dim, 8);
        let p_layers = 2.0 * (2.0 * 32.0 * (32.0 + 16.0) + 3.0 * 32.0 * 48.0);
        let w = Work::causal(5, 2);
        assert_eq!(w.attn_pairs, 15);
        let want = 2.0 * 5.0 * p_layers + 2.0 * 2.0 * 32.0 * 61.0 + 4.0 * 2.0 * 32.0 * 15.0;
        assert_eq!(w.forward_flops(&cfg), want);
        assert_eq!(w.train_flops(&cfg), 3.0 * want);
        let mut t = Work::default();
        t.add(w);
        t.add(w);
        assert_eq!(t.forward_flops(&cfg), 2.0 * want);
        // The GEMM term is 2 * rows * (the layers' GEMM weights of the parameter layout).
        let layout = crate::model::ParamLayout::new(&cfg);
        let gemm: usize = layout
            .layers
            .iter()
            .map(|l| {
                [l.wq, l.wk, l.wv, l.wo, l.w_gate, l.w_up, l.w_down]
                    .iter()
                    .map(|&i| layout.specs[i].numel())
                    .sum::<usize>()
            })
            .sum();
        assert_eq!(gemm as f64, p_layers);
    }

    #[test]
    fn peaks_and_mfu() {
        assert_eq!(cuda_peak_tflops("NVIDIA H200"), Some(989.0));
        assert_eq!(cuda_peak_tflops("NVIDIA H100 80GB HBM3"), Some(989.0));
        assert_eq!(cuda_peak_tflops("NVIDIA H100 PCIe"), Some(756.0));
        assert_eq!(cuda_peak_tflops("NVIDIA A100-SXM4-80GB"), Some(312.0));
        assert_eq!(cuda_peak_tflops("virtual GPU"), None);
        assert_eq!(mfu(989e12, 2.0, Some(989.0)), Some(0.5));
        assert_eq!(mfu(1.0, 1.0, None), None);
        assert_eq!(mfu(1.0, 0.0, Some(1.0)), None);
    }
}
