//! tooln1: GRPO training of tool-calling Qwen2.5 models (the Tool-N1 recipe) on hand-written
//! CUDA kernels, with a plain f32 CPU reference backend. See ARCHITECTURE.md for the map.

pub mod backend;
pub mod cli;
pub mod data;
pub mod demo;
pub mod dist;
pub mod error;
pub mod eval;
pub mod model;
pub mod pycall;
pub mod pyjson;
pub mod reward;
pub mod safefs;
pub mod tokenizer;
pub mod train;

pub use error::{Error, Result};
