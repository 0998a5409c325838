//! BFCL (Berkeley Function Calling Leaderboard) AST evaluation, ported from the official checker
//! (`bfcl_eval/eval_checker/ast_eval/ast_checker.py` of `bfcl-eval==2026.3.23`; facts §4).
//!
//! - [`load_category`] / [`load_dir`] read the test files and their possible answers.
//! - [`eval_prompt`] builds the Tool-N1 evaluation prompt for a record.
//! - [`decode_output`] turns raw model text into calls (Tool-N1 JSON list in the first
//!   `<tool_call>` block, Qwen's one-object-per-block format, or BFCL's Python-call syntax).
//! - [`check_record`] gives the verdict for one record and [`score`] for many `(id, output)`
//!   pairs in memory; [`Report`] holds per-category accuracy and the Tool-N1 summary.
//!
//! Assumptions where the official pipeline is Python-specific:
//! - Values are [`PyValue`]s so that Python's type distinctions hold (int vs float, bool vs int,
//!   list vs tuple). JSON from a `<tool_call>` block maps integers to `int` and numbers with a
//!   fraction or exponent to `float`, as Python's `json.loads` does.
//! - Java / JavaScript (`simple_java`, `simple_javascript`): as in the official runner, the prompt
//!   tells the model that every parameter is a string holding Java/JavaScript source, and the
//!   checker requires a string for every parameter whose declared type is known, converts it with
//!   the ported `java_type_converter` / `js_type_converter` ([`lang`]), and then applies the
//!   Python rules to the converted value. A non-string value for such a parameter is
//!   `type_error:java` / `type_error:js`, as in the official checker.
//! - Where the Python code would crash (a ground-truth function missing from the function list,
//!   a schema without `properties`, an unknown type name), the record gets a failed verdict with
//!   kind `checker:bad_record` instead.
//! - BFCL's Python decoder also evaluates arithmetic (`2*3`) and lambdas inside arguments; this
//!   decoder rejects them (decode failure). Positional arguments are ignored, as in BFCL.

pub mod lang;

use crate::data::{tooln1_system_prompt, Message};
use crate::pycall::{self, py_eq, ParseOptions, PyValue};
use crate::{Error, Result};
use serde::Serialize;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// The BFCL categories scored here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Category {
    SimplePython,
    SimpleJava,
    SimpleJavascript,
    Multiple,
    Parallel,
    ParallelMultiple,
    LiveSimple,
    LiveMultiple,
    LiveParallel,
    LiveParallelMultiple,
    Irrelevance,
    LiveIrrelevance,
    LiveRelevance,
}

impl Category {
    pub const ALL: [Category; 13] = [
        Category::SimplePython,
        Category::SimpleJava,
        Category::SimpleJavascript,
        Category::Multiple,
        Category::Parallel,
        Category::ParallelMultiple,
        Category::LiveSimple,
        Category::LiveMultiple,
        Category::LiveParallel,
        Category::LiveParallelMultiple,
        Category::Irrelevance,
        Category::LiveIrrelevance,
        Category::LiveRelevance,
    ];

    /// The eleven categories of the Tool-N1 table (python-only simple plus relevance checks).
    pub const TOOLN1: [Category; 11] = [
        Category::SimplePython,
        Category::Multiple,
        Category::Parallel,
        Category::ParallelMultiple,
        Category::LiveSimple,
        Category::LiveMultiple,
        Category::LiveParallel,
        Category::LiveParallelMultiple,
        Category::Irrelevance,
        Category::LiveIrrelevance,
        Category::LiveRelevance,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Category::SimplePython => "simple_python",
            Category::SimpleJava => "simple_java",
            Category::SimpleJavascript => "simple_javascript",
            Category::Multiple => "multiple",
            Category::Parallel => "parallel",
            Category::ParallelMultiple => "parallel_multiple",
            Category::LiveSimple => "live_simple",
            Category::LiveMultiple => "live_multiple",
            Category::LiveParallel => "live_parallel",
            Category::LiveParallelMultiple => "live_parallel_multiple",
            Category::Irrelevance => "irrelevance",
            Category::LiveIrrelevance => "live_irrelevance",
            Category::LiveRelevance => "live_relevance",
        }
    }

    pub fn from_name(s: &str) -> Option<Category> {
        Category::ALL.into_iter().find(|c| c.name() == s)
    }

    /// The category of a record id (`simple_python_3`, `live_multiple_12-4-0`).
    pub fn from_id(id: &str) -> Option<Category> {
        let cut = id.rfind('_')?;
        Category::from_name(&id[..cut])
    }

    /// The data file name (`BFCL_v4_<name>.json`, same name under `possible_answer/`).
    pub fn file_name(self) -> String {
        format!("BFCL_v4_{}.json", self.name())
    }

    /// Scored by the AST checker against possible answers (not a relevance check).
    pub fn is_ast(self) -> bool {
        !matches!(
            self,
            Category::Irrelevance | Category::LiveIrrelevance | Category::LiveRelevance
        )
    }

    pub fn is_live(self) -> bool {
        self.name().starts_with("live_")
    }

    pub fn language(self) -> Language {
        match self {
            Category::SimpleJava => Language::Java,
            Category::SimpleJavascript => Language::JavaScript,
            _ => Language::Python,
        }
    }
}

/// The language a category's functions are written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Language {
    Python,
    Java,
    JavaScript,
}

