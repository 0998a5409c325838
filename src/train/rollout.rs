//! Rollouts: `n` sampled responses per prompt, with a KV cache of `max_slots` slots, each prompt
//! prefilled once and its sequences continuously batched.
//!
//! Keying. Sequence `i` (prompt-major order: prompt `i / n`, sample `i % n`) draws its response
//! token `s` from the backend's counter-based stream `(seed, offset + s * total + i)`, where
//! `total` is the number of sequences of the call (of the whole batch, and `i` the index in it,
//! when the call runs one rank's part: [`Stream::within`]). A token therefore depends only on
//! `(seed, offset, i, s)` and the sequence's own logits: not on the slot it ran in, the slot
//! count, the order sequences were admitted in, or which other sequences have stopped. A run is
//! reproducible, and a resumed run (which restores `offset`; one call consumes
//! [`stream_len`]) draws exactly the numbers an uninterrupted one would.
//!
//! Schedule. The sequences wait in a queue (prompt-major, or [`Schedule::order`]). Whenever a
//! slot is free, the next sequence takes it at once: its prompt's cached keys/values come from
//! the slot it frees when it held the same prompt (nothing to do), else from any other slot
//! holding that prompt (a device row copy, [`KvCache::copy_slot`]), else the prompt is
//! prefilled into it (the prompts of one admission round in one packed pass, between two decode
//! steps). The first response token of each of a prompt's `n` samples is drawn from the
//! prompt's last-token logits of that one prefill, so a sample whose first token ends it
//! never takes a slot. Admitting a prompt's samples one after another keeps its rows in some
//! slot until the last one is admitted, so each prompt is prefilled once in prompt-major order.
//! Decode steps run the occupied slots only: they are kept as the leading slots (when the queue
//! is empty, a stopped slot is filled by moving the last occupied one into it), so a stopped
//! sequence costs nothing and a long response holds one slot, never a batch. Prefill is not
//! fused into the decode step's pass (each is its own forward).
//!
//! With the same logits, the tokens are the same whatever the schedule. A row's logits can
//! still differ in the last bits with the shape of the pass it ran in (a GEMM kernel's reduction
//! order may depend on the row count; see `backend/cpu/fast.rs`), which can flip a draw that
//! sits on a boundary. At the tests' sizes the rows do not depend on the pass, and the
//! generations are bit-identical for every `max_slots`, admission order and
//! [`Schedule::prefill_each`] (`tests/rollout.rs`, `tests/cuda_model.rs`).

use std::collections::VecDeque;

use crate::backend::{Backend, SampleParams, SampleRows};
use crate::model::flops::Work;
use crate::model::{KvCache, Model};
use crate::Result;

/// How tokens are drawn.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
    pub max_new_tokens: usize,
    /// Generation stops after any of these (the stop token is kept in the response).
    pub stop: Vec<u32>,
    /// Slots of the KV cache: at most this many sequences decode at a time.
    pub max_slots: usize,
}

impl SamplingParams {
    pub fn greedy(max_new_tokens: usize, stop: Vec<u32>) -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            max_new_tokens,
            stop,
            max_slots: 256,
        }
    }
}

/// The sampling stream of one call: its seed and first counter.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stream<'a> {
    pub seed: u64,
    pub offset: u64,
    /// Set when the call runs part of a larger batch (one rank's groups of a step split over
    /// ranks): keys then follow the sequences' indices in that batch, so every token equals the
    /// one a single call over the whole batch would draw. None: the call is the whole batch.
    pub within: Option<Within<'a>>,
}

impl Stream<'_> {
    /// The stream of a call that is the whole batch.
    pub fn new(seed: u64, offset: u64) -> Stream<'static> {
        Stream {
            seed,
            offset,
            within: None,
        }
    }
}

/// Where a call's prompts sit in a larger batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Within<'a> {
    /// The batch index of each of the call's prompts.
    pub prompt_index: &'a [usize],
    /// The batch's number of prompts.
    pub prompts: usize,
}

