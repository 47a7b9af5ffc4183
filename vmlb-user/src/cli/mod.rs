//! The `vmlb` command line: one file per subcommand, all output through `output`.

pub mod completions;
pub mod config_check;
pub mod inspect;
pub mod output;
pub mod run;
pub mod simulate;

use std::path::PathBuf;

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};

pub use output::Output;

use crate::dataplane::{
    maps::BpfMaps,
    pins::{PinLayout, DEFAULT_PIN_ROOT},
};

/// Exit statuses, documented in `vmlb --help` and README.
pub mod exit {
    /// Success.
    pub const OK: u8 = 0;
    /// Any runtime failure (cannot attach, no pinned state, ...).
    pub const FAILURE: u8 = 1;
    /// The command line is wrong (clap's own status for usage errors).
    pub const USAGE: u8 = 2;
    /// The configuration is invalid (`config check`, or `run` refusing to start with it).
    pub const CONFIG_INVALID: u8 = 3;
    /// `config check --strict` found warnings and no errors.
    pub const CONFIG_WARNINGS: u8 = 4;
}

/// An error that exits with a specific status (see [`exit`]); anything else exits 1.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ExitError {
    pub code: u8,
    pub message: String,
}

impl ExitError {
    pub fn error(code: u8, message: impl Into<String>) -> anyhow::Error {
        Self {
            code,
            message: message.into(),
        }
        .into()
    }
}

const EXIT_HELP: &str = "Exit status:\n  0  success\n  1  failure (cannot attach, no pinned \
                         state, ...)\n  2  usage error\n  3  the configuration is invalid\n  4  \
                         config check --strict: warnings, no errors";

#[derive(Parser, Debug)]
#[command(
    name = "vmlb",
    version,
    about = "XDP Maglev load balancer for VMs on a VLAN",
    long_about = "vmlb answers for service VIPs on a node's VLAN interface and balances their \
                  traffic over VM endpoints with Maglev hashing and full NAT, in XDP. Services \
                  come from Istio ServiceEntry YAML.",
    after_help = EXIT_HELP
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the daemon: load (or adopt) the XDP program on an interface and keep its maps in line
    /// with the ServiceEntry files and the backends' health.
    Run(Box<run::RunArgs>),
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
    /// Print a shell completion script (e.g. `vmlb completions bash > /etc/bash_completion.d/vmlb`).
    Completions(completions::CompletionsArgs),
    /// Print the man page vmlb(1) (e.g. `vmlb man | man -l -`), or with --dir write one page
    /// per command.
    Man(completions::ManArgs),
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

impl PinArgs {
    /// The pin directory of the interface to read: `--iface`, or the only one with pinned
    /// state.
    pub fn resolve(&self) -> anyhow::Result<(String, PinLayout)> {
        let root = &self.pin_dir;
        let ifaces = PinLayout::interfaces(root);
        let none = || {
            anyhow::anyhow!(
                "no pinned vmlb state under {} (is the daemon running? pass --pin-dir)",
                root.display()
            )
        };
        let iface = match &self.iface {
            Some(i) if ifaces.contains(i) => i.clone(),
            Some(_) if ifaces.is_empty() => return Err(none()),
            Some(i) => bail!(
                "no pinned vmlb state for interface {i} under {} (interfaces with state: {})",
                root.display(),
                ifaces.join(", ")
            ),
            None => match ifaces.as_slice() {
                [] => return Err(none()),
                [one] => one.clone(),
                many => bail!(
                    "several interfaces have pinned vmlb state under {}: {}; pass --iface",
                    root.display(),
                    many.join(", ")
                ),
            },
        };
        let layout = PinLayout::new(root, &iface);
        Ok((iface, layout))
    }

    /// Open the pinned maps of the interface these arguments designate.
    pub fn open_maps(&self) -> anyhow::Result<(String, BpfMaps)> {
        let (iface, layout) = self.resolve()?;
        Ok((iface, open_pinned(&layout)?))
    }
}

/// Open this version's pinned maps for a reader (`inspect`, `simulate`), saying so clearly
/// when the pins there are of another layout version (they are never read as this one's).
pub fn open_pinned(layout: &PinLayout) -> anyhow::Result<BpfMaps> {
    if let Some(hint) = layout.missing_version_hint() {
        bail!("{hint}");
    }
    BpfMaps::from_pins(layout)
        .with_context(|| format!("opening the maps pinned in {}", layout.dir().display()))
}

pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => run::run(*args),
        Command::Inspect(args) => inspect::inspect(args),
        Command::Simulate(args) => simulate::simulate(args),
        Command::Config {
            command: ConfigCommand::Check(args),
        } => config_check::check(args),
        Command::Verify => {
            let ebpf = crate::dataplane::loader::load(Default::default())?;
            for (name, _) in ebpf.maps() {
                println!("map {name}");
            }
            println!("program vmlb: accepted by the verifier");
            Ok(())
        }
        Command::Completions(args) => completions::completions(args, &mut std::io::stdout()),
        Command::Man(args) => completions::man(args, &mut std::io::stdout()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_pin_dir_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let pins = PinArgs {
            pin_dir: dir.path().join("nope"),
            iface: None,
        };
        let e = pins.resolve().unwrap_err().to_string();
        assert!(e.contains("is the daemon running? pass --pin-dir"), "{e}");
        // Two interfaces: ask which; one named that has no state: list the ones that do.
        for i in ["eth1", "eth2"] {
            std::fs::create_dir(dir.path().join(i)).unwrap();
        }
        let pins = PinArgs {
            pin_dir: dir.path().into(),
            iface: None,
        };
        let e = pins.resolve().unwrap_err().to_string();
        assert!(e.contains("eth1, eth2; pass --iface"), "{e}");
        let pins = PinArgs {
            iface: Some("eth3".into()),
            ..pins
        };
        let e = pins.resolve().unwrap_err().to_string();
        assert!(e.contains("interfaces with state: eth1, eth2"), "{e}");
        let pins = PinArgs {
            iface: Some("eth2".into()),
            ..pins
        };
        assert_eq!(pins.resolve().unwrap().0, "eth2");
    }

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory as _;
        Cli::command().debug_assert();
    }
}