/// One BFCL test record with its possible answer (none for relevance categories).
#[derive(Clone, Debug)]
pub struct Record {
    pub id: String,
    pub category: Category,
    /// Turns; each turn a list of `{role, content}` messages (single-turn categories have one).
    pub question: Vec<Vec<Message>>,
    /// Function documents as in the file (`{name, description, parameters}`).
    pub functions: Vec<Value>,
    /// `ground_truth`: a list of `{func_name: {param: [allowed values...]}}`.
    pub ground_truth: Option<Vec<Value>>,
}

fn read_jsonl(path: &Path) -> Result<Vec<Value>> {
    crate::data::read_jsonl(path, "valid JSON")
}

/// Load one category from a BFCL data folder (the folder holding `BFCL_v4_*.json` and
/// `possible_answer/`).
pub fn load_category(dir: &Path, cat: Category) -> Result<Vec<Record>> {
    let path = dir.join(cat.file_name());
    let rows = read_jsonl(&path)?;
    let answers = if cat.is_ast() {
        let apath = dir.join("possible_answer").join(cat.file_name());
        let a = read_jsonl(&apath)?;
        let mut by_id: HashMap<String, Value> = HashMap::new();
        for (i, v) in a.into_iter().enumerate() {
            let id = v
                .get("id")
                .and_then(|x| x.as_str())
                .ok_or_else(|| Error::Line {
                    file: apath.display().to_string(),
                    line: i + 1,
                    msg: "missing string field `id`".into(),
                })?;
            by_id.insert(id.to_string(), v);
        }
        Some((apath, by_id))
    } else {
        None
    };
    let mut out = Vec::with_capacity(rows.len());
    let file = path.display().to_string();
    for (i, r) in rows.into_iter().enumerate() {
        let line_err = |msg: String| Error::Line {
            file: file.clone(),
            line: i + 1,
            msg,
        };
        let id = r
            .get("id")
            .and_then(|x| x.as_str())
            .ok_or_else(|| line_err("missing string field `id`".into()))?
            .to_string();
        let question = parse_question(r.get("question"))
            .map_err(|m| line_err(format!("field `question`: {m}")))?;
        let functions = r
            .get("function")
            .and_then(|f| f.as_array())
            .cloned()
            .ok_or_else(|| line_err("missing list field `function`".into()))?;
        let ground_truth = match &answers {
            None => None,
            Some((apath, by_id)) => {
                let a = by_id.get(&id).ok_or_else(|| {
                    line_err(format!("record `{id}` has no entry in {}", apath.display()))
                })?;
                let gt = a
                    .get("ground_truth")
                    .and_then(|g| g.as_array())
                    .cloned()
                    .ok_or_else(|| {
                        line_err(format!(
                            "{}: `{id}`: missing list field `ground_truth`",
                            apath.display()
                        ))
                    })?;
                Some(gt)
            }
        };
        out.push(Record {
            id,
            category: cat,
            question,
            functions,
            ground_truth,
        });
    }
    Ok(out)
}

fn parse_question(q: Option<&Value>) -> std::result::Result<Vec<Vec<Message>>, String> {
    let turns = q
        .and_then(|q| q.as_array())
        .ok_or("expected a list of turns")?;
    let mut out = Vec::new();
    for t in turns {
        // Usually a list of messages; tolerate a bare message.
        let msgs: Vec<&Value> = match t {
            Value::Array(a) => a.iter().collect(),
            Value::Object(_) => vec![t],
            _ => return Err("a turn must be a list of {role, content}".into()),
        };
        let mut turn = Vec::new();
        for m in msgs {
            let role = m
                .get("role")
                .and_then(|r| r.as_str())
                .ok_or("message without `role`")?;
            let content = match m.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(v) => v.to_string(),
                None => String::new(),
            };
            turn.push(Message {
                role: role.into(),
                content,
            });
        }
        out.push(turn);
    }
    Ok(out)
}

/// Load several categories (all [`Category::ALL`] when `cats` is empty).
pub fn load_dir(dir: &Path, cats: &[Category]) -> Result<Vec<Record>> {
    let cats: Vec<Category> = if cats.is_empty() {
        Category::ALL.to_vec()
    } else {
        cats.to_vec()
    };
    let mut out = Vec::new();
    for c in cats {
        out.extend(load_category(dir, c)?);
    }
    Ok(out)
}

/// An evaluation prompt: messages in the Tool-N1 format and the tool schemas shown.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EvalPrompt {
    pub id: String,
    pub messages: Vec<Message>,
    pub tools: Vec<Value>,
}

