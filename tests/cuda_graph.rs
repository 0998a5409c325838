//! The decode step replayed as a CUDA graph (`model::decode_graph`) against plain decode on
//! the device: the same logits bit for bit (on the virtual GPU, where a row's results do not
//! depend on the row count; on a GPU cuBLAS may pick other kernels for a padded batch) and the
//! same KV-cache rows, over several steps with sequences finishing (the bucket shrinking) and
//! odd batch sizes (padding rows), at GQA 7:1 with head_dim 64 and GQA 2:1 with head_dim 128;
//! a rollout with graphs against one without; the fallbacks (a streamed model, the CPU
//! backend, `plain_decode`) and a capture the driver invalidates. Random models and prompts
//! from a fresh seed each run (printed; `TOOLN1_TEST_SEED` replays it). Without a GPU the
//! device tests print "skipped: no CUDA device (...)"; TOOLN1_REQUIRE_CUDA=1 fails instead.

mod common;

use common::{gpu, seed, Rng};
use tooln1::backend::cpu::Cpu;
use tooln1::backend::Backend;
use tooln1::model::{init, DecodeGraphs, KvShape, Model};
use tooln1::train::rollout::{generate_with, SamplingParams, Schedule, Stream};

/// Prefills `n0` random prompts into two caches, then decodes a step per entry of `sizes` (the
/// leading slots that decode: sequences finishing, then slots decoding again, so the buckets'
/// graphs, which share one arena, replay in turn) plainly on one and through graphs on the
/// other; compares the logits of every step and, at the end, every cache row outside the
/// scratch block.
fn graph_vs_plain(tag: &str, cfg: tooln1::model::Qwen2Config, n0: usize, sizes: &[usize]) {
    let steps = sizes.len();
    let Some(cuda) = gpu() else { return };
    let s = seed(tag);
    let mut r = Rng::from_seed(s);
    let vocab = cfg.vocab_size;
    let m = Model::random(&cuda, cfg, s).unwrap();
    let prompts: Vec<Vec<u32>> = (0..n0)
        .map(|_| {
            let l = 1 + r.below(9);
            (0..l).map(|_| r.below(vocab) as u32).collect()
        })
        .collect();
    let shape = KvShape {
        slots: n0,
        max_len: 10 + steps,
        block_size: 4,
        n_blocks: n0 * (10 + steps).div_ceil(4) + 1,
    };
    let mut plain = m.new_paged_cache(&cuda, shape).unwrap();
    let mut graphed = m.new_paged_cache(&cuda, shape).unwrap();
    let lp = m.prefill(&cuda, &mut plain, &prompts).unwrap();
    let lg = m.prefill(&cuda, &mut graphed, &prompts).unwrap();
    let first = cuda.download_f32(&lp, n0 * vocab).unwrap();
    assert_eq!(first, cuda.download_f32(&lg, n0 * vocab).unwrap());
    let argmax = |row: &[f32]| {
        (0..row.len())
            .max_by(|&a, &b| row[a].total_cmp(&row[b]).then(b.cmp(&a)))
            .unwrap() as u32
    };
    let mut feed: Vec<u32> = first.chunks(vocab).map(argmax).collect();
    let mut graphs = DecodeGraphs::new(true, n0.next_power_of_two());
    for (step, &n) in sizes.iter().enumerate() {
        let want = m.decode(&cuda, &mut plain, &feed[..n]).unwrap();
        let want = cuda.download_f32(&want, n * vocab).unwrap();
        let (got, rows) = m
            .decode_graphed(&cuda, &mut graphed, &feed[..n], &mut graphs)
            .unwrap();
        assert!(rows >= n, "{rows} logits rows for {n} sequences");
        let got = cuda.download_f32(got, rows * vocab).unwrap();
        let same = want
            .iter()
            .zip(&got[..n * vocab])
            .filter(|(a, b)| a.to_bits() == b.to_bits())
            .count();
        assert_eq!(
            same,
            n * vocab,
            "{tag} (seed {s}): step {step}, {n} sequences in a bucket of {rows}: {} of {} logits \
             differ from plain decode",
            n * vocab - same,
            n * vocab
        );
        assert_eq!(plain.lens, graphed.lens);
        let next: Vec<u32> = want.chunks(vocab).map(argmax).collect();
        feed[..n].copy_from_slice(&next);
    }
    let st = graphs.stats.clone();
    assert_eq!(st.fallback, None, "{tag}: graphs refused");
    assert_eq!(st.replays, steps);
    assert_eq!(st.plain_steps, 0);
    let mut buckets: Vec<usize> = sizes
        .iter()
        .map(|&k| *graphs.buckets().iter().find(|&&b| b >= k).unwrap())
        .collect();
    buckets.sort_unstable();
    buckets.dedup();
    assert_eq!(st.captures, buckets.len(), "one capture per bucket used");
    assert!(st.padded_rows > 0, "{tag}: no step was padded ({sizes:?})");
    drop(graphs);
    // The caches agree on every row outside the scratch block, which only padding touches.
    let rows = plain.pool.n_blocks() * plain.block_size * plain.kv_width;
    for l in 0..plain.k.len() {
        for (what, a, b) in [
            ("k", &plain.k[l], &graphed.k[l]),
            ("v", &plain.v[l], &graphed.v[l]),
        ] {
            let a = cuda.download(a, rows).unwrap();
            let b = cuda.download(b, rows).unwrap();
            let diff = a
                .iter()
                .zip(&b)
                .filter(|(x, y)| x.to_bits() != y.to_bits())
                .count();
            assert_eq!(
                diff, 0,
                "{tag}: layer {l} {what} cache: {diff} elements differ"
            );
        }
    }
    println!(
        "{tag}: {steps} steps over batch sizes {sizes:?}: {} replays, {} captures, {} padding \
         rows, the same logits and cache rows as plain decode",
        st.replays, st.captures, st.padded_rows
    );
}

