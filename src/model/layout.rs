//! The parameter layout of a Qwen2 model: every tensor by HF name and shape, in the fixed order
//! that parameter, gradient and optimizer vectors use (tied embeddings share one index).

use crate::model::Qwen2Config;

/// One parameter tensor: its HF name and shape (row-major).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

impl ParamSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Indices into [`ParamLayout::specs`] (and into a model's parameter and gradient vectors) of
/// one decoder layer's tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerParams {
    pub input_norm: usize,
    pub wq: usize,
    pub bq: usize,
    pub wk: usize,
    pub bk: usize,
    pub wv: usize,
    pub bv: usize,
    pub wo: usize,
    pub post_norm: usize,
    pub w_gate: usize,
    pub w_up: usize,
    pub w_down: usize,
}

impl LayerParams {
    /// The layer's twelve tensor indices, in layout order.
    pub fn all(&self) -> [usize; 12] {
        [
            self.input_norm,
            self.wq,
            self.bq,
            self.wk,
            self.bk,
            self.wv,
            self.bv,
            self.wo,
            self.post_norm,
            self.w_gate,
            self.w_up,
            self.w_down,
        ]
    }
}

/// Every parameter of a Qwen2 model in a fixed order, by HF name. With tied embeddings there is
/// no `lm_head.weight` and `lm_head == embed`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamLayout {
    pub specs: Vec<ParamSpec>,
    pub embed: usize,
    pub layers: Vec<LayerParams>,
    pub norm: usize,
    pub lm_head: usize,
}

impl ParamLayout {
    pub fn new(cfg: &Qwen2Config) -> Self {
        let h = cfg.hidden_size;
        let q = cfg.num_attention_heads * cfg.head_dim;
        let kv = cfg.num_key_value_heads * cfg.head_dim;
        let i = cfg.intermediate_size;
        let mut specs = Vec::new();
        let mut push = |name: String, shape: Vec<usize>| {
            specs.push(ParamSpec { name, shape });
            specs.len() - 1
        };
        let embed = push("model.embed_tokens.weight".into(), vec![cfg.vocab_size, h]);
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = |s: &str| format!("model.layers.{l}.{s}");
            layers.push(LayerParams {
                input_norm: push(p("input_layernorm.weight"), vec![h]),
                wq: push(p("self_attn.q_proj.weight"), vec![q, h]),
                bq: push(p("self_attn.q_proj.bias"), vec![q]),
                wk: push(p("self_attn.k_proj.weight"), vec![kv, h]),
                bk: push(p("self_attn.k_proj.bias"), vec![kv]),
                wv: push(p("self_attn.v_proj.weight"), vec![kv, h]),
                bv: push(p("self_attn.v_proj.bias"), vec![kv]),
                wo: push(p("self_attn.o_proj.weight"), vec![h, q]),
                post_norm: push(p("post_attention_layernorm.weight"), vec![h]),
                w_gate: push(p("mlp.gate_proj.weight"), vec![i, h]),
                w_up: push(p("mlp.up_proj.weight"), vec![i, h]),
                w_down: push(p("mlp.down_proj.weight"), vec![h, i]),
            });
        }
        let norm = push("model.norm.weight".into(), vec![h]);
        let lm_head = if cfg.tie_word_embeddings {
            embed
        } else {
            push("lm_head.weight".into(), vec![cfg.vocab_size, h])
        };
        ParamLayout {
            specs,
            embed,
            layers,
            norm,
            lm_head,
        }
    }

    /// Total number of parameters (tied embeddings counted once).
    pub fn num_params(&self) -> u64 {
        self.specs.iter().map(|s| s.numel() as u64).sum()
    }
}
