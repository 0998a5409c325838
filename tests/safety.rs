//! Data safety and bad input through the command line and the library: nothing the tool did
//! not write is deleted, a resumed run writes where it is pointed, diverged or unusable runs
//! stop with a message naming the cause, absurd sizes are errors (never an abort), multi-file
//! outputs commit together, untrusted inputs cannot hang a command, and OS errors print once.

use std::path::{Path, PathBuf};
use std::process::Command;
use tooln1::backend::cpu::Cpu;
use tooln1::model::init;
use tooln1::model::weights::{save_params, SaveOptions};
use tooln1::model::Model;
use tooln1::reward::{Reward, RewardOutput};
use tooln1::train::config::RunConfig;
use tooln1::train::{PromptItem, TrainConfig, Trainer};

fn fixture(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(p)
}

/// Run the binary: (exited with 0, exited normally at all, stdout + stderr).
fn tooln1(args: &[&str]) -> (bool, bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tooln1"))
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), out.status.code().is_some(), text)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A tiny model folder and four training samples with good ground truths.
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
    write_samples(
        &data,
        |city| serde_json::json!([{"name": "get_weather", "arguments": {"city": city}}]),
    );
    (model, data)
}

fn write_samples(path: &Path, gt: impl Fn(&str) -> serde_json::Value) {
    let mut lines = String::new();
    for (i, city) in ["Paris", "Lima", "Oslo", "Rome"].iter().enumerate() {
        let s = serde_json::json!({
            "id": format!("s{i}"), "source": "test",
            "messages": [{"role": "system", "content": "You call tools."},
                         {"role": "user", "content": format!("weather in {city}")}],
            "tools": [{"name": "get_weather", "description": "w", "parameters": {}}],
            "ground_truth": gt(city)
        });
        lines.push_str(&s.to_string());
        lines.push('\n');
    }
    std::fs::write(path, lines).unwrap();
}

/// Flags of a two-step GRPO run that takes well under a second.
const FAST: &[&str] = &[
    "--device",
    "cpu",
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
];

fn train(model: &Path, data: &Path, out: &Path, steps: &str, extra: &[&str]) -> (bool, String) {
    let mut args = vec![
        "train",
        "--model",
        s(model),
        "--data",
        s(data),
        "--out",
        s(out),
        "--steps",
        steps,
    ];
    args.extend_from_slice(FAST);
    args.extend_from_slice(extra);
    let (ok, _, text) = tooln1(&args);
    (ok, text)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}

#[test]
fn init_tiny_never_deletes_files_it_did_not_write() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("d");
    std::fs::create_dir(&d).unwrap();
    std::fs::write(d.join("notes.txt"), "x").unwrap();
    let (ok, _, text) = tooln1(&["init-tiny", s(&d)]);
    assert!(!ok, "{text}");
    assert!(text.contains("not empty"), "{text}");
    assert_eq!(std::fs::read_to_string(d.join("notes.txt")).unwrap(), "x");
    // --force replaces model folders only: a foreign file still refuses it.
    let (ok, _, text) = tooln1(&["init-tiny", s(&d), "--force"]);
    assert!(!ok, "{text}");
    assert!(text.contains("notes.txt"), "{text}");
    assert_eq!(std::fs::read_to_string(d.join("notes.txt")).unwrap(), "x");
    // An empty folder is fine; its own output is replaced only with --force.
    let e = tmp.path().join("e");
    std::fs::create_dir(&e).unwrap();
    let (ok, _, text) = tooln1(&["init-tiny", s(&e)]);
    assert!(ok, "{text}");
    let (ok, _, text) = tooln1(&["init-tiny", s(&e), "--seed", "1"]);
    assert!(!ok, "{text}");
    let (ok, _, text) = tooln1(&["init-tiny", s(&e), "--seed", "1", "--force"]);
    assert!(ok, "{text}");
}

