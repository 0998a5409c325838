//! Host AdamW throughput (`backend::host_adamw`, the host-offloaded optimizer's update) against
//! a parallel memory copy on the same pool, and the projected time of one update of Qwen2.5-7B
//! (7 615 616 512 parameters).
//!
//!   cargo run --release --example host_adamw -- [params=N] [runs=R] [threads=T]
//!
//! Traffic per parameter of the update: read the gradient, m, v and the f32 master (16 bytes),
//! write m, v and the master (12 bytes): 28 bytes (the bf16 weights the optimizer uploads are
//! converted after the update and not counted). The copy moves `params` x 16 bytes: 8 read and
//! 8 written per element of a two-f32 array, the same bytes through the same cache hierarchy.
//! Medians of `runs` timings after one warm-up.

use rayon::prelude::*;
use std::time::Instant;
use tooln1::backend::cpu;
use tooln1::backend::host_adamw;
use tooln1::backend::AdamWStep;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let mut params: usize = 1 << 26;
    let mut runs: usize = 5;
    let mut threads: usize = 0;
    for a in std::env::args().skip(1) {
        let (k, v) = a
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("expected KEY=VALUE, got {a}"))?;
        let v: usize = v
            .parse()
            .map_err(|_| anyhow::anyhow!("{k}: expected an unsigned integer, got {v}"))?;
        match k {
            "params" => params = v.max(1),
            "runs" => runs = v.max(1),
            "threads" => threads = v,
            _ => anyhow::bail!("unknown key {k}; expected params, runs or threads"),
        }
    }
    if threads > 0 {
        cpu::set_num_threads(threads);
    }
    let n = params;
    let mut p = vec![0.5f32; n];
    let g: Vec<f32> = (0..n).map(|i| ((i % 97) as f32 - 48.0) * 1e-3).collect();
    let mut m = vec![0.0f32; n];
    let mut v = vec![0.0f32; n];
    let mut step = 0u64;
    let mut adamw = || {
        step += 1;
        let hp = AdamWStep {
            lr: 1e-6,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            step,
            grad_scale: 1.0,
        };
        let t = Instant::now();
        host_adamw::adamw(&mut p, &g, &mut m, &mut v, n, &hp);
        t.elapsed().as_secs_f64()
    };
    adamw();
    let ta = median((0..runs).map(|_| adamw()).collect());
    let src = vec![1.0f32; 2 * n];
    let mut dst = vec![0.0f32; 2 * n];
    let mut copy = || {
        let t = Instant::now();
        cpu::fast::run(|| {
            dst.par_chunks_mut(1 << 15)
                .zip(src.par_chunks(1 << 15))
                .for_each(|(d, s)| d.copy_from_slice(s));
        });
        t.elapsed().as_secs_f64()
    };
    copy();
    let tc = median((0..runs).map(|_| copy()).collect());
    let adamw_gbs = n as f64 * 28.0 / ta / 1e9;
    let copy_gbs = n as f64 * 16.0 / tc / 1e9;
    let p7b = 7_615_616_512f64;
    println!(
        "host AdamW: {n} params, {} threads: {:.4} s, {adamw_gbs:.2} GB/s (28 B/param); \
         parallel copy {copy_gbs:.2} GB/s; ratio {:.2}; projected 7.6B update {:.1} s",
        cpu::num_threads(),
        ta,
        adamw_gbs / copy_gbs,
        p7b * 28.0 / (adamw_gbs * 1e9)
    );
    Ok(())
}
