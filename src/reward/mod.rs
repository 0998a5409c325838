//! Rewards: the Tool-N1 rule-based reward (facts §1.2) and the trait a library user implements
//! to plug in another one.

use serde::{Deserialize, Serialize};

/// The verdict on one response.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RewardOutput {
    pub reward: f32,
    /// The response had a parseable `<tool_call>` block (and think tags where required).
    pub format_ok: bool,
    /// The calls matched the ground truth exactly (as multisets).
    pub calls_ok: bool,
    /// A short human-readable reason ("ok", "no <tool_call> block", ...).
    pub reason: String,
}

/// A reward function over a decoded response and the sample's ground truth (for Tool-N1, a JSON
/// list of `{name, arguments}`).
pub trait Reward: Send + Sync {
    fn score(&self, response: &str, ground_truth: &serde_json::Value) -> RewardOutput;
}
