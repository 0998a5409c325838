//! Training configuration: a TOML file plus `section.key=value` overrides from the command line.
//!
//! Every default is the Tool-N1 paper's recipe (Zhang et al. 2025, arXiv:2505.00024) on top of
//! verl's GRPO (`verl/trainer/ppo/core_algos.py`, `verl/trainer/config/ppo_trainer.yaml`): n = 5
//! rollouts per prompt, 1024 prompts per step in mini-batches of 256, temperature 0.7, clip 0.2,
//! k3 KL as a loss term with coefficient 1e-3, entropy coefficient 0, token-mean aggregation,
//! grad-norm clip 1.0, AdamW with a constant lr of 1e-6, activation recomputation on.

pub use crate::backend::select::DeviceKind;
use crate::backend::{KlKind, LossAgg};
use crate::model::plan::RunShape;
pub use crate::model::plan::{Place, Placement};
use crate::{Error, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// How group scores become advantages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum AdvantageKind {
    /// (s - mean) / (std + 1e-6), unbiased std (verl GRPO).
    #[default]
    Grpo,
    /// s - mean (Dr.GRPO).
    DrGrpo,
}

/// Learning-rate schedule over optimizer updates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum LrSchedule {
    /// Linear warm-up (if any) then constant.
    #[default]
    Constant,
    /// Linear warm-up then cosine decay to `min_lr_ratio * lr`.
    Cosine,
}

/// Rollout sampling.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RolloutConfig {
    /// Responses sampled per prompt (the GRPO group size).
    pub n: usize,
    /// 0 = greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// 0 = no top-k cut.
    pub top_k: usize,
    /// Prompts longer than this are left out of the data (counted and reported).
    pub max_prompt_tokens: usize,
    pub max_new_tokens: usize,
    /// At most this many sequences decode at a time, a stopped sequence's slot taking the next
    /// one at once (the rollout's memory is the paged KV cache's `kv_blocks`).
    pub max_slots: usize,
    /// Rows per block of the paged KV cache.
    pub kv_block_size: usize,
    /// Blocks of the paged KV cache's pool; 0 = sized by the memory planner on CUDA (from
    /// the free memory), else room for `max_slots` sequences of the longest length and one
    /// prompt. Fewer blocks admit fewer sequences at once and may preempt; the generations
    /// stay the same.
    pub kv_blocks: usize,
    /// Decode each step as the replay of a CUDA graph captured per batch-size bucket (1, 2,
    /// 4, ..., max_slots; `model::decode_graph`) instead of launching its kernels one by one.
    /// Only the CUDA backend with resident layers has graphs; elsewhere, or when a capture
    /// fails, steps run with plain launches. The generations are the same either way.
    pub cuda_graphs: bool,
}

impl Default for RolloutConfig {
    fn default() -> Self {
        RolloutConfig {
            n: 5,
            temperature: 0.7,
            top_p: 1.0,
            top_k: 0,
            max_prompt_tokens: 4096,
            max_new_tokens: 8192,
            max_slots: 256,
            kv_block_size: crate::model::kv_cache::DEFAULT_BLOCK_SIZE,
            kv_blocks: 0,
            cuda_graphs: true,
        }
    }
}