/// The function docs as the model sees them (BFCL's `_func_doc_language_specific_pre_processing`):
/// a language hint appended to each description; for Java/JavaScript every parameter becomes
/// `"type": "string"` with a note on its real type (and list item types / dict schemas moved into
/// the description).
pub fn prompt_functions(functions: &[Value], lang: Language) -> Vec<Value> {
    let hint = match lang {
        Language::Java => " Note that the provided function is in Java 8 SDK syntax.",
        Language::JavaScript => " Note that the provided function is in JavaScript syntax.",
        Language::Python => " Note that the provided function is in Python 3 syntax.",
    };
    let (lname, list_ty): (&str, &[&str]) = match lang {
        Language::Java => ("Java", &["ArrayList", "Array"]),
        Language::JavaScript => ("JavaScript", &["array"]),
        Language::Python => ("", &[]),
    };
    let mut out = functions.to_vec();
    for f in out.iter_mut() {
        let Some(obj) = f.as_object_mut() else {
            continue;
        };
        let desc = obj
            .get("description")
            .and_then(|d| d.as_str())
            .unwrap_or("")
            .to_string();
        obj.insert("description".into(), Value::String(desc + hint));
        if lang == Language::Python {
            continue;
        }
        let Some(props) = obj
            .get_mut("parameters")
            .and_then(|p| p.get_mut("properties"))
            .and_then(|p| p.as_object_mut())
        else {
            continue;
        };
        for (_, p) in props.iter_mut() {
            let Some(p) = p.as_object_mut() else { continue };
            let ty = p
                .get("type")
                .and_then(|t| t.as_str())
                .unwrap_or("")
                .to_string();
            let mut d = p
                .get("description")
                .and_then(|d| d.as_str())
                .unwrap_or("")
                .to_string();
            if ty == "any" {
                d += &format!(" This parameter can be of any type of {lname} object in string representation.");
            } else {
                d += &format!(" This is {lname} {ty} type parameter in string representation.");
            }
            if list_ty.contains(&ty.as_str()) {
                let it = p
                    .get("items")
                    .and_then(|i| i.get("type"))
                    .and_then(|t| t.as_str())
                    .unwrap_or("")
                    .to_string();
                d += &format!(
                    " The list elements are of type {it}; they are not in string representation."
                );
                p.remove("items");
            }
            if lang == Language::JavaScript && ty == "dict" {
                if let Some(pp) = p.remove("properties") {
                    d += &format!(
                        " The dictionary entries have the following schema; they are not in string representation. {}",
                        crate::pyjson::py_json(&pp)
                    );
                }
            }
            p.insert("description".into(), Value::String(d));
            p.insert("type".into(), Value::String("string".into()));
        }
    }
    out
}

/// The Tool-N1 evaluation prompt for a record: system = `base_system` (plus any system message
/// of the record) + the tool section with the evaluation instruction, then the record's first
/// turn.
pub fn eval_prompt(rec: &Record, base_system: &str) -> EvalPrompt {
    let tools = prompt_functions(&rec.functions, rec.category.language());
    let mut base = base_system.to_string();
    let mut msgs = Vec::new();
    for m in rec.question.first().map(|t| t.as_slice()).unwrap_or(&[]) {
        if m.role == "system" {
            if !base.is_empty() {
                base.push_str("\n\n");
            }
            base.push_str(&m.content);
        } else {
            msgs.push(m.clone());
        }
    }
    let mut messages = vec![Message {
        role: "system".into(),
        content: tooln1_system_prompt(&base, &tools, true),
    }];
    messages.extend(msgs);
    EvalPrompt {
        id: rec.id.clone(),
        messages,
        tools,
    }
}

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

/// A checker verdict (`error_type` uses the official names, e.g.
/// `simple_function_checker:missing_required`, `type_error:simple`, `value_error:string`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Verdict {
    pub id: String,
    pub category: &'static str,
    pub valid: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A failed check: official error kind and message.
#[derive(Clone, Debug, PartialEq)]
pub struct Fail {
    pub kind: String,
    pub msg: String,
}

type Check = std::result::Result<(), Fail>;

fn fail(kind: &str, msg: impl Into<String>) -> Check {
    Err(Fail {
        kind: kind.into(),
        msg: msg.into(),
    })
}

/// The Python type an expected-type name maps to (`PYTHON_TYPE_MAPPING`, `JAVA_TYPE_CONVERSION`,
/// `JS_TYPE_CONVERSION`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PyType {
    Str,
    Int,
    Float,
    Bool,
    List,
    Dict,
    Set,
    Tuple,
    NoneType,
}

impl PyType {
    pub fn of(v: &PyValue) -> PyType {
        match v {
            PyValue::None => PyType::NoneType,
            PyValue::Bool(_) => PyType::Bool,
            PyValue::Int(_) => PyType::Int,
            PyValue::Float(_) => PyType::Float,
            PyValue::Str(_) => PyType::Str,
            PyValue::List(_) => PyType::List,
            PyValue::Tuple(_) => PyType::Tuple,
            PyValue::Dict(_) => PyType::Dict,
        }
    }
    fn name(self) -> &'static str {
        match self {
            PyType::Str => "str",
            PyType::Int => "int",
            PyType::Float => "float",
            PyType::Bool => "bool",
            PyType::List => "list",
            PyType::Dict => "dict",
            PyType::Set => "set",
            PyType::Tuple => "tuple",
            PyType::NoneType => "NoneType",
        }
    }
}

/// Map a declared type to its Python type for a language; `None` when the official table has no
/// entry.
pub fn expected_type(lang: Language, ty: &str) -> Option<PyType> {
    use PyType::*;
    Some(match lang {
        Language::Python => match ty {
            "string" | "any" => Str,
            "integer" => Int,
            "float" => Float,
            "boolean" => Bool,
            "array" | "tuple" => List,
            "dict" => Dict,
            _ => return None,
        },
        Language::Java => match ty {
            "byte" | "short" | "integer" | "long" => Int,
            "float" | "double" => Float,
            "boolean" => Bool,
            "char" | "String" | "any" => Str,
            "Array" | "ArrayList" | "Queue" | "Stack" => List,
            "Set" => Set,
            "HashMap" | "Hashtable" => Dict,
            _ => return None,
        },
        Language::JavaScript => match ty {
            "String" | "any" => Str,
            "integer" | "Bigint" => Int,
            "float" => Float,
            "Boolean" => Bool,
            "dict" => Dict,
            "array" => List,
            _ => return None,
        },
    })
}

