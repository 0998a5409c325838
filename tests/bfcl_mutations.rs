//! Deliberately wrong (and deliberately harmless) variations of the real BFCL ground truths, each
//! with the verdict the official checker's rules give. Needs `data/bfcl` (or $TOOLN1_BFCL_DIR).
//!
//! With TOOLN1_BFCL_DUMP=<file>, every checked output is also written there as
//! `{category, id, calls: [{name: {param: value}}], valid, error_type}` lines, so the verdicts can
//! be compared with the official Python checker run on the same calls.

use serde_json::{json, Map, Value};
use std::io::Write;
use std::path::PathBuf;
use tooln1::eval::bfcl::{self, Category, Record};
use tooln1::tooln1_skip;

fn data_dir() -> Option<PathBuf> {
    let d = std::env::var_os("TOOLN1_BFCL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/bfcl"));
    d.join("possible_answer").is_dir().then_some(d)
}

const KNOWN_IMPOSSIBLE: [&str; 5] = [
    "live_multiple_507-149-4",
    "live_multiple_862-181-3",
    "live_multiple_964-207-0",
    "live_simple_106-63-0",
    "live_simple_112-68-0",
];

/// The ground-truth calls of a record as `[{name, arguments}]` (from `ground_truth_output`).
fn gt_calls(r: &Record) -> Vec<Value> {
    let out = bfcl::ground_truth_output(r).unwrap();
    let start = out.find("<tool_call>").unwrap() + "<tool_call>".len();
    let end = out.rfind("</tool_call>").unwrap();
    serde_json::from_str::<Value>(&out[start..end])
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn render(calls: &[Value]) -> String {
    format!(
        "<think>t</think><tool_call>{}</tool_call>",
        Value::Array(calls.to_vec())
    )
}

fn schema<'a>(r: &'a Record, func: &str, param: &str) -> Option<&'a Value> {
    r.functions
        .iter()
        .find(|f| f["name"] == func)?
        .get("parameters")?
        .get("properties")?
        .get(param)
}

fn allowed<'a>(r: &'a Record, call_idx: usize, param: &str) -> Vec<&'a Value> {
    let gt = &r.ground_truth.as_ref().unwrap()[call_idx];
    let (_, params) = gt.as_object().unwrap().iter().next().unwrap();
    params
        .get(param)
        .and_then(|a| a.as_array())
        .map(|a| a.iter().collect())
        .unwrap_or_default()
}

struct Dump(Option<std::fs::File>);

impl Dump {
    fn write(&mut self, r: &Record, output: &str, v: &bfcl::Verdict) {
        let Some(f) = self.0.as_mut() else { return };
        let calls = bfcl::decode_output(output).unwrap();
        let calls: Vec<Value> = calls
            .iter()
            .map(|c| {
                let args: Map<String, Value> = c
                    .args
                    .iter()
                    .map(|(k, v)| (k.clone(), v.to_json().unwrap()))
                    .collect();
                json!({ c.name.clone(): Value::Object(args) })
            })
            .collect();
        let line = json!({"category": r.category.name(), "id": r.id, "calls": calls,
                          "valid": v.valid, "error_type": v.error_type});
        writeln!(f, "{line}").unwrap();
    }
}