/// Scheduling choices of [`generate_with`] that leave the generations unchanged (tests and
/// benchmarks compare them; [`generate`] takes the default).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Schedule {
    /// The order sequences are admitted in: a permutation of the prompt-major indices
    /// `0..prompts.len() * n`; None = prompt-major.
    pub order: Option<Vec<usize>>,
    /// Prefill every sequence's prompt itself and draw its first token from its own logits
    /// (the naive rollout) instead of sharing one prefill among a prompt's samples.
    pub prefill_each: bool,
}

/// One generated response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Generation {
    /// Index of its prompt in the call's `prompts`.
    pub prompt: usize,
    /// Generated ids, including the stop token when one was produced.
    pub tokens: Vec<u32>,
    /// True when a stop token ended it (false: cut at `max_new_tokens`).
    pub stopped: bool,
}

impl Generation {
    /// The generated ids without a trailing stop token.
    pub fn content(&self) -> &[u32] {
        if self.stopped {
            &self.tokens[..self.tokens.len() - 1]
        } else {
            &self.tokens
        }
    }
}

/// What a rollout computed, beside what the naive rollout computes for the same generations:
/// every sequence prefilling its own prompt, in static batches of `max_slots` sequences
/// (prompt-major) that decode until their longest response ends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RolloutStats {
    /// Prefill passes: prompt rows, one logit row per prompt, causal attention pairs.
    pub prefill: Work,
    /// Decode passes: one row per occupied slot and step, its cached positions as pairs.
    pub decode: Work,
    pub naive_prefill: Work,
    pub naive_decode: Work,
    /// Prompts prefilled, slot copies of a prompt's rows, slot moves.
    pub prefills: usize,
    pub slot_copies: usize,
    pub slot_moves: usize,
}

impl RolloutStats {
    /// Prefill + decode work.
    pub fn work(&self) -> Work {
        let mut w = self.prefill;
        w.add(self.decode);
        w
    }
    /// The naive rollout's prefill + decode work.
    pub fn naive_work(&self) -> Work {
        let mut w = self.naive_prefill;
        w.add(self.naive_decode);
        w
    }
}

/// Random numbers one `generate` call consumes from the stream (the caller adds it to its
/// offset).
pub fn stream_len(n_prompts: usize, n: usize, max_new_tokens: usize) -> u64 {
    (n_prompts * n) as u64 * max_new_tokens as u64
}

/// Sample `n` responses for every prompt. Returns them prompt-major (`out[p * n + j]`).
pub fn generate<B: Backend>(
    b: &B,
    model: &Model<B>,
    prompts: &[Vec<u32>],
    n: usize,
    sp: &SamplingParams,
    seed: u64,
    offset: u64,
) -> Result<Vec<Generation>> {
    let stream = Stream::new(seed, offset);
    Ok(generate_with(b, model, prompts, n, sp, stream, &Schedule::default())?.0)
}

/// [`generate`] with a schedule, also returning what it computed.
pub fn generate_with<B: Backend>(
    b: &B,
    model: &Model<B>,
    prompts: &[Vec<u32>],
    n: usize,
    sp: &SamplingParams,
    stream: Stream<'_>,
    sched: &Schedule,
) -> Result<(Vec<Generation>, RolloutStats)> {
    crate::ensure!(n >= 1, "generate: n must be at least 1");
    if let Some(w) = stream.within {
        crate::ensure!(
            w.prompt_index.len() == prompts.len() && w.prompt_index.iter().all(|&p| p < w.prompts),
            "generate: {} batch indices (each below {}) for {} prompts",
            w.prompt_index.len(),
            w.prompts,
            prompts.len()
        );
    }
    crate::ensure!(sp.max_slots >= 1, "generate: max_slots must be at least 1");
    for (i, p) in prompts.iter().enumerate() {
        crate::ensure!(!p.is_empty(), "generate: prompt {i} is empty");
    }
    let total = prompts.len() * n;
    let order: Vec<usize> = match &sched.order {
        Some(o) => {
            let mut seen = vec![false; total];
            let ok = o.len() == total
                && o.iter()
                    .all(|&i| i < total && !std::mem::replace(&mut seen[i], true));
            crate::ensure!(
                ok,
                "generate: the admission order must be a permutation of 0..{total}"
            );
            o.clone()
        }
        None => (0..total).collect(),
    };
    let mut r = Rollout {
        b,
        model,
        prompts,
        n,
        sp,
        stream,
        prefill_each: sched.prefill_each,
        total,
        out: (0..total)
            .map(|i| Generation {
                prompt: i / n,
                tokens: Vec::new(),
                stopped: false,
            })
            .collect(),
        stats: RolloutStats::default(),
    };
    if total > 0 && sp.max_new_tokens > 0 {
        r.run(order)?;
    }
    let stats = r.naive_stats();
    Ok((r.out, stats))
}