/// The GRPO update.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrpoConfig {
    /// Prompts per rollout batch (one training step).
    pub prompts_per_step: usize,
    /// Prompts per mini-batch (each mini-batch is one optimizer update).
    pub mini_batch_prompts: usize,
    /// Passes over each rollout batch.
    pub ppo_epochs: usize,
    pub clip_low: f32,
    pub clip_high: f32,
    pub kl_coef: f32,
    pub kl_kind: KlKind,
    /// Entropy bonus coefficient (loss -= coef * entropy). Its gradient is the score-function
    /// estimate (logp + H) at the sampled tokens, unbiased for on-policy samples.
    pub entropy_coef: f32,
    pub loss_agg: LossAgg,
    /// Only for `seq-mean-token-sum-norm`; 0 = max_new_tokens.
    pub norm_len: f32,
    pub advantage: AdvantageKind,
    /// Token budget of one micro-batch (gradients of micro-batches are accumulated).
    pub micro_batch_tokens: usize,
    /// Per-layer activation recomputation in the backward.
    pub recompute: bool,
    /// Shared-prompt training passes: old, reference and policy passes encode each group's
    /// prompt once, its responses attending to it (Prefix Grouper, arXiv 2506.05433), and run
    /// the lm_head + log-softmax at the response tokens only. Same logprobs, loss, metrics and
    /// gradients as the per-sequence passes (false), with fewer token rows.
    pub shared_prompt: bool,
    /// Temperature T of every training-side logprob: old, reference, the policy's (forward and
    /// backward) and its entropy are those of log_softmax(logits / T), as verl's actor takes
    /// them (`logits.div_(temperature)` in `verl/workers/actor/dp_actor.py`), so the ratio and
    /// the KL compare the distribution the rollout sampled from. Unset = `rollout.temperature`
    /// (verl's choice); when that is 0 (greedy rollouts, where verl would divide by zero) T = 1.
    /// Must be finite and > 0 when set. SFT and evaluation scoring always use T = 1.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logprob_temperature: Option<f32>,
    /// Leave groups without signal (every reward of the group equal, so every advantage 0) out
    /// of the old-logprob, reference and update passes. Off by default: such a group adds no
    /// policy gradient but its tokens carry KL (and entropy) terms and count in the
    /// token-mean's denominator, so leaving it out reweights the KL term and scales up the
    /// remaining tokens' policy gradient, and a step can then make fewer optimizer updates
    /// (none when every group is left out). See `docs/loss-aggregation.md`. Needs
    /// `rollout.n >= 2` (a group of one has advantage = its score under GRPO).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub skip_zero_adv_groups: bool,
}

impl Default for GrpoConfig {
    fn default() -> Self {
        GrpoConfig {
            prompts_per_step: 1024,
            mini_batch_prompts: 256,
            ppo_epochs: 1,
            clip_low: 0.2,
            clip_high: 0.2,
            kl_coef: 1e-3,
            kl_kind: KlKind::K3,
            entropy_coef: 0.0,
            loss_agg: LossAgg::TokenMean,
            norm_len: 0.0,
            advantage: AdvantageKind::Grpo,
            micro_batch_tokens: 16384,
            recompute: true,
            shared_prompt: true,
            logprob_temperature: None,
            skip_zero_adv_groups: false,
        }
    }
}

/// AdamW and its schedule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimConfig {
    pub lr: f32,
    pub schedule: LrSchedule,
    pub warmup_steps: u64,
    /// Floor of the cosine schedule as a fraction of `lr`.
    pub min_lr_ratio: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// Global gradient-norm clip; 0 = none.
    pub grad_clip: f32,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            lr: 1e-6,
            schedule: LrSchedule::Constant,
            warmup_steps: 0,
            min_lr_ratio: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            grad_clip: 1.0,
        }
    }
}

/// The defaults that differ between the two kinds of run sharing [`RunConfig`].
pub trait RunKind {
    /// Default output folder.
    const OUT: &'static str;
    /// Default number of passes over the data.
    const EPOCHS: u64;
}

/// `tooln1 train` (GRPO).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GrpoRun;

impl RunKind for GrpoRun {
    const OUT: &'static str = "runs/train";
    const EPOCHS: u64 = 7;
}

/// `tooln1 sft`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SftRun;

impl RunKind for SftRun {
    const OUT: &'static str = "runs/sft";
    const EPOCHS: u64 = 3;
}

/// The settings every run has, `train` and `sft` alike: the first keys of either config file
/// (flattened into [`TrainConfig`] and [`SftConfig`]), and the ones the shared command-line
/// flags override.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, bound = "")]
pub struct RunConfig<K: RunKind> {
    /// HF model folder to start from (for GRPO also the frozen reference).
    #[serde(deserialize_with = "keyed::model")]
    pub model: Option<PathBuf>,
    /// Prepared training JSONL (one `Sample` per line).
    #[serde(deserialize_with = "keyed::data")]
    pub data: Option<PathBuf>,
    /// Output folder: metrics.jsonl, checkpoints/.
    #[serde(deserialize_with = "keyed::out")]
    pub out: PathBuf,
    #[serde(deserialize_with = "keyed::device")]
    pub device: DeviceKind,
    #[serde(deserialize_with = "keyed::seed")]
    pub seed: u64,
    /// Passes over the data (used when `steps` is 0).
    #[serde(deserialize_with = "keyed::epochs")]
    pub epochs: u64,
    /// Total steps; 0 = `epochs` passes (GRPO: prompts / prompts_per_step steps per pass,
    /// SFT: samples / batch_size).
    #[serde(deserialize_with = "keyed::steps")]
    pub steps: u64,
    #[serde(skip)]
    pub kind: std::marker::PhantomData<K>,
}