#[test]
fn graph_decode_gqa7_head_dim_64_matches_plain() {
    // 14 query heads over 2 kv heads of 64; 7 sequences (bucket 8), shrinking to 1, then the
    // paused slots decoding again (fed their last token).
    let cfg = init::tiny_config(896, 2, 14, 2, 160, 151, true);
    graph_vs_plain("graph_gqa7_d64", cfg, 7, &[7, 7, 5, 5, 3, 3, 1, 1, 3, 7, 2]);
}

#[test]
fn graph_decode_gqa2_head_dim_128_matches_plain() {
    // 2 query heads over 1 kv head of 128, untied lm_head; 5 sequences (bucket 8).
    let cfg = init::tiny_config(256, 1, 2, 1, 96, 97, false);
    graph_vs_plain("graph_gqa2_d128", cfg, 5, &[5, 5, 3, 3, 1, 5, 2, 1]);
}

fn rollout_setup(
    tag: &str,
) -> (
    u64,
    Vec<Vec<u32>>,
    SamplingParams,
    tooln1::model::Qwen2Config,
) {
    let s = seed(tag);
    let mut r = Rng::from_seed(s);
    let prompts: Vec<Vec<u32>> = [5usize, 9, 2]
        .iter()
        .map(|&l| (0..l).map(|_| r.below(211) as u32).collect())
        .collect();
    let sp = SamplingParams {
        temperature: 1.0,
        top_p: 1.0,
        top_k: 0,
        max_new_tokens: 6,
        stop: (0..20).collect(),
        max_slots: 5,
    };
    (
        s,
        prompts,
        sp,
        init::tiny_config(128, 1, 2, 1, 256, 211, true),
    )
}

/// A rollout decoding through graphs gives the generations of one with plain launches.
#[test]
fn rollout_with_graphs_equals_plain() {
    let Some(cuda) = gpu() else { return };
    let (s, prompts, sp, cfg) = rollout_setup("graph_rollout");
    let m = Model::random(&cuda, cfg, s).unwrap();
    let stream = Stream::new(s, 3);
    let plain = Schedule {
        plain_decode: true,
        ..Schedule::default()
    };
    // With stop tokens (sequences end at different steps, batches shrink), then without: the
    // 9 sequences all run 6 tokens over 6 slots, so the last 3 decode padded to a bucket of 4.
    for (stop, slots) in [((0..20).collect::<Vec<u32>>(), 5usize), (Vec::new(), 6)] {
        let sp = SamplingParams {
            stop: stop.clone(),
            max_slots: slots,
            ..sp.clone()
        };
        let (want, st_plain) = generate_with(&cuda, &m, &prompts, 3, &sp, stream, &plain).unwrap();
        let (got, st) =
            generate_with(&cuda, &m, &prompts, 3, &sp, stream, &Schedule::default()).unwrap();
        assert_eq!(got, want, "seed {s}: graphs changed the generations");
        assert_eq!(st_plain.graph_replays, 0);
        // With stop tokens every sequence may end at its first token (drawn from the prefill's
        // logits), leaving no decode step; without them each runs 6 tokens.
        assert!(!stop.is_empty() || st_plain.plain_decode_steps > 0);
        assert_eq!(
            st.plain_decode_steps, 0,
            "a step fell back to plain launches"
        );
        assert_eq!(st.graph_replays, st_plain.plain_decode_steps);
        assert!(st.graph_replays == 0 || st.graph_captures >= 1);
        println!(
            "rollout: {} decode steps, {} graphs captured, {} padding rows, the same {} generations",
            st.graph_replays,
            st.graph_captures,
            st.graph_padded_rows,
            got.len()
        );
        if stop.is_empty() {
            assert!(st.graph_padded_rows > 0, "no padded step");
        }
    }
}

