//! Tiny random Qwen2 models (for `tooln1 init-tiny`, tests and the demo).
//!
//! [`random_params`] follows HF's `_init_weights` for Qwen2: linear and embedding weights
//! ~ N(0, 0.02²), RMSNorm weights 1. The q/k/v biases get small N(0, 0.02²) values instead of
//! zeros so that tests exercise the bias paths. The stream is ChaCha8 seeded by `seed`, so a
//! seed always gives the same model.

use crate::backend::DType;
use crate::model::weights::{save_params, SaveOptions};
use crate::model::{ParamLayout, Qwen2Config};
use crate::{Error, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::Path;

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

/// Shape and seed of a tiny model written by [`write_tiny_model`].
#[derive(Clone, Debug, PartialEq)]
pub struct TinyOptions {
    pub seed: u64,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub intermediate: usize,
    pub tied: bool,
    pub dtype: DType,
    /// Replace an existing folder of model files (see [`SaveOptions::overwrite`]).
    pub overwrite: bool,
}

impl Default for TinyOptions {
    fn default() -> Self {
        TinyOptions {
            seed: 0,
            hidden: 64,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            intermediate: 96,
            tied: false,
            dtype: DType::F32,
            overwrite: false,
        }
    }
}

/// What a tiny model takes from its tokenizer, which the caller reads: the token count, the ids
/// the config records, and the tokenizer files written beside the weights (e.g.
/// [`crate::cli::model_cmds::builtin_tiny_vocab`]).
#[derive(Clone, Debug, PartialEq)]
pub struct TinyVocab {
    /// Tokens in the tokenizer; the config's `vocab_size` is this rounded up to a multiple of 64.
    pub tokens: usize,
    /// The config's `bos_token_id`.
    pub bos_token_id: Option<u32>,
    /// The config's `eos_token_id` (none: an empty list).
    pub eos_token_id: Option<u32>,
    /// (file name, contents) written into the folder with the weights, e.g. tokenizer.json and
    /// tokenizer_config.json.
    pub files: Vec<(String, Vec<u8>)>,
}

/// Write a tiny random Qwen2 model folder (config.json, model.safetensors and `vocab.files`)
/// loadable by [`crate::model::weights::load_model`]; `vocab_size` is `vocab.tokens` rounded up
/// to a multiple of 64.
pub fn write_tiny_model(dir: &Path, o: &TinyOptions, vocab: &TinyVocab) -> Result<Qwen2Config> {
    let padded = vocab.tokens.div_ceil(64) * 64;
    let mut cfg = tiny_config(
        o.hidden,
        o.layers,
        o.heads,
        o.kv_heads,
        o.intermediate,
        padded,
        o.tied,
    );
    if o.heads > 0 && o.hidden % o.heads != 0 {
        return Err(Error::Config {
            file: "init-tiny".into(),
            field: "hidden".into(),
            msg: format!("{} is not divisible by heads {}", o.hidden, o.heads),
        });
    }
    cfg.bos_token_id = vocab.bos_token_id;
    cfg.eos_token_id = vocab.eos_token_id.into_iter().collect();
    cfg.validate("init-tiny")?;
    // The parameters are built in host memory as f32 before they are written.
    let need = cfg.checked_num_params().and_then(|n| n.checked_mul(4));
    crate::safefs::check_host_memory(
        need,
        &format!(
            "init-tiny {}: {} parameters",
            dir.display(),
            cfg.checked_num_params().unwrap_or(u64::MAX)
        ),
    )?;
    let params = random_params(&cfg, o.seed);
    let opts = SaveOptions {
        dtype: o.dtype,
        extra_files: vocab.files.clone(),
        overwrite: o.overwrite,
        ..Default::default()
    };
    save_params(dir, &cfg, &params, &opts)?;
    Ok(cfg)
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

    #[test]
    fn tiny_model_folder_loads_back() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("tiny");
        let o = TinyOptions {
            seed: 11,
            layers: 3,
            tied: true,
            ..Default::default()
        };
        let vocab = crate::cli::model_cmds::builtin_tiny_vocab().unwrap();
        let cfg = write_tiny_model(&out, &o, &vocab).unwrap();
        assert_eq!(cfg.vocab_size, 320);
        assert_eq!(cfg.eos_token_id, vec![2]);
        let ck = crate::model::weights::Checkpoint::open(&out).unwrap();
        assert_eq!(ck.cfg, cfg);
        assert_eq!(ck.load_host().unwrap(), random_params(&cfg, 11));
        let tok = crate::tokenizer::Tokenizer::from_dir(&out).unwrap();
        assert_eq!(tok.vocab_size(), 302);
        let tpl = crate::tokenizer::ChatTemplate::from_tokenizer_config(
            &out.join("tokenizer_config.json"),
        )
        .unwrap();
        assert_eq!(tpl.source, crate::tokenizer::QWEN25_CHAT_TEMPLATE);
        let bad = TinyOptions {
            hidden: 30,
            heads: 4,
            ..Default::default()
        };
        assert!(write_tiny_model(&dir.path().join("bad"), &bad, &vocab).is_err());
    }
}
