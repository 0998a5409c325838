//! Parser for Python call syntax and Python literals: ToolACE answers such as
//! `[get_weather(city="Paris", unit='celsius'), f2(x=-1.5, flags=(True, None))]` and BFCL's
//! prompt-style model outputs.
//!
//! The values keep Python's distinctions that JSON loses (int vs float, list vs tuple, non-string
//! dict keys), because BFCL's checker compares Python types exactly. [`PyValue::to_json`] turns a
//! value into JSON where that is possible (tuples become lists), and [`py_eq`] is Python's `==`.
//!
//! Supported: strings in both quote styles, triple-quoted, with the `r`/`u` prefixes and the
//! escapes `\n \t \r \\ \' \" \a \b \f \v \0`, octal, `\xhh`, `\uXXXX`, `\UXXXXXXXX`, adjacent
//! literal concatenation; ints (decimal, `0x`, `0o`, `0b`, `_` separators); floats (`1.5`,
//! `.5`, `5.`, `1e-3`); unary `-`/`+` on numbers; `True`/`False`/`None`; lists, tuples, dicts
//! (trailing commas allowed); dotted function names; keyword and positional arguments.
//! With [`ParseOptions::bare_names`] an identifier used as a value becomes its name as a string
//! and a nested call becomes `{name: {kwargs}}` (or its source text when it has no keyword
//! arguments), as BFCL's decoder does; otherwise both are errors.

use std::fmt;

/// A Python literal value.
#[derive(Clone, Debug, PartialEq)]
pub enum PyValue {
    None,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    List(Vec<PyValue>),
    Tuple(Vec<PyValue>),
    /// Key/value pairs in source order (a later duplicate key replaces the earlier value).
    Dict(Vec<(PyValue, PyValue)>),
}

/// One parsed call `name(args..., key=value, ...)`.
#[derive(Clone, Debug, PartialEq)]
pub struct PyCall {
    pub name: String,
    pub args: Vec<PyValue>,
    pub kwargs: Vec<(String, PyValue)>,
}

/// A parse failure: byte offset into the input and what was expected there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseError {
    pub pos: usize,
    pub msg: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "at byte {}: {}", self.pos, self.msg)
    }
}

impl std::error::Error for ParseError {}

/// Parser options.
#[derive(Clone, Copy, Debug, Default)]
pub struct ParseOptions {
    /// Accept bare identifiers and nested calls as values (BFCL decoding).
    pub bare_names: bool,
}

/// Maximum nesting of brackets, to keep recursion bounded on hostile input.
const MAX_DEPTH: usize = 200;

/// Parse one Python literal (the whole input, surrounding whitespace allowed).
pub fn parse_literal(src: &str) -> Result<PyValue, ParseError> {
    let mut p = Parser::new(src, ParseOptions::default());
    p.ws();
    let v = p.value(0)?;
    p.ws();
    p.end()?;
    Ok(v)
}

/// Parse a list of calls `[f(a=1), g(b="x")]`, a tuple `(f(), g())`, or a single call `f(a=1)`.
/// An empty list `[]` gives no calls.
pub fn parse_calls(src: &str, opts: ParseOptions) -> Result<Vec<PyCall>, ParseError> {
    let mut p = Parser::new(src, opts);
    p.ws();
    let calls = match p.peek() {
        Some(b'[') | Some(b'(') => {
            let close = if p.peek() == Some(b'[') { b']' } else { b')' };
            p.pos += 1;
            let mut calls = Vec::new();
            loop {
                p.ws();
                if p.peek() == Some(close) {
                    p.pos += 1;
                    break;
                }
                calls.push(p.call(1)?);
                p.ws();
                match p.peek() {
                    Some(b',') => p.pos += 1,
                    Some(c) if c == close => {}
                    _ => return Err(p.err(format!("expected `,` or `{}`", close as char))),
                }
            }
            calls
        }
        _ => vec![p.call(0)?],
    };
    p.ws();
    p.end()?;
    Ok(calls)
}

