//! `memory.reference = "host"` (the reference streamed layer by layer from host memory) and
//! `memory.grads = "host"` (gradients summed in host memory) on the CPU backend: the streamed
//! passes and the host gradient sums bit for bit against the resident ones (random models and
//! batches; `TOOLN1_TEST_SEED` replays), and GRPO (with resume, both ways between placements)
//! and SFT runs giving bit-identical weights to the all-device placement.

mod common;

use common::placement::{self as pl, bits, same};
use common::Rng;
use tooln1::backend::cpu::Cpu;
use tooln1::model::{init, GradSink, Model};

#[test]
fn the_streamed_reference_gives_the_resident_bits() {
    let mut r = Rng::new("host_placement streamed");
    for tied in [false, true] {
        let cfg = init::tiny_config(32, 3, 4, 2, 48, 96, tied);
        // Random f32 weights (kept as f32 on the host) and bf16-valued ones (kept as bf16).
        let m = Model::random(&Cpu, cfg.clone(), r.next()).unwrap();
        let f32_host = m.to_host(&Cpu).unwrap();
        let bf16_host: Vec<Vec<f32>> = f32_host.iter().map(|t| common::bf16_round(t)).collect();
        for (host, bf16) in [(&f32_host, false), (&bf16_host, true)] {
            let s = Model::from_host(&Cpu, cfg.clone(), host)
                .unwrap()
                .into_streamed(&Cpu)
                .unwrap();
            let hl = s.host_layers().unwrap();
            assert_eq!(hl.is_bf16(), bf16, "host copy dtype");
            assert!(!hl.pinned(), "the CPU backend keeps pageable memory");
            let per_layer: usize = s.layout.layers[0]
                .all()
                .iter()
                .map(|&i| s.layout.specs[i].numel())
                .sum();
            let elem = if bf16 { 2 } else { 4 };
            assert_eq!(hl.host_bytes(), (per_layer * 3 * elem) as u64);
            pl::check_streamed_reference(&Cpu, &cfg, host, &mut r);
        }
    }
}

#[test]
fn host_gradient_sums_are_the_device_bits() {
    let mut r = Rng::new("host_placement grads");
    for tied in [false, true] {
        let cfg = init::tiny_config(32, 2, 4, 2, 48, 96, tied);
        let host = Model::random(&Cpu, cfg.clone(), r.next())
            .unwrap()
            .to_host(&Cpu)
            .unwrap();
        for recompute in [false, true] {
            pl::check_host_grads(&Cpu, &cfg, &host, recompute, &mut r);
        }
    }
}

#[test]
fn grpo_with_host_reference_and_grads_matches_the_device_placement_including_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let mut r = Rng::new("host_placement grpo");
    for tied in [false, true] {
        let case = pl::grpo_case((24, 4, 2, 40), tied, r.next());
        let seed = r.next() % 1000;
        let dev = pl::device_placement();
        let out = |name: &str| tmp.path().join(format!("{name}{tied}"));
        let want = pl::grpo_weights(&|| Cpu, &case, &out("d"), dev, None, seed);
        assert_ne!(want, case.host, "training did not change the parameters");
        for (k, p) in pl::host_placements(true).into_iter().enumerate() {
            let got = pl::grpo_weights(&|| Cpu, &case, &out(&format!("h{k}_")), p, None, seed);
            same(&want, &got, &format!("GRPO weights, {p:?}"));
        }
        // 2 steps on the host placement, resumed on the device one, and the other way round.
        let all_host = *pl::host_placements(true).last().unwrap();
        for (a, b, name) in [(all_host, dev, "hd"), (dev, all_host, "dh")] {
            let got = pl::grpo_weights(&|| Cpu, &case, &out(name), a, Some(b), seed);
            same(&want, &got, &format!("GRPO weights, {a:?} then {b:?}"));
        }
    }
}

#[test]
fn sft_with_host_grads_matches_the_device_placement() {
    let mut r = Rng::new("host_placement sft");
    for tied in [false, true] {
        let cfg = init::tiny_config(24, 2, 4, 2, 40, 80, tied);
        let host = init::random_params(&cfg, r.next());
        let items = pl::sft_items(&mut r, cfg.vocab_size);
        let want = pl::sft_weights(Cpu, &cfg, &host, &items, pl::device_placement());
        assert_ne!(want, host);
        for p in pl::host_placements(false) {
            let got = pl::sft_weights(Cpu, &cfg, &host, &items, p);
            same(&want, &got, &format!("SFT weights, {p:?}"));
            assert_eq!(bits(&want[0]), bits(&got[0]));
        }
    }
}

