//! The built-in demo: a tiny Qwen2-architecture model learns a synthetic tool-calling task on
//! whatever backend is present, in minutes on two CPU cores.
//!
//! - [`task`]: four functions, queries from templates, disjoint training and held-out prompts,
//!   noisy SFT answers.
//! - [`tokenizer`]: a byte-level BPE trained at start on the demo's own corpus with the
//!   `tokenizers` crate (offline, deterministic), with the Qwen special tokens (`<|endoftext|>`,
//!   `<|im_start|>`, `<|im_end|>`) and `<tool_call>`, `</tool_call>`, `<think>`, `</think>` as
//!   added tokens. The demo's system prompt (the Tool-N1 system prompt for its four tools,
//!   identical in every prompt) is registered as one added token so that a prompt is a few
//!   dozen tokens: the model never has to read the tool list, which is fixed.
//! - [`run`]: the script. Prompts are rendered with the Qwen2.5 chat template; an SFT warm start
//!   on the noisy targets teaches the format but leaves the argument choice uncertain; then
//!   GRPO with the Tool-N1 reward raises the held-out reward.

pub mod run;
pub mod task;
pub mod tokenizer;

pub use run::{evaluate_reward, run_demo, DemoConfig, DemoReport, Draws};
