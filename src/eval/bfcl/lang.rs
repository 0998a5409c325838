//! Java / JavaScript value conversion for BFCL's `simple_java` and `simple_javascript`, ported
//! from `java_type_converter.py` and `js_type_converter.py` of the official checker: the model
//! gives every parameter as a string of source code, which is converted to a Python value
//! before the ordinary checks. Where the source text does not fit the declared type the string is
//! kept as is (so it then fails the type check), exactly as the official converters do; their
//! quirks are kept too (a Java `Array` of `String` keeps the quotes of each element, a JS dict
//! stops at the first `}`).
//!
//! [`render`] is the inverse used by the golden test: it writes a ground-truth value as source
//! text that the converters read back to that value.

use super::Language;
use crate::pycall::PyValue;
use regex::Regex;
use serde_json::Value;
use std::sync::OnceLock;

fn re(cell: &'static OnceLock<Regex>, pat: &str) -> &'static Regex {
    cell.get_or_init(|| Regex::new(pat).unwrap_or_else(|e| panic!("bad built-in regex {pat}: {e}")))
}

macro_rules! static_re {
    ($name:ident, $pat:expr) => {
        fn $name() -> &'static Regex {
            static CELL: OnceLock<Regex> = OnceLock::new();
            re(&CELL, $pat)
        }
    };
}

