//! The Python call / literal parser (ToolACE answers, BFCL outputs).

use tooln1::pycall::{parse_calls, parse_literal, py_eq, ParseOptions, PyCall, PyValue};

fn s(x: &str) -> PyValue {
    PyValue::Str(x.into())
}

fn calls(src: &str) -> Vec<PyCall> {
    parse_calls(src, ParseOptions::default()).unwrap_or_else(|e| panic!("{src}: {e}"))
}

#[test]
fn call_lists_and_single_calls() {
    let c = calls(r#"[get_weather(city="Paris", unit='celsius'), f2(x=1)]"#);
    assert_eq!(c.len(), 2);
    assert_eq!(c[0].name, "get_weather");
    assert_eq!(
        c[0].kwargs,
        vec![("city".into(), s("Paris")), ("unit".into(), s("celsius"))]
    );
    assert_eq!(c[1].kwargs, vec![("x".into(), PyValue::Int(1))]);
    assert_eq!(calls("f()")[0].kwargs, vec![]);
    assert!(calls("[]").is_empty());
    assert_eq!(calls("[a.b.c(x=1,),]")[0].name, "a.b.c");
    assert_eq!(calls("( f(x=1), g(y=2) )").len(), 2);
    assert_eq!(
        calls("[f(1, 'two', k=3)]")[0].args,
        vec![PyValue::Int(1), s("two")]
    );
}

#[test]
fn strings_quotes_and_escapes() {
    assert_eq!(parse_literal(r#""it's""#).unwrap(), s("it's"));
    assert_eq!(parse_literal(r#"'say "hi"'"#).unwrap(), s("say \"hi\""));
    assert_eq!(parse_literal(r#"'a\'b'"#).unwrap(), s("a'b"));
    assert_eq!(parse_literal(r#""a\"b\\c""#).unwrap(), s("a\"b\\c"));
    assert_eq!(
        parse_literal(r#""tab\there\nnl""#).unwrap(),
        s("tab\there\nnl")
    );
    assert_eq!(
        parse_literal(r#""\x41\u00e9\U0001F600\101""#).unwrap(),
        s("Aé😀A")
    );
    assert_eq!(parse_literal(r#"r"raw\n""#).unwrap(), s("raw\\n"));
    assert_eq!(
        parse_literal(
            r#"'''multi
line'''"#
        )
        .unwrap(),
        s("multi\nline")
    );
    assert_eq!(parse_literal(r#""ab" 'cd'"#).unwrap(), s("abcd"));
    assert_eq!(parse_literal(r#""東京""#).unwrap(), s("東京"));
    assert!(parse_literal(r#""unterminated"#).is_err());
    assert!(parse_literal("'a\nb'").is_err());
    assert!(parse_literal(r#""\x4""#).is_err());
}

#[test]
fn numbers() {
    assert_eq!(parse_literal("42").unwrap(), PyValue::Int(42));
    assert_eq!(parse_literal("-42").unwrap(), PyValue::Int(-42));
    assert_eq!(parse_literal("- 7").unwrap(), PyValue::Int(-7));
    assert_eq!(parse_literal("+3").unwrap(), PyValue::Int(3));
    assert_eq!(parse_literal("0").unwrap(), PyValue::Int(0));
    assert_eq!(parse_literal("1_000_000").unwrap(), PyValue::Int(1_000_000));
    assert_eq!(parse_literal("0xff").unwrap(), PyValue::Int(255));
    assert_eq!(parse_literal("0o17").unwrap(), PyValue::Int(15));
    assert_eq!(parse_literal("0b101").unwrap(), PyValue::Int(5));
    assert_eq!(parse_literal("3.25").unwrap(), PyValue::Float(3.25));
    assert_eq!(parse_literal("-0.5").unwrap(), PyValue::Float(-0.5));
    assert_eq!(parse_literal("1e3").unwrap(), PyValue::Float(1000.0));
    assert_eq!(parse_literal("2.5E-2").unwrap(), PyValue::Float(0.025));
    assert_eq!(parse_literal("5.").unwrap(), PyValue::Float(5.0));
    assert_eq!(parse_literal(".25").unwrap(), PyValue::Float(0.25));
    assert!(parse_literal("1j").is_err());
    assert!(parse_literal("007").is_err());
    assert!(parse_literal("1.2.3").is_err());
    assert!(parse_literal("-'x'").is_err());
    assert!(parse_literal("99999999999999999999999999999999999999999").is_err());
}

#[test]
fn constants_and_containers() {
    assert_eq!(parse_literal("True").unwrap(), PyValue::Bool(true));
    assert_eq!(parse_literal("False").unwrap(), PyValue::Bool(false));
    assert_eq!(parse_literal("None").unwrap(), PyValue::None);
    assert_eq!(
        parse_literal("[1, 'a', [2.0, None], ]").unwrap(),
        PyValue::List(vec![
            PyValue::Int(1),
            s("a"),
            PyValue::List(vec![PyValue::Float(2.0), PyValue::None])
        ])
    );
    assert_eq!(parse_literal("()").unwrap(), PyValue::Tuple(vec![]));
    assert_eq!(
        parse_literal("(1, (2,))").unwrap(),
        PyValue::Tuple(vec![PyValue::Int(1), PyValue::Tuple(vec![PyValue::Int(2)])])
    );
    let d = parse_literal("{'a': 1, \"b\": {'c': [True]}, 3: 'x', 'a': 2}").unwrap();
    assert_eq!(
        d.get("a"),
        Some(&PyValue::Int(2)),
        "later duplicate key wins"
    );
    assert_eq!(
        d.get("b"),
        Some(&PyValue::Dict(vec![(
            s("c"),
            PyValue::List(vec![PyValue::Bool(true)])
        )]))
    );
    assert!(parse_literal("{[1]: 2}").is_err());
    assert!(parse_literal("{'a' 1}").is_err());
    assert!(parse_literal("[1 2]").is_err());
}

#[test]
fn nested_calls_in_toolace_style_answers() {
    let c = calls(
        r#"[search(query="a, b", filters={"tags": ["x", 'y'], "limit": 10, "exact": False}, range=(1, -2.5))]"#,
    );
    let k = &c[0].kwargs;
    assert_eq!(k[0], ("query".into(), s("a, b")));
    let f = &k[1].1;
    assert_eq!(f.get("tags"), Some(&PyValue::List(vec![s("x"), s("y")])));
    assert_eq!(f.get("limit"), Some(&PyValue::Int(10)));
    assert_eq!(f.get("exact"), Some(&PyValue::Bool(false)));
    assert_eq!(
        k[2].1,
        PyValue::Tuple(vec![PyValue::Int(1), PyValue::Float(-2.5)])
    );
    // to JSON: tuples become lists, the types stay
    let j = k[2].1.to_json().unwrap();
    assert_eq!(j, serde_json::json!([1, -2.5]));
}

#[test]
fn bare_names_only_when_asked() {
    assert!(parse_calls("[f(x=y)]", ParseOptions::default()).is_err());
    let c = parse_calls(
        "[f(x=y, z=g(a=1), w=h(2))]",
        ParseOptions { bare_names: true },
    )
    .unwrap();
    assert_eq!(c[0].kwargs[0].1, s("y"));
    assert_eq!(
        c[0].kwargs[1].1,
        PyValue::Dict(vec![(
            s("g"),
            PyValue::Dict(vec![(s("a"), PyValue::Int(1))])
        )])
    );
    assert_eq!(c[0].kwargs[2].1, s("h(2)"));
}

#[test]
fn errors_name_the_position() {
    let e = parse_calls("[f(x=1), g(y=]", ParseOptions::default()).unwrap_err();
    assert!(e.pos >= 13, "{e}");
    let e = parse_calls("[f(x=1) g()]", ParseOptions::default()).unwrap_err();
    assert!(e.to_string().contains("expected `,` or `]`"), "{e}");
    assert!(parse_calls("[f(x=1, x=2)]", ParseOptions::default()).is_err());
    assert!(parse_calls("[f(x=1, 2)]", ParseOptions::default()).is_err());
    assert!(parse_calls("[f(x=1)] trailing", ParseOptions::default()).is_err());
    assert!(parse_calls("[1, 2]", ParseOptions::default()).is_err());
}

#[test]
fn deep_nesting_is_an_error_not_a_crash() {
    let deep = "[".repeat(100_000);
    assert!(parse_literal(&deep).is_err());
    let deep_call = format!("f(x={})", "[".repeat(100_000));
    assert!(parse_calls(&deep_call, ParseOptions::default()).is_err());
}

#[test]
fn python_equality() {
    assert!(py_eq(&PyValue::Int(2), &PyValue::Float(2.0)));
    assert!(!py_eq(&PyValue::Int(2), &PyValue::Float(2.5)));
    assert!(py_eq(&PyValue::Bool(false), &PyValue::Int(0)));
    assert!(!py_eq(&s("2"), &PyValue::Int(2)));
    assert!(py_eq(
        &PyValue::List(vec![PyValue::Int(1)]),
        &PyValue::List(vec![PyValue::Float(1.0)])
    ));
    assert!(!py_eq(
        &PyValue::List(vec![PyValue::Int(1)]),
        &PyValue::Tuple(vec![PyValue::Int(1)])
    ));
    let a = parse_literal("{'x': 1, 'y': 2}").unwrap();
    let b = parse_literal("{'y': 2, 'x': 1.0}").unwrap();
    assert!(py_eq(&a, &b));
}
