//! Training data: the unified sample format, the Tool-N1 system prompt, and the xLAM / ToolACE
//! converters (the two sources and the prompt format of the Tool-N1 paper, Zhang et al. 2025,
//! arXiv:2505.00024).
//!
//! Library entry points: [`tooln1_system_prompt`], [`read_records`], [`convert_xlam`],
//! [`convert_toolace`], [`split_train_test`], [`write_jsonl`], and [`prepare`] which does all of
//! it for a set of input files.

use crate::pycall::{self, ParseOptions};
use crate::pyjson::py_json;
use crate::{Error, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// One chat message. Assistant tool calls are stored as the JSON text of the call list (as the
/// Tool-N1 format writes them inside `<tool_call>`); tool results use role `tool`.
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

/// The base system text used when a dataset brings none (xLAM).
pub const DEFAULT_BASE_SYSTEM: &str = "You are an expert in composing functions. You are given a \
question and a set of possible functions. Based on the question, you will need to make one or \
more function/tool calls to achieve the purpose. If none of the functions can be used, point it \
out. If the given question lacks the parameters required by the function, also point it out.";

/// The Tool-N1 system message (the paper's training prompt): `base_system`, then a `# Tool`
/// section listing each tool on its own line as `{"type": "function", "function": <tool>}`
/// inside `<tools></tools>`, then the reply-format instructions (`<think>` reasoning, then a
/// JSON list of `{"name", "arguments"}` inside `<tool_call></tool_call>`, both in one reply, an
/// example, and a reminder about argument types). With `for_eval` it adds the evaluation-time instruction to
/// answer `<tool_call>[]</tool_call>` when no function applies.
pub fn tooln1_system_prompt(base_system: &str, tools: &[Value], for_eval: bool) -> String {
    let mut s = String::new();
    let base = base_system.trim_end();
    if !base.is_empty() {
        s.push_str(base);
        s.push_str("\n\n");
    }
    s.push_str(
        "# Tool\n\nHere is a list of functions in JSON format that you can invoke:\n<tools>\n",
    );
    for t in tools {
        let mut wrapper = serde_json::Map::new();
        wrapper.insert("type".into(), Value::String("function".into()));
        wrapper.insert("function".into(), t.clone());
        s.push_str(&py_json(&Value::Object(wrapper)));
        s.push('\n');
    }
    s.push_str("</tools>\n\n");
    s.push_str(
        "In each action step, you MUST:\n\
1. Think about the reasoning process in the mind and enclose your reasoning within <think> </think> XML tags.\n\
2. Then, provide a JSON list of function calls within <tool_call></tool_call> XML tags, each call of the form {\"name\": <function-name>, \"arguments\": <args-json-object>}, i.e., <tool_call>[{\"name\": <function-name>, \"arguments\": <args-json-object>}, {\"name\": <function-name2>, \"arguments\": <args-json-object2>}, ...]</tool_call>\n\
3. Make sure both the reasoning and the tool call steps are included together in one single reply.\n\
A complete reply example is: <think>To address the query, I need to send the email to Bob and then buy the banana through walmart.</think> <tool_call>[{\"name\": \"email\", \"arguments\": {\"receiver\": \"Bob\", \"content\": \"I will buy banana through walmart\"}}, {\"name\": \"walmart\", \"arguments\": {\"input\": \"banana\"}}]</tool_call>\n\
Please make sure the type of the arguments is correct.",
    );
    if for_eval {
        s.push_str(
            "\nIf none of the functions can be used to answer the question, reply with an empty list of calls: <tool_call>[]</tool_call>",
        );
    }
    s
}

/// Where a raw record came from (for error messages).
#[derive(Clone, Debug)]
pub struct RecordLoc {
    pub file: String,
    /// 1-based line (JSON Lines) or 1-based element index (JSON array).
    pub line: usize,
}

impl RecordLoc {
    pub fn err(&self, msg: impl Into<String>) -> Error {
        Error::Line {
            file: self.file.clone(),
            line: self.line,
            msg: msg.into(),
        }
    }
}

/// Read raw records from a JSON array file or a JSON Lines file. Each item is either the record
/// or a parse error located at its file and line. For a JSON array, the "line" is the 1-based
/// element index (the error says so).
pub fn read_records(path: &Path) -> Result<Vec<(RecordLoc, Result<Value>)>> {
    let text = crate::safefs::read_to_string(path)?;
    let file = path.display().to_string();
    let trimmed = text.trim_start_matches('\u{feff}').trim_start();
    let mut out = Vec::new();
    if trimmed.starts_with('[') {
        let v: Value = serde_json::from_str(trimmed).map_err(|e| Error::Line {
            file: file.clone(),
            line: e.line(),
            msg: format!("invalid JSON array: {e}"),
        })?;
        if let Value::Array(items) = v {
            for (i, item) in items.into_iter().enumerate() {
                let loc = RecordLoc {
                    file: file.clone(),
                    line: i + 1,
                };
                let r = if item.is_object() {
                    Ok(item)
                } else {
                    Err(loc.err(format!("array element {} is not a JSON object", i + 1)))
                };
                out.push((loc, r));
            }
        }
        return Ok(out);
    }
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let loc = RecordLoc {
            file: file.clone(),
            line: i + 1,
        };
        let r = match serde_json::from_str::<Value>(line) {
            Ok(v @ Value::Object(_)) => Ok(v),
            Ok(_) => Err(loc.err("expected a JSON object")),
            Err(e) => Err(loc.err(format!("invalid JSON: {e}"))),
        };
        out.push((loc, r));
    }
    Ok(out)
}

