//! `vmlb inspect`: placeholder until the inspection CLI lands.

use super::{Output, PinArgs};

#[derive(clap::Args, Debug)]
pub struct InspectArgs {
    #[command(flatten)]
    pub pins: PinArgs,
    #[arg(long, short, value_enum, default_value_t)]
    pub output: Output,
}

pub fn inspect(_args: InspectArgs) -> anyhow::Result<()> {
    anyhow::bail!("vmlb inspect is not available yet")
}
