//! Fuzz the response parsers: the Tool-N1 reward (every variant), the BFCL output decoder and
//! the Python call / literal parser must return a verdict or an error on any input, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tooln1::pycall::{parse_calls, parse_literal, ParseOptions};
use tooln1::reward::{Reward, ToolN1Reward, Variant};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let gt = serde_json::json!([{"name": "f", "arguments": {"a": 1, "b": [1.5, "x", null]}}]);
    for v in Variant::ALL {
        let out = ToolN1Reward::new(v).score(text, &gt);
        assert!((0.0..=1.0).contains(&out.reward));
    }
    let _ = tooln1::eval::bfcl::decode_output(text);
    let _ = parse_calls(text, ParseOptions { bare_names: true });
    let _ = parse_calls(text, ParseOptions::default());
    let _ = parse_literal(text);
    let _ = tooln1::eval::apibank::decode_call(text);
});
