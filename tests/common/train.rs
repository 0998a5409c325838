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