static_re!(re_int, r"^-?\d+$");
static_re!(re_java_float, r"^-?\d+(\.\d+)?([eE][+-]?\d+)?[fF]$");
static_re!(re_java_double, r"^-?\d+(\.\d+)?([eE][+-]?\d+)?$");
static_re!(re_java_long, r"^-?\d+[lL]$");
static_re!(
    re_aslist,
    r"new\s+ArrayList<\w*>\(Arrays\.asList\((.+?)\)\)"
);
static_re!(
    re_add_block,
    r"(?s)new\s+ArrayList<\w*>\(\)\s*\{\{\s*(.+?)\s*\}\}"
);
static_re!(re_add, r"add\((.+?)\)");
static_re!(re_empty_arraylist, r"new\s+ArrayList<\w*>\(\)");
static_re!(re_array, r"new\s+\w+\[\]\s*\{(.*?)\}");
static_re!(
    re_hashmap,
    r"(?s)new\s+HashMap<.*?>\s*\(\)\s*\{\s*\{?\s*(.*?)\s*\}?\s*\}"
);
static_re!(re_put, r#"put\("(.*?)",\s*(.*?)\)"#);
static_re!(re_empty_hashmap, r"new\s+HashMap<.*?>\s*\(\)");
static_re!(re_js_float, r"^-?\d+(\.\d+)?$");
static_re!(re_js_bigint, r"^-?\d+n$");
static_re!(
    re_js_2d,
    r"^(?:\[\s*\[.*?\]\s*(,\s*\[.*?\]\s*)*\]|\bnew\s+Array\(\s*\[.*?\]\s*(,\s*\[.*?\]\s*)*\))"
);
static_re!(re_js_inner, r"\[(.*?)\]");
static_re!(re_js_1d, r"^(?:\[(.*?)\]|\bnew\s+Array\((.*?)\))");
static_re!(re_js_dict, r"^\{(.*?)\}");

/// Python's `int(s)` for the forms these converters feed it.
fn py_int(s: &str) -> Option<i128> {
    let t = s.trim();
    let t = t.strip_prefix('+').unwrap_or(t);
    if t.is_empty() || t.starts_with('_') || t.ends_with('_') || t.contains("__") {
        return None;
    }
    let clean: String = t.chars().filter(|&c| c != '_').collect();
    clean.parse::<i128>().ok()
}

/// Python's `float(s)`.
fn py_float(s: &str) -> Option<f64> {
    let t = s.trim();
    if t.is_empty() || t.contains('_') {
        return None;
    }
    let lower = t.to_ascii_lowercase();
    let body = lower.trim_start_matches(['+', '-']);
    if matches!(body, "inf" | "infinity" | "nan") {
        return lower.parse::<f64>().ok();
    }
    if body.chars().any(|c| c.is_ascii_alphabetic() && c != 'e') {
        return None;
    }
    t.parse::<f64>().ok()
}

/// `s[1:-1]` on characters.
fn strip_ends(s: &str) -> String {
    let chars: Vec<char> = s.chars().collect();
    if chars.len() <= 2 {
        return String::new();
    }
    chars[1..chars.len() - 1].iter().collect()
}

fn quoted_by(s: &str, q: char) -> bool {
    s.starts_with(q) && s.ends_with(q)
}

/// Convert a parameter's source string for `lang` and declared type `ty` (`nested`: the list
/// item type). Errors where the official converter raises (unsupported or unimplemented types).
pub fn convert(
    lang: Language,
    value: &str,
    ty: &str,
    nested: Option<&str>,
) -> Result<PyValue, String> {
    match lang {
        Language::Java => java(value, ty, nested),
        Language::JavaScript => js(value, ty, nested),
        Language::Python => Ok(PyValue::Str(value.to_string())),
    }
}

/// `java_type_converter`.
pub fn java(value: &str, ty: &str, nested: Option<&str>) -> Result<PyValue, String> {
    let s = || PyValue::Str(value.to_string());
    Ok(match ty {
        "byte" | "short" | "integer" => {
            if re_int().is_match(value) {
                py_int(value).map(PyValue::Int).unwrap_or_else(s)
            } else {
                s()
            }
        }
        "float" => {
            if re_java_float().is_match(value) {
                py_float(&value[..value.len() - 1])
                    .map(PyValue::Float)
                    .unwrap_or_else(s)
            } else {
                s()
            }
        }
        "double" => {
            if re_java_double().is_match(value) {
                py_float(value).map(PyValue::Float).unwrap_or_else(s)
            } else {
                s()
            }
        }
        "long" => {
            if re_java_long().is_match(value) {
                py_int(&value[..value.len() - 1])
                    .map(PyValue::Int)
                    .unwrap_or_else(s)
            } else {
                s()
            }
        }
        "boolean" => match value {
            "true" => PyValue::Bool(true),
            "false" => PyValue::Bool(false),
            _ => s(),
        },
        // The official pattern `^\'.$\'` can never match, so a char stays the raw string.
        "char" | "String" | "any" => s(),
        "ArrayList" => java_arraylist(value, nested)?,
        "Array" => java_array(value, nested)?,
        "HashMap" => java_hashmap(value),
        "Set" | "Hashtable" | "Queue" | "Stack" => {
            return Err(format!(
                "{ty} conversion is not implemented in the official checker"
            ))
        }
        other => return Err(format!("Unsupported type: {other}")),
    })
}

fn java_element(e: &str, nested: Option<&str>) -> Result<PyValue, String> {
    Ok(match nested {
        Some("char") | Some("String") => PyValue::Str(strip_ends(e)),
        Some(n) => java(e, n, None)?,
        None => java_value(e),
    })
}

fn java_arraylist(input: &str, nested: Option<&str>) -> Result<PyValue, String> {
    if let Some(c) = re_aslist().captures(input) {
        let mut out = Vec::new();
        for e in c[1].split(',') {
            out.push(java_element(e.trim(), nested)?);
        }
        return Ok(PyValue::List(out));
    }
    if let Some(c) = re_add_block().captures(input) {
        let mut out = Vec::new();
        for m in re_add().captures_iter(&c[1]) {
            out.push(java_element(m[1].trim(), nested)?);
        }
        return Ok(PyValue::List(out));
    }
    if re_empty_arraylist().is_match(input) {
        return Ok(PyValue::List(vec![]));
    }
    Ok(PyValue::Str(input.to_string()))
}

fn java_array(input: &str, nested: Option<&str>) -> Result<PyValue, String> {
    let Some(c) = re_array().captures(input) else {
        return Ok(PyValue::Str(input.to_string()));
    };
    let mut out = Vec::new();
    for x in c[1].split(',') {
        let x = x.trim();
        if x.is_empty() {
            continue;
        }
        out.push(match nested {
            Some(n) => java(x, n, None)?,
            None => java_value(x),
        });
    }
    Ok(PyValue::List(out))
}

fn java_hashmap(input: &str) -> PyValue {
    if let Some(c) = re_hashmap().captures(input) {
        let puts = &c[1];
        let mut d: Vec<(PyValue, PyValue)> = Vec::new();
        if !puts.trim().is_empty() {
            for m in re_put().captures_iter(puts) {
                let k = PyValue::Str(m[1].to_string());
                let v = java_value(m[2].trim());
                if let Some(slot) = d.iter_mut().find(|(ek, _)| *ek == k) {
                    slot.1 = v;
                } else {
                    d.push((k, v));
                }
            }
        }
        return PyValue::Dict(d);
    }
    if re_empty_hashmap().is_match(input) {
        return PyValue::Dict(vec![]);
    }
    PyValue::Str(input.to_string())
}

/// `parse_java_value`: a value without type information.
pub fn java_value(v: &str) -> PyValue {
    if v == "true" {
        return PyValue::Bool(true);
    }
    if v == "false" {
        return PyValue::Bool(false);
    }
    if quoted_by(v, '"') {
        return PyValue::Str(strip_ends(v));
    }
    if re_java_long().is_match(v) {
        if let Some(i) = py_int(&v[..v.len() - 1]) {
            return PyValue::Int(i);
        }
    }
    if re_java_float().is_match(v) {
        if let Some(f) = py_float(&v[..v.len() - 1]) {
            return PyValue::Float(f);
        }
    }
    if let Some(i) = py_int(v) {
        return PyValue::Int(i);
    }
    if let Some(f) = py_float(v) {
        return PyValue::Float(f);
    }
    PyValue::Str(v.to_string())
}

/// `js_type_converter`.
pub fn js(value: &str, ty: &str, nested: Option<&str>) -> Result<PyValue, String> {
    let s = || PyValue::Str(value.to_string());
    Ok(match ty {
        "String" => {
            if quoted_by(value, '"') || quoted_by(value, '\'') {
                PyValue::Str(strip_ends(value))
            } else {
                s()
            }
        }
        "integer" => {
            if re_int().is_match(value) {
                py_int(value).map(PyValue::Int).unwrap_or_else(s)
            } else {
                s()
            }
        }
        "float" => {
            if re_js_float().is_match(value) {
                py_float(value).map(PyValue::Float).unwrap_or_else(s)
            } else {
                s()
            }
        }
        "Bigint" => {
            if re_js_bigint().is_match(value) {
                py_int(&value[..value.len() - 1])
                    .map(PyValue::Int)
                    .unwrap_or_else(s)
            } else {
                s()
            }
        }
        "Boolean" => match value {
            "true" => PyValue::Bool(true),
            "false" => PyValue::Bool(false),
            _ => s(),
        },
        "dict" => js_dict(value),
        "array" => js_array(value, nested),
        "any" => s(),
        other => return Err(format!("Unsupported type: {other}")),
    })
}

fn js_array(code: &str, nested: Option<&str>) -> PyValue {
    let code = code.trim();
    let fallback = || PyValue::Str(code.to_string());
    if let Some(m) = re_js_2d().find(code) {
        let mut out = Vec::new();
        for (idx, c) in re_js_inner().captures_iter(m.as_str()).enumerate() {
            let mut inner = c[1].trim();
            if idx == 0 && inner.starts_with('[') {
                inner = &inner[1..];
            }
            out.push(PyValue::List(
                inner.split(',').map(|e| js_value(e.trim())).collect(),
            ));
        }
        return PyValue::List(out);
    }
    let Some(c) = re_js_1d().captures(code) else {
        return fallback();
    };
    let body = c
        .get(1)
        .or_else(|| c.get(2))
        .map(|m| m.as_str().trim())
        .unwrap_or("");
    let elems: Vec<&str> = if body.is_empty() {
        vec![]
    } else {
        body.split(',').collect()
    };
    let mut out = Vec::new();
    for e in elems {
        let e = e.trim();
        match nested {
            Some(n) => match js(e, n, None) {
                Ok(v) => out.push(v),
                Err(_) => return fallback(), // the official code catches and returns the text
            },
            None => out.push(js_value(e)),
        }
    }
    PyValue::List(out)
}

/// The official `([^:]+):\s*(.*?)(?:,\s*(?=[^,]+:)|$)` applied with `findall`.
fn js_pairs(content: &str) -> Vec<(String, String)> {
    let s: Vec<char> = content.chars().collect();
    let n = s.len();
    let mut out = Vec::new();
    let mut pos = 0;
    // lookahead `[^,]+:` at q
    let look = |q: usize| -> bool {
        let mut j = q;
        while j < n && s[j] != ',' {
            if s[j] == ':' && j > q {
                return true;
            }
            j += 1;
        }
        false
    };
    while pos < n {
        // key: [^:]+ then ':'
        let Some(colon) = (pos..n).find(|&i| s[i] == ':') else {
            break;
        };
        if colon == pos {
            pos += 1;
            continue;
        }
        let mut v0 = colon + 1;
        while v0 < n && s[v0].is_whitespace() {
            v0 += 1;
        }
        let mut found = None;
        let mut e = v0;
        loop {
            // terminator at e?
            if e < n && s[e] == ',' {
                let mut q = e + 1;
                while q < n && s[q].is_whitespace() {
                    q += 1;
                }
                let ok_q = (e + 1..=q).rev().find(|&qq| look(qq));
                if let Some(qq) = ok_q {
                    found = Some((e, qq));
                    break;
                }
            }
            if e == n || (e + 1 == n && s[e] == '\n') {
                found = Some((e, e));
                break;
            }
            if e >= n || s[e] == '\n' {
                break;
            }
            e += 1;
        }
        match found {
            Some((vend, mend)) => {
                out.push((s[pos..colon].iter().collect(), s[v0..vend].iter().collect()));
                pos = if mend > pos { mend } else { pos + 1 };
            }
            None => pos += 1,
        }
    }
    out
}

fn js_dict(code: &str) -> PyValue {
    let code = code.trim();
    if code == "{}" {
        return PyValue::Dict(vec![]);
    }
    let Some(c) = re_js_dict().captures(code) else {
        return PyValue::Str(code.to_string());
    };
    let mut d: Vec<(PyValue, PyValue)> = Vec::new();
    for (k, v) in js_pairs(&c[1]) {
        let key = k.trim().trim_matches(['\'', '"']).to_string();
        let v = v.trim();
        let val = if v.starts_with('[') && v.ends_with(']') {
            js_array(v, None)
        } else if v.starts_with('{') && v.ends_with('}') {
            js_dict(v)
        } else {
            js_value(v.trim_matches(['\'', '"']))
        };
        let key = PyValue::Str(key);
        if let Some(slot) = d.iter_mut().find(|(ek, _)| *ek == key) {
            slot.1 = val;
        } else {
            d.push((key, val));
        }
    }
    PyValue::Dict(d)
}

/// `parse_js_value`.
pub fn js_value(v: &str) -> PyValue {
    let v = v.trim();
    if v == "true" {
        return PyValue::Bool(true);
    }
    if v == "false" {
        return PyValue::Bool(false);
    }
    if quoted_by(v, '"') || quoted_by(v, '\'') {
        return PyValue::Str(strip_ends(v));
    }
    if let Some(i) = py_int(v) {
        return PyValue::Int(i);
    }
    if let Some(f) = py_float(v) {
        return PyValue::Float(f);
    }
    PyValue::Str(v.to_string())
}

/// A float written the way Python's `repr` does for ordinary magnitudes (always with a `.`).
fn float_text(f: f64) -> String {
    if f.is_finite() && f.fract() == 0.0 && f.abs() < 1e16 {
        format!("{f:.1}")
    } else {
        format!("{f}")
    }
}

fn scalar_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => {
            if n.is_f64() {
                float_text(n.as_f64().unwrap_or(0.0))
            } else {
                n.to_string()
            }
        }
        Value::Null => "null".into(),
        other => other.to_string(),
    }
}

