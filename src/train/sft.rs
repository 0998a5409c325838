//! Supervised fine-tuning: cross-entropy on the assistant tokens only (the prompt's tokens are
//! context, not targets), for the paper's SFT / RL / SFT-then-RL comparison and the demo's warm
//! start. Data parallel like GRPO ([`SftTrainer::new_in`] with a rank's communicator): each
//! step's batch is split over the ranks, the loss is the whole batch's token mean, the
//! optimizer state is sharded, and rank 0 writes the metrics and checkpoints.

use crate::backend::Backend;
use crate::data::{Message, Sample};
use crate::dist::{split::rank_groups, Collective, ShardPlan};
use crate::model::{GradSink, Model, PackedBatch};
use crate::tokenizer::{ChatTemplate, Tokenizer};
use crate::train::checkpoint::{self, TrainerState};
use crate::train::config::{Place, SftConfig};
use crate::train::grpo::micro_batches;
use crate::train::host_grads::Grads;
use crate::train::metrics::{self, MetricsWriter};
use crate::train::optim::AdamW;
use crate::train::runner::{DataOrder, RankComm};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// One SFT sequence: prompt ids then the assistant's ids (ending with `<|im_end|>`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SftItem {
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
}

/// The Tool-N1-format answer for a ground-truth call list: an (empty) think block and the calls.
pub fn tooln1_answer(ground_truth: &serde_json::Value) -> String {
    format!(
        "<think></think>\n<tool_call>{}</tool_call>",
        crate::pyjson::py_json(ground_truth)
    )
}

/// Split a sample into prompt messages and the assistant target: a final assistant message is
/// the target; otherwise the target is [`tooln1_answer`] of the ground truth.
pub fn sft_target(s: &Sample) -> (Vec<Message>, String) {
    match s.messages.last() {
        Some(m) if m.role == "assistant" => (
            s.messages[..s.messages.len() - 1].to_vec(),
            m.content.clone(),
        ),
        _ => (s.messages.clone(), tooln1_answer(&s.ground_truth)),
    }
}

/// Tokenize samples for SFT: prompt rendered with the generation prompt, then the target and
/// `<|im_end|>` (the tokens a rollout would produce). Sequences longer than `max_tokens` are
/// left out and counted.
pub fn prepare_sft(
    samples: &[Sample],
    tok: &Tokenizer,
    template: &ChatTemplate,
    max_tokens: usize,
) -> Result<(Vec<SftItem>, usize)> {
    let im_end = tok
        .token_id("<|im_end|>")
        .ok_or_else(|| Error::msg("the tokenizer has no <|im_end|> token; SFT targets need it"))?;
    let mut out = Vec::with_capacity(samples.len());
    let mut dropped = 0;
    for s in samples {
        let (prompt, target) = sft_target(s);
        let text = template
            .render(&prompt, None, true)
            .map_err(|e| Error::msg(format!("sample {}: cannot render the prompt: {e}", s.id)))?;
        let mut tokens = tok.encode(&text)?;
        let prompt_len = tokens.len();
        tokens.extend(tok.encode(&target)?);
        tokens.push(im_end);
        if tokens.len() > max_tokens || prompt_len == 0 {
            dropped += 1;
            continue;
        }
        out.push(SftItem { tokens, prompt_len });
    }
    Ok((out, dropped))
}

/// One SFT step's numbers.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SftMetrics {
    pub step: u64,
    pub lr: f32,
    /// Mean cross-entropy per assistant token.
    pub loss: f64,
    pub grad_norm: f64,
    pub tokens: usize,
    pub target_tokens: usize,
    pub time_s: f64,
    pub tokens_per_s: f64,
}

/// Forward + backward of the token-mean cross-entropy over `items`, accumulated into `grads`;
/// returns (loss, target tokens).
pub fn accumulate_ce<B: Backend, G: GradSink<B> + ?Sized>(
    b: &B,
    model: &Model<B>,
    items: &[SftItem],
    budget: usize,
    recompute: bool,
    grads: &mut G,
) -> Result<(f64, usize)> {
    let total = target_tokens(items);
    let loss = accumulate_ce_part(b, model, items, total, budget, recompute, grads)?;
    Ok((loss, total))
}

