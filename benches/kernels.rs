//! Criterion benches of every CUDA kernel, forward and backward, at Qwen2.5-1.5B and 7B shapes
//! (attention also at 0.5B's heads: head_dim 64, GQA 7:1), timed with CUDA events
//! (`iter_custom`). Each bench also prints its achieved GB/s (memory-bound kernels, counting
//! each input read once and each output written once) or TFLOP/s (GEMM-bound ones). Without a
//! GPU the CUDA groups print "skipped: no CUDA device"; the CPU-backend groups (small shapes,
//! wall-clock timing) run everywhere.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use tooln1::backend::cpu::Cpu;
use tooln1::backend::cuda::Cuda;
use tooln1::backend::{
    AdamWState, AdamWStep, Backend, Cached, GemmDims, GrpoLossCfg, GrpoTokens, Heads, KlKind,
    LinearGrads, LossAgg, Packed,
};
use tooln1::backend::{AttnGrads, AttnSaved, Qkv};
use tooln1::backend::{
    LmHead, LogprobsGrads, LogprobsOut, NormDims, NormGrads, NormOut, VocabDims,
};

struct Shape {
    name: &'static str,
    hidden: usize,
    inter: usize,
    heads: usize,
    kv: usize,
    hd: usize,
    vocab: usize,
}

const SHAPES: &[Shape] = &[
    Shape {
        name: "1.5B",
        hidden: 1536,
        inter: 8960,
        heads: 12,
        kv: 2,
        hd: 128,
        vocab: 151936,
    },
    Shape {
        name: "7B",
        hidden: 3584,
        inter: 18944,
        heads: 28,
        kv: 4,
        hd: 128,
        vocab: 152064,
    },
];

const TOK: usize = 4096; // 4 sequences of 1024 tokens

fn rnd(n: usize, scale: f32) -> Vec<f32> {
    let mut s = 0x2545F4914F6CDD1Du64;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / 16777216.0 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// Appends one measurement to $TOOLN1_BENCH_JSONL (default target/tooln1-bench.jsonl), the
/// contract of tools/bench_report.py.
fn record(
    name: &str,
    shape: &str,
    median_ms: f64,
    flops: f64,
    bytes: f64,
    crit: &str,
    device: &str,
) {
    use std::io::Write;
    let path = std::env::var("TOOLN1_BENCH_JSONL").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/target/tooln1-bench.jsonl").to_string()
    });
    let line = serde_json::json!({
        "name": name, "shape": shape, "median_ms": median_ms, "flops": flops, "bytes": bytes,
        "criterion": crit, "device": device,
    });
    match std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
    {
        Ok(mut f) => {
            let _ = writeln!(f, "{line}");
        }
        Err(e) => eprintln!("{path}: {e}"),
    }
}

/// Times `f` with CUDA events over the iterations criterion asks for, prints the rate (GB/s
/// when `flops` is 0, else TFLOP/s) and records the median per-call time.
#[allow(clippy::too_many_arguments)]
fn timed(
    c: &mut Criterion,
    cuda: &Cuda,
    group: &str,
    name: &str,
    shape: &str,
    bytes: f64,
    flops: f64,
    mut f: impl FnMut(),
) {
    let mut g = c.benchmark_group(group);
    g.sample_size(10);
    let mut per_call: Vec<f64> = Vec::new();
    g.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let t = cuda.timer().expect("cuda events");
            t.start().expect("event record");
            for _ in 0..iters {
                f();
            }
            let ms = t.stop_ms().expect("event elapsed") as f64;
            per_call.push(ms / iters as f64);
            Duration::from_secs_f64(ms / 1e3)
        })
    });
    g.finish();
    if per_call.is_empty() {
        return;
    }
    per_call.sort_by(|a, b| a.total_cmp(b));
    let med = per_call[per_call.len() / 2];
    let s = med / 1e3;
    if flops > 0.0 {
        println!(
            "{group}/{name} [{shape}]: {med:.3} ms, {:.1} TFLOP/s",
            flops / s / 1e12
        );
    } else {
        println!(
            "{group}/{name} [{shape}]: {med:.3} ms, {:.0} GB/s",
            bytes / s / 1e9
        );
    }
    record(
        name,
        shape,
        med,
        flops,
        bytes,
        &format!("{group}/{name}"),
        &cuda.device(),
    );
}

