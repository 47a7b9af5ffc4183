//! `vmlb inspect`: the data path's state, read from its pinned maps. Works with or without a
//! daemon: the maps are the truth, the daemon's state file (`state::DaemonState`) only adds
//! names, hosts, weights and health-check errors when it exists.
//!
//! Table output is for people; `-o json` (or `-o yaml`, the same document) is a stable shape for
//! scripts (serde structs below, one top-level object per subcommand; fields are only ever
//! added):
//!
//! - services: `{"iface", "services": [ServiceRow]}`
//! - backends: `{"iface", "backends": [BackendRow]}`
//! - maglev:   `{"iface", "service": ServiceRef, "ring_base", "ring_size", "empty_slots",
//!   "backends": [{"id", "addr", "port", "slots", "share_percent"}], "table": [backend id per slot]}`
//! - flows:    `{"iface", "flows": [FlowRow], "matched"}` (client -> VIP entries; `matched`
//!   counts the entries that passed the filters, `flows` holds at most `--limit` of them)
//! - nat:      `{"iface", "nat": [NatRow], "matched"}` (backend -> SNAT reply entries)
//! - stats:    `{"iface", "counters": [{"name", "value", "drop"}], "services": [ServiceRow],
//!   "backends": [BackendRow]}`
//! - status:   `{"iface", "program": {"id", "tag"}, "attach", "xdp_mode", "daemon": {"pid",
//!   "running", "generation", "updated_unix"}, "last_reload": {"unix", "result", "errors",
//!   "warnings"}, "maps": [{"map", "entries", "capacity"}]}`
//! - neighbours: `{"iface", "updated_unix", "neighbours": [{"backend", "next_hop", "route",
//!   "state", "mac", "managed"}]}` (from the state file; empty without a daemon)
//!
//! Addresses are strings ("10.10.1.2", or "10.10.1.2:8080" for an address with its port; IPv6
//! ones "fd00::2" and "[fd00::2]:8080"). IPv6 services, backends and flows (their own maps,
//! `SERVICES6`, `BACKENDS6`, `FLOW_SLOTS6`) are listed with the IPv4 ones, by id.

mod flows;
mod neighbours;
mod status;

use std::{
    collections::BTreeMap,
    io::Write,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
};

use anyhow::Context as _;
use serde::Serialize;
use vmlb_common::{octets6, Service, TrafficStats, BE_F_UP};

pub use flows::{FlowArgs, FlowRow, NatRow};

use super::{
    output::{table, write_doc, Output},
    PinArgs,
};
use crate::{
    addr::{ip, parse_proto, proto_name},
    dataplane::maps::BpfMaps,
    observe::{
        digest,
        metrics::StatsReader,
        state::{self, DaemonState, ServiceState, DEFAULT_RUN_ROOT},
    },
};

#[derive(clap::Args, Debug)]
#[command(
    after_help = "Examples:\n  vmlb inspect services\n  vmlb inspect -o json backends\n  \
                        vmlb inspect maglev 10.10.1.128:80/tcp\n  vmlb inspect maglev '[fd00::128]:80/tcp'\n  \
                        vmlb inspect --iface eth1 flows"
)]
pub struct InspectArgs {
    #[command(flatten)]
    pub pins: PinArgs,
    /// The daemon's run directory; names, hosts, weights and health errors come from
    /// <run-dir>/<iface>/state.json when it exists.
    #[arg(long, default_value = DEFAULT_RUN_ROOT, global = true)]
    pub run_dir: PathBuf,
    /// Output format: aligned columns, or JSON / YAML (a stable shape for scripts).
    #[arg(long, short, value_enum, default_value_t, global = true)]
    pub output: Output,
    #[command(subcommand)]
    pub what: InspectCommand,
}

