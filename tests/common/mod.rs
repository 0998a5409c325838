//! Helpers shared by the CUDA test files: opening the device (and when a test may skip), the
//! seeded random inputs, and the error checks.
//!
//! Skips: only `Error::NoCuda` (no driver library, no device) skips a test, with one
//! "skipped: no CUDA device (...)" line on stderr. Any other error from `Cuda::new()` (a kernel
//! module that fails to load, a missing cuBLAS next to a working driver, a driver too old for
//! the API) fails the test. With `TOOLN1_REQUIRE_CUDA=1` every skip fails too, so that a run on
//! a GPU (or the virtual GPU) cannot report green without executing anything.
//!
//! Seeds: every randomized test prints its seed; `TOOLN1_TEST_SEED=<n>` replays it.
//!
//! Error checks ([`check`]): the relative-norm error ‖got − want‖ / ‖want‖ must be below the
//! per-path bound, and, beside it, every single element must satisfy
//! |got − want| ≤ 2 · bound · max|want| + 1e-6. The norm alone hides one wrong element among
//! many (one wrong value in a 43k-element tensor moves the norm by about 5e-3); the elementwise
//! bound catches it while passing bf16 rounding (at most 2^-9 ≈ 2e-3 of the element itself, so
//! of max|want|) and f32 accumulation noise. NaN or an infinity never passes.

#![allow(dead_code)]

pub mod contract;
pub mod paged;
pub mod placement;
pub mod train;

use tooln1::backend::cuda::Cuda;
use tooln1::backend::Backend;
use tooln1::{tooln1_skip, Error};

/// Whether `TOOLN1_REQUIRE_CUDA=1` turns every skip into a failure.
pub fn require_cuda() -> bool {
    std::env::var("TOOLN1_REQUIRE_CUDA").is_ok_and(|v| v == "1")
}

/// Skips the calling test with a printed reason, or panics with it under
/// `TOOLN1_REQUIRE_CUDA=1`.
pub fn skip(reason: &str) {
    if require_cuda() {
        panic!("TOOLN1_REQUIRE_CUDA=1 but this test would be skipped: {reason}");
    }
    tooln1_skip!("skipped: {reason}");
}

/// The CUDA backend on device 0; `None` (after the skip line) only when there is no CUDA
/// device. Every other error fails the test.
pub fn gpu() -> Option<Cuda> {
    match Cuda::new() {
        Ok(c) => Some(c),
        Err(Error::NoCuda(why)) => {
            skip(&format!("no CUDA device ({why})"));
            None
        }
        Err(e) => panic!("Cuda::new() failed on a machine with a CUDA driver: {e}"),
    }
}

/// The seed of a randomized test: `TOOLN1_TEST_SEED` when set, else fresh from the clock.
/// Printed either way so that a failure can be replayed.
pub fn seed(tag: &str) -> u64 {
    let s = match std::env::var("TOOLN1_TEST_SEED") {
        Ok(v) => v
            .trim()
            .parse::<u64>()
            .unwrap_or_else(|_| panic!("TOOLN1_TEST_SEED={v:?} is not an unsigned integer")),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
    };
    println!("{tag}: seed {s} (replay with TOOLN1_TEST_SEED={s})");
    s
}

/// f64 reference values as the f32 inputs of a backend.
pub fn to32(x: &[f64]) -> Vec<f32> {
    x.iter().map(|&v| v as f32).collect()
}

/// xorshift64 (Marsaglia 2003) over the test seed.
pub struct Rng(u64);
impl Rng {
    pub fn new(tag: &str) -> Rng {
        Rng::from_seed(seed(tag))
    }
    pub fn from_seed(s: u64) -> Rng {
        // Mix so that nearby seeds give unrelated streams; never 0 (a fixed point).
        Rng(tooln1::backend::cpu::math::splitmix64(s) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Uniform in [0, 1).
    pub fn uni(&mut self) -> f32 {
        (self.next() >> 40) as f32 / 16777216.0
    }
    /// `n` values uniform in [-scale, scale).
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| (self.uni() * 2.0 - 1.0) * scale).collect()
    }
    /// Uniform in [0, n).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Relative-norm error ‖got − want‖ / ‖want‖ (infinite when `got` holds NaN or an infinity).
pub fn rel(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "length mismatch");
    let mut num = 0.0;
    let mut den = 0.0;
    for (g, w) in got.iter().zip(want) {
        if !g.is_finite() {
            return f64::INFINITY;
        }
        num += (*g as f64 - w).powi(2);
        den += w * w;
    }
    (num / den.max(1e-30)).sqrt()
}

/// The worst element: (index, |got − want|), infinite for a non-finite `got`.
pub fn max_abs(got: &[f32], want: &[f64]) -> (usize, f64) {
    let mut worst = (0, 0.0f64);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let d = if g.is_finite() {
            (*g as f64 - w).abs()
        } else {
            f64::INFINITY
        };
        if d > worst.1 || (d.is_infinite() && !worst.1.is_infinite()) {
            worst = (i, d);
        }
    }
    worst
}

