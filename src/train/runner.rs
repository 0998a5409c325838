//! The GRPO training loop, generic over the backend: rollout -> reward -> advantages -> old and
//! reference logprobs -> mini-batch updates -> metrics -> periodic checkpoints.
//!
//! Library use (no CLI): build a [`Trainer`] from a policy, a frozen reference (a second model
//! holding the starting weights), a tokenizer, prompts ([`PromptItem`], e.g. from
//! [`prepare_prompts`]) and any [`Reward`], then call [`Trainer::run`] or [`Trainer::step`].
//!
//! Data parallel ([`Trainer::new_in`] with a rank's communicator, one trainer per rank in its own
//! thread, see [`crate::train::parallel`]): every rank draws the same step batch; each global
//! mini-batch of `mini_batch_prompts` groups is split over the ranks
//! ([`crate::dist::split::rank_groups`]; a group never spans two ranks, so advantages need no
//! communication), and each rank rolls out, scores and trains its groups. A rank's rollout
//! draws the random numbers of its sequences' places in the whole batch
//! ([`rollout::Stream::within`]), its losses are scaled by the whole mini-batch's size
//! (summed over the ranks first), its gradients are summed into the optimizer shards, and the
//! step's metrics are reduced over the ranks. So N ranks compute the losses and gradients of
//! one rank on the same global batch, up to the order of float sums (per rank, then over
//! ranks). Rank 0 alone writes the metrics, the progress bar and the checkpoints (gathered:
//! the same folder one rank writes). With `grpo.skip_zero_adv_groups`, left-out groups drop
//! out of their mini-batch instead of the kept groups being re-cut into mini-batches as one
//! rank does, so a mini-batch can shrink.

use crate::backend::{Backend, GrpoLossCfg};
use crate::data::Sample;
use crate::dist::{split::rank_groups, Collective, ShardPlan};
use crate::model::flops::{self, Work};
use crate::model::Model;
use crate::reward::Reward;
use crate::tokenizer::{ChatTemplate, Tokenizer};
use crate::train::checkpoint::{self, TrainerState};
use crate::train::config::Place;
use crate::train::config::TrainConfig;
use crate::train::grpo::{self, MiniBatchSize, PassCfg, Scored, TrainSeq, UpdateSums};
use crate::train::host_grads::Grads;
use crate::train::metrics::{self, MetricsWriter, StepMetrics};
use crate::train::optim::{AdamW, UpdateStats};
use crate::train::rollout::{self, Generation, RolloutStats, SamplingParams};
use crate::{Error, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What a run trains on: the tokenizer, the prompts and the reward.
pub struct TrainData {
    pub tokenizer: Tokenizer,
    pub prompts: Vec<PromptItem>,
    pub reward: Box<dyn Reward>,
}

/// One rank's communicator in a data-parallel run.
pub type RankComm<B> = Box<dyn Collective<B> + Send>;

/// One training prompt: its token ids (chat template applied, generation prompt included) and
/// whatever the reward compares the response against.
#[derive(Clone, Debug, PartialEq)]
pub struct PromptItem {
    pub id: String,
    pub tokens: Vec<u32>,
    pub ground_truth: serde_json::Value,
}

/// Render and tokenize samples as prompts. Samples whose prompt exceeds `max_tokens` are left
/// out; their count is returned with the prompts.
pub fn prepare_prompts(
    samples: &[Sample],
    tok: &Tokenizer,
    template: &ChatTemplate,
    max_tokens: usize,
) -> Result<(Vec<PromptItem>, usize)> {
    let mut out = Vec::with_capacity(samples.len());
    let mut dropped = 0;
    for s in samples {
        let text = template
            .render(&s.messages, None, true)
            .map_err(|e| Error::msg(format!("sample {}: cannot render the prompt: {e}", s.id)))?;
        let tokens = tok.encode(&text)?;
        if tokens.len() > max_tokens || tokens.is_empty() {
            dropped += 1;
            continue;
        }
        out.push(PromptItem {
            id: s.id.clone(),
            tokens,
            ground_truth: s.ground_truth.clone(),
        });
    }
    Ok((out, dropped))
}

/// The ids that end a response: `<|im_end|>` and `<|endoftext|>` of `tok`, plus the config's
/// eos ids.
pub fn stop_tokens(tok: &Tokenizer, cfg: &crate::model::Qwen2Config) -> Vec<u32> {
    let mut stop = Vec::new();
    for t in ["<|im_end|>", "<|endoftext|>"] {
        if let Some(id) = tok.token_id(t) {
            stop.push(id);
        }
    }
    for &e in &cfg.eos_token_id {
        if !stop.contains(&e) && (e as usize) < cfg.vocab_size {
            stop.push(e);
        }
    }
    stop
}

/// Position `pos` of the endless stream of data items, shuffled per epoch with `seed`.
pub struct DataOrder {
    seed: u64,
    len: usize,
    epoch: u64,
    perm: Vec<usize>,
}

impl DataOrder {
    pub fn new(seed: u64, len: usize) -> Self {
        let mut d = DataOrder {
            seed,
            len,
            epoch: u64::MAX,
            perm: Vec::new(),
        };
        d.set_epoch(0);
        d
    }

    fn set_epoch(&mut self, epoch: u64) {
        if self.epoch == epoch {
            return;
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
            self.seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        self.perm = (0..self.len).collect();
        self.perm.shuffle(&mut rng);
        self.epoch = epoch;
    }

    /// The item at stream position `pos` and its epoch.
    pub fn at(&mut self, pos: u64) -> (usize, u64) {
        let epoch = pos / self.len as u64;
        self.set_epoch(epoch);
        (self.perm[(pos % self.len as u64) as usize], epoch)
    }
}

/// The prompts of one step: their indices into the data, the epoch of the first, their token
/// ids.
struct StepBatch {
    idx: Vec<usize>,
    epoch: u64,
    tokens: Vec<Vec<u32>>,
}

/// This rank's share of a step batch: its prompts (as a batch of their own), their indices in
/// the step batch, and the global mini-batch of each.
struct RankShare {
    local: StepBatch,
    index: Vec<usize>,
    mini_batch: Vec<usize>,
}

/// This rank's prompts of a step, their responses and the responses' scores.
struct Rolled<'a> {
    local: &'a StepBatch,
    gens: &'a [Generation],
    scores: &'a Scores,
}

/// The rewards of one step's responses, with the format-ok and exact-match counts.
struct Scores {
    rewards: Vec<f32>,
    format_ok: usize,
    exact: usize,
}

/// What one step's optimizer updates measured: the summed loss statistics (and those of the
/// first update alone, whose entropy is the policy's before any change), the last update's
/// gradient norm and learning rate, and the number of updates.
#[derive(Default)]
struct UpdateOutcome {
    sums: UpdateSums,
    first: Option<UpdateSums>,
    grad_norm: f64,
    lr: f32,
    updates: usize,
}

/// What a step computed beyond its sequences: the rollout's work, the zero-signal groups, and
/// the phases' times.
struct StepWork {
    rollout: RolloutStats,
    zero_groups: usize,
    groups_skipped: usize,
    times: StepTimes,
}

/// The items (one per sequence) of the groups (n consecutive sequences each) that are not
/// flagged in `skip`.
fn keep_groups<T>(items: Vec<T>, n: usize, skip: &[bool]) -> Vec<T> {
    items
        .into_iter()
        .enumerate()
        .filter(|(i, _)| !skip.get(i / n.max(1)).copied().unwrap_or(false))
        .map(|(_, s)| s)
        .collect()
}

/// Seconds spent in each phase of a step.
struct StepTimes {
    rollout: f64,
    reward: f64,
    old_logprobs: f64,
    reference: f64,
    update: f64,
    step: f64,
}

/// The mini-batches of `seqs` (consecutive ranges, possibly empty), where sequence i belongs
/// to mini-batch `of[i]` (non-decreasing) of `count`.
fn mini_batch_ranges(of: &[usize], count: usize) -> Vec<Range<usize>> {
    let mut out = Vec::with_capacity(count);
    let mut at = 0;
    for k in 0..count {
        let start = at;
        while at < of.len() && of[at] == k {
            at += 1;
        }
        out.push(start..at);
    }
    out
}

/// Run `f` and measure it.
fn timed<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, f64)> {
    let t = Instant::now();
    let v = f()?;
    Ok((v, t.elapsed().as_secs_f64()))
}

