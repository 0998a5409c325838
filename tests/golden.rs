//! The CPU model against HF transformers: the golden fixtures written by
//! tools/make_fixtures.py (tiny tied and untied Qwen2ForCausalLM, expected values computed in
//! float64). Each model is loaded with `load_model`, a batch of three sequences of different
//! lengths is packed, and logits, next-token logprobs and the gradient of
//! L = Σ_t w_t·logp_t for every parameter are compared by relative-norm error; the same at the
//! temperature of the `*_expected_temperature` fixtures (logprobs, entropy and gradients of
//! log_softmax(logits / T), the training-side objective of verl's actor).

use safetensors::SafeTensors;
use serde_json::Value;
use std::path::{Path, PathBuf};
use tooln1::backend::cpu::Cpu;
use tooln1::backend::{Backend, DType};
use tooln1::model::weights::{bytes_to_f32, load_model};
use tooln1::model::PackedBatch;

const TOL: f64 = 1e-4;

fn golden(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/golden")
        .join(p)
}

struct Expected {
    bytes: Vec<u8>,
}

impl Expected {
    fn load(name: &str) -> Self {
        Self::from_file(&format!("{name}_expected.safetensors"))
    }

    fn from_file(file: &str) -> Self {
        let path = golden(file);
        Expected {
            bytes: std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
        }
    }

    fn get(&self, key: &str) -> Vec<f32> {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let t = st
            .tensor(key)
            .unwrap_or_else(|e| panic!("expected tensor {key}: {e}"));
        assert_eq!(t.dtype(), safetensors::Dtype::F32, "{key}");
        bytes_to_f32(DType::F32, t.data())
    }
}

/// ‖got − want‖ / ‖want‖ in f64; NaN anywhere gives infinity.
fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let mut num = 0.0f64;
    let mut den = 0.0f64;
    for (&g, &w) in got.iter().zip(want) {
        if !g.is_finite() {
            return f64::INFINITY;
        }
        num += (g as f64 - w as f64).powi(2);
        den += (w as f64).powi(2);
    }
    (num / den.max(1e-300)).sqrt()
}

struct Batch {
    seqs: Vec<Vec<u32>>,
    weights: Vec<f32>,
}