#[derive(clap::Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum InspectCommand {
    /// Services (SERVICES and SERVICES6): id, VIP:port/proto, name, SNAT address, Maglev ring base and size,
    /// backend count and traffic (packets, bytes, new flows).
    Services,
    /// Backends (BACKENDS and BACKENDS6): id, service, address, UP/DOWN (the data path's flag), Maglev slots
    /// held, weight, neighbour state and last health error when the daemon knows them, and
    /// traffic.
    Backends,
    /// One service's Maglev table: slots and share per backend, the first slots (JSON: the
    /// whole table).
    Maglev {
        /// The service: VIP:PORT/PROTO (e.g. 10.10.1.128:80/tcp, [fd00::128]:80/tcp) or its
        /// name from the daemon.
        service: String,
    },
    /// Established flows (FLOW_SLOTS and FLOW_SLOTS6 entries towards a backend): client -> VIP  =>  SNAT -> backend.
    Flows(FlowArgs),
    /// Reverse-NAT entries (flows, seen from the backend's side): backend -> SNAT  =>  VIP -> client.
    Nat(FlowArgs),
    /// Every data-path counter (drops marked) and the traffic per service and backend.
    Stats,
    /// The program (id, kernel tag), how it was attached (XDP mode), the daemon (pid,
    /// configuration generation, last reload and its result) and map usage.
    Status,
    /// Each backend address's next hop and its neighbour entry (NUD state, MAC, whether vmlb
    /// manages it), as the daemon last read them: a backend whose neighbour is not resolved gets
    /// no new flows from XDP.
    #[command(visible_alias = "neighbors")]
    Neighbours,
}

pub fn inspect(args: InspectArgs) -> anyhow::Result<()> {
    inspect_to(&args, &mut std::io::stdout().lock())
}

/// `inspect`, writing to `out` (tests capture it).
pub fn inspect_to(args: &InspectArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let (iface, layout) = args.pins.resolve()?;
    let maps = super::open_pinned(&layout)?;
    let path = state::state_path(&args.run_dir, &iface);
    // Names are a nicety: a broken state file must not hide the data path's state.
    let state = state::read(&path).unwrap_or_else(|e| {
        eprintln!("warning: ignoring the daemon's state file: {e:#}");
        None
    });
    let v = View {
        iface,
        maps,
        state: state.unwrap_or_default(),
    };
    let fmt = args.output;
    match &args.what {
        InspectCommand::Services => v.services(fmt, out),
        InspectCommand::Backends => v.backends(fmt, out),
        InspectCommand::Maglev { service } => v.maglev(service, fmt, out),
        InspectCommand::Flows(f) => v.flows(f, false, fmt, out),
        InspectCommand::Nat(f) => v.flows(f, true, fmt, out),
        InspectCommand::Stats => v.stats(fmt, out),
        InspectCommand::Status => v.status(&layout, fmt, out),
        InspectCommand::Neighbours => v.neighbours(fmt, out),
    }
}

/// `TrafficStats`, serializable.
#[derive(Serialize, Clone, Copy, Debug, Default)]
pub struct Traffic {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub reply_packets: u64,
}

impl From<TrafficStats> for Traffic {
    fn from(t: TrafficStats) -> Self {
        Self {
            packets: t.packets,
            bytes: t.bytes,
            new_flows: t.new_flows,
            reply_packets: t.reply_packets,
        }
    }
}

#[derive(Serialize, Clone, Debug)]
pub struct ServiceRef {
    pub id: u32,
    /// From the daemon's state file; null without one.
    pub name: Option<String>,
    pub vip: IpAddr,
    pub port: u16,
    pub proto: String,
}

#[derive(Serialize, Clone, Debug)]
pub struct ServiceRow {
    #[serde(flatten)]
    pub service: ServiceRef,
    /// `snat` or `dnat` (`vmlb.io/mode`).
    pub mode: &'static str,
    /// The SNAT pool, comma-separated (empty in dnat mode).
    pub snat: String,
    pub ring_base: u32,
    pub ring_size: u32,
    /// BACKENDS entries of this service, and how many of them are up.
    pub backends: usize,
    pub backends_up: usize,
    /// ServiceEntry hosts (state file).
    pub hosts: Vec<String>,
    pub stats: Traffic,
}

