//! The `vmlb` command line: one file per subcommand.

pub mod config_check;
pub mod inspect;
pub mod run;
pub mod simulate;

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::pins::DEFAULT_PIN_ROOT;

#[derive(Parser, Debug)]
#[command(
    name = "vmlb",
    version,
    about = "XDP Maglev load balancer for VMs on a VLAN",
    long_about = "vmlb answers for service VIPs on a node's VLAN interface and balances their \
                  traffic over VM endpoints with Maglev hashing and full NAT, in XDP. Services \
                  come from Istio ServiceEntry YAML."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the daemon: load (or adopt) the XDP program on an interface and keep its maps in line
    /// with the ServiceEntry files and the backends' health.
    Run(run::RunArgs),
    /// Show the data path's state from its pinned maps (works with or without a daemon).
    Inspect(inspect::InspectArgs),
    /// Ask which backend and SNAT address:port the data path would choose for a flow.
    Simulate(simulate::SimulateArgs),
    /// Configuration commands.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Load the XDP program into the kernel (verifier included) without attaching it, and exit.
    Verify,
}

#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Parse and validate ServiceEntry files (or directories of them) without touching the
    /// data path; errors name the file, line and field.
    Check(config_check::CheckArgs),
}

/// Where to find pinned state; shared by the commands that read it.
#[derive(clap::Args, Debug, Clone)]
pub struct PinArgs {
    /// Root of the pin directories (one per interface below it).
    #[arg(long, global = true, default_value = DEFAULT_PIN_ROOT)]
    pub pin_dir: PathBuf,
    /// Interface whose state to read; may be omitted when only one interface has state.
    #[arg(long, global = true)]
    pub iface: Option<String>,
}

#[derive(ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Output {
    #[default]
    Table,
    Json,
}

pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => run::run(args),
        Command::Inspect(args) => inspect::inspect(args),
        Command::Simulate(args) => simulate::simulate(args),
        Command::Config {
            command: ConfigCommand::Check(args),
        } => config_check::check(args),
        Command::Verify => {
            let ebpf = crate::loader::load(Default::default())?;
            for (name, _) in ebpf.maps() {
                println!("map {name}");
            }
            println!("program vmlb: accepted by the verifier");
            Ok(())
        }
    }
}
