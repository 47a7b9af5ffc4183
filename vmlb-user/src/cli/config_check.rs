//! `vmlb config check`: placeholder until the config source lands.

use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// ServiceEntry files or directories.
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
}

pub fn check(_args: CheckArgs) -> anyhow::Result<()> {
    anyhow::bail!("vmlb config check is not available yet")
}
