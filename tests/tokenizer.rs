//! Tokenizer and chat template against the real Qwen2.5 files and transformers' outputs stored
//! in tests/fixtures/golden/chat_templates.json by tools/make_fixtures.py.

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use tooln1::data::Message;
use tooln1::tokenizer::{self, ChatTemplate, PyJsonOpts, RenderInput, Tokenizer};

fn fixture(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(p)
}

fn qwen() -> Tokenizer {
    Tokenizer::from_file(&fixture("qwen2.5/tokenizer.json")).unwrap()
}

fn golden() -> Value {
    let text = std::fs::read_to_string(fixture("golden/chat_templates.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// First differing byte, for readable failures.
fn first_diff(a: &str, b: &str) -> String {
    let n = a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count();
    let lo = n.saturating_sub(40);
    format!(
        "first difference at byte {n}:\n ours: {:?}\n want: {:?}",
        String::from_utf8_lossy(&a.as_bytes()[lo..(n + 40).min(a.len())]),
        String::from_utf8_lossy(&b.as_bytes()[lo..(n + 40).min(b.len())])
    )
}

#[test]
fn hello_world_and_special_ids() {
    let t = qwen();
    let g = golden();
    assert_eq!(t.encode("Hello world").unwrap(), vec![9707, 1879]);
    assert_eq!(t.encode("Hello world").unwrap(), ids(&g["hello_world"]));
    assert_eq!(t.token_id("<|endoftext|>"), Some(tokenizer::ENDOFTEXT));
    assert_eq!(t.token_id("<|im_start|>"), Some(tokenizer::IM_START));
    assert_eq!(t.token_id("<|im_end|>"), Some(tokenizer::IM_END));
    assert_eq!(t.token_id("<tool_call>"), Some(tokenizer::TOOL_CALL_START));
    assert_eq!(t.token_id("</tool_call>"), Some(tokenizer::TOOL_CALL_END));
    assert_eq!(t.vocab_size(), 151_665);
    assert!(t.require_token("<|no_such_token|>").is_err());
    // Special tokens written in text map to their ids.
    assert_eq!(
        t.encode("<|im_start|>user\nhi<|im_end|>").unwrap(),
        vec![tokenizer::IM_START, 872, 198, 6023, tokenizer::IM_END]
    );
}

#[test]
fn decode_round_trip() {
    let t = qwen();
    let texts = [
        "Hello world",
        "<|im_start|>assistant\n<think>ok</think> <tool_call>[{\"name\": \"f\", \"arguments\": {}}]</tool_call><|im_end|>",
        "Zürich 😀 日本語 — «quotes»\n\ttabs  and   spaces",
        "",
    ];
    for text in texts {
        let ids = t.encode(text).unwrap();
        assert_eq!(t.decode(&ids, false).unwrap(), text);
    }
    // Skipping special tokens keeps <tool_call> (an added, non-special token).
    let ids = t
        .encode("<|im_start|>x<tool_call>y</tool_call><|im_end|>")
        .unwrap();
    assert_eq!(t.decode(&ids, true).unwrap(), "x<tool_call>y</tool_call>");
}

#[test]
fn renders_match_transformers_byte_for_byte() {
    let t = qwen();
    let tpl =
        ChatTemplate::from_tokenizer_config(&fixture("qwen2.5/tokenizer_config.json")).unwrap();
    let g = golden();
    let renders = g["renders"].as_array().unwrap();
    assert!(renders.len() >= 6);
    for case in renders {
        let name = case["name"].as_str().unwrap();
        let messages = case["messages"].as_array().unwrap();
        let tools = case["tools"].as_array().map(|a| a.as_slice());
        let add = case["add_generation_prompt"].as_bool().unwrap();
        let got = tpl.render_json(messages, tools, add).unwrap();
        let want = case["expected"].as_str().unwrap();
        assert!(got == want, "{name}: {}", first_diff(&got, want));
        assert_eq!(
            t.encode(&got).unwrap(),
            ids(&case["ids"]),
            "{name}: token ids"
        );
    }
}

#[test]
fn message_api_renders_like_json_messages() {
    let tpl = ChatTemplate::qwen25();
    let g = golden();
    let case = &g["renders"][0];
    let messages: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
    let got = tpl.render(&messages, None, true).unwrap();
    assert_eq!(got, case["expected"].as_str().unwrap());

    // Tool calls through the typed message.
    let case = &g["renders"][4];
    let msgs: Vec<tokenizer::ChatMessage> =
        serde_json::from_value(case["messages"].clone()).unwrap();
    assert!(msgs[2].tool_calls.is_some());
    let got = tpl.render_chat(&msgs, None, true).unwrap();
    assert_eq!(got, case["expected"].as_str().unwrap());
}

#[test]
fn builtin_template_is_the_qwen25_one() {
    let from_file =
        ChatTemplate::from_tokenizer_config(&fixture("qwen2.5/tokenizer_config.json")).unwrap();
    assert_eq!(from_file.source, ChatTemplate::qwen25().source);
    // A config without chat_template falls back to it.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tokenizer_config.json");
    std::fs::write(&p, r#"{"eos_token": "<|im_end|>"}"#).unwrap();
    assert_eq!(
        ChatTemplate::from_tokenizer_config(&p).unwrap().source,
        tokenizer::QWEN25_CHAT_TEMPLATE
    );
    // ... unless a chat_template.jinja sits beside it (transformers 5 layout).
    std::fs::write(
        dir.path().join("chat_template.jinja"),
        "J{{ messages|length }}",
    )
    .unwrap();
    let t = ChatTemplate::from_tokenizer_config(&p).unwrap();
    assert_eq!(t.source, "J{{ messages|length }}");
}

#[test]
fn template_list_form_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tokenizer_config.json");
    let cfg = json!({"chat_template": [
        {"name": "tool_use", "template": "T"},
        {"name": "default", "template": "{% for m in messages %}[{{ m.role }}]{% endfor %}"}
    ]});
    std::fs::write(&p, cfg.to_string()).unwrap();
    let t = ChatTemplate::from_tokenizer_config(&p).unwrap();
    let out = t
        .render_json(&[json!({"role": "user", "content": "x"})], None, false)
        .unwrap();
    assert_eq!(out, "[user]");

    std::fs::write(
        &p,
        json!({"chat_template": [{"name": "x", "template": "T"}]}).to_string(),
    )
    .unwrap();
    let e = ChatTemplate::from_tokenizer_config(&p)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("chat_template") && e.contains("default"), "{e}");

    std::fs::write(&p, json!({"chat_template": 5}).to_string()).unwrap();
    let e = ChatTemplate::from_tokenizer_config(&p)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("tokenizer_config.json") && e.contains("chat_template"),
        "{e}"
    );

    std::fs::write(&p, json!({"chat_template": "{% if %}"}).to_string()).unwrap();
    assert!(ChatTemplate::from_tokenizer_config(&p).is_err());

    std::fs::write(&p, "{not json").unwrap();
    let e = ChatTemplate::from_tokenizer_config(&p)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("not valid JSON"), "{e}");

    let e = Tokenizer::from_file(&dir.path().join("missing.json"))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("missing.json"), "{e}");
}

