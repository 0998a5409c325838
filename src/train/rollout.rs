//! Rollouts: `n` sampled responses per prompt over a paged KV cache
//! ([`crate::model::kv_cache`]; PagedAttention, Kwon et al., SOSP 2023, arXiv 2309.06180), at
//! most `max_slots` sequences at a time, each prompt prefilled once and its sequences
//! continuously batched.
//!
//! Keying. Sequence `i` (prompt-major order: prompt `i / n`, sample `i % n`) draws its response
//! token `s` from the backend's counter-based stream `(seed, offset + s * total + i)`, where
//! `total` is the number of sequences of the call (of the whole batch, and `i` the index in it,
//! when the call runs one rank's part: [`Stream::within`]). A token therefore depends only on
//! `(seed, offset, i, s)` and the sequence's own logits: not on the slot it ran in, the slot
//! count, the order sequences were admitted in, which other sequences have stopped, or whether
//! it was preempted and recomputed. A run is reproducible, and a resumed run (which restores
//! `offset`; one call consumes [`stream_len`]) draws exactly the numbers an uninterrupted one
//! would.
//!
//! Memory. The cache is a pool of `kv_blocks` blocks of `kv_block_size` rows ([`Schedule`];
//! by default room for `min(max_slots, sequences) + 1` sequences at their longest, which never
//! runs dry) and a block table per slot: slots `0..cap` decode, slot `cap + p` holds prompt
//! `p`'s prefilled rows while samples of `p` wait. A sample admitted shares its prompt's blocks
//! (reference counts, no copy); its first token written into the partially filled last prompt
//! block copies that block first (copy-on-write; the last sample, once the holder is released,
//! writes in place). A sequence takes a new block each `kv_block_size` tokens and returns its
//! blocks when it stops; the holder is released when the prompt's last sample is admitted.
//!
//! Schedule. The sequences wait in a queue (prompt-major, or [`Schedule::order`]). Between two
//! decode steps, the next queued sequence takes a free slot when the pool has, beyond the
//! blocks the running sequences need for their next step, its prompt's blocks (unless they are
//! resident or prefilled in this round) plus one for its first token; admission stops at the
//! first sequence that does not fit (first come, first served; the holders of other waiting
//! prompts are released first to make room). The prompts of a round are prefilled in one packed
//! pass. The first response token of each of a prompt's `n` samples is drawn from the prompt's
//! last-token logits of that one prefill, so a sample whose first token ends it never takes a
//! slot. Before a decode step whose new blocks the pool lacks, the holders of waiting prompts
//! are released (prefilled again when needed), then the newest running sequence is preempted:
//! its blocks are freed and it goes back to the front of the queue, to be recomputed from its
//! first token (vLLM's recompute preemption, by decoding again rather than by one prefill of
//! prompt + generated tokens). The oldest sequence is never preempted while others run, and
//! the pool holds one sequence at its longest (checked), so the rollout always ends. Decode
//! steps run the occupied slots only: they are kept leading (a stopped slot takes the last
//! occupied slot's block table; nothing is copied), so a stopped sequence costs nothing and a
//! long response holds its own blocks, never a batch's. Prefill is not fused into the decode
//! step's pass (each is its own forward).
//!
//! With the same logits, the tokens are the same whatever the schedule. A row's logits can
//! still differ in the last bits with the shape of the pass it ran in (a GEMM kernel's reduction
//! order may depend on the row count; see `backend/cpu/fast.rs`), which can flip a draw that
//! sits on a boundary. At the tests' sizes the rows do not depend on the pass, and the
//! generations are bit-identical for every `max_slots`, admission order, pool size (with or
//! without preemption) and [`Schedule::prefill_each`] (`tests/rollout.rs`,
//! `tests/cuda_model.rs`).

use std::collections::VecDeque;

