//! The GRPO update (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300, as verl implements it in
//! `verl/trainer/ppo/core_algos.py`): group-normalised advantages, old and reference logprobs,
//! and mini-batch updates through micro-batches packed by a token budget with gradient
//! accumulation.

use crate::backend::loss::micro_batch_scale;
use crate::backend::{Backend, GrpoLossCfg, GrpoLossOut, GrpoTokens};
use crate::model::flops::Work;
use crate::model::{GradSink, Group, Model, PackedBatch};
use crate::train::config::AdvantageKind;
use crate::Result;
use std::ops::Range;

/// Advantages of `scores` laid out in groups of `n` consecutive responses of one prompt.
/// GRPO: (s - mean) / (std + 1e-6) with the unbiased std; a group of one has mean 0 and std 1
/// (verl). Dr.GRPO: s - mean.
pub fn group_advantages(scores: &[f32], n: usize, kind: AdvantageKind) -> Vec<f32> {
    let mut adv = Vec::with_capacity(scores.len());
    for group in scores.chunks(n.max(1)) {
        let (mean, std) = if group.len() == 1 {
            (0.0f64, 1.0f64)
        } else {
            let k = group.len() as f64;
            let mean = group.iter().map(|&s| s as f64).sum::<f64>() / k;
            let var = group
                .iter()
                .map(|&s| (s as f64 - mean).powi(2))
                .sum::<f64>()
                / (k - 1.0);
            (mean, var.sqrt())
        };
        for &s in group {
            let a = match kind {
                AdvantageKind::Grpo => (s as f64 - mean) / (std + 1e-6),
                AdvantageKind::DrGrpo => s as f64 - mean,
            };
            adv.push(a as f32);
        }
    }
    adv
}

/// One prompt + response sequence of a rollout batch.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainSeq {
    /// Prompt ids followed by the response ids.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// The sequence's advantage (broadcast to its response tokens).
    pub adv: f32,
}

impl TrainSeq {
    /// Teacher-forced positions (tokens - 1).
    pub fn n_pos(&self) -> usize {
        self.tokens.len().saturating_sub(1)
    }
    /// Positions whose target is a response token.
    pub fn n_response(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }
}

/// Split sequences into contiguous runs whose positions fit `budget` (a sequence longer than
/// the budget gets a run of its own).
pub fn micro_batches(lens: &[usize], budget: usize) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut used = 0;
    for (i, &l) in lens.iter().enumerate() {
        if i > start && used + l > budget {
            out.push(start..i);
            start = i;
            used = 0;
        }
        used += l;
    }
    if start < lens.len() {
        out.push(start..lens.len());
    }
    out
}

/// Runs of consecutive sequences that share one prompt (same prompt length and prompt
/// tokens): the GRPO groups as the rollout lays them out.
pub fn prompt_groups(seqs: &[TrainSeq]) -> Vec<Range<usize>> {
    let mut out: Vec<Range<usize>> = Vec::new();
    for (i, s) in seqs.iter().enumerate() {
        let same = out.last().is_some_and(|r| {
            let f = &seqs[r.start];
            f.prompt_len == s.prompt_len && f.tokens[..f.prompt_len] == s.tokens[..s.prompt_len]
        });
        match out.last_mut() {
            Some(r) if same => r.end = i + 1,
            _ => out.push(i..i + 1),
        }
    }
    out
}

/// How the training-side passes lay out a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Every sequence prompt + response in full, logprobs at every position.
    PerSequence,
    /// Shared prompts ([`PackedBatch::shared_groups`]): each group's prompt encoded once, its
    /// responses attending to it, logprobs at the response tokens only.
    Shared,
}

/// Token rows through the layers and logit rows (lm_head + log-softmax) of one training-side
/// pass over `seqs` in `layout`.
pub fn pass_rows(seqs: &[TrainSeq], layout: Layout) -> (usize, usize) {
    match layout {
        Layout::PerSequence => {
            let n: usize = seqs.iter().map(|s| s.n_pos()).sum();
            (n, n)
        }
        Layout::Shared => {
            let mut rows = 0;
            for g in prompt_groups(seqs) {
                rows += seqs[g.start].prompt_len;
                rows += seqs[g].iter().map(|s| s.n_response() - 1).sum::<usize>();
            }
            (rows, seqs.iter().map(|s| s.n_response()).sum())
        }
    }
}

