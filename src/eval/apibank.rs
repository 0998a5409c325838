//! API-Bank level-1 "Call" evaluation (data: `level-1-api.json`, a JSON array of
//! `{file, id, instruction, input, expected_output}`).
//!
//! The official benchmark executes each call against a fake database; this module instead
//! compares the API name and the parameter dict as API-Bank parses them (every value a string).
//! That is an APPROXIMATION of the official executor-based score, and every report says so.
//!
//! Record ids: the records' own `id` field repeats, so a record is named by its 0-based position
//! in the file, written as a string (`"0"`, `"1"`, ...), in prompts and in outputs alike.

use crate::data::{tooln1_system_prompt, Message};
use crate::{Error, Result};
use regex::Regex;
use serde::Serialize;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::OnceLock;

/// The caveat printed with every API-Bank number computed here.
pub const APPROXIMATION_NOTE: &str = "API-Bank score here compares API name and parsed \
parameters (values as strings); it approximates the official executor-based score.";

/// One API-Bank call record.
#[derive(Clone, Debug)]
pub struct ApiBankRecord {
    /// Position in the file, as a string.
    pub id: String,
    /// API descriptions (`{name, description, input_parameters, output_parameters}`).
    pub apis: Vec<Value>,
    /// The dialogue before the call (`User: ...`, `AI: ...`, `API-Request: ...` lines).
    pub input: String,
    pub expected_name: String,
    pub expected_params: BTreeMap<String, String>,
}

fn call_re() -> &'static Regex {
    static R: OnceLock<Regex> = OnceLock::new();
    R.get_or_init(|| Regex::new(r"\[(\w+)\((.*)\)\]").unwrap_or_else(|e| panic!("{e}")))
}

fn param_re() -> &'static Regex {
    static R: OnceLock<Regex> = OnceLock::new();
    R.get_or_init(|| {
        Regex::new(r#"(\w+)\s*=\s*['"](.+?)['"]|(\w+)\s*=\s*(\[.*\])|(\w+)\s*=\s*(\w+)"#)
            .unwrap_or_else(|e| panic!("{e}"))
    })
}

/// Parse `[ApiName(key='value', ...)]` the way API-Bank's evaluator does: the first
/// `\[(\w+)\((.*)\)\]`, then `key='value'` / `key="value"` / `key=[...]` / `key=word` pairs, all
/// values kept as strings. `None` when there is no call.
pub fn parse_api_request(text: &str) -> Option<(String, BTreeMap<String, String>)> {
    let c = call_re().captures(text)?;
    let name = c[1].to_string();
    let mut params = BTreeMap::new();
    for m in param_re().captures_iter(&c[2]) {
        let (k, v) = if let (Some(k), Some(v)) = (m.get(1), m.get(2)) {
            (k, v)
        } else if let (Some(k), Some(v)) = (m.get(3), m.get(4)) {
            (k, v)
        } else if let (Some(k), Some(v)) = (m.get(5), m.get(6)) {
            (k, v)
        } else {
            continue;
        };
        params.insert(k.as_str().to_string(), v.as_str().to_string());
    }
    Some((name, params))
}

/// Load `level-1-api.json` (or any file of the same shape).
pub fn load(path: &Path) -> Result<Vec<ApiBankRecord>> {
    let text = crate::safefs::read_to_string(path)?;
    let v: Value = serde_json::from_str(&text).map_err(|e| Error::Line {
        file: path.display().to_string(),
        line: e.line(),
        msg: format!("invalid JSON: {e}"),
    })?;
    let arr = v.as_array().ok_or_else(|| Error::Config {
        file: path.display().to_string(),
        field: "(top level)".into(),
        msg: "expected a JSON array of records".into(),
    })?;
    let mut out = Vec::with_capacity(arr.len());
    for (i, r) in arr.iter().enumerate() {
        let err = |msg: String| Error::Config {
            file: path.display().to_string(),
            field: format!("[{i}]"),
            msg,
        };
        let field = |name: &str| {
            r.get(name)
                .and_then(|x| x.as_str())
                .ok_or_else(|| err(format!("missing string field `{name}`")))
        };
        let instruction = field("instruction")?;
        let apis = parse_api_descriptions(instruction).map_err(&err)?;
        let expected = field("expected_output")?;
        let (expected_name, expected_params) = parse_api_request(expected).ok_or_else(|| {
            err(format!(
                "`expected_output` holds no [Api(...)] call: {expected}"
            ))
        })?;
        out.push(ApiBankRecord {
            id: i.to_string(),
            apis,
            input: field("input")?.to_string(),
            expected_name,
            expected_params,
        });
    }
    Ok(out)
}

