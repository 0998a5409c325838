//! Rewards: the Tool-N1 rule-based reward (Zhang et al. 2025, "Nemotron-Research-Tool-N1",
//! arXiv:2505.00024) and the trait a library user implements to plug in another one.
//!
//! The default ([`Variant::V0`], "binary with think format"):
//! 1. take the LAST `<tool_call>(.*?)</tool_call>` block (dot matches newline) and parse it as
//!    JSON; an object is wrapped into a one-element list; no block or invalid JSON -> 0;
//! 2. the response must contain both substrings `<think>` and `</think>` (presence only) -> else 0;
//! 3. every item must be an object with both keys `name` and `arguments` -> else 0;
//! 4. reward 1 when the multiset of (name, canonical sorted-key JSON of arguments) equals the
//!    ground truth's, else 0. No type coercion (`"5" != 5`, `1 != 1.0`); `[]` matches `[]`.
//!
//! Ablations (paper Table 4): [`Variant::V2`] skips step 2; [`Variant::V3`] gives 0.2 for the
//! think tags plus 0.8 for the exact match; [`Variant::V4`] is V3 plus 0.2 when the calls are not
//! an exact match but the multisets of names are equal. In V3/V4 the think part counts on its own
//! (it does not need a parseable block) and steps 1 and 3 gate only the match parts.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

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
    /// Score one response. The reward must be finite: the trainer stops with an error naming
    /// the sample when it is NaN or infinite.
    fn score(&self, response: &str, ground_truth: &serde_json::Value) -> RewardOutput;

    /// Whether a sample's ground truth can ever be matched (`Err` says why not). The trainer
    /// counts the samples that fail it before training and refuses data where none passes, since
    /// every reward would then be 0 and nothing could be learned. The default accepts anything.
    fn check_ground_truth(&self, ground_truth: &serde_json::Value) -> Result<(), String> {
        let _ = ground_truth;
        Ok(())
    }
}

/// The Tool-N1 reward variants.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Variant {
    /// Binary, with think-tag format check (the paper's default).
    #[default]
    V0,
    /// Binary without the think-tag check.
    V2,
    /// 0.2 for think tags + 0.8 for an exact match.
    V3,
    /// V3 + 0.2 when only the function names match.
    V4,
}

impl Variant {
    pub const ALL: [Variant; 4] = [Variant::V0, Variant::V2, Variant::V3, Variant::V4];

    pub fn name(self) -> &'static str {
        match self {
            Variant::V0 => "v0",
            Variant::V2 => "v2",
            Variant::V3 => "v3",
            Variant::V4 => "v4",
        }
    }
}

impl std::str::FromStr for Variant {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "v0" | "binary" | "default" => Ok(Variant::V0),
            "v2" | "binary-no-think" => Ok(Variant::V2),
            "v3" | "partial" => Ok(Variant::V3),
            "v4" | "partial-name" => Ok(Variant::V4),
            _ => Err(crate::Error::Invalid(format!(
                "unknown reward variant `{s}`: expected one of v0, v2, v3, v4"
            ))),
        }
    }
}

/// The Tool-N1 reward (see the module docs).
#[derive(Clone, Copy, Debug, Default)]
pub struct ToolN1Reward {
    pub variant: Variant,
}

impl ToolN1Reward {
    pub fn new(variant: Variant) -> Self {
        ToolN1Reward { variant }
    }
}

/// A reward by variant name (`v0`, `v2`, `v3`, `v4`).
pub fn reward_by_name(name: &str) -> crate::Result<Box<dyn Reward>> {
    Ok(Box::new(ToolN1Reward::new(name.parse()?)))
}

/// The content of the LAST `<tool_call>...</tool_call>` block (non-greedy, dot matches newline),
/// or `None` when there is no complete block.
pub fn last_tool_call_block(response: &str) -> Option<&str> {
    const OPEN: &str = "<tool_call>";
    const CLOSE: &str = "</tool_call>";
    // Non-overlapping left-to-right matches of `<tool_call>(.*?)</tool_call>`, keep the last.
    let mut last = None;
    let mut pos = 0;
    while let Some(o) = response[pos..].find(OPEN) {
        let start = pos + o + OPEN.len();
        match response[start..].find(CLOSE) {
            Some(c) => {
                last = Some(&response[start..start + c]);
                pos = start + c + CLOSE.len();
            }
            None => break,
        }
    }
    last
}