/// A GRPO run in progress.
pub struct Trainer<B: Backend> {
    pub b: B,
    pub policy: Model<B>,
    pub reference: Model<B>,
    pub opt: AdamW<B>,
    grads: Grads<B>,
    pub tokenizer: Tokenizer,
    pub prompts: Vec<PromptItem>,
    pub reward: Box<dyn Reward>,
    pub cfg: TrainConfig,
    pub stop: Vec<u32>,
    order: DataOrder,
    /// Completed steps.
    pub step: u64,
    pub sample_offset: u64,
    pub data_pos: u64,
    /// Where the reference weights come from (recorded in checkpoints).
    pub reference_dir: Option<PathBuf>,
    /// Folder whose tokenizer files are copied into checkpoints.
    pub source_dir: Option<PathBuf>,
    /// Hide the progress bar.
    pub quiet: bool,
    /// Delete checkpoints in the output folder after the current step instead of refusing to
    /// start (see [`checkpoint::claim_run_dir`]).
    pub discard_later: bool,
    /// This rank's communicator in a data-parallel run (None: one device, no communication).
    comm: Option<RankComm<B>>,
}

impl<B: Backend> Trainer<B> {
    /// Start a run. `reference` must hold the same weights as `policy` (it stays frozen).
    pub fn new(
        b: B,
        policy: Model<B>,
        reference: Model<B>,
        tokenizer: Tokenizer,
        prompts: Vec<PromptItem>,
        reward: Box<dyn Reward>,
        cfg: TrainConfig,
    ) -> Result<Self> {
        let data = TrainData {
            tokenizer,
            prompts,
            reward,
        };
        Self::new_in(b, policy, reference, data, cfg, None)
    }

    /// [`Trainer::new`] for one rank of a data-parallel group (`comm`; None: a single device).
    /// Every rank gets the same models, data and config; the optimizer state is this rank's
    /// shards.
    pub fn new_in(
        b: B,
        policy: Model<B>,
        reference: Model<B>,
        data: TrainData,
        cfg: TrainConfig,
        comm: Option<RankComm<B>>,
    ) -> Result<Self> {
        let opt = Self::optimizer(&b, &policy, &cfg, comm.as_deref())?;
        Self::assemble(b, policy, reference, data, cfg, opt, comm)
    }

