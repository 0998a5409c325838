//! `tooln1 reward ...`

use crate::reward::{Reward, ToolN1Reward, Variant};
use anyhow::Context;
use std::io::{BufRead, Write};
use std::path::PathBuf;

#[derive(clap::Subcommand, Debug)]
pub enum RewardCmd {
    /// Score a JSONL file of {"response": "<raw text>", "ground_truth": [...]} lines; writes one
    /// {"reward", "format_ok", "calls_ok", "reason"} line per input line.
    Score(ScoreArgs),
}

#[derive(clap::Args, Debug)]
pub struct ScoreArgs {
    /// Input JSONL (`-` for stdin). `ground_truth` is a list of {name, arguments} or a JSON
    /// string holding one.
    #[arg(long)]
    pub input: PathBuf,
    /// Reward variant: v0 (binary with think, default), v2 (no think check), v3 (partial
    /// format), v4 (partial format + name).
    #[arg(long, default_value = "v0")]
    pub variant: String,
    /// Write results here instead of stdout.
    #[arg(long)]
    pub output: Option<PathBuf>,
}

pub fn run(c: RewardCmd) -> anyhow::Result<()> {
    match c {
        RewardCmd::Score(a) => score(a),
    }
}

fn score(a: ScoreArgs) -> anyhow::Result<()> {
    let variant: Variant = a.variant.parse()?;
    let reward = ToolN1Reward::new(variant);
    let name = a.input.display().to_string();
    let reader: Box<dyn BufRead> = if name == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        let f = std::fs::File::open(&a.input).with_context(|| format!("{name}: cannot open"))?;
        Box::new(std::io::BufReader::new(f))
    };
    let mut lines_out = Vec::new();
    let (mut n, mut total) = (0usize, 0f64);
    for (i, line) in reader.lines().enumerate() {
        let line = line.with_context(|| format!("{name}:{}: cannot read", i + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&line).map_err(|e| crate::Error::Line {
            file: name.clone(),
            line: i + 1,
            msg: format!("invalid JSON: {e}"),
        })?;
        let response =
            v.get("response")
                .and_then(|r| r.as_str())
                .ok_or_else(|| crate::Error::Line {
                    file: name.clone(),
                    line: i + 1,
                    msg: "missing string field `response`".into(),
                })?;
        let gt = v.get("ground_truth").ok_or_else(|| crate::Error::Line {
            file: name.clone(),
            line: i + 1,
            msg:
                "missing field `ground_truth` (a list of {name, arguments} or a JSON string of it)"
                    .into(),
        })?;
        let out = reward.score(response, gt);
        n += 1;
        total += out.reward as f64;
        lines_out.push(serde_json::to_string(&out)?);
    }
    match &a.output {
        Some(p) => {
            let body = lines_out.join("\n") + if lines_out.is_empty() { "" } else { "\n" };
            crate::train::checkpoint::write_atomic(p, body.as_bytes())?;
        }
        None => {
            let mut so = std::io::stdout().lock();
            for l in &lines_out {
                writeln!(so, "{l}")?;
            }
        }
    }
    let mean = if n > 0 { total / n as f64 } else { 0.0 };
    eprintln!(
        "scored {n} responses with reward {}: mean {mean:.4}",
        variant.name()
    );
    Ok(())
}