/// The work of one training-side pass over `seqs` in `layout` (token rows and logit rows as
/// [`pass_rows`], plus the attention's (query, key) pairs), for the FLOP count of
/// [`crate::model::flops`]. Per sequence: a causal pass over each sequence's L = len - 1
/// positions. Shared: a causal pass over each group's prompt (P rows), and per response of R
/// rows R * P prefix pairs plus its own causal R (R + 1) / 2.
pub fn pass_work(seqs: &[TrainSeq], layout: Layout) -> Work {
    let (rows, logit_rows) = pass_rows(seqs, layout);
    let mut pairs = 0u64;
    match layout {
        Layout::PerSequence => {
            for s in seqs {
                pairs += Work::causal(s.n_pos() as u64, 0).attn_pairs;
            }
        }
        Layout::Shared => {
            for g in prompt_groups(seqs) {
                let p = seqs[g.start].prompt_len as u64;
                pairs += Work::causal(p, 0).attn_pairs;
                for s in &seqs[g] {
                    let r = s.n_response().saturating_sub(1) as u64;
                    pairs += r * p + Work::causal(r, 0).attn_pairs;
                }
            }
        }
    }
    Work {
        rows: rows as u64,
        logit_rows: logit_rows as u64,
        attn_pairs: pairs,
    }
}

/// Per group of `n` consecutive scores (the last may be shorter): whether all its scores are
/// equal, so that the group carries no signal (every GRPO or Dr.GRPO advantage 0, up to the
/// rounding of the mean, for groups of two or more).
pub fn zero_signal_groups(scores: &[f32], n: usize) -> Vec<bool> {
    scores
        .chunks(n.max(1))
        .map(|c| c.iter().all(|&x| x == c[0]))
        .collect()
}

/// Check that every sequence has a prompt and a response.
fn check_seqs(seqs: &[TrainSeq]) -> Result<()> {
    for (i, s) in seqs.iter().enumerate() {
        crate::ensure!(
            s.prompt_len >= 1 && s.prompt_len < s.tokens.len(),
            "sequence {i}: prompt length {} must be in 1..{} (the response is empty)",
            s.prompt_len,
            s.tokens.len()
        );
    }
    Ok(())
}

/// The micro-batches (ranges of `seqs`) of the update passes in `layout` within `budget` rows:
/// whole groups in [`Layout::Shared`].
pub fn pass_batches(seqs: &[TrainSeq], layout: Layout, budget: usize) -> Vec<Range<usize>> {
    match layout {
        Layout::PerSequence => {
            let lens: Vec<usize> = seqs.iter().map(|s| s.n_pos()).collect();
            micro_batches(&lens, budget)
        }
        Layout::Shared => group_micro_batches(seqs, budget),
    }
}

/// Micro-batches of whole groups (ranges of sequences) whose shared-layout rows fit `budget`
/// (a group longer than the budget gets a micro-batch of its own).
fn group_micro_batches(seqs: &[TrainSeq], budget: usize) -> Vec<Range<usize>> {
    let groups = prompt_groups(seqs);
    let cost: Vec<usize> = groups
        .iter()
        .map(|g| pass_rows(&seqs[g.clone()], Layout::Shared).0)
        .collect();
    micro_batches(&cost, budget)
        .into_iter()
        .map(|r| groups[r.start].start..groups[r.end - 1].end)
        .collect()
}

/// The shared-layout batch of `seqs` (consecutive sequences with one prompt form a group).
fn shared_batch(seqs: &[TrainSeq]) -> Result<PackedBatch> {
    check_seqs(seqs)?;
    let groups = prompt_groups(seqs);
    let resp: Vec<Vec<&[u32]>> = groups
        .iter()
        .map(|g| {
            seqs[g.clone()]
                .iter()
                .map(|s| &s.tokens[s.prompt_len..])
                .collect()
        })
        .collect();
    let gs: Vec<Group<'_>> = groups
        .iter()
        .zip(&resp)
        .map(|(g, r)| Group {
            prompt: &seqs[g.start].tokens[..seqs[g.start].prompt_len],
            responses: r,
        })
        .collect();
    PackedBatch::shared_groups(&gs)
}

/// Host-side tensors of one micro-batch.
pub struct MicroBatch {
    pub packed: PackedBatch,
    /// 1 where the target is a response token.
    pub mask: Vec<f32>,
    pub adv: Vec<f32>,
    pub seq_id: Vec<u32>,
    pub n_seq: usize,
}

