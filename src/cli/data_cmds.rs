//! `tooln1 data ...`

use crate::data::{self, PrepareOptions, Source};
use anyhow::Context;
use std::path::PathBuf;

#[derive(clap::Subcommand, Debug)]
pub enum DataCmd {
    /// Convert xLAM / ToolACE raw files (JSON array or JSON Lines) to unified train/test JSONL.
    Prepare(PrepareArgs),
}

#[derive(clap::Args, Debug)]
pub struct PrepareArgs {
    /// xLAM function-calling-60k file(s): records {query, tools, answers}.
    #[arg(long)]
    pub xlam: Vec<PathBuf>,
    /// ToolACE file(s): records {system, conversations}.
    #[arg(long)]
    pub toolace: Vec<PathBuf>,
    /// Output folder (train.jsonl and test.jsonl are written there).
    #[arg(long, short)]
    pub out: PathBuf,
    /// Shuffle seed.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Fraction of samples for the test split.
    #[arg(long, default_value_t = 0.1)]
    pub test_fraction: f64,
    /// File holding the base system text placed before the tool section (default: a generic
    /// function-calling instruction for xLAM; ToolACE keeps its own unless --override-system).
    #[arg(long)]
    pub system_prompt_file: Option<PathBuf>,
    /// Use the base system text for ToolACE too, instead of ToolACE's own preamble.
    #[arg(long)]
    pub override_system: bool,
    /// Skip (and count) records that cannot be read instead of stopping at the first one.
    #[arg(long)]
    pub skip_bad: bool,
}

pub fn run(c: DataCmd) -> anyhow::Result<()> {
    match c {
        DataCmd::Prepare(a) => prepare(a),
    }
}

fn prepare(a: PrepareArgs) -> anyhow::Result<()> {
    if a.xlam.is_empty() && a.toolace.is_empty() {
        anyhow::bail!("nothing to prepare: give --xlam FILE and/or --toolace FILE");
    }
    if !(0.0..=1.0).contains(&a.test_fraction) {
        anyhow::bail!(
            "--test-fraction must be within 0..1, got {}",
            a.test_fraction
        );
    }
    let mut opts = PrepareOptions {
        seed: a.seed,
        test_fraction: a.test_fraction,
        override_system: a.override_system,
        skip_bad: a.skip_bad,
        ..Default::default()
    };
    if let Some(p) = &a.system_prompt_file {
        opts.base_system = crate::safefs::read_to_string(p)
            .context("cannot read the system prompt file")?
            .trim_end()
            .to_string();
    }
    let inputs: Vec<(Source, PathBuf)> = a
        .xlam
        .iter()
        .map(|p| (Source::Xlam, p.clone()))
        .chain(a.toolace.iter().map(|p| (Source::ToolAce, p.clone())))
        .collect();
    let prep = data::prepare(&inputs, &opts)?;
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("{}: cannot create", a.out.display()))?;
    // Both files or neither: a new train file beside an old test file would leak test samples
    // into training.
    data::write_jsonl_all(&[
        (&a.out.join("train.jsonl"), &prep.train[..]),
        (&a.out.join("test.jsonl"), &prep.test[..]),
    ])?;
    for (src, st) in &prep.stats {
        println!("{src}: read {} records, kept {} samples", st.read, st.kept);
        for (why, n) in &st.dropped {
            println!("  dropped {n}: {why}");
        }
        if st.bad > 0 {
            println!("  skipped {} bad records (--skip-bad)", st.bad);
            for e in &st.bad_examples {
                println!("    e.g. {e}");
            }
        }
    }
    println!(
        "wrote {} train and {} test samples to {}",
        prep.train.len(),
        prep.test.len(),
        a.out.display()
    );
    Ok(())
}
