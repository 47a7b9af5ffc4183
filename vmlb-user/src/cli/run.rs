//! `vmlb run`: the daemon.

use std::{net::SocketAddr, path::PathBuf};

use clap::ValueEnum;

use crate::pins::DEFAULT_PIN_ROOT;

#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// The node's VLAN-side interface to attach to.
    #[arg(long)]
    pub iface: String,
    /// ServiceEntry YAML files or directories of them (repeatable). Reloaded on change and on
    /// SIGHUP; a bad edit is refused and the running configuration keeps serving.
    #[arg(long = "config", required = true)]
    pub configs: Vec<PathBuf>,
    /// auto tries native (driver) XDP and falls back to generic (skb) mode, saying so.
    #[arg(long, value_enum, default_value_t = XdpModeArg::Auto)]
    pub xdp_mode: XdpModeArg,
    /// Root of the pin directories; state for this interface lives in <pin-dir>/<iface>.
    #[arg(long, default_value = DEFAULT_PIN_ROOT)]
    pub pin_dir: PathBuf,
    /// Where the daemon writes its state file (names, health) for `vmlb inspect`.
    #[arg(long, default_value = "/run/vmlb")]
    pub run_dir: PathBuf,
    /// The node's address on the VLAN, the SNAT source (a service may override it with the
    /// vmlb.io/snat-address annotation).
    #[arg(long)]
    pub snat_addr: Option<std::net::Ipv4Addr>,
    /// VLAN id of the interface (tagged frames are handled in a later issue).
    #[arg(long)]
    pub vlan: Option<u16>,
    /// A small YAML node config file (`snatAddress:`, `vlan:`); flags win over it.
    #[arg(long)]
    pub node_config: Option<PathBuf>,
    /// Prometheus metrics, /healthz and /readyz.
    #[arg(long, default_value = "127.0.0.1:9434")]
    pub metrics_addr: SocketAddr,
    /// Detach the program and remove the pinned state on exit. Without it the program stays
    /// attached and keeps forwarding; the next daemon adopts it.
    #[arg(long)]
    pub detach_on_exit: bool,
    /// Conntrack entries (two per connection).
    #[arg(long, default_value_t = vmlb_common::DEFAULT_FLOW_ENTRIES)]
    pub flow_entries: u32,
    /// Entries of the array holding every service's Maglev table.
    #[arg(long, default_value_t = vmlb_common::DEFAULT_MAGLEV_ENTRIES)]
    pub maglev_entries: u32,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpModeArg {
    Auto,
    Native,
    Skb,
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    crate::daemon::init_tracing();
    // Two workers: the daemon's work is a few timers, probes and map writes.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(crate::daemon::run(args))
}