impl<K: RunKind> Default for RunConfig<K> {
    fn default() -> Self {
        RunConfig {
            model: None,
            data: None,
            out: PathBuf::from(K::OUT),
            device: DeviceKind::Auto,
            seed: 1,
            epochs: K::EPOCHS,
            steps: 0,
            kind: std::marker::PhantomData,
        }
    }
}

/// serde's `flatten` hands [`RunConfig`]'s fields to it without the key they came from, so an
/// error would not say which key has the wrong type; each field is read through [`keyed`],
/// which adds the key the way the toml crate does for every other field (`in `seed``).
mod keyed {
    use super::DeviceKind;
    use serde::{de::Error as _, Deserialize, Deserializer};
    use std::path::PathBuf;

    fn keyed<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
        key: &str,
        d: D,
    ) -> Result<T, D::Error> {
        T::deserialize(d)
            .map_err(|e| D::Error::custom(format!("{}\nin `{key}`", e.to_string().trim_end())))
    }

    macro_rules! keyed_fields {
        ($($name:ident: $ty:ty),* $(,)?) => {
            $(
                pub fn $name<'de, D: Deserializer<'de>>(d: D) -> Result<$ty, D::Error> {
                    keyed(stringify!($name), d)
                }
            )*
        };
    }

    keyed_fields!(
        model: Option<PathBuf>,
        data: Option<PathBuf>,
        out: PathBuf,
        device: DeviceKind,
        seed: u64,
        epochs: u64,
        steps: u64,
    );
}

/// A whole `tooln1 train` run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    #[serde(flatten)]
    pub run: RunConfig<GrpoRun>,
    /// Checkpoint every this many steps (0 = only at the end).
    pub save_every: u64,
    /// Keep at most this many step checkpoints (0 = all).
    pub keep_checkpoints: usize,
    pub rollout: RolloutConfig,
    pub grpo: GrpoConfig,
    pub optim: OptimConfig,
    /// Peak TFLOP/s of the device for the per-phase model FLOP utilisation metrics (`mfu_*`).
    /// Unset: a CUDA device's dense bf16 figure by its name (`model::flops::cuda_peak_tflops`;
    /// unknown names report no utilisation); the CPU backend assumes none (set the machine's
    /// own, e.g. cores x f32 FMA lanes x 2 x clock). Finite and > 0 when set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_tflops: Option<f64>,
    /// Where the optimizer state, gradients and reference model live (`memory = "auto"`, or a
    /// `[memory]` table; see [`crate::model::plan`]).
    pub memory: Placement,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            run: RunConfig::default(),
            save_every: 50,
            keep_checkpoints: 3,
            rollout: RolloutConfig::default(),
            grpo: GrpoConfig::default(),
            optim: OptimConfig::default(),
            peak_tflops: None,
            memory: Placement::default(),
        }
    }
}

/// Settings of `tooln1 sft`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SftConfig {
    #[serde(flatten)]
    pub run: RunConfig<SftRun>,
    /// Sequences per optimizer step.
    pub batch_size: usize,
    pub micro_batch_tokens: usize,
    pub max_seq_tokens: usize,
    pub recompute: bool,
    pub save_every: u64,
    pub optim: OptimConfig,
    /// Where the optimizer state and gradients live (as for `train`; SFT has no reference).
    pub memory: Placement,
}

impl Default for SftConfig {
    fn default() -> Self {
        SftConfig {
            run: RunConfig::default(),
            batch_size: 64,
            micro_batch_tokens: 16384,
            max_seq_tokens: 8192,
            recompute: true,
            save_every: 0,
            optim: OptimConfig {
                lr: 1e-5,
                schedule: LrSchedule::Cosine,
                warmup_steps: 10,
                ..OptimConfig::default()
            },
            memory: Placement::default(),
        }
    }
}