    /// Fresh optimizer state: this rank's shards in a group, else placed as configured.
    fn optimizer(
        b: &B,
        policy: &Model<B>,
        cfg: &TrainConfig,
        comm: Option<&(dyn Collective<B> + Send)>,
    ) -> Result<AdamW<B>> {
        let host = cfg.memory.optimizer == Place::Host;
        match comm {
            Some(c) => {
                crate::ensure!(
                    !host,
                    "memory.optimizer = \"host\" is not available with more than one rank (the \
                     optimizer state is sharded over the devices instead)"
                );
                let plan = ShardPlan::new(&policy.layout, c.world())?;
                AdamW::sharded(b, policy, cfg.optim.clone(), plan, c.rank())
            }
            None => AdamW::placed(b, policy, cfg.optim.clone(), host),
        }
    }

    fn assemble(
        b: B,
        policy: Model<B>,
        reference: Model<B>,
        data: TrainData,
        cfg: TrainConfig,
        opt: AdamW<B>,
        comm: Option<RankComm<B>>,
    ) -> Result<Self> {
        let TrainData {
            tokenizer,
            prompts,
            reward,
        } = data;
        cfg.validate()?;
        crate::safefs::check_host_memory(
            Some(cfg.step_host_bytes()),
            &format!(
                "one GRPO step ({} prompts x {} samples x up to {} tokens)",
                cfg.grpo.prompts_per_step,
                cfg.rollout.n,
                cfg.rollout
                    .max_prompt_tokens
                    .saturating_add(cfg.rollout.max_new_tokens)
            ),
        )?;
        if prompts.is_empty() {
            return Err(Error::msg("no training prompts"));
        }
        let unusable: Vec<(&str, String)> = prompts
            .iter()
            .filter_map(|p| {
                reward
                    .check_ground_truth(&p.ground_truth)
                    .err()
                    .map(|e| (p.id.as_str(), e))
            })
            .collect();
        if let Some((id, why)) = unusable.first() {
            if unusable.len() == prompts.len() {
                return Err(Error::msg(format!(
                    "none of the {} training prompts has a usable ground truth (e.g. sample \
                     {id}: {why}); every reward would be 0 and nothing could be learned",
                    prompts.len()
                )));
            }
            eprintln!(
                "warning: {} of {} training prompts have an unusable ground truth and always \
                 score 0 (e.g. sample {id}: {why})",
                unusable.len(),
                prompts.len()
            );
        }
        if !policy.cfg.same_model(&reference.cfg) {
            return Err(Error::msg(
                "the reference model's config differs from the policy's (beyond the storage \
                 dtype): they must be the same model",
            ));
        }
        let reference = match cfg.memory.reference {
            Place::Host => reference.into_streamed(&b)?,
            _ => reference,
        };
        let grads = opt.alloc_grads(&b, &policy, cfg.memory.grads == Place::Host)?;
        let stop = stop_tokens(&tokenizer, &policy.cfg);
        if stop.is_empty() {
            return Err(Error::msg(
                "the tokenizer has neither <|im_end|> nor <|endoftext|> and the config no eos id: \
                 responses could never stop",
            ));
        }
        let order = DataOrder::new(cfg.run.seed, prompts.len());
        Ok(Trainer {
            b,
            policy,
            reference,
            opt,
            grads,
            tokenizer,
            prompts,
            reward,
            cfg,
            stop,
            order,
            step: 0,
            sample_offset: 0,
            data_pos: 0,
            reference_dir: None,
            source_dir: None,
            quiet: false,
            discard_later: false,
            comm,
        })
    }

    /// Continue from a checkpoint folder: policy, optimizer and counters come from it; the
    /// reference, prompts and reward are given again (they must be the same as before for an
    /// exact continuation; the data size is checked).
    pub fn resume(
        b: B,
        ckpt: &Path,
        reference: Model<B>,
        tokenizer: Tokenizer,
        prompts: Vec<PromptItem>,
        reward: Box<dyn Reward>,
        cfg: TrainConfig,
    ) -> Result<Self> {
        let data = TrainData {
            tokenizer,
            prompts,
            reward,
        };
        Self::resume_in(b, ckpt, reference, data, cfg, None)
    }

    /// [`Trainer::resume`] for one rank of a data-parallel group (`comm`): the checkpoint of a
    /// run on any number of ranks, each rank keeping its shards of the saved state.
    pub fn resume_in(
        b: B,
        ckpt: &Path,
        reference: Model<B>,
        data: TrainData,
        cfg: TrainConfig,
        comm: Option<RankComm<B>>,
    ) -> Result<Self> {
        let (policy, opt, state) =
            checkpoint::load_with(ckpt, &b, |m| Self::optimizer(&b, m, &cfg, comm.as_deref()))?;
        if state.kind != "grpo" {
            return Err(Error::msg(format!(
                "{}: a {} checkpoint cannot resume a GRPO run (start a new run from its model/ \
                 folder instead)",
                ckpt.display(),
                state.kind
            )));
        }
        if state.data_len != data.prompts.len() {
            return Err(Error::msg(format!(
                "{}: the checkpoint was trained on {} prompts, this data has {}; resume with the \
                 same data",
                ckpt.display(),
                state.data_len,
                data.prompts.len()
            )));
        }
        let mut t = Trainer::assemble(b, policy, reference, data, cfg, opt, comm)?;
        t.step = state.step;
        t.sample_offset = state.sample_offset;
        t.data_pos = state.data_pos;
        t.reference_dir = state.reference.clone();
        Ok(t)
    }