#[test]
fn raise_exception_loop_controls_and_python_methods() {
    let t = ChatTemplate::new(
        "{% if messages[0].role != 'user' %}{{ raise_exception('first message must be user') }}\
         {% endif %}{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}\
         {{ m.content.strip().upper() }}|{{ m.content.startswith(' a') }}|{% endfor %}",
    )
    .unwrap();
    let msgs = [
        json!({"role": "user", "content": " ab "}),
        json!({"role": "assistant", "content": "cd"}),
        json!({"role": "user", "content": "ef"}),
    ];
    assert_eq!(
        t.render_json(&msgs, None, false).unwrap(),
        "AB|True|CD|False|"
    );
    let e = t
        .render_json(&[json!({"role": "system", "content": "s"})], None, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("first message must be user"), "{e}");
    // A message without a role is refused with its index.
    let e = t
        .render_json(&[json!({"content": "s"})], None, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("message 0"), "{e}");
    // Extra variables reach the template.
    let t = ChatTemplate::new("{{ bos_token }}{{ messages|length }}").unwrap();
    let mut input = RenderInput {
        messages: msgs.to_vec(),
        ..Default::default()
    };
    input.extra.insert("bos_token".into(), json!("<s>"));
    assert_eq!(t.render_input(&input).unwrap(), "<s>3");
}