/// The state of one `generate_with` call.
struct Rollout<'a, B: Backend> {
    b: &'a B,
    model: &'a Model<B>,
    prompts: &'a [Vec<u32>],
    n: usize,
    sp: &'a SamplingParams,
    stream: Stream<'a>,
    prefill_each: bool,
    total: usize,
    out: Vec<Generation>,
    stats: RolloutStats,
}

/// Per KV-cache slot: the sequence decoding in it, and the prompt whose rows it holds (still
/// valid after its sequence stopped, until the slot is overwritten).
#[derive(Clone, Copy, Default)]
struct Slot {
    seq: Option<usize>,
    held: Option<usize>,
    /// The token to feed at the next decode step.
    feed: u32,
}

/// Where an admitted sequence's prompt rows come from.
#[derive(Clone, Copy, PartialEq)]
enum Source {
    /// The slot already holds them.
    Held,
    /// Copied from another slot.
    Copy(usize),
    /// Prefilled (row `k` of the round's prefill logits).
    Prefill(usize),
}

impl<B: Backend> Rollout<'_, B> {
    fn params(&self) -> SampleParams {
        SampleParams {
            temperature: self.sp.temperature,
            top_p: self.sp.top_p,
            top_k: self.sp.top_k,
            seed: self.stream.seed,
        }
    }

    /// The stream counter of sequence `i`'s response token `s`.
    fn key(&self, i: usize, s: usize) -> u64 {
        let (i, total) = match self.stream.within {
            None => (i, self.total),
            Some(w) => (
                w.prompt_index[i / self.n] * self.n + i % self.n,
                w.prompts * self.n,
            ),
        };
        let c = (s as u64).wrapping_mul(total as u64).wrapping_add(i as u64);
        self.stream.offset.wrapping_add(c)
    }

    /// Append a token to sequence `i`; true when it ends it (a stop token or the length cap).
    fn push(&mut self, i: usize, t: u32) -> bool {
        let g = &mut self.out[i];
        g.tokens.push(t);
        if self.sp.stop.contains(&t) {
            g.stopped = true;
        }
        g.stopped || g.tokens.len() >= self.sp.max_new_tokens
    }

    fn run(&mut self, order: Vec<usize>) -> Result<()> {
        let (b, model) = (self.b, self.model);
        let cap = self.sp.max_slots.min(self.total);
        let max_prompt = self.prompts.iter().map(|p| p.len()).max().unwrap_or(0);
        let max_len = max_prompt.saturating_add(self.sp.max_new_tokens);
        let mut cache = model.new_cache(b, cap, max_len)?;
        let mut slots = vec![Slot::default(); cap];
        let mut first: Vec<Option<u32>> = vec![None; self.total];
        let mut queue: VecDeque<usize> = order.into();
        // Decode draws one token per slot, a prefill round at most n per slot.
        let mut sampled = b.upload_u32(&vec![0u32; cap.saturating_mul(self.n)])?;
        let vocab = model.cfg.vocab_size;
        loop {
            self.admit(&mut cache, &mut slots, &mut first, &mut queue, &mut sampled)?;
            self.compact(&mut cache, &mut slots)?;
            let m = slots.iter().take_while(|s| s.seq.is_some()).count();
            if m == 0 {
                if queue.is_empty() {
                    return Ok(());
                }
                continue;
            }
            let feed: Vec<u32> = slots[..m].iter().map(|s| s.feed).collect();
            // The new token attends to its cached positions and itself.
            self.stats.decode.attn_pairs +=
                cache.lens[..m].iter().map(|&l| l as u64 + 1).sum::<u64>();
            self.stats.decode.rows += m as u64;
            self.stats.decode.logit_rows += m as u64;
            let logits = model.decode(b, &mut cache, &feed)?;
            let offsets: Vec<u64> = slots[..m]
                .iter()
                .map(|s| {
                    let i = s.seq.unwrap_or(0);
                    self.key(i, self.out[i].tokens.len())
                })
                .collect();
            let p = self.params();
            b.sample(
                &logits,
                &mut sampled,
                &SampleRows::each(&offsets, vocab),
                &p,
            )?;
            let toks = b.download_u32(&sampled, m)?;
            for (s, &t) in toks.iter().enumerate() {
                let i = slots[s].seq.unwrap_or(0);
                if self.push(i, t) {
                    slots[s].seq = None;
                } else {
                    slots[s].feed = t;
                }
            }
        }
    }

    /// Fill free slots from the queue until none is free or the queue is empty.
    fn admit(
        &mut self,
        cache: &mut KvCache<B>,
        slots: &mut [Slot],
        first: &mut [Option<u32>],
        queue: &mut VecDeque<usize>,
        sampled: &mut B::I,
    ) -> Result<()> {
        let (b, model, n) = (self.b, self.model, self.n);
        let vocab = model.cfg.vocab_size;
        loop {
            let free: Vec<usize> = (0..slots.len())
                .filter(|&s| slots[s].seq.is_none())
                .collect();
            if free.is_empty() || queue.is_empty() {
                return Ok(());
            }
            // The next sequences, one per free slot; one whose first token is known and ends it
            // needs none.
            let mut take = Vec::new();
            while take.len() < free.len() {
                let Some(i) = queue.pop_front() else { break };
                if let Some(t) = first[i] {
                    if self.push(i, t) {
                        continue;
                    }
                }
                take.push(i);
            }
            // Slots: one that holds the sequence's prompt first, then the lowest free ones.
            let mut slot_of = vec![usize::MAX; take.len()];
            let mut used = vec![false; slots.len()];
            for (k, &i) in take.iter().enumerate() {
                if let Some(&s) = free
                    .iter()
                    .find(|&&s| !used[s] && slots[s].held == Some(i / n) && !self.prefill_each)
                {
                    slot_of[k] = s;
                    used[s] = true;
                }
            }
            let mut rest = free.iter().copied().filter(|&s| !used[s]);
            for s in slot_of.iter_mut().filter(|s| **s == usize::MAX) {
                // take.len() <= free.len(), so a slot is left for each.
                *s = rest.next().unwrap_or(0);
            }
            // Where each one's prompt rows come from.
            let mut source = Vec::with_capacity(take.len());
            let mut pre_slots = Vec::new();
            let mut pre_seq = Vec::new();
            for (k, &i) in take.iter().enumerate() {
                let (p, s) = (i / n, slot_of[k]);
                let src = if self.prefill_each {
                    None
                } else if slots[s].held == Some(p) {
                    Some(Source::Held)
                } else {
                    // A slot holding p that this round does not overwrite (occupied, or free
                    // and not taken), or one of this round's slots that gets p by prefill or
                    // already holds it.
                    let occupied = (0..slots.len()).find(|&o| {
                        slots[o].held == Some(p)
                            && (slots[o].seq.is_some() || !slot_of.contains(&o))
                    });
                    let this_round = (0..k).find(|&j| {
                        take[j] / n == p && matches!(source[j], Source::Held | Source::Prefill(_))
                    });
                    occupied
                        .map(Source::Copy)
                        .or(this_round.map(|j| Source::Copy(slot_of[j])))
                };
                source.push(src.unwrap_or_else(|| {
                    pre_slots.push(s);
                    pre_seq.push(i);
                    Source::Prefill(pre_slots.len() - 1)
                }));
            }
            if !pre_slots.is_empty() {
                let refs: Vec<&[u32]> = pre_seq
                    .iter()
                    .map(|&i| self.prompts[i / n].as_slice())
                    .collect();
                for r in &refs {
                    self.stats.prefill.add(Work::causal(r.len() as u64, 1));
                }
                self.stats.prefills += refs.len();
                let logits = model.prefill_slots(b, cache, &pre_slots, &refs)?;
                // First tokens: every sample of a prefilled prompt not drawn yet (the
                // sequence itself only, when each prefills its own).
                let (mut src, mut offsets, mut who) = (Vec::new(), Vec::new(), Vec::new());
                for (k, &i) in pre_seq.iter().enumerate() {
                    let p = i / n;
                    let seqs: Vec<usize> = if self.prefill_each {
                        vec![i]
                    } else {
                        (p * n..p * n + n).collect()
                    };
                    for j in seqs {
                        if first[j].is_none() && !who.contains(&j) {
                            src.push(k as u32);
                            offsets.push(self.key(j, 0));
                            who.push(j);
                        }
                    }
                }
                if !who.is_empty() {
                    let rows = SampleRows {
                        offsets: &offsets,
                        src: Some(&src),
                        n_rows: pre_seq.len(),
                        vocab,
                    };
                    b.sample(&logits, sampled, &rows, &self.params())?;
                    let toks = b.download_u32(sampled, who.len())?;
                    for (&j, &t) in who.iter().zip(&toks) {
                        first[j] = Some(t);
                    }
                }
            }
            for (k, &i) in take.iter().enumerate() {
                let (p, s) = (i / n, slot_of[k]);
                match source[k] {
                    Source::Held => cache.lens[s] = self.prompts[p].len() as u32,
                    Source::Copy(from) => {
                        cache.copy_slot(b, from, s, self.prompts[p].len())?;
                        self.stats.slot_copies += 1;
                    }
                    Source::Prefill(_) => {}
                }
                slots[s].held = Some(p);
            }
            for (k, &i) in take.iter().enumerate() {
                let s = slot_of[k];
                let t = first[i].unwrap_or(0);
                // A first token known before admission was pushed when the sequence was taken.
                let started = !self.out[i].tokens.is_empty();
                if started || !self.push(i, t) {
                    slots[s].seq = Some(i);
                    slots[s].feed = t;
                }
            }
        }
    }

    /// Keep the occupied slots leading: move the last occupied slot into the first free one
    /// until they are.
    fn compact(&mut self, cache: &mut KvCache<B>, slots: &mut [Slot]) -> Result<()> {
        loop {
            let Some(hole) = slots.iter().position(|s| s.seq.is_none()) else {
                return Ok(());
            };
            let Some(last) = slots.iter().rposition(|s| s.seq.is_some()) else {
                return Ok(());
            };
            if last < hole {
                return Ok(());
            }
            let len = cache.lens[last] as usize;
            cache.copy_slot(self.b, last, hole, len)?;
            self.stats.slot_moves += 1;
            slots[hole] = slots[last];
            slots[last].seq = None;
        }
    }

    /// The stats with the naive rollout's counts for the generations made.
    fn naive_stats(&self) -> RolloutStats {
        let mut st = self.stats;
        let chunk = self.sp.max_slots.max(1);
        for c in self.out.chunks(chunk) {
            let steps = c.iter().map(|g| g.tokens.len()).max().unwrap_or(0);
            for g in c {
                let p = self.prompts[g.prompt].len() as u64;
                st.naive_prefill.add(Work::causal(p, 1));
                // Every row decodes each step of its batch, feeding token s at position p + s.
                for s in 0..steps.saturating_sub(1) as u64 {
                    st.naive_decode.add(Work {
                        rows: 1,
                        logit_rows: 1,
                        attn_pairs: p + s + 1,
                    });
                }
            }
        }
        st
    }
}
