//! `data prepare`: xLAM and ToolACE in their public raw formats (fixtures under
//! tests/fixtures/{xlam,toolace}), the Tool-N1 system prompt, the seeded split, the CLI.

use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::Command;
use tooln1::data::{self, PrepareOptions, Source};

fn fixture(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(p)
}

#[test]
fn system_prompt_has_the_tool_n1_sections() {
    let tools =
        vec![json!({"name": "f", "description": "d", "parameters": {"x": {"type": "int"}}})];
    let p = data::tooln1_system_prompt("Base text.", &tools, false);
    assert!(p.starts_with("Base text.\n\n# Tool\n"));
    assert!(
        p.contains("Here is a list of functions in JSON format that you can invoke:\n<tools>\n")
    );
    // one tool per line, wrapped, Python json.dumps spacing
    assert!(p.contains(
        "<tools>\n{\"type\": \"function\", \"function\": {\"name\": \"f\", \"description\": \"d\", \"parameters\": {\"x\": {\"type\": \"int\"}}}}\n</tools>"
    ));
    assert!(p.contains("<think> </think>"));
    assert!(
        p.contains("<tool_call>[{\"name\": <function-name>, \"arguments\": <args-json-object>}")
    );
    assert!(p.contains("type of the arguments"));
    assert!(!p.contains("<tool_call>[]</tool_call>"));
    let e = data::tooln1_system_prompt("", &tools, true);
    assert!(e.starts_with("# Tool"));
    assert!(e.contains("<tool_call>[]</tool_call>"));
}

#[test]
fn xlam_json_array_is_converted() {
    let opts = PrepareOptions {
        test_fraction: 0.0,
        ..Default::default()
    };
    let p = data::prepare(&[(Source::Xlam, fixture("xlam/xlam_sample.json"))], &opts).unwrap();
    let st = &p.stats["xlam"];
    assert_eq!((st.read, st.kept), (4, 3));
    assert_eq!(st.dropped.get("answer names an unknown tool"), Some(&1));
    let mut train = p.train.clone();
    train.sort_by(|a, b| a.id.cmp(&b.id));
    let s0 = &train[0];
    assert_eq!(s0.id, "xlam-0");
    assert_eq!(s0.source, "xlam");
    assert_eq!(s0.messages.len(), 2);
    assert_eq!(s0.messages[0].role, "system");
    assert!(s0.messages[0]
        .content
        .contains("\"name\": \"live_giveaways_by_type\""));
    assert_eq!(s0.messages[1].role, "user");
    assert_eq!(
        s0.messages[1].content,
        "Where can I find live giveaways for beta access and games?"
    );
    assert_eq!(s0.tools[0]["name"], "live_giveaways_by_type");
    assert_eq!(
        s0.ground_truth,
        json!([{"name": "live_giveaways_by_type", "arguments": {"type": "beta"}},
               {"name": "live_giveaways_by_type", "arguments": {"type": "game"}}])
    );
    // types survive: int stays int, float stays float, None -> null
    let s3 = train.iter().find(|s| s.id == "xlam-3").unwrap();
    let a = &s3.ground_truth[0]["arguments"];
    assert!(a["value"].is_f64() && a["round"].is_i64());
    assert_eq!(a["strict"], json!(true));
    assert_eq!(a["extra"], Value::Null);
}

#[test]
fn bad_lines_name_file_and_line_or_are_skipped() {
    let f = fixture("xlam/xlam_sample_bad.jsonl");
    let err = data::prepare(&[(Source::Xlam, f.clone())], &PrepareOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("xlam_sample_bad.jsonl:3:"), "{err}");
    let opts = PrepareOptions {
        skip_bad: true,
        ..Default::default()
    };
    let p = data::prepare(&[(Source::Xlam, f)], &opts).unwrap();
    let st = &p.stats["xlam"];
    assert_eq!((st.read, st.kept, st.bad), (4, 3, 1));
    assert!(st.bad_examples[0].contains(":3:"));
}

