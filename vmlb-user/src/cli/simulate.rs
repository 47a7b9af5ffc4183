//! `vmlb simulate`: placeholder until it lands.

use super::{Output, PinArgs};

#[derive(clap::Args, Debug)]
pub struct SimulateArgs {
    #[command(flatten)]
    pub pins: PinArgs,
    #[arg(long, short, value_enum, default_value_t)]
    pub output: Output,
}

pub fn simulate(_args: SimulateArgs) -> anyhow::Result<()> {
    anyhow::bail!("vmlb simulate is not available yet")
}
