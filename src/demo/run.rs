//! The demo's script: draw the task, train its tokenizer, build a random tiny model, measure the
//! held-out reward, SFT warm start, GRPO from the SFT model, measure again. Each phase is one
//! function below; [`run_demo`] calls them in order.

use crate::backend::Backend;
use crate::data::Sample;
use crate::demo::task::{demo_system_prompt, demo_tools, draw_disjoint, sft_samples, to_sample};
use crate::demo::tokenizer::train_tokenizer;
use crate::model::{init, Model, Qwen2Config};
use crate::reward::{Reward, ToolN1Reward};
use crate::tokenizer::{ChatTemplate, Tokenizer};
use crate::train::config::{LrSchedule, OptimConfig, RunConfig, SftConfig, TrainConfig};
use crate::train::metrics::StepMetrics;
use crate::train::rollout::{generate, SamplingParams};
use crate::train::runner::{check_reward, prepare_prompts, PromptItem, Trainer};
use crate::train::sft::{prepare_sft, SftItem, SftMetrics, SftTrainer};
use crate::{Error, Result};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::path::PathBuf;
use std::time::Instant;

/// Demo settings (sizes chosen to learn in minutes on two CPU cores).
#[derive(Clone, Debug)]
pub struct DemoConfig {
    pub seed: u64,
    pub train_prompts: usize,
    pub heldout_prompts: usize,
    /// Fraction of SFT answers with one wrong argument.
    pub sft_noise: f64,
    pub sft_samples: usize,
    pub sft_steps: u64,
    pub sft_batch: usize,
    pub sft_lr: f32,
    pub grpo_steps: u64,
    pub prompts_per_step: usize,
    pub n: usize,
    pub grpo_lr: f32,
    pub temperature: f32,
    pub max_new_tokens: usize,
    /// Samples per held-out prompt in the reward evaluation.
    pub eval_n: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub intermediate: usize,
    pub bpe_vocab: usize,
    /// Output folder (tokenizer, SFT model, GRPO metrics and checkpoints); None = nothing saved.
    pub out: Option<PathBuf>,
    pub quiet: bool,
}

impl Default for DemoConfig {
    fn default() -> Self {
        DemoConfig {
            seed: 7,
            train_prompts: 512,
            heldout_prompts: 64,
            sft_noise: 0.3,
            sft_samples: 512,
            sft_steps: 500,
            sft_batch: 32,
            sft_lr: 3e-3,
            grpo_steps: 60,
            prompts_per_step: 16,
            n: 8,
            grpo_lr: 3e-4,
            temperature: 0.8,
            max_new_tokens: 48,
            eval_n: 4,
            hidden: 64,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            intermediate: 128,
            bpe_vocab: 512,
            out: None,
            quiet: false,
        }
    }
}

impl DemoConfig {
    /// A shorter run for the learning test (same task and model, fewer steps).
    pub fn test() -> Self {
        DemoConfig {
            sft_steps: 500,
            grpo_steps: 40,
            ..DemoConfig::default()
        }
    }
}

/// What the demo measured.
#[derive(Clone, Debug, Default)]
pub struct DemoReport {
    pub vocab_size: usize,
    pub num_params: u64,
    pub prompt_tokens_mean: f64,
    /// Held-out (reward, format-ok, exact) sampled at the rollout temperature.
    pub heldout_before_sft: (f64, f64, f64),
    pub heldout_after_sft: (f64, f64, f64),
    pub heldout_after_grpo: (f64, f64, f64),
    /// Held-out greedy reward after SFT and after GRPO.
    pub greedy_after_sft: f64,
    pub greedy_after_grpo: f64,
    pub sft_loss_first: f64,
    pub sft_loss_last: f64,
    pub grpo_steps: Vec<StepMetrics>,
    pub time_sft_s: f64,
    pub time_grpo_s: f64,
}

fn say(quiet: bool, msg: &str) {
    if !quiet {
        eprintln!("{msg}");
    }
}