fn batch() -> Batch {
    let text = std::fs::read_to_string(golden("batch.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    let seqs: Vec<Vec<u32>> = serde_json::from_value(v["sequences"].clone()).unwrap();
    let w: Vec<Vec<f32>> = serde_json::from_value(v["weights"].clone()).unwrap();
    for (s, ws) in seqs.iter().zip(&w) {
        assert_eq!(ws.len(), s.len() - 1);
    }
    assert!(
        w.iter().flatten().any(|&x| x == 0.0),
        "some tokens are masked"
    );
    Batch {
        seqs,
        weights: w.into_iter().flatten().collect(),
    }
}

/// Print the worst and median of `results` and fail on any at or above [`TOL`].
fn report(name: &str, mut results: Vec<(f64, String)>) {
    results.sort_by(|a, b| b.0.total_cmp(&a.0));
    println!(
        "{name}: {} comparisons; worst {:.3e} at {}; median {:.3e}",
        results.len(),
        results[0].0,
        results[0].1,
        results[results.len() / 2].0
    );
    let bad: Vec<String> = results
        .iter()
        .filter(|r| r.0.is_nan() || r.0 >= TOL)
        .map(|r| format!("{}: {:.3e}", r.1, r.0))
        .collect();
    assert!(
        bad.is_empty(),
        "{name}: relative-norm errors at or above {TOL}:\n{}",
        bad.join("\n")
    );
}

/// Compare every quantity for one fixture model; returns (worst error, what).
fn check_model(name: &str) {
    let b = Cpu;
    let data = batch();
    let exp = Expected::load(name);
    let model = load_model(&golden(name), &b).unwrap();
    let vocab = model.cfg.vocab_size;
    let packed = PackedBatch::from_sequences(&data.seqs).unwrap();
    let db = model.upload_batch(&b, &packed).unwrap();
    let n_tok = packed.n_tok();
    assert_eq!(n_tok, data.weights.len());

    let mut results: Vec<(f64, String)> = Vec::new();

    // Logits and logprobs, per sequence.
    let logits = model.forward_logits(&b, &db).unwrap();
    assert_eq!(logits.len(), n_tok * vocab);
    let (logp, _) = model.logprobs(&b, &db, false).unwrap();
    for s in 0..data.seqs.len() {
        let (lo, hi) = (
            packed.cu_seqlens[s] as usize,
            packed.cu_seqlens[s + 1] as usize,
        );
        let want = exp.get(&format!("logits.{s}"));
        results.push((
            rel_err(&logits[lo * vocab..hi * vocab], &want),
            format!("logits.{s}"),
        ));
        let want = exp.get(&format!("logprobs.{s}"));
        results.push((rel_err(&logp[lo..hi], &want), format!("logprobs.{s}")));
    }
    let loss: f64 = logp
        .iter()
        .zip(&data.weights)
        .map(|(&l, &w)| l as f64 * w as f64)
        .sum();
    let want_loss = exp.get("loss")[0] as f64;
    results.push((
        ((loss - want_loss) / want_loss).abs(),
        "loss Σ w·logp".into(),
    ));

    // Gradients of L = Σ w_t logp_t, with and without per-layer recomputation.
    for recompute in [false, true] {
        let tape = model.forward_train(&b, &db, false, recompute).unwrap();
        let tape_logp = b.download_f32(&tape.logp, n_tok).unwrap();
        results.push((
            rel_err(&tape_logp, &logp),
            format!("training logprobs (recompute={recompute})"),
        ));
        let dlogp = b.upload_f32(&data.weights).unwrap();
        let mut grads = model.zero_grads(&b).unwrap();
        model.backward(&b, &db, tape, &dlogp, &mut grads).unwrap();
        for (spec, g) in model.layout.specs.iter().zip(&grads) {
            let got = b.download_f32(g, spec.numel()).unwrap();
            let want = exp.get(&format!("grad.{}", spec.name));
            results.push((
                rel_err(&got, &want),
                format!("grad {} (recompute={recompute})", spec.name),
            ));
        }
    }

    report(name, results);
}

/// The temperature fixture of one model: logprobs and entropy of softmax(logits / T) from the
/// fused op at inv_t = 1/T (no-grad and training passes), and the gradient of Σ w_t·logp_t.
fn check_model_temperature(name: &str) {
    let b = Cpu;
    let data = batch();
    let exp = Expected::from_file(&format!("{name}_expected_temperature.safetensors"));
    let plain = Expected::load(name);
    let temperature = exp.get("temperature")[0];
    assert!(temperature != 1.0, "the fixture is at temperature 1");
    let inv_t = 1.0 / temperature;
    let model = load_model(&golden(name), &b).unwrap();
    let packed = PackedBatch::from_sequences(&data.seqs).unwrap();
    let db = model.upload_batch(&b, &packed).unwrap();
    let n_tok = packed.n_tok();

    let mut results: Vec<(f64, String)> = Vec::new();
    let (logp, ent) = model.logprobs_at(&b, &db, true, inv_t).unwrap();
    let ent = ent.unwrap();
    for s in 0..data.seqs.len() {
        let (lo, hi) = (
            packed.cu_seqlens[s] as usize,
            packed.cu_seqlens[s + 1] as usize,
        );
        let want = exp.get(&format!("logprobs.{s}"));
        results.push((rel_err(&logp[lo..hi], &want), format!("logprobs.{s} (T)")));
        // The fixture can tell the temperatures apart: T = 1 is far outside the bound.
        let t1 = plain.get(&format!("logprobs.{s}"));
        assert!(
            rel_err(&t1, &want) > 100.0 * TOL,
            "{name}: logprobs.{s} at T = 1 and T agree"
        );
        let want = exp.get(&format!("entropy.{s}"));
        results.push((rel_err(&ent[lo..hi], &want), format!("entropy.{s} (T)")));
    }
    let loss: f64 = logp
        .iter()
        .zip(&data.weights)
        .map(|(&l, &w)| l as f64 * w as f64)
        .sum();
    let want_loss = exp.get("loss")[0] as f64;
    results.push((
        ((loss - want_loss) / want_loss).abs(),
        "loss Σ w·logp (T)".into(),
    ));
    for recompute in [false, true] {
        let tape = model
            .forward_train_at(&b, &db, true, recompute, inv_t)
            .unwrap();
        let tape_logp = b.download_f32(&tape.logp, n_tok).unwrap();
        results.push((
            rel_err(&tape_logp, &logp),
            format!("training logprobs (T, recompute={recompute})"),
        ));
        let tape_ent = b
            .download_f32(tape.entropy.as_ref().unwrap(), n_tok)
            .unwrap();
        results.push((
            rel_err(&tape_ent, &ent),
            format!("training entropy (T, recompute={recompute})"),
        ));
        let dlogp = b.upload_f32(&data.weights).unwrap();
        let mut grads = model.zero_grads(&b).unwrap();
        model.backward(&b, &db, tape, &dlogp, &mut grads).unwrap();
        for (spec, g) in model.layout.specs.iter().zip(&grads) {
            let got = b.download_f32(g, spec.numel()).unwrap();
            let want = exp.get(&format!("grad.{}", spec.name));
            results.push((
                rel_err(&got, &want),
                format!("grad {} (T, recompute={recompute})", spec.name),
            ));
        }
    }
    report(&format!("{name} at T = {temperature}"), results);
}

#[test]
fn tied_model_matches_transformers() {
    check_model("tied");
}

#[test]
fn tied_model_at_temperature_matches_transformers() {
    check_model_temperature("tied");
}

#[test]
fn untied_model_at_temperature_matches_transformers() {
    check_model_temperature("untied");
}

#[test]
fn untied_model_matches_transformers() {
    check_model("untied");
}

#[test]
fn every_parameter_has_an_expected_gradient() {
    // The fixture covers the whole layout: no parameter escapes the comparison.
    for name in ["tied", "untied"] {
        let model = load_model(&golden(name), &Cpu).unwrap();
        for file in [
            format!("{name}_expected.safetensors"),
            format!("{name}_expected_temperature.safetensors"),
        ] {
            let exp = Expected::from_file(&file);
            let st = SafeTensors::deserialize(&exp.bytes).unwrap();
            let n_grads = st.names().iter().filter(|n| n.starts_with("grad.")).count();
            assert_eq!(n_grads, model.layout.specs.len(), "{file}");
        }
    }
}