/// Relative-norm error below `bound` and every element within 2·bound·max|want| + 1e-6.
pub fn check(name: &str, got: &[f32], want: &[f64], bound: f64) {
    let e = rel(got, want);
    let scale = want.iter().fold(0.0f64, |m, w| m.max(w.abs()));
    let tol = 2.0 * bound * scale + 1e-6;
    let (i, d) = max_abs(got, want);
    println!(
        "{name}: rel err {e:.3e} (bound {bound:.0e}), max abs err {d:.3e} at {i} (bound {tol:.3e})"
    );
    assert!(e < bound, "{name}: relative error {e} >= {bound}");
    assert!(
        d <= tol,
        "{name}: element {i} is {} where {} is expected (|diff| {d:.3e} > {tol:.3e} = 2 * {bound:.0e} * max|want| + 1e-6)",
        got[i],
        want[i]
    );
}

/// [`check`] against f32 expectations.
pub fn check32(name: &str, got: &[f32], want: &[f32], bound: f64) {
    let w: Vec<f64> = want.iter().map(|&x| x as f64).collect();
    check(name, got, &w, bound);
}

/// Uploads as bf16 and returns the rounded values the device holds.
pub fn up(c: &Cuda, v: &[f32]) -> (<Cuda as Backend>::T, Vec<f32>) {
    let t = c.upload(v).unwrap();
    let r = c.download(&t, v.len()).unwrap();
    (t, r)
}

/// A bf16 buffer of `n` NaNs.
pub fn poison(c: &Cuda, n: usize) -> <Cuda as Backend>::T {
    c.upload(&vec![f32::NAN; n]).unwrap()
}

/// An f32 buffer of `n` NaNs.
pub fn poison_f32(c: &Cuda, n: usize) -> <Cuda as Backend>::F {
    c.upload_f32(&vec![f32::NAN; n]).unwrap()
}

/// `v` rounded to bf16 (what the CUDA backend stores).
pub fn bf16_round(v: &[f32]) -> Vec<f32> {
    v.iter()
        .map(|&x| half::bf16::from_f32(x).to_f32())
        .collect()
}

/// [`Backend::sample`] with draw r reading logits row r at stream offset `offset + r` (the
/// per-row offsets of a plain batch of `rows` rows).
#[allow(clippy::too_many_arguments)]
pub fn sample_at<B: Backend>(
    b: &B,
    logits: &B::F,
    out: &mut B::I,
    rows: usize,
    vocab: usize,
    temperature: f32,
    top_p: f32,
    top_k: usize,
    seed: u64,
    offset: u64,
) -> tooln1::Result<()> {
    let offsets: Vec<u64> = (0..rows as u64).map(|r| offset.wrapping_add(r)).collect();
    let p = tooln1::backend::SampleParams {
        temperature,
        top_p,
        top_k,
        seed,
    };
    b.sample(
        logits,
        out,
        &tooln1::backend::SampleRows::each(&offsets, vocab),
        &p,
    )
}

/// Runs a rollout under many schedules on backend `b` and checks that the generations never
/// change: slot counts from 1 to more than the sequences, prompt-major, reversed and shuffled
/// admission, one shared prefill per prompt or a prefill per sequence. Also checks the work
/// counts: one prefill per prompt when shared (prompt-major), one per sequence otherwise, and
/// decode rows only for the tokens that needed one (finished rows cost nothing). `schedules`
/// limits the runs (the virtual GPU is slow). Returns the generations.
pub fn check_rollout_schedules<B: Backend>(
    b: &B,
    model: &tooln1::model::Model<B>,
    prompts: &[Vec<u32>],
    n: usize,
    sp: &tooln1::train::rollout::SamplingParams,
    stream: tooln1::train::rollout::Stream,
    schedules: usize,
) -> Vec<tooln1::train::rollout::Generation> {
    use tooln1::train::rollout::{generate_with, Schedule};
    let total = prompts.len() * n;
    let mut rng = Rng::from_seed(stream.seed);
    let mut shuffled: Vec<usize> = (0..total).collect();
    for i in (1..total).rev() {
        shuffled.swap(i, rng.below(i + 1));
    }
    let reversed: Vec<usize> = (0..total).rev().collect();
    let mut sp_ref = sp.clone();
    sp_ref.max_slots = total.max(1);
    let (want, st) = generate_with(b, model, prompts, n, &sp_ref, stream, &Schedule::default())
        .expect("reference rollout");
    assert_eq!(st.prefills, prompts.len(), "one prefill per prompt");
    let decode_rows: usize = want.iter().map(|g| g.tokens.len().saturating_sub(1)).sum();
    assert_eq!(st.decode.rows as usize, decode_rows, "decode rows");
    let orders: [Option<Vec<usize>>; 3] = [None, Some(reversed), Some(shuffled)];
    // (max_slots, order, prefill_each), most telling first.
    let cases = [
        (1usize, 0usize, false),
        (2, 2, true),
        (3, 1, false),
        (total + 3, 0, true),
        (5, 2, false),
        (1, 1, true),
        (2, 0, false),
        (3, 2, true),
        (5, 0, true),
        (total + 3, 1, false),
    ];
    let mut runs = 0;
    for &(slots, o, prefill_each) in cases.iter().take(schedules) {
        runs += 1;
        let order = &orders[o];
        let mut s = sp.clone();
        s.max_slots = slots;
        let sched = Schedule {
            order: order.clone(),
            prefill_each,
            ..Schedule::default()
        };
        let (got, st) = generate_with(b, model, prompts, n, &s, stream, &sched).expect("rollout");
        assert_eq!(
            got, want,
            "max_slots {slots}, order {order:?}, prefill_each {prefill_each}"
        );
        assert_eq!(st.decode.rows as usize, decode_rows, "decode rows");
        if prefill_each {
            assert_eq!(st.prefills, total, "a prefill per sequence");
        } else if order.is_none() {
            assert_eq!(st.prefills, prompts.len(), "one prefill per prompt");
        }
        assert!(st.prefill.rows <= st.naive_prefill.rows);
        assert!(st.decode.rows <= st.naive_decode.rows);
    }
    println!("rollout: {runs} schedules gave the same {total} generations");
    want
}

