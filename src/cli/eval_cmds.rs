//! `tooln1 eval ...`: BFCL and API-Bank scoring, prompt building, and generation (`... run`).

use crate::backend::select::{run_on, BackendJob, DeviceKind};
use crate::backend::Backend;
use crate::data::DEFAULT_BASE_SYSTEM;
use crate::eval::generate::{
    generate_outputs, partial_path, write_outputs, Chat, GenConfig, GenPrompt, PartialOutputs,
};
use crate::eval::{apibank, bfcl};
use crate::model::weights::load_model;
use crate::tokenizer::{ChatTemplate, Tokenizer};
use crate::train::runner::stop_tokens;
use anyhow::Context;
use std::path::PathBuf;

#[derive(clap::Subcommand, Debug)]
pub enum EvalCmd {
    /// BFCL AST evaluation.
    #[command(subcommand)]
    Bfcl(BfclCmd),
    /// API-Bank level-1 call evaluation (approximate: name + parameters, no executor).
    #[command(subcommand)]
    Apibank(ApibankCmd),
}

#[derive(clap::Subcommand, Debug)]
pub enum BfclCmd {
    /// Score model outputs ({"id", "output"} JSONL) with BFCL's AST checker.
    Score(BfclScoreArgs),
    /// Write the Tool-N1 evaluation prompts ({id, messages, tools} JSONL).
    Prompts(BfclPromptsArgs),
    /// Generate outputs with a model.
    Run(EvalRunArgs),
}

#[derive(clap::Subcommand, Debug)]
pub enum ApibankCmd {
    /// Score model outputs ({"id", "output"} JSONL) against level-1 calls.
    Score(ApibankScoreArgs),
    /// Write the Tool-N1 evaluation prompts ({id, messages, tools} JSONL).
    Prompts(ApibankPromptsArgs),
    /// Generate outputs with a model.
    Run(EvalRunArgs),
}

#[derive(clap::Args, Debug)]
pub struct BfclScoreArgs {
    /// BFCL data folder (BFCL_v4_*.json and possible_answer/; see tools/fetch-bfcl.sh).
    #[arg(long)]
    pub data: PathBuf,
    /// Model outputs: JSON Lines of {"id": ..., "output": "<raw model text>"}.
    #[arg(long)]
    pub outputs: PathBuf,
    /// Categories to score, comma-separated, or `all` (default: those that appear in the outputs).
    #[arg(long, value_delimiter = ',')]
    pub categories: Vec<String>,
    /// Print per-record verdicts (with the failure kind) and the scores as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct BfclPromptsArgs {
    #[arg(long)]
    pub data: PathBuf,
    /// Output JSONL.
    #[arg(long)]
    pub out: PathBuf,
    /// Categories, comma-separated, or `all` (default: the eleven of the Tool-N1 table).
    #[arg(long, value_delimiter = ',')]
    pub categories: Vec<String>,
    /// File with the base system text placed before the tool section.
    #[arg(long)]
    pub system_prompt_file: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct ApibankScoreArgs {
    /// level-1-api.json (a JSON array of call records).
    #[arg(long)]
    pub data: PathBuf,
    /// Model outputs: JSON Lines of {"id": "<record position>", "output": "<raw model text>"}.
    #[arg(long)]
    pub outputs: PathBuf,
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct ApibankPromptsArgs {
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long)]
    pub system_prompt_file: Option<PathBuf>,
}

pub fn run(c: EvalCmd) -> anyhow::Result<()> {
    match c {
        EvalCmd::Bfcl(BfclCmd::Score(a)) => bfcl_score(a),
        EvalCmd::Bfcl(BfclCmd::Prompts(a)) => bfcl_prompts(a),
        EvalCmd::Bfcl(BfclCmd::Run(a)) => eval_run(EvalKind::Bfcl, a),
        EvalCmd::Apibank(ApibankCmd::Score(a)) => apibank_score(a),
        EvalCmd::Apibank(ApibankCmd::Prompts(a)) => apibank_prompts(a),
        EvalCmd::Apibank(ApibankCmd::Run(a)) => eval_run(EvalKind::ApiBank, a),
    }
}

fn parse_categories(names: &[String]) -> anyhow::Result<Option<Vec<bfcl::Category>>> {
    if names.is_empty() {
        return Ok(None);
    }
    if names.len() == 1 && names[0] == "all" {
        return Ok(Some(bfcl::Category::ALL.to_vec()));
    }
    let mut out = Vec::new();
    for n in names {
        let c = bfcl::Category::from_name(n.trim()).with_context(|| {
            let known: Vec<&str> = bfcl::Category::ALL.iter().map(|c| c.name()).collect();
            format!("unknown BFCL category `{n}`; known: {}", known.join(", "))
        })?;
        out.push(c);
    }
    Ok(Some(out))
}

fn base_system(p: &Option<PathBuf>) -> anyhow::Result<String> {
    match p {
        Some(p) => Ok(crate::safefs::read_to_string(p)
            .context("cannot read the system prompt file")?
            .trim_end()
            .to_string()),
        None => Ok(DEFAULT_BASE_SYSTEM.to_string()),
    }
}

