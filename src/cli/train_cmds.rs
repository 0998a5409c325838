//! `tooln1 train`, `tooln1 sft` and `tooln1 demo`.

use crate::backend::select::{cuda_memory, run_on, uses_cuda, BackendJob};
use crate::backend::Backend;
use crate::data::read_samples;
use crate::demo::{run_demo, DemoConfig, DemoReport};
use crate::model::memory::{human_bytes as gib, MemoryEstimate, MemoryInputs};
use crate::model::weights::load_model;
use crate::model::Qwen2Config;
use crate::safefs::host_available;
use crate::tokenizer::{ChatTemplate, Tokenizer};
use crate::train::checkpoint;
use crate::train::config::{load_config, DeviceKind, SftConfig, TrainConfig};
use crate::train::metrics::summarize;
use crate::train::runner::{prepare_prompts, Trainer};
use crate::train::sft::{prepare_sft, SftTrainer};
use anyhow::{bail, Context};
use std::path::PathBuf;

#[derive(clap::Args, Debug, Default)]
pub struct TrainArgs {
    /// TOML config (Tool-N1 defaults for everything it leaves out).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override one config value, e.g. `--set grpo.kl_coef=0.01` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// HF model folder to start from (also the frozen reference).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Prepared training JSONL (from `tooln1 data prepare`).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Output folder (metrics.jsonl, checkpoints/).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// auto (CUDA when present, else CPU), cpu or cuda.
    #[arg(long)]
    pub device: Option<DeviceKind>,
    #[arg(long)]
    pub steps: Option<u64>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Reward variant: v0 (binary with think, the default), v2, v3, v4.
    #[arg(long, default_value = "v0")]
    pub reward: String,
    /// Continue from a checkpoint folder, or from the latest checkpoint of a run folder. New
    /// checkpoints and metrics go to that run folder (the one holding `checkpoints/`), or to
    /// --out when given.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Delete checkpoints in the output folder that are later than the starting step (resuming
    /// from an older checkpoint, or reusing a folder) instead of refusing to start.
    #[arg(long)]
    pub discard_later_checkpoints: bool,
    /// Print the resolved config and the memory estimate, then stop.
    #[arg(long)]
    pub dry_run: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(clap::Args, Debug, Default)]
pub struct SftArgs {
    /// TOML config with the fields of the SFT settings.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override one config value, e.g. `--set optim.lr=2e-5` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Prepared JSONL; a final assistant message is the target, else the ground-truth calls in
    /// the Tool-N1 format.
    #[arg(long)]
    pub data: Option<PathBuf>,
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long)]
    pub device: Option<DeviceKind>,
    #[arg(long)]
    pub steps: Option<u64>,
    /// Delete checkpoints already in the output folder instead of refusing to start.
    #[arg(long)]
    pub discard_later_checkpoints: bool,
    #[arg(long)]
    pub quiet: bool,
}

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// auto (CUDA when present, else CPU), cpu or cuda.
    #[arg(long, default_value = "auto")]
    pub device: DeviceKind,
    /// Output folder (tokenizer, SFT and GRPO metrics and checkpoints).
    #[arg(long, default_value = "runs/demo")]
    pub out: PathBuf,
    #[arg(long)]
    pub seed: Option<u64>,
    #[arg(long)]
    pub sft_steps: Option<u64>,
    #[arg(long)]
    pub grpo_steps: Option<u64>,
    #[arg(long)]
    pub quiet: bool,
}

impl Default for DemoArgs {
    fn default() -> Self {
        DemoArgs {
            device: DeviceKind::Auto,
            out: PathBuf::from("runs/demo"),
            seed: None,
            sft_steps: None,
            grpo_steps: None,
            quiet: false,
        }
    }
}