/// The JSON lines after `API descriptions:` in an instruction.
pub fn parse_api_descriptions(instruction: &str) -> std::result::Result<Vec<Value>, String> {
    let marker = "API descriptions:";
    let at = instruction
        .find(marker)
        .ok_or_else(|| format!("`instruction` has no \"{marker}\" section"))?;
    let mut apis = Vec::new();
    for (n, line) in instruction[at + marker.len()..].lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line)
            .map_err(|e| format!("API description line {} is not JSON: {e}", n + 1))?;
        if v.get("name").and_then(|x| x.as_str()).is_none() {
            return Err(format!("API description line {} has no `name`", n + 1));
        }
        apis.push(v);
    }
    Ok(apis)
}

fn schema_type(t: &str) -> &str {
    match t {
        "str" => "string",
        "int" => "integer",
        "float" => "number",
        "bool" => "boolean",
        "dict" => "object",
        t if t.starts_with("list") => "array",
        other => other,
    }
}

/// An API description as a tool schema `{name, description, parameters: {type: "object",
/// properties, required}}` (API-Bank types `str/int/float/bool/list/list(str)/dict` mapped to
/// JSON-schema names; every input parameter listed as required, since API-Bank marks none
/// optional).
pub fn api_to_tool(api: &Value) -> Value {
    let mut props = serde_json::Map::new();
    let mut required = Vec::new();
    if let Some(ps) = api.get("input_parameters").and_then(|p| p.as_object()) {
        for (k, p) in ps {
            let mut o = serde_json::Map::new();
            let t = p.get("type").and_then(|t| t.as_str()).unwrap_or("string");
            o.insert("type".into(), Value::String(schema_type(t).into()));
            if t.starts_with("list(") {
                let inner = t.trim_start_matches("list(").trim_end_matches(')');
                o.insert(
                    "items".into(),
                    serde_json::json!({"type": schema_type(inner)}),
                );
            }
            if let Some(d) = p.get("description") {
                o.insert("description".into(), d.clone());
            }
            props.insert(k.clone(), Value::Object(o));
            required.push(Value::String(k.clone()));
        }
    }
    serde_json::json!({
        "name": api.get("name").cloned().unwrap_or(Value::Null),
        "description": api.get("description").cloned().unwrap_or(Value::String(String::new())),
        "parameters": {"type": "object", "properties": Value::Object(props), "required": required},
    })
}

/// Convert an `API-Request: [Name(k='v')]->result` line into an assistant call message (JSON
/// of `[{name, arguments}]`) and a tool message holding the result.
fn api_request_messages(line: &str) -> Vec<Message> {
    let body = line.trim_start_matches("API-Request:").trim();
    let (call, result) = match body.find("]->") {
        Some(i) => (&body[..=i], Some(&body[i + 3..])),
        None => (body, None),
    };
    let mut out = Vec::new();
    let content = match parse_api_request(call) {
        Some((name, params)) => {
            let args: serde_json::Map<String, Value> = params
                .into_iter()
                .map(|(k, v)| (k, Value::String(v)))
                .collect();
            crate::pyjson::py_json(
                &serde_json::json!([{"name": name, "arguments": Value::Object(args)}]),
            )
        }
        None => call.to_string(),
    };
    out.push(Message {
        role: "assistant".into(),
        content,
    });
    if let Some(r) = result {
        out.push(Message {
            role: "tool".into(),
            content: r.to_string(),
        });
    }
    out
}

/// The dialogue as chat messages: `User:` -> user, `AI:` -> assistant, `API-Request:` ->
/// assistant call + tool result; lines without a prefix continue the previous message; the
/// closing `Generate API Request:` line is dropped.
pub fn dialogue_messages(input: &str) -> Vec<Message> {
    let mut msgs: Vec<Message> = Vec::new();
    for line in input.lines() {
        if line.trim() == "Generate API Request:" {
            continue;
        }
        if let Some(t) = line.strip_prefix("User:") {
            msgs.push(Message {
                role: "user".into(),
                content: t.trim().into(),
            });
        } else if let Some(t) = line.strip_prefix("AI:") {
            msgs.push(Message {
                role: "assistant".into(),
                content: t.trim().into(),
            });
        } else if line.starts_with("API-Request:") {
            msgs.extend(api_request_messages(line));
        } else if let Some(last) = msgs.last_mut() {
            if !line.is_empty() {
                last.content.push('\n');
                last.content.push_str(line);
            }
        } else if !line.trim().is_empty() {
            msgs.push(Message {
                role: "user".into(),
                content: line.trim().into(),
            });
        }
    }
    msgs
}