#[test]
fn toolace_steps_become_samples_with_context() {
    let opts = PrepareOptions {
        test_fraction: 0.0,
        ..Default::default()
    };
    let p = data::prepare(
        &[(Source::ToolAce, fixture("toolace/toolace_sample.json"))],
        &opts,
    )
    .unwrap();
    let st = &p.stats["toolace"];
    assert_eq!(st.read, 2);
    assert_eq!(st.kept, 3, "{st:?}");
    assert_eq!(st.dropped.get("answer names an unknown tool"), Some(&1));
    assert_eq!(st.dropped.get("call uses positional arguments"), Some(&1));
    assert_eq!(st.dropped.get("assistant call cannot be parsed"), Some(&1));
    let by_id = |id: &str| {
        p.train
            .iter()
            .find(|s| s.id == id)
            .unwrap_or_else(|| panic!("{id}"))
    };

    // a tool name with spaces, ToolACE's own preamble as base system text
    let m = by_id("toolace-0-0");
    assert_eq!(
        m.ground_truth,
        json!([{"name": "Market Trends API", "arguments": {"trend_type": "MARKET_INDEXES", "country": "us"}}])
    );
    assert!(m.messages[0]
        .content
        .starts_with("You are an expert in composing functions."));
    assert!(m.messages[0]
        .content
        .contains("also point it out.\n\n# Tool"));
    assert!(!m.messages[0].content.contains("Should you decide"));
    assert_eq!(m.messages.len(), 2);

    // parallel calls with single quotes, nested dict, False
    let w = by_id("toolace-1-0");
    assert_eq!(
        w.ground_truth,
        json!([{"name": "get_weather", "arguments": {"city": "Paris", "days": 3, "opts": {"units": "metric", "alerts": false}}},
               {"name": "get_weather", "arguments": {"city": "Rome", "days": 3, "opts": {"units": "metric", "alerts": false}}}])
    );
    // second step: prior turns as context, earlier calls as JSON, tool output as `tool`
    let b = by_id("toolace-1-1");
    assert_eq!(
        b.ground_truth,
        json!([{"name": "book_hotel", "arguments": {"city": "Rome", "nights": 2, "guests": ["Ann", "O'Neil"]}}])
    );
    let roles: Vec<&str> = b.messages.iter().map(|m| m.role.as_str()).collect();
    assert_eq!(
        roles,
        ["system", "user", "assistant", "tool", "assistant", "user"]
    );
    let prior: Value = serde_json::from_str(&b.messages[2].content).unwrap();
    assert_eq!(prior, w.ground_truth);
    assert!(b.messages[2]
        .content
        .contains("\"name\": \"get_weather\", \"arguments\""));
    assert_eq!(b.messages[4].content, "Paris 21C, Rome 25C.");
}

#[test]
fn toolace_bad_record_names_the_line() {
    let err = data::prepare(
        &[(Source::ToolAce, fixture("toolace/toolace_bad.jsonl"))],
        &PrepareOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("toolace_bad.jsonl:2:") && err.contains("system"),
        "{err}"
    );
}

#[test]
fn split_is_seeded_and_90_10() {
    let opts = PrepareOptions::default();
    let inputs = [
        (Source::Xlam, fixture("xlam/xlam_sample.json")),
        (Source::ToolAce, fixture("toolace/toolace_sample.json")),
    ];
    let a = data::prepare(&inputs, &opts).unwrap();
    let b = data::prepare(&inputs, &opts).unwrap();
    let ids = |v: &[data::Sample]| v.iter().map(|s| s.id.clone()).collect::<Vec<_>>();
    assert_eq!(ids(&a.train), ids(&b.train));
    assert_eq!(a.train.len() + a.test.len(), 6);
    assert_eq!(a.test.len(), 1); // round(6 * 0.1)
                                 // a larger synthetic set: the split is 90/10 and depends on the seed
    let samples: Vec<data::Sample> = (0..1000)
        .map(|i| data::Sample {
            id: i.to_string(),
            source: "x".into(),
            messages: vec![],
            tools: vec![],
            ground_truth: json!([]),
        })
        .collect();
    let (tr, te) = data::split_train_test(samples.clone(), 0.1, 7);
    assert_eq!((tr.len(), te.len()), (900, 100));
    let (tr2, _) = data::split_train_test(samples, 0.1, 8);
    assert_ne!(ids(&tr), ids(&tr2));
}

#[test]
fn cli_writes_train_and_test() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tooln1"))
        .args(["data", "prepare", "--xlam"])
        .arg(fixture("xlam/xlam_sample.json"))
        .arg("--toolace")
        .arg(fixture("toolace/toolace_sample.json"))
        .arg("--out")
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("xlam: read 4 records, kept 3 samples"),
        "{stdout}"
    );
    assert!(
        stdout.contains("toolace: read 2 records, kept 3 samples"),
        "{stdout}"
    );
    assert!(
        stdout.contains("dropped 1: answer names an unknown tool"),
        "{stdout}"
    );
    let train = data::read_samples(&dir.path().join("train.jsonl")).unwrap();
    let test = data::read_samples(&dir.path().join("test.jsonl")).unwrap();
    assert_eq!(train.len() + test.len(), 6);
    // bad input without --skip-bad: a message naming file and line, failure exit
    let out = Command::new(env!("CARGO_BIN_EXE_tooln1"))
        .args(["data", "prepare", "--xlam"])
        .arg(fixture("xlam/xlam_sample_bad.jsonl"))
        .arg("--out")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("xlam_sample_bad.jsonl:3:"));
}
