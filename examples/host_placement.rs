//! The cost of `memory.grads = "host"` and `memory.reference = "host"` on the CPU backend: a
//! mini-batch of micro-batches (forward + backward) accumulating into resident gradient
//! buffers against host sums (`train::host_grads::HostGrads`), and the no-gradient logprobs
//! pass of the resident model against the streamed one (`Model::into_streamed`). On the CPU
//! backend the "device" is host memory too, so the figures measure the extra copies and the
//! bookkeeping of the host placements, not PCIe transfers.
//!
//!   cargo run --release --example host_placement -- [hidden=H] [layers=L] [tokens=T]
//!       [micro=M] [runs=R]
//!
//! Medians of `runs` timings after one warm-up; the bits of both placements are compared.

use std::time::Instant;
use tooln1::backend::cpu::Cpu;
use tooln1::backend::Backend;
use tooln1::model::{init, Model, PackedBatch};
use tooln1::train::host_grads::HostGrads;
use tooln1::train::optim::zero_grads;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let (mut hidden, mut layers, mut tokens, mut micro, mut runs) = (512usize, 4, 512, 4, 5);
    for a in std::env::args().skip(1) {
        let (k, v) = a
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("expected KEY=VALUE, got {a}"))?;
        let v: usize = v
            .parse()
            .map_err(|_| anyhow::anyhow!("{k}: expected an unsigned integer, got {v}"))?;
        match k {
            "hidden" => hidden = v.max(64) / 64 * 64,
            "layers" => layers = v.max(1),
            "tokens" => tokens = v.max(8),
            "micro" => micro = v.max(1),
            "runs" => runs = v.max(1),
            _ => anyhow::bail!("unknown key {k}; expected hidden, layers, tokens, micro or runs"),
        }
    }
    let b = Cpu;
    let cfg = init::tiny_config(hidden, layers, hidden / 64, 2, hidden * 8 / 3, 8192, false);
    let model = Model::random(&b, cfg.clone(), 7)?;
    let params = model.layout.num_params();
    let seqs: Vec<Vec<u32>> = (0..4)
        .map(|s| {
            (0..tokens / 4 + 1)
                .map(|t| ((t * 31 + s * 7) % 8192) as u32)
                .collect()
        })
        .collect();
    let batch = PackedBatch::from_sequences(&seqs)?;
    let db = model.upload_batch(&b, &batch)?;
    let dl = b.upload_f32(&vec![-1.0 / batch.n_logits() as f32; batch.n_logits()])?;
    println!(
        "model: hidden {hidden}, {layers} layers, vocab 8192, {params} parameters; \
         {micro} micro-batches of {} tokens, recompute on",
        batch.n_tok()
    );
    let mut dev = model.zero_grads(&b)?;
    let mut host = HostGrads::new(&model)?;
    let mut t_dev = Vec::new();
    let mut t_host = Vec::new();
    for run in 0..=runs {
        let t = Instant::now();
        zero_grads(&b, &model, &mut dev)?;
        for _ in 0..micro {
            let tape = model.forward_train(&b, &db, false, true)?;
            model.backward(&b, &db, tape, &dl, &mut dev)?;
        }
        let td = t.elapsed().as_secs_f64();
        let t = Instant::now();
        host.zero();
        for _ in 0..micro {
            let tape = model.forward_train(&b, &db, false, true)?;
            model.backward(&b, &db, tape, &dl, &mut host)?;
        }
        let th = t.elapsed().as_secs_f64();
        if run > 0 {
            t_dev.push(td);
            t_host.push(th);
        }
    }
    for (i, s) in model.layout.specs.iter().enumerate() {
        let d = b.download_f32(&dev[i], s.numel())?;
        anyhow::ensure!(
            d.iter()
                .map(|x| x.to_bits())
                .eq(host.tensor(i).iter().map(|x| x.to_bits())),
            "host gradient sums differ from the resident ones at {}",
            s.name
        );
    }
    let (d, h) = (median(t_dev), median(t_host));
    println!(
        "gradients: device {:.3} s, host {:.3} s per mini-batch ({:+.1}%), same bits",
        d,
        h,
        (h / d - 1.0) * 100.0
    );
    let streamed = Model::from_host(&b, cfg, &model.to_host(&b)?)?.into_streamed(&b)?;
    let (mut t_res, mut t_str) = (Vec::new(), Vec::new());
    for run in 0..=runs {
        let t = Instant::now();
        let (a, _) = model.logprobs(&b, &db, false)?;
        let tr = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let (s, _) = streamed.logprobs(&b, &db, false)?;
        let ts = t.elapsed().as_secs_f64();
        anyhow::ensure!(
            a.iter()
                .map(|x| x.to_bits())
                .eq(s.iter().map(|x| x.to_bits())),
            "streamed logprobs differ from the resident ones"
        );
        if run > 0 {
            t_res.push(tr);
            t_str.push(ts);
        }
    }
    let (r, s) = (median(t_res), median(t_str));
    println!(
        "reference logprobs: resident {:.3} s, streamed {:.3} s per pass ({:+.1}%), same bits",
        r,
        s,
        (s / r - 1.0) * 100.0
    );
    Ok(())
}