/// `standardize_string`: drop the characters ` ,./-_*^`, lowercase, `'` -> `"`.
pub fn standardize_string(s: &str) -> String {
    s.chars()
        .filter(|c| !matches!(c, ' ' | ',' | '.' | '/' | '-' | '_' | '*' | '^'))
        .collect::<String>()
        .to_lowercase()
        .replace('\'', "\"")
}

fn std_val(v: &PyValue) -> PyValue {
    match v {
        PyValue::Str(s) => PyValue::Str(standardize_string(s)),
        other => other.clone(),
    }
}

fn contains(list: &[PyValue], v: &PyValue) -> bool {
    list.iter().any(|x| py_eq(x, v))
}

fn is_empty_marker(v: &PyValue) -> bool {
    matches!(v, PyValue::Str(s) if s.is_empty())
}

/// `get_possible_answer_type`: the type of the first allowed value that is not `""`.
fn possible_answer_type(allowed: &[PyValue]) -> Option<PyType> {
    allowed.iter().find(|a| !is_empty_marker(a)).map(PyType::of)
}

/// Python's iteration over a value used as a sequence (lists, tuples; strings by character).
fn as_seq(v: &PyValue) -> Option<Vec<PyValue>> {
    match v {
        PyValue::List(a) | PyValue::Tuple(a) => Some(a.clone()),
        PyValue::Str(s) => Some(s.chars().map(|c| PyValue::Str(c.to_string())).collect()),
        _ => None,
    }
}

/// `type_checker`; returns `is_variable` on success.
fn type_checker(
    param: &str,
    value: &PyValue,
    allowed: &[PyValue],
    expected_desc: &str,
    expected: PyType,
    nested: Option<PyType>,
) -> std::result::Result<bool, Fail> {
    let pat = possible_answer_type(allowed);
    let is_variable = pat.is_some_and(|t| t != expected);
    let mut nested_fail = false;
    if PyType::of(value) == expected {
        let Some(nested) = nested else {
            return Ok(is_variable);
        };
        for item in allowed {
            let mut flag = true;
            if let PyValue::List(inner_allowed) = item {
                if let Some(values) = as_seq(value) {
                    for vi in &values {
                        if type_checker(param, vi, inner_allowed, nested.name(), nested, None)
                            .is_err()
                        {
                            flag = false;
                            break;
                        }
                    }
                }
            }
            if flag {
                return Ok(is_variable);
            }
        }
        nested_fail = true;
    }
    let pat_match = pat.is_some_and(|t| PyType::of(value) == t);
    if pat_match && !nested_fail {
        return Ok(true);
    }
    if nested_fail && pat_match {
        return Err(Fail {
            kind: "type_error:nested".into(),
            msg: format!(
                "Nested type checking failed for parameter '{param}'. Expected outer type {expected_desc} with inner type {}. Parameter value: {}.",
                nested.map(|n| n.name()).unwrap_or(""),
                value.repr()
            ),
        });
    }
    Err(Fail {
        kind: "type_error:simple".into(),
        msg: format!(
            "Incorrect type for parameter '{param}'. Expected type {expected_desc}, got {}. Parameter value: {}.",
            value.type_name(),
            value.repr()
        ),
    })
}

fn string_checker(param: &str, value: &str, allowed: &[PyValue]) -> Check {
    let m = standardize_string(value);
    let ok = allowed
        .iter()
        .any(|a| matches!(a, PyValue::Str(s) if standardize_string(s) == m));
    if ok {
        Ok(())
    } else {
        fail(
            "value_error:string",
            format!(
                "Invalid value for parameter '{param}': '{value}'. Expected one of {}. Case insensitive.",
                PyValue::List(allowed.to_vec()).repr()
            ),
        )
    }
}

fn list_checker(param: &str, value: &[PyValue], allowed: &[PyValue]) -> Check {
    let model = PyValue::List(value.iter().map(std_val).collect());
    let ok = allowed.iter().any(|a| match as_seq(a) {
        Some(items) => py_eq(&model, &PyValue::List(items.iter().map(std_val).collect())),
        None => false,
    });
    if ok {
        Ok(())
    } else {
        fail(
            "value_error:list/tuple",
            format!(
                "Invalid value for parameter '{param}': {}. Expected one of {}.",
                PyValue::List(value.to_vec()).repr(),
                PyValue::List(allowed.to_vec()).repr()
            ),
        )
    }
}

fn dict_lookup<'a>(d: &'a [(PyValue, PyValue)], key: &PyValue) -> Option<&'a PyValue> {
    d.iter().find(|(k, _)| py_eq(k, key)).map(|(_, v)| v)
}