/// Parse a block as a list of calls: a JSON object is wrapped in a one-element list.
pub fn parse_call_list(block: &str) -> Result<Vec<Value>, String> {
    match serde_json::from_str::<Value>(block.trim()) {
        Ok(Value::Array(a)) => Ok(a),
        Ok(o @ Value::Object(_)) => Ok(vec![o]),
        Ok(other) => Err(format!(
            "<tool_call> content is JSON but not a list or object: {}",
            json_kind(&other)
        )),
        Err(e) => Err(format!("<tool_call> content is not valid JSON: {e}")),
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Canonical JSON text: Python's `json.dumps(x, sort_keys=True, separators=(",", ":"),
/// ensure_ascii=False)`, keys sorted recursively; ints and floats stay distinct (`1` vs `1.0`).
pub fn canonical_json(v: &Value) -> String {
    let opts = crate::pyjson::PyJsonOpts {
        item_sep: ",".into(),
        key_sep: ":".into(),
        sort_keys: true,
        ..Default::default()
    };
    crate::pyjson::py_json_dumps(v, &opts)
}

/// Multiset key of a call: `(name, canonical arguments)`; `None` when the item is not an object
/// with both `name` and `arguments`.
fn call_key(item: &Value) -> Option<(String, String)> {
    let o = item.as_object()?;
    let name = o.get("name")?;
    let args = o.get("arguments")?;
    let name = match name {
        Value::String(s) => s.clone(),
        other => canonical_json(other),
    };
    Some((name, canonical_json(args)))
}

fn multiset<T: Ord>(items: impl Iterator<Item = T>) -> BTreeMap<T, usize> {
    let mut m = BTreeMap::new();
    for it in items {
        *m.entry(it).or_insert(0) += 1;
    }
    m
}

/// Normalise a ground truth: a list of calls, or a JSON string holding one (an object is wrapped).
pub fn ground_truth_calls(gt: &Value) -> Result<Vec<Value>, String> {
    match gt {
        Value::Array(a) => Ok(a.clone()),
        Value::Object(_) => Ok(vec![gt.clone()]),
        Value::String(s) => match serde_json::from_str::<Value>(s) {
            Ok(Value::String(_)) => Err("ground truth is a doubly-encoded JSON string".into()),
            Ok(v) => ground_truth_calls(&v),
            Err(e) => Err(format!("ground truth string is not valid JSON: {e}")),
        },
        other => Err(format!(
            "ground truth must be a list of {{name, arguments}}, found {}",
            json_kind(other)
        )),
    }
}

impl Reward for ToolN1Reward {
    fn check_ground_truth(&self, ground_truth: &Value) -> Result<(), String> {
        let calls = ground_truth_calls(ground_truth)?;
        for (i, c) in calls.iter().enumerate() {
            if call_key(c).is_none() {
                return Err(format!(
                    "ground-truth call {i} is not an object with `name` and `arguments`"
                ));
            }
        }
        Ok(())
    }

    fn score(&self, response: &str, ground_truth: &Value) -> RewardOutput {
        let v = self.variant;
        let think = response.contains("<think>") && response.contains("</think>");
        let partial = matches!(v, Variant::V3 | Variant::V4);
        let think_part = if partial && think { 0.2 } else { 0.0 };
        let out = |reward: f32, format_ok: bool, calls_ok: bool, reason: String| RewardOutput {
            reward,
            format_ok,
            calls_ok,
            reason,
        };

        let gt = match ground_truth_calls(ground_truth) {
            Ok(g) => g,
            Err(e) => return out(0.0, false, false, format!("bad ground truth: {e}")),
        };
        let Some(block) = last_tool_call_block(response) else {
            return out(think_part, false, false, "no <tool_call> block".into());
        };
        let pred = match parse_call_list(block) {
            Ok(p) => p,
            Err(e) => return out(think_part, false, false, e),
        };
        if v == Variant::V0 && !think {
            return out(0.0, false, false, "missing <think> or </think>".into());
        }
        let mut pkeys = Vec::with_capacity(pred.len());
        for (i, item) in pred.iter().enumerate() {
            match call_key(item) {
                Some(k) => pkeys.push(k),
                None => {
                    return out(
                        think_part,
                        false,
                        false,
                        format!("call {i} is not an object with `name` and `arguments`"),
                    )
                }
            }
        }
        let format_ok = v == Variant::V2 || think;
        let mut gkeys = Vec::with_capacity(gt.len());
        for (i, item) in gt.iter().enumerate() {
            match call_key(item) {
                Some(k) => gkeys.push(k),
                None => {
                    return out(
                        0.0,
                        format_ok,
                        false,
                        format!("bad ground truth: call {i} lacks `name` or `arguments`"),
                    )
                }
            }
        }
        let exact = multiset(pkeys.iter()) == multiset(gkeys.iter());
        if exact {
            let r = match v {
                Variant::V0 | Variant::V2 => 1.0,
                Variant::V3 | Variant::V4 => think_part + 0.8,
            };
            let reason = if format_ok {
                "ok".to_string()
            } else {
                "calls match but <think> or </think> is missing".to_string()
            };
            return out(r, format_ok, true, reason);
        }
        let names_match =
            multiset(pkeys.iter().map(|k| &k.0)) == multiset(gkeys.iter().map(|k| &k.0));
        let name_part = if v == Variant::V4 && names_match {
            0.2
        } else {
            0.0
        };
        let reason = if names_match {
            "function names match but arguments differ"
        } else {
            "calls do not match the ground truth"
        };
        out(think_part + name_part, format_ok, false, reason.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_block_is_used() {
        let r = "<tool_call>[1]</tool_call> x <tool_call>[2]</tool_call>";
        assert_eq!(last_tool_call_block(r), Some("[2]"));
        assert_eq!(last_tool_call_block("<tool_call>[1]"), None);
    }

    #[test]
    fn canonical_sorts_keys() {
        let a: Value = serde_json::from_str(r#"{"b":1,"a":{"d":2,"c":1.0}}"#).unwrap();
        assert_eq!(canonical_json(&a), r#"{"a":{"c":1.0,"d":2},"b":1}"#);
    }
}
