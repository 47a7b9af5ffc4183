//! `vmlb run`: the daemon's command line, turned into `daemon::Options`.

use std::{net::SocketAddr, path::PathBuf};

use anyhow::Context as _;
use clap::ValueEnum;

use crate::{
    daemon::{options::FlowOptions, telemetry::LogFormat, Options},
    dataplane::{attach::XdpMode, pins::DEFAULT_PIN_ROOT},
    observe::state::DEFAULT_RUN_ROOT,
    source,
};

#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// The node's VLAN-side interface to attach to.
    #[arg(long)]
    pub iface: String,
    /// ServiceEntry YAML files or directories of them (repeatable). Reloaded on change and on
    /// SIGHUP; a bad edit is refused and the running configuration keeps serving.
    #[arg(long = "config", required_unless_present = "kubernetes")]
    pub configs: Vec<PathBuf>,
    /// Also serve the cluster's vmlb Services (with the VM endpoint controller) and its
    /// ServiceEntries labelled vmlb.io/serve=true. Credentials from KUBECONFIG or, in a pod,
    /// the service account.
    #[arg(long)]
    pub kubernetes: bool,
    /// This node's name, for its Lease (the DaemonSet passes spec.nodeName).
    #[arg(long, env = "NODE_NAME", required_if_eq("kubernetes", "true"))]
    pub node_name: Option<String>,
    /// The namespace of vmlb's Leases (the DaemonSet passes its own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "vmlb-system")]
    pub namespace: String,
    /// VIP pools: a YAML file of IPAddressPool documents (vmlb.io/v1alpha1 or
    /// metallb.io/v1beta1).
    #[arg(long, requires = "kubernetes")]
    pub pools: Option<PathBuf>,
    /// auto tries native (driver) XDP and falls back to generic (skb) mode, saying so.
    #[arg(long, value_enum, default_value_t = XdpModeArg::Auto)]
    pub xdp_mode: XdpModeArg,
    /// Root of the pin directories; state for this interface lives in <pin-dir>/<iface>.
    #[arg(long, default_value = DEFAULT_PIN_ROOT)]
    pub pin_dir: PathBuf,
    /// Where the daemon writes its state file (names, health) for `vmlb inspect`.
    #[arg(long, default_value = DEFAULT_RUN_ROOT)]
    pub run_dir: PathBuf,
    /// The node's address on the VLAN, the SNAT source (a service may override it with the
    /// vmlb.io/snat-address annotation). Once per family: an IPv4 address for IPv4 services,
    /// an IPv6 address for IPv6 services.
    #[arg(long, value_name = "IP")]
    pub snat_addr: Vec<std::net::IpAddr>,
    /// Serve 802.1Q-tagged frames of this VLAN id (1-4094) when attached to a trunk; frames
    /// leave with their tag, other VLANs pass to the kernel. Untagged frames are always served.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=4094))]
    pub vlan: Option<u16>,
    /// A small YAML node config file (`snatAddress:`, `vlan:`); flags win over it.
    #[arg(long)]
    pub node_config: Option<PathBuf>,
    /// Prometheus metrics, /healthz and /readyz. Loopback by default: expose it deliberately.
    #[arg(long, default_value = "127.0.0.1:9434")]
    pub metrics_addr: SocketAddr,
    /// Detach the program and remove the pinned state on exit. Without it the program stays
    /// attached and keeps forwarding; the next daemon adopts it.
    #[arg(long)]
    pub detach_on_exit: bool,
    /// When the pinned maps are of an older layout whose flows this version cannot carry over,
    /// upgrade anyway, dropping every established connection (without it the daemon refuses
    /// and the running program keeps serving).
    #[arg(long)]
    pub upgrade_drops_flows: bool,
    /// Concurrent flows (connections) the flow tables are sized for, whichever CPUs create
    /// them: that many always fit; past it new flows are refused more and more often (counted)
    /// and a live flow is never evicted. Memory: 32 bytes per flow in the index plus 2 slots of
    /// 64 bytes.
    #[arg(long, default_value_t = vmlb_common::DEFAULT_FLOW_ENTRIES)]
    pub flow_entries: u32,
    /// Concurrent IPv6 flows, in tables of their own (as --flow-entries). Memory: 32 bytes per
    /// flow in the index plus 2 slots of 112 bytes.
    #[arg(long, default_value_t = vmlb_common::DEFAULT_FLOW6_ENTRIES)]
    pub flow6_entries: u32,
    /// Flood guard: new flows each CPU may create per second (0: no limit).
    #[arg(long, default_value_t = 0)]
    pub new_flow_rate: u32,
    /// Flood guard: burst above --new-flow-rate (flows per CPU).
    #[arg(long, default_value_t = 1000)]
    pub new_flow_burst: u32,
    /// ICMP echo requests to VIPs each CPU answers per second (0: no limit).
    #[arg(long, default_value_t = 1000)]
    pub icmp_echo_rate: u32,
    /// Burst above --icmp-echo-rate (answers per CPU).
    #[arg(long, default_value_t = 50)]
    pub icmp_echo_burst: u32,
    /// Flood guard: above this share of --flow-entries in use, SYN-only flows expire after
    /// --tcp-syn-pressure-timeout instead of --tcp-syn-timeout.
    #[arg(long, default_value_t = 90, value_parser = clap::value_parser!(u8).range(1..=100))]
    pub flow_pressure_percent: u8,
    /// TCP flow with a SYN and no answer yet.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub tcp_syn_timeout: std::time::Duration,
    /// TCP SYN-only flow while the table is under pressure.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub tcp_syn_pressure_timeout: std::time::Duration,
    /// Idle established TCP flow (RFC 5382's floor for NATs: 2h4m).
    #[arg(long, default_value = "2h 4m", value_parser = humantime::parse_duration)]
    pub tcp_established_timeout: std::time::Duration,
    /// TCP flow after FIN or RST.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub tcp_closing_timeout: std::time::Duration,
    /// Idle UDP flow.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub udp_timeout: std::time::Duration,
    /// A closed TCP flow's SNAT tuple is not reused for this long after the close began (the
    /// VM's TIME_WAIT: 60 s on Linux, run late by up to the timer wheel's granularity).
    #[arg(long, default_value = "66s", value_parser = humantime::parse_duration)]
    pub snat_time_wait: std::time::Duration,
    /// How often expired flows are swept.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub flow_sweep_interval: std::time::Duration,
    /// Entries of the array holding every service's Maglev table.
    #[arg(long, default_value_t = vmlb_common::DEFAULT_MAGLEV_ENTRIES)]
    pub maglev_entries: u32,
    /// Service ids the maps hold (one per VIP, port and protocol; id 0 is never used). Per-CPU
    /// counters cost 32 bytes per id and CPU.
    #[arg(long, default_value_t = vmlb_common::MAX_SERVICES, value_parser = clap::value_parser!(u32).range(2..=1_048_576))]
    pub max_services: u32,
    /// Backend ids the maps hold (one per service and endpoint; id 0 is never used). Per-CPU
    /// next hops and counters cost 56 bytes per id and CPU.
    #[arg(long, default_value_t = vmlb_common::MAX_BACKENDS, value_parser = clap::value_parser!(u32).range(2..=16_777_216))]
    pub max_backends: u32,
    /// Log lines as text (coloured only on a terminal) or JSON (one object per line).
    #[arg(long, value_enum, default_value_t = LogFormatArg::Text)]
    pub log_format: LogFormatArg,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpModeArg {
    Auto,
    Native,
    Skb,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormatArg {
    Text,
    Json,
}

impl RunArgs {
    /// The daemon's options: the node config file merged under the flags.
    pub fn options(self) -> anyhow::Result<Options> {
        let node = source::node::load(self.node_config.as_deref(), &self.snat_addr, self.vlan)?;
        let kubernetes = match (self.kubernetes, self.node_name) {
            (false, _) => None,
            (true, None) => {
                anyhow::bail!("--kubernetes needs the node's name (--node-name or NODE_NAME)")
            }
            (true, Some(name)) => {
                let mut k = source::kube::Options::new(name, self.namespace, node.clone());
                if let Some(p) = &self.pools {
                    let text = std::fs::read_to_string(p)
                        .with_context(|| format!("reading the pools {}", p.display()))?;
                    k.pools = source::kube::pools::parse_pools_yaml(&text)
                        .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
                }
                Some(k)
            }
        };
        Ok(Options {
            kubernetes,
            iface: self.iface,
            configs: self.configs,
            xdp_mode: match self.xdp_mode {
                XdpModeArg::Auto => XdpMode::Auto,
                XdpModeArg::Native => XdpMode::Native,
                XdpModeArg::Skb => XdpMode::Skb,
            },
            pin_dir: self.pin_dir,
            run_dir: self.run_dir,
            node,
            metrics_addr: self.metrics_addr,
            detach_on_exit: self.detach_on_exit,
            upgrade_drops_flows: self.upgrade_drops_flows,
            flow_entries: self.flow_entries,
            flow6_entries: self.flow6_entries,
            flows: FlowOptions {
                timeouts: crate::conntrack::Timeouts {
                    syn: self.tcp_syn_timeout,
                    syn_pressure: self.tcp_syn_pressure_timeout,
                    established: self.tcp_established_timeout,
                    closing: self.tcp_closing_timeout,
                    udp: self.udp_timeout,
                    time_wait: self.snat_time_wait,
                },
                sweep_interval: self.flow_sweep_interval,
                pressure_percent: self.flow_pressure_percent,
                new_flow_rate: self.new_flow_rate,
                new_flow_burst: self.new_flow_burst,
            },
            icmp_echo_rate: self.icmp_echo_rate,
            icmp_echo_burst: self.icmp_echo_burst,
            maglev_entries: self.maglev_entries,
            max_services: self.max_services,
            max_backends: self.max_backends,
            log_format: match self.log_format {
                LogFormatArg::Text => LogFormat::Text,
                LogFormatArg::Json => LogFormat::Json,
            },
        })
    }
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    crate::daemon::main(args.options()?)
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use crate::cli::{Cli, Command};

    #[test]
    fn metrics_listen_on_loopback_unless_told_otherwise() {
        let args = ["vmlb", "run", "--iface", "eth1", "--config", "x.yaml"];
        let Command::Run(run) = Cli::parse_from(args).command else {
            panic!("not run")
        };
        assert!(run.metrics_addr.ip().is_loopback(), "{}", run.metrics_addr);
        let opts = run.options().unwrap();
        assert_eq!(opts.log_format, crate::daemon::telemetry::LogFormat::Text);
    }
}
