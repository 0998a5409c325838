//! Tokenizer (HF tokenizer.json, offline) and the chat template renderer.
//!
//! [`ChatTemplate::render`] reproduces transformers' `apply_chat_template(..., tokenize=False)`
//! byte for byte: the template runs in minijinja with `trim_blocks` and `lstrip_blocks` on (as
//! transformers sets them), loop controls, Python string methods (pycompat), `raise_exception`,
//! and a `tojson` filter that writes exactly what Python's
//! `json.dumps(x, ensure_ascii=False)` writes (the crate's one such writer, [`crate::pyjson`]).

use crate::data::Message;
/// The JSON writer the `tojson` filter uses, also reachable from here.
pub use crate::pyjson::{py_float_repr, py_json_dumps, py_json_string, PyJsonOpts};
use crate::pyjson::{write_py_json, PyJson};
use crate::{Error, Result};
use minijinja::value::{Kwargs, Value as JValue, ValueKind};
use minijinja::{Environment, ErrorKind};

/// Most template instructions one render may run. Rendering the Qwen2.5 template for a long
/// conversation with a dozen tools takes well under 10^5; nested loops of 10^5 x 10^5 would
/// take 10^10 and are stopped after about a second.
pub const TEMPLATE_FUEL: u64 = 20_000_000;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::fmt::Write as _;
use std::path::Path;

/// Qwen2.5 special token ids (the `added_tokens` of Qwen2.5's tokenizer.json).
pub const ENDOFTEXT: u32 = 151643;
pub const IM_START: u32 = 151644;
pub const IM_END: u32 = 151645;
/// `<tool_call>` and `</tool_call>` (added tokens, not special: they survive skip-special decode).
pub const TOOL_CALL_START: u32 = 151657;
pub const TOOL_CALL_END: u32 = 151658;

/// The small byte-level BPE tokenizer of the golden fixtures (302 tokens, with
/// `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, `<tool_call>`, `</tool_call>`), built in for
/// `tooln1 init-tiny`.
pub const TINY_TOKENIZER_JSON: &[u8] =
    include_bytes!("../tests/fixtures/golden/tokenizer/tokenizer.json");
/// Its tokenizer_config.json (eos `<|im_end|>`, pad `<|endoftext|>`, the Qwen2.5 chat template).
pub const TINY_TOKENIZER_CONFIG_JSON: &[u8] =
    include_bytes!("../tests/fixtures/golden/tokenizer/tokenizer_config.json");

/// A loaded `tokenizer.json`.
pub struct Tokenizer {
    pub inner: tokenizers::Tokenizer,
}

impl Tokenizer {
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::msg(format!(
                "{}: tokenizer file not found (expected an HF tokenizer.json)",
                path.display()
            )));
        }
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| Error::msg(format!("{}: cannot load tokenizer: {e}", path.display())))?;
        Ok(Tokenizer { inner })
    }

    /// A tokenizer from the bytes of a tokenizer.json (`label` names it in errors).
    pub fn from_bytes(bytes: &[u8], label: &str) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_bytes(bytes)
            .map_err(|e| Error::msg(format!("{label}: cannot load tokenizer: {e}")))?;
        Ok(Tokenizer { inner })
    }

    /// `tokenizer.json` of a model folder.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::from_file(&dir.join("tokenizer.json"))
    }

    /// Encode text; special tokens written in the text (e.g. `<|im_start|>`) map to their ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::msg(format!("tokenizer: cannot encode: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| Error::msg(format!("tokenizer: cannot decode: {e}")))
    }

    /// Id of a token written out (e.g. "<|im_end|>"), if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Like [`Tokenizer::token_id`], but a missing token is an error naming it.
    pub fn require_token(&self, token: &str) -> Result<u32> {
        self.token_id(token).ok_or_else(|| {
            Error::msg(format!(
                "tokenizer: the vocabulary has no token {token:?} (needed by the chat format)"
            ))
        })
    }

    /// The token text of an id, if any.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Number of tokens including added tokens (embedding tables may be padded above it).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// A chat message as a template sees it: role, content and (assistant) tool calls, each call