fn num_text(v: &Value) -> String {
    match v {
        Value::Number(n) => {
            if let Some(f) = n.as_f64().filter(|_| n.is_f64()) {
                float_text(f)
            } else {
                n.to_string()
            }
        }
        other => scalar_text(other),
    }
}

/// Write a ground-truth value as Java/JavaScript source that [`convert`] reads back to the same
/// value (for the golden test). `ty` is the declared type, `items` the list item type if any.
pub fn render(lang: Language, ty: &str, items: Option<&str>, v: &Value) -> String {
    match lang {
        Language::Python => scalar_text(v),
        Language::Java => render_java(ty, items.unwrap_or(""), v),
        Language::JavaScript => render_js(ty, v),
    }
}

fn java_item_text(item_ty: &str, v: &Value, quote_strings: bool) -> String {
    match (item_ty, v) {
        ("long", Value::Number(_)) => format!("{}L", num_text(v)),
        ("float", Value::Number(_)) => format!("{}f", num_text(v)),
        ("String", Value::String(s)) if quote_strings => format!("\"{s}\""),
        ("char", Value::String(s)) if quote_strings => format!("'{s}'"),
        _ => scalar_text(v),
    }
}

fn render_java(ty: &str, items: &str, v: &Value) -> String {
    match (ty, v) {
        ("long", Value::Number(_)) => format!("{}L", num_text(v)),
        ("float", Value::Number(_)) => format!("{}f", num_text(v)),
        ("double", Value::Number(_)) => num_text(v),
        ("ArrayList", Value::Array(a)) => {
            if a.is_empty() {
                return "new ArrayList<>()".into();
            }
            let parts: Vec<String> = a.iter().map(|x| java_item_text(items, x, true)).collect();
            format!("new ArrayList<>(Arrays.asList({}))", parts.join(", "))
        }
        ("Array", Value::Array(a)) => {
            let parts: Vec<String> = a.iter().map(|x| java_item_text(items, x, false)).collect();
            format!("new Object[]{{{}}}", parts.join(", "))
        }
        ("HashMap", Value::Object(m)) => {
            let puts: Vec<String> = m
                .iter()
                .map(|(k, x)| {
                    let val = match x {
                        Value::String(s) => format!("\"{s}\""),
                        other => num_text(other),
                    };
                    format!("put(\"{k}\", {val});")
                })
                .collect();
            format!("new HashMap<String, Object>() {{{{ {} }}}}", puts.join(" "))
        }
        _ => scalar_text(v),
    }
}