use crate::backend::{Backend, SampleParams, SampleRows};
use crate::model::flops::Work;
use crate::model::kv_cache::DEFAULT_BLOCK_SIZE;
use crate::model::{KvCache, KvShape, Model};
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
    /// At most this many sequences decode at a time (slots of the paged KV cache).
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
    /// Rows per KV-cache block; None = [`DEFAULT_BLOCK_SIZE`].
    pub kv_block_size: Option<usize>,
    /// Blocks of the KV-cache pool; None = room for `min(max_slots, sequences) + 1` sequences
    /// of the longest length (never short). A smaller pool admits fewer sequences at a time
    /// and may preempt (see the module header); the generations are the same.
    pub kv_blocks: Option<usize>,
    /// Decode every step with plain launches, never as a replayed graph
    /// (`rollout.cuda_graphs = false`); graphs give the same generations.
    pub plain_decode: bool,
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
    /// Prompts prefilled, slots given a prompt's blocks (shared, not copied), block-table
    /// moves that keep the occupied slots leading.
    pub prefills: usize,
    pub slot_copies: usize,
    pub slot_moves: usize,
    /// The KV-cache pool: its blocks and rows per block, the most blocks held at once, and
    /// the shared blocks copied before a write (copy-on-write of a prompt's last block).
    pub kv_blocks: usize,
    pub kv_block_size: usize,
    pub peak_blocks: usize,
    pub block_copies: usize,
    /// The most sequences one decode step ran.
    pub peak_concurrent: usize,
    /// Sequences preempted (freed and recomputed) when the pool ran dry, and waiting prompts'
    /// rows released for room (prefilled again when needed).
    pub preemptions: usize,
    pub prompt_evictions: usize,
    /// Decode steps replayed as a graph of their batch-size bucket
    /// ([`crate::model::DecodeGraphs`]), graphs captured, steps run with plain launches (no
    /// graphs on this backend, streamed layers, `rollout.cuda_graphs = false`, or a refused
    /// capture), and the padding rows the replays ran.
    pub graph_replays: usize,
    pub graph_captures: usize,
    pub plain_decode_steps: usize,
    pub graph_padded_rows: usize,
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
        r.run(order, sched)?;
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

/// Per decode slot: the sequence decoding in it.
#[derive(Clone, Copy, Default)]
struct Slot {
    seq: Option<usize>,
    /// The token to feed at the next decode step.
    feed: u32,
    /// Admission stamp (the newest sequence is preempted first).
    since: u64,
}

/// The scheduler's state: the paged cache (slots 0..cap decode; slot cap + p holds prompt p's
/// prefilled rows while samples of p wait to be admitted), the decode slots, and the queue.
struct Sched<B: Backend> {
    cache: KvCache<B>,
    cap: usize,
    slots: Vec<Slot>,
    /// First response token of each sequence, once drawn.
    first: Vec<Option<u32>>,
    /// Per prompt: its sequences in the queue.
    pending: Vec<usize>,
    /// Per prompt: its holder slot holds its rows.
    resident: Vec<bool>,
    queue: VecDeque<usize>,
    /// Draw outputs: one per slot at decode, up to n per slot at a prefill round.
    sampled: B::I,
    stamp: u64,
}

impl<B: Backend> Sched<B> {
    /// The blocks the occupied slots need for their next decode step.
    fn running_needs(&self) -> usize {
        (0..self.cap)
            .filter(|&s| self.slots[s].seq.is_some())
            .map(|s| self.cache.append_needs(s))
            .sum()
    }

    /// Blocks releasing prompt `p`'s holder would return to the pool.
    fn holder_frees(&self, p: usize) -> usize {
        let t = &self.cache.tables[self.cap + p];
        t.iter()
            .filter(|&&id| self.cache.pool.refs(id) == 1)
            .count()
    }

    /// Release prompt `p`'s holder.
    fn drop_holder(&mut self, p: usize) -> Result<()> {
        self.resident[p] = false;
        self.cache.release(self.cap + p)
    }

