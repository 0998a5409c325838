//! `tooln1 train`, `tooln1 sft` and `tooln1 demo`.

use crate::backend::select::{cuda_memory, run_on, uses_cuda, BackendJob};
use crate::backend::Backend;
use crate::data::read_samples;
use crate::demo::{run_demo, DemoConfig, DemoReport};
use crate::model::memory::{human_bytes as gib, MemoryEstimate, MemoryInputs};
use crate::model::plan::{plan, Budget, Caps, Place, Placement, Plan, RunShape, Where};
use crate::model::weights::load_model;
use crate::model::Qwen2Config;
use crate::safefs::host_available;
use crate::tokenizer::{ChatTemplate, Tokenizer};
use crate::train::checkpoint;
use crate::train::config::{
    load_config, parse_config, DeviceKind, RolloutConfig, RunConfig, RunKind, SftConfig,
    TrainConfig,
};
use crate::train::metrics::summarize;
use crate::train::runner::{prepare_prompts, Trainer};
use crate::train::sft::{prepare_sft, SftTrainer};
use anyhow::{bail, Context};
use std::path::{Path, PathBuf};

/// The flags `train` and `sft` share; each one given overrides the config field of the same
/// name ([`RunConfig`]).
#[derive(clap::Args, Debug, Default)]
pub struct RunArgs {
    /// TOML config (the defaults, Tool-N1's recipe for `train`, for everything it leaves out).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override one config value, e.g. `--set grpo.kl_coef=0.01` or `--set optim.lr=2e-5`
    /// (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// HF model folder to start from (for `train` also the frozen reference).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Prepared training JSONL (from `tooln1 data prepare`). For `sft` a final assistant
    /// message is the target, else the ground-truth calls in the Tool-N1 format.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Output folder (metrics.jsonl, checkpoints/).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// auto (CUDA when present, else CPU), cpu or cuda.
    #[arg(long)]
    pub device: Option<DeviceKind>,
    /// CUDA devices to train on: `all` (the default: every visible device, CUDA_VISIBLE_DEVICES
    /// decides which) or a count N (devices 0..N). More than one runs data parallel over NCCL
    /// (`train` and `sft`).
    #[arg(long, value_name = "N|all")]
    pub gpus: Option<crate::dist::GpuRequest>,
    /// Total steps (0 = the config's `epochs` passes over the data).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Delete checkpoints in the output folder that are later than the starting step (resuming
    /// from an older checkpoint, or reusing a folder) instead of refusing to start.
    #[arg(long)]
    pub discard_later_checkpoints: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

impl RunArgs {
    /// Put the flags that were given over `run`'s values (`out` is given separately: a resumed
    /// run has its own default), then require a model folder and a data file from either place;
    /// `what_data` names the data in the error.
    fn apply<K: RunKind>(
        &self,
        run: &mut RunConfig<K>,
        out: Option<PathBuf>,
        what_data: &str,
    ) -> anyhow::Result<(PathBuf, PathBuf)> {
        if self.model.is_some() {
            run.model = self.model.clone();
        }
        if self.data.is_some() {
            run.data = self.data.clone();
        }
        if let Some(o) = out {
            run.out = o;
        }
        if let Some(d) = self.device {
            run.device = d;
        }
        if let Some(s) = self.steps {
            run.steps = s;
        }
        let Some(model_dir) = run.model.clone() else {
            bail!("no model: give --model DIR or `model = \"DIR\"` in the config");
        };
        let Some(data) = run.data.clone() else {
            bail!("no {what_data}: give --data FILE.jsonl or `data = \"FILE\"` in the config");
        };
        Ok((model_dir, data))
    }
}

#[derive(clap::Args, Debug, Default)]
pub struct TrainArgs {
    #[command(flatten)]
    pub run: RunArgs,
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
    /// Print the resolved config and the memory estimate, then stop.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(clap::Args, Debug, Default)]
pub struct SftArgs {
    #[command(flatten)]
    pub run: RunArgs,
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

/// Print the memory estimate (and on CUDA the memory plan); refuse the run when it cannot fit.
/// On CUDA the plan's placement, rollout slots and micro-batch tokens are returned for the run
/// to use (the slots and tokens are the configured ones, or lower where those do not fit).
fn check_memory(
    model_cfg: &Qwen2Config,
    inputs: MemoryInputs,
    shape: &RunShape,
    choice: &Placement,
    device: DeviceKind,
) -> anyhow::Result<Option<Plan>> {
    let (recompute, host_extra) = (shape.recompute, shape.host_extra);
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
            let budget = Budget {
                device_free: free,
                host_available: host_available(),
            };
            let p = plan(model_cfg, shape, &budget, choice, &Caps::ENGINE)
                .map_err(|e| anyhow::anyhow!("memory: {e}"))?;
            eprintln!(
                "GPU memory: {} free of {}; memory plan:\n{p}",
                gib(free),
                gib(total)
            );
            if let Some(why) = &p.refusal {
                bail!(
                    "this run does not fit: {why}\n{p}(lower grpo.micro_batch_tokens, \
                     rollout.max_new_tokens or rollout.max_prompt_tokens, turn grpo.recompute \
                     on, set memory.optimizer = \"host\", or use a smaller model)"
                );
            }
            return Ok(Some(p));
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
    Ok(None)
}

/// Put the plan's choices into the run's settings, saying what changed.
fn apply_plan(
    p: &Plan,
    memory: &mut Placement,
    rollout: Option<&mut RolloutConfig>,
    micro_batch_tokens: &mut usize,
) {
    let place = |w: Where| match w {
        Where::Device => Place::Device,
        Where::Host => Place::Host,
    };
    memory.optimizer = place(p.optimizer);
    memory.grads = place(p.grads);
    memory.reference = place(p.reference);
    if let Some(r) = rollout {
        let s = usize::try_from(p.slots).unwrap_or(usize::MAX);
        if s < r.max_slots {
            eprintln!("memory plan: rollout.max_slots {} -> {s}", r.max_slots);
            r.max_slots = s;
        }
        // The paged KV cache: sized from the free memory when not set, lowered to fit.
        let b = usize::try_from(p.kv_blocks).unwrap_or(usize::MAX);
        if r.kv_blocks == 0 || b < r.kv_blocks {
            eprintln!(
                "memory plan: rollout.kv_blocks {} -> {b} (blocks of {} tokens)",
                r.kv_blocks, r.kv_block_size
            );
            r.kv_blocks = b;
        }
    }
    let t = usize::try_from(p.micro_batch_tokens).unwrap_or(usize::MAX);
    if t < *micro_batch_tokens {
        eprintln!(
            "memory plan: micro-batch tokens {} -> {t}",
            *micro_batch_tokens
        );
        *micro_batch_tokens = t;
    }
}

fn print_config<T: serde::Serialize>(what: &str, cfg: &T) {
    match toml::to_string_pretty(cfg) {
        Ok(s) => eprintln!("resolved {what} config:\n{s}"),
        Err(e) => eprintln!("resolved {what} config: (cannot print: {e})"),
    }
}

/// `tooln1 train`: the demo when nothing is given; else the config (from the file, or from the
/// checkpoint being resumed) with the flags over it, validated, printed and checked against
/// the memory, then the run on the selected backend.
pub fn train(a: TrainArgs) -> anyhow::Result<()> {
    let r = &a.run;
    if r.config.is_none() && r.model.is_none() && r.data.is_none() && a.resume.is_none() {
        eprintln!("no --model/--data/--config given: running the built-in demo (tooln1 demo)");
        return demo(DemoArgs {
            device: r.device.unwrap_or_default(),
            seed: a.seed,
            quiet: r.quiet,
            ..DemoArgs::default()
        });
    }
    let resume = match &a.resume {
        Some(p) => Some(checkpoint::resolve_resume(p)?),
        None => None,
    };
    let mut cfg = train_config(r, resume.as_deref())?;
    let out = output_dir(r, resume.as_deref())?;
    let (model_dir, data) = r.apply(&mut cfg.run, out, "training data")?;
    if let Some(s) = a.seed {
        cfg.run.seed = s;
    }
    cfg.validate()?;
    print_config("training", &cfg);
    let world = gpu_world(r.gpus, cfg.run.device)?;
    check_train_memory(&mut cfg, &model_dir, world)?;
    if a.dry_run {
        return Ok(());
    }
    crate::reward::reward_by_name(&a.reward)?;
    let job = TrainJob {
        reward: a.reward.clone(),
        cfg,
        model_dir,
        data,
        resume,
        quiet: r.quiet,
        discard_later: r.discard_later_checkpoints,
    };
    if world > 1 {
        eprintln!("data parallel over {world} CUDA devices (NCCL)");
        let group = crate::train::parallel::cuda_group(world)?;
        crate::train::parallel::on_ranks(group, |_, (c, comm)| job.run_rank(c, Some(comm)))?;
    } else {
        run_on(job.cfg.run.device, job)?;
    }
    Ok(())
}

/// The number of ranks of a run: `--gpus` (default all) over the visible CUDA devices; 1 on
/// the CPU backend or when no CUDA device is visible under `--device auto` (which then runs on
/// the CPU); an explicit count above 1 without CUDA devices is an error.
fn gpu_world(req: Option<crate::dist::GpuRequest>, device: DeviceKind) -> anyhow::Result<usize> {
    use crate::dist::GpuRequest;
    let explicit_many = matches!(req, Some(GpuRequest::Count(n)) if n > 1);
    if device == DeviceKind::Cpu {
        if explicit_many {
            bail!("--gpus asks for several CUDA devices, but --device cpu runs on the CPU");
        }
        return Ok(1);
    }
    let visible = crate::backend::cuda::device_count().unwrap_or(0);
    if visible == 0 && !explicit_many {
        // `run_on` reports the missing device (cuda) or falls back to the CPU (auto).
        return Ok(1);
    }
    Ok(req.unwrap_or(GpuRequest::All).resolve(visible)?)
}

/// The training config: `--config` (or the defaults) with `--set`; when resuming without
/// `--config`, the run's own settings from the checkpoint.
fn train_config(r: &RunArgs, resume: Option<&Path>) -> anyhow::Result<TrainConfig> {
    Ok(match (&r.config, resume) {
        (None, Some(ck)) => {
            let state = checkpoint::read_state(ck)?;
            let saved: TrainConfig = serde_json::from_value(state.config)
                .with_context(|| format!("{}: the saved config does not parse", ck.display()))?;
            let text = toml::to_string(&saved)?;
            parse_config(&text, &ck.display().to_string(), &r.set)?
        }
        _ => load_config(r.config.as_deref(), &r.set)?,
    })
}

/// Where the run writes, when not the config's `out`: `--out`, else for a resumed run the run
/// folder the checkpoint belongs to, never the output path recorded in the checkpoint (which
/// names the original folder when a run was copied or moved).
fn output_dir(r: &RunArgs, resume: Option<&Path>) -> anyhow::Result<Option<PathBuf>> {
    Ok(match (&r.out, resume) {
        (Some(o), _) => Some(o.clone()),
        (None, Some(ck)) => Some(checkpoint::run_dir_of(ck).with_context(|| {
            format!(
                "{}: not inside a run folder (RUN/checkpoints/step-N); give --out for the new \
                 checkpoints and metrics",
                ck.display()
            )
        })?),
        (None, None) => None,
    })
}

/// The memory a GRPO run of `cfg` needs on the model in `model_dir`, printed and checked.
/// With `world` > 1 the plan is each GPU's of the data-parallel run.
fn check_train_memory(cfg: &mut TrainConfig, model_dir: &Path, world: usize) -> anyhow::Result<()> {
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
    let plan = check_memory(
        &model_cfg,
        inputs,
        &crate::model::plan::RunShape {
            ranks: world as u64,
            ..cfg.run_shape()
        },
        &cfg.memory,
        cfg.run.device,
    )?;
    if let Some(p) = plan {
        apply_plan(
            &p,
            &mut cfg.memory,
            Some(&mut cfg.rollout),
            &mut cfg.grpo.micro_batch_tokens,
        );
    }
    Ok(())
}

/// A GRPO run, ready for a backend.
struct TrainJob {
    cfg: TrainConfig,
    model_dir: PathBuf,
    data: PathBuf,
    resume: Option<PathBuf>,
    /// The reward variant's name (each rank builds its own).
    reward: String,
    quiet: bool,
    discard_later: bool,
}

impl BackendJob for TrainJob {
    type Output = ();
    fn run<B: Backend + 'static>(self, b: B) -> crate::Result<()> {
        self.run_rank(b, None)
    }
}

impl TrainJob {
    /// The run on backend `b`, as one rank of a data-parallel group when `comm` is given (only
    /// rank 0 reports).
    fn run_rank<B: Backend + 'static>(
        &self,
        b: B,
        comm: Option<crate::train::RankComm<B>>,
    ) -> crate::Result<()> {
        let talk = comm.as_ref().is_none_or(|c| c.rank() == 0);
        let say = |m: String| {
            if talk {
                eprintln!("{m}");
            }
        };
        say(format!("backend: {}", b.name()));
        let tok = Tokenizer::from_dir(&self.model_dir)?;
        let template = ChatTemplate::from_model_dir(&self.model_dir)?;
        let samples = read_samples(&self.data)?;
        let max_prompt = self.cfg.rollout.max_prompt_tokens;
        let (prompts, dropped) = prepare_prompts(&samples, &tok, &template, max_prompt)?;
        say(format!(
            "{}: {} samples, {} prompts kept, {} longer than rollout.max_prompt_tokens = {} \
             left out",
            self.data.display(),
            samples.len(),
            prompts.len(),
            dropped,
            max_prompt
        ));
        let mut reference = load_model(&self.model_dir, &b)?;
        if self.cfg.memory.reference == Place::Host {
            // To host memory before the policy is loaded: one model on the device at a time.
            reference = reference.into_streamed(&b)?;
        }
        let data = crate::train::TrainData {
            tokenizer: tok,
            prompts,
            reward: crate::reward::reward_by_name(&self.reward)?,
        };
        let cfg = self.cfg.clone();
        let mut t = match &self.resume {
            Some(ck) => Trainer::resume_in(b, ck, reference, data, cfg, comm)?,
            None => {
                let policy = load_model(&self.model_dir, &b)?;
                Trainer::new_in(b, policy, reference, data, cfg, comm)?
            }
        };
        t.reference_dir = Some(self.model_dir.clone());
        t.source_dir = Some(self.model_dir.clone());
        t.quiet = self.quiet;
        t.discard_later = self.discard_later;
        if !talk {
            return t.run().map(|_| ());
        }
        eprintln!(
            "training {} steps from step {} ({} prompts x {} samples per step)",
            t.total_steps(),
            t.step,
            t.cfg.grpo.prompts_per_step,
            t.cfg.rollout.n
        );
        let steps = t.run()?;
        eprintln!("{}", summarize(&steps));
        let out = &t.cfg.run.out;
        eprintln!(
            "metrics: {}\nlast checkpoint: {}",
            out.join("metrics.jsonl").display(),
            checkpoint::step_dir(out, t.step).display()
        );
        Ok(())
    }
}

/// `tooln1 sft`: the config with the flags over it, validated, printed and checked against the
/// memory, then the run on the selected backend.
pub fn sft(a: SftArgs) -> anyhow::Result<()> {
    let r = &a.run;
    let mut cfg: SftConfig = load_config(r.config.as_deref(), &r.set)?;
    let (model_dir, data) = r.apply(&mut cfg.run, r.out.clone(), "data")?;
    cfg.validate()?;
    print_config("SFT", &cfg);
    let world = gpu_world(r.gpus, cfg.run.device)?;
    let model_cfg = Qwen2Config::from_file(&model_dir.join("config.json"))?;
    let inputs = MemoryInputs {
        micro_batch_tokens: cfg.micro_batch_tokens as u64,
        rollout_seqs: 0,
        max_len: cfg.max_seq_tokens as u64,
        ..MemoryInputs::default()
    };
    let plan = check_memory(
        &model_cfg,
        inputs,
        &crate::model::plan::RunShape {
            ranks: world as u64,
            ..cfg.run_shape()
        },
        &cfg.memory,
        cfg.run.device,
    )?;
    if let Some(p) = plan {
        apply_plan(&p, &mut cfg.memory, None, &mut cfg.micro_batch_tokens);
    }
    let job = SftJob {
        cfg,
        model_dir,
        data,
        quiet: r.quiet,
        discard_later: r.discard_later_checkpoints,
    };
    if world > 1 {
        eprintln!("data parallel over {world} CUDA devices (NCCL)");
        let group = crate::train::parallel::cuda_group(world)?;
        crate::train::parallel::on_ranks(group, |_, (c, comm)| job.run_rank(c, Some(comm)))?;
    } else {
        run_on(job.cfg.run.device, job)?;
    }
    Ok(())
}

/// An SFT run, ready for a backend.
struct SftJob {
    cfg: SftConfig,
    model_dir: PathBuf,
    data: PathBuf,
    quiet: bool,
    discard_later: bool,
}

impl BackendJob for SftJob {
    type Output = ();
    fn run<B: Backend + 'static>(self, b: B) -> crate::Result<()> {
        self.run_rank(b, None)
    }
}