/// How [`evaluate_reward`] draws its responses: `n` per prompt, sampled with `sp` from the
/// random stream `seed`.
#[derive(Clone, Copy, Debug)]
pub struct Draws<'a> {
    pub n: usize,
    pub sp: &'a SamplingParams,
    pub seed: u64,
}

/// Mean reward of the responses `draws` gives per prompt over `prompts`, with the format-ok
/// and exact-match rates: (reward, format_ok, exact).
pub fn evaluate_reward<B: Backend>(
    b: &B,
    model: &Model<B>,
    tok: &Tokenizer,
    prompts: &[PromptItem],
    reward: &dyn Reward,
    draws: Draws<'_>,
) -> Result<(f64, f64, f64)> {
    let Draws { n, sp, seed } = draws;
    let toks: Vec<Vec<u32>> = prompts.iter().map(|p| p.tokens.clone()).collect();
    let gens = generate(b, model, &toks, n, sp, seed, 0)?;
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

/// Print greedy answers to a few prompts.
fn show_examples<B: Backend>(
    b: &B,
    model: &Model<B>,
    tok: &Tokenizer,
    prompts: &[PromptItem],
    sp: &SamplingParams,
    label: &str,
) -> Result<()> {
    eprintln!(
        "greedy answers {label} on {} held-out prompts:",
        prompts.len()
    );
    let toks: Vec<Vec<u32>> = prompts.iter().map(|p| p.tokens.clone()).collect();
    let gens = generate(b, model, &toks, 1, sp, 0, 0)?;
    for (p, g) in prompts.iter().zip(&gens) {
        eprintln!(
            "  expected {}\n  answered {}",
            crate::pyjson::py_json(&p.ground_truth),
            tok.decode(&g.tokens, false)?
        );
    }
    Ok(())
}

/// The demo's data as unified samples: training prompts, held-out prompts and SFT samples.
struct DemoSamples {
    train: Vec<Sample>,
    heldout: Vec<Sample>,
    sft: Vec<Sample>,
}

/// Phase 1: disjoint training and held-out queries, then the noisy SFT answers, all from one
/// stream seeded by `cfg.seed`.
fn draw_samples(cfg: &DemoConfig, system: &str) -> DemoSamples {
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let (train_items, held_items) = draw_disjoint(&mut rng, cfg.train_prompts, cfg.heldout_prompts);
    let train = train_items
        .iter()
        .enumerate()
        .map(|(i, it)| to_sample(format!("train-{i}"), system, it))
        .collect();
    let heldout = held_items
        .iter()
        .enumerate()
        .map(|(i, it)| to_sample(format!("heldout-{i}"), system, it))
        .collect();
    let sft = sft_samples(
        &mut rng,
        &train_items,
        cfg.sft_samples,
        cfg.sft_noise,
        system,
    );
    DemoSamples {
        train,
        heldout,
        sft,
    }
}

/// Phase 2: the tokenizer, trained on every rendered prompt and every SFT answer.
fn demo_tokenizer(
    cfg: &DemoConfig,
    samples: &DemoSamples,
    template: &ChatTemplate,
    system: &str,
) -> Result<Tokenizer> {
    let mut corpus = Vec::new();
    for s in samples.train.iter().chain(&samples.heldout) {
        corpus.push(template.render(&s.messages, None, true)?);
    }
    for s in &samples.sft {
        if let Some(m) = s.messages.last() {
            corpus.push(m.content.clone());
        }
    }
    train_tokenizer(&corpus, cfg.bpe_vocab, system)
}

/// The tokenizer's size and the ids that end a response.
struct DemoVocab {
    /// Tokens in the tokenizer.
    size: usize,
    /// The model's vocabulary: `size` rounded up to a multiple of 64.
    padded: usize,
    im_end: u32,
    /// `<|endoftext|>` (or `<|im_end|>` when the tokenizer lacks it).
    eot: u32,
}

impl DemoVocab {
    fn of(tok: &Tokenizer) -> Result<Self> {
        let size = tok.inner.get_vocab_size(true);
        let im_end = tok
            .token_id("<|im_end|>")
            .ok_or_else(|| Error::msg("demo tokenizer lost <|im_end|>"))?;
        let eot = tok.token_id("<|endoftext|>").unwrap_or(im_end);
        Ok(DemoVocab {
            size,
            padded: size.div_ceil(64) * 64,
            im_end,
            eot,
        })
    }
}

/// Phase 3: the tiny model's config (tied embeddings, 512 positions) and its random weights.
fn random_model<B: Backend>(b: &B, cfg: &DemoConfig, vocab: &DemoVocab) -> Result<Model<B>> {
    let mut mcfg: Qwen2Config = init::tiny_config(
        cfg.hidden,
        cfg.layers,
        cfg.heads,
        cfg.kv_heads,
        cfg.intermediate,
        vocab.padded,
        true,
    );
    mcfg.bos_token_id = Some(vocab.eot);
    mcfg.eos_token_id = vec![vocab.im_end];
    mcfg.max_position_embeddings = 512;
    let host = init::random_params(&mcfg, cfg.seed ^ 0x5eed);
    Model::from_host(b, mcfg, &host)
}

/// Phase 4: token ids of the training and held-out prompts and of the SFT sequences (at most
/// 512 tokens each).
struct DemoInputs {
    train: Vec<PromptItem>,
    heldout: Vec<PromptItem>,
    sft: Vec<SftItem>,
}

fn tokenize(samples: &DemoSamples, tok: &Tokenizer, template: &ChatTemplate) -> Result<DemoInputs> {
    let (train, _) = prepare_prompts(&samples.train, tok, template, 512)?;
    let (heldout, _) = prepare_prompts(&samples.heldout, tok, template, 512)?;
    let (sft, _) = prepare_sft(&samples.sft, tok, template, 512)?;
    Ok(DemoInputs {
        train,
        heldout,
        sft,
    })
}

/// The held-out measurement every phase repeats: the mean reward sampled at the rollout
/// temperature (`n` samples per prompt) or greedy, always from the same sampling stream.
struct HeldOut<'a> {
    prompts: &'a [PromptItem],
    reward: ToolN1Reward,
    sampled: SamplingParams,
    greedy: SamplingParams,
    seed: u64,
}