/// A field that is either JSON already or a string holding JSON (xLAM stores `tools` and
/// `answers` as strings).
fn json_field(rec: &Value, field: &str, loc: &RecordLoc) -> Result<Value> {
    match rec.get(field) {
        None => Err(loc.err(format!("missing field `{field}`"))),
        Some(Value::String(s)) => serde_json::from_str(s)
            .map_err(|e| loc.err(format!("field `{field}`: not a valid JSON string: {e}"))),
        Some(v) => Ok(v.clone()),
    }
}

/// Why a record or a step was not kept.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum DropReason {
    /// The answer names a tool that is not in the tool list.
    UnknownTool,
    /// A ToolACE assistant call could not be parsed.
    UnparseableCall,
    /// Positional arguments in a call (the unified format has only named arguments).
    PositionalArgs,
    /// The answer has no calls.
    NoCalls,
}

impl DropReason {
    pub fn label(&self) -> &'static str {
        match self {
            DropReason::UnknownTool => "answer names an unknown tool",
            DropReason::UnparseableCall => "assistant call cannot be parsed",
            DropReason::PositionalArgs => "call uses positional arguments",
            DropReason::NoCalls => "answer has no calls",
        }
    }
}

/// The outcome of converting one raw record: zero or more samples and the steps dropped.
#[derive(Clone, Debug, Default)]
pub struct Converted {
    pub samples: Vec<Sample>,
    pub dropped: Vec<DropReason>,
}

fn tool_names(tools: &[Value]) -> Vec<String> {
    tools
        .iter()
        .filter_map(|t| t.get("name").and_then(|n| n.as_str()).map(str::to_string))
        .collect()
}

fn normalize_calls(calls: &Value, loc: &RecordLoc, field: &str) -> Result<Vec<Value>> {
    let list = match calls {
        Value::Array(a) => a.clone(),
        Value::Object(_) => vec![calls.clone()],
        _ => return Err(loc.err(format!("field `{field}`: expected a list of calls"))),
    };
    let mut out = Vec::with_capacity(list.len());
    for (i, c) in list.iter().enumerate() {
        let name = c
            .get("name")
            .and_then(|n| n.as_str())
            .ok_or_else(|| loc.err(format!("field `{field}`: call {i} has no string `name`")))?;
        let args = match c.get("arguments") {
            Some(Value::String(s)) => serde_json::from_str(s).map_err(|e| {
                loc.err(format!(
                    "field `{field}`: call {i} `arguments` string is not JSON: {e}"
                ))
            })?,
            Some(a @ Value::Object(_)) => a.clone(),
            Some(_) => {
                return Err(loc.err(format!(
                    "field `{field}`: call {i} `arguments` must be an object"
                )))
            }
            None => Value::Object(Default::default()),
        };
        let mut m = serde_json::Map::new();
        m.insert("name".into(), Value::String(name.into()));
        m.insert("arguments".into(), args);
        out.push(Value::Object(m));
    }
    Ok(out)
}

