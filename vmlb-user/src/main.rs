//! The vmlb command. The daemon (`vmlb run`) and the inspection CLI arrive with the daemon issue;
//! for now it can load the program to check that the verifier accepts it.

use anyhow::Context as _;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "vmlb",
    version,
    about = "XDP Maglev load balancer for VMs on a VLAN"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the XDP program into the kernel (verifier included) without attaching it, print its
    /// maps, and exit. Needs root.
    Verify,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Verify => {
            let ebpf =
                vmlb_user::loader::load(Default::default()).context("loading the program")?;
            for (name, _) in ebpf.maps() {
                println!("map {name}");
            }
            println!("program vmlb: accepted by the verifier");
        }
    }
    Ok(())
}