/// The micro-batches (ranges of `items`) of the SFT passes within `budget` positions.
pub fn sft_micro_batches(items: &[SftItem], budget: usize) -> Vec<std::ops::Range<usize>> {
    let lens: Vec<usize> = items.iter().map(|s| s.tokens.len() - 1).collect();
    micro_batches(&lens, budget)
}

/// The assistant (target) tokens of `items`.
pub fn target_tokens(items: &[SftItem]) -> usize {
    items.iter().map(|s| s.tokens.len() - s.prompt_len).sum()
}

/// [`accumulate_ce`] over `items`, one rank's part of a batch of `total` target tokens: the
/// part's share of the whole batch's token-mean loss (returned) and gradient.
pub fn accumulate_ce_part<B: Backend, G: GradSink<B> + ?Sized>(
    b: &B,
    model: &Model<B>,
    items: &[SftItem],
    total: usize,
    budget: usize,
    recompute: bool,
    grads: &mut G,
) -> Result<f64> {
    crate::ensure!(total > 0, "SFT batch has no target tokens");
    crate::ensure!(
        target_tokens(items) <= total,
        "SFT: a part of {} target tokens in a batch of {total}",
        target_tokens(items)
    );
    let mut loss = 0.0f64;
    for r in sft_micro_batches(items, budget) {
        let toks: Vec<Vec<u32>> = items[r.clone()].iter().map(|s| s.tokens.clone()).collect();
        // Logprobs at the assistant-token positions only (the lm_head skips the prompt).
        let starts: Vec<usize> = items[r.clone()].iter().map(|s| s.prompt_len).collect();
        let packed = PackedBatch::from_sequences_from(&toks, &starts)?;
        let d = vec![-1.0 / total as f32; packed.n_logits()];
        let db = model.upload_batch(b, &packed)?;
        let tape = model.forward_train(b, &db, false, recompute)?;
        let lp = b.download_f32(&tape.logp, packed.n_logits())?;
        loss += lp
            .iter()
            .zip(&d)
            .map(|(l, w)| (*l as f64) * (*w as f64))
            .sum::<f64>();
        let dlogp = b.upload_f32(&d)?;
        // The loss download waited for the forward: its vocabulary tile and scratch blocks
        // are released rather than kept cached beside the backward's (see `memory.rs`).
        b.release_cached()?;
        model.backward(b, &db, tape, &dlogp, grads)?;
    }
    Ok(loss)
}

/// An SFT run.
pub struct SftTrainer<B: Backend> {
    pub b: B,
    pub model: Model<B>,
    pub opt: AdamW<B>,
    grads: Grads<B>,
    pub items: Vec<SftItem>,
    pub cfg: SftConfig,
    order: DataOrder,
    pub step: u64,
    pub data_pos: u64,
    pub source_dir: Option<PathBuf>,
    pub quiet: bool,
    /// Delete checkpoints in the output folder after the current step instead of refusing to
    /// start (see [`checkpoint::claim_run_dir`]).
    pub discard_later: bool,
    /// This rank's communicator in a data-parallel run.
    comm: Option<RankComm<B>>,
}

impl<B: Backend> SftTrainer<B> {
    pub fn new(b: B, model: Model<B>, items: Vec<SftItem>, cfg: SftConfig) -> Result<Self> {
        Self::new_in(b, model, items, cfg, None)
    }

