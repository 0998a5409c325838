//! Rollouts: reproducible sampling stream, independence from the KV-cache split, greedy decoding
//! consistent with a teacher-forced pass, stop tokens, and the continuous-batching schedule
//! (slot counts, admission orders, shared or per-sequence prefill) leaving every generation
//! unchanged. Seeds are printed; `TOOLN1_TEST_SEED` replays one.

mod common;

use tooln1::backend::cpu::Cpu;
use tooln1::model::{init, Model, PackedBatch};
use tooln1::train::rollout::{
    generate, generate_with, stream_len, SamplingParams, Schedule, Stream,
};

fn seed() -> u64 {
    common::seed("rollout")
}

fn model(seed: u64, vocab: usize) -> Model<Cpu> {
    let cfg = init::tiny_config(32, 2, 4, 2, 48, vocab, seed % 2 == 0);
    let host = init::random_params(&cfg, seed);
    Model::from_host(&Cpu, cfg, &host).unwrap()
}

fn prompts(seed: u64, vocab: u32) -> Vec<Vec<u32>> {
    let lens = [3usize, 7, 1, 5];
    lens.iter()
        .enumerate()
        .map(|(i, &l)| {
            (0..l)
                .map(|j| ((seed as u32).wrapping_mul(31) ^ (i as u32 * 17 + j as u32 * 7)) % vocab)
                .collect()
        })
        .collect()
}

#[test]
fn sampling_is_reproducible_and_split_independent() {
    let s = seed();
    let m = model(s, 61);
    let ps = prompts(s, 61);
    let mut sp = SamplingParams {
        temperature: 1.0,
        top_p: 1.0,
        top_k: 0,
        max_new_tokens: 9,
        stop: vec![5],
        max_slots: 256,
    };
    let a = generate(&Cpu, &m, &ps, 3, &sp, s, 100).unwrap();
    let b = generate(&Cpu, &m, &ps, 3, &sp, s, 100).unwrap();
    assert_eq!(a, b, "same seed and offset must give the same responses");
    assert_eq!(a.len(), 12);
    for (i, g) in a.iter().enumerate() {
        assert_eq!(g.prompt, i / 3);
        assert!(!g.tokens.is_empty() && g.tokens.len() <= 9);
        if g.stopped {
            assert_eq!(*g.tokens.last().unwrap(), 5);
            assert!(!g.tokens[..g.tokens.len() - 1].contains(&5));
            assert_eq!(g.content().len(), g.tokens.len() - 1);
        } else {
            assert_eq!(g.tokens.len(), 9);
            assert!(!g.tokens.contains(&5));
        }
    }
    // Splitting the sequences over several KV caches draws the same numbers.
    for slots in [1, 4, 5] {
        sp.max_slots = slots;
        let c = generate(&Cpu, &m, &ps, 3, &sp, s, 100).unwrap();
        assert_eq!(a, c, "max_slots {slots} changed the responses");
    }
    // A different offset gives different draws (with overwhelming probability over 12 x 9).
    sp.max_slots = 256;
    let d = generate(&Cpu, &m, &ps, 3, &sp, s, 100 + stream_len(4, 3, 9)).unwrap();
    assert_ne!(a, d);
}

#[test]
fn greedy_follows_teacher_forced_argmax() {
    let s = seed();
    let vocab = 53;
    let m = model(s, vocab);
    let ps = prompts(s, vocab as u32);
    let sp = SamplingParams::greedy(8, vec![]);
    let gens = generate(&Cpu, &m, &ps, 2, &sp, s, 0).unwrap();
    for g in &gens {
        assert_eq!(g.tokens.len(), 8);
        assert!(!g.stopped);
    }
    // Both samples of a prompt are identical under greedy decoding.
    for p in 0..ps.len() {
        assert_eq!(gens[2 * p].tokens, gens[2 * p + 1].tokens);
    }
    for (p, prompt) in ps.iter().enumerate() {
        let g = &gens[2 * p];
        let mut full = prompt.clone();
        full.extend_from_slice(&g.tokens);
        let batch = PackedBatch::from_sequences(&[full.clone()]).unwrap();
        let db = m.upload_batch(&Cpu, &batch).unwrap();
        let logits = m.forward_logits(&Cpu, &db).unwrap();
        for (j, &tok) in g.tokens.iter().enumerate() {
            let row = &logits[(prompt.len() - 1 + j) * vocab..(prompt.len() + j) * vocab];
            let (best, bv) = row
                .iter()
                .enumerate()
                .fold(
                    (0, f32::NEG_INFINITY),
                    |acc, (i, &v)| {
                        if v > acc.1 {
                            (i, v)
                        } else {
                            acc
                        }
                    },
                );
            assert!(
                best as u32 == tok || (bv - row[tok as usize]).abs() < 1e-4,
                "prompt {p} step {j}: generated {tok}, teacher-forced argmax {best}"
            );
        }
    }
}