struct Parser<'a> {
    s: &'a str,
    b: &'a [u8],
    pos: usize,
    opts: ParseOptions,
}

impl<'a> Parser<'a> {
    fn new(s: &'a str, opts: ParseOptions) -> Self {
        Parser {
            s,
            b: s.as_bytes(),
            pos: 0,
            opts,
        }
    }

    fn err(&self, msg: impl Into<String>) -> ParseError {
        ParseError {
            pos: self.pos,
            msg: msg.into(),
        }
    }

    fn peek(&self) -> Option<u8> {
        self.b.get(self.pos).copied()
    }

    fn ws(&mut self) {
        while let Some(c) = self.peek() {
            if c == b' ' || c == b'\t' || c == b'\n' || c == b'\r' {
                self.pos += 1;
            } else if c == b'\\' && matches!(self.b.get(self.pos + 1), Some(b'\n')) {
                self.pos += 2; // explicit line continuation
            } else {
                break;
            }
        }
    }

    fn end(&self) -> Result<(), ParseError> {
        if self.pos != self.b.len() {
            return Err(self.err("unexpected trailing text"));
        }
        Ok(())
    }

    fn ident(&mut self) -> Option<&'a str> {
        let start = self.pos;
        let mut chars = self.s[self.pos..].char_indices();
        match chars.next() {
            Some((_, c)) if c == '_' || c.is_alphabetic() => {}
            _ => return None,
        }
        let mut end = self.s.len();
        for (i, c) in chars {
            if !(c == '_' || c.is_alphanumeric()) {
                end = start + i;
                break;
            }
        }
        self.pos = end;
        Some(&self.s[start..end])
    }

    /// A dotted name `a.b.c`.
    fn dotted(&mut self) -> Option<String> {
        let first = self.ident()?;
        let mut name = first.to_string();
        loop {
            let save = self.pos;
            self.ws();
            if self.peek() == Some(b'.') {
                self.pos += 1;
                self.ws();
                if let Some(part) = self.ident() {
                    name.push('.');
                    name.push_str(part);
                    continue;
                }
            }
            self.pos = save;
            return Some(name);
        }
    }

    fn call(&mut self, depth: usize) -> Result<PyCall, ParseError> {
        if depth > MAX_DEPTH {
            return Err(self.err("nesting too deep"));
        }
        let Some(name) = self.dotted() else {
            return Err(self.err("expected a function name"));
        };
        self.ws();
        if self.peek() != Some(b'(') {
            return Err(self.err(format!("expected `(` after function name `{name}`")));
        }
        self.pos += 1;
        self.call_args(name, depth)
    }

    /// After the opening parenthesis of a call.
    fn call_args(&mut self, name: String, depth: usize) -> Result<PyCall, ParseError> {
        let mut args = Vec::new();
        let mut kwargs: Vec<(String, PyValue)> = Vec::new();
        loop {
            self.ws();
            if self.peek() == Some(b')') {
                self.pos += 1;
                break;
            }
            // keyword argument?
            let save = self.pos;
            let mut is_kw = false;
            if let Some(id) = self.ident() {
                self.ws();
                if self.peek() == Some(b'=') && self.b.get(self.pos + 1) != Some(&b'=') {
                    self.pos += 1;
                    self.ws();
                    let v = self.value(depth + 1)?;
                    if kwargs.iter().any(|(k, _)| k == id) {
                        return Err(self.err(format!("keyword argument `{id}` repeated")));
                    }
                    kwargs.push((id.to_string(), v));
                    is_kw = true;
                }
            }
            if !is_kw {
                self.pos = save;
                if !kwargs.is_empty() {
                    return Err(self.err("positional argument after keyword argument"));
                }
                args.push(self.value(depth + 1)?);
            }
            self.ws();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b')') => {}
                _ => return Err(self.err("expected `,` or `)` in argument list")),
            }
        }
        Ok(PyCall { name, args, kwargs })
    }

    fn value(&mut self, depth: usize) -> Result<PyValue, ParseError> {
        if depth > MAX_DEPTH {
            return Err(self.err("nesting too deep"));
        }
        let Some(c) = self.peek() else {
            return Err(self.err("expected a value, found end of input"));
        };
        match c {
            b'"' | b'\'' => self.strings(),
            b'[' => {
                self.pos += 1;
                Ok(PyValue::List(self.seq(b']', depth)?.0))
            }
            b'(' => {
                self.pos += 1;
                let (items, trailing_comma) = self.seq(b')', depth)?;
                if items.len() == 1 && !trailing_comma {
                    // parenthesised expression, not a tuple
                    Ok(items.into_iter().next().unwrap_or(PyValue::None))
                } else {
                    Ok(PyValue::Tuple(items))
                }
            }
            b'{' => {
                self.pos += 1;
                self.dict(depth)
            }
            b'-' | b'+' => {
                self.pos += 1;
                self.ws();
                let v = self.value(depth + 1)?;
                let neg = c == b'-';
                match v {
                    PyValue::Int(i) => Ok(PyValue::Int(if neg { -i } else { i })),
                    PyValue::Float(f) => Ok(PyValue::Float(if neg { -f } else { f })),
                    PyValue::Bool(b) => {
                        Ok(PyValue::Int(if neg { -(b as i128) } else { b as i128 }))
                    }
                    _ => Err(self.err("unary minus/plus applies only to numbers")),
                }
            }
            b'0'..=b'9' | b'.' => self.number(),
            _ => {
                let start = self.pos;
                // string prefixes r"..", u"..", R'..', U'..'
                if matches!(c, b'r' | b'R' | b'u' | b'U')
                    && matches!(self.b.get(self.pos + 1), Some(b'"') | Some(b'\''))
                {
                    return self.strings();
                }
                let Some(name) = self.dotted() else {
                    return Err(self.err("expected a value"));
                };
                match name.as_str() {
                    "True" => return Ok(PyValue::Bool(true)),
                    "False" => return Ok(PyValue::Bool(false)),
                    "None" => return Ok(PyValue::None),
                    _ => {}
                }
                if !self.opts.bare_names {
                    self.pos = start;
                    return Err(
                        self.err(format!("expected a literal value, found the name `{name}`"))
                    );
                }
                let after = self.pos;
                self.ws();
                if self.peek() == Some(b'(') {
                    self.pos += 1;
                    let call = self.call_args(name, depth + 1)?;
                    if call.kwargs.is_empty() {
                        Ok(PyValue::Str(self.s[start..self.pos].to_string()))
                    } else {
                        let args = call
                            .kwargs
                            .into_iter()
                            .map(|(k, v)| (PyValue::Str(k), v))
                            .collect();
                        Ok(PyValue::Dict(vec![(
                            PyValue::Str(call.name),
                            PyValue::Dict(args),
                        )]))
                    }
                } else {
                    self.pos = after;
                    Ok(PyValue::Str(name))
                }
            }
        }
    }

    /// Items up to `close`; returns whether the last item had a trailing comma.
    fn seq(&mut self, close: u8, depth: usize) -> Result<(Vec<PyValue>, bool), ParseError> {
        let mut items = Vec::new();
        let mut trailing = false;
        loop {
            self.ws();
            if self.peek() == Some(close) {
                self.pos += 1;
                return Ok((items, trailing));
            }
            items.push(self.value(depth + 1)?);
            trailing = false;
            self.ws();
            match self.peek() {
                Some(b',') => {
                    self.pos += 1;
                    trailing = true;
                }
                Some(c) if c == close => {}
                _ => return Err(self.err(format!("expected `,` or `{}`", close as char))),
            }
        }
    }

    fn dict(&mut self, depth: usize) -> Result<PyValue, ParseError> {
        let mut items: Vec<(PyValue, PyValue)> = Vec::new();
        loop {
            self.ws();
            if self.peek() == Some(b'}') {
                self.pos += 1;
                return Ok(PyValue::Dict(items));
            }
            let k = self.value(depth + 1)?;
            if matches!(k, PyValue::List(_) | PyValue::Dict(_)) {
                return Err(self.err("unhashable dict key (list or dict)"));
            }
            self.ws();
            if self.peek() != Some(b':') {
                return Err(self.err("expected `:` after dict key"));
            }
            self.pos += 1;
            self.ws();
            let v = self.value(depth + 1)?;
            if let Some(slot) = items.iter_mut().find(|(ek, _)| py_eq(ek, &k)) {
                slot.1 = v;
            } else {
                items.push((k, v));
            }
            self.ws();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b'}') => {}
                _ => return Err(self.err("expected `,` or `}` in dict")),
            }
        }
    }

    fn number(&mut self) -> Result<PyValue, ParseError> {
        let start = self.pos;
        let b = self.b;
        // prefixed integers
        if b[start] == b'0'
            && matches!(
                b.get(start + 1),
                Some(b'x' | b'X' | b'o' | b'O' | b'b' | b'B')
            )
        {
            let radix = match b[start + 1] {
                b'x' | b'X' => 16,
                b'o' | b'O' => 8,
                _ => 2,
            };
            self.pos += 2;
            let ds = self.pos;
            while let Some(c) = self.peek() {
                if c.is_ascii_alphanumeric() || c == b'_' {
                    self.pos += 1;
                } else {
                    break;
                }
            }
            let digits: String = self.s[ds..self.pos].chars().filter(|&c| c != '_').collect();
            return i128::from_str_radix(&digits, radix)
                .map(PyValue::Int)
                .map_err(|_| ParseError {
                    pos: start,
                    msg: format!(
                        "invalid base-{radix} integer `{}`",
                        &self.s[start..self.pos]
                    ),
                });
        }
        let mut is_float = false;
        let mut seen_digit = false;
        while let Some(c) = self.peek() {
            if c.is_ascii_digit() || c == b'_' {
                seen_digit |= c != b'_';
                self.pos += 1;
            } else if c == b'.' && !is_float {
                is_float = true;
                self.pos += 1;
            } else {
                break;
            }
        }
        if !seen_digit {
            return Err(ParseError {
                pos: start,
                msg: "expected a number".into(),
            });
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            let save = self.pos;
            self.pos += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.pos += 1;
            }
            let es = self.pos;
            while matches!(self.peek(), Some(b'0'..=b'9' | b'_')) {
                self.pos += 1;
            }
            if self.pos == es {
                self.pos = save;
            } else {
                is_float = true;
            }
        }
        if matches!(self.peek(), Some(b'j' | b'J')) {
            return Err(self.err("complex numbers are not supported"));
        }
        if self
            .peek()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == b'_')
        {
            return Err(self.err("invalid character in number"));
        }
        let text: String = self.s[start..self.pos]
            .chars()
            .filter(|&c| c != '_')
            .collect();
        if is_float {
            text.parse::<f64>()
                .map(PyValue::Float)
                .map_err(|_| ParseError {
                    pos: start,
                    msg: format!("invalid float `{text}`"),
                })
        } else {
            if text.len() > 1 && text.starts_with('0') && text.bytes().any(|c| c != b'0') {
                return Err(ParseError {
                    pos: start,
                    msg: format!("leading zeros in integer `{text}`"),
                });
            }
            text.parse::<i128>()
                .map(PyValue::Int)
                .map_err(|_| ParseError {
                    pos: start,
                    msg: format!("integer `{text}` out of range"),
                })
        }
    }

    /// One or more adjacent string literals, concatenated.
    fn strings(&mut self) -> Result<PyValue, ParseError> {
        let mut out = self.string()?;
        loop {
            let save = self.pos;
            self.ws();
            let c = self.peek();
            let prefixed = matches!(c, Some(b'r' | b'R' | b'u' | b'U'))
                && matches!(self.b.get(self.pos + 1), Some(b'"') | Some(b'\''));
            if matches!(c, Some(b'"') | Some(b'\'')) || prefixed {
                out.push_str(&self.string()?);
            } else {
                self.pos = save;
                return Ok(PyValue::Str(out));
            }
        }
    }

    fn string(&mut self) -> Result<String, ParseError> {
        let start = self.pos;
        let mut raw = false;
        match self.peek() {
            Some(b'r' | b'R') => {
                raw = true;
                self.pos += 1;
            }
            Some(b'u' | b'U') => self.pos += 1,
            _ => {}
        }
        let q = self.peek().ok_or_else(|| self.err("expected a string"))?;
        let triple = self.b.get(self.pos + 1) == Some(&q) && self.b.get(self.pos + 2) == Some(&q);
        self.pos += if triple { 3 } else { 1 };
        let mut out = String::new();
        loop {
            let rest = &self.s[self.pos..];
            let mut it = rest.chars();
            let Some(c) = it.next() else {
                return Err(ParseError {
                    pos: start,
                    msg: "unterminated string".into(),
                });
            };
            if c as u32 == q as u32 {
                if !triple {
                    self.pos += 1;
                    return Ok(out);
                }
                if rest.as_bytes().get(1) == Some(&q) && rest.as_bytes().get(2) == Some(&q) {
                    self.pos += 3;
                    return Ok(out);
                }
            }
            if c == '\n' && !triple {
                return Err(self.err("newline inside a single-quoted string"));
            }
            if c == '\\' {
                let Some(e) = it.next() else {
                    return Err(ParseError {
                        pos: start,
                        msg: "unterminated string".into(),
                    });
                };
                if raw {
                    out.push('\\');
                    out.push(e);
                    self.pos += 1 + e.len_utf8();
                    continue;
                }
                self.pos += 1 + e.len_utf8();
                match e {
                    '\n' => {}
                    '\\' => out.push('\\'),
                    '\'' => out.push('\''),
                    '"' => out.push('"'),
                    'n' => out.push('\n'),
                    't' => out.push('\t'),
                    'r' => out.push('\r'),
                    'a' => out.push('\x07'),
                    'b' => out.push('\x08'),
                    'f' => out.push('\x0c'),
                    'v' => out.push('\x0b'),
                    '0'..='7' => {
                        let mut v = e as u32 - '0' as u32;
                        for _ in 0..2 {
                            match self.peek() {
                                Some(d @ b'0'..=b'7') => {
                                    v = v * 8 + (d - b'0') as u32;
                                    self.pos += 1;
                                }
                                _ => break,
                            }
                        }
                        out.push(char::from_u32(v).ok_or_else(|| self.err("bad octal escape"))?);
                    }
                    'x' | 'u' | 'U' => {
                        let n = match e {
                            'x' => 2,
                            'u' => 4,
                            _ => 8,
                        };
                        let hex = self.s.get(self.pos..self.pos + n).unwrap_or("");
                        if hex.len() != n || !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
                            return Err(self.err(format!("`\\{e}` needs {n} hex digits")));
                        }
                        let v =
                            u32::from_str_radix(hex, 16).map_err(|_| self.err("bad hex escape"))?;
                        let ch = char::from_u32(v)
                            .ok_or_else(|| self.err(format!("`\\{e}{hex}` is not a character")))?;
                        out.push(ch);
                        self.pos += n;
                    }
                    other => {
                        // Python keeps unknown escapes as written.
                        out.push('\\');
                        out.push(other);
                    }
                }
                continue;
            }
            out.push(c);
            self.pos += c.len_utf8();
        }
    }
}