#[test]
fn resume_writes_where_it_is_pointed_and_keeps_later_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = setup(tmp.path());
    let run_a = tmp.path().join("runA");
    let (ok, text) = train(&model, &data, &run_a, "2", &[]);
    assert!(ok, "{text}");
    let metrics_a = std::fs::read_to_string(run_a.join("metrics.jsonl")).unwrap();
    let run_b = tmp.path().join("runB");
    copy_dir(&run_a, &run_b);

    // Resuming the copy writes into the copy, not into the run recorded in its state.
    let (ok, _, text) = tooln1(&["train", "--resume", s(&run_b), "--steps", "3", "--quiet"]);
    assert!(ok, "{text}");
    assert!(run_b
        .join("checkpoints/step-00000003/trainer.json")
        .exists());
    assert!(!run_a.join("checkpoints/step-00000003").exists(), "{text}");
    assert_eq!(
        std::fs::read_to_string(run_a.join("metrics.jsonl")).unwrap(),
        metrics_a
    );
    assert_eq!(
        std::fs::read_to_string(run_b.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .count(),
        3
    );

    // Resuming an older checkpoint would replace step-2 and step-3: refused without the flag.
    let step1 = run_b.join("checkpoints/step-00000001");
    let step3 = run_b.join("checkpoints/step-00000003/trainer.json");
    let before = std::fs::read(&step3).unwrap();
    let (ok, _, text) = tooln1(&["train", "--resume", s(&step1), "--steps", "2", "--quiet"]);
    assert!(!ok, "{text}");
    assert!(text.contains("--discard-later-checkpoints"), "{text}");
    assert_eq!(std::fs::read(&step3).unwrap(), before);
    // Into another folder it is fine, and with the flag the later ones go.
    let fork = tmp.path().join("fork");
    let (ok, _, text) = tooln1(&[
        "train",
        "--resume",
        s(&step1),
        "--out",
        s(&fork),
        "--steps",
        "2",
        "--quiet",
    ]);
    assert!(ok, "{text}");
    assert!(fork.join("checkpoints/step-00000002/trainer.json").exists());
    assert_eq!(std::fs::read(&step3).unwrap(), before);
    let (ok, _, text) = tooln1(&[
        "train",
        "--resume",
        s(&step1),
        "--steps",
        "2",
        "--quiet",
        "--discard-later-checkpoints",
    ]);
    assert!(ok, "{text}");
    assert!(!step3.exists());

    // A new run into a folder that holds checkpoints is refused too.
    let (ok, text) = train(&model, &data, &run_a, "1", &[]);
    assert!(!ok, "{text}");
    assert!(text.contains("already holds"), "{text}");
}

#[test]
fn diverging_hyperparameters_are_refused_before_anything_is_saved() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = setup(tmp.path());
    for (set, field) in [
        ("optim.weight_decay=nan", "optim.weight_decay"),
        ("optim.lr=1e6", "optim.lr"),
        ("grpo.kl_coef=inf", "grpo.kl_coef"),
    ] {
        let out = tmp.path().join(field);
        let (ok, text) = train(&model, &data, &out, "1", &["--set", set]);
        assert!(!ok, "{set}: {text}");
        assert!(text.contains(field), "{set}: {text}");
        assert!(!out.join("checkpoints").exists(), "{set}");
    }
}

