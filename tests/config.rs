//! Qwen2 config parsing: the real Qwen2.5-7B-Instruct config, transformers 5 configs, saving,
//! and one error test per check, each asserting the message names the file and the field.

use serde_json::{json, Value};
use std::path::Path;
use tooln1::model::{ParamLayout, Qwen2Config};

fn fixture(p: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(p)
}

fn base() -> Value {
    json!({
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 320,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": true,
        "bos_token_id": 0,
        "eos_token_id": [2, 0],
        "torch_dtype": "float32",
        "hidden_act": "silu",
        "sliding_window": 4096,
        "custom_field": {"kept": [1, 2]}
    })
}

/// Parse `v` with one field changed (None removes it) and return the error text.
fn error_with(field: &str, value: Option<Value>) -> String {
    let mut v = base();
    match value {
        Some(x) => {
            v[field] = x;
        }
        None => {
            v.as_object_mut().unwrap().remove(field);
        }
    }
    match Qwen2Config::from_json_str(&v.to_string(), "some/config.json") {
        Ok(c) => panic!("{field}: expected an error, parsed {c:?}"),
        Err(e) => e.to_string(),
    }
}

fn assert_names(msg: &str, field: &str) {
    assert!(
        msg.contains("some/config.json") && msg.contains(&format!("`{field}`")),
        "message should name the file and field `{field}`: {msg}"
    );
}

#[test]
fn real_7b_config_parses() {
    let path = fixture("qwen2.5/config.json");
    let c = Qwen2Config::from_file(&path).unwrap();
    assert_eq!(c.architectures, vec!["Qwen2ForCausalLM".to_string()]);
    assert_eq!(c.hidden_size, 3584);
    assert_eq!(c.intermediate_size, 18944);
    assert_eq!(c.num_hidden_layers, 28);
    assert_eq!(c.num_attention_heads, 28);
    assert_eq!(c.num_key_value_heads, 4);
    assert_eq!(c.head_dim, 128);
    assert_eq!(c.vocab_size, 152064);
    assert_eq!(c.rms_norm_eps, 1e-6);
    assert_eq!(c.rope_theta, 1e6);
    assert_eq!(c.max_position_embeddings, 32768);
    assert!(!c.tie_word_embeddings);
    assert_eq!(c.bos_token_id, Some(151643));
    assert_eq!(c.eos_token_id, vec![151645]);
    assert_eq!(c.torch_dtype, "bfloat16");
    assert_eq!(c.hidden_act, "silu");
    assert_eq!(ParamLayout::new(&c).num_params(), 7_615_616_512);
}

#[test]
fn transformers5_config_with_rope_parameters() {
    // Written by transformers 5 save_pretrained: `dtype` and nested `rope_parameters`.
    for (name, tied, layers) in [("tied", true, 2), ("untied", false, 3)] {
        let c = Qwen2Config::from_file(&fixture(&format!("golden/{name}/config.json"))).unwrap();
        assert_eq!(c.rope_theta, 10000.0, "{name}");
        assert_eq!(c.tie_word_embeddings, tied, "{name}");
        assert_eq!(c.num_hidden_layers, layers, "{name}");
        assert_eq!(c.head_dim, 16, "{name}");
        assert_eq!(c.torch_dtype, "float32", "{name}");
    }
    let mut v = base();
    v.as_object_mut().unwrap().remove("rope_theta");
    v["rope_parameters"] = json!({"rope_theta": 5e5, "rope_type": "default"});
    let c = Qwen2Config::from_json_str(&v.to_string(), "x").unwrap();
    assert_eq!(c.rope_theta, 5e5);
    v["rope_parameters"] = json!({"rope_theta": 5e5, "rope_type": "yarn"});
    let e = Qwen2Config::from_json_str(&v.to_string(), "x")
        .unwrap_err()
        .to_string();
    assert!(e.contains("rope_parameters.rope_type"), "{e}");
}

#[test]
fn eos_int_or_list_and_defaults() {
    let c = Qwen2Config::from_json_str(&base().to_string(), "x").unwrap();
    assert_eq!(c.eos_token_id, vec![2, 0]);
    assert_eq!(c.head_dim, 16);
    let mut v = base();
    v["eos_token_id"] = json!(7);
    v["head_dim"] = json!(32);
    let c = Qwen2Config::from_json_str(&v.to_string(), "x").unwrap();
    assert_eq!(c.eos_token_id, vec![7]);
    assert_eq!(
        c.head_dim, 32,
        "an explicit head_dim wins over hidden/heads"
    );
    // num_key_value_heads defaults to the head count (plain multi-head attention).
    v.as_object_mut().unwrap().remove("num_key_value_heads");
    let c = Qwen2Config::from_json_str(&v.to_string(), "x").unwrap();
    assert_eq!(c.num_key_value_heads, 4);
}