impl HeldOut<'_> {
    /// (reward, format-ok, exact) sampled with `n` responses per prompt.
    fn sampled<B: Backend>(
        &self,
        b: &B,
        m: &Model<B>,
        tok: &Tokenizer,
        n: usize,
    ) -> Result<(f64, f64, f64)> {
        let r = &self.reward as &dyn Reward;
        let draws = Draws {
            n,
            sp: &self.sampled,
            seed: self.seed,
        };
        evaluate_reward(b, m, tok, self.prompts, r, draws)
    }

    /// The greedy reward.
    fn greedy<B: Backend>(&self, b: &B, m: &Model<B>, tok: &Tokenizer) -> Result<f64> {
        let r = &self.reward as &dyn Reward;
        let draws = Draws {
            n: 1,
            sp: &self.greedy,
            seed: self.seed,
        };
        Ok(evaluate_reward(b, m, tok, self.prompts, r, draws)?.0)
    }

    /// Print greedy answers to the first two held-out prompts (unless quiet).
    fn show<B: Backend>(
        &self,
        quiet: bool,
        b: &B,
        m: &Model<B>,
        tok: &Tokenizer,
        label: &str,
    ) -> Result<()> {
        if quiet {
            return Ok(());
        }
        let few = &self.prompts[..2.min(self.prompts.len())];
        show_examples(b, m, tok, few, &self.greedy, label)
    }
}