/// A reward that gives NaN for one sample.
struct NanFor(&'static str);

impl Reward for NanFor {
    fn score(&self, response: &str, gt: &serde_json::Value) -> RewardOutput {
        RewardOutput {
            reward: if gt == self.0 { f32::NAN } else { 0.5 },
            format_ok: !response.is_empty(),
            calls_ok: false,
            reason: "test".into(),
        }
    }
}

fn library_trainer(out: &Path, reward: Box<dyn Reward>) -> Trainer<Cpu> {
    let tok = tooln1::tokenizer::Tokenizer::from_dir(&fixture("golden/tokenizer")).unwrap();
    let vocab = tok.inner.get_vocab_size(true).div_ceil(64) * 64;
    let mut cfg = init::tiny_config(32, 2, 4, 2, 48, vocab, true);
    cfg.eos_token_id = vec![tok.token_id("<|im_end|>").unwrap()];
    let host = init::random_params(&cfg, 3);
    let prompts: Vec<PromptItem> = ["a", "b"]
        .iter()
        .map(|id| PromptItem {
            id: format!("p-{id}"),
            tokens: tok
                .encode(&format!(
                    "<|im_start|>user\n{id}<|im_end|>\n<|im_start|>assistant\n"
                ))
                .unwrap(),
            ground_truth: serde_json::json!(id),
        })
        .collect();
    let mut tc = TrainConfig {
        run: RunConfig {
            out: out.to_path_buf(),
            steps: 2,
            ..RunConfig::default()
        },
        save_every: 1,
        ..TrainConfig::default()
    };
    tc.rollout.n = 2;
    tc.rollout.max_new_tokens = 3;
    tc.grpo.prompts_per_step = 2;
    tc.grpo.mini_batch_prompts = 1;
    let policy = Model::from_host(&Cpu, cfg.clone(), &host).unwrap();
    let reference = Model::from_host(&Cpu, cfg, &host).unwrap();
    let mut t = Trainer::new(Cpu, policy, reference, tok, prompts, reward, tc).unwrap();
    t.quiet = true;
    t
}

#[test]
fn a_nan_reward_is_an_error_naming_the_sample() {
    let tmp = tempfile::tempdir().unwrap();
    let mut t = library_trainer(&tmp.path().join("r"), Box::new(NanFor("b")));
    let e = t.step().unwrap_err().to_string();
    assert!(e.contains("p-b") && e.contains("NaN"), "{e}");
}

#[test]
fn weights_that_stop_being_finite_stop_the_run_and_the_last_good_checkpoint_stays_latest() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("r");
    let mut t = library_trainer(&out, Box::new(NanFor("none")));
    t.cfg.run.steps = 1;
    t.run().unwrap();
    let good = tooln1::train::checkpoint::latest(&out).unwrap();
    // A NaN that got past validation (a library caller setting the field directly).
    t.cfg.run.steps = 2;
    t.opt.cfg.weight_decay = f32::NAN;
    let e = t.run().unwrap_err().to_string();
    assert!(e.contains("no longer finite"), "{e}");
    assert!(e.contains("optim.weight_decay"), "{e}");
    assert_eq!(tooln1::train::checkpoint::latest(&out).unwrap(), good);
    // Saving the diverged weights directly is refused as well.
    let e = t
        .save_checkpoint(&out.join("checkpoints/step-00000009"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("diverged"), "{e}");
    assert!(!out.join("checkpoints/step-00000009").exists());
}

#[test]
fn huge_sizes_are_errors_with_the_estimate_not_aborts() {
    let tmp = tempfile::tempdir().unwrap();
    let (ok, normal, text) = tooln1(&[
        "init-tiny",
        s(&tmp.path().join("h")),
        "--hidden",
        "1000000000",
    ]);
    assert!(!ok && normal, "{text}");
    assert!(text.contains("parameters"), "{text}");
    // Large but not absurd: refused against the machine's memory, with the figure.
    let (ok, normal, text) = tooln1(&[
        "init-tiny",
        s(&tmp.path().join("h2")),
        "--hidden",
        "4000000",
        "--heads",
        "4",
        "--kv-heads",
        "2",
    ]);
    assert!(!ok && normal, "{text}");
    assert!(
        text.contains("memory") || text.contains("parameters"),
        "{text}"
    );
    let cfg = tmp.path().join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("qwen2.5/config.json")).unwrap())
            .unwrap();
    v["num_hidden_layers"] = serde_json::json!(1_000_000_000u64);
    std::fs::write(&cfg, v.to_string()).unwrap();
    let (ok, normal, text) = tooln1(&["inspect", s(&cfg)]);
    assert!(!ok && normal, "{text}");
    assert!(text.contains("num_hidden_layers"), "{text}");

    let (model, data) = setup(tmp.path());
    let (ok, normal, text) = tooln1(&[
        "train",
        "--model",
        s(&model),
        "--data",
        s(&data),
        "--out",
        s(&tmp.path().join("o")),
        "--device",
        "cpu",
        "--dry-run",
        "--set",
        "grpo.prompts_per_step=36028797018963968",
        "--set",
        "grpo.mini_batch_prompts=1",
    ]);
    assert!(!ok && normal, "{text}");
    assert!(text.contains("grpo.prompts_per_step"), "{text}");
    assert!(!text.contains(" 0 B"), "{text}");

    // Generation settings size the KV cache: checked before it is allocated.
    let (ok, normal, text) = tooln1(&[
        "eval",
        "apibank",
        "run",
        "--model",
        s(&model),
        "--data",
        s(&fixture("apibank/level-1-sample.json")),
        "--out",
        s(&tmp.path().join("g.jsonl")),
        "--device",
        "cpu",
        "--max-new-tokens",
        "1000000000000000",
        "--batch-size",
        "1000000000000",
    ]);
    assert!(!ok && normal, "{text}");
    assert!(text.contains("KV cache"), "{text}");
}