    /// [`SftTrainer::new`] for one rank of a data-parallel group (`comm`; None: one device).
    pub fn new_in(
        b: B,
        model: Model<B>,
        items: Vec<SftItem>,
        cfg: SftConfig,
        comm: Option<RankComm<B>>,
    ) -> Result<Self> {
        cfg.validate()?;
        if items.is_empty() {
            return Err(Error::msg("no SFT samples"));
        }
        let host = cfg.memory.optimizer == Place::Host;
        let opt = match &comm {
            Some(c) => {
                crate::ensure!(
                    !host,
                    "memory.optimizer = \"host\" is not available with more than one rank (the \
                     optimizer state is sharded over the devices instead)"
                );
                let plan = ShardPlan::new(&model.layout, c.world())?;
                AdamW::sharded(&b, &model, cfg.optim.clone(), plan, c.rank())?
            }
            None => AdamW::placed(&b, &model, cfg.optim.clone(), host)?,
        };
        let grads = opt.alloc_grads(&b, &model, cfg.memory.grads == Place::Host)?;
        let order = DataOrder::new(cfg.run.seed, items.len());
        Ok(SftTrainer {
            b,
            model,
            opt,
            grads,
            items,
            cfg,
            order,
            step: 0,
            data_pos: 0,
            source_dir: None,
            quiet: false,
            discard_later: false,
            comm,
        })
    }

    fn comm(&self) -> Option<&dyn Collective<B>> {
        self.comm.as_deref().map(|c| c as &dyn Collective<B>)
    }

    /// `r` on every rank: an error of rank 0's file work stops the group.
    fn on_writer<T>(&self, r: Result<T>) -> Result<T> {
        if let (Err(e), Some(c)) = (&r, self.comm()) {
            c.abort(&e.to_string());
        }
        r
    }

    /// The backend and the trained model.
    pub fn into_parts(self) -> (B, Model<B>) {
        (self.b, self.model)
    }

    pub fn total_steps(&self) -> u64 {
        if self.cfg.run.steps > 0 {
            self.cfg.run.steps
        } else {
            (self.cfg.run.epochs.max(1) * self.items.len() as u64)
                .div_ceil(self.cfg.batch_size as u64)
                .max(1)
        }
    }

    /// One optimizer step on the next `batch_size` items (in a data-parallel run every rank
    /// calls it and trains its contiguous, near-equal part of them).
    pub fn step(&mut self) -> Result<SftMetrics> {
        let t = Instant::now();
        let comm = self.comm.as_deref().map(|c| c as &dyn Collective<B>);
        let (world, rank) = comm.map_or((1, 0), |c| (c.world(), c.rank()));
        let batch: Vec<SftItem> = rank_groups(self.cfg.batch_size, world, rank)
            .map(|k| self.items[self.order.at(self.data_pos + k as u64).0].clone())
            .collect();
        // Target and all tokens of the whole batch.
        let mut sizes = [
            target_tokens(&batch) as f64,
            batch.iter().map(|s| s.tokens.len()).sum::<usize>() as f64,
        ];
        if let Some(c) = comm {
            c.all_reduce_host(&mut sizes)?;
        } else {
            self.grads.zero(&self.b, &self.model)?;
        }
        let (target_tokens, tokens) = (sizes[0] as usize, sizes[1] as usize);
        let (budget, recompute) = (self.cfg.micro_batch_tokens, self.cfg.recompute);
        let total = self.total_steps();
        let (loss, u) = match comm {
            None => {
                let loss = accumulate_ce_part(
                    &self.b,
                    &self.model,
                    &batch,
                    target_tokens,
                    budget,
                    recompute,
                    &mut self.grads,
                )?;
                let u = self
                    .opt
                    .step_grads(&self.b, &mut self.model, &self.grads, total)?;
                (loss, u)
            }
            Some(c) => {
                // Every rank runs as many backward passes as the rank with the most
                // micro-batches (see train::zero::ShardSink).
                let mut most = [sft_micro_batches(&batch, budget).len() as f64];
                c.all_max_host(&mut most)?;
                let mut sink = self.opt.shards_mut()?.sink(c, self.model.layout.embed);
                let mut loss = [0.0f64];
                if !batch.is_empty() {
                    let r = accumulate_ce_part(
                        &self.b,
                        &self.model,
                        &batch,
                        target_tokens,
                        budget,
                        recompute,
                        &mut sink,
                    );
                    if let Err(e) = &r {
                        c.abort(&e.to_string());
                    }
                    loss[0] = r?;
                }
                sink.pad_passes(&self.b, &self.model.layout, most[0] as usize)?;
                c.all_reduce_host(&mut loss)?;
                let u = self.opt.step_shards(&self.b, c, &mut self.model, total)?;
                (loss[0], u)
            }
        };
        self.data_pos += self.cfg.batch_size as u64;
        self.step += 1;
        let mut time = [t.elapsed().as_secs_f64()];
        if let Some(c) = comm {
            c.all_max_host(&mut time)?;
        }
        let time = time[0];
        Ok(SftMetrics {
            step: self.step,
            lr: u.lr,
            loss,
            grad_norm: u.grad_norm,
            tokens,
            target_tokens,
            time_s: time,
            tokens_per_s: tokens as f64 / time.max(1e-9),
        })
    }