fn dict_checker(value: &[(PyValue, PyValue)], allowed: &[PyValue]) -> Check {
    let mut result = fail(
        "dict_checker:unclear",
        "No possible answer to compare the dict with.",
    );
    for pa in allowed {
        if is_empty_marker(pa) {
            continue;
        }
        let PyValue::Dict(pa) = pa else {
            result = fail(
                "dict_checker:unclear",
                format!("Possible answer {} is not a dict.", pa.repr()),
            );
            continue;
        };
        let mut flag = true;
        for (k, v) in value {
            let Some(allowed_v) = dict_lookup(pa, k) else {
                result = fail(
                    "value_error:dict_key",
                    format!("Unexpected dict key parameter: {}.", k.repr()),
                );
                flag = false;
                break;
            };
            let sv = std_val(v);
            let std_allowed: Vec<PyValue> = as_seq(allowed_v)
                .unwrap_or_default()
                .iter()
                .map(std_val)
                .collect();
            if !contains(&std_allowed, &sv) {
                result = fail(
                    "value_error:dict_value",
                    format!(
                        "Invalid value for parameter {}: {}. Expected one of {}.",
                        k.repr(),
                        v.repr(),
                        PyValue::List(std_allowed).repr()
                    ),
                );
                flag = false;
                break;
            }
        }
        if flag {
            for (k, av) in pa {
                let optional = as_seq(av).is_some_and(|s| s.iter().any(is_empty_marker));
                if dict_lookup(value, k).is_none() && !optional {
                    result = fail(
                        "value_error:dict_key",
                        format!("Missing dict key parameter: {}.", k.repr()),
                    );
                    flag = false;
                    break;
                }
            }
        }
        if flag {
            return Ok(());
        }
    }
    result
}

fn list_dict_checker(value: &[PyValue], allowed: &[PyValue]) -> Check {
    let mut result = fail(
        "list_dict_checker:unclear",
        "No possible answer to compare the list with.",
    );
    for pa in allowed {
        let Some(pa_items) = as_seq(pa) else {
            continue;
        };
        if value.len() != pa_items.len() {
            result = fail(
                "value_error:list_dict_count",
                "Wrong number of dictionaries in the list.",
            );
            continue;
        }
        let mut flag = true;
        for (m, a) in value.iter().zip(&pa_items) {
            let r = match m {
                PyValue::Dict(d) => dict_checker(d, std::slice::from_ref(a)),
                other => fail(
                    "value_error:dict_value",
                    format!("List element {} is not a dict.", other.repr()),
                ),
            };
            if let Err(e) = r {
                result = Err(e);
                flag = false;
                break;
            }
        }
        if flag {
            return Ok(());
        }
    }
    result
}

fn bad_record(msg: impl Into<String>) -> Fail {
    Fail {
        kind: "checker:bad_record".into(),
        msg: msg.into(),
    }
}

fn find_description<'a>(funcs: &'a [Value], name: &str) -> Option<&'a Value> {
    funcs
        .iter()
        .find(|f| f.get("name").and_then(|n| n.as_str()) == Some(name))
}

/// `simple_function_checker`: one model call against one ground-truth entry
/// `{func_name: {param: [allowed...]}}`.
pub fn simple_function_checker(
    func: &Value,
    call: &Call,
    gt_entry: &Value,
    lang: Language,
) -> Check {
    let (gt_name, gt_params) = gt_entry
        .as_object()
        .and_then(|o| o.iter().next())
        .ok_or_else(|| bad_record("ground-truth entry is not {func_name: {...}}"))?;
    let _ = gt_name;
    let gt_params = gt_params
        .as_object()
        .ok_or_else(|| bad_record("ground-truth parameters are not an object"))?;
    let func_name = func
        .get("name")
        .and_then(|n| n.as_str())
        .ok_or_else(|| bad_record("function document has no `name`"))?;
    let props = func
        .get("parameters")
        .and_then(|p| p.get("properties"))
        .and_then(|p| p.as_object())
        .ok_or_else(|| {
            bad_record(format!(
                "function `{func_name}` has no parameters.properties"
            ))
        })?;
    let required: Vec<&str> = func
        .get("parameters")
        .and_then(|p| p.get("required"))
        .and_then(|r| r.as_array())
        .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
        .unwrap_or_default();

    if call.name != func_name {
        return fail(
            "simple_function_checker:wrong_func_name",
            format!("Function name '{func_name}' not found in model output."),
        );
    }
    let has = |p: &str| call.args.iter().any(|(k, _)| k == p);
    for r in &required {
        if !has(r) {
            return fail(
                "simple_function_checker:missing_required",
                format!("Missing required parameter: '{r}'."),
            );
        }
    }
    for (param, value) in &call.args {
        let (Some(details), Some(allowed_json)) = (props.get(param), gt_params.get(param)) else {
            return fail(
                "simple_function_checker:unexpected_param",
                format!("Unexpected parameter: '{param}'."),
            );
        };
        let allowed: Vec<PyValue> = match allowed_json {
            Value::Array(a) => a.iter().map(PyValue::from_json).collect(),
            other => {
                return Err(bad_record(format!(
                    "allowed values of '{param}' are not a list: {other}"
                )))
            }
        };
        let desc = details.get("type").and_then(|t| t.as_str()).unwrap_or("");
        let expected = expected_type(lang, desc).ok_or_else(|| {
            bad_record(format!("parameter '{param}' has unsupported type `{desc}`"))
        })?;
        let items_type = || {
            details
                .get("items")
                .and_then(|i| i.get("type"))
                .and_then(|t| t.as_str())
        };
        let mut value = value.clone();
        let mut nested = None;
        match lang {
            Language::Java | Language::JavaScript => {
                let (kind, label) = if lang == Language::Java {
                    ("type_error:java", "String")
                } else {
                    ("type_error:js", "String")
                };
                let PyValue::Str(s) = &value else {
                    return fail(
                        kind,
                        format!(
                            "Incorrect type for parameter '{param}'. Expected type {label}, got {}. Parameter value: {}.",
                            value.type_name(),
                            value.repr()
                        ),
                    );
                };
                let is_list = if lang == Language::Java {
                    matches!(desc, "Array" | "ArrayList" | "array")
                } else {
                    desc == "array"
                };
                if is_list {
                    let it = items_type().ok_or_else(|| {
                        bad_record(format!("list parameter '{param}' has no items.type"))
                    })?;
                    nested = Some(expected_type(lang, it).ok_or_else(|| {
                        bad_record(format!(
                            "parameter '{param}' has unsupported item type `{it}`"
                        ))
                    })?);
                    value = lang::convert(lang, s, desc, Some(it)).map_err(bad_record)?;
                } else {
                    value = lang::convert(lang, s, desc, None).map_err(bad_record)?;
                }
            }
            Language::Python => {
                if desc == "array" || desc == "tuple" {
                    let it = items_type().ok_or_else(|| {
                        bad_record(format!("list parameter '{param}' has no items.type"))
                    })?;
                    nested = Some(expected_type(lang, it).ok_or_else(|| {
                        bad_record(format!(
                            "parameter '{param}' has unsupported item type `{it}`"
                        ))
                    })?);
                }
            }
        }
        if desc == "tuple" {
            if let PyValue::Tuple(t) = value {
                value = PyValue::List(t);
            }
        }
        if lang == Language::Python && desc == "float" {
            if let PyValue::Int(i) = value {
                value = PyValue::Float(i as f64);
            }
        }
        let is_variable = type_checker(param, &value, &allowed, desc, expected, nested)?;
        if !is_variable {
            match (expected, &value) {
                (PyType::Dict, PyValue::Dict(d)) => {
                    dict_checker(d, &allowed)?;
                    continue;
                }
                (PyType::List, PyValue::List(l)) if nested == Some(PyType::Dict) => {
                    list_dict_checker(l, &allowed)?;
                    continue;
                }
                (PyType::Str, PyValue::Str(s)) => {
                    string_checker(param, s, &allowed)?;
                    continue;
                }
                (PyType::List, PyValue::List(l)) => {
                    list_checker(param, l, &allowed)?;
                    continue;
                }
                _ => {}
            }
        }
        if !contains(&allowed, &value) {
            return fail(
                "value_error:others",
                format!(
                    "Invalid value for parameter '{param}': {}. Expected one of {}.",
                    value.repr(),
                    PyValue::List(allowed).repr()
                ),
            );
        }
    }
    for (param, allowed) in gt_params {
        let optional = allowed
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x.as_str() == Some("")));
        if !has(param) && !optional {
            return fail(
                "simple_function_checker:missing_optional",
                format!("Optional parameter '{param}' not provided and not marked as optional."),
            );
        }
    }
    Ok(())
}