#[derive(Serialize, Clone, Debug)]
pub struct BackendRow {
    pub id: u32,
    pub service_id: u32,
    /// The service's name, or VIP:port/proto without a state file.
    pub service: String,
    pub addr: IpAddr,
    pub port: u16,
    /// The data path's BE_F_UP flag.
    pub up: bool,
    /// Slots of the service's live Maglev table naming this backend.
    pub slots: u32,
    /// State file: configured weight and the last health-check error.
    pub weight: Option<u32>,
    pub last_error: Option<String>,
    /// State file: the NUD state of the backend's next hop (`inspect neighbours` has the rest).
    pub neighbour: Option<String>,
    pub stats: Traffic,
}

#[derive(Serialize, Clone, Debug)]
pub struct MaglevBackend {
    pub id: u32,
    pub addr: Option<IpAddr>,
    pub port: Option<u16>,
    pub slots: u32,
    pub share_percent: f64,
}

#[derive(Serialize, Clone, Debug)]
pub struct MaglevView {
    pub iface: String,
    pub service: ServiceRef,
    pub ring_base: u32,
    pub ring_size: u32,
    pub empty_slots: u32,
    pub backends: Vec<MaglevBackend>,
    /// `observe::digest` of the live table (backend addresses by slot): equal on nodes that
    /// agree.
    pub digest: String,
    /// Backend id of every slot (0: empty).
    pub table: Vec<u32>,
}

#[derive(Serialize, Clone, Debug)]
pub struct CounterRow {
    pub name: &'static str,
    pub value: u64,
    pub drop: bool,
}

/// Read one service's live Maglev table (one lookup per slot).
pub fn read_table(maps: &BpfMaps, svc: &Service) -> anyhow::Result<Vec<u32>> {
    read_ring(maps, svc.ring_base, svc.ring_size)
}

/// `MAGLEV[base..base + size]`, shared by both families' services.
fn read_ring(maps: &BpfMaps, base: u32, size: u32) -> anyhow::Result<Vec<u32>> {
    (base..base + size)
        .map(|i| {
            maps.maglev
                .get(&i, 0)
                .with_context(|| format!("reading MAGLEV[{i}]"))
        })
        .collect()
}

/// An installed service of either family (`SERVICES` or `SERVICES6`), as the views show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Svc {
    pub id: u32,
    pub vip: IpAddr,
    /// Host order.
    pub port: u16,
    pub proto: u8,
    pub flags: u32,
    pub snat: Vec<IpAddr>,
    pub ring_base: u32,
    pub ring_size: u32,
}

impl Svc {
    /// "VIP:port/proto" ("[fd00::128]:80/tcp" for IPv6).
    pub fn addr(&self) -> String {
        format!(
            "{}/{}",
            SocketAddr::new(self.vip, self.port),
            proto_name(self.proto)
        )
    }
}

/// A `BACKENDS` or `BACKENDS6` entry in use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Be {
    pub id: u32,
    pub service_id: u32,
    pub addr: IpAddr,
    /// Host order.
    pub port: u16,
    pub flags: u32,
}

/// Every service of both families, sorted by id.
fn read_services(maps: &BpfMaps) -> anyhow::Result<Vec<Svc>> {
    let mut v: Vec<Svc> = StatsReader::services(maps)?
        .into_iter()
        .map(|(k, s)| Svc {
            id: s.id,
            vip: ip(k.vip).into(),
            port: u16::from_be(k.port),
            proto: k.proto,
            flags: s.flags,
            snat: s.snat_addrs[..(s.snat_count as usize).min(s.snat_addrs.len())]
                .iter()
                .map(|a| ip(*a).into())
                .collect(),
            ring_base: s.ring_base,
            ring_size: s.ring_size,
        })
        .collect();
    v.extend(maps.v6.read_services()?.into_iter().map(|(k, s)| {
        Svc {
            id: s.id,
            vip: ip6(&k.vip),
            port: u16::from_be(k.port),
            proto: k.proto,
            flags: s.flags,
            snat: s.snat_addrs[..(s.snat_count as usize).min(s.snat_addrs.len())]
                .iter()
                .map(ip6)
                .collect(),
            ring_base: s.ring_base,
            ring_size: s.ring_size,
        }
    }));
    v.sort_by_key(|s| s.id);
    Ok(v)
}