    /// Steps per epoch: whole rollout batches in one pass over the prompts (at least 1).
    pub fn steps_per_epoch(&self) -> u64 {
        (self.prompts.len() / self.cfg.grpo.prompts_per_step).max(1) as u64
    }

    /// Total steps of the run.
    pub fn total_steps(&self) -> u64 {
        if self.cfg.run.steps > 0 {
            self.cfg.run.steps
        } else {
            self.cfg.run.epochs.max(1) * self.steps_per_epoch()
        }
    }

    fn updates_per_step(&self) -> u64 {
        let g = &self.cfg.grpo;
        (g.prompts_per_step.div_ceil(g.mini_batch_prompts) * g.ppo_epochs) as u64
    }

    fn sampling(&self) -> SamplingParams {
        let r = &self.cfg.rollout;
        SamplingParams {
            temperature: r.temperature,
            top_p: r.top_p,
            top_k: r.top_k,
            max_new_tokens: r.max_new_tokens,
            stop: self.stop.clone(),
            max_slots: r.max_slots,
        }
    }

    /// The layout of the training-side passes: shared prompts when configured, else per
    /// sequence.
    pub fn layout(&self) -> grpo::Layout {
        if self.cfg.grpo.shared_prompt {
            grpo::Layout::Shared
        } else {
            grpo::Layout::PerSequence
        }
    }

    /// One GRPO step on the next `prompts_per_step` prompts: rollouts, rewards and advantages,
    /// old and reference logprobs, the mini-batch updates, then the step's metrics. In a
    /// data-parallel run every rank calls it; each runs its share of the groups.
    pub fn step(&mut self) -> Result<StepMetrics> {
        let t_step = Instant::now();
        let batch = self.next_batch();
        let share = self.share(&batch);
        let local = &share.local;
        let ((gens, rollout), time_rollout) = timed(|| self.rollouts(&share, batch.tokens.len()))?;
        // The KV cache and the decode buffers are gone: their blocks are not kept cached
        // through the training passes (see `model::memory`).
        self.b.release_cached()?;
        let (scores, time_reward) = timed(|| self.rewards(local, &gens))?;
        let n = self.cfg.rollout.n;
        let zero = grpo::zero_signal_groups(&scores.rewards, n);
        let mut seqs = self.train_seqs(local, &gens, &scores);
        let mut of: Vec<usize> = (0..seqs.len()).map(|i| share.mini_batch[i / n]).collect();
        if self.cfg.grpo.skip_zero_adv_groups {
            seqs = keep_groups(seqs, n, &zero);
            of = keep_groups(of, n, &zero);
        }
        let ranges = if self.comm.is_some() {
            let count = batch
                .tokens
                .len()
                .div_ceil(self.cfg.grpo.mini_batch_prompts.max(1));
            mini_batch_ranges(&of, count)
        } else {
            // One rank: the (kept) sequences cut into mini-batches of mini_batch_prompts groups.
            let mini = self.cfg.grpo.mini_batch_prompts * n;
            (0..seqs.len())
                .step_by(mini.max(1))
                .map(|s| s..(s + mini).min(seqs.len()))
                .collect()
        };
        // The policy before any update ("old") and the frozen reference, both at the rollout
        // temperature as verl's actor computes them (see `GrpoConfig::logprob_temperature`).
        let (old, time_old) = timed(|| self.logprobs(&self.policy, &seqs))?;
        let (reference, time_ref) = timed(|| self.logprobs(&self.reference, &seqs))?;
        let (upd, time_update) = timed(|| self.updates(&seqs, &ranges, &old, &reference))?;
        self.advance(batch.tokens.len());
        let times = StepTimes {
            rollout: time_rollout,
            reward: time_reward,
            old_logprobs: time_old,
            reference: time_ref,
            update: time_update,
            step: t_step.elapsed().as_secs_f64(),
        };
        let zero_groups = zero.iter().filter(|z| **z).count();
        let work = StepWork {
            rollout,
            zero_groups,
            groups_skipped: if self.cfg.grpo.skip_zero_adv_groups {
                zero_groups
            } else {
                0
            },
            times,
        };
        let rolled = Rolled {
            local,
            gens: &gens,
            scores: &scores,
        };
        self.step_metrics(&batch, rolled, &seqs, &upd, &work)
    }

    /// This rank's communicator in a data-parallel run.
    fn comm(&self) -> Option<&dyn Collective<B>> {
        self.comm.as_deref().map(|c| c as &dyn Collective<B>)
    }

    /// This rank's share of `batch`: within each global mini-batch of `mini_batch_prompts`
    /// groups, a contiguous near-equal part ([`rank_groups`]); all of it on a single rank.
    fn share(&self, batch: &StepBatch) -> RankShare {
        let p = batch.tokens.len();
        let (world, rank) = self.comm().map_or((1, 0), |c| (c.world(), c.rank()));
        let m = self.cfg.grpo.mini_batch_prompts.max(1);
        let (mut index, mut mini_batch) = (Vec::new(), Vec::new());
        for (k, start) in (0..p).step_by(m).enumerate() {
            for g in rank_groups(m.min(p - start), world, rank) {
                index.push(start + g);
                mini_batch.push(k);
            }
        }
        let local = StepBatch {
            idx: index.iter().map(|&g| batch.idx[g]).collect(),
            epoch: batch.epoch,
            tokens: index.iter().map(|&g| batch.tokens[g].clone()).collect(),
        };
        RankShare {
            local,
            index,
            mini_batch,
        }
    }