/// The Tool-N1 evaluation prompt for a record.
pub fn eval_prompt(rec: &ApiBankRecord, base_system: &str) -> crate::eval::bfcl::EvalPrompt {
    let tools: Vec<Value> = rec.apis.iter().map(api_to_tool).collect();
    let mut messages = vec![Message {
        role: "system".into(),
        content: tooln1_system_prompt(base_system, &tools, true),
    }];
    messages.extend(dialogue_messages(&rec.input));
    crate::eval::bfcl::EvalPrompt {
        id: rec.id.clone(),
        messages,
        tools,
    }
}

/// A JSON argument value as the string API-Bank would have parsed (strings as is, numbers as
/// written, booleans `True`/`False`, lists/objects as JSON text).
fn value_string(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Bool(true) => "True".into(),
        Value::Bool(false) => "False".into(),
        Value::Null => "None".into(),
        Value::Number(n) => n.to_string(),
        other => other.to_string(),
    }
}

/// The first call in a model output: a Tool-N1 / Qwen `<tool_call>` block, else API-Bank's own
/// `[Name(key='value')]` syntax.
pub fn decode_call(
    output: &str,
) -> std::result::Result<(String, BTreeMap<String, String>), String> {
    if output.contains("<tool_call>") {
        let calls =
            crate::eval::bfcl::decode_output(output).map_err(|e| e.message().to_string())?;
        let c = calls.first().ok_or("empty call list")?;
        let mut params = BTreeMap::new();
        for (k, v) in &c.args {
            let j = v.to_json().map_err(|e| format!("argument `{k}`: {e}"))?;
            params.insert(k.clone(), value_string(&j));
        }
        return Ok((c.name.clone(), params));
    }
    parse_api_request(output).ok_or_else(|| "no [ApiName(...)] call in the output".into())
}

/// The verdict on one record.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ApiBankVerdict {
    pub id: String,
    pub correct: bool,
    pub reason: String,
}

/// Scores for a set of records.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ApiBankReport {
    pub correct: usize,
    pub total: usize,
    pub missing: usize,
    pub verdicts: Vec<ApiBankVerdict>,
    pub note: &'static str,
}

impl ApiBankReport {
    pub fn accuracy(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            100.0 * self.correct as f64 / self.total as f64
        }
    }
}

/// Check one output against a record.
pub fn check(rec: &ApiBankRecord, output: &str) -> ApiBankVerdict {
    let (correct, reason) = match decode_call(output) {
        Err(e) => (false, format!("cannot decode a call: {e}")),
        Ok((name, _)) if name != rec.expected_name => (
            false,
            format!("API name `{name}`, expected `{}`", rec.expected_name),
        ),
        Ok((_, params)) if params != rec.expected_params => (
            false,
            format!("parameters {params:?}, expected {:?}", rec.expected_params),
        ),
        Ok(_) => (true, "ok".into()),
    };
    ApiBankVerdict {
        id: rec.id.clone(),
        correct,
        reason,
    }
}

/// Score `(id, output)` pairs; records without an output count as wrong.
pub fn score(records: &[ApiBankRecord], outputs: &[(String, String)]) -> ApiBankReport {
    let by_id: HashMap<&str, &str> = outputs
        .iter()
        .map(|(i, o)| (i.as_str(), o.as_str()))
        .collect();
    let mut rep = ApiBankReport {
        note: APPROXIMATION_NOTE,
        ..Default::default()
    };
    for r in records {
        let v = match by_id.get(r.id.as_str()) {
            Some(o) => check(r, o),
            None => {
                rep.missing += 1;
                ApiBankVerdict {
                    id: r.id.clone(),
                    correct: false,
                    reason: "no output for this id".into(),
                }
            }
        };
        rep.total += 1;
        rep.correct += v.correct as usize;
        rep.verdicts.push(v);
    }
    rep
}
