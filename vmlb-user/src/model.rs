//! Desired state: what services should exist, independent of ids and map layout.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    time::Duration,
};

use vmlb_common::{ServiceKey, ServiceKey6, IPPROTO_TCP, IPPROTO_UDP};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub const fn from_number(n: u8) -> Option<Self> {
        match n {
            IPPROTO_TCP => Some(Proto::Tcp),
            IPPROTO_UDP => Some(Proto::Udp),
            _ => None,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }

    pub const fn number(self) -> u8 {
        match self {
            Proto::Tcp => IPPROTO_TCP,
            Proto::Udp => IPPROTO_UDP,
        }
    }
}

/// How a service's packets reach the backends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Mode {
    /// Full NAT: destination to the backend, source to a node (SNAT) address. The backend
    /// needs no route back to clients; it sees the node's address.
    #[default]
    Snat,
    /// Destination only: the backend sees the client's address. Its replies must be routed
    /// through the node (its gateway, or its route to the clients).
    Dnat,
}

impl Mode {
    pub const fn name(self) -> &'static str {
        match self {
            Mode::Snat => "snat",
            Mode::Dnat => "dnat",
        }
    }
}

/// A VIP:port/proto balanced over backends, of one address family: the VIP, the backends and
/// the SNAT addresses are all IPv4 or all IPv6 (`Reconciler::apply` refuses a mix).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    pub vip: IpAddr,
    pub port: u16,
    pub proto: Proto,
    pub mode: Mode,
    /// Source addresses towards the backends (a pool, used by flow hash; at most
    /// `vmlb_common::MAX_SNAT_PER_SERVICE`), of the VIP's family; empty in dnat mode.
    pub snat: Vec<IpAddr>,
    /// SNAT source ports (inclusive). The default keeps clear of the node's own ephemeral
    /// ports; a dedicated SNAT address may use 1024-65535.
    pub snat_ports: (u16, u16),
    /// Maglev table size (one of `vmlb_common::maglev::RING_SIZES`).
    pub ring_size: u32,
    pub backends: Vec<BackendSpec>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendSpec {
    pub addr: IpAddr,
    pub port: u16,
    /// 0 drains: no new flows, existing flows stay.
    pub weight: u32,
    /// Passing health checks. A down backend gets no new flows and its flows move.
    pub up: bool,
}

impl ServiceSpec {
    /// Its key in its family's services map.
    pub fn key(&self) -> SvcKey {
        let (port, proto) = (self.port.to_be(), self.proto.number());
        match self.vip {
            IpAddr::V4(vip) => SvcKey::V4(ServiceKey {
                vip: u32::from_ne_bytes(vip.octets()),
                port,
                proto,
                _pad: 0,
            }),
            IpAddr::V6(vip) => SvcKey::V6(ServiceKey6 {
                vip: vmlb_common::addr6(vip.octets()),
                port,
                proto,
                _pad: 0,
            }),
        }
    }
}

/// A service's key in `SERVICES` (IPv4) or `SERVICES6` (IPv6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SvcKey {
    V4(ServiceKey),
    V6(ServiceKey6),
}

impl SvcKey {
    pub fn vip(&self) -> IpAddr {
        match self {
            SvcKey::V4(k) => IpAddr::V4(Ipv4Addr::from(k.vip.to_ne_bytes())),
            SvcKey::V6(k) => IpAddr::V6(Ipv6Addr::from(vmlb_common::octets6(&k.vip))),
        }
    }
}

impl From<ServiceKey> for SvcKey {
    fn from(k: ServiceKey) -> Self {
        SvcKey::V4(k)
    }
}

impl From<&ServiceKey> for SvcKey {
    fn from(k: &ServiceKey) -> Self {
        SvcKey::V4(*k)
    }
}

impl From<ServiceKey6> for SvcKey {
    fn from(k: ServiceKey6) -> Self {
        SvcKey::V6(k)
    }
}

impl From<&ServiceKey6> for SvcKey {
    fn from(k: &ServiceKey6) -> Self {
        SvcKey::V6(*k)
    }
}

impl From<&SvcKey> for SvcKey {
    fn from(k: &SvcKey) -> Self {
        *k
    }
}

/// One service as configured: the data path's `ServiceSpec` (every backend `up`; health checks
/// decide later) plus what the daemon keeps around it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfiguredService {
    pub spec: ServiceSpec,
    /// `<ServiceEntry name>/<port name or number>`, for logs, metrics and the CLI.
    pub name: String,
    /// ServiceEntry `spec.hosts` and `spec.location`, kept for display.
    pub hosts: Vec<String>,
    pub location: Option<String>,
    /// Where it was defined.
    pub file: PathBuf,
    pub line: usize,
    pub health: HealthSpec,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HealthKind {
    /// No probing: every endpoint is up.
    None,
    /// A TCP connect to the endpoint's target port.
    Tcp,
    /// HTTP/1.1 GET of `path` on the endpoint's target port; 2xx and 3xx are healthy.
    Http { path: String },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthSpec {
    pub kind: HealthKind,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive successes that bring a down endpoint up.
    pub rise: u32,
    /// Consecutive failures that take an up endpoint down.
    pub fall: u32,
}

impl Default for HealthSpec {
    /// TCP connect every 2 s, 1 s timeout, up after 2 successes, down after 3 failures
    /// (haproxy's defaults, with a shorter interval).
    fn default() -> Self {
        Self {
            kind: HealthKind::Tcp,
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 3,
        }
    }
}

/// Settings of this node, from flags or a node config file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeConfig {
    /// The node's address on the VLAN, used as SNAT source unless a service overrides it.
    pub snat: Option<Ipv4Addr>,
    /// The same for IPv6 services.
    pub snat6: Option<Ipv6Addr>,
    /// The VLAN whose 802.1Q-tagged frames are served (on a trunk); untagged frames always are.
    pub vlan: Option<u16>,
}