fn gt_name(entry: &Value) -> std::result::Result<&str, Fail> {
    entry
        .as_object()
        .and_then(|o| o.keys().next())
        .map(|s| s.as_str())
        .ok_or_else(|| bad_record("ground-truth entry is not {func_name: {...}}"))
}

/// `ast_checker`: dispatch by category name ("parallel" -> unordered parallel check, "multiple" ->
/// one call against the matching function, else simple).
pub fn ast_check(funcs: &[Value], calls: &[Call], gt: &[Value], cat: Category) -> Check {
    let lang = cat.language();
    let name = cat.name();
    if name.contains("parallel") {
        if calls.len() != gt.len() {
            return fail(
                "parallel_function_checker_no_order:wrong_count",
                "Wrong number of functions.",
            );
        }
        let mut used = vec![false; calls.len()];
        for (i, entry) in gt.iter().enumerate() {
            let fname = gt_name(entry)?;
            let func = find_description(funcs, fname).ok_or_else(|| {
                bad_record(format!(
                    "ground-truth function `{fname}` is not in the function list"
                ))
            })?;
            let mut last_err = None;
            let mut matched = false;
            for (j, c) in calls.iter().enumerate() {
                if used[j] {
                    continue;
                }
                match simple_function_checker(func, c, entry, lang) {
                    Ok(()) => {
                        used[j] = true;
                        matched = true;
                        break;
                    }
                    Err(e) => last_err = Some(e),
                }
            }
            if !matched {
                let considered: Vec<usize> = (0..calls.len()).filter(|j| !used[*j]).collect();
                let detail = last_err
                    .map(|e| format!(" Last error ({}): {}", e.kind, e.msg))
                    .unwrap_or_default();
                return fail(
                    "parallel_function_checker_no_order:cannot_find_match",
                    format!(
                        "Could not find a matching function among index {considered:?} of model output for index {i} of possible answers.{detail}"
                    ),
                );
            }
        }
        Ok(())
    } else if name.contains("multiple") {
        if calls.len() != gt.len() {
            return fail(
                "multiple_function_checker:wrong_count",
                "Wrong number of functions.",
            );
        }
        let entry = gt.first().ok_or_else(|| bad_record("empty ground truth"))?;
        let fname = gt_name(entry)?;
        let func = find_description(funcs, fname).ok_or_else(|| {
            bad_record(format!(
                "ground-truth function `{fname}` is not in the function list"
            ))
        })?;
        simple_function_checker(func, &calls[0], entry, lang)
    } else {
        if calls.len() != 1 {
            return fail(
                "simple_function_checker:wrong_count",
                "Wrong number of functions.",
            );
        }
        let func = funcs
            .first()
            .ok_or_else(|| bad_record("record has no function"))?;
        let entry = gt.first().ok_or_else(|| bad_record("empty ground truth"))?;
        simple_function_checker(func, &calls[0], entry, lang)
    }
}

