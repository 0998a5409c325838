//! `tooln1 eval ...`: BFCL and API-Bank scoring and prompt building (generation, `... run`,
//! lives with the training engine).

use crate::cli::train_cmds::{eval_run, EvalKind, EvalRunArgs};
use crate::data::DEFAULT_BASE_SYSTEM;
use crate::eval::{apibank, bfcl};
use anyhow::Context;
use std::path::{Path, PathBuf};

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

fn write_lines<T: serde::Serialize>(path: &Path, items: &[T]) -> anyhow::Result<()> {
    crate::data::write_jsonl(path, items)?;
    Ok(())
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
    write_lines(&a.out, &prompts)?;
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
    write_lines(&a.out, &prompts)?;
    eprintln!(
        "wrote {} API-Bank prompts to {}",
        prompts.len(),
        a.out.display()
    );
    Ok(())
}