/// Print to stdout; a closed pipe (`| head`) ends quietly.
fn emit(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut so = std::io::stdout().lock();
    match so.write_all(text.as_bytes()).and_then(|_| so.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r?),
    }
}

fn bfcl_score(a: BfclScoreArgs) -> anyhow::Result<()> {
    let outputs = bfcl::read_outputs(&a.outputs)?;
    let cats = match parse_categories(&a.categories)? {
        Some(c) => c,
        None => {
            let mut seen: Vec<bfcl::Category> = outputs
                .iter()
                .filter_map(|(id, _)| bfcl::Category::from_id(id))
                .collect();
            seen.sort();
            seen.dedup();
            if seen.is_empty() {
                anyhow::bail!(
                    "{}: no output id names a BFCL category (ids look like `simple_python_0`); pass --categories",
                    a.outputs.display()
                );
            }
            seen
        }
    };
    let records = bfcl::load_dir(&a.data, &cats)?;
    let report = bfcl::score(&records, &outputs);
    if a.json {
        let v = serde_json::json!({
            "per_category": report.per_category,
            "summary": report.summary(),
            "missing": report.missing,
            "unknown_ids": report.unknown_ids,
            "verdicts": report.verdicts,
        });
        emit(&(serde_json::to_string_pretty(&v)? + "\n"))?;
    } else {
        emit(&report.table())?;
    }
    Ok(())
}

fn bfcl_prompts(a: BfclPromptsArgs) -> anyhow::Result<()> {
    let cats = parse_categories(&a.categories)?.unwrap_or_else(|| bfcl::Category::TOOLN1.to_vec());
    let records = bfcl::load_dir(&a.data, &cats)?;
    let base = base_system(&a.system_prompt_file)?;
    let prompts: Vec<bfcl::EvalPrompt> = records
        .iter()
        .map(|r| bfcl::eval_prompt(r, &base))
        .collect();
    crate::data::write_jsonl(&a.out, &prompts)?;
    eprintln!(
        "wrote {} BFCL prompts to {}",
        prompts.len(),
        a.out.display()
    );
    Ok(())
}

fn apibank_score(a: ApibankScoreArgs) -> anyhow::Result<()> {
    let records = apibank::load(&a.data)?;
    let outputs = bfcl::read_outputs(&a.outputs)?;
    let rep = apibank::score(&records, &outputs);
    if a.json {
        emit(&(serde_json::to_string_pretty(&rep)? + "\n"))?;
    } else {
        emit(&format!(
            "API-Bank level-1 calls: {}/{} correct = {:.2}%{}\nnote: {}\n",
            rep.correct,
            rep.total,
            rep.accuracy(),
            if rep.missing > 0 {
                format!(" ({} records had no output)", rep.missing)
            } else {
                String::new()
            },
            apibank::APPROXIMATION_NOTE
        ))?;
    }
    Ok(())
}

fn apibank_prompts(a: ApibankPromptsArgs) -> anyhow::Result<()> {
    let records = apibank::load(&a.data)?;
    let base = base_system(&a.system_prompt_file)?;
    let prompts: Vec<bfcl::EvalPrompt> = records
        .iter()
        .map(|r| apibank::eval_prompt(r, &base))
        .collect();
    crate::data::write_jsonl(&a.out, &prompts)?;
    eprintln!(
        "wrote {} API-Bank prompts to {}",
        prompts.len(),
        a.out.display()
    );
    Ok(())
}

/// Which benchmark `eval ... run` generates for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EvalKind {
    Bfcl,
    ApiBank,
}

#[derive(clap::Args, Debug)]
pub struct EvalRunArgs {
    /// HF model folder.
    #[arg(long)]
    pub model: PathBuf,
    /// BFCL: the data folder (BFCL_v4_*.json + possible_answer/). API-Bank: the level-1 JSON
    /// file.
    #[arg(long)]
    pub data: PathBuf,
    /// Where the generations are written ({"id", "output"} per line).
    #[arg(long, default_value = "generations.jsonl")]
    pub out: PathBuf,
    /// BFCL categories, comma separated (default: the eleven of the Tool-N1 table).
    #[arg(long, value_delimiter = ',')]
    pub categories: Vec<String>,
    /// Only the first N records (quick checks).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Base system text placed before the tool section.
    #[arg(long, default_value = "")]
    pub system: String,
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 1024)]
    pub max_new_tokens: usize,
    #[arg(long, default_value_t = 4096)]
    pub max_prompt_tokens: usize,
    #[arg(long, default_value = "auto")]
    pub device: DeviceKind,
}