/// Python's `==` over literal values: numbers compare by value across int/float/bool
/// (`1 == 1.0 == True`), a list never equals a tuple, dicts compare as key sets with equal values.
pub fn py_eq(a: &PyValue, b: &PyValue) -> bool {
    use PyValue::{Bool, Dict, Float, Int, List, Str, Tuple};
    fn num(v: &PyValue) -> Option<(Option<i128>, f64)> {
        match v {
            Bool(b) => Some((Some(*b as i128), *b as i128 as f64)),
            Int(i) => Some((Some(*i), *i as f64)),
            Float(f) => Some((Option::None, *f)),
            _ => Option::None,
        }
    }
    match (a, b) {
        (PyValue::None, PyValue::None) => true,
        (Str(x), Str(y)) => x == y,
        (List(x), List(y)) | (Tuple(x), Tuple(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| py_eq(p, q))
        }
        (Dict(x), Dict(y)) => {
            x.len() == y.len()
                && x.iter().all(|(k, v)| {
                    y.iter()
                        .find(|(k2, _)| py_eq(k, k2))
                        .is_some_and(|(_, v2)| py_eq(v, v2))
                })
        }
        _ => match (num(a), num(b)) {
            (Some((Some(i), _)), Some((Some(j), _))) => i == j,
            (Some((ia, fa)), Some((ib, fb))) => {
                // int vs float: exact comparison as Python does
                match (ia, ib) {
                    (Some(i), Option::None) => int_eq_float(i, fb),
                    (Option::None, Some(j)) => int_eq_float(j, fa),
                    _ => fa == fb,
                }
            }
            _ => false,
        },
    }
}