/// The verdict for one record given the raw model output.
pub fn check_record(rec: &Record, output: &str) -> Verdict {
    let mut v = Verdict {
        id: rec.id.clone(),
        category: rec.category.name(),
        valid: false,
        error_type: None,
        error: None,
    };
    let decoded = decode_output(output);
    if !rec.category.is_ast() {
        let has_call = matches!(&decoded, Ok(c) if !c.is_empty());
        let irrelevance = rec.category.name().contains("irrelevance");
        v.valid = if irrelevance { !has_call } else { has_call };
        if !v.valid {
            if irrelevance {
                v.error_type = Some("irrelevance_error:decoder_success".into());
                v.error = Some("Valid syntax. Successfully decode AST when it should not.".into());
            } else {
                v.error_type = Some("relevance_error:decoder_failed".into());
                let why = match &decoded {
                    Err(e) => e.message().to_string(),
                    Ok(_) => "no function call".into(),
                };
                v.error = Some(format!(
                    "Invalid syntax. Failed to decode AST when it should have. {why}"
                ));
            }
        }
        return v;
    }
    let calls = match decoded {
        Ok(c) => c,
        Err(e) => {
            v.error_type = Some(e.kind().into());
            v.error = Some(e.message().into());
            return v;
        }
    };
    let gt = rec.ground_truth.as_deref().unwrap_or(&[]);
    match ast_check(&rec.functions, &calls, gt, rec.category) {
        Ok(()) => v.valid = true,
        Err(f) => {
            v.error_type = Some(f.kind);
            v.error = Some(f.msg);
        }
    }
    v
}

/// Correct / total for one category.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Tally {
    pub correct: usize,
    pub total: usize,
}

impl Tally {
    pub fn accuracy(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.correct as f64 / self.total as f64
        }
    }
}

/// Scores for a set of records.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub verdicts: Vec<Verdict>,
    pub per_category: BTreeMap<&'static str, Tally>,
    /// Records that had no output line (counted as wrong, kind `missing_output`).
    pub missing: usize,
    /// Output ids that match no loaded record (ignored).
    pub unknown_ids: Vec<String>,
}

/// The Tool-N1 summary (facts §1.5), in percent; `None` where a needed category is absent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Summary {
    /// Mean of the simple languages present (python, java, javascript).
    pub non_live_simple: Option<f64>,
    /// Mean of simple, multiple, parallel, parallel_multiple.
    pub non_live: Option<f64>,
    /// Correct / total over the four live AST categories.
    pub live: Option<f64>,
    /// Mean of non-live and live.
    pub overall: Option<f64>,
}

impl Report {
    pub fn accuracy(&self, c: Category) -> Option<f64> {
        self.per_category
            .get(c.name())
            .filter(|t| t.total > 0)
            .map(|t| 100.0 * t.accuracy())
    }

    pub fn summary(&self) -> Summary {
        let simples: Vec<f64> = [
            Category::SimplePython,
            Category::SimpleJava,
            Category::SimpleJavascript,
        ]
        .iter()
        .filter_map(|c| self.accuracy(*c))
        .collect();
        let non_live_simple =
            (!simples.is_empty()).then(|| simples.iter().sum::<f64>() / simples.len() as f64);
        let others: Option<Vec<f64>> = [
            Category::Multiple,
            Category::Parallel,
            Category::ParallelMultiple,
        ]
        .iter()
        .map(|c| self.accuracy(*c))
        .collect();
        let non_live = match (non_live_simple, others) {
            (Some(s), Some(o)) => Some((s + o.iter().sum::<f64>()) / 4.0),
            _ => None,
        };
        let live_cats = [
            Category::LiveSimple,
            Category::LiveMultiple,
            Category::LiveParallel,
            Category::LiveParallelMultiple,
        ];
        let mut lt = Tally::default();
        let mut all_present = true;
        for c in live_cats {
            match self.per_category.get(c.name()) {
                Some(t) if t.total > 0 => {
                    lt.correct += t.correct;
                    lt.total += t.total;
                }
                _ => all_present = false,
            }
        }
        let live = all_present.then(|| 100.0 * lt.accuracy());
        let overall = match (non_live, live) {
            (Some(a), Some(b)) => Some((a + b) / 2.0),
            _ => None,
        };
        Summary {
            non_live_simple,
            non_live,
            live,
            overall,
        }
    }

    /// The per-category table and the summary as text.
    pub fn table(&self) -> String {
        let mut s = format!(
            "{:<26} {:>8} {:>8} {:>9}\n",
            "category", "correct", "total", "accuracy"
        );
        for c in Category::ALL {
            if let Some(t) = self.per_category.get(c.name()) {
                s += &format!(
                    "{:<26} {:>8} {:>8} {:>8.2}%\n",
                    c.name(),
                    t.correct,
                    t.total,
                    100.0 * t.accuracy()
                );
            }
        }
        let sm = self.summary();
        let f = |x: Option<f64>| x.map(|v| format!("{v:.2}")).unwrap_or_else(|| "n/a".into());
        s += &format!(
            "\nTool-N1 summary: Non-live {} (simple {}), Live {}, Overall {}\n",
            f(sm.non_live),
            f(sm.non_live_simple),
            f(sm.live),
            f(sm.overall)
        );
        if self.missing > 0 {
            s += &format!(
                "{} records had no output and count as wrong\n",
                self.missing
            );
        }
        if !self.unknown_ids.is_empty() {
            s += &format!(
                "{} output ids match no loaded record and were ignored\n",
                self.unknown_ids.len()
            );
        }
        s
    }
}