/// Convert one xLAM record (`query`, `tools`, `answers`; `tools`/`answers` may be JSON strings).
/// `index` (0-based record number) makes the id when the record has no `id`.
pub fn convert_xlam(
    rec: &Value,
    loc: &RecordLoc,
    index: usize,
    base_system: &str,
) -> Result<Converted> {
    let query = rec
        .get("query")
        .and_then(|q| q.as_str())
        .ok_or_else(|| loc.err("missing string field `query`"))?;
    let tools = match json_field(rec, "tools", loc)? {
        Value::Array(a) => a,
        _ => return Err(loc.err("field `tools`: expected a list of tool schemas")),
    };
    for (i, t) in tools.iter().enumerate() {
        if t.get("name").and_then(|n| n.as_str()).is_none() {
            return Err(loc.err(format!("field `tools`: tool {i} has no string `name`")));
        }
    }
    let answers = normalize_calls(&json_field(rec, "answers", loc)?, loc, "answers")?;
    let mut conv = Converted::default();
    let names = tool_names(&tools);
    if answers.is_empty() {
        conv.dropped.push(DropReason::NoCalls);
        return Ok(conv);
    }
    if answers
        .iter()
        .any(|a| !names.iter().any(|n| Some(n.as_str()) == a["name"].as_str()))
    {
        conv.dropped.push(DropReason::UnknownTool);
        return Ok(conv);
    }
    let id = match rec.get("id") {
        Some(Value::String(s)) => format!("xlam-{s}"),
        Some(Value::Number(n)) => format!("xlam-{n}"),
        _ => format!("xlam-{index}"),
    };
    conv.samples.push(Sample {
        id,
        source: "xlam".into(),
        messages: vec![
            Message {
                role: "system".into(),
                content: tooln1_system_prompt(base_system, &tools, false),
            },
            Message {
                role: "user".into(),
                content: query.to_string(),
            },
        ],
        tools,
        ground_truth: Value::Array(answers),
    });
    Ok(conv)
}

/// Marker before the tool list in ToolACE's system text.
const TOOLACE_TOOLS_MARKER: &str = "in JSON format that you can invoke";
/// Marker after the tool list.
const TOOLACE_TOOLS_END: &str = "Should you decide to return the function call";

/// Split ToolACE's system text into (preamble before the tool list, tool list).
pub fn toolace_tools(system: &str) -> std::result::Result<(String, Vec<Value>), String> {
    let m = system
        .find(TOOLACE_TOOLS_MARKER)
        .ok_or_else(|| format!("system text has no \"...{TOOLACE_TOOLS_MARKER}\" marker"))?;
    let after = &system[m + TOOLACE_TOOLS_MARKER.len()..];
    let start = after
        .find('[')
        .ok_or_else(|| "no JSON tool list after the marker".to_string())?;
    let end_limit = after.find(TOOLACE_TOOLS_END).unwrap_or(after.len());
    if start > end_limit {
        return Err("no JSON tool list before \"Should you decide...\"".into());
    }
    let mut de = serde_json::Deserializer::from_str(&after[start..]).into_iter::<Value>();
    let tools = match de.next() {
        Some(Ok(Value::Array(a))) => a,
        Some(Ok(_)) => return Err("tool list is not a JSON array".into()),
        Some(Err(e)) => return Err(format!("tool list is not valid JSON: {e}")),
        None => return Err("empty tool list".into()),
    };
    // Preamble: the text before the sentence holding the marker.
    let pre = &system[..m];
    let cut = pre.rfind(['\n', '.']).map(|i| i + 1).unwrap_or(0);
    Ok((pre[..cut].trim().to_string(), tools))
}

