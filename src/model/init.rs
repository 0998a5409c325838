//! Tiny random Qwen2 models (for `tooln1 init-tiny`, tests and the demo).
