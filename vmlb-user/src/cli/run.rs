//! `vmlb run`: the daemon's command line, turned into `daemon::Options`.

use std::{net::SocketAddr, path::PathBuf};

use anyhow::Context as _;
use clap::ValueEnum;

use crate::{
    daemon::{telemetry::LogFormat, Options},
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
    /// vmlb.io/snat-address annotation).
    #[arg(long)]
    pub snat_addr: Option<std::net::Ipv4Addr>,
    /// VLAN id of the interface (tagged frames are handled in a later issue).
    #[arg(long)]
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
    /// Conntrack entries (two per connection).
    #[arg(long, default_value_t = vmlb_common::DEFAULT_FLOW_ENTRIES)]
    pub flow_entries: u32,
    /// Entries of the array holding every service's Maglev table.
    #[arg(long, default_value_t = vmlb_common::DEFAULT_MAGLEV_ENTRIES)]
    pub maglev_entries: u32,
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
        let node = source::node::load(self.node_config.as_deref(), self.snat_addr, self.vlan)?;
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
            flow_entries: self.flow_entries,
            maglev_entries: self.maglev_entries,
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