    pub fn state(&self) -> TrainerState {
        TrainerState {
            version: 1,
            kind: "sft".into(),
            step: self.step,
            updates: self.opt.updates,
            sample_offset: 0,
            data_pos: self.data_pos,
            seed: self.cfg.run.seed,
            data_len: self.items.len(),
            reference: None,
            config: serde_json::to_value(&self.cfg).unwrap_or(serde_json::Value::Null),
        }
    }

    /// Train to `total_steps`, logging `<out>/metrics.jsonl` (when `out` is given) and saving
    /// checkpoints every `save_every` steps and at the end.
    pub fn run(&mut self, out: Option<&Path>) -> Result<Vec<SftMetrics>> {
        let total = self.total_steps();
        let writes = self.comm().is_none_or(|c| c.rank() == 0);
        let files = out.filter(|_| writes);
        let _lock = match files {
            Some(o) => {
                let r = checkpoint::claim_run_dir(o, self.step, self.discard_later);
                Some(self.on_writer(r)?)
            }
            None => None,
        };
        let mut writer = match files {
            Some(o) => {
                let r = MetricsWriter::open(&o.join("metrics.jsonl"), self.step + 1);
                Some(self.on_writer(r)?)
            }
            None => None,
        };
        let pb = metrics::progress_bar(total, self.quiet || !writes, "sft ");
        let mut all = Vec::new();
        while self.step < total {
            let m = self.step()?;
            if let Some(w) = writer.as_mut() {
                let r = w.write(&m);
                self.on_writer(r)?;
            }
            pb.set_position(self.step);
            pb.set_message(format!("loss {:.4}", m.loss));
            all.push(m);
            if let Some(o) = out {
                let every = self.cfg.save_every;
                if (every > 0 && self.step % every == 0) || self.step == total {
                    checkpoint::save_in(
                        &checkpoint::step_dir(o, self.step),
                        &self.b,
                        &self.model,
                        &self.opt,
                        &self.state(),
                        self.source_dir.as_deref(),
                        self.comm(),
                    )?;
                }
            }
        }
        pb.finish_and_clear();
        Ok(all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_from_last_assistant_or_ground_truth() {
        let m = |r: &str, c: &str| Message {
            role: r.into(),
            content: c.into(),
        };
        let mut s = Sample {
            id: "1".into(),
            source: "t".into(),
            messages: vec![m("system", "s"), m("user", "u"), m("assistant", "A")],
            tools: vec![],
            ground_truth: serde_json::json!([{"name": "f", "arguments": {}}]),
        };
        let (p, t) = sft_target(&s);
        assert_eq!(p.len(), 2);
        assert_eq!(t, "A");
        s.messages.pop();
        let (p, t) = sft_target(&s);
        assert_eq!(p.len(), 2);
        assert_eq!(
            t,
            "<think></think>\n<tool_call>[{\"name\": \"f\", \"arguments\": {}}]</tool_call>"
        );
    }
}
