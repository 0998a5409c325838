//! Training: rollouts with a KV cache, the GRPO update (facts §3) with Tool-N1's defaults
//! (facts §1.4), SFT, checkpoints, metrics, the built-in demo and evaluation generation.
//!
//! - [`config`]: TOML config + `key=value` overrides; Tool-N1 defaults.
//! - [`rollout`]: prefill + decode, n samples per prompt, reproducible sampling stream.
//! - [`grpo`]: group advantages, old/reference logprobs, micro-batched loss + backward.
//! - [`optim`]: AdamW with global grad-norm clipping and lr schedules.
//! - [`sft`]: cross-entropy on assistant tokens.
//! - [`runner`]: the GRPO loop ([`runner::Trainer`]), usable as a library.
//! - [`checkpoint`]: HF model folder + optimizer/trainer state, atomic, exact resume.
//! - [`metrics`]: JSONL metrics, progress bar, summary.
//! - [`device`]: backend selection (`auto | cpu | cuda`).
//! - [`demo`]: a tiny model that learns a synthetic tool-calling task in minutes on a CPU.
//! - [`evalgen`]: greedy generation for BFCL / API-Bank evaluation.

pub mod checkpoint;
pub mod config;
pub mod demo;
pub mod device;
pub mod evalgen;
pub mod grpo;
pub mod metrics;
pub mod optim;
pub mod rollout;
pub mod runner;
pub mod sft;

pub use config::{SftConfig, TrainConfig};
pub use runner::{prepare_prompts, PromptItem, Trainer};
pub use sft::SftTrainer;
