//! `vmlb run`: placeholder until the daemon lands.

#[derive(clap::Args, Debug)]
pub struct RunArgs {}

pub fn run(_args: RunArgs) -> anyhow::Result<()> {
    anyhow::bail!("vmlb run is not available yet")
}
