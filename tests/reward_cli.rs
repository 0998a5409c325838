//! `tooln1 reward score`: one verdict line per input line; bad lines name file and line.

use std::process::Command;

#[test]
fn scores_a_jsonl_file() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let good =
        r#"<think>x</think><tool_call>[{\"name\": \"f\", \"arguments\": {\"a\": 1}}]</tool_call>"#;
    std::fs::write(
        &input,
        format!(
            "{{\"response\": \"{good}\", \"ground_truth\": [{{\"name\": \"f\", \"arguments\": {{\"a\": 1}}}}]}}\n\
             {{\"response\": \"{good}\", \"ground_truth\": \"[{{\\\"name\\\": \\\"f\\\", \\\"arguments\\\": {{\\\"a\\\": 2}}}}]\"}}\n"
        ),
    )
    .unwrap();
    let run = |variant: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_tooln1"))
            .args(["reward", "score", "--input"])
            .arg(&input)
            .args(["--variant", variant])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .collect::<Vec<_>>()
    };
    let v0 = run("v0");
    assert_eq!(v0.len(), 2);
    assert_eq!(v0[0]["reward"], 1.0);
    assert_eq!(v0[0]["format_ok"], true);
    assert_eq!(v0[0]["calls_ok"], true);
    assert_eq!(v0[0]["reason"], "ok");
    assert_eq!(v0[1]["reward"], 0.0);
    assert_eq!(v0[1]["calls_ok"], false);
    let v4 = run("v4");
    assert!((v4[1]["reward"].as_f64().unwrap() - 0.4).abs() < 1e-6);

    std::fs::write(&input, "{\"response\": \"x\"}\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tooln1"))
        .args(["reward", "score", "--input"])
        .arg(&input)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("in.jsonl:1:") && err.contains("ground_truth"),
        "{err}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_tooln1"))
        .args(["reward", "score", "--input"])
        .arg(&input)
        .args(["--variant", "v7"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}
