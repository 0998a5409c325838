//! Tokenizer (HF tokenizer.json, offline) and the chat template renderer.
