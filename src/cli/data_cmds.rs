//! `tooln1 data ...`

#[derive(clap::Subcommand, Debug)]
pub enum DataCmd {
    /// Convert xLAM / ToolACE raw files to unified train/test JSONL.
    Prepare,
}

pub fn run(_c: DataCmd) -> anyhow::Result<()> {
    anyhow::bail!("data: not implemented yet")
}