impl MicroBatch {
    /// The micro-batch of `seqs` in `layout`: per sequence, logprob entries at every position
    /// (mask 1 at the response targets) or, shared, at the response targets only (mask 1).
    pub fn with_layout(seqs: &[TrainSeq], layout: Layout) -> Result<Self> {
        match layout {
            Layout::PerSequence => Self::new(seqs),
            Layout::Shared => {
                let packed = shared_batch(seqs)?;
                let n = packed.n_logits();
                let mut adv = Vec::with_capacity(n);
                let mut seq_id = Vec::with_capacity(n);
                for (i, s) in seqs.iter().enumerate() {
                    adv.extend(std::iter::repeat_n(s.adv, s.n_response()));
                    seq_id.extend(std::iter::repeat_n(i as u32, s.n_response()));
                }
                Ok(MicroBatch {
                    packed,
                    mask: vec![1.0; n],
                    adv,
                    seq_id,
                    n_seq: seqs.len(),
                })
            }
        }
    }

    pub fn new(seqs: &[TrainSeq]) -> Result<Self> {
        let toks: Vec<Vec<u32>> = seqs.iter().map(|s| s.tokens.clone()).collect();
        let packed = PackedBatch::from_sequences(&toks)?;
        let mut mask = Vec::with_capacity(packed.n_tok());
        let mut adv = Vec::with_capacity(packed.n_tok());
        let mut seq_id = Vec::with_capacity(packed.n_tok());
        for (i, s) in seqs.iter().enumerate() {
            crate::ensure!(
                s.prompt_len >= 1 && s.prompt_len < s.tokens.len(),
                "sequence {i}: prompt length {} must be in 1..{} (the response is empty)",
                s.prompt_len,
                s.tokens.len()
            );
            for t in 0..s.n_pos() {
                let m = if t + 1 >= s.prompt_len { 1.0 } else { 0.0 };
                mask.push(m);
                adv.push(s.adv * m);
                seq_id.push(i as u32);
            }
        }
        Ok(MicroBatch {
            packed,
            mask,
            adv,
            seq_id,
            n_seq: seqs.len(),
        })
    }
}

/// Per-sequence teacher-forced logprobs (one entry per position) of `model` without gradient,
/// at inverse temperature `inv_t` (log_softmax(logits · inv_t), see
/// [`crate::train::config::TrainConfig::logprob_inv_t`]), computed in micro-batches of at most
/// `budget` positions.
pub fn seq_logprobs<B: Backend>(
    b: &B,
    model: &Model<B>,
    seqs: &[TrainSeq],
    budget: usize,
    inv_t: f32,
) -> Result<Vec<Vec<f32>>> {
    let lens: Vec<usize> = seqs.iter().map(|s| s.n_pos()).collect();
    let mut out = Vec::with_capacity(seqs.len());
    for r in micro_batches(&lens, budget) {
        let toks: Vec<Vec<u32>> = seqs[r.clone()].iter().map(|s| s.tokens.clone()).collect();
        let packed = PackedBatch::from_sequences(&toks)?;
        let db = model.upload_batch(b, &packed)?;
        let (lp, _) = model.logprobs_at(b, &db, false, inv_t)?;
        let mut at = 0;
        for l in &lens[r] {
            out.push(lp[at..at + l].to_vec());
            at += l;
        }
    }
    Ok(out)
}

/// Per-sequence logprobs of the response tokens only (`n_response` entries each, the logprob
/// of response token k given the prompt and the response before it) without gradient, at
/// inverse temperature `inv_t`: in [`Layout::Shared`] from the shared-prompt passes with
/// response-only logits, micro-batches of whole groups within `budget` rows; in
/// [`Layout::PerSequence`] the response part of [`seq_logprobs`].
pub fn response_logprobs<B: Backend>(
    b: &B,
    model: &Model<B>,
    seqs: &[TrainSeq],
    budget: usize,
    inv_t: f32,
    layout: Layout,
) -> Result<Vec<Vec<f32>>> {
    check_seqs(seqs)?;
    if layout == Layout::PerSequence {
        let full = seq_logprobs(b, model, seqs, budget, inv_t)?;
        return Ok(full
            .into_iter()
            .zip(seqs)
            .map(|(v, s)| v[s.prompt_len - 1..].to_vec())
            .collect());
    }
    let mut out = Vec::with_capacity(seqs.len());
    for r in group_micro_batches(seqs, budget) {
        let packed = shared_batch(&seqs[r.clone()])?;
        let db = model.upload_batch(b, &packed)?;
        let (lp, _) = model.logprobs_at(b, &db, false, inv_t)?;
        let mut at = 0;
        for s in &seqs[r] {
            out.push(lp[at..at + s.n_response()].to_vec());
            at += s.n_response();
        }
    }
    Ok(out)
}