    /// The resident prompt (other than those in `keep`) whose holder frees the most blocks,
    /// the highest prompt index among equals; None when none frees any.
    fn evictable(&self, keep: &[usize]) -> Option<usize> {
        (0..self.resident.len())
            .filter(|&p| self.resident[p] && !keep.contains(&p))
            .map(|p| (self.holder_frees(p), p))
            .filter(|&(f, _)| f > 0)
            .max()
            .map(|(_, p)| p)
    }
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

    fn run(&mut self, order: Vec<usize>, sched: &Schedule) -> Result<()> {
        let (b, model) = (self.b, self.model);
        let cap = self.sp.max_slots.min(self.total);
        let max_prompt = self.prompts.iter().map(|p| p.len()).max().unwrap_or(0);
        let max_len = max_prompt.saturating_add(self.sp.max_new_tokens);
        let block_size = sched.kv_block_size.unwrap_or(DEFAULT_BLOCK_SIZE);
        crate::ensure!(
            block_size >= 1,
            "generate: kv_block_size must be at least 1"
        );
        let per_seq = max_len.div_ceil(block_size);
        let n_blocks = sched
            .kv_blocks
            .unwrap_or_else(|| (cap + 1).saturating_mul(per_seq));
        // One sequence at its longest, and the private copy of its prompt's last block.
        crate::ensure!(
            n_blocks > per_seq,
            "generate: a KV cache of {n_blocks} blocks of {block_size} rows cannot hold one \
             sequence of {max_len} positions (prompt {max_prompt} + max_new_tokens {}) beside \
             its prompt's last block: it needs at least {} blocks",
            self.sp.max_new_tokens,
            per_seq + 1
        );
        let np = self.prompts.len();
        let shape = KvShape {
            slots: cap + np,
            max_len,
            block_size,
            n_blocks,
        };
        let mut pending = vec![0usize; np];
        for &i in &order {
            pending[i / self.n] += 1;
        }
        let mut st = Sched {
            cache: model.new_paged_cache(b, shape)?,
            cap,
            slots: vec![Slot::default(); cap],
            first: vec![None; self.total],
            pending,
            resident: vec![false; np],
            queue: order.into(),
            sampled: b.upload_u32(&vec![0u32; cap.saturating_mul(self.n)])?,
            stamp: 0,
        };
        self.stats.kv_blocks = n_blocks;
        self.stats.kv_block_size = block_size;
        let mut graphs =
            crate::model::DecodeGraphs::new(!sched.plain_decode, cap).with_sampling(self.params());
        let result = loop {
            self.admit(&mut st)?;
            self.compact(&mut st)?;
            let mut m = st.slots.iter().take_while(|s| s.seq.is_some()).count();
            if m == 0 {
                crate::ensure!(
                    st.queue.is_empty(),
                    "generate: no sequence fits in the KV cache's {n_blocks} blocks"
                );
                break Ok(());
            }
            // Room for this step: release waiting prompts' rows, then preempt the newest
            // sequences (freed, requeued, recomputed from their first token).
            while st.cache.step_needs(m) > st.cache.pool.free() {
                if let Some(p) = st.evictable(&[]) {
                    st.drop_holder(p)?;
                    self.stats.prompt_evictions += 1;
                    continue;
                }
                crate::ensure!(
                    m > 1,
                    "generate: the KV cache's {n_blocks} blocks cannot grow one sequence"
                );
                self.preempt(&mut st, m)?;
                self.compact(&mut st)?;
                m -= 1;
            }
            self.stats.peak_concurrent = self.stats.peak_concurrent.max(m);
            let feed: Vec<u32> = st.slots[..m].iter().map(|s| s.feed).collect();
            // The new token attends to its cached positions and itself.
            self.stats.decode.attn_pairs += st.cache.lens[..m]
                .iter()
                .map(|&l| l as u64 + 1)
                .sum::<u64>();
            self.stats.decode.rows += m as u64;
            self.stats.decode.logit_rows += m as u64;
            let offsets: Vec<u64> = st.slots[..m]
                .iter()
                .map(|s| {
                    let i = s.seq.unwrap_or(0);
                    self.key(i, self.out[i].tokens.len())
                })
                .collect();
            // Decode and draw in one replayed graph (or plainly, then `sample`).
            let toks = model.decode_sampled(
                b,
                &mut st.cache,
                &feed,
                &offsets,
                &mut st.sampled,
                &mut graphs,
            )?;
            for (s, &t) in toks.iter().enumerate() {
                let i = st.slots[s].seq.unwrap_or(0);
                if self.push(i, t) {
                    st.slots[s].seq = None;
                    st.cache.release(s)?;
                } else {
                    st.slots[s].feed = t;
                }
            }
        };
        let g = &graphs.stats;
        self.stats.graph_replays = g.replays;
        self.stats.graph_captures = g.captures;
        self.stats.plain_decode_steps = g.plain_steps;
        self.stats.graph_padded_rows = g.padded_rows;
        drop(graphs);
        self.stats.peak_blocks = st.cache.pool.peak_used();
        self.stats.block_copies = st.cache.cow_copies;
        result
    }