    /// The prompts of the next step: `prompts_per_step` positions of the shuffled data stream
    /// from `data_pos` on, and the epoch of the first.
    fn next_batch(&mut self) -> StepBatch {
        let p = self.cfg.grpo.prompts_per_step;
        let mut idx = Vec::with_capacity(p);
        let mut epoch = 0;
        for k in 0..p {
            let (i, e) = self.order.at(self.data_pos + k as u64);
            idx.push(i);
            if k == 0 {
                epoch = e;
            }
        }
        let tokens = idx
            .iter()
            .map(|&i| self.prompts[i].tokens.clone())
            .collect();
        StepBatch { idx, epoch, tokens }
    }

    /// `rollout.n` sampled responses per prompt of this rank's share of a step batch of
    /// `prompts` prompts, from the sampling stream at `sample_offset` (at the share's places in
    /// the whole batch), and what the rollout computed.
    fn rollouts(
        &self,
        share: &RankShare,
        prompts: usize,
    ) -> Result<(Vec<Generation>, RolloutStats)> {
        let stream = rollout::Stream {
            seed: self.cfg.run.seed,
            offset: self.sample_offset,
            within: self.comm.as_ref().map(|_| rollout::Within {
                prompt_index: &share.index,
                prompts,
            }),
        };
        rollout::generate_with(
            &self.b,
            &self.policy,
            &share.local.tokens,
            self.cfg.rollout.n,
            &self.sampling(),
            stream,
            &rollout::Schedule {
                kv_block_size: Some(self.cfg.rollout.kv_block_size),
                kv_blocks: (self.cfg.rollout.kv_blocks > 0).then_some(self.cfg.rollout.kv_blocks),
                plain_decode: !self.cfg.rollout.cuda_graphs,
                ..rollout::Schedule::default()
            },
        )
    }

    /// The device's peak TFLOP/s for the utilisation metrics: `peak_tflops` when set, else a
    /// CUDA device's by its name; None for the CPU backend.
    fn peak_tflops(&self) -> Option<f64> {
        let name = self.b.name();
        self.cfg.peak_tflops.or_else(|| {
            name.strip_prefix("cuda:")
                .and_then(crate::model::flops::cuda_peak_tflops)
        })
    }

    /// The reward of every response (checked to be finite) and the format-ok / exact counts.
    fn rewards(&self, batch: &StepBatch, gens: &[Generation]) -> Result<Scores> {
        let mut s = Scores {
            rewards: Vec::with_capacity(gens.len()),
            format_ok: 0,
            exact: 0,
        };
        for g in gens {
            let text = self.tokenizer.decode(g.content(), false)?;
            let item = &self.prompts[batch.idx[g.prompt]];
            let r = self.reward.score(&text, &item.ground_truth);
            check_reward(r.reward, &item.id)?;
            s.format_ok += r.format_ok as usize;
            s.exact += r.calls_ok as usize;
            s.rewards.push(r.reward);
        }
        Ok(s)
    }

    /// Prompt + response sequences with their group advantages.
    fn train_seqs(&self, batch: &StepBatch, gens: &[Generation], scores: &Scores) -> Vec<TrainSeq> {
        let adv =
            grpo::group_advantages(&scores.rewards, self.cfg.rollout.n, self.cfg.grpo.advantage);
        gens.iter()
            .zip(&adv)
            .map(|(g, &a)| {
                let mut tokens = batch.tokens[g.prompt].clone();
                let prompt_len = tokens.len();
                tokens.extend_from_slice(&g.tokens);
                TrainSeq {
                    tokens,
                    prompt_len,
                    adv: a,
                }
            })
            .collect()
    }

    /// Per-sequence response logprobs of `model` (no gradient), in micro-batches, in the
    /// configured layout.
    fn logprobs(&self, model: &Model<B>, seqs: &[TrainSeq]) -> Result<Vec<Vec<f32>>> {
        if seqs.is_empty() {
            // Every group left out (`grpo.skip_zero_adv_groups`): nothing to score.
            return Ok(Vec::new());
        }
        let budget = self.cfg.grpo.micro_batch_tokens;
        let inv_t = self.cfg.logprob_inv_t();
        grpo::response_logprobs(&self.b, model, seqs, budget, inv_t, self.layout())
    }

    /// The loss settings of the GRPO op (`norm_len` 0 = `rollout.max_new_tokens`).
    fn loss_cfg(&self) -> GrpoLossCfg {
        let g = &self.cfg.grpo;
        GrpoLossCfg {
            clip_low: g.clip_low,
            clip_high: g.clip_high,
            kl_coef: g.kl_coef,
            kl_kind: g.kl_kind,
            agg: g.loss_agg,
            norm_len: if g.norm_len > 0.0 {
                g.norm_len
            } else {
                self.cfg.rollout.max_new_tokens as f32
            },
            loss_scale_div: 1.0,
        }
    }