/// Every backend of both families, sorted by id (one id space for both).
fn read_backends(maps: &BpfMaps) -> anyhow::Result<Vec<Be>> {
    let mut v: Vec<Be> = StatsReader::backends(maps)?
        .into_iter()
        .map(|(id, b)| Be {
            id,
            service_id: b.service_id,
            addr: ip(b.addr).into(),
            port: u16::from_be(b.port),
            flags: b.flags,
        })
        .collect();
    v.extend(
        maps.v6
            .read_backends()?
            .into_iter()
            .filter(|(id, _)| *id != 0)
            .map(|(id, b)| Be {
                id,
                service_id: b.service_id,
                addr: ip6(&b.addr),
                port: u16::from_be(b.port),
                flags: b.flags,
            }),
    );
    v.sort_by_key(|b| b.id);
    Ok(v)
}

/// An IPv6 map address as an `IpAddr`.
pub(crate) fn ip6(a: &vmlb_common::Addr6) -> IpAddr {
    IpAddr::from(octets6(a))
}

/// "VIP:PORT/PROTO" of either family -> (VIP, port, protocol number).
fn parse_service_spec(s: &str) -> Option<(IpAddr, u16, u8)> {
    let (addr, proto) = s.rsplit_once('/')?;
    let addr: SocketAddr = addr.parse().ok()?;
    Some((addr.ip(), addr.port(), parse_proto(proto)?.number()))
}

struct View {
    iface: String,
    maps: BpfMaps,
    state: DaemonState,
}

impl View {
    /// The daemon's record of a service, by VIP, port and protocol.
    fn known(&self, svc: &Svc) -> Option<&ServiceState> {
        let proto = proto_name(svc.proto);
        self.state
            .services
            .iter()
            .find(|s| s.vip == svc.vip && s.port == svc.port && s.proto == proto)
    }

    fn service_ref(&self, svc: &Svc) -> ServiceRef {
        ServiceRef {
            id: svc.id,
            name: self.known(svc).map(|s| s.name.clone()),
            vip: svc.vip,
            port: svc.port,
            proto: proto_name(svc.proto),
        }
    }

    /// Services of both families sorted by id.
    fn service_list(&self) -> anyhow::Result<Vec<Svc>> {
        read_services(&self.maps)
    }

    /// Service id -> label (name, else VIP:port/proto).
    fn labels(&self, services: &[Svc]) -> BTreeMap<u32, String> {
        services
            .iter()
            .map(|s| {
                let label = self
                    .known(s)
                    .map(|k| k.name.clone())
                    .unwrap_or_else(|| s.addr());
                (s.id, label)
            })
            .collect()
    }

    fn service_rows(&self) -> anyhow::Result<Vec<ServiceRow>> {
        let backends = read_backends(&self.maps)?;
        self.service_list()?
            .iter()
            .map(|s| {
                let mine = backends.iter().filter(|b| b.service_id == s.id);
                Ok(ServiceRow {
                    service: self.service_ref(s),
                    mode: if s.flags & vmlb_common::SVC_F_DNAT != 0 {
                        "dnat"
                    } else {
                        "snat"
                    },
                    snat: s
                        .snat
                        .iter()
                        .map(IpAddr::to_string)
                        .collect::<Vec<_>>()
                        .join(","),
                    ring_base: s.ring_base,
                    ring_size: s.ring_size,
                    backends: mine.clone().count(),
                    backends_up: mine.filter(|b| b.flags & BE_F_UP != 0).count(),
                    hosts: self.known(s).map(|k| k.hosts.clone()).unwrap_or_default(),
                    stats: self.maps.service_stats(s.id)?.into(),
                })
            })
            .collect()
    }

