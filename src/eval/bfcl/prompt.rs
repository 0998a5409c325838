//! The Tool-N1 evaluation prompt of a BFCL record, with the function documents rewritten the way
//! BFCL's runner shows them to a model.

use super::{Language, Record};
use crate::data::{tooln1_system_prompt, Message};
use serde::Serialize;
use serde_json::Value;

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