/// Is `name` a dotted Python identifier (so that the call parser can read it as written)?
fn is_dotted_ident(name: &str) -> bool {
    !name.is_empty()
        && name.split('.').all(|part| {
            let mut cs = part.chars();
            cs.next().is_some_and(|c| c == '_' || c.is_alphabetic())
                && cs.all(|c| c == '_' || c.is_alphanumeric())
        })
}

/// Parse a ToolACE assistant value as Python calls into `[{name, arguments}]`. ToolACE tool names
/// may contain spaces or other characters (`Market Trends API(...)`); occurrences of such a
/// known `tool_names` entry directly followed by `(` are read as that name.
pub fn parse_toolace_calls(
    text: &str,
    tool_names: &[String],
) -> std::result::Result<Vec<Value>, DropReason> {
    let mut src = text.trim().to_string();
    let mut aliases: Vec<(String, String)> = Vec::new();
    let mut odd: Vec<&String> = tool_names.iter().filter(|n| !is_dotted_ident(n)).collect();
    odd.sort_by_key(|n| std::cmp::Reverse(n.len())); // longest first, so no name eats another
    for (i, name) in odd.into_iter().enumerate() {
        let pat = format!("{name}(");
        if src.contains(&pat) {
            let alias = format!("__tooln1_tool_{i}");
            src = src.replace(&pat, &format!("{alias}("));
            aliases.push((alias, name.clone()));
        }
    }
    let calls = pycall::parse_calls(&src, ParseOptions::default())
        .map_err(|_| DropReason::UnparseableCall)?;
    let mut out = Vec::with_capacity(calls.len());
    for c in calls {
        if !c.args.is_empty() {
            return Err(DropReason::PositionalArgs);
        }
        let mut args = serde_json::Map::new();
        for (k, v) in c.kwargs {
            args.insert(k, v.to_json().map_err(|_| DropReason::UnparseableCall)?);
        }
        let name = aliases
            .iter()
            .find(|(a, _)| *a == c.name)
            .map(|(_, n)| n.clone())
            .unwrap_or(c.name);
        let mut m = serde_json::Map::new();
        m.insert("name".into(), Value::String(name));
        m.insert("arguments".into(), Value::Object(args));
        out.push(Value::Object(m));
    }
    Ok(out)
}

/// Does an assistant turn look like a call list (rather than a plain-text reply)?
fn looks_like_calls(text: &str) -> bool {
    let t = text.trim();
    t.starts_with('[') && t.ends_with(']') && t.contains('(')
}

/// Convert one ToolACE record: one sample per assistant call step, with the preceding turns as
/// context (earlier calls become assistant messages holding the JSON of the calls, tool outputs
/// become `tool` messages). `base_system` overrides ToolACE's own preamble when `Some`.
pub fn convert_toolace(
    rec: &Value,
    loc: &RecordLoc,
    index: usize,
    base_system: Option<&str>,
) -> Result<Converted> {
    let system = rec
        .get("system")
        .and_then(|s| s.as_str())
        .ok_or_else(|| loc.err("missing string field `system`"))?;
    let (preamble, tools) =
        toolace_tools(system).map_err(|e| loc.err(format!("field `system`: {e}")))?;
    let base = base_system.unwrap_or(&preamble);
    let convs = rec
        .get("conversations")
        .and_then(|c| c.as_array())
        .ok_or_else(|| loc.err("missing list field `conversations`"))?;
    let names = tool_names(&tools);
    let sys = Message {
        role: "system".into(),
        content: tooln1_system_prompt(base, &tools, false),
    };
    let mut ctx = vec![sys];
    let mut conv = Converted::default();
    let mut step = 0usize;
    for (t, turn) in convs.iter().enumerate() {
        let from = turn
            .get("from")
            .and_then(|f| f.as_str())
            .ok_or_else(|| loc.err(format!("conversations[{t}]: missing string `from`")))?;
        let value = match turn.get("value") {
            Some(Value::String(s)) => s.clone(),
            Some(v) => py_json(v),
            None => return Err(loc.err(format!("conversations[{t}]: missing `value`"))),
        };
        match from {
            "user" | "human" => ctx.push(Message {
                role: "user".into(),
                content: value,
            }),
            "tool" | "function" | "observation" => ctx.push(Message {
                role: "tool".into(),
                content: value,
            }),
            "assistant" | "gpt" => {
                if !looks_like_calls(&value) {
                    ctx.push(Message {
                        role: "assistant".into(),
                        content: value,
                    });
                    continue;
                }
                let this_step = step;
                step += 1;
                let calls = match parse_toolace_calls(&value, &names) {
                    Ok(c) => c,
                    Err(r) => {
                        conv.dropped.push(r);
                        // keep the raw text as context for later steps
                        ctx.push(Message {
                            role: "assistant".into(),
                            content: value,
                        });
                        continue;
                    }
                };
                let calls_json = Value::Array(calls.clone());
                if calls.is_empty() {
                    conv.dropped.push(DropReason::NoCalls);
                } else if calls
                    .iter()
                    .any(|c| !names.iter().any(|n| Some(n.as_str()) == c["name"].as_str()))
                {
                    conv.dropped.push(DropReason::UnknownTool);
                } else {
                    conv.samples.push(Sample {
                        id: format!("toolace-{index}-{this_step}"),
                        source: "toolace".into(),
                        messages: ctx.clone(),
                        tools: tools.clone(),
                        ground_truth: calls_json.clone(),
                    });
                }
                ctx.push(Message {
                    role: "assistant".into(),
                    content: py_json(&calls_json),
                });
            }
            "system" => {}
            other => {
                return Err(loc.err(format!(
                "conversations[{t}]: unknown speaker `{other}` (expected user, assistant or tool)"
            )))
            }
        }
    }
    Ok(conv)
}