#[test]
fn wrong_outputs_get_the_official_verdicts() {
    let Some(dir) = data_dir() else {
        tooln1_skip!("skipped: no BFCL data (run tools/fetch-bfcl.sh)");
        return;
    };
    let mut dump =
        Dump(std::env::var_os("TOOLN1_BFCL_DUMP").map(|p| std::fs::File::create(p).unwrap()));
    let cats = [
        Category::SimplePython,
        Category::Multiple,
        Category::Parallel,
        Category::ParallelMultiple,
        Category::LiveSimple,
        Category::LiveMultiple,
        Category::LiveParallel,
        Category::LiveParallelMultiple,
    ];
    let records = bfcl::load_dir(&dir, &cats).unwrap();
    let mut counts = std::collections::BTreeMap::<&str, (usize, usize)>::new();
    let mut check = |r: &Record,
                     calls: &[Value],
                     expect_valid: Option<bool>,
                     expect_kind: Option<&str>,
                     what: &'static str| {
        let out = render(calls);
        let v = bfcl::check_record(r, &out);
        dump.write(r, &out, &v);
        let e = counts.entry(what).or_default();
        e.0 += 1;
        let Some(expect_valid) = expect_valid else {
            return;
        };
        assert_eq!(
            v.valid, expect_valid,
            "{what}: {} -> {:?} {:?}\n{out}",
            r.id, v.error_type, v.error
        );
        if let Some(k) = expect_kind {
            assert_eq!(
                v.error_type.as_deref(),
                Some(k),
                "{what}: {}: {:?}",
                r.id,
                v.error
            );
        }
        e.1 += 1;
    };
    for r in &records {
        if KNOWN_IMPOSSIBLE.contains(&r.id.as_str()) {
            continue;
        }
        let calls = gt_calls(r);
        check(r, &calls, Some(true), None, "ground truth");
        let parallel = r.category.name().contains("parallel");
        let simple_kind = |k: &str| {
            if parallel {
                "parallel_function_checker_no_order:cannot_find_match".to_string()
            } else {
                format!("simple_function_checker:{k}")
            }
        };
        // Reordered parallel calls: still correct.
        if parallel && calls.len() > 1 {
            let mut rev = calls.clone();
            rev.reverse();
            // Greedy matching (as official) can fail when a model call fits several ground-truth
            // calls; assert only where every model call fits exactly one of them.
            let decoded = bfcl::decode_output(&render(&rev)).unwrap();
            let gt = r.ground_truth.as_ref().unwrap();
            let unambiguous = decoded.iter().all(|c| {
                gt.iter()
                    .filter(|g| {
                        let gname = g.as_object().unwrap().keys().next().unwrap();
                        r.functions
                            .iter()
                            .find(|f| &f["name"] == gname)
                            .is_some_and(|f| {
                                bfcl::simple_function_checker(f, c, g, bfcl::Language::Python)
                                    .is_ok()
                            })
                    })
                    .count()
                    == 1
            });
            check(
                r,
                &rev,
                unambiguous.then_some(true),
                None,
                "reordered parallel calls",
            );
        }
        // Wrong number of calls.
        let mut more = calls.clone();
        more.push(calls[0].clone());
        let kind = if parallel {
            "parallel_function_checker_no_order:wrong_count"
        } else if r.category.name().contains("multiple") {
            "multiple_function_checker:wrong_count"
        } else {
            "simple_function_checker:wrong_count"
        };
        check(r, &more, Some(false), Some(kind), "extra call");
        for (ci, call) in calls.iter().enumerate() {
            let name = call["name"].as_str().unwrap().to_string();
            let args = call["arguments"].as_object().unwrap().clone();
            // Extra parameter not in the schema.
            let mut c2 = calls.clone();
            c2[ci]["arguments"]["zz_not_a_param"] = json!(1);
            check(
                r,
                &c2,
                Some(false),
                Some(&simple_kind("unexpected_param")),
                "extra param",
            );
            // Wrong function name.
            let mut c2 = calls.clone();
            c2[ci]["name"] = json!(format!("{name}_x"));
            check(
                r,
                &c2,
                Some(false),
                Some(&simple_kind("wrong_func_name")),
                "wrong function name",
            );
            let required: Vec<String> = r
                .functions
                .iter()
                .find(|f| f["name"] == name.as_str())
                .and_then(|f| f["parameters"]["required"].as_array().cloned())
                .unwrap_or_default()
                .iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect();
            for (p, val) in &args {
                let al = allowed(r, ci, p);
                let non_empty: Vec<&&Value> =
                    al.iter().filter(|a| a.as_str() != Some("")).collect();
                let ty = schema(r, &name, p)
                    .and_then(|s| s["type"].as_str())
                    .unwrap_or("");
                // Missing required parameter.
                if required.contains(p) {
                    let mut c2 = calls.clone();
                    c2[ci]["arguments"].as_object_mut().unwrap().remove(p);
                    check(
                        r,
                        &c2,
                        Some(false),
                        Some(&simple_kind("missing_required")),
                        "missing required param",
                    );
                }
                // Wrong type: an integer given as a string (no string among the allowed values).
                if ty == "integer" && val.is_i64() && non_empty.iter().all(|a| !a.is_string()) {
                    let mut c2 = calls.clone();
                    c2[ci]["arguments"][p] = json!(val.to_string());
                    let k = if parallel {
                        simple_kind("")
                    } else {
                        "type_error:simple".into()
                    };
                    check(r, &c2, Some(false), Some(&k), "int as string");
                    // A float for an integer parameter is a type error too.
                    let mut c2 = calls.clone();
                    c2[ci]["arguments"][p] = json!(val.as_i64().unwrap() as f64);
                    check(r, &c2, Some(false), Some(&k), "float for int");
                }
                // An int for a float parameter is accepted (Python auto-conversion).
                if ty == "float"
                    && val.is_f64()
                    && val.as_f64().unwrap().fract() == 0.0
                    && val.as_f64().unwrap().abs() < 1e15
                {
                    let mut c2 = calls.clone();
                    c2[ci]["arguments"][p] = json!(val.as_f64().unwrap() as i64);
                    check(r, &c2, Some(true), None, "int for float");
                }
                // Boolean given as a string.
                if ty == "boolean" && val.is_boolean() && non_empty.iter().all(|a| a.is_boolean()) {
                    let mut c2 = calls.clone();
                    c2[ci]["arguments"][p] = json!(val.to_string());
                    let k = if parallel {
                        simple_kind("")
                    } else {
                        "type_error:simple".into()
                    };
                    check(r, &c2, Some(false), Some(&k), "bool as string");
                }
                // Normalised strings: case, spaces and ,./-_*^ do not matter.
                if ty == "string" && non_empty.iter().all(|a| a.is_string()) {
                    if let Some(s) = val.as_str().filter(|s| s.is_ascii() && !s.is_empty()) {
                        let mut c2 = calls.clone();
                        c2[ci]["arguments"][p] = json!(format!(" -{}_ .", s.to_ascii_uppercase()));
                        check(r, &c2, Some(true), None, "normalised string");
                        let mut c2 = calls.clone();
                        c2[ci]["arguments"][p] = json!(format!("{s}zq"));
                        let k = if parallel {
                            simple_kind("")
                        } else {
                            "value_error:string".into()
                        };
                        check(r, &c2, Some(false), Some(&k), "wrong string");
                    }
                }
                // Reordered list: wrong unless the reversed list is allowed too.
                if ty == "array" {
                    if let Some(a) = val
                        .as_array()
                        .filter(|a| a.len() > 1 && a.iter().all(|x| x.is_number() || x.is_string()))
                    {
                        let mut rev = a.clone();
                        rev.reverse();
                        let norm = |v: &Value| match v {
                            Value::String(s) => json!(bfcl::standardize_string(s)),
                            other => other.clone(),
                        };
                        let rev_n: Vec<Value> = rev.iter().map(norm).collect();
                        let a_n: Vec<Value> = a.iter().map(norm).collect();
                        if rev_n != a_n {
                            let rev_allowed = non_empty.iter().any(|x| {
                                x.as_array().is_some_and(|l| {
                                    l.iter().map(norm).collect::<Vec<_>>() == rev_n
                                })
                            });
                            let mut c2 = calls.clone();
                            c2[ci]["arguments"][p] = Value::Array(rev);
                            let k = if parallel {
                                simple_kind("")
                            } else {
                                "value_error:list/tuple".into()
                            };
                            check(
                                r,
                                &c2,
                                Some(rev_allowed),
                                (!rev_allowed).then_some(k.as_str()),
                                "reordered list",
                            );
                        }
                    }
                }
            }
        }
    }
    for (what, (n, ok)) in &counts {
        println!("{what:<28} {n} outputs, {ok} with a known expected verdict, all as expected");
    }
}