#[test]
fn saving_keeps_unknown_fields_and_round_trips() {
    let v = base();
    let c = Qwen2Config::from_json_value(&v, "x").unwrap();
    let out = c.to_json(Some(&v));
    assert_eq!(out["sliding_window"], json!(4096));
    assert_eq!(out["custom_field"], json!({"kept": [1, 2]}));
    assert_eq!(out["model_type"], json!("qwen2"));
    assert_eq!(out["eos_token_id"], json!([2, 0]));
    let again = Qwen2Config::from_json_str(&c.to_json_string(Some(&v)), "y").unwrap();
    assert_eq!(again, c);
    // Without a base the output still parses to the same config.
    let bare = Qwen2Config::from_json_value(&c.to_json(None), "z").unwrap();
    assert_eq!(bare, c);
    // A transformers 5 base keeps `rope_parameters` in step with the struct.
    let t5: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("golden/untied/config.json")).unwrap(),
    )
    .unwrap();
    let mut c5 = Qwen2Config::from_json_value(&t5, "t5").unwrap();
    c5.rope_theta = 123.0;
    let out = c5.to_json(Some(&t5));
    assert_eq!(out["rope_parameters"]["rope_theta"], json!(123.0));
    assert_eq!(out["layer_types"], t5["layer_types"]);
    assert_eq!(Qwen2Config::from_json_value(&out, "t5").unwrap(), c5);
}

#[test]
fn unknown_architecture_or_model_type() {
    let m = error_with("architectures", Some(json!(["LlamaForCausalLM"])));
    assert_names(&m, "architectures");
    assert!(m.contains("LlamaForCausalLM"), "{m}");
    let m = error_with("model_type", Some(json!("llama")));
    assert_names(&m, "model_type");
    let mut v = base();
    v.as_object_mut().unwrap().remove("architectures");
    v.as_object_mut().unwrap().remove("model_type");
    let e = Qwen2Config::from_json_str(&v.to_string(), "some/config.json").unwrap_err();
    assert_names(&e.to_string(), "model_type");
}

#[test]
fn missing_fields() {
    for field in [
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "vocab_size",
    ] {
        let m = error_with(field, None);
        assert_names(&m, field);
        assert!(m.contains("missing"), "{m}");
    }
}

#[test]
fn wrong_types() {
    let cases = [
        ("num_hidden_layers", json!("28")),
        ("hidden_size", json!(64.5)),
        ("vocab_size", json!(-3)),
        ("rms_norm_eps", json!("1e-6")),
        ("tie_word_embeddings", json!("yes")),
        ("eos_token_id", json!(["a"])),
        ("bos_token_id", json!(1.5)),
        ("torch_dtype", json!(16)),
        ("architectures", json!("Qwen2ForCausalLM")),
    ];
    for (field, value) in cases {
        let m = error_with(field, Some(value));
        assert_names(&m, field);
        assert!(m.contains("expected"), "{m}");
    }
}

#[test]
fn inconsistent_sizes() {
    let m = error_with("hidden_size", Some(json!(66)));
    assert_names(&m, "hidden_size");
    assert!(m.contains("not divisible by num_attention_heads"), "{m}");
    let m = error_with("num_key_value_heads", Some(json!(3)));
    assert_names(&m, "num_attention_heads");
    assert!(m.contains("num_key_value_heads 3"), "{m}");
    for field in [
        "vocab_size",
        "num_attention_heads",
        "intermediate_size",
        "num_hidden_layers",
    ] {
        let m = error_with(field, Some(json!(0)));
        assert_names(&m, field);
        assert!(m.contains("greater than 0"), "{m}");
    }
    // hidden 12 / 4 heads = head_dim 3: odd, no RoPE half split.
    let mut v = base();
    v["hidden_size"] = json!(12);
    let e = Qwen2Config::from_json_str(&v.to_string(), "some/config.json").unwrap_err();
    assert_names(&e.to_string(), "head_dim");
    assert!(e.to_string().contains("odd"), "{e}");
    let m = error_with("head_dim", Some(json!(7)));
    assert_names(&m, "head_dim");
    let m = error_with("rms_norm_eps", Some(json!(0.0)));
    assert_names(&m, "rms_norm_eps");
    let m = error_with("hidden_act", Some(json!("gelu")));
    assert_names(&m, "hidden_act");
    let m = error_with("use_sliding_window", Some(json!(true)));
    assert_names(&m, "use_sliding_window");
}

#[test]
fn bad_json_and_missing_file() {
    let e = Qwen2Config::from_json_str("{\"hidden_size\": ", "some/config.json").unwrap_err();
    assert!(e.to_string().contains("some/config.json"), "{e}");
    let e = Qwen2Config::from_json_str("[1, 2]", "some/config.json").unwrap_err();
    assert!(e.to_string().contains("expected a JSON object"), "{e}");
    let e = Qwen2Config::from_file(Path::new("/nonexistent/dir/config.json")).unwrap_err();
    assert!(
        e.to_string().contains("/nonexistent/dir/config.json"),
        "{e}"
    );
}

#[test]
fn same_model_ignores_only_the_storage_dtype() {
    let a = tooln1::model::init::tiny_config(32, 2, 4, 2, 40, 64, false);
    let mut b = a.clone();
    b.torch_dtype = "bfloat16".into();
    assert!(a.same_model(&b) && b.same_model(&a));
    let mut c = a.clone();
    c.rope_theta = 1e6;
    assert!(!a.same_model(&c));
    let mut d = b.clone();
    d.num_key_value_heads = 1;
    assert!(!a.same_model(&d));
}