/// Raw data formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Xlam,
    ToolAce,
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::Xlam => "xlam",
            Source::ToolAce => "toolace",
        }
    }
}

/// Per-source counts printed by `data prepare`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SourceStats {
    /// Raw records read (including bad ones).
    pub read: usize,
    /// Samples kept.
    pub kept: usize,
    /// Steps or records dropped, by reason.
    pub dropped: BTreeMap<String, usize>,
    /// Bad records skipped with `skip_bad`.
    pub bad: usize,
    /// The messages of the first few bad records skipped.
    pub bad_examples: Vec<String>,
}

/// Options for [`prepare`].
#[derive(Clone, Debug)]
pub struct PrepareOptions {
    pub seed: u64,
    /// Fraction of samples that go to the test split.
    pub test_fraction: f64,
    /// Base system text for sources without one (and for all sources with `override_system`).
    pub base_system: String,
    /// Use `base_system` also for ToolACE instead of its own preamble.
    pub override_system: bool,
    /// Skip and count bad records instead of failing.
    pub skip_bad: bool,
}

impl Default for PrepareOptions {
    fn default() -> Self {
        PrepareOptions {
            seed: 42,
            test_fraction: 0.1,
            base_system: DEFAULT_BASE_SYSTEM.into(),
            override_system: false,
            skip_bad: false,
        }
    }
}

/// The result of [`prepare`].
#[derive(Clone, Debug, Default)]
pub struct Prepared {
    pub train: Vec<Sample>,
    pub test: Vec<Sample>,
    pub stats: BTreeMap<&'static str, SourceStats>,
}