pub fn eval_run(kind: EvalKind, a: EvalRunArgs) -> anyhow::Result<()> {
    // Prompts and the scorer's records.
    let (prompts, bfcl_records, api_records) = match kind {
        EvalKind::Bfcl => {
            let cats: Vec<bfcl::Category> = if a.categories.is_empty() {
                bfcl::Category::TOOLN1.to_vec()
            } else {
                a.categories
                    .iter()
                    .map(|c| {
                        bfcl::Category::from_name(c.trim())
                            .with_context(|| format!("--categories: unknown BFCL category `{c}`"))
                    })
                    .collect::<anyhow::Result<_>>()?
            };
            let mut recs = bfcl::load_dir(&a.data, &cats)?;
            if let Some(n) = a.limit {
                recs.truncate(n);
            }
            let prompts: Vec<GenPrompt> = recs
                .iter()
                .map(|r| {
                    let p = bfcl::eval_prompt(r, &a.system);
                    GenPrompt {
                        id: p.id,
                        messages: p.messages,
                    }
                })
                .collect();
            (prompts, recs, Vec::new())
        }
        EvalKind::ApiBank => {
            let mut recs = apibank::load(&a.data)?;
            if let Some(n) = a.limit {
                recs.truncate(n);
            }
            let prompts: Vec<GenPrompt> = recs
                .iter()
                .map(|r| {
                    let p = apibank::eval_prompt(r, &a.system);
                    GenPrompt {
                        id: p.id,
                        messages: p.messages,
                    }
                })
                .collect();
            (prompts, Vec::new(), recs)
        }
    };
    eprintln!("{} prompts from {}", prompts.len(), a.data.display());
    let gen = GenConfig {
        batch_size: a.batch_size,
        max_new_tokens: a.max_new_tokens,
        max_prompt_tokens: a.max_prompt_tokens,
    };
    // Before any generation: --out must be writable, and generations are saved batch by batch
    // beside it so that an interrupted run keeps them and a rerun continues.
    let settings = serde_json::json!({
        "model": a.model.display().to_string(),
        "data": a.data.display().to_string(),
        "system": a.system,
        "max_new_tokens": a.max_new_tokens,
        "max_prompt_tokens": a.max_prompt_tokens,
    });
    let _lock =
        crate::safefs::RunLock::acquire_at(&partial_path(&a.out).with_extension("lock"), &a.out)?;
    let partial = PartialOutputs::open(&a.out, &settings)?;
    let earlier: std::collections::HashMap<String, String> = partial.done.iter().cloned().collect();
    if !earlier.is_empty() {
        eprintln!(
            "continuing: {} generations kept from an interrupted run ({})",
            earlier.len(),
            partial_path(&a.out).display()
        );
    }
    let all_ids: Vec<String> = prompts.iter().map(|p| p.id.clone()).collect();
    let prompts: Vec<GenPrompt> = prompts
        .into_iter()
        .filter(|p| !earlier.contains_key(&p.id))
        .collect();
    struct Job {
        model_dir: PathBuf,
        prompts: Vec<GenPrompt>,
        gen: GenConfig,
        partial: PartialOutputs,
    }
    impl BackendJob for Job {
        type Output = (Vec<(String, String)>, PartialOutputs);
        fn run<B: Backend + 'static>(mut self, b: B) -> crate::Result<Self::Output> {
            eprintln!("backend: {}", b.name());
            let tok = Tokenizer::from_dir(&self.model_dir)?;
            let template = ChatTemplate::from_model_dir(&self.model_dir)?;
            let model = load_model(&self.model_dir, &b)?;
            let stop = stop_tokens(&tok, &model.cfg);
            let pb =
                crate::train::metrics::progress_bar(self.prompts.len() as u64, false, "generate");
            let chat = Chat {
                tok: &tok,
                template: &template,
                stop: &stop,
            };
            let (outs, stats) = generate_outputs(
                &b,
                &model,
                chat,
                &self.prompts,
                &self.gen,
                |done, _, batch| {
                    pb.set_position(done as u64);
                    self.partial.append(batch)
                },
            )?;
            pb.finish_and_clear();
            eprintln!(
                "generated {} tokens for {} prompts in {:.1} s ({} prompts too long, {} outputs \
                 cut at max_new_tokens)",
                stats.generated_tokens,
                stats.prompts,
                stats.seconds,
                stats.too_long,
                stats.truncated
            );
            Ok((outs, self.partial))
        }
    }
    let (new_outs, partial) = run_on(
        a.device,
        Job {
            model_dir: a.model.clone(),
            prompts,
            gen,
            partial,
        },
    )?;
    let mut by_id = earlier;
    by_id.extend(new_outs);
    let outs: Vec<(String, String)> = all_ids
        .into_iter()
        .map(|id| {
            let o = by_id.get(&id).cloned().unwrap_or_default();
            (id, o)
        })
        .collect();
    write_outputs(&a.out, &outs)?;
    partial.finish()?;
    eprintln!("generations: {}", a.out.display());
    match kind {
        EvalKind::Bfcl => {
            let report = bfcl::score(&bfcl_records, &outs);
            println!("{}", report.table());
        }
        EvalKind::ApiBank => {
            let report = apibank::score(&api_records, &outs);
            println!(
                "API-Bank level-1 call accuracy: {:.2}% ({} / {})\n{}",
                report.accuracy(),
                report.correct,
                report.total,
                report.note
            );
        }
    }
    Ok(())
}