/// Print the memory estimate; refuse the run when it cannot fit.
fn check_memory(
    model_cfg: &Qwen2Config,
    inputs: MemoryInputs,
    recompute: bool,
    device: DeviceKind,
    host_extra: u64,
) -> anyhow::Result<()> {
    let est = MemoryEstimate::new(model_cfg, inputs);
    if host_extra > 0 {
        eprintln!(
            "host memory for one step's sequences, logprobs and advantages: {}",
            gib(host_extra)
        );
        if let Some(avail) = host_available() {
            if host_extra > avail {
                bail!(
                    "this run does not fit in host memory: one step's sequences need about {} \
                     and {} are available (lower grpo.prompts_per_step, rollout.n or the token \
                     limits)",
                    gib(host_extra),
                    gib(avail)
                );
            }
        }
    }
    eprintln!("memory estimate (CUDA numerics: bf16 weights, f32 gradients and AdamW):\n{est}");
    let cuda = cuda_memory();
    if uses_cuda(device, cuda) {
        if let Some((free, total)) = cuda {
            let need = est.peak(recompute);
            eprintln!(
                "GPU memory: {} free of {}; this run needs about {}",
                gib(free),
                gib(total),
                gib(need)
            );
            if need > free {
                bail!(
                    "this run does not fit in GPU memory: it needs about {} and {} are free \
                     (lower grpo.micro_batch_tokens or rollout.max_slots, turn grpo.recompute on, \
                     or use a smaller model)",
                    gib(need),
                    gib(free)
                );
            }
        }
    } else {
        let need = est.cpu_peak(recompute).saturating_add(host_extra);
        if let Some(avail) = host_available() {
            eprintln!(
                "host memory: {} available; this run needs about {} on the CPU backend",
                gib(avail),
                gib(need)
            );
            if need > avail {
                bail!(
                    "this run does not fit in host memory: it needs about {} and {} are \
                     available (lower grpo.micro_batch_tokens or rollout.max_slots, or use a \
                     smaller model)",
                    gib(need),
                    gib(avail)
                );
            }
        }
    }
    Ok(())
}

fn print_config<T: serde::Serialize>(what: &str, cfg: &T) {
    match toml::to_string_pretty(cfg) {
        Ok(s) => eprintln!("resolved {what} config:\n{s}"),
        Err(e) => eprintln!("resolved {what} config: (cannot print: {e})"),
    }
}

