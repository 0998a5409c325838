//! Reading BFCL data: the test records of a category with their possible answers, and files of
//! model outputs.

use super::{Category, Record};
use crate::data::Message;
use crate::{Error, Result};
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;

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