/// Sums over the micro-batches of one optimizer update.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct UpdateSums {
    /// Aggregated loss of the mini-batch (micro-batch contributions add up to it).
    pub loss: f64,
    pub pg_loss: f64,
    /// Token-weighted sums (divide by `tokens`).
    pub kl_sum: f64,
    pub clip_sum: f64,
    pub ratio_sum: f64,
    pub entropy_sum: f64,
    pub tokens: f64,
    pub micro_batches: usize,
}

impl UpdateSums {
    pub fn add(&mut self, o: &UpdateSums) {
        self.loss += o.loss;
        self.pg_loss += o.pg_loss;
        self.kl_sum += o.kl_sum;
        self.clip_sum += o.clip_sum;
        self.ratio_sum += o.ratio_sum;
        self.entropy_sum += o.entropy_sum;
        self.tokens += o.tokens;
        self.micro_batches += o.micro_batches;
    }
}

/// How the update passes run.
#[derive(Clone, Copy, Debug)]
pub struct PassCfg {
    /// The GRPO loss settings.
    pub loss: GrpoLossCfg,
    /// Weight of the entropy bonus (0 = none).
    pub entropy_coef: f32,
    /// Micro-batch budget in rows.
    pub budget: usize,
    /// Recompute the activations in the backward instead of keeping them.
    pub recompute: bool,
    /// Inverse temperature of the logprobs (see [`crate::train::config::TrainConfig::logprob_inv_t`]).
    pub inv_t: f32,
    pub layout: Layout,
}

/// Sequences with their old and reference logprobs, one entry per sequence each.
#[derive(Clone, Copy, Debug)]
pub struct Scored<'a> {
    pub seqs: &'a [TrainSeq],
    pub old: &'a [Vec<f32>],
    pub reference: &'a [Vec<f32>],
}

/// The size of a whole mini-batch, the denominators of the loss aggregation and of the entropy
/// bonus: when one rank runs part of a mini-batch, its losses and gradients are scaled by the
/// whole mini-batch's size, so that the ranks' parts sum to the loss and gradient of the whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MiniBatchSize {
    pub response_tokens: usize,
    pub seqs: usize,
}

impl MiniBatchSize {
    /// The size of `seqs` as a whole mini-batch.
    pub fn of(seqs: &[TrainSeq]) -> Self {
        MiniBatchSize {
            response_tokens: seqs.iter().map(|s| s.n_response()).sum(),
            seqs: seqs.len(),
        }
    }
}

/// Forward, GRPO loss and backward over every micro-batch of one mini-batch, accumulating into
/// `grads`. `batch.old` and `batch.reference` hold per-sequence logprobs with one entry per
/// position (as from [`seq_logprobs`], at the same `inv_t` as the policy's logprobs and entropy
/// here); the passes are per sequence whatever `cfg.layout` says. The micro-batch losses are
/// scaled so that their sum is the loss the aggregation mode defines over the whole
/// mini-batch, whatever the split.
pub fn accumulate_minibatch<B: Backend, G: GradSink<B> + ?Sized>(
    b: &B,
    model: &Model<B>,
    batch: Scored<'_>,
    cfg: &PassCfg,
    grads: &mut G,
) -> Result<UpdateSums> {
    let cfg = PassCfg {
        layout: Layout::PerSequence,
        ..*cfg
    };
    accumulate_impl(b, model, batch, MiniBatchSize::of(batch.seqs), &cfg, grads)
}

/// [`accumulate_minibatch`] with `old` and `reference` holding response logprobs only (as from
/// [`response_logprobs`]) and the passes in `cfg.layout`: the same loss, metrics and gradient
/// in either layout (micro-batches of whole groups in [`Layout::Shared`]).
pub fn accumulate_responses<B: Backend, G: GradSink<B> + ?Sized>(
    b: &B,
    model: &Model<B>,
    batch: Scored<'_>,
    cfg: &PassCfg,
    grads: &mut G,
) -> Result<UpdateSums> {
    accumulate_part(b, model, batch, MiniBatchSize::of(batch.seqs), cfg, grads)
}

