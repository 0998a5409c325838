//! The Tool-N1 reward, rule by rule (as the Tool-N1 paper, arXiv:2505.00024, defines it), its
//! ablation variants, property tests, and a no-panic test over random and mutated responses.

use proptest::prelude::*;
use serde_json::{json, Value};
use tooln1::reward::{reward_by_name, Reward, ToolN1Reward, Variant};

fn v0() -> ToolN1Reward {
    ToolN1Reward::new(Variant::V0)
}

fn gt() -> Value {
    json!([{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}},
           {"name": "add", "arguments": {"a": 1, "b": 2}}])
}

const GOOD: &str = r#"<think>two calls</think><tool_call>[{"name": "add", "arguments": {"b": 2, "a": 1}}, {"name": "get_weather", "arguments": {"unit": "celsius", "city": "Paris"}}]</tool_call>"#;

#[test]
fn exact_match_with_think_scores_one() {
    let o = v0().score(GOOD, &gt());
    assert_eq!(o.reward, 1.0);
    assert!(o.format_ok && o.calls_ok);
    assert_eq!(o.reason, "ok");
}

#[test]
fn ground_truth_may_be_a_json_string() {
    let s = Value::String(gt().to_string());
    assert_eq!(v0().score(GOOD, &s).reward, 1.0);
}

#[test]
fn no_tool_call_block_scores_zero() {
    let o = v0().score("<think>x</think> I will call add(1, 2)", &gt());
    assert_eq!(o.reward, 0.0);
    assert!(!o.format_ok);
    assert!(o.reason.contains("no <tool_call>"), "{}", o.reason);
    // an unterminated block is no block
    assert_eq!(
        v0().score("<think>x</think><tool_call>[]", &json!([]))
            .reward,
        0.0
    );
}

#[test]
fn invalid_json_scores_zero() {
    let o = v0().score(
        "<think>x</think><tool_call>[{name: add}]</tool_call>",
        &gt(),
    );
    assert_eq!(o.reward, 0.0);
    assert!(o.reason.contains("not valid JSON"), "{}", o.reason);
}

#[test]
fn the_last_block_counts() {
    let r = format!("{GOOD} and then <tool_call>[]</tool_call>");
    assert_eq!(v0().score(&r, &gt()).reward, 0.0);
    assert_eq!(v0().score(&r, &json!([])).reward, 1.0);
    let r = format!(
        "<think>a</think><tool_call>[]</tool_call>{}",
        &GOOD[GOOD.find("<tool_call>").unwrap()..]
    );
    assert_eq!(v0().score(&r, &gt()).reward, 1.0);
}

#[test]
fn a_single_object_is_wrapped_in_a_list() {
    let r = r#"<think>t</think><tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>"#;
    assert_eq!(
        v0().score(r, &json!([{"name": "f", "arguments": {"x": 1}}]))
            .reward,
        1.0
    );
}

#[test]
fn think_tags_are_required_by_presence_only() {
    let block = r#"<tool_call>[{"name": "f", "arguments": {}}]</tool_call>"#;
    let g = json!([{"name": "f", "arguments": {}}]);
    assert_eq!(v0().score(block, &g).reward, 0.0);
    assert_eq!(v0().score(&format!("<think>{block}"), &g).reward, 0.0);
    assert_eq!(v0().score(&format!("</think>{block}"), &g).reward, 0.0);
    // order is not checked
    assert_eq!(
        v0().score(&format!("</think> x <think>{block}"), &g).reward,
        1.0
    );
}

#[test]
fn items_need_name_and_arguments() {
    let g = json!([{"name": "f", "arguments": {}}]);
    for bad in [
        r#"[{"name": "f"}]"#,
        r#"[{"arguments": {}}]"#,
        r#"["f"]"#,
        r#"[1]"#,
    ] {
        let r = format!("<think>t</think><tool_call>{bad}</tool_call>");
        let o = v0().score(&r, &g);
        assert_eq!(o.reward, 0.0, "{bad}");
        assert!(o.reason.contains("name"), "{bad}: {}", o.reason);
    }
}

