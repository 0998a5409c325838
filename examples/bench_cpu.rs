//! Times the CPU backend's forward (teacher-forced logprobs) and forward + backward
//! (d(Σ logp)/dθ) on a model folder and a batch of token sequences, and writes the times, the
//! logprobs and per-parameter gradient norms as JSON, for tools/bench-cpu-vs-torch.sh to set
//! next to PyTorch's.
//!
//!   cargo run --release --example bench_cpu -- MODEL_DIR BATCH_JSON THREADS RUNS OUT_JSON
//!
//! BATCH_JSON is a list of token sequences; sequence s of length L gives L − 1 positions
//! (inputs s[..L−1], targets s[1..]). THREADS = 0 uses the default thread count.

use std::path::Path;
use std::time::Instant;

use tooln1::backend::cpu::{self, Cpu};
use tooln1::backend::Backend;
use tooln1::model::weights::load_model;
use tooln1::model::PackedBatch;

/// As in the `tooln1` binary.
#[global_allocator]
static ALLOC: cpu::ReuseAlloc = cpu::ReuseAlloc;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

/// CPU time of this process so far (ms): the sum over its threads of the time on a CPU from
/// /proc/self/task/*/schedstat (NaN where that is unreadable). Less sensitive than wall time to
/// other processes on a shared machine.
fn cpu_ms() -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return f64::NAN;
    };
    let mut ns = 0u64;
    for e in dir.flatten() {
        let Ok(s) = std::fs::read_to_string(e.path().join("schedstat")) else {
            return f64::NAN;
        };
        match s
            .split_whitespace()
            .next()
            .and_then(|x| x.parse::<u64>().ok())
        {
            Some(v) => ns += v,
            None => return f64::NAN,
        }
    }
    ns as f64 * 1e-6
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() != 5 {
        eprintln!("usage: bench_cpu MODEL_DIR BATCH_JSON THREADS RUNS OUT_JSON");
        std::process::exit(2);
    }
    let threads: usize = args[2].parse().expect("THREADS: an integer");
    let runs: usize = args[3].parse().expect("RUNS: an integer");
    cpu::set_num_threads(threads);
    let b = Cpu;
    let model = load_model(Path::new(&args[0]), &b)?;
    let text = std::fs::read_to_string(&args[1])?;
    let seqs: Vec<Vec<u32>> = serde_json::from_str(&text).expect("BATCH_JSON: a list of lists");
    let batch = PackedBatch::from_sequences(&seqs)?;
    let n = batch.n_tok();
    let db = model.upload_batch(&b, &batch)?;
    let ones = b.upload_f32(&vec![1.0; n])?;

    let mut logp = Vec::new();
    let mut fwd = Vec::new();
    let mut fwd_cpu = Vec::new();
    for i in 0..=runs {
        let (t, c) = (Instant::now(), cpu_ms());
        let (lp, _) = model.logprobs(&b, &db, false)?;
        if i > 0 {
            fwd.push(t.elapsed().as_secs_f64() * 1e3);
            fwd_cpu.push(cpu_ms() - c);
        }
        logp = lp;
    }
    let mut grads = model.zero_grads(&b)?;
    let mut fwd_bwd = Vec::new();
    let mut fwd_bwd_cpu = Vec::new();
    for i in 0..=runs {
        for g in grads.iter_mut() {
            let len = g.len();
            b.fill_f32(g, len, 0.0)?;
        }
        let (t, c) = (Instant::now(), cpu_ms());
        let tape = model.forward_train(&b, &db, false, false)?;
        model.backward(&b, &db, tape, &ones, &mut grads)?;
        if i > 0 {
            fwd_bwd.push(t.elapsed().as_secs_f64() * 1e3);
            fwd_bwd_cpu.push(cpu_ms() - c);
        }
    }
    let grad_norms: serde_json::Map<String, serde_json::Value> = model
        .layout
        .specs
        .iter()
        .zip(&grads)
        .map(|(s, g)| {
            let n2: f64 = g.iter().map(|&x| x as f64 * x as f64).sum();
            (s.name.clone(), n2.sqrt().into())
        })
        .collect();
    let out = serde_json::json!({
        "threads": cpu::num_threads(),
        "n_tok": n,
        "fwd_ms": fwd,
        "fwd_bwd_ms": fwd_bwd,
        "fwd_cpu_ms": fwd_cpu,
        "fwd_bwd_cpu_ms": fwd_bwd_cpu,
        "fwd_ms_median": median(fwd.clone()),
        "fwd_bwd_ms_median": median(fwd_bwd.clone()),
        "logp": logp,
        "grad_norms": grad_norms,
    });
    std::fs::write(&args[4], serde_json::to_string(&out).expect("json"))?;
    println!(
        "tooln1 threads={} n_tok={n}: fwd {:.1} ms, fwd+bwd {:.1} ms (medians of {runs}); \
         min wall {:.1} / {:.1} ms; min CPU time {:.1} / {:.1} ms",
        cpu::num_threads(),
        median(fwd.clone()),
        median(fwd_bwd.clone()),
        min(&fwd),
        min(&fwd_bwd),
        min(&fwd_cpu),
        min(&fwd_bwd_cpu)
    );
    Ok(())
}
