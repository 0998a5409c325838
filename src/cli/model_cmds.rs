//! `tooln1 inspect` and `tooln1 init-tiny`.

use crate::backend::DType;
use crate::model::init::{write_tiny_model, TinyOptions, TinyVocab};
use crate::model::memory::{MemoryEstimate, MemoryInputs};
use crate::model::plan::{plan, Budget, Caps, RunShape};
use crate::model::weights::Checkpoint;
use crate::model::{ParamLayout, Qwen2Config};
use crate::tokenizer::{Tokenizer, TINY_TOKENIZER_CONFIG_JSON, TINY_TOKENIZER_JSON};
use crate::train::config::{load_config, TrainConfig};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct InspectArgs {
    /// Model folder (config.json, *.safetensors) or a config.json file.
    pub model: std::path::PathBuf,
    /// Tokens in one training micro-batch, for the activation estimate.
    #[arg(long, default_value_t = 16384)]
    pub micro_batch_tokens: u64,
    /// Sequences decoded at once during rollout (KV-cache slots).
    #[arg(long, default_value_t = 64)]
    pub rollout_seqs: u64,
    /// Longest prompt + response a rollout sequence may reach.
    #[arg(long, default_value_t = 4096)]
    pub max_len: u64,
    /// Estimate with the reference model kept in host memory and streamed per layer.
    #[arg(long)]
    pub offload_reference: bool,
    /// Free GPU memory, in GB (10^9 bytes), of each GPU to plan a GRPO run for (repeatable or
    /// comma-separated).
    #[arg(long = "gpu-gb", value_delimiter = ',', default_values_t = [80.0, 141.0])]
    pub gpu_gb: Vec<f64>,
    /// GPU counts of one machine to plan for (data parallel: the plan is each GPU's; repeatable
    /// or comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [1u64, 8])]
    pub gpus: Vec<u64>,
    /// Training config whose run settings the plans use (default: Tool-N1's recipe, the
    /// defaults of `tooln1 train`).
    #[arg(long)]
    pub config: Option<PathBuf>,
}

/// Qwen2.5 configs built from their published shapes, for `inspect` without a config file.
pub fn builtin_config(name: &str) -> Option<Qwen2Config> {
    let mk = crate::model::init::tiny_config;
    match name.to_ascii_lowercase().as_str() {
        "qwen2.5-7b" => Some(mk(3584, 28, 28, 4, 18944, 152064, false)),
        "qwen2.5-14b" => Some(mk(5120, 48, 40, 8, 13824, 152064, false)),
        _ => None,
    }
}

#[derive(clap::Args, Debug)]
pub struct InitTinyArgs {
    /// Output folder.
    pub dir: std::path::PathBuf,
    /// Random seed of the weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 64)]
    pub hidden: usize,
    #[arg(long, default_value_t = 2)]
    pub layers: usize,
    #[arg(long, default_value_t = 4)]
    pub heads: usize,
    #[arg(long, default_value_t = 2)]
    pub kv_heads: usize,
    #[arg(long, default_value_t = 96)]
    pub intermediate: usize,
    /// Tie the lm_head to the embedding table.
    #[arg(long)]
    pub tied: bool,
    /// Store the weights in bf16 instead of f32.
    #[arg(long)]
    pub bf16: bool,
    /// Replace DIR if it already holds a model folder (only model files; any other file in it
    /// is never deleted and makes this an error).
    #[arg(long)]
    pub force: bool,
}