#[test]
fn no_type_coercion() {
    let g = json!([{"name": "f", "arguments": {"x": 5}}]);
    let r = |args: &str| {
        format!(r#"<think>t</think><tool_call>[{{"name": "f", "arguments": {args}}}]</tool_call>"#)
    };
    assert_eq!(v0().score(&r(r#"{"x": 5}"#), &g).reward, 1.0);
    assert_eq!(v0().score(&r(r#"{"x": "5"}"#), &g).reward, 0.0);
    assert_eq!(v0().score(&r(r#"{"x": 5.0}"#), &g).reward, 0.0);
    let gf = json!([{"name": "f", "arguments": {"x": 1.0}}]);
    assert_eq!(v0().score(&r(r#"{"x": 1}"#), &gf).reward, 0.0);
    assert_eq!(v0().score(&r(r#"{"x": 1.0}"#), &gf).reward, 1.0);
    let gb = json!([{"name": "f", "arguments": {"x": true}}]);
    assert_eq!(v0().score(&r(r#"{"x": 1}"#), &gb).reward, 0.0);
}

#[test]
fn multiset_counts_duplicates() {
    let one = json!({"name": "f", "arguments": {"x": 1}});
    let g = json!([one.clone(), one.clone()]);
    let r1 = format!("<think>t</think><tool_call>[{one}]</tool_call>");
    let r2 = format!("<think>t</think><tool_call>[{one}, {one}]</tool_call>");
    let r3 = format!("<think>t</think><tool_call>[{one}, {one}, {one}]</tool_call>");
    assert_eq!(v0().score(&r1, &g).reward, 0.0);
    assert_eq!(v0().score(&r2, &g).reward, 1.0);
    assert_eq!(v0().score(&r3, &g).reward, 0.0);
}

#[test]
fn nested_argument_keys_are_sorted() {
    let g = json!([{"name": "f", "arguments": {"o": {"a": 1, "b": [{"y": 2, "x": 1}]}}}]);
    let r = r#"<think>t</think><tool_call>[{"arguments": {"o": {"b": [{"x": 1, "y": 2}], "a": 1}}, "name": "f"}]</tool_call>"#;
    assert_eq!(v0().score(r, &g).reward, 1.0);
    // list order inside arguments does matter
    let r = r#"<think>t</think><tool_call>[{"name": "f", "arguments": {"o": {"a": 1, "b": [{"x": 1, "y": 2}, 3]}}}]</tool_call>"#;
    assert_eq!(v0().score(r, &g).reward, 0.0);
}

#[test]
fn empty_matches_empty() {
    assert_eq!(
        v0().score("<think>none</think><tool_call>[]</tool_call>", &json!([]))
            .reward,
        1.0
    );
    assert_eq!(
        v0().score("<think>none</think><tool_call>[]</tool_call>", &gt())
            .reward,
        0.0
    );
    assert_eq!(v0().score(GOOD, &json!([])).reward, 0.0);
}

#[test]
fn variant_v2_skips_the_think_check() {
    let r = &GOOD[GOOD.find("<tool_call>").unwrap()..];
    let v2 = ToolN1Reward::new(Variant::V2);
    assert_eq!(v2.score(r, &gt()).reward, 1.0);
    assert_eq!(v2.score(GOOD, &gt()).reward, 1.0);
    assert_eq!(v2.score("<tool_call>[]</tool_call>", &gt()).reward, 0.0);
}

#[test]
fn variant_v3_partial_format() {
    let v3 = ToolN1Reward::new(Variant::V3);
    let no_think = &GOOD[GOOD.find("<tool_call>").unwrap()..];
    assert!((v3.score(GOOD, &gt()).reward - 1.0).abs() < 1e-6);
    assert!((v3.score(no_think, &gt()).reward - 0.8).abs() < 1e-6);
    assert!((v3.score("<think>t</think> nothing", &gt()).reward - 0.2).abs() < 1e-6);
    assert_eq!(v3.score("nothing", &gt()).reward, 0.0);
    let wrong_args = GOOD.replace("Paris", "Rome");
    assert!((v3.score(&wrong_args, &gt()).reward - 0.2).abs() < 1e-6);
}

#[test]
fn variant_v4_adds_name_credit() {
    let v4 = ToolN1Reward::new(Variant::V4);
    let wrong_args = GOOD.replace("Paris", "Rome");
    assert!((v4.score(&wrong_args, &gt()).reward - 0.4).abs() < 1e-6);
    assert!((v4.score(GOOD, &gt()).reward - 1.0).abs() < 1e-6);
    let wrong_name = GOOD.replace("\"add\"", "\"sub\"");
    assert!((v4.score(&wrong_name, &gt()).reward - 0.2).abs() < 1e-6);
    let no_think_wrong_args = &wrong_args[wrong_args.find("<tool_call>").unwrap()..];
    assert!((v4.score(no_think_wrong_args, &gt()).reward - 0.2).abs() < 1e-6);
}

#[test]
fn variants_by_name_and_plugging_in_another_reward() {
    for v in Variant::ALL {
        let r = reward_by_name(v.name()).unwrap();
        assert!(r.score(GOOD, &gt()).reward > 0.99);
    }
    let err = reward_by_name("v9").err().unwrap().to_string();
    assert!(err.contains("v0, v2, v3, v4"), "{err}");

    struct Length;
    impl Reward for Length {
        fn score(&self, response: &str, _gt: &Value) -> tooln1::reward::RewardOutput {
            tooln1::reward::RewardOutput {
                reward: response.len() as f32,
                format_ok: true,
                calls_ok: false,
                reason: "length".into(),
            }
        }
    }
    let rewards: Vec<Box<dyn Reward>> = vec![Box::new(v0()), Box::new(Length)];
    let scores: Vec<f32> = rewards
        .iter()
        .map(|r| r.score("abc", &json!([])).reward)
        .collect();
    assert_eq!(scores, vec![0.0, 3.0]);
}

#[test]
fn bad_ground_truth_is_reported_not_panicked() {
    for g in [
        json!(5),
        json!("not json"),
        json!([{"name": "f"}]),
        json!("\"x\""),
    ] {
        let o = v0().score(GOOD, &g);
        assert_eq!(o.reward, 0.0);
        assert!(o.reason.contains("ground truth"), "{g}: {}", o.reason);
    }
}

// ---------- property tests ----------

fn arb_json(depth: u32) -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i32>().prop_map(|i| json!(i)),
        (-1e6f64..1e6).prop_map(|f| json!(f)),
        "[a-z ]{0,6}".prop_map(Value::String),
    ];
    leaf.prop_recursive(depth, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-e]{1,3}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn arb_calls() -> impl Strategy<Value = Vec<(String, serde_json::Map<String, Value>)>> {
    prop::collection::vec(
        (
            "[a-c]{1,2}",
            prop::collection::btree_map("[a-f]{1,3}", arb_json(2), 0..4),
        )
            .prop_map(|(n, m)| (n, m.into_iter().collect())),
        0..5,
    )
}

fn to_value(calls: &[(String, serde_json::Map<String, Value>)]) -> Value {
    Value::Array(
        calls
            .iter()
            .map(|(n, a)| json!({"name": n, "arguments": Value::Object(a.clone())}))
            .collect(),
    )
}

/// Reverse the key order of every object, recursively.
fn reverse_keys(v: &Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut out = serde_json::Map::new();
            for (k, x) in m.iter().rev() {
                out.insert(k.clone(), reverse_keys(x));
            }
            Value::Object(out)
        }
        Value::Array(a) => Value::Array(a.iter().map(reverse_keys).collect()),
        other => other.clone(),
    }
}

proptest! {
    #[test]
    fn permuting_calls_or_keys_never_changes_the_reward(
        calls in arb_calls(),
        gt_calls in arb_calls(),
        perm_seed in any::<u64>(),
        variant in 0usize..4,
    ) {
        let r = ToolN1Reward::new(Variant::ALL[variant]);
        let gt = to_value(&gt_calls);
        let base = format!("<think>t</think><tool_call>{}</tool_call>", to_value(&calls));
        let mut shuffled = calls.clone();
        // deterministic permutation from the seed
        let n = shuffled.len();
        let mut s = perm_seed;
        for i in (1..n).rev() {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            shuffled.swap(i, (s >> 33) as usize % (i + 1));
        }
        let permuted = format!("<think>t</think><tool_call>{}</tool_call>", reverse_keys(&to_value(&shuffled)));
        let a = r.score(&base, &gt);
        let b = r.score(&permuted, &gt);
        prop_assert_eq!(a.reward, b.reward);
        prop_assert_eq!(a.calls_ok, b.calls_ok);
        // and the prediction always matches itself
        let self_score = r.score(&base, &to_value(&calls));
        prop_assert!(self_score.calls_ok);
        prop_assert!((self_score.reward - 1.0).abs() < 1e-6);
    }

    #[test]
    fn reward_is_always_in_range(resp in ".{0,200}", calls in arb_calls()) {
        for v in Variant::ALL {
            let o = ToolN1Reward::new(v).score(&resp, &to_value(&calls));
            prop_assert!((0.0..=1.0).contains(&o.reward));
        }
    }
}

// ---------- no-panic test over random and mutated inputs ----------

#[test]
fn never_panics_on_random_and_mutated_responses() {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    println!("seed {seed}");
    let mut s = seed;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let seeds = [
        GOOD.to_string(),
        "<think></think><tool_call>[]</tool_call>".to_string(),
        "<tool_call>{\"name\": \"é\", \"arguments\": {\"k\": [1, 2.5e300, null, \"\\u00e9\"]}}</tool_call>".to_string(),
        "<think>x</think><tool_call><tool_call>[{]</tool_call></tool_call>".to_string(),
    ];
    let alphabet: Vec<char> = "<>/{}[]\":,toolcalthinkname arguments0123456789.-eE\\u\n\té€😀"
        .chars()
        .collect();
    let rewards: Vec<ToolN1Reward> = Variant::ALL.iter().map(|v| ToolN1Reward::new(*v)).collect();
    for i in 0..20_000 {
        let mut text: Vec<char> = if i % 4 == 0 {
            (0..(next() % 120))
                .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                .collect()
        } else {
            seeds[(next() % seeds.len() as u64) as usize]
                .chars()
                .collect()
        };
        for _ in 0..(next() % 6) {
            let op = next() % 3;
            let pos = if text.is_empty() {
                0
            } else {
                (next() % text.len() as u64) as usize
            };
            let c = alphabet[(next() % alphabet.len() as u64) as usize];
            match op {
                0 => text.insert(pos, c),
                1 if !text.is_empty() => {
                    text.remove(pos);
                }
                _ if !text.is_empty() => text[pos] = c,
                _ => {}
            }
        }
        let text: String = text.into_iter().collect();
        for r in &rewards {
            let o = r.score(&text, &gt());
            assert!((0.0..=1.0).contains(&o.reward), "seed {seed}: {text:?}");
        }
        let _ =
            tooln1::pycall::parse_calls(&text, tooln1::pycall::ParseOptions { bare_names: true });
        let _ = tooln1::pycall::parse_literal(&text);
        let _ = tooln1::eval::bfcl::decode_output(&text);
    }
}
