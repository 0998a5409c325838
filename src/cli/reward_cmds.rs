//! `tooln1 reward ...`

#[derive(clap::Subcommand, Debug)]
pub enum RewardCmd {
    /// Score a JSONL file of {response, ground_truth} lines.
    Score,
}

pub fn run(_c: RewardCmd) -> anyhow::Result<()> {
    anyhow::bail!("reward: not implemented yet")
}