#[test]
fn data_prepare_writes_train_and_test_together_or_not_at_all() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("prep");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("train.jsonl"), "OLD TRAIN\n").unwrap();
    // The test file cannot be written (its name is taken by a folder).
    std::fs::create_dir(out.join("test.jsonl")).unwrap();
    std::fs::write(out.join("test.jsonl/keep.txt"), "k").unwrap();
    let xlam = fixture("xlam/xlam_sample.json");
    let (ok, _, text) = tooln1(&["data", "prepare", "--out", s(&out), "--xlam", s(&xlam)]);
    assert!(!ok, "{text}");
    assert!(text.contains("test.jsonl"), "{text}");
    assert_eq!(
        std::fs::read_to_string(out.join("train.jsonl")).unwrap(),
        "OLD TRAIN\n"
    );
    let names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert!(names.iter().all(|n| !n.contains("tmp")), "{names:?}");
}

#[test]
fn stale_and_failed_checkpoint_temporaries_are_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("r");
    // What a run killed (or out of disk) mid-checkpoint leaves behind.
    let stale = out.join("checkpoints/.step-00000007.tmp");
    std::fs::create_dir_all(stale.join("model")).unwrap();
    std::fs::write(stale.join("model/model.safetensors"), vec![0u8; 4096]).unwrap();
    let mut t = library_trainer(&out, Box::new(NanFor("none")));
    t.cfg.run.steps = 1;
    t.run().unwrap();
    assert!(!stale.exists());
    // A save that fails after starting its temporary (here: a source folder whose config.json
    // is corrupt, as a full disk would fail a later write) removes it.
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("config.json"), "{ truncated").unwrap();
    t.source_dir = Some(src);
    let e = t
        .save_checkpoint(&out.join("checkpoints/step-00000005"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("config.json"), "{e}");
    // A file where the checkpoint folder would go is left alone.
    t.source_dir = None;
    let blocked = out.join("checkpoints/step-00000006");
    std::fs::write(&blocked, "not mine").unwrap();
    assert!(t.save_checkpoint(&blocked).is_err());
    assert_eq!(std::fs::read_to_string(&blocked).unwrap(), "not mine");
    let left: Vec<String> = std::fs::read_dir(out.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[cfg(unix)]
#[test]
fn a_fifo_as_model_file_is_refused_not_waited_on() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, _) = setup(tmp.path());
    let st = model.join("model.safetensors");
    std::fs::remove_file(&st).unwrap();
    let made = Command::new("mkfifo").arg(&st).status();
    if !made.is_ok_and(|s| s.success()) {
        tooln1::tooln1_skip!("skipped: mkfifo is not available");
        return;
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let m = model.clone();
    std::thread::spawn(move || {
        let _ = tx.send(tooln1::model::weights::Checkpoint::open(&m).map(|_| ()));
    });
    let r = rx.recv_timeout(std::time::Duration::from_secs(10));
    if r.is_err() {
        // Release the blocked open before failing.
        let _ = std::fs::OpenOptions::new().write(true).open(&st);
        panic!("opening a FIFO as model.safetensors blocked");
    }
    let e = r.unwrap().unwrap_err().to_string();
    assert!(e.contains("not a regular file"), "{e}");
}

#[test]
fn unusable_ground_truths_are_counted_and_all_unusable_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, _) = setup(tmp.path());
    let bad = tmp.path().join("bad.jsonl");
    write_samples(&bad, |_| serde_json::json!("not json at all"));
    let out = tmp.path().join("o");
    let (ok, text) = train(&model, &bad, &out, "1", &[]);
    assert!(!ok, "{text}");
    assert!(text.contains("none of the 4 training prompts"), "{text}");
    assert!(!out.join("checkpoints").exists());
}