fn js_literal(v: &Value) -> String {
    match v {
        Value::String(s) => format!("'{s}'"),
        Value::Array(a) => format!(
            "[{}]",
            a.iter().map(js_literal).collect::<Vec<_>>().join(", ")
        ),
        Value::Object(m) => format!(
            "{{{}}}",
            m.iter()
                .map(|(k, x)| format!("{k}: {}", js_literal(x)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        other => num_text(other),
    }
}

fn render_js(ty: &str, v: &Value) -> String {
    match (ty, v) {
        ("String", Value::String(s)) => format!("\"{s}\""),
        ("Bigint", Value::Number(_)) => format!("{}n", num_text(v)),
        ("array", Value::Array(_)) | ("dict", Value::Object(_)) => js_literal(v),
        _ => scalar_text(v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn java_official_examples() {
        assert_eq!(java("123", "integer", None).unwrap(), PyValue::Int(123));
        assert_eq!(java("2.5f", "float", None).unwrap(), PyValue::Float(2.5));
        assert_eq!(
            java("3.14", "float", None).unwrap(),
            PyValue::Str("3.14".into())
        );
        assert_eq!(java("-123L", "long", None).unwrap(), PyValue::Int(-123));
        assert_eq!(java("3e3F", "float", None).unwrap(), PyValue::Float(3e3));
        assert_eq!(
            java("new int[]{1, 2, 3}", "Array", Some("integer")).unwrap(),
            PyValue::List(vec![PyValue::Int(1), PyValue::Int(2), PyValue::Int(3)])
        );
        assert_eq!(
            java("new long[]{1L, 2, 3L}", "Array", Some("long")).unwrap(),
            PyValue::List(vec![
                PyValue::Int(1),
                PyValue::Str("2".into()),
                PyValue::Int(3)
            ])
        );
        assert_eq!(
            java(
                r#"new ArrayList<>(Arrays.asList("a", "b"))"#,
                "ArrayList",
                Some("String")
            )
            .unwrap(),
            PyValue::List(vec![PyValue::Str("a".into()), PyValue::Str("b".into())])
        );
        assert_eq!(
            java(
                r#"new HashMap<String, Object>() {{ put("key1", 1); put("key2", "value"); put("key3", true); }}"#,
                "HashMap",
                None
            )
            .unwrap(),
            PyValue::Dict(vec![
                (PyValue::Str("key1".into()), PyValue::Int(1)),
                (PyValue::Str("key2".into()), PyValue::Str("value".into())),
                (PyValue::Str("key3".into()), PyValue::Bool(true)),
            ])
        );
        assert_eq!(
            java("new HashMap<>() {{ }}", "HashMap", None).unwrap(),
            PyValue::Dict(vec![])
        );
        assert!(java("x", "Set", None).is_err());
    }

    #[test]
    fn js_official_examples() {
        assert_eq!(js("123n", "Bigint", None).unwrap(), PyValue::Int(123));
        assert_eq!(
            js("new Array(1, 2, 3)", "array", None).unwrap(),
            PyValue::List(vec![PyValue::Int(1), PyValue::Int(2), PyValue::Int(3)])
        );
        assert_eq!(
            js(" [ [ 1, 2 ], [ 3,   4], [5, 6]]", "array", Some("array")).unwrap(),
            PyValue::List(vec![
                PyValue::List(vec![PyValue::Int(1), PyValue::Int(2)]),
                PyValue::List(vec![PyValue::Int(3), PyValue::Int(4)]),
                PyValue::List(vec![PyValue::Int(5), PyValue::Int(6)]),
            ])
        );
        let d = js(
            r#"{"initialState": initialStateObject, "reducers": reducersMap, "middlewares": ["loggerMiddleware"], "enhancers": ["applyMiddleware", "myMiddleWare"]}"#,
            "dict",
            None,
        )
        .unwrap();
        assert_eq!(
            d.get("initialState"),
            Some(&PyValue::Str("initialStateObject".into()))
        );
        assert_eq!(
            d.get("middlewares"),
            Some(&PyValue::List(vec![PyValue::Str(
                "loggerMiddleware".into()
            )]))
        );
        assert_eq!(
            d.get("enhancers"),
            Some(&PyValue::List(vec![
                PyValue::Str("applyMiddleware".into()),
                PyValue::Str("myMiddleWare".into())
            ]))
        );
        assert_eq!(
            js(
                "{'key1': 123, 'key2': 'value', 'key3': false}",
                "dict",
                None
            )
            .unwrap(),
            PyValue::Dict(vec![
                (PyValue::Str("key1".into()), PyValue::Int(123)),
                (PyValue::Str("key2".into()), PyValue::Str("value".into())),
                (PyValue::Str("key3".into()), PyValue::Bool(false)),
            ])
        );
        assert_eq!(
            js(r#"["hello", "world", "!"]"#, "array", Some("String")).unwrap(),
            PyValue::List(vec![
                PyValue::Str("hello".into()),
                PyValue::Str("world".into()),
                PyValue::Str("!".into())
            ])
        );
    }
}