pub fn train(a: TrainArgs) -> anyhow::Result<()> {
    if a.config.is_none() && a.model.is_none() && a.data.is_none() && a.resume.is_none() {
        eprintln!("no --model/--data/--config given: running the built-in demo (tooln1 demo)");
        return demo(DemoArgs {
            device: a.device.unwrap_or_default(),
            seed: a.seed,
            quiet: a.quiet,
            ..DemoArgs::default()
        });
    }
    let resume = match &a.resume {
        Some(p) => Some(checkpoint::resolve_resume(p)?),
        None => None,
    };
    let mut cfg: TrainConfig = match (&a.config, &resume) {
        (None, Some(ck)) => {
            // Resume with the run's own settings unless a config file is given.
            let state = checkpoint::read_state(ck)?;
            let saved: TrainConfig = serde_json::from_value(state.config)
                .with_context(|| format!("{}: the saved config does not parse", ck.display()))?;
            let text = toml::to_string(&saved)?;
            crate::train::config::parse_config(&text, &ck.display().to_string(), &a.set)?
        }
        _ => load_config(a.config.as_deref(), &a.set)?,
    };
    // A resumed run writes where the user points: --out, else the run folder the checkpoint
    // belongs to, never the output path recorded in the checkpoint (which names the original
    // folder when a run was copied or moved).
    let out_flag = match (&a.out, &resume) {
        (Some(o), _) => Some(o.clone()),
        (None, Some(ck)) => Some(checkpoint::run_dir_of(ck).with_context(|| {
            format!(
                "{}: not inside a run folder (RUN/checkpoints/step-N); give --out for the new \
                 checkpoints and metrics",
                ck.display()
            )
        })?),
        (None, None) => None,
    };
    let run = RunFields {
        model: &mut cfg.model,
        data: &mut cfg.data,
        out: &mut cfg.out,
        device: &mut cfg.device,
        steps: &mut cfg.steps,
    };
    let (model_dir, data) = run.apply(
        a.model,
        a.data,
        out_flag,
        a.device,
        a.steps,
        "training data",
    )?;
    if let Some(s) = a.seed {
        cfg.seed = s;
    }
    cfg.validate()?;
    print_config("training", &cfg);
    let model_cfg = Qwen2Config::from_file(&model_dir.join("config.json"))?;
    let inputs = MemoryInputs {
        micro_batch_tokens: cfg.grpo.micro_batch_tokens as u64,
        rollout_seqs: cfg
            .rollout
            .max_slots
            .min(cfg.grpo.prompts_per_step.saturating_mul(cfg.rollout.n))
            as u64,
        max_len: cfg
            .rollout
            .max_prompt_tokens
            .saturating_add(cfg.rollout.max_new_tokens) as u64,
        ..MemoryInputs::default()
    };
    check_memory(
        &model_cfg,
        inputs,
        cfg.grpo.recompute,
        cfg.device,
        cfg.step_host_bytes(),
    )?;
    if a.dry_run {
        return Ok(());
    }
    let reward = crate::reward::reward_by_name(&a.reward)?;
    struct Job {
        cfg: TrainConfig,
        model_dir: PathBuf,
        data: PathBuf,
        resume: Option<PathBuf>,
        reward: Box<dyn crate::reward::Reward>,
        quiet: bool,
        discard_later: bool,
    }
    impl BackendJob for Job {
        type Output = ();
        fn run<B: Backend + 'static>(self, b: B) -> crate::Result<()> {
            eprintln!("backend: {}", b.name());
            let tok = Tokenizer::from_dir(&self.model_dir)?;
            let template = ChatTemplate::from_model_dir(&self.model_dir)?;
            let samples = read_samples(&self.data)?;
            let (prompts, dropped) = prepare_prompts(
                &samples,
                &tok,
                &template,
                self.cfg.rollout.max_prompt_tokens,
            )?;
            eprintln!(
                "{}: {} samples, {} prompts kept, {} longer than rollout.max_prompt_tokens = {} \
                 left out",
                self.data.display(),
                samples.len(),
                prompts.len(),
                dropped,
                self.cfg.rollout.max_prompt_tokens
            );
            let reference = load_model(&self.model_dir, &b)?;
            let mut t = match &self.resume {
                Some(ck) => Trainer::resume(b, ck, reference, tok, prompts, self.reward, self.cfg)?,
                None => {
                    let policy = load_model(&self.model_dir, &b)?;
                    Trainer::new(b, policy, reference, tok, prompts, self.reward, self.cfg)?
                }
            };
            t.reference_dir = Some(self.model_dir.clone());
            t.source_dir = Some(self.model_dir.clone());
            t.quiet = self.quiet;
            t.discard_later = self.discard_later;
            eprintln!(
                "training {} steps from step {} ({} prompts x {} samples per step)",
                t.total_steps(),
                t.step,
                t.cfg.grpo.prompts_per_step,
                t.cfg.rollout.n
            );
            let steps = t.run()?;
            eprintln!("{}", summarize(&steps));
            eprintln!(
                "metrics: {}\nlast checkpoint: {}",
                t.cfg.out.join("metrics.jsonl").display(),
                checkpoint::step_dir(&t.cfg.out, t.step).display()
            );
            Ok(())
        }
    }
    let device = cfg.device;
    run_on(
        device,
        Job {
            cfg,
            model_dir,
            data,
            resume,
            reward,
            quiet: a.quiet,
            discard_later: a.discard_later_checkpoints,
        },
    )?;
    Ok(())
}

/// The fields that `train` and `sft` configs share and that command-line flags override.
struct RunFields<'a> {
    model: &'a mut Option<PathBuf>,
    data: &'a mut Option<PathBuf>,
    out: &'a mut PathBuf,
    device: &'a mut DeviceKind,
    steps: &'a mut u64,
}

impl RunFields<'_> {
    /// Apply the flags that were given over the config's values, then require a model folder
    /// and a data file (from either place); `what_data` names the data in the error.
    fn apply(
        self,
        model: Option<PathBuf>,
        data: Option<PathBuf>,
        out: Option<PathBuf>,
        device: Option<DeviceKind>,
        steps: Option<u64>,
        what_data: &str,
    ) -> anyhow::Result<(PathBuf, PathBuf)> {
        if model.is_some() {
            *self.model = model;
        }
        if data.is_some() {
            *self.data = data;
        }
        if let Some(o) = out {
            *self.out = o;
        }
        if let Some(d) = device {
            *self.device = d;
        }
        if let Some(s) = steps {
            *self.steps = s;
        }
        let Some(model_dir) = self.model.clone() else {
            bail!("no model: give --model DIR or `model = \"DIR\"` in the config");
        };
        let Some(data) = self.data.clone() else {
            bail!("no {what_data}: give --data FILE.jsonl or `data = \"FILE\"` in the config");
        };
        Ok((model_dir, data))
    }
}

