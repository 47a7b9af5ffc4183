//! What the daemon needs to know, as plain data: the CLI (or a test) fills it in, the daemon
//! never sees clap.

use std::{net::SocketAddr, path::PathBuf};

use super::telemetry::LogFormat;
use crate::{dataplane::attach::XdpMode, model::NodeConfig};

#[derive(Clone, Debug)]
pub struct Options {
    /// The node's VLAN-side interface.
    pub iface: String,
    /// ServiceEntry files and directories.
    pub configs: Vec<PathBuf>,
    pub xdp_mode: XdpMode,
    /// Root of the pin directories (`<pin_dir>/<iface>` is this interface's).
    pub pin_dir: PathBuf,
    /// Root of the run directories (`<run_dir>/<iface>/state.json`).
    pub run_dir: PathBuf,
    /// Flags and node config file, already merged.
    pub node: NodeConfig,
    pub metrics_addr: SocketAddr,
    /// Detach the program and remove the pins on exit.
    pub detach_on_exit: bool,
    /// Migrate from an older map layout even when its flows cannot be carried over.
    pub upgrade_drops_flows: bool,
    /// Map sizes for a fresh load.
    pub flow_entries: u32,
    pub flow6_entries: u32,
    pub maglev_entries: u32,
    /// Service and backend ids the maps hold, id 0 included (`--max-services`,
    /// `--max-backends`).
    pub max_services: u32,
    pub max_backends: u32,
    pub flows: FlowOptions,
    /// ICMP echo answers for VIPs per second and CPU (0: unlimited), and the burst above it.
    pub icmp_echo_rate: u32,
    pub icmp_echo_burst: u32,
    pub log_format: LogFormat,
    /// Also serve what the cluster says (`vmlb run --kubernetes`); `None`: files only.
    pub kubernetes: Option<crate::source::kube::Options>,
}

/// Flow expiry and the flood guard.
#[derive(Clone, Debug)]
pub struct FlowOptions {
    pub timeouts: crate::conntrack::Timeouts,
    /// How often expired flows are swept.
    pub sweep_interval: std::time::Duration,
    /// Above this share of the flow capacity SYN-only flows expire early.
    pub pressure_percent: u8,
    /// New flows per second and CPU (0: unlimited), and the burst above it.
    pub new_flow_rate: u32,
    pub new_flow_burst: u32,
}