    /// `ppo_epochs` passes over the sequences in the mini-batches `ranges` (this rank's part of
    /// each global mini-batch), one optimizer update each. In a data-parallel run the parts'
    /// sizes are summed over the ranks first (the loss denominators), and a mini-batch that is
    /// empty on every rank is no update.
    fn updates(
        &mut self,
        seqs: &[TrainSeq],
        ranges: &[Range<usize>],
        old: &[Vec<f32>],
        reference: &[Vec<f32>],
    ) -> Result<UpdateOutcome> {
        let g = &self.cfg.grpo;
        let pass = PassCfg {
            loss: self.loss_cfg(),
            entropy_coef: g.entropy_coef,
            budget: g.micro_batch_tokens,
            recompute: g.recompute,
            inv_t: self.cfg.logprob_inv_t(),
            layout: self.layout(),
        };
        let ppo_epochs = g.ppo_epochs;
        let total_updates = self.total_steps() * self.updates_per_step();
        let dp = self.comm.is_some();
        let mut out = UpdateOutcome::default();
        for _ in 0..ppo_epochs {
            for r in ranges {
                let part = Scored {
                    seqs: &seqs[r.clone()],
                    old: &old[r.clone()],
                    reference: &reference[r.clone()],
                };
                let whole = MiniBatchSize::of(part.seqs);
                let (u, s) = match dp {
                    true => match self.update_part(part, whole, &pass, total_updates)? {
                        Some(us) => us,
                        // Empty on every rank.
                        None => continue,
                    },
                    false => {
                        self.grads.zero(&self.b, &self.policy)?;
                        let s = grpo::accumulate_part(
                            &self.b,
                            &self.policy,
                            part,
                            whole,
                            &pass,
                            &mut self.grads,
                        )?;
                        let u = self.opt.step_grads(
                            &self.b,
                            &mut self.policy,
                            &self.grads,
                            total_updates,
                        )?;
                        (u, s)
                    }
                };
                out.grad_norm = u.grad_norm;
                out.lr = u.lr;
                out.updates += 1;
                out.sums.add(&s);
                if out.first.is_none() {
                    out.first = Some(s);
                }
            }
        }
        Ok(out)
    }

    /// One update of a data-parallel rank from its `part` of a mini-batch (of local size
    /// `mine`): the whole mini-batch's size and the most micro-batches of any rank agreed, this
    /// rank's backward passes (padded to that count) reduced into the gradient shards per
    /// group, then the sharded AdamW step. None when the mini-batch is empty on every rank.
    fn update_part(
        &mut self,
        part: Scored<'_>,
        mine: MiniBatchSize,
        pass: &PassCfg,
        total_updates: u64,
    ) -> Result<Option<(UpdateStats, UpdateSums)>> {
        let c: &dyn Collective<B> = match self.comm.as_deref() {
            Some(c) => c,
            None => return Err(Error::Invalid("update_part: no rank group".into())),
        };
        let mut v = [
            mine.response_tokens as f64,
            mine.seqs as f64,
            grpo::pass_batches(part.seqs, pass.layout, pass.budget).len() as f64,
        ];
        let mut most = [v[2]];
        c.all_reduce_host(&mut v[..2])?;
        c.all_max_host(&mut most)?;
        let whole = MiniBatchSize {
            response_tokens: v[0] as usize,
            seqs: v[1] as usize,
        };
        if whole.seqs == 0 {
            return Ok(None);
        }
        let mut sink = self.opt.shards_mut()?.sink(c, self.policy.layout.embed);
        let s = if part.seqs.is_empty() {
            UpdateSums::default()
        } else {
            let r = grpo::accumulate_part(&self.b, &self.policy, part, whole, pass, &mut sink);
            if let Err(e) = &r {
                c.abort(&e.to_string());
            }
            r?
        };
        sink.pad_passes(&self.b, &self.policy.layout, most[0] as usize)?;
        let u = self
            .opt
            .step_shards(&self.b, c, &mut self.policy, total_updates)?;
        Ok(Some((u, s)))
    }

    /// Move the counters past a step of `prompts` prompts: the sampling stream, the data
    /// position and the step count.
    fn advance(&mut self, prompts: usize) {
        let r = &self.cfg.rollout;
        self.sample_offset += rollout::stream_len(prompts, r.n, r.max_new_tokens);
        self.data_pos += prompts as u64;
        self.step += 1;
    }

