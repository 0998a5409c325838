//! Tiny random Qwen2 models (for `tooln1 init-tiny`, tests and the demo).
//!
//! [`random_params`] follows HF's `_init_weights` for Qwen2: linear and embedding weights
//! ~ N(0, 0.02²), RMSNorm weights 1. The q/k/v biases get small N(0, 0.02²) values instead of
//! zeros so that tests exercise the bias paths. The stream is ChaCha8 seeded by `seed`, so a
//! seed always gives the same model.

use crate::model::{ParamLayout, Qwen2Config};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Standard deviation of the normal init (HF `initializer_range`).
pub const INIT_STD: f32 = 0.02;

/// Standard normal samples (Box-Muller) from a seeded stream.
pub struct Normal {
    rng: ChaCha8Rng,
    spare: Option<f32>,
}

impl Normal {
    pub fn new(seed: u64) -> Self {
        Normal {
            rng: ChaCha8Rng::seed_from_u64(seed),
            spare: None,
        }
    }

    /// One N(0, 1) sample.
    pub fn sample(&mut self) -> f32 {
        if let Some(z) = self.spare.take() {
            return z;
        }
        // u1 in (0, 1] so that ln(u1) is finite.
        let u1: f64 = 1.0 - self.rng.random::<f64>();
        let u2: f64 = self.rng.random::<f64>();
        let r = (-2.0 * u1.ln()).sqrt();
        let (s, c) = (2.0 * std::f64::consts::PI * u2).sin_cos();
        self.spare = Some((r * s) as f32);
        (r * c) as f32
    }
}

/// Random parameters for `cfg` as host vectors in [`ParamLayout`] order.
pub fn random_params(cfg: &Qwen2Config, seed: u64) -> Vec<Vec<f32>> {
    let layout = ParamLayout::new(cfg);
    let mut normal = Normal::new(seed);
    layout
        .specs
        .iter()
        .map(|s| {
            if s.name.ends_with("norm.weight") {
                vec![1.0; s.numel()]
            } else {
                (0..s.numel()).map(|_| INIT_STD * normal.sample()).collect()
            }
        })
        .collect()
}

/// A small Qwen2 config for tests and demos (head_dim = hidden / heads).
pub fn tiny_config(
    hidden: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    intermediate: usize,
    vocab: usize,
    tied: bool,
) -> Qwen2Config {
    Qwen2Config {
        architectures: vec![crate::model::config::ARCHITECTURE.to_string()],
        hidden_size: hidden,
        intermediate_size: intermediate,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim: hidden.checked_div(heads).unwrap_or(0),
        vocab_size: vocab,
        rms_norm_eps: 1e-6,
        rope_theta: 10000.0,
        max_position_embeddings: 4096,
        tie_word_embeddings: tied,
        bos_token_id: Some(0),
        eos_token_id: vec![0],
        torch_dtype: "float32".into(),
        hidden_act: "silu".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_moments_and_determinism() {
        let mut a = Normal::new(7);
        let xs: Vec<f64> = (0..200_000).map(|_| a.sample() as f64).collect();
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / xs.len() as f64;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.02, "variance {var}");
        let mut b = Normal::new(7);
        assert_eq!(
            xs[..10],
            (0..10).map(|_| b.sample() as f64).collect::<Vec<_>>()[..]
        );
    }

    #[test]
    fn random_params_follow_the_layout() {
        let cfg = tiny_config(24, 2, 4, 2, 40, 50, false);
        let p = random_params(&cfg, 3);
        let layout = ParamLayout::new(&cfg);
        assert_eq!(p.len(), layout.specs.len());
        for (s, v) in layout.specs.iter().zip(&p) {
            assert_eq!(v.len(), s.numel(), "{}", s.name);
            assert!(v.iter().all(|x| x.is_finite()), "{}", s.name);
            if s.name.ends_with("norm.weight") {
                assert!(v.iter().all(|&x| x == 1.0), "{}", s.name);
            } else {
                let std = (v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32).sqrt();
                assert!(std > 0.005 && std < 0.05, "{}: std {std}", s.name);
            }
        }
        assert_eq!(p, random_params(&cfg, 3));
        assert_ne!(p, random_params(&cfg, 4));
    }
}