pub fn sft(a: SftArgs) -> anyhow::Result<()> {
    let mut cfg: SftConfig = load_config(a.config.as_deref(), &a.set)?;
    let run = RunFields {
        model: &mut cfg.model,
        data: &mut cfg.data,
        out: &mut cfg.out,
        device: &mut cfg.device,
        steps: &mut cfg.steps,
    };
    let (model_dir, data) = run.apply(a.model, a.data, a.out, a.device, a.steps, "data")?;
    cfg.validate()?;
    print_config("SFT", &cfg);
    let model_cfg = Qwen2Config::from_file(&model_dir.join("config.json"))?;
    let inputs = MemoryInputs {
        micro_batch_tokens: cfg.micro_batch_tokens as u64,
        rollout_seqs: 0,
        max_len: cfg.max_seq_tokens as u64,
        ..MemoryInputs::default()
    };
    check_memory(&model_cfg, inputs, cfg.recompute, cfg.device, 0)?;
    struct Job {
        cfg: SftConfig,
        model_dir: PathBuf,
        data: PathBuf,
        quiet: bool,
        discard_later: bool,
    }
    impl BackendJob for Job {
        type Output = ();
        fn run<B: Backend + 'static>(self, b: B) -> crate::Result<()> {
            eprintln!("backend: {}", b.name());
            let tok = Tokenizer::from_dir(&self.model_dir)?;
            let template = ChatTemplate::from_model_dir(&self.model_dir)?;
            let samples = read_samples(&self.data)?;
            let (items, dropped) = prepare_sft(&samples, &tok, &template, self.cfg.max_seq_tokens)?;
            eprintln!(
                "{}: {} samples, {} kept, {} longer than max_seq_tokens left out",
                self.data.display(),
                samples.len(),
                items.len(),
                dropped
            );
            let model = load_model(&self.model_dir, &b)?;
            let out = self.cfg.out.clone();
            let mut t = SftTrainer::new(b, model, items, self.cfg)?;
            t.source_dir = Some(self.model_dir.clone());
            t.quiet = self.quiet;
            t.discard_later = self.discard_later;
            let m = t.run(Some(&out))?;
            if let (Some(f), Some(l)) = (m.first(), m.last()) {
                eprintln!(
                    "SFT: {} steps, loss {:.4} -> {:.4}; model: {}",
                    m.len(),
                    f.loss,
                    l.loss,
                    checkpoint::step_dir(&out, t.step).join("model").display()
                );
            }
            Ok(())
        }
    }
    let device = cfg.device;
    run_on(
        device,
        Job {
            cfg,
            model_dir,
            data,
            quiet: a.quiet,
            discard_later: a.discard_later_checkpoints,
        },
    )?;
    Ok(())
}

pub fn demo(a: DemoArgs) -> anyhow::Result<()> {
    let mut cfg = DemoConfig {
        out: Some(a.out.clone()),
        quiet: a.quiet,
        ..DemoConfig::default()
    };
    if let Some(s) = a.seed {
        cfg.seed = s;
    }
    if let Some(s) = a.sft_steps {
        cfg.sft_steps = s;
    }
    if let Some(s) = a.grpo_steps {
        cfg.grpo_steps = s;
    }
    struct Job(DemoConfig);
    impl BackendJob for Job {
        type Output = DemoReport;
        fn run<B: Backend + 'static>(self, b: B) -> crate::Result<Self::Output> {
            run_demo(b, &self.0)
        }
    }
    let r = run_on(a.device, Job(cfg))?;
    println!(
        "held-out reward: random model {:.3} -> after SFT {:.3} -> after GRPO {:.3} (sampled); \
         greedy {:.3} -> {:.3}",
        r.heldout_before_sft.0,
        r.heldout_after_sft.0,
        r.heldout_after_grpo.0,
        r.greedy_after_sft,
        r.greedy_after_grpo
    );
    println!(
        "SFT {:.1} s, GRPO {:.1} s; metrics in {}",
        r.time_sft_s,
        r.time_grpo_s,
        a.out.join("grpo/metrics.jsonl").display()
    );
    Ok(())
}