    fn backend_rows(&self) -> anyhow::Result<Vec<BackendRow>> {
        let services = self.service_list()?;
        let labels = self.labels(&services);
        // Slot counts per backend id over every live table.
        let mut slots: BTreeMap<u32, u32> = BTreeMap::new();
        for s in &services {
            for id in read_ring(&self.maps, s.ring_base, s.ring_size)? {
                *slots.entry(id).or_default() += 1;
            }
        }
        read_backends(&self.maps)?
            .into_iter()
            .map(|b| {
                let known = self.state.backend(b.id, b.addr, b.port).map(|(_, b)| b);
                Ok(BackendRow {
                    id: b.id,
                    service_id: b.service_id,
                    service: labels
                        .get(&b.service_id)
                        .cloned()
                        .unwrap_or_else(|| format!("id {}", b.service_id)),
                    addr: b.addr,
                    port: b.port,
                    up: b.flags & BE_F_UP != 0,
                    slots: slots.get(&b.id).copied().unwrap_or(0),
                    weight: known.map(|b| b.weight),
                    last_error: known.and_then(|b| b.last_error.clone()),
                    neighbour: self
                        .state
                        .neighbours
                        .iter()
                        .find(|n| n.backend == b.addr)
                        .map(|n| n.state.clone()),
                    stats: self.maps.backend_stats(b.id)?.into(),
                })
            })
            .collect()
    }

    fn services(&self, fmt: Output, out: &mut dyn Write) -> anyhow::Result<()> {
        let rows = self.service_rows()?;
        if !fmt.is_table() {
            return write_doc(
                out,
                fmt,
                &serde_json::json!({ "iface": self.iface, "services": rows }),
            );
        }
        let cells = rows
            .iter()
            .map(|r| {
                vec![
                    r.service.id.to_string(),
                    format!(
                        "{}/{}",
                        SocketAddr::new(r.service.vip, r.service.port),
                        r.service.proto
                    ),
                    r.service.name.clone().unwrap_or_else(|| "-".into()),
                    // dnat has no pool: the column says so instead.
                    if r.mode == "dnat" {
                        "dnat".to_string()
                    } else {
                        r.snat.to_string()
                    },
                    r.ring_base.to_string(),
                    r.ring_size.to_string(),
                    format!("{}/{}", r.backends_up, r.backends),
                    r.stats.packets.to_string(),
                    r.stats.bytes.to_string(),
                    r.stats.new_flows.to_string(),
                ]
            })
            .collect::<Vec<_>>();
        table(
            out,
            &[
                "ID",
                "SERVICE",
                "NAME",
                "SNAT",
                "RING",
                "SIZE",
                "UP/BACKENDS",
                "PACKETS",
                "BYTES",
                "FLOWS",
            ],
            &cells,
        )
    }

    fn backends(&self, fmt: Output, out: &mut dyn Write) -> anyhow::Result<()> {
        let rows = self.backend_rows()?;
        if !fmt.is_table() {
            return write_doc(
                out,
                fmt,
                &serde_json::json!({ "iface": self.iface, "backends": rows }),
            );
        }
        let cells = rows
            .iter()
            .map(|r| {
                vec![
                    r.id.to_string(),
                    r.service.clone(),
                    SocketAddr::new(r.addr, r.port).to_string(),
                    if r.up { "UP" } else { "DOWN" }.into(),
                    r.neighbour.clone().unwrap_or_else(|| "-".into()),
                    r.slots.to_string(),
                    r.weight.map_or("-".into(), |w| w.to_string()),
                    r.stats.packets.to_string(),
                    r.stats.bytes.to_string(),
                    r.stats.new_flows.to_string(),
                    r.stats.reply_packets.to_string(),
                    r.last_error.clone().unwrap_or_default(),
                ]
            })
            .collect::<Vec<_>>();
        table(
            out,
            &[
                "ID", "SERVICE", "BACKEND", "STATE", "NEIGH", "SLOTS", "WEIGHT", "PACKETS",
                "BYTES", "FLOWS", "REPLIES", "HEALTH",
            ],
            &cells,
        )
    }