/// `{"type": "function", "function": {"name", "arguments"}}` or `{"name", "arguments"}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<Value>>,
}

impl From<&Message> for ChatMessage {
    fn from(m: &Message) -> Self {
        ChatMessage {
            role: m.role.clone(),
            content: m.content.clone(),
            tool_calls: None,
        }
    }
}

/// Everything a template render takes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RenderInput {
    /// Messages as JSON objects (`role`, `content`, optional `tool_calls`, anything else a
    /// template reads).
    pub messages: Vec<Value>,
    /// Tool schemas passed as `tools=`; None or empty means no tools.
    pub tools: Option<Vec<Value>>,
    pub add_generation_prompt: bool,
    /// More template variables (e.g. `bos_token`, `eos_token`).
    pub extra: Map<String, Value>,
}

/// The Qwen2.5-Instruct chat template (from its tokenizer_config.json), used when a
/// tokenizer_config.json carries none.
pub const QWEN25_CHAT_TEMPLATE: &str = r##"{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"##;

/// A chat template (Jinja, as in `tokenizer_config.json`).
pub struct ChatTemplate {
    pub source: String,
}

impl ChatTemplate {
    /// A template from Jinja source; it is compiled once here so that syntax errors surface
    /// early.
    pub fn new(source: impl Into<String>) -> Result<Self> {
        let t = ChatTemplate {
            source: source.into(),
        };
        let env = t.environment();
        env.template_from_str(&t.source)
            .map_err(|e| Error::msg(format!("chat template: {}", describe(&e))))?;
        Ok(t)
    }

    /// The built-in Qwen2.5-Instruct template.
    pub fn qwen25() -> Self {
        ChatTemplate {
            source: QWEN25_CHAT_TEMPLATE.to_string(),
        }
    }

