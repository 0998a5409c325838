//! `tooln1 eval ...`

#[derive(clap::Subcommand, Debug)]
pub enum EvalCmd {
    /// BFCL AST evaluation.
    Bfcl,
}

pub fn run(_c: EvalCmd) -> anyhow::Result<()> {
    anyhow::bail!("eval: not implemented yet")
}
