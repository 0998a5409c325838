//! `tooln1 inspect` and `tooln1 init-tiny`.

#[derive(clap::Args, Debug)]
pub struct InspectArgs {
    /// Model folder (config.json, *.safetensors) or a config.json file.
    pub model: std::path::PathBuf,
}

#[derive(clap::Args, Debug)]
pub struct InitTinyArgs {
    /// Output folder.
    pub dir: std::path::PathBuf,
}

pub fn inspect(_a: InspectArgs) -> anyhow::Result<()> {
    anyhow::bail!("inspect: not implemented yet")
}

pub fn init_tiny(_a: InitTinyArgs) -> anyhow::Result<()> {
    anyhow::bail!("init-tiny: not implemented yet")
}