/// The config and, for a folder with weights, the stored tensors' summary.
pub fn inspect_report(a: &InspectArgs) -> anyhow::Result<String> {
    let builtin = a.model.to_str().and_then(builtin_config);
    let (cfg, weights) = if let Some(cfg) = builtin {
        (cfg, None)
    } else if a.model.is_dir() {
        let has_weights = a.model.join(crate::model::weights::SINGLE_FILE).exists()
            || a.model.join(crate::model::weights::INDEX_FILE).exists();
        if has_weights {
            let ck = Checkpoint::open(&a.model)?;
            let summary = weights_summary(&ck)?;
            (ck.cfg.clone(), Some(summary))
        } else {
            (Qwen2Config::from_file(&a.model.join("config.json"))?, None)
        }
    } else {
        (Qwen2Config::from_file(&a.model)?, None)
    };
    let layout = ParamLayout::new(&cfg);
    let mut s = String::new();
    let _ = writeln!(s, "model: {}", a.model.display());
    let _ = writeln!(
        s,
        "  hidden {} | intermediate {} | layers {} | heads {} (kv {}) | head_dim {} | vocab {}",
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_hidden_layers,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
        cfg.vocab_size
    );
    let _ = writeln!(
        s,
        "  rope_theta {} | rms_norm_eps {:e} | max_position {} | tied embeddings {} | dtype {}",
        cfg.rope_theta,
        cfg.rms_norm_eps,
        cfg.max_position_embeddings,
        cfg.tie_word_embeddings,
        cfg.torch_dtype
    );
    let _ = writeln!(
        s,
        "  bos {:?} | eos {:?}",
        cfg.bos_token_id, cfg.eos_token_id
    );
    let _ = writeln!(
        s,
        "parameters: {} ({:.3} B) in {} tensors",
        layout.num_params(),
        layout.num_params() as f64 / 1e9,
        layout.specs.len()
    );
    if let Some(w) = weights {
        s.push_str(&w);
    }
    let est = MemoryEstimate::new(
        &cfg,
        MemoryInputs {
            micro_batch_tokens: a.micro_batch_tokens,
            rollout_seqs: a.rollout_seqs,
            max_len: a.max_len,
            offload_reference: a.offload_reference,
            ..Default::default()
        },
    );
    let _ = write!(s, "{est}");
    s.push_str(&plans_report(&cfg, a)?);
    Ok(s)
}

/// The GRPO memory plan of `cfg` on each GPU of `a.gpu_gb`, at the run settings of `a.config`
/// (Tool-N1's by default), with every placement this build runs.
fn plans_report(cfg: &Qwen2Config, a: &InspectArgs) -> anyhow::Result<String> {
    let tc: TrainConfig = load_config(a.config.as_deref(), &[])?;
    tc.validate()?;
    let shape = tc.run_shape();
    let mut s = String::new();
    let _ =
        writeln!(
        s,
        "\nGRPO memory plans at {} ({} prompts x n = {}, prompt <= {} + response <= {} tokens, \
         micro-batch {} tokens, rollout slots <= {}, recompute {}, memory = {}):",
        match &a.config {
            Some(p) => p.display().to_string(),
            None => "Tool-N1's settings".to_string(),
        },
        tc.grpo.prompts_per_step,
        tc.rollout.n,
        tc.rollout.max_prompt_tokens,
        tc.rollout.max_new_tokens,
        tc.grpo.micro_batch_tokens,
        tc.rollout.max_slots,
        tc.grpo.recompute,
        toml::Value::try_from(tc.memory).map(|v| v.to_string()).unwrap_or_default(),
    );
    for &n in &a.gpus {
        if n == 0 || n > 1024 {
            anyhow::bail!("--gpus: expected a GPU count from 1 to 1024, got {n}");
        }
    }
    for &gb in &a.gpu_gb {
        if !(gb.is_finite() && gb > 0.0 && gb < 1e9) {
            anyhow::bail!("--gpu-gb: expected a size in GB greater than 0, got {gb}");
        }
        let budget = Budget {
            device_free: (gb * 1e9) as u64,
            host_available: None,
        };
        for &n in &a.gpus {
            let shape = RunShape { ranks: n, ..shape };
            let engine = plan(cfg, &shape, &budget, &tc.memory, &Caps::ENGINE)
                .map_err(anyhow::Error::msg)?;
            let what = if n == 1 {
                format!("one GPU with {gb} GB free")
            } else {
                format!("each of {n} GPUs with {gb} GB free (data parallel, ZeRO-2 shards)")
            };
            let _ = writeln!(s, "\n{what}, placements this build runs:");
            let _ = write!(s, "{engine}");
        }
    }
    Ok(s)
}