#[test]
fn tojson_matches_python_json_dumps() {
    let g = golden();
    let cases = g["tojson"].as_array().unwrap();
    assert!(cases.len() > 20);
    let plain = ChatTemplate::new("{{ messages[0].value | tojson }}").unwrap();
    let ind = ChatTemplate::new("{{ messages[0].value | tojson(indent=2) }}").unwrap();
    let sorted = ChatTemplate::new("{{ messages[0].value | tojson(sort_keys=true) }}").unwrap();
    for (i, c) in cases.iter().enumerate() {
        let want = c["expected"].as_str().unwrap();
        let value = &c["value"];
        let tpl = if c.get("sort_keys").is_some() {
            &sorted
        } else if c["indent"].is_null() {
            &plain
        } else {
            &ind
        };
        let msg = json!({"role": "user", "value": value});
        let got = tpl.render_json(&[msg], None, false).unwrap();
        assert!(got == want, "case {i}: {}", first_diff(&got, want));
        // The library function agrees on the same inputs.
        let opts = PyJsonOpts {
            indent: c["indent"].as_u64().map(|n| " ".repeat(n as usize)),
            item_sep: if c["indent"].is_null() { ", " } else { "," }.into(),
            sort_keys: c.get("sort_keys").is_some(),
            ..Default::default()
        };
        assert_eq!(tokenizer::py_json_dumps(value, &opts), want, "case {i}");
    }
    // Custom separators and ensure_ascii.
    let t = ChatTemplate::new(
        "{{ messages[0].value | tojson(separators=(',', ':')) }} {{ messages[0].value | tojson(ensure_ascii=true) }}",
    )
    .unwrap();
    let msg = json!({"role": "u", "value": {"a": [1, 2.0], "é": "日"}});
    assert_eq!(
        t.render_json(&[msg], None, false).unwrap(),
        "{\"a\":[1,2.0],\"é\":\"日\"} {\"a\": [1, 2.0], \"\\u00e9\": \"\\u65e5\"}"
    );
}

#[test]
fn fixture_bpe_tokenizer_has_the_chat_tokens() {
    let t = Tokenizer::from_file(&fixture("golden/tokenizer/tokenizer.json")).unwrap();
    for tok in [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<tool_call>",
        "</tool_call>",
    ] {
        assert!(t.token_id(tok).is_some(), "{tok}");
    }
    let text = "<|im_start|>user\nWeather in Paris?<|im_end|>\n<tool_call>{}</tool_call>";
    let ids = t.encode(text).unwrap();
    assert!(ids.iter().all(|&i| (i as usize) < t.vocab_size()));
    assert_eq!(t.decode(&ids, false).unwrap(), text);
}

#[test]
fn special_tokens_reach_the_template() {
    let toks =
        tokenizer::special_tokens_from_config(&fixture("qwen2.5/tokenizer_config.json")).unwrap();
    assert_eq!(toks["eos_token"], json!("<|im_end|>"));
    assert_eq!(toks["pad_token"], json!("<|endoftext|>"));
    assert!(!toks.contains_key("bos_token"), "null bos is left out");
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tokenizer_config.json");
    std::fs::write(&p, r#"{"bos_token": {"content": "<s>", "lstrip": false}}"#).unwrap();
    let toks = tokenizer::special_tokens_from_config(&p).unwrap();
    let t = ChatTemplate::new("{{ bos_token }}{{ strftime_now('%Y')|length }}").unwrap();
    let input = RenderInput {
        messages: vec![json!({"role": "user", "content": "x"})],
        extra: toks,
        ..Default::default()
    };
    assert_eq!(t.render_input(&input).unwrap(), "<s>4");
    std::fs::write(&p, r#"{"eos_token": 5}"#).unwrap();
    let e = tokenizer::special_tokens_from_config(&p)
        .unwrap_err()
        .to_string();
    assert!(e.contains("eos_token"), "{e}");
}