    /// The metrics line of the step just finished (over every rank's share in a data-parallel
    /// run: counts and sums are summed over the ranks, times and the longest response are the
    /// ranks' maxima).
    fn step_metrics(
        &self,
        batch: &StepBatch,
        rolled: Rolled<'_>,
        seqs: &[TrainSeq],
        upd: &UpdateOutcome,
        work: &StepWork,
    ) -> Result<StepMetrics> {
        let Rolled {
            local,
            gens,
            scores,
        } = rolled;
        let comm = self.comm();
        let sum = |v: &mut [f64]| comm.map_or(Ok(()), |c| c.all_reduce_host(v));
        let n = self.cfg.rollout.n;
        let layout = self.layout();
        let rewards = &scores.rewards;
        let resp_lens: Vec<usize> = gens.iter().map(|g| g.tokens.len()).collect();
        let (rows, logit_rows) = grpo::pass_rows(seqs, layout);
        let (rows_naive, logit_rows_naive) = grpo::pass_rows(seqs, grpo::Layout::PerSequence);
        let pass: Work = grpo::pass_work(seqs, layout);
        let ro = &work.rollout;
        // The additive counts of this rank, then of all.
        let mut c = [
            rewards.len() as f64,
            rewards.iter().map(|&s| s as f64).sum::<f64>(),
            scores.format_ok as f64,
            scores.exact as f64,
            work.zero_groups as f64,
            work.groups_skipped as f64,
            gens.iter().filter(|g| !g.stopped).count() as f64,
            resp_lens.iter().sum::<usize>() as f64,
            gens.iter()
                .map(|g| local.tokens[g.prompt].len())
                .sum::<usize>() as f64,
            rows as f64,
            logit_rows as f64,
            rows_naive as f64,
            logit_rows_naive as f64,
            ro.prefills as f64,
            ro.preemptions as f64,
            ro.graph_replays as f64,
            ro.plain_decode_steps as f64,
        ];
        sum(&mut c)?;
        let [k, reward_sum, format_ok, exact, zero_groups, groups_skipped, truncated, resp_tokens, prompt_tokens, rows, logit_rows, rows_naive, logit_rows_naive, prefills, preemptions, graph_replays, plain_decode_steps] =
            c;
        let k = k.max(1.0);
        let mean = reward_sum / k;
        let mut dev = [rewards
            .iter()
            .map(|&s| (s as f64 - mean).powi(2))
            .sum::<f64>()];
        sum(&mut dev)?;
        let std = (dev[0] / (k - 1.0).max(1.0)).sqrt();
        let mut works = [
            pass,
            ro.prefill,
            ro.decode,
            ro.naive_prefill,
            ro.naive_decode,
        ];
        let mut wv: Vec<f64> = works
            .iter()
            .flat_map(|w| [w.rows as f64, w.logit_rows as f64, w.attn_pairs as f64])
            .collect();
        sum(&mut wv)?;
        for (w, v) in works.iter_mut().zip(wv.chunks(3)) {
            *w = Work {
                rows: v[0] as u64,
                logit_rows: v[1] as u64,
                attn_pairs: v[2] as u64,
            };
        }
        let [pass, prefill, decode, naive_prefill, naive_decode] = works;
        let sums = reduce_sums(comm, upd.sums)?;
        let first = match upd.first {
            Some(f) => Some(reduce_sums(comm, f)?),
            None => None,
        };
        let times = &work.times;
        let mut mx = [
            resp_lens.iter().copied().max().unwrap_or(0) as f64,
            times.rollout,
            times.reward,
            times.old_logprobs,
            times.reference,
            times.update,
            times.step,
            ro.peak_blocks as f64,
            ro.peak_concurrent as f64,
        ];
        if let Some(c) = comm {
            c.all_max_host(&mut mx)?;
        }
        let [len_max, t_rollout, t_reward, t_old, t_ref, t_update, t_step, peak_blocks, peak_concurrent] =
            mx;
        let tok = sums.tokens.max(1.0);
        let updates = upd.updates.max(1) as f64;
        // FLOPs per phase (model::flops): forward for the rollout and the old and reference
        // passes, forward + backward (3x) for every PPO epoch of the update.
        let cfg = &self.policy.cfg;
        let mut ro_work = prefill;
        ro_work.add(decode);
        let mut ro_naive = naive_prefill;
        ro_naive.add(naive_decode);
        let epochs = self.cfg.grpo.ppo_epochs as f64;
        let flops_rollout = ro_work.forward_flops(cfg);
        let flops_pass = pass.forward_flops(cfg);
        let flops_update = epochs * pass.train_flops(cfg);
        let peak = self.peak_tflops();
        // Utilisation against the peak of every rank's device.
        let peak_all = peak.map(|p| p * comm.map_or(1, |c| c.world()) as f64);
        let per_s = |tokens: f64, t: f64| if t > 0.0 { tokens / t } else { 0.0 };
        Ok(StepMetrics {
            step: self.step,
            epoch: batch.epoch,
            lr: upd.lr,
            reward_mean: mean,
            reward_std: std,
            format_ok_rate: format_ok / k,
            exact_match_rate: exact / k,
            zero_adv_groups: zero_groups / (k / n as f64),
            loss: sums.loss / updates,
            pg_loss: sums.pg_loss / updates,
            kl: sums.kl_sum / tok,
            clip_frac: sums.clip_sum / tok,
            ratio_mean: sums.ratio_sum / tok,
            entropy: first
                .as_ref()
                .map(|f| f.entropy_sum / f.tokens.max(1.0))
                .unwrap_or(0.0),
            grad_norm: upd.grad_norm,
            response_len_mean: resp_tokens / k,
            response_len_max: len_max as usize,
            truncated_rate: truncated / k,
            prompt_tokens: prompt_tokens as usize,
            response_tokens: resp_tokens as usize,
            updates: upd.updates,
            time_rollout_s: t_rollout,
            time_reward_s: t_reward,
            time_old_logprobs_s: t_old,
            time_reference_s: t_ref,
            time_update_s: t_update,
            time_step_s: t_step,
            shared_prompt: layout == grpo::Layout::Shared,
            tokens_old_logprobs: rows as usize,
            tokens_reference: rows as usize,
            tokens_update: rows as usize * self.cfg.grpo.ppo_epochs,
            tokens_naive_per_pass: rows_naive as usize,
            logit_rows_per_pass: logit_rows as usize,
            logit_rows_naive_per_pass: logit_rows_naive as usize,
            tokens_per_s: (prompt_tokens + resp_tokens) / t_step.max(1e-9),
            groups_skipped: groups_skipped as usize,
            tokens_rollout_prefill: prefill.rows,
            tokens_rollout_decode: decode.rows,
            tokens_rollout_naive: ro_naive.rows,
            rollout_prefills: prefills as usize,
            rollout_kv_peak_blocks: peak_blocks as usize,
            rollout_peak_concurrent: peak_concurrent as usize,
            rollout_preemptions: preemptions as usize,
            rollout_graph_replays: graph_replays as usize,
            rollout_plain_decode_steps: plain_decode_steps as usize,
            flops_rollout,
            flops_old_logprobs: flops_pass,
            flops_reference: flops_pass,
            flops_update,
            tokens_per_s_rollout: per_s(ro_work.rows as f64, t_rollout),
            tokens_per_s_old_logprobs: per_s(rows, t_old),
            tokens_per_s_reference: per_s(rows, t_ref),
            tokens_per_s_update: per_s(rows * epochs, t_update),
            peak_tflops: peak,
            mfu_rollout: flops::mfu(flops_rollout, t_rollout, peak_all),
            mfu_old_logprobs: flops::mfu(flops_pass, t_old, peak_all),
            mfu_reference: flops::mfu(flops_pass, t_ref, peak_all),
            mfu_update: flops::mfu(flops_update, t_update, peak_all),
            peak_host_mib: metrics::peak_host_mib(),
        })
    }