fn weights_summary(ck: &Checkpoint) -> anyhow::Result<String> {
    let layout = ParamLayout::new(&ck.cfg);
    let mut counts = [0usize; 3];
    let mut bytes = 0u64;
    for spec in &layout.specs {
        let t = ck.expect(&spec.name, &spec.shape)?;
        bytes += t.bytes.len() as u64;
        counts[match t.dtype {
            DType::F32 => 0,
            DType::BF16 => 1,
            DType::F16 => 2,
        }] += 1;
    }
    let extra = ck.tensor_names().len() as i64 - layout.specs.len() as i64;
    Ok(format!(
        "weights: every layout tensor present with its shape ({} f32, {} bf16, {} f16; \
         {:.2} MiB){}\n",
        counts[0],
        counts[1],
        counts[2],
        bytes as f64 / (1 << 20) as f64,
        if extra > 0 {
            format!("; {extra} other tensors ignored")
        } else {
            String::new()
        }
    ))
}

pub fn inspect(a: InspectArgs) -> anyhow::Result<()> {
    print!("{}", inspect_report(&a)?);
    Ok(())
}

pub fn init_tiny(a: InitTinyArgs) -> anyhow::Result<()> {
    let o = TinyOptions {
        seed: a.seed,
        hidden: a.hidden,
        layers: a.layers,
        heads: a.heads,
        kv_heads: a.kv_heads,
        intermediate: a.intermediate,
        tied: a.tied,
        dtype: if a.bf16 { DType::BF16 } else { DType::F32 },
        overwrite: a.force,
    };
    let cfg = write_tiny_model(&a.dir, &o, &builtin_tiny_vocab()?)?;
    println!(
        "wrote {}: {} parameters (hidden {}, {} layers, vocab {}, seed {})",
        display(&a.dir),
        ParamLayout::new(&cfg).num_params(),
        cfg.hidden_size,
        cfg.num_hidden_layers,
        cfg.vocab_size,
        a.seed
    );
    Ok(())
}

/// The built-in tiny tokenizer ([`TINY_TOKENIZER_JSON`]) as a tiny model folder takes it: 302
/// tokens, bos `<|endoftext|>`, eos `<|im_end|>`, and its two files.
pub fn builtin_tiny_vocab() -> crate::Result<TinyVocab> {
    let tok = Tokenizer::from_bytes(TINY_TOKENIZER_JSON, "built-in tiny tokenizer")?;
    Ok(TinyVocab {
        tokens: tok.vocab_size(),
        bos_token_id: tok.token_id("<|endoftext|>"),
        eos_token_id: tok.token_id("<|im_end|>"),
        files: vec![
            ("tokenizer.json".into(), TINY_TOKENIZER_JSON.to_vec()),
            (
                "tokenizer_config.json".into(),
                TINY_TOKENIZER_CONFIG_JSON.to_vec(),
            ),
        ],
    })
}

fn display(p: &Path) -> String {
    PathBuf::from(p).display().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(p: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(p)
    }

    fn args(model: PathBuf) -> InspectArgs {
        InspectArgs {
            model,
            micro_batch_tokens: 8192,
            rollout_seqs: 32,
            max_len: 2048,
            offload_reference: false,
            gpu_gb: vec![80.0, 141.0],
            gpus: vec![1, 8],
            config: None,
        }
    }

    #[test]
    fn inspect_real_7b_config() {
        let r = inspect_report(&args(fixture("qwen2.5/config.json"))).unwrap();
        assert!(r.contains("parameters: 7615616512"), "{r}");
        assert!(r.contains("KV cache"), "{r}");
    }

    #[test]
    fn inspect_fixture_folder_checks_weights() {
        let r = inspect_report(&args(fixture("golden/untied"))).unwrap();
        assert!(r.contains("every layout tensor present"), "{r}");
        assert!(r.contains("parameters: 133952"), "{r}");
        let e = inspect_report(&args(fixture("no/such/config.json"))).unwrap_err();
        assert!(format!("{e:#}").contains("no/such/config.json"), "{e:#}");
    }
}
