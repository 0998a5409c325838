//! HF `config.json` for `Qwen2ForCausalLM`.

use serde::{Deserialize, Serialize};

/// The fields of a Qwen2 config this engine uses (facts §2.2). `head_dim` is derived
/// (hidden_size / num_attention_heads) unless the file gives it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Qwen2Config {
    pub architectures: Vec<String>,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    /// One or several end-of-sequence ids (HF allows an int or a list).
    pub eos_token_id: Vec<u32>,
    pub torch_dtype: String,
    pub hidden_act: String,
}
