//! The GRPO training loop, generic over the backend: rollout -> reward -> advantages -> old and
//! reference logprobs -> mini-batch updates -> metrics -> periodic checkpoints.
//!
//! Library use (no CLI): build a [`Trainer`] from a policy, a frozen reference (a second model
//! holding the starting weights), a tokenizer, prompts ([`PromptItem`], e.g. from
//! [`prepare_prompts`]) and any [`Reward`], then call [`Trainer::run`] or [`Trainer::step`].

use crate::backend::{Backend, GrpoLossCfg};
use crate::data::Sample;
use crate::model::Model;
use crate::reward::Reward;
use crate::tokenizer::{ChatTemplate, Tokenizer};
use crate::train::checkpoint::{self, TrainerState};
use crate::train::config::TrainConfig;
use crate::train::grpo::{self, TrainSeq, UpdateSums};
use crate::train::metrics::{self, MetricsWriter, StepMetrics};
use crate::train::optim::{self, AdamW};
use crate::train::rollout::{self, SamplingParams};
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

pub use crate::data::read_samples;

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

/// A GRPO run in progress.
pub struct Trainer<B: Backend> {
    pub b: B,
    pub policy: Model<B>,
    pub reference: Model<B>,
    pub opt: AdamW<B>,
    grads: Vec<B::F>,
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
        if policy.cfg != reference.cfg {
            return Err(Error::msg(
                "the reference model's config differs from the policy's",
            ));
        }
        let opt = AdamW::new(&b, &policy, cfg.optim.clone())?;
        let grads = policy.zero_grads(&b)?;
        let stop = stop_tokens(&tokenizer, &policy.cfg);
        if stop.is_empty() {
            return Err(Error::msg(
                "the tokenizer has neither <|im_end|> nor <|endoftext|> and the config no eos id: \
                 responses could never stop",
            ));
        }
        let order = DataOrder::new(cfg.seed, prompts.len());
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
        let (policy, opt, state) = checkpoint::load(ckpt, &b, cfg.optim.clone())?;
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
        if self.cfg.steps > 0 {
            self.cfg.steps
        } else {
            self.cfg.epochs.max(1) * self.steps_per_epoch()
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

    /// One GRPO step on the next `prompts_per_step` prompts.
    pub fn step(&mut self) -> Result<StepMetrics> {
        let t_step = Instant::now();
        let p = self.cfg.grpo.prompts_per_step;
        let n = self.cfg.rollout.n;
        let mut idx = Vec::with_capacity(p);
        let mut epoch = 0;
        for k in 0..p {
            let (i, e) = self.order.at(self.data_pos + k as u64);
            idx.push(i);
            if k == 0 {
                epoch = e;
            }
        }
        let prompt_toks: Vec<Vec<u32>> = idx
            .iter()
            .map(|&i| self.prompts[i].tokens.clone())
            .collect();

        // 1. rollouts
        let t = Instant::now();
        let sp = self.sampling();
        let gens = rollout::generate(
            &self.b,
            &self.policy,
            &prompt_toks,
            n,
            &sp,
            self.cfg.seed,
            self.sample_offset,
        )?;
        let time_rollout = t.elapsed().as_secs_f64();

        // 2. rewards
        let t = Instant::now();
        let mut scores = Vec::with_capacity(gens.len());
        let (mut fmt_ok, mut exact) = (0usize, 0usize);
        for g in &gens {
            let text = self.tokenizer.decode(g.content(), false)?;
            let item = &self.prompts[idx[g.prompt]];
            let r = self.reward.score(&text, &item.ground_truth);
            check_reward(r.reward, &item.id)?;
            fmt_ok += r.format_ok as usize;
            exact += r.calls_ok as usize;
            scores.push(r.reward);
        }
        let time_reward = t.elapsed().as_secs_f64();
        let adv = grpo::group_advantages(&scores, n, self.cfg.grpo.advantage);
        let seqs: Vec<TrainSeq> = gens
            .iter()
            .zip(&adv)
            .map(|(g, &a)| {
                let mut tokens = prompt_toks[g.prompt].clone();
                let prompt_len = tokens.len();
                tokens.extend_from_slice(&g.tokens);
                TrainSeq {
                    tokens,
                    prompt_len,
                    adv: a,
                }
            })
            .collect();

        // 3. old logprobs (policy before any update) and reference logprobs
        // at the rollout temperature, as verl's actor (see `GrpoConfig::logprob_temperature`)
        let budget = self.cfg.grpo.micro_batch_tokens;
        let inv_t = self.cfg.logprob_inv_t();
        let layout = self.layout();
        let t = Instant::now();
        let old = grpo::response_logprobs(&self.b, &self.policy, &seqs, budget, inv_t, layout)?;
        let time_old = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let reference =
            grpo::response_logprobs(&self.b, &self.reference, &seqs, budget, inv_t, layout)?;
        let time_ref = t.elapsed().as_secs_f64();

        // 4. mini-batch updates
        let t = Instant::now();
        let g = &self.cfg.grpo;
        let loss_cfg = GrpoLossCfg {
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
        };
        let mini = g.mini_batch_prompts * n;
        let (entropy_coef, recompute, ppo_epochs) = (g.entropy_coef, g.recompute, g.ppo_epochs);
        let total_updates = self.total_steps() * self.updates_per_step();
        let mut sums = UpdateSums::default();
        let mut first_sums: Option<UpdateSums> = None;
        let mut grad_norm = 0.0;
        let mut lr = 0.0;
        let mut updates = 0;
        for _ in 0..ppo_epochs {
            for start in (0..seqs.len()).step_by(mini) {
                let end = (start + mini).min(seqs.len());
                optim::zero_grads(&self.b, &self.policy, &mut self.grads)?;
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
                let u = self
                    .opt
                    .step(&self.b, &mut self.policy, &self.grads, total_updates)?;
                grad_norm = u.grad_norm;
                lr = u.lr;
                updates += 1;
                sums.add(&s);
                if first_sums.is_none() {
                    first_sums = Some(s);
                }
            }
        }
        let time_update = t.elapsed().as_secs_f64();

        self.sample_offset += rollout::stream_len(p, n, self.cfg.rollout.max_new_tokens);
        self.data_pos += p as u64;
        self.step += 1;

        let k = scores.len() as f64;
        let mean = scores.iter().map(|&s| s as f64).sum::<f64>() / k;
        let std = (scores
            .iter()
            .map(|&s| (s as f64 - mean).powi(2))
            .sum::<f64>()
            / (k - 1.0).max(1.0))
        .sqrt();
        let zero_groups = scores
            .chunks(n)
            .filter(|c| c.iter().all(|&x| x == c[0]))
            .count();
        let resp_lens: Vec<usize> = gens.iter().map(|g| g.tokens.len()).collect();
        let resp_tokens: usize = resp_lens.iter().sum();
        let prompt_tokens: usize = gens.iter().map(|g| prompt_toks[g.prompt].len()).sum();
        let time_step = t_step.elapsed().as_secs_f64();
        let tok = sums.tokens.max(1.0);
        let (rows, logit_rows) = grpo::pass_rows(&seqs, layout);
        let (rows_naive, logit_rows_naive) = grpo::pass_rows(&seqs, grpo::Layout::PerSequence);
        Ok(StepMetrics {
            step: self.step,
            epoch,
            lr,
            reward_mean: mean,
            reward_std: std,
            format_ok_rate: fmt_ok as f64 / k,
            exact_match_rate: exact as f64 / k,
            zero_adv_groups: zero_groups as f64 / (k / n as f64),
            loss: sums.loss / updates.max(1) as f64,
            pg_loss: sums.pg_loss / updates.max(1) as f64,
            kl: sums.kl_sum / tok,
            clip_frac: sums.clip_sum / tok,
            ratio_mean: sums.ratio_sum / tok,
            entropy: first_sums
                .map(|f| f.entropy_sum / f.tokens.max(1.0))
                .unwrap_or(0.0),
            grad_norm,
            response_len_mean: resp_tokens as f64 / k,
            response_len_max: resp_lens.iter().copied().max().unwrap_or(0),
            truncated_rate: gens.iter().filter(|g| !g.stopped).count() as f64 / k,
            prompt_tokens,
            response_tokens: resp_tokens,
            updates,
            time_rollout_s: time_rollout,
            time_reward_s: time_reward,
            time_old_logprobs_s: time_old,
            time_reference_s: time_ref,
            time_update_s: time_update,
            time_step_s: time_step,
            shared_prompt: layout == grpo::Layout::Shared,
            tokens_old_logprobs: rows,
            tokens_reference: rows,
            tokens_update: rows * ppo_epochs,
            tokens_naive_per_pass: rows_naive,
            logit_rows_per_pass: logit_rows,
            logit_rows_naive_per_pass: logit_rows_naive,
            tokens_per_s: (prompt_tokens + resp_tokens) as f64 / time_step.max(1e-9),
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
            seed: self.cfg.seed,
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
        let out = self.cfg.out.clone();
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
fn check_reward(r: f32, sample: &str) -> Result<()> {
    if r.is_finite() {
        Ok(())
    } else {
        Err(Error::msg(format!(
            "the reward function returned {r} for a response to sample {sample}; rewards must be \
             finite numbers"
        )))
    }
}

/// Mean reward of `n` responses per prompt (sampled with `sp`) over `prompts`, with the
/// format-ok and exact-match rates: (reward, format_ok, exact).
#[allow(clippy::too_many_arguments)]
pub fn evaluate_reward<B: Backend>(
    b: &B,
    model: &Model<B>,
    tok: &Tokenizer,
    prompts: &[PromptItem],
    reward: &dyn Reward,
    n: usize,
    sp: &SamplingParams,
    seed: u64,
) -> Result<(f64, f64, f64)> {
    let toks: Vec<Vec<u32>> = prompts.iter().map(|p| p.tokens.clone()).collect();
    let gens = rollout::generate(b, model, &toks, n, sp, seed, 0)?;
    let (mut r, mut f, mut e) = (0.0f64, 0usize, 0usize);
    for g in &gens {
        let text = tok.decode(g.content(), false)?;
        let o = reward.score(&text, &prompts[g.prompt].ground_truth);
        check_reward(o.reward, &prompts[g.prompt].id)?;
        r += o.reward as f64;
        f += o.format_ok as usize;
        e += o.calls_ok as usize;
    }
    let k = gens.len().max(1) as f64;
    Ok((r / k, f as f64 / k, e as f64 / k))
}
