//! Training: rollouts with a KV cache, the GRPO update (as verl implements it in
//! `verl/trainer/ppo/core_algos.py`) with the Tool-N1 paper's defaults (Zhang et al. 2025,
//! arXiv:2505.00024), SFT, checkpoints and metrics. The built-in demo is [`crate::demo`],
//! evaluation generation [`crate::eval::generate`], backend selection
//! [`crate::backend::select`].
//!
//! - [`config`]: TOML config + `key=value` overrides; Tool-N1 defaults.
//! - [`rollout`]: prefill + decode, n samples per prompt, reproducible sampling stream.
//! - [`grpo`]: group advantages, old/reference logprobs, micro-batched loss + backward.
//! - [`optim`]: AdamW with global grad-norm clipping and lr schedules.
//! - [`host_grads`]: the run's gradients on the backend or summed in host memory.
//! - [`zero`]: the same AdamW over per-rank shards of gradients and optimizer state (ZeRO
//!   stage 2), for data-parallel ranks ([`crate::dist`]).
//! - [`sft`]: cross-entropy on assistant tokens.
//! - [`runner`]: the GRPO loop ([`runner::Trainer`]), usable as a library.
//! - [`parallel`]: one trainer per rank in threads of its own (data parallel over the GPUs of
//!   a machine, or CPU rank groups).
//! - [`checkpoint`]: HF model folder + optimizer/trainer state, atomic, exact resume.
//! - [`metrics`]: JSONL metrics, progress bar, summary.

pub mod checkpoint;
pub mod config;
pub mod grpo;
pub mod host_grads;
pub mod metrics;
pub mod optim;
pub mod parallel;
pub mod rollout;
pub mod runner;
pub mod sft;
pub mod zero;

pub use config::{SftConfig, TrainConfig};
pub use runner::{prepare_prompts, PromptItem, RankComm, TrainData, Trainer};
pub use sft::SftTrainer;