/// [`accumulate_responses`] over `batch`, one rank's part of a mini-batch of size `whole`: the
/// losses and gradients are those of `batch`'s tokens in the whole mini-batch's aggregate, so
/// the parts of all ranks sum to [`accumulate_responses`] over the whole.
pub fn accumulate_part<B: Backend, G: GradSink<B> + ?Sized>(
    b: &B,
    model: &Model<B>,
    batch: Scored<'_>,
    whole: MiniBatchSize,
    cfg: &PassCfg,
    grads: &mut G,
) -> Result<UpdateSums> {
    let seqs = batch.seqs;
    check_seqs(seqs)?;
    crate::ensure!(
        batch.old.len() == seqs.len() && batch.reference.len() == seqs.len(),
        "GRPO: {} old and {} reference logprob vectors for {} sequences",
        batch.old.len(),
        batch.reference.len(),
        seqs.len()
    );
    let part = MiniBatchSize::of(seqs);
    crate::ensure!(
        part.seqs <= whole.seqs && part.response_tokens <= whole.response_tokens,
        "GRPO: a part of {part:?} in a mini-batch of {whole:?}"
    );
    if cfg.layout == Layout::Shared {
        return accumulate_impl(b, model, batch, whole, cfg, grads);
    }
    // Per-sequence passes take an entry per position: the prompt positions are masked out of
    // the loss, so any finite value serves there.
    let pad = |v: &[Vec<f32>], what: &str| -> Result<Vec<Vec<f32>>> {
        v.iter()
            .zip(seqs)
            .enumerate()
            .map(|(i, (x, s))| {
                crate::ensure!(
                    x.len() == s.n_response(),
                    "GRPO: {what} logprobs of sequence {i} have {} entries for {} response \
                     tokens",
                    x.len(),
                    s.n_response()
                );
                let mut full = vec![0.0; s.prompt_len - 1];
                full.extend_from_slice(x);
                Ok(full)
            })
            .collect()
    };
    let (old, reference) = (pad(batch.old, "old")?, pad(batch.reference, "reference")?);
    let padded = Scored {
        seqs,
        old: &old,
        reference: &reference,
    };
    accumulate_impl(b, model, padded, whole, cfg, grads)
}

