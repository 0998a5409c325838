//! Raw model text to calls: the Tool-N1 JSON list, Qwen's one-object-per-block format, or BFCL's
//! Python-call syntax.

use crate::pycall::{self, ParseOptions, PyValue};
use serde_json::Value;

/// One decoded call: function name and keyword arguments in output order.
#[derive(Clone, Debug, PartialEq)]
pub struct Call {
    pub name: String,
    pub args: Vec<(String, PyValue)>,
}

/// How decoding failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// Not parseable at all (`ast_decoder:decoder_failed`).
    Failed(String),
    /// Parsed, but not a list of calls (`ast_decoder:decoder_wrong_output_format`).
    WrongFormat(String),
}

impl DecodeError {
    pub fn kind(&self) -> &'static str {
        match self {
            DecodeError::Failed(_) => "ast_decoder:decoder_failed",
            DecodeError::WrongFormat(_) => "ast_decoder:decoder_wrong_output_format",
        }
    }
    pub fn message(&self) -> &str {
        match self {
            DecodeError::Failed(m) | DecodeError::WrongFormat(m) => m,
        }
    }
}

fn tool_call_blocks(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut pos = 0;
    while let Some(o) = text[pos..].find("<tool_call>") {
        let start = pos + o + "<tool_call>".len();
        match text[start..].find("</tool_call>") {
            Some(c) => {
                out.push(&text[start..start + c]);
                pos = start + c + "</tool_call>".len();
            }
            None => break,
        }
    }
    out
}

fn json_call(item: &Value, i: usize) -> std::result::Result<Call, DecodeError> {
    let o = item
        .as_object()
        .ok_or_else(|| DecodeError::WrongFormat(format!("call {i} is not a JSON object")))?;
    let name = o
        .get("name")
        .and_then(|n| n.as_str())
        .ok_or_else(|| DecodeError::WrongFormat(format!("call {i} has no string `name`")))?;
    let args = match o.get("arguments") {
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, v)| (k.clone(), PyValue::from_json(v)))
            .collect(),
        Some(_) => {
            return Err(DecodeError::WrongFormat(format!(
                "call {i}: `arguments` is not a JSON object"
            )))
        }
        None => {
            return Err(DecodeError::WrongFormat(format!(
                "call {i} has no `arguments`"
            )))
        }
    };
    Ok(Call {
        name: name.to_string(),
        args,
    })
}

/// Decode raw model output into calls.
///
/// - With a `<tool_call>` block: the FIRST block's content as JSON. A list is the Tool-N1 format
///   (`[{"name", "arguments"}, ...]`); an object is Qwen's native format, where every block holds
///   one call object and all blocks are read.
/// - Otherwise BFCL's Python-call syntax (after the last `</think>` if any), decoded as BFCL's
///   `default_decode_ast_prompting` does: strip backticks/newlines/spaces, add missing outer
///   brackets, strip wrapping single quotes, parse `[f(a=1), mod.g(b="x")]`.
pub fn decode_output(text: &str) -> std::result::Result<Vec<Call>, DecodeError> {
    let blocks = tool_call_blocks(text);
    if text.contains("<tool_call>") {
        let Some(first) = blocks.first() else {
            return Err(DecodeError::Failed(
                "<tool_call> without </tool_call>".into(),
            ));
        };
        let v: Value = serde_json::from_str(first.trim()).map_err(|e| {
            DecodeError::Failed(format!("<tool_call> content is not valid JSON: {e}"))
        })?;
        return match v {
            Value::Array(items) => items
                .iter()
                .enumerate()
                .map(|(i, it)| json_call(it, i))
                .collect(),
            Value::Object(_) => {
                let mut calls = vec![json_call(&v, 0)?];
                for (i, b) in blocks.iter().enumerate().skip(1) {
                    let v: Value = serde_json::from_str(b.trim()).map_err(|e| {
                        DecodeError::Failed(format!("<tool_call> block {i} is not valid JSON: {e}"))
                    })?;
                    calls.push(json_call(&v, i)?);
                }
                Ok(calls)
            }
            _ => Err(DecodeError::WrongFormat(
                "<tool_call> content is neither a list nor an object".into(),
            )),
        };
    }
    let body = match text.rfind("</think>") {
        Some(i) => &text[i + "</think>".len()..],
        None => text,
    };
    let mut s = body
        .trim_matches(|c| c == '`' || c == '\n' || c == ' ')
        .to_string();
    if !s.starts_with('[') {
        s.insert(0, '[');
    }
    if !s.ends_with(']') {
        s.push(']');
    }
    let cleaned = s.trim().trim_matches('\'');
    let calls = pycall::parse_calls(cleaned, ParseOptions { bare_names: true })
        .map_err(|e| DecodeError::Failed(format!("not a Python call list: {e}")))?;
    Ok(calls
        .into_iter()
        .map(|c| Call {
            name: c.name,
            args: c.kwargs,
        })
        .collect())
}