fn cuda_benches(c: &mut Criterion) {
    let cuda = match Cuda::new() {
        Ok(x) => x,
        Err(e) => {
            println!("skipped: no CUDA device ({e})");
            return;
        }
    };
    println!("device: {}", cuda.device());
    for sh in SHAPES {
        let md = sh.name.to_lowercase();
        let grp = format!("cuda-{md}");
        let (h, it) = (sh.hidden, sh.inter);
        let x = cuda.upload(&rnd(TOK * h, 1.0)).unwrap();
        let w = cuda.upload(&rnd(h, 1.0)).unwrap();
        let mut out = cuda.zeros(TOK * h).unwrap();
        let mut rstd = cuda.zeros_f32(TOK).unwrap();
        let bx = (TOK * h * 2) as f64;
        let shp = format!("model={md},tokens={TOK},hidden={h}");
        timed(c, &cuda, &grp, "rmsnorm_fwd", &shp, 2.0 * bx, 0.0, || {
            cuda.rmsnorm(
                &x,
                &w,
                &mut out,
                &mut rstd,
                NormDims { rows: TOK, dim: h },
                1e-6,
            )
            .unwrap()
        });
        let mut dx = cuda.zeros(TOK * h).unwrap();
        let mut dw = cuda.zeros_f32(h).unwrap();
        timed(c, &cuda, &grp, "rmsnorm_bwd", &shp, 4.0 * bx, 0.0, || {
            cuda.rmsnorm_bwd(
                &out,
                &x,
                &w,
                &rstd,
                NormGrads {
                    dx: &mut dx,
                    dw: Some(&mut dw),
                },
                NormDims { rows: TOK, dim: h },
            )
            .unwrap()
        });
        // The residual add into the post-attention norm: fused (reads x and delta, writes x and
        // out) against the two kernels it replaces (add: 3 passes, rmsnorm: 2).
        let delta = cuda.upload(&rnd(TOK * h, 1e-3)).unwrap();
        let mut res = cuda.upload(&rnd(TOK * h, 1.0)).unwrap();
        let nd = NormDims { rows: TOK, dim: h };
        timed(
            c,
            &cuda,
            &grp,
            "add_rmsnorm_fwd",
            &shp,
            4.0 * bx,
            0.0,
            || {
                let y = NormOut {
                    out: &mut out,
                    rstd: &mut rstd,
                };
                cuda.add_rmsnorm(&mut res, &delta, &w, y, nd, 1e-6).unwrap()
            },
        );
        timed(
            c,
            &cuda,
            &grp,
            "add_then_rmsnorm_fwd",
            &shp,
            5.0 * bx,
            0.0,
            || {
                cuda.add_inplace(&mut res, &delta, TOK * h).unwrap();
                cuda.rmsnorm(&res, &w, &mut out, &mut rstd, nd, 1e-6)
                    .unwrap()
            },
        );

        let g = cuda.upload(&rnd(TOK * it, 2.0)).unwrap();
        let u = cuda.upload(&rnd(TOK * it, 2.0)).unwrap();
        let mut a = cuda.zeros(TOK * it).unwrap();
        let mut b2 = cuda.zeros(TOK * it).unwrap();
        let bi = (TOK * it * 2) as f64;
        let shp = format!("model={md},tokens={TOK},inter={it}");
        timed(c, &cuda, &grp, "swiglu_fwd", &shp, 3.0 * bi, 0.0, || {
            cuda.swiglu(&g, &u, &mut a, TOK * it).unwrap()
        });
        let mut dg = cuda.zeros(TOK * it).unwrap();
        timed(c, &cuda, &grp, "swiglu_bwd", &shp, 5.0 * bi, 0.0, || {
            cuda.swiglu_bwd(&a, &g, &u, &mut dg, &mut b2, TOK * it)
                .unwrap()
        });

        let wl = cuda.upload(&rnd(it * h, 0.05)).unwrap();
        let mut y = cuda.zeros(TOK * it).unwrap();
        let fl = 2.0 * (TOK * it * h) as f64;
        let shp = format!("model={md},tokens={TOK},out={it},in={h}");
        timed(c, &cuda, &grp, "linear_fwd", &shp, 0.0, fl, || {
            cuda.linear(
                &x,
                &wl,
                None,
                &mut y,
                GemmDims {
                    m: TOK,
                    n: it,
                    k: h,
                },
            )
            .unwrap()
        });
        let mut dwl = cuda.zeros_f32(it * h).unwrap();
        timed(c, &cuda, &grp, "linear_bwd", &shp, 0.0, 2.0 * fl, || {
            cuda.linear_bwd(
                &y,
                &x,
                &wl,
                LinearGrads {
                    dx: Some(&mut dx),
                    accumulate_dx: false,
                    dw: Some(&mut dwl),
                    dbias: None,
                },
                GemmDims {
                    m: TOK,
                    n: it,
                    k: h,
                },
            )
            .unwrap()
        });

        let (nh, nkv, hd) = (sh.heads, sh.kv, sh.hd);
        let pos: Vec<u32> = (0..TOK).map(|t| (t % 1024) as u32).collect();
        let posd = cuda.upload_u32(&pos).unwrap();
        let mut qr = cuda.upload(&rnd(TOK * nh * hd, 1.0)).unwrap();
        let mut kr = cuda.upload(&rnd(TOK * nkv * hd, 1.0)).unwrap();
        let shp = format!("model={md},tokens={TOK},heads={nh},kv_heads={nkv},head_dim={hd}");
        let rb = 2.0 * (TOK * (nh + nkv) * hd * 2) as f64;
        timed(c, &cuda, &grp, "rope_fwd", &shp, rb, 0.0, || {
            cuda.rope(&mut qr, &posd, TOK, nh, hd, 1e6).unwrap();
            cuda.rope(&mut kr, &posd, TOK, nkv, hd, 1e6).unwrap();
        });
        timed(c, &cuda, &grp, "rope_bwd", &shp, rb, 0.0, || {
            cuda.rope_bwd(&mut qr, &posd, TOK, nh, hd, 1e6).unwrap();
            cuda.rope_bwd(&mut kr, &posd, TOK, nkv, hd, 1e6).unwrap();
        });

        attention_benches(
            c,
            &cuda,
            &grp,
            &md,
            Heads {
                n_heads: nh,
                n_kv: nkv,
                head_dim: hd,
            },
        );

        let (slots, clen) = (64usize, 2048usize);
        let kc = cuda.upload(&rnd(slots * clen * nkv * hd, 1.0)).unwrap();
        let vc = cuda.upload(&rnd(slots * clen * nkv * hd, 1.0)).unwrap();
        let lens = cuda.upload_u32(&vec![clen as u32; slots]).unwrap();
        // A paged cache of 16-row blocks, sequence b's blocks in order.
        let (bsz, mb) = (16usize, clen / 16);
        let table = cuda
            .upload_u32(&(0..(slots * mb) as u32).collect::<Vec<_>>())
            .unwrap();
        let qd = cuda.upload(&rnd(slots * nh * hd, 1.0)).unwrap();
        let mut od = cuda.zeros(slots * nh * hd).unwrap();
        let shp =
            format!("model={md},batch={slots},ctx={clen},heads={nh},kv_heads={nkv},head_dim={hd}");
        let dfl = 4.0 * (slots * clen * nh * hd) as f64;
        timed(
            c,
            &cuda,
            &grp,
            "attention_decode",
            &shp,
            2.0 * (slots * clen * nkv * hd * 2) as f64,
            dfl,
            || {
                cuda.attention_decode(
                    &qd,
                    &kc,
                    &vc,
                    &Cached {
                        lens: &lens,
                        table: &table,
                        n_seq: slots,
                        max_blocks: mb,
                        block_size: bsz,
                    },
                    &mut od,
                    Heads {
                        n_heads: nh,
                        n_kv: nkv,
                        head_dim: hd,
                    },
                )
                .unwrap()
            },
        );

        let nt = 1024;
        let voc = sh.vocab;
        let wv = cuda.upload(&rnd(voc * h, 0.05)).unwrap();
        let tg = cuda
            .upload_u32(&(0..nt).map(|t| (t * 7919 % voc) as u32).collect::<Vec<_>>())
            .unwrap();
        let (mut lp, mut ls) = (cuda.zeros_f32(nt).unwrap(), cuda.zeros_f32(nt).unwrap());
        let lfl = 2.0 * (nt * voc * h) as f64;
        let shp = format!("model={md},tokens={nt},hidden={h},vocab={voc}");
        timed(c, &cuda, &grp, "logprobs_fwd", &shp, 0.0, lfl, || {
            cuda.logprobs(
                LmHead {
                    h: &x,
                    w: &wv,
                    targets: &tg,
                },
                LogprobsOut {
                    logp: &mut lp,
                    lse: &mut ls,
                    entropy: None,
                },
                VocabDims {
                    n_tok: nt,
                    dim: h,
                    vocab: voc,
                },
                1.0,
            )
            .unwrap()
        });
        let dlp = cuda.upload_f32(&rnd(nt, 1.0)).unwrap();
        let mut dh = cuda.zeros(nt * h).unwrap();
        let mut dwv = cuda.zeros_f32(voc * h).unwrap();
        timed(c, &cuda, &grp, "logprobs_bwd", &shp, 0.0, 3.0 * lfl, || {
            cuda.logprobs_bwd(
                &dlp,
                LmHead {
                    h: &x,
                    w: &wv,
                    targets: &tg,
                },
                &ls,
                LogprobsGrads {
                    dh: &mut dh,
                    dw: Some(&mut dwv),
                },
                VocabDims {
                    n_tok: nt,
                    dim: h,
                    vocab: voc,
                },
                1.0,
            )
            .unwrap()
        });
        let mut lg = cuda.zeros_f32(64 * voc).unwrap();
        cuda.logits(
            &x,
            &wv,
            &mut lg,
            VocabDims {
                n_tok: 64,
                dim: h,
                vocab: voc,
            },
        )
        .unwrap();
        let mut smp = cuda.upload_u32(&[0u32; 64]).unwrap();
        let shp = format!("batch=64,vocab={voc}");
        let offsets: Vec<u64> = (0..64).collect();
        let rows = tooln1::backend::SampleRows::each(&offsets, voc);
        let sp = tooln1::backend::SampleParams {
            temperature: 0.8,
            top_p: 0.95,
            top_k: 0,
            seed: 1,
        };
        timed(
            c,
            &cuda,
            &grp,
            "sample_top_p",
            &shp,
            (64 * voc * 4) as f64,
            0.0,
            || cuda.sample(&lg, &mut smp, &rows, &sp).unwrap(),
        );
    }
    // Qwen2.5-0.5B's heads: head_dim 64, GQA 7:1 (the shapes above are head_dim 128)
    attention_benches(
        c,
        &cuda,
        "cuda-0.5b",
        "0.5b",
        Heads {
            n_heads: 14,
            n_kv: 2,
            head_dim: 64,
        },
    );

    // Shape-independent ops, once.
    let grp = "cuda";
    let (n, n_seq) = (65536usize, 256usize);
    let lp = cuda.upload_f32(&rnd(n, 1.0)).unwrap();
    let old = cuda.upload_f32(&rnd(n, 1.0)).unwrap();
    let rf = cuda.upload_f32(&rnd(n, 1.0)).unwrap();
    let adv = cuda.upload_f32(&rnd(n, 1.0)).unwrap();
    let mask = cuda.upload_f32(&vec![1.0; n]).unwrap();
    let sid = cuda
        .upload_u32(&(0..n).map(|t| (t * n_seq / n) as u32).collect::<Vec<_>>())
        .unwrap();
    let mut dl = cuda.zeros_f32(n).unwrap();
    let cfg = GrpoLossCfg {
        clip_low: 0.2,
        clip_high: 0.2,
        kl_coef: 0.001,
        kl_kind: KlKind::K3,
        agg: LossAgg::TokenMean,
        norm_len: 1.0,
        loss_scale_div: 1.0,
    };
    timed(
        c,
        &cuda,
        grp,
        "grpo_loss",
        &format!("tokens={n},seqs={n_seq}"),
        (n * 4 * 7) as f64,
        0.0,
        || {
            cuda.grpo_loss(
                &GrpoTokens {
                    logp: &lp,
                    old_logp: &old,
                    ref_logp: &rf,
                    adv: &adv,
                    mask: &mask,
                    seq_id: &sid,
                    n_tok: n,
                    n_seq,
                },
                &mut dl,
                &cfg,
            )
            .unwrap();
        },
    );
    let n = 64 << 20;
    let mut p = cuda.zeros(n).unwrap();
    let mut ms = cuda.zeros_f32(n).unwrap();
    let gr = cuda.upload_f32(&rnd(n, 0.01)).unwrap();
    let (mut m1, mut m2) = (cuda.zeros_f32(n).unwrap(), cuda.zeros_f32(n).unwrap());
    let hp = AdamWStep {
        lr: 1e-6,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
        step: 3,
        grad_scale: 1.0,
    };
    timed(
        c,
        &cuda,
        grp,
        "adamw",
        &format!("params={n}"),
        (n * 32) as f64,
        0.0,
        || {
            cuda.adamw(
                AdamWState {
                    param: &mut p,
                    master: Some(&mut ms),
                    m: &mut m1,
                    v: &mut m2,
                },
                &gr,
                n,
                &hp,
            )
            .unwrap()
        },
    );
}