/// Parse a TOML config (`text` labelled `label` in errors) and apply `key=value` overrides,
/// where key is a dotted path (`grpo.kl_coef=0.01`) and value a TOML literal (a bare word that is
/// not valid TOML is taken as a string).
pub fn parse_config<T: DeserializeOwned + Serialize + Default>(
    text: &str,
    label: &str,
    overrides: &[String],
) -> Result<T> {
    let mut root: toml::Table = toml::from_str(text).map_err(|e| Error::Config {
        file: label.to_string(),
        field: "(syntax)".into(),
        msg: e.to_string(),
    })?;
    for ov in overrides {
        apply_override(&mut root, ov)?;
    }
    T::deserialize(toml::Value::Table(root)).map_err(|e| {
        let msg = with_known_keys::<T>(e.to_string().trim());
        Error::Config {
            file: label.to_string(),
            field: field_of(&msg),
            msg,
        }
    })
}

/// Read a config file (or the defaults when `path` is None) with overrides.
pub fn load_config<T: DeserializeOwned + Serialize + Default>(
    path: Option<&Path>,
    overrides: &[String],
) -> Result<T> {
    match path {
        Some(p) => {
            let text = crate::safefs::read_to_string(p)?;
            parse_config(&text, &p.display().to_string(), overrides)
        }
        None => parse_config("", "(defaults)", overrides),
    }
}

fn field_of(msg: &str) -> String {
    // toml's messages name the field as "unknown field `x`" or "missing field `x`".
    if let Some(start) = msg.find('`') {
        if let Some(len) = msg[start + 1..].find('`') {
            return msg[start + 1..start + 1 + len].to_string();
        }
    }
    "(value)".into()
}

/// serde reports an unknown key of a struct with a flattened part ([`RunConfig`]) as only
/// "unknown field `x`"; add the known keys of `T`, in serde's own wording, as it does for every
/// other struct.
fn with_known_keys<T: Serialize + Default>(msg: &str) -> String {
    let bare = msg
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.strip_suffix('`'))
        .filter(|name| !name.contains('`'));
    let Some(name) = bare else {
        return msg.to_string();
    };
    let keys: Vec<String> = match serde_json::to_value(T::default()) {
        Ok(serde_json::Value::Object(m)) => m.keys().map(|k| format!("`{k}`")).collect(),
        _ => return msg.to_string(),
    };
    let expected = match keys.as_slice() {
        [] => return format!("unknown field `{name}`, there are no fields"),
        [one] => one.clone(),
        [a, b] => format!("{a} or {b}"),
        many => format!("one of {}", many.join(", ")),
    };
    format!("unknown field `{name}`, expected {expected}")
}

fn apply_override(root: &mut toml::Table, ov: &str) -> Result<()> {
    let (key, value) = ov.split_once('=').ok_or_else(|| Error::Config {
        file: "--set".into(),
        field: ov.to_string(),
        msg: "expected section.key=value".into(),
    })?;
    let key = key.trim();
    let value = value.trim();
    let parsed: toml::Value = match toml::from_str::<toml::Table>(&format!("v = {value}")) {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or(toml::Value::String(value.to_string())),
        Err(_) => toml::Value::String(value.to_string()),
    };
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(Error::Config {
            file: "--set".into(),
            field: key.to_string(),
            msg: "empty component in the key".into(),
        });
    }
    let mut table = root;
    for p in &parts[..parts.len() - 1] {
        let entry = table
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = entry.as_table_mut().ok_or_else(|| Error::Config {
            file: "--set".into(),
            field: key.to_string(),
            msg: format!("`{p}` is a value, not a section"),
        })?;
    }
    table.insert(parts[parts.len() - 1].to_string(), parsed);
    Ok(())
}

impl TrainConfig {
    /// Host bytes one GRPO step holds for its sequences: per token of prompt + response, the
    /// token id (u32) and the old, reference and new logprobs (f32), for every one of
    /// `prompts_per_step x rollout.n` sequences; saturates at `u64::MAX` (see
    /// [`crate::safefs::check_host_memory`]).
    pub fn step_host_bytes(&self) -> u64 {
        let seqs = (self.grpo.prompts_per_step as u64).saturating_mul(self.rollout.n as u64);
        let tokens = (self.rollout.max_prompt_tokens as u64)
            .saturating_add(self.rollout.max_new_tokens as u64);
        seqs.saturating_mul(tokens).saturating_mul(16)
    }

