//! Qwen2 model: configuration, parameter layout (HF names), weights I/O, the layer schedule
//! written once over [`crate::backend::Backend`], and tiny random models for tests and demos.

pub mod config;
pub mod decode_graph;
pub mod flops;
pub mod grad_sink;
pub mod init;
pub mod kv_cache;
pub mod layout;
pub mod memory;
pub mod plan;
pub mod qwen2;
pub mod stream;
pub mod weights;

pub use config::Qwen2Config;
pub use decode_graph::{DecodeGraphs, GraphStats};
pub use grad_sink::GradSink;
pub use kv_cache::{BlockPool, KvCache, KvShape};
pub use layout::{LayerParams, ParamLayout, ParamSpec};
pub use qwen2::{DeviceBatch, Group, Model, PackedBatch, Tape};
