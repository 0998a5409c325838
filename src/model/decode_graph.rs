//! The decode step as one replayed graph per batch-size bucket (CUDA graphs; Nvidia, "Getting
//! Started with CUDA Graphs", and vLLM's `CUDAGraphRunner` in `vllm/worker/model_runner.py`,
//! which captures the decode step for padded batch sizes the same way).
//!
//! A step of n sequences runs as the graph of its bucket, the smallest of 1, 2, 4, ...,
//! `max_rows` (the slot count) holding n. Each bucket's graph is captured at its first use
//! and reads only buffers it owns: a staging buffer that ONE upload per step writes (tokens,
//! positions, destination rows, lengths and the block tables of the bucket's rows, padded),
//! split by the graph's first nodes into the five inputs of [`Model::decode_run`]; the
//! weights and the KV cache, which stay in place for the graphs' lifetime (one rollout); and
//! the buffers allocated while it was captured (the backend's private arena, one shared by the
//! buckets' graphs, as vLLM captures its batch sizes into one memory pool: the steps replay
//! one at a time and each step's logits are sampled before the next replay). Rows n..bucket
//! are padding: token 0 at position 0, stored to and attending to row 0 of the cache's scratch
//! block ([`KvCache::scratch_block`]), which no sequence holds; their logits are ignored. The
//! decode attention's grid depends only on the cache's max_len (its split kernel launches the
//! most chunks any length gets, blocks past a sequence's own count exit, and the merge combines
//! exactly that count), so it is the same in every replay, and each row's bits do not depend on
//! the other rows: the graph gives plain decode's logits bit for bit on the virtual GPU (on a
//! GPU, cuBLAS may pick other kernels for the padded row count, so only up to rounding).
//!
//! With [`DecodeGraphs::with_sampling`] (the rollout) the graph also samples: the staging
//! buffer carries the step's draw table (each row's logits row and stream offset; padding rows
//! draw from their own row at offset 0) and the captured [`Backend::sample_table`] writes the
//! bucket's tokens, so a step is one upload, one replay and one download of n tokens
//! ([`Model::decode_sampled`]); the sampling settings are fixed at capture, as they are for a
//! rollout. Without it the caller samples the returned logits itself.
//!
//! Plain launches (today's path) are taken when the backend has no graphs (the CPU), the
//! model's layers are streamed from host memory (their uploads wait on events), graphs are
//! switched off (`rollout.cuda_graphs = false`), or a capture fails (the reason is kept in
//! [`DecodeGraphs::fallback`] and the rest of the rollout runs plainly).

use crate::backend::{Backend, ReplayGraph, SampleDims, SampleParams, SampleRows};
use crate::model::qwen2::DecodeIn;
use crate::model::{KvCache, Model};
use crate::Result;

/// Counters of a rollout's decode steps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GraphStats {
    /// Steps run as a graph replay.
    pub replays: usize,
    /// Graphs captured (one per bucket used).
    pub captures: usize,
    /// Steps run with plain launches.
    pub plain_steps: usize,
    /// Padding rows run by the replays.
    pub padded_rows: usize,
    /// Why graphs were not used (None while they are, or were never tried).
    pub fallback: Option<String>,
}

struct Bucket<B: Backend> {
    rows: usize,
    staging: B::I,
    /// Tokens, positions, destination rows, lengths and tables: the graph reads them.
    _inputs: [B::I; 5],
    logits: B::F,
    /// The draw table (read by the captured sampler) and its tokens, with sampling.
    sample: Option<(B::I, B::I)>,
    graph: Box<dyn ReplayGraph>,
}

/// One decode step's outputs: the logits (`rows` rows; past the step's sequences, a replayed
/// bucket's padding) and, when the graph sampled, its tokens (`rows` of them).
struct Step<'g, B: Backend> {
    logits: &'g B::F,
    rows: usize,
    sampled: Option<&'g B::I>,
}

/// The decode graphs of one KV cache (one rollout): one per bucket, captured on first use.
pub struct DecodeGraphs<B: Backend> {
    enabled: bool,
    buckets: Vec<usize>,
    graphs: Vec<Option<Bucket<B>>>,
    plain: Option<B::F>,
    /// The settings the graphs sample with (None: they only decode).
    sampling: Option<SampleParams>,
    pub stats: GraphStats,
}

impl<B: Backend> DecodeGraphs<B> {
    /// Graphs for steps of up to `max_rows` rows; `enabled` false runs every step plainly.
    pub fn new(enabled: bool, max_rows: usize) -> Self {
        let mut buckets = Vec::new();
        let mut r = 1usize;
        while r < max_rows {
            buckets.push(r);
            r = r.saturating_mul(2);
        }
        buckets.push(max_rows.max(1));
        let graphs = buckets.iter().map(|_| None).collect();
        DecodeGraphs {
            enabled,
            buckets,
            graphs,
            plain: None,
            sampling: None,
            stats: GraphStats::default(),
        }
    }

