//! The GRPO training loop, generic over the backend: rollout -> reward -> advantages -> old and
//! reference logprobs -> mini-batch updates -> metrics -> periodic checkpoints.
//!
//! Library use (no CLI): build a [`Trainer`] from a policy, a frozen reference (a second model
//! holding the starting weights), a tokenizer, prompts ([`PromptItem`], e.g. from
//! [`prepare_prompts`]) and any [`Reward`], then call [`Trainer::run`] or [`Trainer::step`].

use crate::backend::{Backend, GrpoLossCfg};
use crate::data::Sample;
use crate::model::flops::{self, Work};
use crate::model::Model;
use crate::reward::Reward;
use crate::tokenizer::{ChatTemplate, Tokenizer};
use crate::train::checkpoint::{self, TrainerState};
use crate::train::config::Place;
use crate::train::config::TrainConfig;
use crate::train::grpo::{self, TrainSeq, UpdateSums};
use crate::train::host_grads::Grads;
use crate::train::metrics::{self, MetricsWriter, StepMetrics};
use crate::train::optim::AdamW;
use crate::train::rollout::{self, Generation, RolloutStats, SamplingParams};
use crate::{Error, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::path::{Path, PathBuf};
use std::time::Instant;

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

/// The sequences of the groups (n consecutive sequences each) that are not flagged in `skip`.
fn keep_groups(seqs: Vec<TrainSeq>, n: usize, skip: &[bool]) -> Vec<TrainSeq> {
    seqs.into_iter()
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
        let host = cfg.memory.optimizer == Place::Host;
        let opt = AdamW::placed(&b, &policy, cfg.optim.clone(), host)?;
        let grads = Grads::new(&b, &policy, cfg.memory.grads == Place::Host)?;
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
        })
    }

    /// Continue from a checkpoint folder: policy, optimizer and counters come from it; the
    /// reference, prompts and reward are given again (they must be the same as before for an
    /// exact continuation; the data size is checked).
    #[allow(clippy::too_many_arguments)]
    pub fn resume(
        b: B,
        ckpt: &Path,
        reference: Model<B>,
        tokenizer: Tokenizer,
        prompts: Vec<PromptItem>,
        reward: Box<dyn Reward>,
        cfg: TrainConfig,
    ) -> Result<Self> {
        let (policy, opt, state) = checkpoint::load_placed(
            ckpt,
            &b,
            cfg.optim.clone(),
            cfg.memory.optimizer == Place::Host,
        )?;
        if state.kind != "grpo" {
            return Err(Error::msg(format!(
                "{}: a {} checkpoint cannot resume a GRPO run (start a new run from its model/ \
                 folder instead)",
                ckpt.display(),
                state.kind
            )));
        }
        if state.data_len != prompts.len() {
            return Err(Error::msg(format!(
                "{}: the checkpoint was trained on {} prompts, this data has {}; resume with the \
                 same data",
                ckpt.display(),
                state.data_len,
                prompts.len()
            )));
        }
        let mut t = Trainer::new(b, policy, reference, tokenizer, prompts, reward, cfg)?;
        t.opt = opt;
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
    /// old and reference logprobs, the mini-batch updates, then the step's metrics.
    pub fn step(&mut self) -> Result<StepMetrics> {
        let t_step = Instant::now();
        let batch = self.next_batch();
        let ((gens, rollout), time_rollout) = timed(|| self.rollouts(&batch))?;
        let (scores, time_reward) = timed(|| self.rewards(&batch, &gens))?;
        let zero = grpo::zero_signal_groups(&scores.rewards, self.cfg.rollout.n);
        let mut seqs = self.train_seqs(&batch, &gens, &scores);
        if self.cfg.grpo.skip_zero_adv_groups {
            seqs = keep_groups(seqs, self.cfg.rollout.n, &zero);
        }
        // The policy before any update ("old") and the frozen reference, both at the rollout
        // temperature as verl's actor computes them (see `GrpoConfig::logprob_temperature`).
        let (old, time_old) = timed(|| self.logprobs(&self.policy, &seqs))?;
        let (reference, time_ref) = timed(|| self.logprobs(&self.reference, &seqs))?;
        let (upd, time_update) = timed(|| self.updates(&seqs, &old, &reference))?;
        self.advance(batch.tokens.len());
        let times = StepTimes {
            rollout: time_rollout,
            reward: time_reward,
            old_logprobs: time_old,
            reference: time_ref,
            update: time_update,
            step: t_step.elapsed().as_secs_f64(),
        };
        let work = StepWork {
            rollout,
            zero_groups: zero.iter().filter(|z| **z).count(),
            groups_skipped: if self.cfg.grpo.skip_zero_adv_groups {
                zero.iter().filter(|z| **z).count()
            } else {
                0
            },
            times,
        };
        Ok(self.step_metrics(&batch, &gens, &scores, &seqs, &upd, &work))
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

    /// `rollout.n` sampled responses per prompt, from the sampling stream at `sample_offset`,
    /// and what the rollout computed.
    fn rollouts(&self, batch: &StepBatch) -> Result<(Vec<Generation>, RolloutStats)> {
        let stream = rollout::Stream {
            seed: self.cfg.run.seed,
            offset: self.sample_offset,
        };
        rollout::generate_with(
            &self.b,
            &self.policy,
            &batch.tokens,
            self.cfg.rollout.n,
            &self.sampling(),
            stream,
            &rollout::Schedule::default(),
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

    /// `ppo_epochs` passes over the sequences in mini-batches of `mini_batch_prompts` groups,
    /// one optimizer update each.
    fn updates(
        &mut self,
        seqs: &[TrainSeq],
        old: &[Vec<f32>],
        reference: &[Vec<f32>],
    ) -> Result<UpdateOutcome> {
        let loss_cfg = self.loss_cfg();
        let g = &self.cfg.grpo;
        let mini = g.mini_batch_prompts * self.cfg.rollout.n;
        let (entropy_coef, recompute, ppo_epochs) = (g.entropy_coef, g.recompute, g.ppo_epochs);
        let budget = g.micro_batch_tokens;
        let inv_t = self.cfg.logprob_inv_t();
        let layout = self.layout();
        let total_updates = self.total_steps() * self.updates_per_step();
        let mut out = UpdateOutcome::default();
        for _ in 0..ppo_epochs {
            for start in (0..seqs.len()).step_by(mini) {
                let end = (start + mini).min(seqs.len());
                self.grads.zero(&self.b, &self.policy)?;
                let s = grpo::accumulate_responses(
                    &self.b,
                    &self.policy,
                    &seqs[start..end],
                    &old[start..end],
                    &reference[start..end],
                    &loss_cfg,
                    entropy_coef,
                    budget,
                    recompute,
                    inv_t,
                    layout,
                    &mut self.grads,
                )?;
                let u =
                    self.opt
                        .step_grads(&self.b, &mut self.policy, &self.grads, total_updates)?;
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

    /// Move the counters past a step of `prompts` prompts: the sampling stream, the data
    /// position and the step count.
    fn advance(&mut self, prompts: usize) {
        let r = &self.cfg.rollout;
        self.sample_offset += rollout::stream_len(prompts, r.n, r.max_new_tokens);
        self.data_pos += prompts as u64;
        self.step += 1;
    }

    /// The metrics line of the step just finished.
    fn step_metrics(
        &self,
        batch: &StepBatch,
        gens: &[Generation],
        scores: &Scores,
        seqs: &[TrainSeq],
        upd: &UpdateOutcome,
        work: &StepWork,
    ) -> StepMetrics {
        let times = &work.times;
        let n = self.cfg.rollout.n;
        let rewards = &scores.rewards;
        let k = rewards.len() as f64;
        let mean = rewards.iter().map(|&s| s as f64).sum::<f64>() / k;
        let std = (rewards
            .iter()
            .map(|&s| (s as f64 - mean).powi(2))
            .sum::<f64>()
            / (k - 1.0).max(1.0))
        .sqrt();
        let zero_groups = work.zero_groups;
        let resp_lens: Vec<usize> = gens.iter().map(|g| g.tokens.len()).collect();
        let resp_tokens: usize = resp_lens.iter().sum();
        let prompt_tokens: usize = gens.iter().map(|g| batch.tokens[g.prompt].len()).sum();
        let sums = &upd.sums;
        let tok = sums.tokens.max(1.0);
        let updates = upd.updates.max(1) as f64;
        let layout = self.layout();
        let (rows, logit_rows) = grpo::pass_rows(seqs, layout);
        let (rows_naive, logit_rows_naive) = grpo::pass_rows(seqs, grpo::Layout::PerSequence);
        // FLOPs per phase (model::flops): forward for the rollout and the old and reference
        // passes, forward + backward (3x) for every PPO epoch of the update.
        let cfg = &self.policy.cfg;
        let pass: Work = grpo::pass_work(seqs, layout);
        let ro = work.rollout.work();
        let epochs = self.cfg.grpo.ppo_epochs as f64;
        let flops_rollout = ro.forward_flops(cfg);
        let flops_pass = pass.forward_flops(cfg);
        let flops_update = epochs * pass.train_flops(cfg);
        let peak = self.peak_tflops();
        let per_s = |tokens: f64, t: f64| if t > 0.0 { tokens / t } else { 0.0 };
        let pass_rows = rows as f64;
        StepMetrics {
            step: self.step,
            epoch: batch.epoch,
            lr: upd.lr,
            reward_mean: mean,
            reward_std: std,
            format_ok_rate: scores.format_ok as f64 / k,
            exact_match_rate: scores.exact as f64 / k,
            zero_adv_groups: zero_groups as f64 / (k / n as f64),
            loss: sums.loss / updates,
            pg_loss: sums.pg_loss / updates,
            kl: sums.kl_sum / tok,
            clip_frac: sums.clip_sum / tok,
            ratio_mean: sums.ratio_sum / tok,
            entropy: upd
                .first
                .as_ref()
                .map(|f| f.entropy_sum / f.tokens.max(1.0))
                .unwrap_or(0.0),
            grad_norm: upd.grad_norm,
            response_len_mean: resp_tokens as f64 / k,
            response_len_max: resp_lens.iter().copied().max().unwrap_or(0),
            truncated_rate: gens.iter().filter(|g| !g.stopped).count() as f64 / k,
            prompt_tokens,
            response_tokens: resp_tokens,
            updates: upd.updates,
            time_rollout_s: times.rollout,
            time_reward_s: times.reward,
            time_old_logprobs_s: times.old_logprobs,
            time_reference_s: times.reference,
            time_update_s: times.update,
            time_step_s: times.step,
            shared_prompt: layout == grpo::Layout::Shared,
            tokens_old_logprobs: rows,
            tokens_reference: rows,
            tokens_update: rows * self.cfg.grpo.ppo_epochs,
            tokens_naive_per_pass: rows_naive,
            logit_rows_per_pass: logit_rows,
            logit_rows_naive_per_pass: logit_rows_naive,
            tokens_per_s: (prompt_tokens + resp_tokens) as f64 / times.step.max(1e-9),
            groups_skipped: work.groups_skipped,
            tokens_rollout_prefill: work.rollout.prefill.rows,
            tokens_rollout_decode: work.rollout.decode.rows,
            tokens_rollout_naive: work.rollout.naive_work().rows,
            rollout_prefills: work.rollout.prefills,
            flops_rollout,
            flops_old_logprobs: flops_pass,
            flops_reference: flops_pass,
            flops_update,
            tokens_per_s_rollout: per_s(ro.rows as f64, times.rollout),
            tokens_per_s_old_logprobs: per_s(pass_rows, times.old_logprobs),
            tokens_per_s_reference: per_s(pass_rows, times.reference),
            tokens_per_s_update: per_s(pass_rows * epochs, times.update),
            peak_tflops: peak,
            mfu_rollout: flops::mfu(flops_rollout, times.rollout, peak),
            mfu_old_logprobs: flops::mfu(flops_pass, times.old_logprobs, peak),
            mfu_reference: flops::mfu(flops_pass, times.reference, peak),
            mfu_update: flops::mfu(flops_update, times.update, peak),
            peak_host_mib: metrics::peak_host_mib(),
        }
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

    /// Write a checkpoint of the current state into `dir`.
    pub fn save_checkpoint(&self, dir: &Path) -> Result<()> {
        checkpoint::save(
            dir,
            &self.b,
            &self.policy,
            &self.opt,
            &self.state(),
            self.source_dir.as_deref(),
        )
    }

    /// Run until `total_steps`, writing `<out>/metrics.jsonl`, a progress bar, checkpoints
    /// every `save_every` steps and at the end. Returns the metrics of the steps run.
    pub fn run(&mut self) -> Result<Vec<StepMetrics>> {
        let total = self.total_steps();
        let out = self.cfg.run.out.clone();
        let _lock = checkpoint::claim_run_dir(&out, self.step, self.discard_later)?;
        let mut writer = MetricsWriter::open(&out.join("metrics.jsonl"), self.step + 1)?;
        let pb = metrics::progress_bar(total, self.quiet, "grpo");
        pb.set_position(self.step);
        let mut all = Vec::new();
        while self.step < total {
            let m = self.step()?;
            writer.write(&m)?;
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
                checkpoint::prune(&out, self.cfg.keep_checkpoints)?;
            }
        }
        pb.finish_and_clear();
        Ok(all)
    }
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