    /// The template of a model folder: its tokenizer_config.json's (see
    /// [`ChatTemplate::from_tokenizer_config`]), or the built-in Qwen2.5 template when the folder
    /// has no tokenizer_config.json.
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let p = dir.join("tokenizer_config.json");
        if p.exists() {
            Self::from_tokenizer_config(&p)
        } else {
            Ok(Self::qwen25())
        }
    }

    /// Read `chat_template` from a tokenizer_config.json: a string, or a list of
    /// `{name, template}` (the one named "default" is used). Without one, a
    /// `chat_template.jinja` beside the file is used, then the built-in Qwen2.5 template.
    pub fn from_tokenizer_config(path: &Path) -> Result<Self> {
        let label = path.display().to_string();
        let text = crate::safefs::read_to_string(path)?;
        let v: Value = serde_json::from_str(&text).map_err(|e| Error::Config {
            file: label.clone(),
            field: "<json>".into(),
            msg: format!("not valid JSON: {e}"),
        })?;
        let field_err = |msg: String| Error::Config {
            file: label.clone(),
            field: "chat_template".into(),
            msg,
        };
        match v.get("chat_template") {
            Some(Value::String(s)) => {
                Self::new(s.clone()).map_err(|e| field_err(format!("does not compile: {e}")))
            }
            Some(Value::Array(items)) => {
                let mut names = Vec::new();
                for item in items {
                    let name = item.get("name").and_then(Value::as_str);
                    let tpl = item.get("template").and_then(Value::as_str);
                    match (name, tpl) {
                        (Some("default"), Some(t)) => {
                            return Self::new(t.to_string())
                                .map_err(|e| field_err(format!("does not compile: {e}")))
                        }
                        (Some(n), Some(_)) => names.push(n.to_string()),
                        _ => {
                            return Err(field_err(
                                "expected a list of {\"name\", \"template\"} objects".into(),
                            ))
                        }
                    }
                }
                Err(field_err(format!(
                    "no template named \"default\" (found {names:?})"
                )))
            }
            Some(Value::Null) | None => {
                let jinja = path.with_file_name("chat_template.jinja");
                if jinja.is_file() {
                    let src = crate::safefs::read_to_string(&jinja)?;
                    Self::new(src).map_err(|e| Error::msg(format!("{}: {e}", jinja.display())))
                } else {
                    Ok(Self::qwen25())
                }
            }
            Some(other) => Err(field_err(format!(
                "expected a string or a list of {{name, template}}, found {}",
                other
            ))),
        }
    }

    fn environment(&self) -> Environment<'static> {
        let mut env = Environment::new();
        // A chat template comes from a downloaded tokenizer_config.json and is untrusted: bound
        // the work of one render (minijinja charges one unit of fuel per instruction).
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson_filter);
        env.add_function("strftime_now", |fmt: String| {
            let secs = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0);
            strftime_utc(&fmt, secs)
        });
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<JValue, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env
    }

    /// Render messages (and optional tool schemas passed as `tools=`) exactly as
    /// transformers' `apply_chat_template(..., tokenize=False)` does.
    pub fn render(
        &self,
        messages: &[Message],
        tools: Option<&[serde_json::Value]>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let msgs: Vec<ChatMessage> = messages.iter().map(ChatMessage::from).collect();
        self.render_chat(&msgs, tools, add_generation_prompt)
    }

    /// Like [`ChatTemplate::render`] for messages that may carry assistant `tool_calls`.
    pub fn render_chat(
        &self,
        messages: &[ChatMessage],
        tools: Option<&[serde_json::Value]>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let messages = messages
            .iter()
            .map(|m| serde_json::to_value(m).map_err(|e| Error::msg(format!("message: {e}"))))
            .collect::<Result<Vec<_>>>()?;
        self.render_input(&RenderInput {
            messages,
            tools: tools.map(<[Value]>::to_vec),
            add_generation_prompt,
            extra: Map::new(),
        })
    }

    /// Render messages given as JSON objects.
    pub fn render_json(
        &self,
        messages: &[Value],
        tools: Option<&[Value]>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        self.render_input(&RenderInput {
            messages: messages.to_vec(),
            tools: tools.map(<[Value]>::to_vec),
            add_generation_prompt,
            extra: Map::new(),
        })
    }

    /// The general render.
    pub fn render_input(&self, input: &RenderInput) -> Result<String> {
        for (i, m) in input.messages.iter().enumerate() {
            if m.get("role").and_then(Value::as_str).is_none() {
                return Err(Error::Invalid(format!(
                    "chat template: message {i} has no string `role`"
                )));
            }
        }
        let env = self.environment();
        let tpl = env
            .template_from_str(&self.source)
            .map_err(|e| Error::msg(format!("chat template: {}", describe(&e))))?;
        let mut ctx = Map::new();
        for (k, v) in &input.extra {
            ctx.insert(k.clone(), v.clone());
        }
        ctx.insert("messages".into(), Value::Array(input.messages.clone()));
        // transformers passes tools=None when none are given.
        ctx.insert(
            "tools".into(),
            match &input.tools {
                Some(t) => Value::Array(t.clone()),
                None => Value::Null,
            },
        );
        ctx.insert(
            "add_generation_prompt".into(),
            Value::Bool(input.add_generation_prompt),
        );
        tpl.render(JValue::from_serialize(Value::Object(ctx)))
            .map_err(|e| Error::msg(format!("chat template: {}", describe(&e))))
    }
}

/// Special-token strings of a tokenizer_config.json (`bos_token`, `eos_token`, `pad_token`,
/// `unk_token`; each a string or an `{"content": ...}` object), as template variables the way
/// transformers passes them to `apply_chat_template`. Absent or null tokens are left out.
pub fn special_tokens_from_config(path: &Path) -> Result<Map<String, Value>> {
    let text = crate::safefs::read_to_string(path)?;
    let v: Value = serde_json::from_str(&text).map_err(|e| Error::Config {
        file: path.display().to_string(),
        field: "<json>".into(),
        msg: format!("not valid JSON: {e}"),
    })?;
    let mut out = Map::new();
    for key in ["bos_token", "eos_token", "pad_token", "unk_token"] {
        let tok = match v.get(key) {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).map(String::from),
            Some(Value::Null) | None => None,
            Some(other) => {
                return Err(Error::Config {
                    file: path.display().to_string(),
                    field: key.into(),
                    msg: format!("expected a token string or {{\"content\": ...}}, found {other}"),
                })
            }
        };
        if let Some(t) = tok {
            out.insert(key.into(), Value::String(t));
        }
    }
    Ok(out)
}

