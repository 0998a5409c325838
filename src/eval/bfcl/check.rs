//! The port of BFCL's AST checker (`bfcl_eval/eval_checker/ast_eval/ast_checker.py`): type and
//! value checks per parameter, the simple / multiple / parallel dispatch, relevance verdicts,
//! and the ground-truth output the golden test feeds back.

use super::decode::{decode_output, Call};
use super::{lang, Category, Language, Record};
use crate::pycall::{py_eq, PyValue};
use serde::Serialize;
use serde_json::Value;

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
    let (_, gt_params) = gt_entry
        .as_object()
        .and_then(|o| o.iter().next())
        .ok_or_else(|| bad_record("ground-truth entry is not {func_name: {...}}"))?;
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
                let kind = if lang == Language::Java {
                    "type_error:java"
                } else {
                    "type_error:js"
                };
                let PyValue::Str(s) = &value else {
                    return fail(
                        kind,
                        format!(
                            "Incorrect type for parameter '{param}'. Expected type String, got {}. Parameter value: {}.",
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
