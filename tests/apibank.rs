//! API-Bank level-1: parsing as API-Bank does, prompts in the Tool-N1 format, scoring, CLI.
//! Fixture: the first three records of the public level-1-api.json.

use serde_json::json;
use std::path::PathBuf;
use std::process::Command;
use tooln1::eval::apibank;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/apibank/level-1-sample.json")
}

#[test]
fn parses_calls_like_api_bank() {
    let (name, p) = apibank::parse_api_request(
        "API-Request: [QueryHealthData(user_id='J46801', start_time=\"2023-03-05 00:00:00\", n=5, tags=['a', 'b'])]",
    )
    .unwrap();
    assert_eq!(name, "QueryHealthData");
    assert_eq!(p["user_id"], "J46801");
    assert_eq!(p["start_time"], "2023-03-05 00:00:00");
    assert_eq!(p["n"], "5");
    assert_eq!(p["tags"], "['a', 'b']");
    assert!(apibank::parse_api_request("no call here").is_none());
}

#[test]
fn loads_records_and_builds_prompts() {
    let recs = apibank::load(&fixture()).unwrap();
    assert_eq!(recs.len(), 3);
    assert_eq!(recs[0].id, "0");
    assert_eq!(recs[0].expected_name, "ModifyRegistration");
    assert_eq!(recs[0].expected_params["new_appointment_doctor"], "Dr. Lee");
    assert_eq!(recs[0].apis.len(), 3);
    let p = apibank::eval_prompt(&recs[1], "Base.");
    assert!(p.messages[0].content.starts_with("Base.\n\n# Tool"));
    assert!(p.messages[0].content.contains("<tool_call>[]</tool_call>"));
    let t = p
        .tools
        .iter()
        .find(|t| t["name"] == "QueryHealthData")
        .unwrap();
    assert_eq!(t["parameters"]["type"], "object");
    assert_eq!(t["parameters"]["properties"]["user_id"]["type"], "string");
    assert_eq!(
        t["parameters"]["required"],
        json!(["user_id", "start_time", "end_time"])
    );
    // earlier API requests become an assistant call (JSON) followed by the tool result
    let roles: Vec<&str> = p.messages.iter().map(|m| m.role.as_str()).collect();
    let i = roles.iter().position(|r| *r == "tool").unwrap();
    assert_eq!(roles[i - 1], "assistant");
    let prior: serde_json::Value = serde_json::from_str(&p.messages[i - 1].content).unwrap();
    assert_eq!(prior[0]["name"], "ModifyRegistration");
    assert_eq!(p.messages[i].content, "success");
    assert_eq!(*roles.last().unwrap(), "assistant");
    assert!(!p
        .messages
        .iter()
        .any(|m| m.content.contains("Generate API Request")));
}

#[test]
fn scores_name_and_string_parameters() {
    let recs = apibank::load(&fixture()).unwrap();
    let tn1 = |name: &str, args: serde_json::Value| {
        format!(
            "<think>t</think><tool_call>[{}]</tool_call>",
            json!({"name": name, "arguments": args})
        )
    };
    let outs = vec![
        (
            "0".to_string(),
            tn1(
                "ModifyRegistration",
                json!({"appointment_id": "34567890", "new_appointment_date": "2023-03-26", "new_appointment_doctor": "Dr. Lee"}),
            ),
        ),
        (
            "1".to_string(),
            "API-Request: [QueryHealthData(user_id='J46801', start_time='2023-03-05 00:00:00', end_time='2023-03-12 00:00:00')]".to_string(),
        ),
        ("2".to_string(), tn1("CancelRegistration", json!({"appointment_id": 90123456}))),
    ];
    let rep = apibank::score(&recs, &outs);
    assert_eq!((rep.correct, rep.total), (3, 3), "{:?}", rep.verdicts);
    assert!(rep.note.contains("approximates the official"));
    // wrong name, wrong value, missing parameter, undecodable
    let bad = vec![
        ("0".to_string(), tn1("ModifyAppointment", json!({}))),
        (
            "1".to_string(),
            tn1(
                "QueryHealthData",
                json!({"user_id": "J46801", "start_time": "2023-03-05", "end_time": "2023-03-12 00:00:00"}),
            ),
        ),
        ("2".to_string(), tn1("CancelRegistration", json!({}))),
    ];
    let rep = apibank::score(&recs, &bad);
    assert_eq!(rep.correct, 0);
    assert!(rep.verdicts[0].reason.contains("API name"));
    assert!(rep.verdicts[1].reason.contains("parameters"));
    let rep = apibank::score(&recs, &[("0".into(), "I can't".into())]);
    assert_eq!((rep.correct, rep.missing), (0, 2));
    assert!(rep.verdicts[0].reason.contains("cannot decode"));
}

#[test]
fn cli_prints_the_score_and_the_caveat() {
    let dir = tempfile::tempdir().unwrap();
    let outs = dir.path().join("o.jsonl");
    std::fs::write(
        &outs,
        "{\"id\": \"2\", \"output\": \"API-Request: [CancelRegistration(appointment_id='90123456')]\"}\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tooln1"))
        .args(["eval", "apibank", "score", "--data"])
        .arg(fixture())
        .arg("--outputs")
        .arg(&outs)
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(s.contains("1/3 correct = 33.33%"), "{s}");
    assert!(
        s.contains("approximates the official executor-based score"),
        "{s}"
    );
    let prompts = dir.path().join("p.jsonl");
    let out = Command::new(env!("CARGO_BIN_EXE_tooln1"))
        .args(["eval", "apibank", "prompts", "--data"])
        .arg(fixture())
        .arg("--out")
        .arg(&prompts)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        std::fs::read_to_string(&prompts).unwrap().lines().count(),
        3
    );
}