    /// Captures the sampling with `p` into each bucket's graph ([`Model::decode_sampled`]).
    pub fn with_sampling(mut self, p: SampleParams) -> Self {
        self.sampling = Some(p);
        self
    }

    /// The bucket sizes (ascending).
    pub fn buckets(&self) -> &[usize] {
        &self.buckets
    }

    /// The reason graphs are not used, once a step has fallen back.
    pub fn fallback(&self) -> Option<&str> {
        self.stats.fallback.as_deref()
    }

    fn refuse(&mut self, why: String) {
        self.enabled = false;
        self.stats.fallback.get_or_insert(why);
    }
}

impl<B: Backend> Model<B> {
    /// [`Model::decode`] through `graphs`: returns the logits buffer and its row count (the
    /// step's bucket when replayed, rows past `tokens.len()` padding; `tokens.len()` when run
    /// plainly). Rows 0..tokens.len() equal plain decode's.
    pub fn decode_graphed<'g>(
        &self,
        b: &B,
        cache: &mut KvCache<B>,
        tokens: &[u32],
        graphs: &'g mut DecodeGraphs<B>,
    ) -> Result<(&'g B::F, usize)> {
        let s = self.decode_step(b, cache, tokens, None, graphs)?;
        Ok((s.logits, s.rows))
    }

    /// [`Model::decode_graphed`], then one token per sequence drawn with stream offset
    /// `offsets[i]` from its logits row with the settings of [`DecodeGraphs::with_sampling`]
    /// (an error without them): inside the replayed graph, or, when the step runs plainly, by
    /// [`Backend::sample`] into `out` (at least `tokens.len()` entries). Returns the tokens.
    pub fn decode_sampled(
        &self,
        b: &B,
        cache: &mut KvCache<B>,
        tokens: &[u32],
        offsets: &[u64],
        out: &mut B::I,
        graphs: &mut DecodeGraphs<B>,
    ) -> Result<Vec<u32>> {
        let n = tokens.len();
        if offsets.len() != n {
            return Err(crate::Error::Invalid(format!(
                "decode_sampled: {} offsets for {n} tokens (expected one per token)",
                offsets.len()
            )));
        }
        let Some(p) = graphs.sampling else {
            return Err(crate::Error::Invalid(
                "decode_sampled: the graphs have no sampling settings (DecodeGraphs::with_sampling)"
                    .into(),
            ));
        };
        let vocab = self.cfg.vocab_size;
        let s = self.decode_step(b, cache, tokens, Some(offsets), graphs)?;
        if let Some(sampled) = s.sampled {
            return b.download_u32(sampled, n);
        }
        let rows = SampleRows {
            n_rows: s.rows,
            ..SampleRows::each(offsets, vocab)
        };
        b.sample(s.logits, out, &rows, &p)?;
        b.download_u32(out, n)
    }

    fn decode_step<'g>(
        &self,
        b: &B,
        cache: &mut KvCache<B>,
        tokens: &[u32],
        offsets: Option<&[u64]>,
        graphs: &'g mut DecodeGraphs<B>,
    ) -> Result<Step<'g, B>> {
        let n = tokens.len();
        if graphs.enabled && self.is_streamed() {
            graphs.refuse("the model's layers are streamed from host memory".into());
        }
        let (dst, after) = self.decode_rows(b, cache, tokens)?;
        let idx = graphs.buckets.iter().position(|&r| r >= n);
        if let (true, Some(idx)) = (graphs.enabled, idx) {
            if graphs.graphs[idx].is_none() {
                // The buckets share one arena (the steps replay one at a time, and each step's
                // logits are sampled before the next replay).
                let share = graphs.graphs.iter().flatten().next().map(|g| &*g.graph);
                let sampling = graphs.sampling;
                match self.capture_bucket(b, cache, graphs.buckets[idx], sampling, share) {
                    Ok(Some(bk)) => {
                        graphs.graphs[idx] = Some(bk);
                        graphs.stats.captures += 1;
                    }
                    Ok(None) => graphs.refuse(format!("the {} backend has no graphs", b.name())),
                    Err(e) => graphs.refuse(format!("graph capture failed: {e}")),
                }
            }
        }
        if graphs.enabled {
            if let Some(bk) = idx.and_then(|i| graphs.graphs[i].as_mut()) {
                let mut host = step_inputs(cache, tokens, &dst, &after, bk.rows);
                if bk.sample.is_some() {
                    host.extend(draw_table(offsets.unwrap_or(&[]), bk.rows));
                }
                b.write_u32(&mut bk.staging, &host)?;
                bk.graph.launch()?;
                cache.lens[..n].copy_from_slice(&after);
                graphs.stats.replays += 1;
                graphs.stats.padded_rows += bk.rows - n;
                let bk: &'g Bucket<B> = bk;
                return Ok(Step {
                    logits: &bk.logits,
                    rows: bk.rows,
                    sampled: bk.sample.as_ref().map(|s| &s.1),
                });
            }
        }
        let out = self.decode_plain(b, cache, tokens, &dst, &after)?;
        graphs.stats.plain_steps += 1;
        Ok(Step {
            logits: graphs.plain.insert(out),
            rows: n,
            sampled: None,
        })
    }

    /// Captures the decode step of `rows` rows; None when the backend has no graphs.
    fn capture_bucket(
        &self,
        b: &B,
        cache: &mut KvCache<B>,
        rows: usize,
        sampling: Option<SampleParams>,
        share: Option<&dyn ReplayGraph>,
    ) -> Result<Option<Bucket<B>>> {
        let mb = cache.max_blocks();
        let table_len = rows
            .checked_mul(mb)
            .ok_or_else(|| crate::Error::Invalid("decode graph: table size overflows".into()))?;
        let inputs = 4 * rows + table_len;
        let draws = if sampling.is_some() { 3 * rows } else { 0 };
        let staging = b.upload_u32(&vec![0; inputs + draws])?;
        let zeros = vec![0u32; rows.max(table_len).max(draws)];
        let mut sample = match sampling {
            Some(_) => Some((
                b.upload_u32(&zeros[..draws])?,
                b.upload_u32(&zeros[..rows])?,
            )),
            None => None,
        };
        let mut tokens = b.upload_u32(&zeros[..rows])?;
        let mut pos = b.upload_u32(&zeros[..rows])?;
        let mut dst = b.upload_u32(&zeros[..rows])?;
        let mut lens = b.upload_u32(&zeros[..rows])?;
        let mut table = b.upload_u32(&zeros[..table_len])?;
        if !b.capture_begin(share)? {
            return Ok(None);
        }
        let body = (|| {
            b.copy_u32_at(&staging, 0, &mut tokens, rows)?;
            b.copy_u32_at(&staging, rows, &mut pos, rows)?;
            b.copy_u32_at(&staging, 2 * rows, &mut dst, rows)?;
            b.copy_u32_at(&staging, 3 * rows, &mut lens, rows)?;
            b.copy_u32_at(&staging, 4 * rows, &mut table, table_len)?;
            let logits = self.decode_run(
                b,
                cache,
                &DecodeIn {
                    tokens: &tokens,
                    pos: &pos,
                    dst: &dst,
                    lens: &lens,
                    table: &table,
                    n: rows,
                },
            )?;
            if let (Some(p), Some((draw, out))) = (&sampling, sample.as_mut()) {
                b.copy_u32_at(&staging, inputs, draw, draws)?;
                let d = SampleDims {
                    draws: rows,
                    n_rows: rows,
                    vocab: self.cfg.vocab_size,
                };
                b.sample_table(&logits, out, draw, d, p)?;
            }
            Ok(logits)
        })();
        let graph = b.capture_end();
        let logits = body?;
        let graph = graph?;
        Ok(Some(Bucket {
            rows,
            staging,
            _inputs: [tokens, pos, dst, lens, table],
            logits,
            sample,
            graph,
        }))
    }
}