/// Read and convert every input file, then shuffle (seeded) and split train/test.
pub fn prepare(inputs: &[(Source, PathBuf)], opts: &PrepareOptions) -> Result<Prepared> {
    let mut all = Vec::new();
    let mut stats: BTreeMap<&'static str, SourceStats> = BTreeMap::new();
    for (src, path) in inputs {
        let st = stats.entry(src.name()).or_default();
        let records = read_records(path)?;
        for (i, (loc, rec)) in records.into_iter().enumerate() {
            st.read += 1;
            let conv = rec.and_then(|rec| match src {
                Source::Xlam => convert_xlam(&rec, &loc, i, &opts.base_system),
                Source::ToolAce => convert_toolace(
                    &rec,
                    &loc,
                    i,
                    opts.override_system.then_some(opts.base_system.as_str()),
                ),
            });
            match conv {
                Ok(c) => {
                    st.kept += c.samples.len();
                    for d in c.dropped {
                        *st.dropped.entry(d.label().to_string()).or_insert(0) += 1;
                    }
                    all.extend(c.samples);
                }
                Err(e) if opts.skip_bad => {
                    st.bad += 1;
                    if st.bad_examples.len() < 5 {
                        st.bad_examples.push(e.to_string());
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }
    let (train, test) = split_train_test(all, opts.test_fraction, opts.seed);
    Ok(Prepared { train, test, stats })
}

/// Shuffle with a seeded ChaCha8 generator and split: the first `round(n * test_fraction)`
/// samples go to test.
pub fn split_train_test(
    mut samples: Vec<Sample>,
    test_fraction: f64,
    seed: u64,
) -> (Vec<Sample>, Vec<Sample>) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    samples.shuffle(&mut rng);
    let frac = test_fraction.clamp(0.0, 1.0);
    let n_test = ((samples.len() as f64) * frac).round() as usize;
    let train = samples.split_off(n_test.min(samples.len()));
    (train, samples)
}

/// Write samples as JSON Lines, write-then-rename (see [`write_jsonl_all`]).
pub fn write_jsonl<T: Serialize>(path: &Path, items: &[T]) -> Result<()> {
    write_jsonl_all(&[(path, items)])
}

/// Write several JSON Lines files as one commit: each target is checked first (an existing one
/// must be a regular file), every file is written in full to a temporary beside its target,
/// and only when all are written are they renamed into place. A failure before the renames
/// (a bad target, a full disk) removes the temporaries and leaves every target as it was, so
/// a new train file never sits beside an old test file.
pub fn write_jsonl_all<T: Serialize>(files: &[(&Path, &[T])]) -> Result<()> {
    for (path, _) in files {
        if let Ok(m) = std::fs::symlink_metadata(path) {
            if !m.is_file() {
                return Err(Error::msg(format!(
                    "{}: exists and is not a regular file; nothing was written",
                    path.display()
                )));
            }
        }
    }
    let mut tmps: Vec<PathBuf> = Vec::new();
    let written = files.iter().try_for_each(|(path, items)| {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
        tmps.push(tmp.clone());
        write_jsonl_to(&tmp, path, items)
    });
    if let Err(e) = written {
        for t in &tmps {
            let _ = std::fs::remove_file(t);
        }
        return Err(e);
    }
    for ((path, _), tmp) in files.iter().zip(&tmps) {
        std::fs::rename(tmp, path).map_err(|e| Error::io(path, e))?;
    }
    Ok(())
}

fn write_jsonl_to<T: Serialize>(tmp: &Path, path: &Path, items: &[T]) -> Result<()> {
    let f = std::fs::File::create(tmp).map_err(|e| Error::io(tmp, e))?;
    let mut w = std::io::BufWriter::new(f);
    for it in items {
        let line = serde_json::to_string(it)
            .map_err(|e| Error::msg(format!("{}: {e}", path.display())))?;
        writeln!(w, "{line}").map_err(|e| Error::io(tmp, e))?;
    }
    let f = w.into_inner().map_err(|e| Error::io(tmp, e.into_error()))?;
    f.sync_all().map_err(|e| Error::io(tmp, e))
}

/// Read a JSON Lines file into `T`s, skipping blank lines; a bad line is an error naming the
/// file, the 1-based line and `what` was expected there.
pub fn read_jsonl<T: serde::de::DeserializeOwned>(path: &Path, what: &str) -> Result<Vec<T>> {
    let text = crate::safefs::read_to_string(path)?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        out.push(serde_json::from_str(line).map_err(|e| Error::Line {
            file: path.display().to_string(),
            line: i + 1,
            msg: format!("not {what}: {e}"),
        })?);
    }
    Ok(out)
}

/// Read prepared samples back (one `Sample` per line); an empty file is an error.
pub fn read_samples(path: &Path) -> Result<Vec<Sample>> {
    let out: Vec<Sample> =
        read_jsonl(path, "a sample {id, source, messages, tools, ground_truth}")?;
    if out.is_empty() {
        return Err(Error::msg(format!("{}: no samples", path.display())));
    }
    Ok(out)
}