/// Phase 5: SFT warm start (cosine schedule, 10 warm-up steps). Its checkpoints go to
/// `OUT/sft` and copy the demo's tokenizer from `OUT`, so each one is a complete model folder
/// (usable by `tooln1 eval ... run --model` and by transformers).
fn warm_start<B: Backend>(
    b: B,
    model: Model<B>,
    items: Vec<SftItem>,
    cfg: &DemoConfig,
) -> Result<(B, Model<B>, Vec<SftMetrics>)> {
    let sft_cfg = SftConfig {
        run: RunConfig {
            seed: cfg.seed,
            steps: cfg.sft_steps,
            ..RunConfig::default()
        },
        batch_size: cfg.sft_batch,
        micro_batch_tokens: 4096,
        max_seq_tokens: 512,
        recompute: false,
        optim: OptimConfig {
            lr: cfg.sft_lr,
            schedule: LrSchedule::Cosine,
            warmup_steps: 10,
            min_lr_ratio: 0.1,
            weight_decay: 0.0,
            ..OptimConfig::default()
        },
        ..SftConfig::default()
    };
    let mut sft = SftTrainer::new(b, model, items, sft_cfg)?;
    sft.quiet = cfg.quiet;
    // The demo starts over each time: it replaces the checkpoints of an earlier demo run in
    // its own output folder (and only those).
    sft.discard_later = true;
    sft.source_dir = cfg.out.clone();
    let sft_out = cfg.out.as_ref().map(|o| o.join("sft"));
    let metrics = sft.run(sft_out.as_deref())?;
    let (b, policy) = sft.into_parts();
    Ok((b, policy, metrics))
}

/// The GRPO settings of the demo: Tool-N1's defaults with the demo's sizes, one mini-batch per
/// step, no recomputation, checkpoints only at the end (into `OUT/grpo`, or a temporary folder
/// that is never written when there is no output folder).
fn grpo_config(cfg: &DemoConfig) -> TrainConfig {
    let mut tcfg = TrainConfig {
        run: RunConfig {
            seed: cfg.seed,
            steps: cfg.grpo_steps,
            ..RunConfig::default()
        },
        save_every: 0,
        ..TrainConfig::default()
    };
    tcfg.run.out = cfg.out.as_ref().map(|o| o.join("grpo")).unwrap_or_else(|| {
        std::env::temp_dir().join(format!("tooln1-demo-{}", std::process::id()))
    });
    tcfg.rollout.n = cfg.n;
    tcfg.rollout.temperature = cfg.temperature;
    tcfg.rollout.max_new_tokens = cfg.max_new_tokens;
    tcfg.rollout.max_prompt_tokens = 512;
    tcfg.grpo.prompts_per_step = cfg.prompts_per_step;
    tcfg.grpo.mini_batch_prompts = cfg.prompts_per_step;
    tcfg.grpo.micro_batch_tokens = 4096;
    tcfg.grpo.recompute = false;
    tcfg.optim.lr = cfg.grpo_lr;
    tcfg.optim.weight_decay = 0.0;
    tcfg
}

/// Phase 6: GRPO from the SFT model with the Tool-N1 reward; the reference is a frozen copy of
/// the SFT model. With an output folder the run writes metrics and a final checkpoint there.
fn reinforce<B: Backend>(
    b: B,
    policy: Model<B>,
    tok: Tokenizer,
    prompts: Vec<PromptItem>,
    cfg: &DemoConfig,
) -> Result<(Trainer<B>, Vec<StepMetrics>)> {
    let reference = Model::from_host(&b, policy.cfg.clone(), &policy.to_host(&b)?)?;
    let reward = Box::new(ToolN1Reward::default());
    let mut trainer = Trainer::new(b, policy, reference, tok, prompts, reward, grpo_config(cfg))?;
    trainer.quiet = cfg.quiet;
    trainer.discard_later = true;
    trainer.source_dir = cfg.out.clone();
    let steps = if cfg.out.is_some() {
        trainer.run()?
    } else {
        let mut v = Vec::new();
        while trainer.step < trainer.total_steps() {
            v.push(trainer.step()?);
        }
        v
    };
    Ok((trainer, steps))
}

