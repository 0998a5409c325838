//! `tooln1 train`, `tooln1 sft`, `tooln1 demo`, and the generation half of `tooln1 eval ... run`.

#[derive(clap::Args, Debug)]
pub struct TrainArgs {}

#[derive(clap::Args, Debug)]
pub struct SftArgs {}

#[derive(clap::Args, Debug)]
pub struct DemoArgs {}

pub fn train(_a: TrainArgs) -> anyhow::Result<()> {
    anyhow::bail!("train: not implemented yet")
}

pub fn sft(_a: SftArgs) -> anyhow::Result<()> {
    anyhow::bail!("sft: not implemented yet")
}

pub fn demo(_a: DemoArgs) -> anyhow::Result<()> {
    anyhow::bail!("demo: not implemented yet")
}

#[derive(clap::Args, Debug)]
pub struct EvalRunArgs {}
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EvalKind {
    Bfcl,
    ApiBank,
}
pub fn eval_run(_kind: EvalKind, _a: EvalRunArgs) -> anyhow::Result<()> {
    anyhow::bail!("eval run: not implemented yet")
}
