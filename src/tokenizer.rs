//! Tokenizer (HF tokenizer.json, offline) and the chat template renderer.

use crate::data::Message;
use crate::{Error, Result};
use std::path::Path;

/// Qwen2.5 special token ids (facts §2.3).
pub const ENDOFTEXT: u32 = 151643;
pub const IM_START: u32 = 151644;
pub const IM_END: u32 = 151645;

/// A loaded `tokenizer.json`.
pub struct Tokenizer {
    pub inner: tokenizers::Tokenizer,
}

impl Tokenizer {
    pub fn from_file(path: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| Error::msg(format!("{}: cannot load tokenizer: {e}", path.display())))?;
        Ok(Tokenizer { inner })
    }

    /// Encode text; special tokens written in the text (e.g. `<|im_start|>`) map to their ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::msg(format!("tokenizer: cannot encode: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| Error::msg(format!("tokenizer: cannot decode: {e}")))
    }

    /// Id of a token written out (e.g. "<|im_end|>"), if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}

/// A chat template (Jinja, as in `tokenizer_config.json`).
pub struct ChatTemplate {
    pub source: String,
}

impl ChatTemplate {
    /// Render messages (and optional tool schemas passed as `tools=`) exactly as
    /// transformers' `apply_chat_template(..., tokenize=False)` does.
    pub fn render(
        &self,
        messages: &[Message],
        tools: Option<&[serde_json::Value]>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let _ = (messages, tools, add_generation_prompt);
        Err(Error::msg("ChatTemplate::render: not implemented yet"))
    }
}