/// `strftime` over a UTC Unix time for the directives chat templates use:
/// %Y %y %m %d %e %j %b %B %a %A %H %M %S %p %I %%.
pub fn strftime_utc(fmt: &str, unix_secs: i64) -> std::result::Result<String, minijinja::Error> {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = unix_secs.div_euclid(86_400);
    let sod = unix_secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy_mar = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy_mar + 2) / 153;
    let day = doy_mar - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let cum = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = cum[(month - 1) as usize] + day + i64::from(leap && month > 2);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let (hh, mm, ss) = (sod / 3600, sod % 3600 / 60, sod % 60);
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let month_name = MONTHS[(month - 1) as usize];
        match chars.next() {
            Some('Y') => write!(out, "{year}"),
            Some('y') => write!(out, "{:02}", year.rem_euclid(100)),
            Some('m') => write!(out, "{month:02}"),
            Some('d') => write!(out, "{day:02}"),
            Some('e') => write!(out, "{day:>2}"),
            Some('j') => write!(out, "{yday:03}"),
            Some('b') => write!(out, "{}", &month_name[..3]),
            Some('B') => write!(out, "{month_name}"),
            Some('a') => write!(out, "{}", &DAYS[weekday][..3]),
            Some('A') => write!(out, "{}", DAYS[weekday]),
            Some('H') => write!(out, "{hh:02}"),
            Some('I') => write!(out, "{:02}", if hh % 12 == 0 { 12 } else { hh % 12 }),
            Some('p') => write!(out, "{}", if hh < 12 { "AM" } else { "PM" }),
            Some('M') => write!(out, "{mm:02}"),
            Some('S') => write!(out, "{ss:02}"),
            Some('%') => write!(out, "%"),
            other => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!(
                        "strftime_now: unsupported directive %{}",
                        other.unwrap_or(' ')
                    ),
                ))
            }
        }
        .map_err(|_| minijinja::Error::new(ErrorKind::InvalidOperation, "strftime_now"))?;
    }
    Ok(out)
}

/// A minijinja error with its cause chain and line.
fn describe(e: &minijinja::Error) -> String {
    if e.kind() == ErrorKind::OutOfFuel {
        return format!(
            "rendering stopped after {TEMPLATE_FUEL} template instructions (the template loops \
             far more than a chat template needs; is tokenizer_config.json's chat_template \
             corrupt or hostile?)"
        );
    }
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(c) = src {
        let _ = write!(s, ": {c}");
        src = c.source();
    }
    s
}

fn py_key(k: &JValue) -> std::result::Result<String, minijinja::Error> {
    // Python converts str, int, float, bool and None keys to strings.
    match k.kind() {
        ValueKind::String => Ok(k.as_str().unwrap_or_default().to_string()),
        ValueKind::Number if k.is_integer() => Ok(k.to_string()),
        ValueKind::Number => Ok(py_float_repr(f64::try_from(k.clone()).unwrap_or(f64::NAN))),
        ValueKind::Bool => Ok(if k.is_true() { "true" } else { "false" }.into()),
        ValueKind::None => Ok("null".into()),
        other => Err(minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!("tojson: keys must be str, int, float, bool or None, not {other}"),
        )),
    }
}

