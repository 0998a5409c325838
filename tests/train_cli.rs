//! `tooln1 sft` and `tooln1 train` end to end on a tiny model folder and prepared JSONL data:
//! resolved config and memory estimate printed, metrics and checkpoints written, the trained
//! folder usable as the next command's model; bad input is an error naming what is wrong.

use std::path::{Path, PathBuf};
use std::process::Command;
use tooln1::model::init;
use tooln1::model::weights::{save_params, SaveOptions};

fn fixture(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(p)
}

fn tooln1(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tooln1"))
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn setup(dir: &Path) -> (PathBuf, PathBuf) {
    let model = dir.join("model");
    let src = fixture("golden/tokenizer");
    let tok = tooln1::tokenizer::Tokenizer::from_dir(&src).unwrap();
    let vocab = tok.inner.get_vocab_size(true).div_ceil(64) * 64;
    let mut cfg = init::tiny_config(32, 2, 4, 2, 48, vocab, true);
    cfg.eos_token_id = vec![tok.token_id("<|im_end|>").unwrap()];
    let host = init::random_params(&cfg, 3);
    let opts = SaveOptions {
        dtype: tooln1::backend::DType::F32,
        source_dir: Some(src),
        ..SaveOptions::default()
    };
    save_params(&model, &cfg, &host, &opts).unwrap();
    let data = dir.join("train.jsonl");
    let mut lines = String::new();
    for (i, city) in ["Paris", "Lima", "Oslo", "Rome"].iter().enumerate() {
        let s = serde_json::json!({
            "id": format!("s{i}"), "source": "test",
            "messages": [{"role": "system", "content": "You call tools."},
                         {"role": "user", "content": format!("weather in {city}")}],
            "tools": [{"name": "get_weather", "description": "w", "parameters": {}}],
            "ground_truth": [{"name": "get_weather", "arguments": {"city": city}}]
        });
        lines.push_str(&s.to_string());
        lines.push('\n');
    }
    std::fs::write(&data, lines).unwrap();
    (model, data)
}

#[test]
fn sft_then_grpo_from_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = setup(tmp.path());
    let (m, d) = (model.to_str().unwrap(), data.to_str().unwrap());
    let sft_out = tmp.path().join("sft");
    let (ok, text) = tooln1(&[
        "sft",
        "--model",
        m,
        "--data",
        d,
        "--out",
        sft_out.to_str().unwrap(),
        "--device",
        "cpu",
        "--steps",
        "2",
        "--quiet",
        "--set",
        "batch_size=2",
        "--set",
        "optim.warmup_steps=0",
    ]);
    assert!(ok, "{text}");
    assert!(text.contains("resolved SFT config"), "{text}");
    let sft_model = sft_out.join("checkpoints/step-00000002/model");
    assert!(sft_model.join("config.json").exists(), "{text}");
    assert!(sft_model.join("tokenizer.json").exists(), "{text}");

    // GRPO from the SFT model (SFT-then-RL).
    let out = tmp.path().join("grpo");
    let (ok, text) = tooln1(&[
        "train",
        "--model",
        sft_model.to_str().unwrap(),
        "--data",
        d,
        "--out",
        out.to_str().unwrap(),
        "--device",
        "cpu",
        "--steps",
        "2",
        "--quiet",
        "--set",
        "grpo.prompts_per_step=2",
        "--set",
        "grpo.mini_batch_prompts=1",
        "--set",
        "rollout.n=2",
        "--set",
        "rollout.max_new_tokens=4",
        "--set",
        "save_every=1",
    ]);
    assert!(ok, "{text}");
    assert!(text.contains("resolved training config"), "{text}");
    assert!(text.contains("memory estimate"), "{text}");
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 2);
    assert!(out.join("checkpoints/step-00000002/trainer.json").exists());

    // Resume to step 3 from the run folder.
    let (ok, text) = tooln1(&[
        "train",
        "--resume",
        out.to_str().unwrap(),
        "--steps",
        "3",
        "--quiet",
    ]);
    assert!(ok, "{text}");
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 3, "{metrics}");
    assert!(out.join("checkpoints/step-00000003/trainer.json").exists());
}

#[test]
fn bad_input_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = setup(tmp.path());
    let (m, d) = (model.to_str().unwrap(), data.to_str().unwrap());
    let (ok, text) = tooln1(&["train", "--model", m, "--data", d, "--set", "grpo.kl_cof=1"]);
    assert!(!ok);
    assert!(text.contains("kl_cof"), "{text}");
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"id\": 1}\n").unwrap();
    let (ok, text) = tooln1(&[
        "train",
        "--model",
        m,
        "--data",
        bad.to_str().unwrap(),
        "--device",
        "cpu",
        "--out",
        tmp.path().join("o").to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(text.contains("bad.jsonl:1"), "{text}");
    let (ok, text) = tooln1(&["train", "--model", m]);
    assert!(!ok);
    assert!(text.contains("--data"), "{text}");
}

#[test]
fn eval_run_generates_and_scores() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, _) = setup(tmp.path());
    let gens = tmp.path().join("gen/apibank.jsonl");
    let (ok, text) = tooln1(&[
        "eval",
        "apibank",
        "run",
        "--model",
        model.to_str().unwrap(),
        "--data",
        fixture("apibank/level-1-sample.json").to_str().unwrap(),
        "--out",
        gens.to_str().unwrap(),
        "--device",
        "cpu",
        "--max-new-tokens",
        "4",
        "--batch-size",
        "2",
    ]);
    assert!(ok, "{text}");
    assert!(text.contains("API-Bank"), "{text}");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&gens)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["id"], serde_json::json!(i.to_string()));
        assert!(l["output"].is_string());
    }
}