#[test]
fn a_running_run_holds_its_output_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = setup(tmp.path());
    let out = tmp.path().join("o");
    std::fs::create_dir(&out).unwrap();
    // pid 1 always exists; the lock names it as the holder.
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown-host".into());
    let lock = serde_json::json!({"pid": 1, "host": host, "started_unix": 5});
    std::fs::write(out.join(".tooln1.lock"), lock.to_string()).unwrap();
    let (ok, text) = train(&model, &data, &out, "1", &[]);
    assert!(!ok, "{text}");
    assert!(text.contains("pid 1"), "{text}");
    assert!(!out.join("checkpoints").exists());
}

#[test]
fn eval_run_checks_out_first_and_continues_an_interrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, _) = setup(tmp.path());
    let data = fixture("apibank/level-1-sample.json");
    let blocker = tmp.path().join("file");
    std::fs::write(&blocker, "x").unwrap();
    let args = |out: &Path| -> Vec<String> {
        [
            "eval",
            "apibank",
            "run",
            "--model",
            s(&model),
            "--data",
            s(&data),
            "--out",
            s(out),
            "--device",
            "cpu",
            "--max-new-tokens",
            "3",
        ]
        .iter()
        .map(|x| x.to_string())
        .collect()
    };
    // --out under a file: refused before any generation.
    let a = args(&blocker.join("gen.jsonl"));
    let (ok, _, text) = tooln1(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!ok, "{text}");
    assert!(!text.contains("generated"), "{text}");

    // An interrupted run left one generation: it is kept, the rest generated.
    let out = tmp.path().join("gen.jsonl");
    let settings = serde_json::json!({
        "model": s(&model), "data": s(&data), "system": "",
        "max_new_tokens": 3, "max_prompt_tokens": 4096,
    });
    let partial = tooln1::eval::generate::partial_path(&out);
    std::fs::write(
        &partial,
        format!(
            "{}\n{}\n{{\"id\": \"1\", \"outp",
            serde_json::json!({ "settings": settings }),
            serde_json::json!({"id": "0", "output": "KEPT"})
        ),
    )
    .unwrap();
    let a = args(&out);
    let (ok, _, text) = tooln1(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{text}");
    assert!(text.contains("continuing: 1 generations"), "{text}");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["output"], "KEPT");
    assert!(!partial.exists());
}

#[test]
fn file_system_errors_print_the_os_text_once_with_the_path() {
    let (ok, _, text) = tooln1(&["inspect", "/no/such/folder/config.json"]);
    assert!(!ok);
    assert!(text.contains("/no/such/folder/config.json"), "{text}");
    assert_eq!(text.matches("os error 2").count(), 1, "{text}");
}

#[test]
fn a_chat_template_that_loops_forever_is_stopped() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("tokenizer_config.json");
    let tpl = "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}";
    std::fs::write(&p, serde_json::json!({ "chat_template": tpl }).to_string()).unwrap();
    let t = tooln1::tokenizer::ChatTemplate::from_tokenizer_config(&p).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let msgs = [tooln1::data::Message {
            role: "user".into(),
            content: "hi".into(),
        }];
        let _ = tx.send(t.render(&msgs, None, true).map(|s| s.len()));
    });
    let r = rx
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("rendering a 10^10-step template did not stop");
    let e = r.unwrap_err().to_string();
    assert!(e.contains("template instructions"), "{e}");
}
