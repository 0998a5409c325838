//! The CUDA backend (bf16 storage, f32 accumulation).