/// The paged KV cache against the memory of the slot cache it replaces: a pool of the rows
/// `old_slots` slots of `max_len` rows held (`block_size`-row blocks) runs more sequences at
/// once than `old_slots` (the prompt stored once per group, blocks taken as sequences grow),
/// with the generations of an unconstrained rollout; then the smallest pool that can run a
/// sequence (preempting and recomputing), prompt-major and shuffled, gives them again. The
/// prompt-major order must reach more than `old_slots` concurrent sequences. Returns the
/// stats of the same-memory run.
pub fn check_paged_rollout<B: Backend>(
    b: &B,
    model: &tooln1::model::Model<B>,
    prompts: &[Vec<u32>],
    n: usize,
    sp: &tooln1::train::rollout::SamplingParams,
    stream: tooln1::train::rollout::Stream,
) -> tooln1::train::rollout::RolloutStats {
    use tooln1::train::rollout::{generate_with, Schedule};
    let (total, old_slots, block_size) = (prompts.len() * n, 2usize, 4usize);
    let max_len = prompts.iter().map(|p| p.len()).max().unwrap() + sp.max_new_tokens;
    let mut wide = sp.clone();
    wide.max_slots = total;
    let (want, st_want) = generate_with(b, model, prompts, n, &wide, stream, &Schedule::default())
        .expect("reference rollout");
    assert_eq!(st_want.preemptions, 0, "the default pool never preempts");
    let old_rows = old_slots * max_len;
    let same_memory = Schedule {
        kv_block_size: Some(block_size),
        kv_blocks: Some(old_rows / block_size),
        ..Schedule::default()
    };
    let (got, st) = generate_with(b, model, prompts, n, &wide, stream, &same_memory)
        .expect("same-memory rollout");
    assert_eq!(
        got, want,
        "the paged pool of {old_rows} rows changed the generations"
    );
    println!(
        "paged rollout: {} blocks of {block_size} rows ({old_rows} rows, {old_slots} slots of \
         {max_len} before): peak {} blocks, {} concurrent sequences, {} preemptions, {} \
         copy-on-write block copies",
        st.kv_blocks, st.peak_blocks, st.peak_concurrent, st.preemptions, st.block_copies
    );
    assert!(st.peak_blocks <= st.kv_blocks);
    assert!(
        st.peak_concurrent > old_slots,
        "the paged pool ran at most {} sequences at once, the slot cache {old_slots}",
        st.peak_concurrent
    );
    let per_seq = max_len.div_ceil(block_size);
    let mut rng = Rng::from_seed(stream.seed ^ 0x9e37);
    let mut shuffled: Vec<usize> = (0..total).collect();
    for i in (1..total).rev() {
        shuffled.swap(i, rng.below(i + 1));
    }
    for order in [None, Some(shuffled)] {
        let tight = Schedule {
            order: order.clone(),
            kv_block_size: Some(block_size),
            kv_blocks: Some(per_seq + 1),
            ..Schedule::default()
        };
        let (got, st) =
            generate_with(b, model, prompts, n, &wide, stream, &tight).expect("tight rollout");
        assert_eq!(
            got,
            want,
            "a pool of {} blocks, order {order:?}",
            per_seq + 1
        );
        println!(
            "paged rollout, {} blocks, order {order:?}: {} preemptions, {} prompt evictions, \
             {} prefills",
            per_seq + 1,
            st.preemptions,
            st.prompt_evictions,
            st.prefills
        );
    }
    let small = tooln1::train::rollout::Schedule {
        kv_block_size: Some(block_size),
        kv_blocks: Some(per_seq),
        ..Schedule::default()
    };
    let e = generate_with(b, model, prompts, n, &wide, stream, &small).unwrap_err();
    assert!(e.to_string().contains("cannot hold one sequence"), "{e}");
    st
}
