//! The memory planner's device estimate against the peak device bytes the virtual GPU measures
//! (`vgpuMemStats`) for SFT steps of small models under three placements (everything on the
//! device; the optimizer state on the host; the gradients on the host, `memory.grads`). Prints estimate, measured peak and their ratio for each, then checks
//! the criterion: the estimate within 10% of the measured peak either way. On a real GPU
//! (no `vgpuMemStats`) the test says so and checks nothing.
//!
//! Ignored for now because the criterion does not hold yet: with the caching pool the estimate
//! is up to 25% below the measured peak (activation buffers rounded to power-of-two classes and
//! freed blocks of other classes kept cached, which the planner does not model); with
//! `TOOLN1_CUDA_POOL=exact` it is 0-16% above. The host-gradient placement is no exception:
//! 0.885 and 0.825 of the measured peak with the pool, 1.042 and 1.063 with exact buffers (the
//! two models below, on the virtual GPU). Run it with
//! `tools/vgpu/run.sh cargo test --test cuda_memory_plan -- --ignored --nocapture`.

mod common;

use tooln1::model::init;
use tooln1::model::plan::{plan, Budget, Caps, Place, Placement};
use tooln1::model::Model;
use tooln1::train::config::SftConfig;
use tooln1::train::sft::{SftItem, SftTrainer};

type Stats = unsafe extern "C" fn(*mut usize, *mut usize);
type Reset = unsafe extern "C" fn();

#[test]
#[ignore = "the planner's estimate is not yet within 10% of the virtual GPU's measured peak (see the file comment)"]
fn planner_estimate_against_the_measured_peak() {
    let Some(c) = common::gpu() else { return };
    let lib = unsafe { libloading::Library::new("libcuda.so") }.expect("libcuda.so is loaded");
    let (stats, reset): (libloading::Symbol<Stats>, libloading::Symbol<Reset>) =
        match unsafe { (lib.get(b"vgpuMemStats\0"), lib.get(b"vgpuResetPeak\0")) } {
            (Ok(s), Ok(r)) => (s, r),
            _ => {
                eprintln!("not the virtual GPU: no device memory counters to check against");
                return;
            }
        };
    let read = || {
        let (mut cur, mut peak) = (0usize, 0usize);
        unsafe { stats(&mut cur, &mut peak) };
        (cur as u64, peak as u64)
    };
    let mut r = common::seed("cuda_memory_plan");
    let mut report = Vec::new();
    for (hidden, layers, inter, vocab, seq) in [(256, 2, 512, 2048, 96), (128, 3, 384, 4096, 160)] {
        let cfg = init::tiny_config(hidden, layers, hidden / 64, 1, inter, vocab, false);
        let host = init::random_params(&cfg, 3);
        let items: Vec<SftItem> = (0..2)
            .map(|_| {
                r = r
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                SftItem {
                    tokens: (0..seq)
                        .map(|i| ((r >> 33) as u32 + i * 7) % vocab as u32)
                        .collect(),
                    prompt_len: 4,
                }
            })
            .collect();
        for (place, grads) in [
            (Place::Device, Place::Device),
            (Place::Host, Place::Device),
            (Place::Device, Place::Host),
        ] {
            let mut sc = SftConfig {
                batch_size: 2,
                micro_batch_tokens: 2 * seq as usize,
                max_seq_tokens: seq as usize,
                ..SftConfig::default()
            };
            sc.run.steps = 1;
            sc.memory.optimizer = place;
            sc.memory.grads = grads;
            let choice = Placement {
                optimizer: place,
                grads,
                reference: Place::Device,
            };
            let budget = Budget {
                device_free: 1 << 40,
                host_available: None,
            };
            let p = plan(&cfg, &sc.run_shape(), &budget, &choice, &Caps::ENGINE).unwrap();
            c.trim().unwrap();
            let (cur0, _) = read();
            unsafe { reset() };
            {
                let model = Model::from_host(&c, cfg.clone(), &host).unwrap();
                let mut t = SftTrainer::new(c.clone(), model, items.clone(), sc).unwrap();
                t.quiet = true;
                t.run(None).unwrap();
            }
            let (_, peak) = read();
            let measured = peak.saturating_sub(cur0);
            let est = p.train_peak;
            let ratio = est as f64 / measured as f64;
            report.push((
                ratio,
                format!(
                    "hidden {hidden} layers {layers} vocab {vocab} seq {seq} optimizer {place:?} grads {grads:?}: \
                     estimate {est} B, measured peak {measured} B, estimate / measured {ratio:.3}"
                ),
            ));
        }
    }
    for (_, l) in &report {
        println!("{l}");
    }
    for (ratio, l) in &report {
        assert!((0.9..=1.1).contains(ratio), "estimate not within 10%: {l}");
    }
}