/// A sink over resident buffers that records every call and each group's values when it is
/// closed.
struct Recording {
    grads: Vec<Vec<f32>>,
    calls: Vec<(&'static str, usize, usize)>,
    closed: Vec<(usize, Vec<Vec<f32>>)>,
}

impl GradSink<Cpu> for Recording {
    fn tensors(&self) -> usize {
        self.grads.len()
    }
    fn open(&mut self, b: &Cpu, first: usize, n: usize) -> tooln1::Result<&mut [Vec<f32>]> {
        self.calls.push(("open", first, n));
        self.grads.open(b, first, n)
    }
    fn close(&mut self, _b: &Cpu, first: usize, n: usize) -> tooln1::Result<()> {
        self.calls.push(("close", first, n));
        self.closed
            .push((first, self.grads[first..first + n].to_vec()));
        Ok(())
    }
}

#[test]
fn backward_hands_out_the_documented_groups_and_a_closed_group_is_final() {
    let mut r = Rng::new("host_placement groups");
    for tied in [false, true] {
        let cfg = init::tiny_config(32, 3, 4, 2, 48, 96, tied);
        let m = Model::random(&Cpu, cfg.clone(), r.next()).unwrap();
        let (l, norm, embed) = (&m.layout, m.layout.norm, m.layout.embed);
        let mut want = if tied {
            vec![("open", embed, 1), ("open", norm, 1), ("close", norm, 1)]
        } else {
            assert_eq!(l.lm_head, norm + 1);
            vec![("open", norm, 2), ("open", norm, 2), ("close", norm, 2)]
        };
        for lp in l.layers.iter().rev() {
            want.push(("open", lp.input_norm, 12));
            want.push(("close", lp.input_norm, 12));
        }
        want.extend([("open", embed, 1), ("close", embed, 1)]);
        let mut sink = Recording {
            grads: m.zero_grads(&Cpu).unwrap(),
            calls: Vec::new(),
            closed: Vec::new(),
        };
        let batch = pl::random_batch(&mut r, cfg.vocab_size, tied);
        let db = m.upload_batch(&Cpu, &batch).unwrap();
        let dl = r.vec(batch.n_logits(), 1.0);
        let tape = m.forward_train(&Cpu, &db, false, false).unwrap();
        m.backward(&Cpu, &db, tape, &dl, &mut sink).unwrap();
        assert_eq!(sink.calls, want, "tied {tied}");
        // The close order a data-parallel rank replays when it has no micro-batch left.
        let closes: Vec<std::ops::Range<usize>> = sink
            .calls
            .iter()
            .filter(|c| c.0 == "close")
            .map(|c| c.1..c.1 + c.2)
            .collect();
        assert_eq!(
            closes,
            tooln1::model::grad_sink::close_order(l),
            "tied {tied}"
        );
        // Every tensor is in exactly one closed group, and nothing changed it afterwards.
        let mut seen = vec![0; l.specs.len()];
        for (first, vals) in &sink.closed {
            for (k, v) in vals.iter().enumerate() {
                seen[first + k] += 1;
                assert_eq!(
                    bits(v),
                    bits(&sink.grads[first + k]),
                    "tensor {}",
                    first + k
                );
            }
        }
        assert!(seen.iter().all(|&c| c == 1), "{seen:?}");
    }
}

#[test]
fn sft_refuses_a_host_reference_naming_the_field() {
    let cfg = init::tiny_config(24, 1, 4, 2, 40, 80, false);
    let host = init::random_params(&cfg, 1);
    let model = Model::from_host(&Cpu, cfg, &host).unwrap();
    let mut c = tooln1::train::config::SftConfig::default();
    c.memory.reference = tooln1::train::config::Place::Host;
    let items = vec![tooln1::train::sft::SftItem {
        tokens: vec![1, 2, 3],
        prompt_len: 1,
    }];
    let e = tooln1::train::SftTrainer::new(Cpu, model, items, c)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("memory.reference"), "{e}");
}