    /// Free the newest of the `m` leading slots' sequences and requeue it at the front: it
    /// starts again from its first token (its draws are keyed by token index, so it
    /// regenerates the same tokens).
    fn preempt(&mut self, st: &mut Sched<B>, m: usize) -> Result<()> {
        let Some(s) = (0..m).max_by_key(|&s| st.slots[s].since) else {
            return Ok(());
        };
        let i = st.slots[s].seq.unwrap_or(0);
        st.slots[s].seq = None;
        st.cache.release(s)?;
        self.out[i].tokens.clear();
        self.out[i].stopped = false;
        st.pending[i / self.n] += 1;
        st.queue.push_front(i);
        self.stats.preemptions += 1;
        Ok(())
    }

    /// Fill free slots from the queue, in order, while the pool has blocks for each admitted
    /// sequence's prompt (when not resident) plus one block of growth, beyond the blocks the
    /// running sequences need for their next step.
    fn admit(&mut self, st: &mut Sched<B>) -> Result<()> {
        let (b, model, n, cap) = (self.b, self.model, self.n, st.cap);
        let vocab = model.cfg.vocab_size;
        loop {
            let free: Vec<usize> = (0..cap).filter(|&s| st.slots[s].seq.is_none()).collect();
            if free.is_empty() || st.queue.is_empty() {
                return Ok(());
            }
            let mut budget = st.cache.pool.free() as i64 - st.running_needs() as i64;
            let (mut take, mut new_prompts) = (Vec::new(), Vec::new());
            let mut ended = false;
            while take.len() < free.len() {
                let Some(&i) = st.queue.front() else { break };
                let p = i / n;
                // A sequence whose first token is known and ends it needs nothing (queued
                // sequences hold no tokens: a preempted one restarts).
                if let Some(t) = st.first[i] {
                    if self.sp.stop.contains(&t) || self.sp.max_new_tokens <= 1 {
                        st.queue.pop_front();
                        self.push(i, t);
                        self.settle(st, p)?;
                        ended = true;
                        continue;
                    }
                }
                let own = st.cache.blocks_for(self.prompts[p].len()) as i64;
                let cost = 1
                    + if self.prefill_each || !(st.resident[p] || new_prompts.contains(&p)) {
                        own
                    } else {
                        0
                    };
                if budget < cost {
                    let mut keep: Vec<usize> = take.iter().map(|&j: &usize| j / n).collect();
                    keep.push(p);
                    if let Some(h) = st.evictable(&keep) {
                        budget += st.holder_frees(h) as i64;
                        st.drop_holder(h)?;
                        self.stats.prompt_evictions += 1;
                        continue;
                    }
                    break;
                }
                budget -= cost;
                st.queue.pop_front();
                take.push(i);
                if cost > 1 && !self.prefill_each {
                    new_prompts.push(p);
                }
            }
            if take.is_empty() {
                if ended {
                    continue;
                }
                return Ok(());
            }
            // Prefill: the round's new prompts into their holders, or (prefill_each) every
            // taken sequence's prompt into its own slot; one packed pass.
            let (pre_slots, pre_prompts): (Vec<usize>, Vec<usize>) = if self.prefill_each {
                (
                    free[..take.len()].to_vec(),
                    take.iter().map(|&i| i / n).collect(),
                )
            } else {
                (
                    new_prompts.iter().map(|&p| cap + p).collect(),
                    new_prompts.clone(),
                )
            };
            if !pre_slots.is_empty() {
                let refs: Vec<&[u32]> = pre_prompts
                    .iter()
                    .map(|&p| self.prompts[p].as_slice())
                    .collect();
                for r in &refs {
                    self.stats.prefill.add(Work::causal(r.len() as u64, 1));
                }
                self.stats.prefills += refs.len();
                let logits = model.prefill_slots(b, &mut st.cache, &pre_slots, &refs)?;
                // First tokens: every sample of a prefilled prompt not drawn yet (the
                // sequence itself only, when each prefills its own).
                let (mut src, mut offsets, mut who) = (Vec::new(), Vec::new(), Vec::new());
                for (k, &p) in pre_prompts.iter().enumerate() {
                    let seqs: Vec<usize> = if self.prefill_each {
                        vec![take[k]]
                    } else {
                        (p * n..p * n + n).collect()
                    };
                    for j in seqs {
                        if st.first[j].is_none() && !who.contains(&j) {
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
                        n_rows: pre_prompts.len(),
                        vocab,
                    };
                    b.sample(&logits, &mut st.sampled, &rows, &self.params())?;
                    let toks = b.download_u32(&st.sampled, who.len())?;
                    for (&j, &t) in who.iter().zip(&toks) {
                        st.first[j] = Some(t);
                    }
                }
                if !self.prefill_each {
                    for &p in &pre_prompts {
                        st.resident[p] = true;
                    }
                }
            }
            for (k, &i) in take.iter().enumerate() {
                let (p, s) = (i / n, free[k]);
                if !self.prefill_each {
                    st.cache.share_slot(cap + p, s, self.prompts[p].len())?;
                    self.stats.slot_copies += 1;
                }
                self.settle(st, p)?;
                let t = st.first[i].unwrap_or(0);
                if self.push(i, t) {
                    st.cache.release(s)?;
                } else {
                    st.stamp += 1;
                    st.slots[s] = Slot {
                        seq: Some(i),
                        feed: t,
                        since: st.stamp,
                    };
                }
            }
        }
    }

    /// A sequence of prompt `p` left the queue: release p's holder when none is left.
    fn settle(&mut self, st: &mut Sched<B>, p: usize) -> Result<()> {
        st.pending[p] -= 1;
        if st.pending[p] == 0 && st.resident[p] {
            st.drop_holder(p)?;
        }
        Ok(())
    }

    /// Keep the occupied slots leading: move the last occupied slot's block table into the
    /// first free one until they are (nothing is copied).
    fn compact(&mut self, st: &mut Sched<B>) -> Result<()> {
        loop {
            let Some(hole) = st.slots.iter().position(|s| s.seq.is_none()) else {
                return Ok(());
            };
            let Some(last) = st.slots.iter().rposition(|s| s.seq.is_some()) else {
                return Ok(());
            };
            if last < hole {
                return Ok(());
            }
            st.cache.move_slot(last, hole)?;
            self.stats.slot_moves += 1;
            st.slots[hole] = st.slots[last];
            st.slots[last].seq = None;
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