#[test]
fn stop_token_ends_generation() {
    let s = seed();
    let vocab = 41;
    let m = model(s, vocab);
    let ps = prompts(s, vocab as u32);
    // Whatever greedy picks first becomes the stop token: every response is exactly that token.
    let first = generate(&Cpu, &m, &ps, 1, &SamplingParams::greedy(1, vec![]), 0, 0).unwrap();
    for (p, g) in first.iter().enumerate() {
        let sp = SamplingParams::greedy(6, vec![g.tokens[0]]);
        let out = generate(&Cpu, &m, &ps[p..p + 1], 1, &sp, 0, 0).unwrap();
        assert_eq!(out[0].tokens, vec![g.tokens[0]]);
        assert!(out[0].stopped);
        assert!(out[0].content().is_empty());
    }
    // Empty prompts are refused.
    let e = generate(
        &Cpu,
        &m,
        &[vec![]],
        1,
        &SamplingParams::greedy(2, vec![]),
        0,
        0,
    );
    assert!(e.is_err());
}

/// Random prompts of odd lengths, several stop tokens so that responses stop at different
/// lengths (and some at their first token), n = 3: every schedule gives the same generations,
/// and shared prefill does one prefill per prompt and fewer decode rows than the static batch.
#[test]
fn continuous_batching_is_schedule_independent() {
    let s = seed();
    let vocab = 61;
    let m = model(s, vocab);
    let mut r = common::Rng::from_seed(s);
    let ps: Vec<Vec<u32>> = [5usize, 1, 9, 3, 7, 2]
        .iter()
        .map(|&l| (0..l).map(|_| r.below(vocab) as u32).collect())
        .collect();
    let sp = SamplingParams {
        temperature: 1.0,
        top_p: 0.95,
        top_k: 0,
        max_new_tokens: 13,
        stop: vec![3, 5, 7, 11, 13, 17, 19],
        max_slots: 4,
    };
    let stream = Stream::new(s, 1000);
    let gens = common::check_rollout_schedules(&Cpu, &m, &ps, 3, &sp, stream, 10);
    let mut lens: Vec<usize> = gens.iter().map(|g| g.tokens.len()).collect();
    lens.sort();
    lens.dedup();
    println!("response lengths {lens:?}");
    assert!(
        lens.len() >= 2,
        "responses should end at different lengths: {lens:?}"
    );
    // The plain entry point is the prompt-major schedule.
    assert_eq!(generate(&Cpu, &m, &ps, 3, &sp, s, 1000).unwrap(), gens);
    // Greedy: all samples of a prompt equal; a length cap of 1 decodes nothing.
    let g1 = SamplingParams::greedy(1, vec![]);
    let (one, st) = generate_with(&Cpu, &m, &ps, 4, &g1, stream, &Schedule::default()).unwrap();
    assert!(one.iter().all(|g| g.tokens.len() == 1));
    assert_eq!((st.decode.rows, st.prefills), (0, ps.len()));
    // A bad admission order is an error.
    let bad = Schedule {
        order: Some(vec![0; ps.len() * 3]),
        ..Schedule::default()
    };
    assert!(generate_with(&Cpu, &m, &ps, 3, &sp, stream, &bad).is_err());
}

/// The paged KV cache: more sequences at once than the slot cache in the same memory, the
/// smallest pool (preempting), and a pool too small for one sequence refused; the same
/// generations throughout (see `common::check_paged_rollout`).
#[test]
fn paged_cache_runs_more_sequences_in_the_same_memory() {
    let s = seed();
    let m = model(s, 61);
    let ps = prompts(s, 61);
    let sp = SamplingParams {
        temperature: 1.0,
        top_p: 1.0,
        top_k: 0,
        max_new_tokens: 9,
        stop: vec![5],
        max_slots: 256,
    };
    common::check_paged_rollout(&Cpu, &m, &ps, 4, &sp, Stream::new(s, 3));
}