fn accumulate_impl<B: Backend, G: GradSink<B> + ?Sized>(
    b: &B,
    model: &Model<B>,
    batch: Scored<'_>,
    whole: MiniBatchSize,
    cfg: &PassCfg,
    grads: &mut G,
) -> Result<UpdateSums> {
    let Scored {
        seqs,
        old,
        reference,
    } = batch;
    let (loss_cfg, entropy_coef, budget) = (&cfg.loss, cfg.entropy_coef, cfg.budget);
    let (recompute, inv_t, layout) = (cfg.recompute, cfg.inv_t, cfg.layout);
    let (total_resp, total_seqs) = (whole.response_tokens, whole.seqs);
    let mut sums = UpdateSums::default();
    let ranges = pass_batches(seqs, layout, budget);
    for r in ranges {
        let mb = MicroBatch::with_layout(&seqs[r.clone()], layout)?;
        // logprob entries of this micro-batch
        let n_tok = mb.packed.n_logits();
        let resp: usize = seqs[r.clone()].iter().map(|s| s.n_response()).sum();
        let div = micro_batch_scale(loss_cfg.agg, total_resp, resp, total_seqs, mb.n_seq);
        let cfg = GrpoLossCfg {
            loss_scale_div: loss_cfg.loss_scale_div * div,
            ..*loss_cfg
        };
        let old_flat: Vec<f32> = old[r.clone()].iter().flatten().copied().collect();
        let ref_flat: Vec<f32> = reference[r.clone()].iter().flatten().copied().collect();
        crate::ensure!(
            old_flat.len() == n_tok && ref_flat.len() == n_tok,
            "GRPO: old/reference logprobs have {}/{} entries for {n_tok} positions",
            old_flat.len(),
            ref_flat.len()
        );
        let db = model.upload_batch(b, &mb.packed)?;
        let tape = model.forward_train_at(b, &db, true, recompute, inv_t)?;
        let d_old = b.upload_f32(&old_flat)?;
        let d_ref = b.upload_f32(&ref_flat)?;
        let d_adv = b.upload_f32(&mb.adv)?;
        let d_mask = b.upload_f32(&mb.mask)?;
        let d_seq = b.upload_u32(&mb.seq_id)?;
        let mut dlogp = b.zeros_f32(n_tok)?;
        let tokens = GrpoTokens {
            logp: &tape.logp,
            old_logp: &d_old,
            ref_logp: &d_ref,
            adv: &d_adv,
            mask: &d_mask,
            seq_id: &d_seq,
            n_tok,
            n_seq: mb.n_seq,
        };
        let out: GrpoLossOut = b.grpo_loss(&tokens, &mut dlogp, &cfg)?;
        let mut ent_sum = 0.0f64;
        if let Some(e) = &tape.entropy {
            let ent = b.download_f32(e, n_tok)?;
            ent_sum = ent
                .iter()
                .zip(&mb.mask)
                .map(|(h, m)| (*h * *m) as f64)
                .sum();
            if entropy_coef != 0.0 {
                // loss -= coef * token-mean entropy; score-function gradient at the sampled
                // targets: d(-coef H)/dlogp(y) ~= coef * (logp(y) + H).
                let lp = b.download_f32(&tape.logp, n_tok)?;
                let mut d = b.download_f32(&dlogp, n_tok)?;
                let w = entropy_coef / total_resp as f32;
                for t in 0..n_tok {
                    d[t] += w * mb.mask[t] * (lp[t] + ent[t]);
                }
                dlogp = b.upload_f32(&d)?;
            }
        }
        // The loss sums came to the host after the forward: its vocabulary tile and scratch
        // blocks are released rather than kept cached beside the backward's (see `memory.rs`).
        b.release_cached()?;
        model.backward(b, &db, tape, &dlogp, grads)?;
        let k = out.n_tokens as f64;
        sums.add(&UpdateSums {
            loss: out.loss as f64,
            pg_loss: out.pg_loss as f64 / div as f64,
            kl_sum: out.kl as f64 * k,
            clip_sum: out.clip_frac as f64 * k,
            ratio_sum: out.ratio_mean as f64 * k,
            entropy_sum: ent_sum,
            tokens: k,
            micro_batches: 1,
        });
    }
    Ok(sums)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advantages_match_verl() {
        let a = group_advantages(
            &[1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0],
            4,
            AdvantageKind::Grpo,
        );
        // group 1: mean 0.5, unbiased std sqrt(1/3)
        let s = (1.0f64 / 3.0).sqrt();
        assert!((a[0] as f64 - 0.5 / (s + 1e-6)).abs() < 1e-6);
        assert!((a[1] as f64 + 0.5 / (s + 1e-6)).abs() < 1e-6);
        // group 2: mean 0.5, values 1,1,0,0
        assert!((a[4] as f64 - 0.5 / (s + 1e-6)).abs() < 1e-6);
        // all-equal group -> 0
        let z = group_advantages(&[1.0, 1.0, 1.0], 3, AdvantageKind::Grpo);
        assert!(z.iter().all(|x| *x == 0.0));
        // singleton group: mean 0, std 1
        let one = group_advantages(&[0.7], 1, AdvantageKind::Grpo);
        assert!((one[0] - 0.7 / (1.0 + 1e-6)).abs() < 1e-6);
        let dr = group_advantages(&[1.0, 0.0], 2, AdvantageKind::DrGrpo);
        assert_eq!(dr, vec![0.5, -0.5]);
    }

    #[test]
    fn micro_batches_respect_budget() {
        let lens = [3, 4, 10, 1, 1, 2];
        let mb = micro_batches(&lens, 7);
        assert_eq!(mb, vec![0..2, 2..3, 3..6]);
        assert_eq!(micro_batches(&[], 5), Vec::<Range<usize>>::new());
        let all = micro_batches(&lens, 1000);
        assert_eq!(all, vec![0..6]);
    }

    #[test]
    fn micro_batch_masks_response_only() {
        let s = TrainSeq {
            tokens: vec![1, 2, 3, 4, 5],
            prompt_len: 3,
            adv: 2.0,
        };
        let t = TrainSeq {
            tokens: vec![7, 8],
            prompt_len: 1,
            adv: -1.0,
        };
        let mb = MicroBatch::new(&[s, t]).unwrap();
        // positions of s: targets 2,3,4,5 -> response targets are 4,5 (positions 2,3)
        assert_eq!(mb.mask, vec![0.0, 0.0, 1.0, 1.0, 1.0]);
        assert_eq!(mb.adv, vec![0.0, 0.0, 2.0, 2.0, -1.0]);
        assert_eq!(mb.seq_id, vec![0, 0, 0, 0, 1]);
        let bad = TrainSeq {
            tokens: vec![1, 2],
            prompt_len: 2,
            adv: 0.0,
        };
        assert!(MicroBatch::new(&[bad]).is_err());
    }
}