/// The CPU reference backend at small shapes (runs on every machine).
/// Causal attention forward and backward, 8192 tokens per batch in sequences of 1k, 4k and 8k,
/// at the heads of one model (`md`): the rows tools/torch_baselines.py times with PyTorch SDPA
/// (flash and cuDNN backends) at the same shapes.
fn attention_benches(c: &mut Criterion, cuda: &Cuda, grp: &str, md: &str, heads: Heads) {
    let Heads {
        n_heads: nh,
        n_kv: nkv,
        head_dim: hd,
    } = heads;
    for seq in [1024usize, 4096, 8192] {
        let n = 8192usize;
        let batch = n / seq;
        let cu: Vec<u32> = (0..=batch).map(|i| (i * seq) as u32).collect();
        let cud = cuda.upload_u32(&cu).unwrap();
        let q = cuda.upload(&rnd(n * nh * hd, 1.0)).unwrap();
        let k = cuda.upload(&rnd(n * nkv * hd, 1.0)).unwrap();
        let v = cuda.upload(&rnd(n * nkv * hd, 1.0)).unwrap();
        let mut o = cuda.zeros(n * nh * hd).unwrap();
        let mut lse = cuda.zeros_f32(nh * n).unwrap();
        let afl = batch as f64 * 4.0 * (seq * seq * hd * nh) as f64 / 2.0;
        let shp =
            format!("model={md},batch={batch},seq={seq},heads={nh},kv_heads={nkv},head_dim={hd}");
        timed(c, cuda, grp, "attention_fwd", &shp, 0.0, afl, || {
            cuda.attention(
                Qkv {
                    q: &q,
                    k: &k,
                    v: &v,
                },
                &mut o,
                &mut lse,
                &Packed {
                    cu_seqlens: &cud,
                    cu_host: &cu,
                    max_len: seq,
                },
                Heads {
                    n_heads: nh,
                    n_kv: nkv,
                    head_dim: hd,
                },
            )
            .unwrap()
        });
        let (mut dq, mut dk, mut dv) = (
            cuda.zeros(n * nh * hd).unwrap(),
            cuda.zeros(n * nkv * hd).unwrap(),
            cuda.zeros(n * nkv * hd).unwrap(),
        );
        timed(c, cuda, grp, "attention_bwd", &shp, 0.0, 2.5 * afl, || {
            cuda.attention_bwd(
                Qkv {
                    q: &q,
                    k: &k,
                    v: &v,
                },
                AttnSaved {
                    dout: &o,
                    out: &o,
                    lse: &lse,
                },
                AttnGrads {
                    dq: &mut dq,
                    dk: &mut dk,
                    dv: &mut dv,
                },
                &Packed {
                    cu_seqlens: &cud,
                    cu_host: &cu,
                    max_len: seq,
                },
                Heads {
                    n_heads: nh,
                    n_kv: nkv,
                    head_dim: hd,
                },
            )
            .unwrap()
        });
    }
}

