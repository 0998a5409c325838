//! Rollouts: prefill + decode with a KV cache for a batch of prompts times `n` samples.
//!
//! Sequence `i` (prompt-major order: prompt `i / n`, sample `i % n`) draws its token at decode
//! step `s` from the backend's counter-based stream `(seed, offset + s * total + i)`, where
//! `total` is the number of sequences of the call. The draw therefore depends only on
//! `(seed, offset, i, s)`: not on how sequences are split over KV caches, nor on which other
//! sequences have already stopped, so a run is reproducible and a resumed run (which restores
//! `offset`) draws exactly the numbers an uninterrupted one would.

use crate::backend::Backend;
use crate::model::Model;
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
    /// Sequences per KV cache.
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
    crate::ensure!(n >= 1, "generate: n must be at least 1");
    crate::ensure!(sp.max_slots >= 1, "generate: max_slots must be at least 1");
    for (i, p) in prompts.iter().enumerate() {
        crate::ensure!(!p.is_empty(), "generate: prompt {i} is empty");
    }
    let total = prompts.len() * n;
    let vocab = model.cfg.vocab_size;
    let mut out: Vec<Generation> = (0..total)
        .map(|i| Generation {
            prompt: i / n,
            tokens: Vec::new(),
            stopped: false,
        })
        .collect();
    if total == 0 || sp.max_new_tokens == 0 {
        return Ok(out);
    }
    let pad = sp.stop.first().copied().unwrap_or(0);
    let mut start = 0;
    while start < total {
        let end = start.saturating_add(sp.max_slots).min(total);
        let rows = end - start;
        let chunk: Vec<Vec<u32>> = (start..end).map(|i| prompts[i / n].clone()).collect();
        let max_prompt = chunk.iter().map(|p| p.len()).max().unwrap_or(0);
        let mut cache = model.new_cache(b, rows, max_prompt.saturating_add(sp.max_new_tokens))?;
        let mut sampled = b.upload_u32(&vec![0u32; rows])?;
        let mut logits = model.prefill(b, &mut cache, &chunk)?;
        let mut done = vec![false; rows];
        for s in 0..sp.max_new_tokens {
            let off = offset + (s * total + start) as u64;
            b.sample(
                &logits,
                &mut sampled,
                rows,
                vocab,
                sp.temperature,
                sp.top_p,
                sp.top_k,
                seed,
                off,
            )?;
            let toks = b.download_u32(&sampled, rows)?;
            for r in 0..rows {
                if done[r] {
                    continue;
                }
                let g = &mut out[start + r];
                g.tokens.push(toks[r]);
                if sp.stop.contains(&toks[r]) {
                    g.stopped = true;
                    done[r] = true;
                }
            }
            if done.iter().all(|d| *d) || s + 1 == sp.max_new_tokens {
                break;
            }
            let feed: Vec<u32> = (0..rows)
                .map(|r| if done[r] { pad } else { toks[r] })
                .collect();
            logits = model.decode(b, &mut cache, &feed)?;
        }
        start = end;
    }
    Ok(out)
}