fn int_eq_float(i: i128, f: f64) -> bool {
    if !f.is_finite() || f.fract() != 0.0 {
        return false;
    }
    // f is integral; compare exactly when it fits
    if f.abs() < 1.7e38 {
        (f as i128) == i
    } else {
        false
    }
}

impl PyValue {
    /// Python's type name (`str`, `int`, `float`, `bool`, `list`, `tuple`, `dict`, `NoneType`).
    pub fn type_name(&self) -> &'static str {
        match self {
            PyValue::None => "NoneType",
            PyValue::Bool(_) => "bool",
            PyValue::Int(_) => "int",
            PyValue::Float(_) => "float",
            PyValue::Str(_) => "str",
            PyValue::List(_) => "list",
            PyValue::Tuple(_) => "tuple",
            PyValue::Dict(_) => "dict",
        }
    }

    /// From JSON: integers stay ints, numbers written with a fraction or exponent are floats.
    pub fn from_json(v: &serde_json::Value) -> PyValue {
        use serde_json::Value as J;
        match v {
            J::Null => PyValue::None,
            J::Bool(b) => PyValue::Bool(*b),
            J::Number(n) => {
                if let Some(i) = n.as_i64() {
                    PyValue::Int(i as i128)
                } else if let Some(u) = n.as_u64() {
                    PyValue::Int(u as i128)
                } else {
                    PyValue::Float(n.as_f64().unwrap_or(f64::NAN))
                }
            }
            J::String(s) => PyValue::Str(s.clone()),
            J::Array(a) => PyValue::List(a.iter().map(PyValue::from_json).collect()),
            J::Object(o) => PyValue::Dict(
                o.iter()
                    .map(|(k, v)| (PyValue::Str(k.clone()), PyValue::from_json(v)))
                    .collect(),
            ),
        }
    }

    /// To JSON: tuples become lists; fails on non-string dict keys, non-finite floats and
    /// integers outside the 64-bit range.
    pub fn to_json(&self) -> Result<serde_json::Value, String> {
        use serde_json::Value as J;
        Ok(match self {
            PyValue::None => J::Null,
            PyValue::Bool(b) => J::Bool(*b),
            PyValue::Int(i) => {
                if let Ok(v) = i64::try_from(*i) {
                    J::from(v)
                } else if let Ok(v) = u64::try_from(*i) {
                    J::from(v)
                } else {
                    return Err(format!("integer {i} does not fit in 64 bits"));
                }
            }
            PyValue::Float(f) => J::Number(
                serde_json::Number::from_f64(*f)
                    .ok_or_else(|| format!("float {f} has no JSON form"))?,
            ),
            PyValue::Str(s) => J::String(s.clone()),
            PyValue::List(a) | PyValue::Tuple(a) => {
                J::Array(a.iter().map(|v| v.to_json()).collect::<Result<_, _>>()?)
            }
            PyValue::Dict(d) => {
                let mut m = serde_json::Map::new();
                for (k, v) in d {
                    let PyValue::Str(k) = k else {
                        return Err(format!("dict key {} is not a string", k.repr()));
                    };
                    m.insert(k.clone(), v.to_json()?);
                }
                J::Object(m)
            }
        })
    }

    /// Python-like `repr`, for messages.
    pub fn repr(&self) -> String {
        match self {
            PyValue::None => "None".into(),
            PyValue::Bool(true) => "True".into(),
            PyValue::Bool(false) => "False".into(),
            PyValue::Int(i) => i.to_string(),
            PyValue::Float(f) => {
                if f.is_finite() && f.fract() == 0.0 && f.abs() < 1e16 {
                    format!("{f:.1}")
                } else {
                    format!("{f}")
                }
            }
            PyValue::Str(s) => format!("{s:?}").replace('"', "'"),
            PyValue::List(a) => format!(
                "[{}]",
                a.iter().map(|v| v.repr()).collect::<Vec<_>>().join(", ")
            ),
            PyValue::Tuple(a) => {
                let inner = a.iter().map(|v| v.repr()).collect::<Vec<_>>().join(", ");
                if a.len() == 1 {
                    format!("({inner},)")
                } else {
                    format!("({inner})")
                }
            }
            PyValue::Dict(d) => format!(
                "{{{}}}",
                d.iter()
                    .map(|(k, v)| format!("{}: {}", k.repr(), v.repr()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }

    /// Look a string key up in a dict value.
    pub fn get(&self, key: &str) -> Option<&PyValue> {
        match self {
            PyValue::Dict(d) => d
                .iter()
                .find(|(k, _)| matches!(k, PyValue::Str(s) if s == key))
                .map(|(_, v)| v),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals() {
        assert_eq!(parse_literal("-3").unwrap(), PyValue::Int(-3));
        assert_eq!(parse_literal("2.5e1").unwrap(), PyValue::Float(25.0));
        assert_eq!(parse_literal("5.").unwrap(), PyValue::Float(5.0));
        assert_eq!(parse_literal(".5").unwrap(), PyValue::Float(0.5));
        assert_eq!(parse_literal("0x1f").unwrap(), PyValue::Int(31));
        assert_eq!(parse_literal("1_000").unwrap(), PyValue::Int(1000));
        assert_eq!(
            parse_literal(r#"'it\'s' "x\n""#).unwrap(),
            PyValue::Str("it's x\n".replace(' ', ""))
        );
        assert_eq!(
            parse_literal("(1,)").unwrap(),
            PyValue::Tuple(vec![PyValue::Int(1)])
        );
        assert_eq!(parse_literal("(1)").unwrap(), PyValue::Int(1));
        assert!(parse_literal("foo").is_err());
        assert!(parse_literal("[1, 2").is_err());
        assert!(parse_literal("012").is_err());
    }

    #[test]
    fn equality_follows_python() {
        assert!(py_eq(&PyValue::Int(1), &PyValue::Float(1.0)));
        assert!(py_eq(&PyValue::Bool(true), &PyValue::Int(1)));
        assert!(!py_eq(&PyValue::List(vec![]), &PyValue::Tuple(vec![])));
        assert!(!py_eq(&PyValue::Str("1".into()), &PyValue::Int(1)));
    }
}