    /// A service by VIP:PORT/PROTO (either family) or by name.
    fn find_service(&self, spec: &str) -> anyhow::Result<Svc> {
        let services = self.service_list()?;
        let by_addr = parse_service_spec(spec).and_then(|(vip, port, proto)| {
            services
                .iter()
                .find(|s| (s.vip, s.port, s.proto) == (vip, port, proto))
                .cloned()
        });
        let by_name = || {
            let s = self.state.services.iter().find(|s| s.name == spec)?;
            services.iter().find(|v| v.id == s.id).cloned()
        };
        by_addr.or_else(by_name).with_context(|| {
            let known: Vec<String> = services
                .iter()
                .map(|s| match self.known(s) {
                    Some(n) => format!("{} ({})", s.addr(), n.name),
                    None => s.addr(),
                })
                .collect();
            format!(
                "no service {spec:?} (want VIP:PORT/PROTO or a service name; installed: {})",
                if known.is_empty() {
                    "none".into()
                } else {
                    known.join(", ")
                }
            )
        })
    }

    fn maglev(&self, spec: &str, fmt: Output, out: &mut dyn Write) -> anyhow::Result<()> {
        let svc = self.find_service(spec)?;
        let table_ids = read_ring(&self.maps, svc.ring_base, svc.ring_size)?;
        let mut slots: BTreeMap<u32, u32> = BTreeMap::new();
        for &id in &table_ids {
            *slots.entry(id).or_default() += 1;
        }
        let empty = slots.remove(&0).unwrap_or(0);
        // Backends of the service with no slot (down, weight 0) are listed too, with 0.
        let all = read_backends(&self.maps)?;
        for b in &all {
            if b.service_id == svc.id {
                slots.entry(b.id).or_default();
            }
        }
        let backends: Vec<MaglevBackend> = slots
            .iter()
            .map(|(&id, &n)| {
                // The family's own array: a table names backends of its service's family.
                let b = all
                    .iter()
                    .find(|b| b.id == id && b.addr.is_ipv4() == svc.vip.is_ipv4());
                MaglevBackend {
                    id,
                    addr: b.map(|b| b.addr),
                    port: b.map(|b| b.port),
                    slots: n,
                    share_percent: f64::from(n) * 100.0 / f64::from(svc.ring_size.max(1)),
                }
            })
            .collect();
        let addr_of: BTreeMap<u32, (IpAddr, u16)> = backends
            .iter()
            .filter_map(|b| Some((b.id, (b.addr?, b.port?))))
            .collect();
        let digest = digest::hex(digest::digest_ids(&table_ids, |id| {
            addr_of.get(&id).copied()
        }));
        let view = MaglevView {
            iface: self.iface.clone(),
            service: self.service_ref(&svc),
            ring_base: svc.ring_base,
            ring_size: svc.ring_size,
            empty_slots: empty,
            backends,
            digest,
            table: table_ids,
        };
        if !fmt.is_table() {
            return write_doc(out, fmt, &view);
        }
        writeln!(
            out,
            "service {} ({}), ring {}+{}, {} empty slots, digest {}",
            svc.addr(),
            view.service.name.as_deref().unwrap_or("unnamed"),
            view.ring_base,
            view.ring_size,
            view.empty_slots,
            view.digest
        )?;
        let cells = view
            .backends
            .iter()
            .map(|b| {
                vec![
                    b.id.to_string(),
                    match (b.addr, b.port) {
                        (Some(a), Some(p)) => SocketAddr::new(a, p).to_string(),
                        _ => "(not in BACKENDS)".into(),
                    },
                    b.slots.to_string(),
                    format!("{:.2}", b.share_percent),
                ]
            })
            .collect::<Vec<_>>();
        table(out, &["ID", "BACKEND", "SLOTS", "SHARE%"], &cells)?;
        const FIRST: usize = 32;
        let first: Vec<String> = view.table.iter().take(FIRST).map(u32::to_string).collect();
        writeln!(out, "first {} slots: {}", first.len(), first.join(" "))?;
        Ok(())
    }

