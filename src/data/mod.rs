//! Training data: the unified sample format, and the xLAM / ToolACE converters.

use serde::{Deserialize, Serialize};

/// One chat message. Assistant tool calls are stored as the JSON text of the call list
/// (facts §1.1); tool results use role `tool`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// One unified training/test sample (one line of the prepared JSONL).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub id: String,
    pub source: String,
    /// The prompt: system (with the Tool-N1 tool section) + prior turns, ending with the turn the
    /// model must answer.
    pub messages: Vec<Message>,
    /// Tool schemas (`{name, description, parameters}` objects).
    pub tools: Vec<serde_json::Value>,
    /// The expected calls: a JSON list of `{name, arguments}`.
    pub ground_truth: serde_json::Value,
}