    /// The run settings the memory planner needs: rollout slots at most `rollout.max_slots`
    /// (and at most one step's sequences), KV-cache slots of prompt + response tokens, and the
    /// smallest micro-batch, one whole group (shared prompt: the prompt once and n responses;
    /// per sequence: n prompt + response sequences). Saturating arithmetic.
    pub fn run_shape(&self) -> RunShape {
        let (r, g) = (&self.rollout, &self.grpo);
        let n = r.n as u64;
        let (prompt, new) = (r.max_prompt_tokens as u64, r.max_new_tokens as u64);
        let group = if g.shared_prompt {
            prompt.saturating_add(n.saturating_mul(new))
        } else {
            n.saturating_mul(prompt.saturating_add(new))
        };
        RunShape {
            grpo: true,
            max_slots: (r.max_slots as u64).min((g.prompts_per_step as u64).saturating_mul(n)),
            max_prompt: prompt,
            max_len: prompt.saturating_add(new),
            kv_block_size: r.kv_block_size as u64,
            micro_batch_tokens: g.micro_batch_tokens as u64,
            min_micro_batch_tokens: group,
            recompute: g.recompute,
            host_extra: self.step_host_bytes(),
            ranks: 1,
        }
    }

    /// The temperature of the training-side logprobs: `grpo.logprob_temperature`, else
    /// `rollout.temperature`, else 1 when that is 0 (greedy).
    pub fn logprob_temperature(&self) -> f32 {
        match self.grpo.logprob_temperature {
            Some(t) => t,
            None if self.rollout.temperature > 0.0 => self.rollout.temperature,
            None => 1.0,
        }
    }

    /// 1 / [`TrainConfig::logprob_temperature`], the inverse temperature the logprobs op takes
    /// (finite and > 0 once [`TrainConfig::validate`] passed).
    pub fn logprob_inv_t(&self) -> f32 {
        1.0 / self.logprob_temperature()
    }