    fn stats(&self, fmt: Output, out: &mut dyn Write) -> anyhow::Result<()> {
        let counters: Vec<CounterRow> = self
            .maps
            .counters()?
            .into_iter()
            .map(|(c, value)| CounterRow {
                name: c.name(),
                value,
                drop: c.is_drop(),
            })
            .collect();
        let services = self.service_rows()?;
        let backends = self.backend_rows()?;
        if !fmt.is_table() {
            return write_doc(
                out,
                fmt,
                &serde_json::json!({
                    "iface": self.iface,
                    "counters": counters,
                    "services": services,
                    "backends": backends,
                }),
            );
        }
        let cells = counters
            .iter()
            .map(|c| {
                vec![
                    c.name.to_string(),
                    c.value.to_string(),
                    if c.drop { "drop" } else { "" }.into(),
                ]
            })
            .collect::<Vec<_>>();
        table(out, &["COUNTER", "VALUE", ""], &cells)?;
        writeln!(out)?;
        let traffic = |who: String, t: &Traffic| {
            vec![
                who,
                t.packets.to_string(),
                t.bytes.to_string(),
                t.new_flows.to_string(),
                t.reply_packets.to_string(),
            ]
        };
        let cells = services
            .iter()
            .map(|r| {
                let s = &r.service;
                let who = format!("{}/{}", SocketAddr::new(s.vip, s.port), s.proto);
                traffic(
                    match &s.name {
                        Some(n) => format!("{who} {n}"),
                        None => who,
                    },
                    &r.stats,
                )
            })
            .collect::<Vec<_>>();
        table(
            out,
            &["SERVICE", "PACKETS", "BYTES", "FLOWS", "REPLIES"],
            &cells,
        )?;
        writeln!(out)?;
        let cells = backends
            .iter()
            .map(|r| {
                let who = SocketAddr::new(r.addr, r.port);
                traffic(format!("{who} ({})", r.service), &r.stats)
            })
            .collect::<Vec<_>>();
        table(
            out,
            &["BACKEND", "PACKETS", "BYTES", "FLOWS", "REPLIES"],
            &cells,
        )
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::cli::{Cli, Command};

    fn parse(args: &[&str]) -> Result<InspectArgs, clap::Error> {
        let mut argv = vec!["vmlb", "inspect"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv)?.command {
            Command::Inspect(a) => Ok(a),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn parses_subcommands_and_global_options() {
        let a = parse(&[
            "--pin-dir",
            "/x",
            "-o",
            "json",
            "maglev",
            "10.10.1.128:80/tcp",
        ])
        .unwrap();
        assert_eq!(a.pins.pin_dir, PathBuf::from("/x"));
        assert_eq!(a.output, Output::Json);
        assert_eq!(
            a.what,
            InspectCommand::Maglev {
                service: "10.10.1.128:80/tcp".into()
            }
        );
        // -o and --run-dir also after the subcommand.
        let a = parse(&["flows", "-o", "json", "--run-dir", "/r"]).unwrap();
        assert_eq!((a.output, a.run_dir), (Output::Json, PathBuf::from("/r")));
        let a = parse(&[
            "nat",
            "--backend",
            "10.0.0.2:80",
            "--limit",
            "5",
            "-o",
            "yaml",
        ])
        .unwrap();
        assert_eq!(a.output, Output::Yaml);
        assert_eq!(
            a.what,
            InspectCommand::Nat(FlowArgs {
                backend: Some("10.0.0.2:80".into()),
                limit: 5,
                ..Default::default()
            })
        );
        assert!(parse(&["maglev"]).is_err(), "SERVICE is required");
        assert!(parse(&[]).is_err(), "a subcommand is required");
    }

    #[test]
    fn every_subcommand_has_help() {
        for sub in [
            "services",
            "backends",
            "maglev",
            "flows",
            "nat",
            "stats",
            "status",
            "neighbours",
            "neighbors",
        ] {
            let e = parse(&[sub, "--help"]).unwrap_err();
            assert_eq!(e.kind(), clap::error::ErrorKind::DisplayHelp);
            assert!(e.to_string().len() > 100, "{sub}: {e}");
        }
    }
}