/// The draw table of a sampled step padded to `rows`: row r draws from logits row r at stream
/// offset `offsets[r]` (low word, high word); padding rows at offset 0 (their tokens are
/// ignored).
fn draw_table(offsets: &[u64], rows: usize) -> Vec<u32> {
    let mut v = Vec::with_capacity(3 * rows);
    for r in 0..rows {
        let off = offsets.get(r).copied().unwrap_or(0);
        v.extend_from_slice(&[r as u32, off as u32, (off >> 32) as u32]);
    }
    v
}

/// The staging contents of a step of `tokens.len()` rows padded to `rows`: tokens, positions,
/// destination rows, lengths after the step, then the block tables ([rows, max_blocks]).
/// Padding rows: token 0 at position 0, stored to and reading row 0 of the scratch block.
fn step_inputs<B: Backend>(
    cache: &KvCache<B>,
    tokens: &[u32],
    dst: &[u32],
    after: &[u32],
    rows: usize,
) -> Vec<u32> {
    let n = tokens.len();
    let mb = cache.max_blocks();
    let scratch = cache.scratch_block();
    let pad = rows - n;
    let mut v = Vec::with_capacity(4 * rows + rows * mb);
    v.extend_from_slice(tokens);
    v.extend(std::iter::repeat_n(0, pad));
    v.extend_from_slice(&cache.lens[..n]);
    v.extend(std::iter::repeat_n(0, pad));
    v.extend_from_slice(dst);
    v.extend(std::iter::repeat_n(
        scratch.saturating_mul(cache.block_size as u32),
        pad,
    ));
    v.extend_from_slice(after);
    v.extend(std::iter::repeat_n(1, pad));
    v.extend(cache.flat_tables(n));
    for _ in 0..pad {
        v.push(scratch);
        v.extend(std::iter::repeat_n(0, mb - 1));
    }
    v
}