fn cpu_benches(c: &mut Criterion) {
    let b = Cpu;
    let mut g = c.benchmark_group("cpu-small");
    g.sample_size(10);
    g.warm_up_time(Duration::from_millis(300));
    g.measurement_time(Duration::from_secs(1));
    let (tok, h, it, nh, nkv, hd, voc) = (
        128usize, 256usize, 512usize, 4usize, 2usize, 64usize, 2048usize,
    );
    let x = b.upload(&rnd(tok * h, 1.0)).unwrap();
    let w = b.upload(&rnd(h, 1.0)).unwrap();
    let mut out = b.zeros(tok * h).unwrap();
    let mut rstd = b.zeros_f32(tok).unwrap();
    g.bench_function("rmsnorm_fwd", |z| {
        z.iter(|| {
            b.rmsnorm(
                &x,
                &w,
                &mut out,
                &mut rstd,
                NormDims { rows: tok, dim: h },
                1e-6,
            )
            .unwrap()
        })
    });
    let delta = b.upload(&rnd(tok * h, 1e-3)).unwrap();
    let mut res = b.upload(&rnd(tok * h, 1.0)).unwrap();
    let nd = NormDims { rows: tok, dim: h };
    g.bench_function("add_rmsnorm_fwd", |z| {
        z.iter(|| {
            let y = NormOut {
                out: &mut out,
                rstd: &mut rstd,
            };
            b.add_rmsnorm(&mut res, &delta, &w, y, nd, 1e-6).unwrap()
        })
    });
    g.bench_function("add_then_rmsnorm_fwd", |z| {
        z.iter(|| {
            b.add_inplace(&mut res, &delta, tok * h).unwrap();
            b.rmsnorm(&res, &w, &mut out, &mut rstd, nd, 1e-6).unwrap()
        })
    });
    let gt = b.upload(&rnd(tok * it, 2.0)).unwrap();
    let up = b.upload(&rnd(tok * it, 2.0)).unwrap();
    let mut a = b.zeros(tok * it).unwrap();
    g.bench_function("swiglu_fwd", |z| {
        z.iter(|| b.swiglu(&gt, &up, &mut a, tok * it).unwrap())
    });
    let wl = b.upload(&rnd(it * h, 0.05)).unwrap();
    let mut y = b.zeros(tok * it).unwrap();
    g.bench_function("linear_fwd", |z| {
        z.iter(|| {
            b.linear(
                &x,
                &wl,
                None,
                &mut y,
                GemmDims {
                    m: tok,
                    n: it,
                    k: h,
                },
            )
            .unwrap()
        })
    });
    let cu = vec![0u32, 50, tok as u32];
    let cud = b.upload_u32(&cu).unwrap();
    let q = b.upload(&rnd(tok * nh * hd, 1.0)).unwrap();
    let k = b.upload(&rnd(tok * nkv * hd, 1.0)).unwrap();
    let v = b.upload(&rnd(tok * nkv * hd, 1.0)).unwrap();
    let mut o = b.zeros(tok * nh * hd).unwrap();
    let mut lse = b.zeros_f32(nh * tok).unwrap();
    g.bench_function("attention_fwd", |z| {
        z.iter(|| {
            b.attention(
                Qkv {
                    q: &q,
                    k: &k,
                    v: &v,
                },
                &mut o,
                &mut lse,
                &Packed {
                    cu_seqlens: &cud,
                    cu_host: &cu,
                    max_len: 78,
                },
                Heads {
                    n_heads: nh,
                    n_kv: nkv,
                    head_dim: hd,
                },
            )
            .unwrap()
        })
    });
    let wv = b.upload(&rnd(voc * h, 0.05)).unwrap();
    let tg = b
        .upload_u32(&(0..tok).map(|t| (t * 31 % voc) as u32).collect::<Vec<_>>())
        .unwrap();
    let (mut lp, mut ls) = (b.zeros_f32(tok).unwrap(), b.zeros_f32(tok).unwrap());
    g.bench_function("logprobs_fwd", |z| {
        z.iter(|| {
            b.logprobs(
                LmHead {
                    h: &x,
                    w: &wv,
                    targets: &tg,
                },
                LogprobsOut {
                    logp: &mut lp,
                    lse: &mut ls,
                    entropy: None,
                },
                VocabDims {
                    n_tok: tok,
                    dim: h,
                    vocab: voc,
                },
                1.0,
            )
            .unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, cpu_benches, cuda_benches);
criterion_main!(benches);