impl SftJob {
    /// The run on backend `b`, as one rank of a data-parallel group when `comm` is given (only
    /// rank 0 reports).
    fn run_rank<B: Backend + 'static>(
        &self,
        b: B,
        comm: Option<crate::train::RankComm<B>>,
    ) -> crate::Result<()> {
        let talk = comm.as_ref().is_none_or(|c| c.rank() == 0);
        if talk {
            eprintln!("backend: {}", b.name());
        }
        let tok = Tokenizer::from_dir(&self.model_dir)?;
        let template = ChatTemplate::from_model_dir(&self.model_dir)?;
        let samples = read_samples(&self.data)?;
        let (items, dropped) = prepare_sft(&samples, &tok, &template, self.cfg.max_seq_tokens)?;
        if talk {
            eprintln!(
                "{}: {} samples, {} kept, {} longer than max_seq_tokens left out",
                self.data.display(),
                samples.len(),
                items.len(),
                dropped
            );
        }
        let model = load_model(&self.model_dir, &b)?;
        let out = self.cfg.run.out.clone();
        let mut t = SftTrainer::new_in(b, model, items, self.cfg.clone(), comm)?;
        t.source_dir = Some(self.model_dir.clone());
        t.quiet = self.quiet;
        t.discard_later = self.discard_later;
        let m = t.run(Some(&out))?;
        if !talk {
            return Ok(());
        }
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