fn to_py_json(v: &JValue, depth: usize) -> std::result::Result<PyJson, minijinja::Error> {
    if depth > 512 {
        return Err(minijinja::Error::new(
            ErrorKind::InvalidOperation,
            "tojson: value nested too deeply",
        ));
    }
    Ok(match v.kind() {
        ValueKind::None => PyJson::Null,
        ValueKind::Bool => PyJson::Bool(v.is_true()),
        ValueKind::Number if v.is_integer() => PyJson::Int(v.to_string()),
        ValueKind::Number => PyJson::Float(f64::try_from(v.clone()).map_err(|_| {
            minijinja::Error::new(ErrorKind::InvalidOperation, "tojson: bad number")
        })?),
        ValueKind::String => PyJson::Str(v.as_str().unwrap_or_default().to_string()),
        ValueKind::Seq | ValueKind::Iterable => PyJson::List(
            v.try_iter()?
                .map(|x| to_py_json(&x, depth + 1))
                .collect::<std::result::Result<_, _>>()?,
        ),
        ValueKind::Map => {
            let mut items = Vec::new();
            for k in v.try_iter()? {
                let val = v.get_item(&k)?;
                items.push((py_key(&k)?, to_py_json(&val, depth + 1)?));
            }
            PyJson::Dict(items)
        }
        ValueKind::Undefined => {
            return Err(minijinja::Error::new(
                ErrorKind::UndefinedError,
                "tojson: Object of type Undefined is not JSON serializable",
            ))
        }
        other => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: a {other} value is not JSON serializable"),
            ))
        }
    })
}

/// The template filter: `x | tojson`, with HF's optional arguments
/// `tojson(ensure_ascii=False, indent=None, separators=None, sort_keys=False)`.
fn tojson_filter(
    value: JValue,
    ensure_ascii: Option<JValue>,
    indent: Option<JValue>,
    kwargs: Kwargs,
) -> std::result::Result<JValue, minijinja::Error> {
    let bad = |m: String| minijinja::Error::new(ErrorKind::InvalidOperation, m);
    let ensure_ascii = match kwargs
        .get::<Option<JValue>>("ensure_ascii")?
        .or(ensure_ascii)
    {
        Some(v) => v.is_true(),
        None => false,
    };
    let indent = match kwargs.get::<Option<JValue>>("indent")?.or(indent) {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) if v.is_integer() => {
            let n = i64::try_from(v.clone()).unwrap_or(0).max(0) as usize;
            Some(" ".repeat(n))
        }
        Some(v) if v.kind() == ValueKind::String => Some(v.as_str().unwrap_or_default().into()),
        Some(v) => {
            return Err(bad(format!(
                "tojson: indent must be an int or a str, not {v}"
            )))
        }
    };
    let (item_sep, key_sep) = match kwargs.get::<Option<JValue>>("separators")? {
        Some(v) if !v.is_none() && !v.is_undefined() => {
            let parts: Vec<JValue> = v.try_iter()?.collect();
            match parts.as_slice() {
                [a, b] if a.as_str().is_some() && b.as_str().is_some() => (
                    a.as_str().unwrap_or_default().to_string(),
                    b.as_str().unwrap_or_default().to_string(),
                ),
                _ => return Err(bad("tojson: separators must be two strings".into())),
            }
        }
        // Python's default: ", " one-line, "," when indenting.
        _ => (
            if indent.is_some() { "," } else { ", " }.to_string(),
            ": ".to_string(),
        ),
    };
    let sort_keys = kwargs
        .get::<Option<JValue>>("sort_keys")?
        .is_some_and(|v| v.is_true());
    kwargs.assert_all_used()?;
    let opts = PyJsonOpts {
        ensure_ascii,
        indent,
        item_sep,
        key_sep,
        sort_keys,
    };
    let mut out = String::new();
    write_py_json(&to_py_json(&value, 0)?, &opts, 0, &mut out);
    Ok(JValue::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strftime_matches_known_dates() {
        // 2024-02-29 13:05:09 UTC was a Thursday, day 60 of a leap year.
        let t = 1_709_211_909;
        assert_eq!(
            strftime_utc("%Y-%m-%d %H:%M:%S %j %a %A %b %B %y %I%p %%", t).unwrap(),
            "2024-02-29 13:05:09 060 Thu Thursday Feb February 24 01PM %"
        );
        assert_eq!(strftime_utc("%d %b %Y", 0).unwrap(), "01 Jan 1970");
        assert_eq!(
            strftime_utc("%Y-%m-%d %A", 951_782_400).unwrap(),
            "2000-02-29 Tuesday"
        );
        assert!(strftime_utc("%Q", 0).is_err());
    }
}
