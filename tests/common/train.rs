//! Shared pieces of the training tests: a reward and the golden tokenizer.

use std::path::Path;

use tooln1::reward::{Reward, RewardOutput};
use tooln1::tokenizer::Tokenizer;

/// A reward a library user might write: likes responses that contain the letter `e` and are
/// short.
pub struct LikesE;

impl Reward for LikesE {
    fn score(&self, response: &str, _gt: &serde_json::Value) -> RewardOutput {
        let e = response.matches('e').count() as f32;
        let r = (e / (1.0 + response.len() as f32 / 8.0)).min(1.0);
        RewardOutput {
            reward: r,
            format_ok: !response.is_empty(),
            calls_ok: r >= 0.5,
            reason: "ok".into(),
        }
    }
}

/// The tokenizer of the golden fixtures (the real Qwen2.5 tokenizer files).
pub fn golden_tokenizer() -> Tokenizer {
    Tokenizer::from_file(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/golden/tokenizer/tokenizer.json"),
    )
    .unwrap()
}

/// One training prompt per text: a user turn in Qwen's chat format, with the generation
/// prompt, ids `p0`, `p1`, ... and no ground truth.
pub fn chat_prompts(tok: &Tokenizer, texts: &[&str]) -> Vec<tooln1::train::PromptItem> {
    texts
        .iter()
        .enumerate()
        .map(|(i, t)| tooln1::train::PromptItem {
            id: format!("p{i}"),
            tokens: tok
                .encode(&format!(
                    "<|im_start|>user\n{t}<|im_end|>\n<|im_start|>assistant\n"
                ))
                .unwrap(),
            ground_truth: serde_json::Value::Null,
        })
        .collect()
}
