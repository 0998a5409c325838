//! JSON text exactly as Python's `json.dumps` writes it, the one JSON writer for every place
//! that must match Python byte for byte: the chat templates' `tojson` filter
//! ([`crate::tokenizer`]), the tool list and calls of the Tool-N1 prompt ([`crate::data`]), SFT
//! targets, evaluation prompts, and the reward's canonical call keys.
//!
//! The rules are those of CPython's `json` module (`Lib/json/encoder.py`): `repr(float)` for
//! floats (shortest round-trip digits, `1e-05`, `1e+16`), `\uXXXX` escapes for control
//! characters (and for everything outside ASCII with `ensure_ascii`), separators and
//! indentation as given, keys in insertion order unless `sort_keys`.

use serde_json::Value;
use std::fmt::Write as _;

/// Options of [`py_json_dumps`], mirroring Python's `json.dumps` arguments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PyJsonOpts {
    pub ensure_ascii: bool,
    /// None: one line; Some(s): newline and `s` repeated per nesting level.
    pub indent: Option<String>,
    pub item_sep: String,
    pub key_sep: String,
    pub sort_keys: bool,
}

impl Default for PyJsonOpts {
    /// `json.dumps(x, ensure_ascii=False)`.
    fn default() -> Self {
        PyJsonOpts {
            ensure_ascii: false,
            indent: None,
            item_sep: ", ".into(),
            key_sep: ": ".into(),
            sort_keys: false,
        }
    }
}

/// Python's `repr(float)` as json.dumps writes it: shortest round-trip digits, fixed notation
/// for exponents -4..=15, else `d.ddde+XX`; `NaN`, `Infinity`, `-Infinity`.
pub fn py_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    // Rust's `{:e}` gives the shortest round-trip digits: "-1.2345e-7".
    let sci = format!("{x:e}");
    let (mant, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mant) = match mant.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mant),
    };
    let digits: String = mant.chars().filter(|c| *c != '.').collect();
    let mut out = String::from(sign);
    if (-4..16).contains(&exp) {
        if exp >= 0 {
            let int_len = exp as usize + 1;
            if digits.len() <= int_len {
                out.push_str(&digits);
                out.extend(std::iter::repeat_n('0', int_len - digits.len()));
                out.push_str(".0");
            } else {
                out.push_str(&digits[..int_len]);
                out.push('.');
                out.push_str(&digits[int_len..]);
            }
        } else {
            out.push_str("0.");
            out.extend(std::iter::repeat_n('0', (-exp - 1) as usize));
            out.push_str(&digits);
        }
    } else {
        out.push_str(&digits[..1]);
        if digits.len() > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        let _ = write!(out, "e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs());
    }
    out
}

/// A JSON string literal as Python's json.dumps writes it.
pub fn py_json_string(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c if ensure_ascii && (c as u32) > 0x7e => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A value that Python's json.dumps can write: the subset of template values that are JSON.
pub(crate) enum PyJson {
    Null,
    Bool(bool),
    Int(String),
    Float(f64),
    Str(String),
    List(Vec<PyJson>),
    Dict(Vec<(String, PyJson)>),
}

pub(crate) fn write_py_json(v: &PyJson, o: &PyJsonOpts, level: usize, out: &mut String) {
    let newline = |out: &mut String, level: usize| {
        if let Some(ind) = &o.indent {
            out.push('\n');
            for _ in 0..level {
                out.push_str(ind);
            }
        }
    };
    match v {
        PyJson::Null => out.push_str("null"),
        PyJson::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        PyJson::Int(s) => out.push_str(s),
        PyJson::Float(x) => out.push_str(&py_float_repr(*x)),
        PyJson::Str(s) => py_json_string(s, o.ensure_ascii, out),
        PyJson::List(items) => {
            if items.is_empty() {
                out.push_str("[]");
                return;
            }
            out.push('[');
            for (i, x) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&o.item_sep);
                }
                newline(out, level + 1);
                write_py_json(x, o, level + 1, out);
            }
            newline(out, level);
            out.push(']');
        }
        PyJson::Dict(items) => {
            if items.is_empty() {
                out.push_str("{}");
                return;
            }
            let mut order: Vec<&(String, PyJson)> = items.iter().collect();
            if o.sort_keys {
                order.sort_by(|a, b| a.0.cmp(&b.0));
            }
            out.push('{');
            for (i, (k, x)) in order.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(&o.item_sep);
                }
                newline(out, level + 1);
                py_json_string(k, o.ensure_ascii, out);
                out.push_str(&o.key_sep);
                write_py_json(x, o, level + 1, out);
            }
            newline(out, level);
            out.push('}');
        }
    }
}

fn json_to_py(v: &Value) -> PyJson {
    match v {
        Value::Null => PyJson::Null,
        Value::Bool(b) => PyJson::Bool(*b),
        Value::Number(n) if n.is_f64() => PyJson::Float(n.as_f64().unwrap_or(f64::NAN)),
        Value::Number(n) => PyJson::Int(n.to_string()),
        Value::String(s) => PyJson::Str(s.clone()),
        Value::Array(a) => PyJson::List(a.iter().map(json_to_py).collect()),
        Value::Object(m) => {
            PyJson::Dict(m.iter().map(|(k, v)| (k.clone(), json_to_py(v))).collect())
        }
    }
}

/// `json.dumps(v, ...)` byte for byte, for a serde_json value (floats stay floats: `1.0`).
pub fn py_json_dumps(v: &Value, opts: &PyJsonOpts) -> String {
    let mut out = String::new();
    write_py_json(&json_to_py(v), opts, 0, &mut out);
    out
}

/// `json.dumps(v, ensure_ascii=False)`: separators `", "` and `": "`, keys in insertion order.
/// This is how the Tool-N1 prompt lists tools and how calls are written into replies and prior
/// turns.
pub fn py_json(v: &Value) -> String {
    py_json_dumps(v, &PyJsonOpts::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float_repr_matches_python() {
        let cases = [
            (1.0, "1.0"),
            (0.1, "0.1"),
            (1e-5, "1e-05"),
            (1e-4, "0.0001"),
            (1e20, "1e+20"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (123456789.0, "123456789.0"),
            (-2.5e-7, "-2.5e-07"),
            (1.2345678901234568e16, "1.2345678901234568e+16"),
            (5e-324, "5e-324"),
            (1.7976931348623157e308, "1.7976931348623157e+308"),
            (-0.0, "-0.0"),
            (123.456, "123.456"),
            (f64::INFINITY, "Infinity"),
        ];
        for (x, want) in cases {
            assert_eq!(py_float_repr(x), want, "{x:e}");
        }
    }

    #[test]
    fn strings_escape_like_python() {
        let mut s = String::new();
        py_json_string("a\"b\\c\n\u{1}é😀\u{7f}", false, &mut s);
        assert_eq!(s, "\"a\\\"b\\\\c\\n\\u0001é😀\u{7f}\"");
        let mut s = String::new();
        py_json_string("é😀", true, &mut s);
        assert_eq!(s, "\"\\u00e9\\ud83d\\ude00\"");
    }

    #[test]
    fn python_style_json() {
        let v: serde_json::Value =
            serde_json::from_str(r#"[{"name":"f","arguments":{"a":1,"b":[1,2],"c":"x\"y"}}]"#)
                .unwrap();
        assert_eq!(
            py_json(&v),
            r#"[{"name": "f", "arguments": {"a": 1, "b": [1, 2], "c": "x\"y"}}]"#
        );
    }
}