    /// Check the values that would otherwise fail deep inside a run.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, msg: String| Error::Config {
            file: "train config".into(),
            field: field.into(),
            msg,
        };
        if self.rollout.n == 0 {
            return Err(bad("rollout.n", "must be at least 1".into()));
        }
        if self.rollout.max_new_tokens == 0 {
            return Err(bad("rollout.max_new_tokens", "must be at least 1".into()));
        }
        if self.rollout.temperature.is_nan() || self.rollout.temperature < 0.0 {
            return Err(bad("rollout.temperature", "must be >= 0".into()));
        }
        if !(self.rollout.top_p > 0.0 && self.rollout.top_p <= 1.0) {
            return Err(bad("rollout.top_p", "must be in (0, 1]".into()));
        }
        if self.rollout.max_slots == 0 {
            return Err(bad("rollout.max_slots", "must be at least 1".into()));
        }
        if self.rollout.kv_block_size == 0 {
            return Err(bad("rollout.kv_block_size", "must be at least 1".into()));
        }
        let per_seq = (self.rollout.max_prompt_tokens as u64)
            .saturating_add(self.rollout.max_new_tokens as u64)
            .div_ceil(self.rollout.kv_block_size as u64);
        if self.rollout.kv_blocks != 0 && (self.rollout.kv_blocks as u64) <= per_seq {
            return Err(bad(
                "rollout.kv_blocks",
                format!(
                    "must be 0 (sized from memory) or above {per_seq}: one sequence of \
                     max_prompt_tokens + max_new_tokens tokens in blocks of kv_block_size, and \
                     its prompt's last block"
                ),
            ));
        }
        if self.grpo.prompts_per_step == 0 {
            return Err(bad("grpo.prompts_per_step", "must be at least 1".into()));
        }
        if let Some(p) = self.peak_tflops {
            if !(p.is_finite() && p > 0.0) {
                return Err(bad(
                    "peak_tflops",
                    format!("must be finite and > 0 (got {p})"),
                ));
            }
        }
        if self.grpo.skip_zero_adv_groups && self.rollout.n < 2 {
            return Err(bad(
                "grpo.skip_zero_adv_groups",
                format!(
                    "needs rollout.n >= 2 (got {}): the GRPO advantage of a group of one is its \
                     score, not zero",
                    self.rollout.n
                ),
            ));
        }
        if self.step_host_bytes() == u64::MAX {
            return Err(bad(
                "grpo.prompts_per_step",
                format!(
                    "{} prompts x rollout.n = {} samples x {} tokens overflows 64-bit sizes",
                    self.grpo.prompts_per_step,
                    self.rollout.n,
                    self.rollout
                        .max_prompt_tokens
                        .saturating_add(self.rollout.max_new_tokens)
                ),
            ));
        }
        for (field, v) in [
            ("rollout.temperature", self.rollout.temperature),
            ("grpo.clip_low", self.grpo.clip_low),
            ("grpo.clip_high", self.grpo.clip_high),
            ("grpo.kl_coef", self.grpo.kl_coef),
            ("grpo.entropy_coef", self.grpo.entropy_coef),
            ("grpo.norm_len", self.grpo.norm_len),
        ] {
            if !v.is_finite() {
                return Err(bad(field, format!("must be a finite number, got {v}")));
            }
        }
        if self.grpo.kl_coef < 0.0 {
            return Err(bad("grpo.kl_coef", "must be >= 0".into()));
        }
        let (t_field, t) = match self.grpo.logprob_temperature {
            Some(t) => ("grpo.logprob_temperature", t),
            None => ("rollout.temperature", self.logprob_temperature()),
        };
        if !(t.is_finite() && t > 0.0) {
            return Err(bad(
                t_field,
                format!("must be a finite number > 0, got {t}"),
            ));
        }
        if !(1.0 / t).is_finite() {
            return Err(bad(
                t_field,
                format!(
                    "{t} is too small for the training-side logprobs (1 / T overflows f32); \
                     set grpo.logprob_temperature"
                ),
            ));
        }
        if self.grpo.mini_batch_prompts == 0
            || self.grpo.mini_batch_prompts > self.grpo.prompts_per_step
        {
            return Err(bad(
                "grpo.mini_batch_prompts",
                format!(
                    "must be in 1..={} (grpo.prompts_per_step)",
                    self.grpo.prompts_per_step
                ),
            ));
        }
        if self.grpo.ppo_epochs == 0 {
            return Err(bad("grpo.ppo_epochs", "must be at least 1".into()));
        }
        if self.grpo.micro_batch_tokens == 0 {
            return Err(bad("grpo.micro_batch_tokens", "must be at least 1".into()));
        }
        if !(self.grpo.clip_low >= 0.0 && self.grpo.clip_high >= 0.0) {
            return Err(bad("grpo.clip_low", "clip ratios must be >= 0".into()));
        }
        self.optim.validate()
    }
}

impl OptimConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, msg: &str| Error::Config {
            file: "optim config".into(),
            field: field.into(),
            msg: msg.into(),
        };
        if !(self.lr >= 0.0 && self.lr.is_finite()) {
            return Err(bad("optim.lr", "must be a finite value >= 0"));
        }
        // AdamW moves every weight by about lr per update whatever the gradient's scale
        // (Kingma & Ba 2015, section 2.1: the effective step is bounded by the step size), so a
        // learning rate above 1 moves weights of magnitude ~0.02 by more than 50x their size
        // per update and diverges.
        if self.lr > 1.0 {
            return Err(bad(
                "optim.lr",
                "must be at most 1 (AdamW steps each weight by about lr per update; fine-tuning \
                 uses 1e-6 to 1e-4)",
            ));
        }
        if !(0.0..=1.0).contains(&self.weight_decay) {
            return Err(bad(
                "optim.weight_decay",
                "must be a finite value in [0, 1] (decoupled decay multiplies each weight by \
                 1 - lr * weight_decay)",
            ));
        }
        if !(0.0..1.0).contains(&self.beta1) || !(0.0..1.0).contains(&self.beta2) {
            return Err(bad("optim.beta1", "betas must be in [0, 1)"));
        }
        if self.eps.is_nan() || self.eps <= 0.0 {
            return Err(bad("optim.eps", "must be > 0"));
        }
        if self.grad_clip.is_nan() || self.grad_clip < 0.0 {
            return Err(bad("optim.grad_clip", "must be >= 0"));
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return Err(bad("optim.min_lr_ratio", "must be in [0, 1]"));
        }
        Ok(())
    }

    /// Learning rate of optimizer update `update` (0-based) out of `total`.
    pub fn lr_at(&self, update: u64, total: u64) -> f32 {
        let base = self.lr;
        if self.warmup_steps > 0 && update < self.warmup_steps {
            return base * (update + 1) as f32 / self.warmup_steps as f32;
        }
        match self.schedule {
            LrSchedule::Constant => base,
            LrSchedule::Cosine => {
                let span = total.saturating_sub(self.warmup_steps).max(1);
                let t = (update.saturating_sub(self.warmup_steps)).min(span) as f64 / span as f64;
                let min = (base * self.min_lr_ratio) as f64;
                (min + (base as f64 - min) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())) as f32
            }
        }
    }
}