/// Where graphs are unavailable the steps run plainly, with the reason kept: the CPU backend,
/// and a model whose layers are streamed from host memory.
#[test]
fn graphs_unavailable_fall_back() {
    let (s, prompts, sp, cfg) = rollout_setup("graph_fallback");
    let stream = Stream::new(s, 5);
    let cpu_model = Model::random(&Cpu, cfg.clone(), s).unwrap();
    let (_, st) = generate_with(
        &Cpu,
        &cpu_model,
        &prompts,
        2,
        &sp,
        stream,
        &Schedule::default(),
    )
    .unwrap();
    assert_eq!(st.graph_replays, 0);
    assert!(st.plain_decode_steps > 0);
    let mut cache = cpu_model
        .new_paged_cache(
            &Cpu,
            KvShape {
                slots: 1,
                max_len: 16,
                block_size: 4,
                n_blocks: 5,
            },
        )
        .unwrap();
    cpu_model.prefill(&Cpu, &mut cache, &prompts[..1]).unwrap();
    let mut g = DecodeGraphs::new(true, 1);
    cpu_model
        .decode_graphed(&Cpu, &mut cache, &[1], &mut g)
        .unwrap();
    assert!(
        g.fallback().is_some_and(|w| w.contains("no graphs")),
        "{:?}",
        g.fallback()
    );
    let Some(cuda) = gpu() else { return };
    let resident = Model::random(&cuda, cfg, s).unwrap();
    let (want, _) = generate_with(
        &cuda,
        &resident,
        &prompts,
        2,
        &sp,
        stream,
        &Schedule::default(),
    )
    .unwrap();
    let streamed = resident.into_streamed(&cuda).unwrap();
    let (got, st) = generate_with(
        &cuda,
        &streamed,
        &prompts,
        2,
        &sp,
        stream,
        &Schedule::default(),
    )
    .unwrap();
    assert_eq!(got, want, "seed {s}: the streamed model's plain decode");
    assert_eq!(
        st.graph_replays, 0,
        "a streamed model never replays a graph"
    );
    assert!(st.plain_decode_steps > 0);
}

/// A call the driver forbids while the stream captures (a download waits for the stream)
/// fails, and so does the end of the capture, which leaves the stream usable.
#[test]
fn illegal_call_during_capture_errors() {
    let Some(cuda) = gpu() else { return };
    let x = cuda.upload_u32(&[1, 2, 3]).unwrap();
    assert!(cuda.capture_begin(None).unwrap());
    let e = cuda.download_u32(&x, 3).unwrap_err().to_string();
    assert!(e.contains("CAPTURE"), "{e}");
    let e = cuda
        .capture_end()
        .err()
        .expect("an invalidated capture")
        .to_string();
    assert!(e.contains("INVALIDATED"), "{e}");
    assert_eq!(cuda.download_u32(&x, 3).unwrap(), vec![1, 2, 3]);
    // A capture without illegal calls replays its work at each launch, not before.
    let mut y = cuda.upload_u32(&[0, 0, 0]).unwrap();
    assert!(cuda.capture_begin(None).unwrap());
    cuda.copy_u32_at(&x, 1, &mut y, 2).unwrap();
    let g = cuda.capture_end().unwrap();
    assert_eq!(cuda.download_u32(&y, 3).unwrap(), vec![0, 0, 0]);
    g.launch().unwrap();
    assert_eq!(cuda.download_u32(&y, 3).unwrap(), vec![2, 3, 0]);
    cuda.write_u32(&mut y, &[9, 9, 9]).unwrap();
    g.launch().unwrap();
    assert_eq!(cuda.download_u32(&y, 3).unwrap(), vec![2, 3, 9]);
}