/// Score `(id, raw output)` pairs against records. Records without an output count as wrong
/// (`missing_output`); outputs whose id matches no record are listed in `unknown_ids`.
pub fn score(records: &[Record], outputs: &[(String, String)]) -> Report {
    let mut by_id: HashMap<&str, &str> = HashMap::new();
    for (id, out) in outputs {
        by_id.insert(id.as_str(), out.as_str());
    }
    let known: std::collections::HashSet<&str> = records.iter().map(|r| r.id.as_str()).collect();
    let mut rep = Report::default();
    for (id, _) in outputs {
        if !known.contains(id.as_str()) {
            rep.unknown_ids.push(id.clone());
        }
    }
    for r in records {
        let v = match by_id.get(r.id.as_str()) {
            Some(out) => check_record(r, out),
            None => {
                rep.missing += 1;
                Verdict {
                    id: r.id.clone(),
                    category: r.category.name(),
                    valid: false,
                    error_type: Some("missing_output".into()),
                    error: Some("no output line for this id".into()),
                }
            }
        };
        let t = rep.per_category.entry(r.category.name()).or_default();
        t.total += 1;
        t.correct += v.valid as usize;
        rep.verdicts.push(v);
    }
    rep
}

/// Read an outputs file: JSON Lines of `{"id": ..., "output": "<raw text>"}` (`result` is
/// accepted as a synonym of `output`, as in BFCL's result files).
pub fn read_outputs(path: &Path) -> Result<Vec<(String, String)>> {
    let text = crate::safefs::read_to_string(path)?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let err = |msg: String| Error::Line {
            file: path.display().to_string(),
            line: i + 1,
            msg,
        };
        let v: Value = serde_json::from_str(line).map_err(|e| err(format!("invalid JSON: {e}")))?;
        let id = match v.get("id") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => return Err(err("missing field `id` (string)".into())),
        };
        let o = match v.get("output").or_else(|| v.get("result")) {
            Some(Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
            None => return Err(err("missing field `output` (the raw model text)".into())),
        };
        out.push((id, o));
    }
    Ok(out)
}

/// A model output that reproduces a record's ground truth in the Tool-N1 format: for every
/// ground-truth call, a parameter that may be omitted (`""` allowed) and is not required is left
/// out, any other takes its first allowed value that is not `""`; nested dicts likewise. Java/JavaScript values are written as source strings
/// ([`lang::render`]). Used by the golden test; `None` for relevance categories.
pub fn ground_truth_output(rec: &Record) -> Option<String> {
    let gt = rec.ground_truth.as_ref()?;
    let lang = rec.category.language();
    let mut calls = Vec::new();
    for entry in gt {
        let (name, params) = entry.as_object()?.iter().next()?;
        let func = find_description(&rec.functions, name);
        let required: Vec<&str> = func
            .and_then(|f| f.pointer("/parameters/required"))
            .and_then(|r| r.as_array())
            .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
            .unwrap_or_default();
        let mut args = serde_json::Map::new();
        for (p, allowed) in params.as_object()? {
            let allowed = allowed.as_array()?;
            let optional = allowed.iter().any(|a| a.as_str() == Some(""));
            if optional && !required.contains(&p.as_str()) {
                continue;
            }
            // The first allowed value that is not the "may be omitted" marker; none (an empty
            // list, or only "") leaves the parameter out.
            let Some(first) = allowed.iter().find(|a| a.as_str() != Some("")) else {
                continue;
            };
            let schema = func.and_then(|f| f.get("parameters")?.get("properties")?.get(p));
            let ty = schema
                .and_then(|s| s.get("type"))
                .and_then(|t| t.as_str())
                .unwrap_or("");
            let items = schema
                .and_then(|s| s.get("items"))
                .and_then(|i| i.get("type"))
                .and_then(|t| t.as_str());
            let v = pick_value(first);
            let v = match lang {
                Language::Python => v,
                _ => Value::String(lang::render(lang, ty, items, &v)),
            };
            args.insert(p.clone(), v);
        }
        calls.push(serde_json::json!({"name": name, "arguments": Value::Object(args)}));
    }
    Some(format!(
        "<think>ground truth</think><tool_call>{}</tool_call>",
        Value::Array(calls)
    ))
}

/// First allowed value, resolving nested `{key: [allowed...]}` dicts (and lists of them).
fn pick_value(v: &Value) -> Value {
    match v {
        Value::Object(m) if m.values().all(|x| x.is_array()) && !m.is_empty() => {
            let mut out = serde_json::Map::new();
            for (k, allowed) in m {
                let allowed = allowed.as_array().map(|a| a.as_slice()).unwrap_or(&[]);
                if allowed.iter().any(|a| a.as_str() == Some("")) {
                    continue; // a key that may be left out
                }
                if let Some(first) = allowed.first() {
                    out.insert(k.clone(), pick_value(first));
                }
            }
            Value::Object(out)
        }
        Value::Array(a) => Value::Array(a.iter().map(pick_value).collect()),
        other => other.clone(),
    }
}