impl SftConfig {
    /// The run settings the memory planner needs: no rollout, no reference, micro-batches of at
    /// least one sequence of `max_seq_tokens`.
    pub fn run_shape(&self) -> RunShape {
        RunShape {
            grpo: false,
            max_slots: 0,
            max_prompt: 0,
            max_len: self.max_seq_tokens as u64,
            kv_block_size: crate::model::kv_cache::DEFAULT_BLOCK_SIZE as u64,
            micro_batch_tokens: self.micro_batch_tokens as u64,
            min_micro_batch_tokens: self.max_seq_tokens as u64,
            recompute: self.recompute,
            host_extra: 0,
            ranks: 1,
        }
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, msg: &str| Error::Config {
            file: "sft config".into(),
            field: field.into(),
            msg: msg.into(),
        };
        if self.batch_size == 0 {
            return Err(bad("batch_size", "must be at least 1"));
        }
        if self.micro_batch_tokens == 0 {
            return Err(bad("micro_batch_tokens", "must be at least 1"));
        }
        if self.max_seq_tokens < 2 {
            return Err(bad("max_seq_tokens", "must be at least 2"));
        }
        if self.memory.reference == Place::Host {
            return Err(bad(
                "memory.reference",
                "SFT has no reference model; expected \"auto\" or \"device\"",
            ));
        }
        self.optim.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_tool_n1() {
        let c: TrainConfig = parse_config("", "t", &[]).unwrap();
        assert_eq!(c.rollout.n, 5);
        assert_eq!(c.grpo.prompts_per_step, 1024);
        assert_eq!(c.grpo.mini_batch_prompts, 256);
        assert_eq!(c.grpo.kl_kind, KlKind::K3);
        assert_eq!(c.grpo.loss_agg, LossAgg::TokenMean);
        assert_eq!(c.optim.lr, 1e-6);
        assert_eq!(c.rollout.temperature, 0.7);
        c.validate().unwrap();
    }

    #[test]
    fn file_and_overrides() {
        let text = "seed = 3\n[grpo]\nkl_coef = 0.5\nloss_agg = \"seq-mean-token-mean\"\n";
        let c: TrainConfig = parse_config(
            text,
            "x.toml",
            &[
                "grpo.kl_coef=0.25".into(),
                "rollout.n=8".into(),
                "out=runs/abc".into(),
                "device=cpu".into(),
            ],
        )
        .unwrap();
        assert_eq!(c.run.seed, 3);
        assert_eq!(c.grpo.kl_coef, 0.25);
        assert_eq!(c.grpo.loss_agg, LossAgg::SeqMeanTokenMean);
        assert_eq!(c.rollout.n, 8);
        assert_eq!(c.run.out, PathBuf::from("runs/abc"));
        assert_eq!(c.run.device, DeviceKind::Cpu);
    }

    #[test]
    fn unknown_field_is_named() {
        let e = parse_config::<TrainConfig>("[grpo]\nkl_cof = 1\n", "x.toml", &[]).unwrap_err();
        let s = e.to_string();
        assert!(s.contains("x.toml") && s.contains("kl_cof"), "{s}");
        let e = parse_config::<TrainConfig>("", "x.toml", &["rollout.nn=3".into()]).unwrap_err();
        assert!(e.to_string().contains("nn"), "{e}");
        let e = parse_config::<TrainConfig>("", "x.toml", &["rollout.n".into()]).unwrap_err();
        assert!(e.to_string().contains("rollout.n"), "{e}");
    }

    #[test]
    fn shared_run_settings_keep_their_defaults_keys_and_errors() {
        let t: TrainConfig = parse_config("", "t", &[]).unwrap();
        let s: SftConfig = parse_config("", "s", &[]).unwrap();
        assert_eq!((t.run.out.to_str(), t.run.epochs), (Some("runs/train"), 7));
        assert_eq!((s.run.out.to_str(), s.run.epochs), (Some("runs/sft"), 3));
        // The flattened fields stay the first keys of the file, in their order.
        let keys: Vec<String> = match serde_json::to_value(&s).unwrap() {
            serde_json::Value::Object(m) => m.keys().cloned().collect(),
            _ => unreachable!(),
        };
        assert_eq!(
            keys[..8],
            [
                "model",
                "data",
                "out",
                "device",
                "seed",
                "epochs",
                "steps",
                "batch_size"
            ]
        );
        // A wrong type in a flattened field still names it; an unknown key lists the known ones.
        let e = parse_config::<SftConfig>("seed = \"x\"\n", "s.toml", &[]).unwrap_err();
        assert!(e.to_string().contains("field `seed`"), "{e}");
        let e = parse_config::<TrainConfig>("", "t.toml", &["sed=1".into()]).unwrap_err();
        let e = e.to_string();
        assert!(
            e.contains("field `sed`") && e.contains("expected one of `model`, `data`"),
            "{e}"
        );
        // A saved config (JSON, with nulls) reads back to the same settings.
        let back: SftConfig = serde_json::from_value(serde_json::to_value(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn validation_names_field() {
        let c: TrainConfig =
            parse_config("", "t", &["grpo.mini_batch_prompts=2000".into()]).unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("grpo.mini_batch_prompts"), "{e}");
    }

    #[test]
    fn cuda_graphs_setting() {
        let c: TrainConfig = parse_config("", "t", &[]).unwrap();
        assert!(c.rollout.cuda_graphs, "graphs are on by default");
        let c: TrainConfig = parse_config("", "t", &["rollout.cuda_graphs=false".into()]).unwrap();
        assert!(!c.rollout.cuda_graphs);
        c.validate().unwrap();
        let e = parse_config::<TrainConfig>("[rollout]\ncuda_graphs = 1\n", "t", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("cuda_graphs"), "{e}");
    }

    #[test]
    fn logprob_temperature_follows_rollout() {
        let t = |sets: &[&str]| {
            let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
            let c: TrainConfig = parse_config("", "t", &sets).unwrap();
            c.validate()
                .map(|_| (c.logprob_temperature(), c.logprob_inv_t()))
        };
        assert_eq!(t(&[]).unwrap(), (0.7, 1.0 / 0.7f32));
        assert_eq!(t(&["rollout.temperature=1.3"]).unwrap().0, 1.3);
        // greedy rollouts: T = 1 (verl would divide by zero)
        assert_eq!(t(&["rollout.temperature=0"]).unwrap(), (1.0, 1.0));
        let set = ["rollout.temperature=0", "grpo.logprob_temperature=0.5"];
        assert_eq!(t(&set).unwrap(), (0.5, 2.0));
        for bad in ["-0.5", "0", "nan", "inf", "1e-45"] {
            let e = t(&[&format!("grpo.logprob_temperature={bad}")])
                .unwrap_err()
                .to_string();
            assert!(e.contains("grpo.logprob_temperature"), "{bad}: {e}");
        }
        let e = t(&["rollout.temperature=1e-45"]).unwrap_err().to_string();
        assert!(e.contains("rollout.temperature"), "{e}");
    }

    #[test]
    fn schedules() {
        let mut o = OptimConfig {
            lr: 1.0,
            ..Default::default()
        };
        assert_eq!(o.lr_at(0, 10), 1.0);
        assert_eq!(o.lr_at(9, 10), 1.0);
        o.warmup_steps = 4;
        assert_eq!(o.lr_at(0, 10), 0.25);
        assert_eq!(o.lr_at(3, 10), 1.0);
        o.schedule = LrSchedule::Cosine;
        o.min_lr_ratio = 0.1;
        assert!((o.lr_at(4, 10) - 1.0).abs() < 1e-6);
        assert!((o.lr_at(10, 10) - 0.1).abs() < 1e-6);
        let mid = o.lr_at(7, 10);
        assert!((mid - 0.55).abs() < 1e-6, "{mid}");
    }
}