    /// The counters a checkpoint records.
    pub fn state(&self) -> TrainerState {
        TrainerState {
            version: 1,
            kind: "grpo".into(),
            step: self.step,
            updates: self.opt.updates,
            sample_offset: self.sample_offset,
            data_pos: self.data_pos,
            seed: self.cfg.run.seed,
            data_len: self.prompts.len(),
            reference: self.reference_dir.clone(),
            config: serde_json::to_value(&self.cfg).unwrap_or(serde_json::Value::Null),
        }
    }

    /// Write a checkpoint of the current state into `dir` (in a data-parallel run every rank
    /// calls it; rank 0 writes, see [`checkpoint::save_in`]).
    pub fn save_checkpoint(&self, dir: &Path) -> Result<()> {
        checkpoint::save_in(
            dir,
            &self.b,
            &self.policy,
            &self.opt,
            &self.state(),
            self.source_dir.as_deref(),
            self.comm(),
        )
    }

    /// Whether this trainer writes the run's files: a single device, or rank 0 of a group.
    pub fn is_writer(&self) -> bool {
        self.comm().is_none_or(|c| c.rank() == 0)
    }

    /// `r` on every rank: an error of the writer's file work stops the group (the other ranks
    /// would wait for it at their next collective).
    fn on_writer<T>(&self, r: Result<T>) -> Result<T> {
        if let (Err(e), Some(c)) = (&r, self.comm()) {
            c.abort(&e.to_string());
        }
        r
    }

    /// Run until `total_steps`, writing `<out>/metrics.jsonl`, a progress bar, checkpoints
    /// every `save_every` steps and at the end. Returns the metrics of the steps run. In a
    /// data-parallel run every rank calls it and gets the same metrics; rank 0 writes the files
    /// and shows the progress.
    pub fn run(&mut self) -> Result<Vec<StepMetrics>> {
        let total = self.total_steps();
        let out = self.cfg.run.out.clone();
        let writer = self.is_writer();
        let (_lock, mut file) = if writer {
            let lock = self.on_writer(checkpoint::claim_run_dir(
                &out,
                self.step,
                self.discard_later,
            ))?;
            let w = self.on_writer(MetricsWriter::open(
                &out.join("metrics.jsonl"),
                self.step + 1,
            ))?;
            (Some(lock), Some(w))
        } else {
            (None, None)
        };
        let pb = metrics::progress_bar(total, self.quiet || !writer, "grpo");
        pb.set_position(self.step);
        let mut all = Vec::new();
        while self.step < total {
            let m = self.step()?;
            if let Some(w) = &mut file {
                let r = w.write(&m);
                self.on_writer(r)?;
            }
            pb.set_position(self.step);
            pb.set_message(format!(
                "reward {:.3} kl {:.4} len {:.0} pass tokens {}/{}",
                m.reward_mean,
                m.kl,
                m.response_len_mean,
                m.tokens_old_logprobs,
                m.tokens_naive_per_pass
            ));
            all.push(m);
            let every = self.cfg.save_every;
            if (every > 0 && self.step % every == 0) || self.step == total {
                self.save_checkpoint(&checkpoint::step_dir(&out, self.step))?;
                if writer {
                    self.on_writer(checkpoint::prune(&out, self.cfg.keep_checkpoints))?;
                }
            }
        }
        pb.finish_and_clear();
        Ok(all)
    }
}

/// `s` summed over the ranks of `comm` (unchanged without one).
fn reduce_sums<B: Backend>(comm: Option<&dyn Collective<B>>, s: UpdateSums) -> Result<UpdateSums> {
    let Some(c) = comm else { return Ok(s) };
    let mut v = [
        s.loss,
        s.pg_loss,
        s.kl_sum,
        s.clip_sum,
        s.ratio_sum,
        s.entropy_sum,
        s.tokens,
        s.micro_batches as f64,
    ];
    c.all_reduce_host(&mut v)?;
    let [loss, pg_loss, kl_sum, clip_sum, ratio_sum, entropy_sum, tokens, micro_batches] = v;
    Ok(UpdateSums {
        loss,
        pg_loss,
        kl_sum,
        clip_sum,
        ratio_sum,
        entropy_sum,
        tokens,
        micro_batches: micro_batches as usize,
    })
}

/// A reward must be finite: a NaN or Inf would turn the whole group's advantages into NaN.
pub(crate) fn check_reward(r: f32, sample: &str) -> Result<()> {
    if r.is_finite() {
        Ok(())
    } else {
        Err(Error::msg(format!(
            "the reward function returned {r} for a response to sample {sample}; rewards must be \
             finite numbers"
        )))
    }
}