/// Run the whole demo on backend `b` (cloned handles share the device; the frozen reference
/// model lives on the same backend).
pub fn run_demo<B: Backend>(b: B, cfg: &DemoConfig) -> Result<DemoReport> {
    let system = demo_system_prompt();
    let template = ChatTemplate::qwen25();
    let samples = draw_samples(cfg, &system);
    let tok = demo_tokenizer(cfg, &samples, &template, &system)?;
    let vocab = DemoVocab::of(&tok)?;
    let model = random_model(&b, cfg, &vocab)?;
    let num_params = model.layout.num_params();
    let inputs = tokenize(&samples, &tok, &template)?;
    let prompt_tokens_mean = inputs.train.iter().map(|p| p.tokens.len()).sum::<usize>() as f64
        / inputs.train.len().max(1) as f64;
    say(
        cfg.quiet,
        &format!(
            "demo: backend {}, {} tools, {} training / {} held-out prompts, vocabulary {} \
             (padded {}), model {} parameters (hidden {}, {} layers), prompts {:.1} tokens on \
             average",
            b.name(),
            demo_tools().len(),
            inputs.train.len(),
            inputs.heldout.len(),
            vocab.size,
            vocab.padded,
            num_params,
            cfg.hidden,
            cfg.layers,
            prompt_tokens_mean
        ),
    );
    if let Some(out) = &cfg.out {
        std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
        let p = out.join("tokenizer.json");
        tok.inner
            .save(&p, false)
            .map_err(|e| Error::msg(format!("{}: cannot save tokenizer: {e}", p.display())))?;
    }

    let stop = vec![vocab.im_end, vocab.eot];
    let held = HeldOut {
        prompts: &inputs.heldout,
        reward: ToolN1Reward::default(),
        sampled: SamplingParams {
            temperature: cfg.temperature,
            top_p: 1.0,
            top_k: 0,
            max_new_tokens: cfg.max_new_tokens,
            stop: stop.clone(),
            max_slots: 256,
        },
        greedy: SamplingParams::greedy(cfg.max_new_tokens, stop),
        seed: cfg.seed ^ 0xe7a1,
    };
    let before = held.sampled(&b, &model, &tok, 1)?;
    say(
        cfg.quiet,
        &format!("held-out reward of the random model: {:.3}", before.0),
    );

    let t = Instant::now();
    let (b, policy, sft_metrics) = warm_start(b, model, inputs.sft, cfg)?;
    let time_sft = t.elapsed().as_secs_f64();
    held.show(cfg.quiet, &b, &policy, &tok, "after SFT")?;
    let after_sft = held.sampled(&b, &policy, &tok, cfg.eval_n)?;
    let greedy_sft = held.greedy(&b, &policy, &tok)?;
    let sft_loss_first = sft_metrics.first().map(|m| m.loss).unwrap_or(0.0);
    let sft_loss_last = sft_metrics.last().map(|m| m.loss).unwrap_or(0.0);
    say(
        cfg.quiet,
        &format!(
            "after SFT ({} steps, loss {:.3} -> {:.3}, {:.1} s): held-out reward {:.3} sampled \
             (format ok {:.3}), {:.3} greedy",
            sft_metrics.len(),
            sft_loss_first,
            sft_loss_last,
            time_sft,
            after_sft.0,
            after_sft.1,
            greedy_sft
        ),
    );

    let t = Instant::now();
    let (trainer, steps) = reinforce(b, policy, tok, inputs.train, cfg)?;
    let time_grpo = t.elapsed().as_secs_f64();
    let (b, policy, tok) = (&trainer.b, &trainer.policy, &trainer.tokenizer);
    held.show(cfg.quiet, b, policy, tok, "after GRPO")?;
    let after = held.sampled(b, policy, tok, cfg.eval_n)?;
    let greedy_after = held.greedy(b, policy, tok)?;
    say(
        cfg.quiet,
        &format!(
            "after GRPO ({} steps, {:.1} s): held-out reward {:.3} sampled (format ok {:.3}), \
             {:.3} greedy",
            steps.len(),
            time_grpo,
            after.0,
            after.1,
            greedy_after
        ),
    );
    Ok(DemoReport {
        vocab_size: vocab.size,
        num_params,
        prompt_tokens_mean,
        heldout_before_sft: before,
        heldout_after_sft: after_sft,
        heldout_after_grpo: after,
        greedy_after_sft: greedy_sft,
        greedy_after_grpo: greedy_after,
        sft_loss_first,
        sft_loss_last,
        grpo_steps: steps,
        time_sft_s: time_sft,
        time_grpo_s: time_grpo,
    })
}
