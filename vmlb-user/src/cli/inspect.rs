//! `vmlb inspect`: the data path's state, read from its pinned maps. Works with or without a
//! daemon: the maps are the truth, the daemon's state file (`state::DaemonState`) only adds
//! names, hosts, weights and health-check errors when it exists.
//!
//! Table output is for people; `-o json` is a stable shape for scripts (serde structs below, one
//! top-level object per subcommand; fields are only ever added):
//!
//! - services: `{"iface", "services": [ServiceRow]}`
//! - backends: `{"iface", "backends": [BackendRow]}`
//! - maglev:   `{"iface", "service": ServiceRef, "ring_base", "ring_size", "empty_slots",
//!   "backends": [{"id", "addr", "port", "slots", "share_percent"}], "table": [backend id per slot]}`
//! - flows:    `{"iface", "flows": [FlowRow]}` (client -> VIP entries)
//! - nat:      `{"iface", "nat": [NatRow]}` (backend -> SNAT reply entries)
//! - stats:    `{"iface", "counters": [{"name", "value", "drop"}], "services": [ServiceRow],
//!   "backends": [BackendRow]}`
//!
//! Addresses are strings ("10.10.1.2", or "10.10.1.2:8080" for an address with its port).

use std::{
    collections::BTreeMap,
    io::Write,
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
};

use anyhow::{bail, Context as _};
use serde::Serialize;
use vmlb_common::{Backend, Flow, Service, ServiceKey, TrafficStats, BE_F_UP};

use super::{Output, PinArgs};
use crate::{
    maps::BpfMaps,
    metrics::{service_addr, StatsReader},
    pins::PinLayout,
    state::{self, proto_name, DaemonState, DEFAULT_RUN_ROOT},
};

#[derive(clap::Args, Debug)]
#[command(
    after_help = "Examples:\n  vmlb inspect services\n  vmlb inspect -o json backends\n  \
                        vmlb inspect maglev 10.10.1.128:80/tcp\n  vmlb inspect --iface eth1 flows"
)]
pub struct InspectArgs {
    #[command(flatten)]
    pub pins: PinArgs,
    /// The daemon's run directory; names, hosts, weights and health errors come from
    /// <run-dir>/<iface>/state.json when it exists.
    #[arg(long, default_value = DEFAULT_RUN_ROOT, global = true)]
    pub run_dir: PathBuf,
    /// Output format: aligned columns, or JSON (a stable shape for scripts).
    #[arg(long, short, value_enum, default_value_t, global = true)]
    pub output: Output,
    #[command(subcommand)]
    pub what: InspectCommand,
}

#[derive(clap::Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum InspectCommand {
    /// Services (SERVICES): id, VIP:port/proto, name, SNAT address, Maglev ring base and size,
    /// backend count and traffic (packets, bytes, new flows).
    Services,
    /// Backends (BACKENDS): id, service, address, UP/DOWN (the data path's flag), Maglev slots
    /// held, weight and last health error when the daemon knows them, and traffic.
    Backends,
    /// One service's Maglev table: slots and share per backend, the first slots (JSON: the
    /// whole table).
    Maglev {
        /// The service: VIP:PORT/PROTO (e.g. 10.10.1.128:80/tcp) or its name from the daemon.
        service: String,
    },
    /// Established flows (FLOWS entries towards a backend): client -> VIP  =>  SNAT -> backend.
    Flows,
    /// Reverse-NAT entries (FLOWS entries towards a client): backend -> SNAT  =>  VIP -> client.
    Nat,
    /// Every data-path counter (drops marked) and the traffic per service and backend.
    Stats,
}

/// The pin directory of the interface to read: `--iface`, or the only one with pinned state.
pub fn resolve(pins: &PinArgs) -> anyhow::Result<(String, PinLayout)> {
    let root = &pins.pin_dir;
    let ifaces = PinLayout::interfaces(root);
    let none = || {
        anyhow::anyhow!(
            "no pinned vmlb state under {} (is the daemon running? pass --pin-dir)",
            root.display()
        )
    };
    let iface = match &pins.iface {
        Some(i) if ifaces.contains(i) => i.clone(),
        Some(i) if ifaces.is_empty() => return Err(none()),
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

/// Open the pinned maps of the interface `pins` designates.
pub fn open_maps(pins: &PinArgs) -> anyhow::Result<(String, BpfMaps)> {
    let (iface, layout) = resolve(pins)?;
    let maps = BpfMaps::from_pins(&layout)
        .with_context(|| format!("opening the maps pinned in {}", layout.dir().display()))?;
    Ok((iface, maps))
}

pub fn inspect(args: InspectArgs) -> anyhow::Result<()> {
    inspect_to(&args, &mut std::io::stdout().lock())
}

/// `inspect`, writing to `out` (tests capture it).
pub fn inspect_to(args: &InspectArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let (iface, maps) = open_maps(&args.pins)?;
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
    let json = args.output == Output::Json;
    match &args.what {
        InspectCommand::Services => v.services(json, out),
        InspectCommand::Backends => v.backends(json, out),
        InspectCommand::Maglev { service } => v.maglev(service, json, out),
        InspectCommand::Flows => v.flows(json, out, false),
        InspectCommand::Nat => v.flows(json, out, true),
        InspectCommand::Stats => v.stats(json, out),
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
    pub vip: Ipv4Addr,
    pub port: u16,
    pub proto: String,
}

#[derive(Serialize, Clone, Debug)]
pub struct ServiceRow {
    #[serde(flatten)]
    pub service: ServiceRef,
    /// The SNAT pool, comma-separated.
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
    pub addr: Ipv4Addr,
    pub port: u16,
    /// The data path's BE_F_UP flag.
    pub up: bool,
    /// Slots of the service's live Maglev table naming this backend.
    pub slots: u32,
    /// State file: configured weight and the last health-check error.
    pub weight: Option<u32>,
    pub last_error: Option<String>,
    pub stats: Traffic,
}

#[derive(Serialize, Clone, Debug)]
pub struct MaglevBackend {
    pub id: u32,
    pub addr: Option<Ipv4Addr>,
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
    /// Backend id of every slot (0: empty).
    pub table: Vec<u32>,
}

/// A client's conntrack entry: `client -> vip` is rewritten to `snat -> backend`.
#[derive(Serialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct FlowRow {
    pub proto: String,
    pub client: SocketAddrV4,
    pub vip: SocketAddrV4,
    pub snat: SocketAddrV4,
    pub backend: SocketAddrV4,
    pub backend_id: u32,
    pub service_id: u32,
    pub service: String,
    /// syn_sent, established, closing or udp.
    pub state: String,
}

/// A reply's conntrack entry: `backend -> snat` is rewritten to `vip -> client`.
#[derive(Serialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct NatRow {
    pub proto: String,
    pub backend: SocketAddrV4,
    pub snat: SocketAddrV4,
    pub vip: SocketAddrV4,
    pub client: SocketAddrV4,
    pub backend_id: u32,
    pub service_id: u32,
    pub service: String,
    pub state: String,
}

/// A conntrack row as table cells (PROTO, a, ->, b, =>, c, ->, d, BE, SERVICE).
trait ConntrackRow: Serialize + Ord {
    fn cells(&self) -> Vec<String>;
}

fn conntrack_cells(
    proto: &str,
    [a, b, c, d]: [SocketAddrV4; 4],
    backend_id: u32,
    service: &str,
) -> Vec<String> {
    vec![
        proto.to_string(),
        a.to_string(),
        "->".into(),
        b.to_string(),
        "=>".into(),
        c.to_string(),
        "->".into(),
        d.to_string(),
        backend_id.to_string(),
        service.to_string(),
    ]
}

impl ConntrackRow for FlowRow {
    fn cells(&self) -> Vec<String> {
        let t = [self.client, self.vip, self.snat, self.backend];
        conntrack_cells(&self.proto, t, self.backend_id, &self.service)
    }
}

impl ConntrackRow for NatRow {
    fn cells(&self) -> Vec<String> {
        let t = [self.backend, self.snat, self.vip, self.client];
        conntrack_cells(&self.proto, t, self.backend_id, &self.service)
    }
}

#[derive(Serialize, Clone, Debug)]
pub struct CounterRow {
    pub name: &'static str,
    pub value: u64,
    pub drop: bool,
}

fn ip(a: u32) -> Ipv4Addr {
    Ipv4Addr::from(a.to_ne_bytes())
}

fn sock(a: u32, port_be: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip(a), u16::from_be(port_be))
}

/// Read one service's live Maglev table (one lookup per slot).
pub fn read_table(maps: &BpfMaps, svc: &Service) -> anyhow::Result<Vec<u32>> {
    (svc.ring_base..svc.ring_base + svc.ring_size)
        .map(|i| {
            maps.maglev
                .get(&i, 0)
                .with_context(|| format!("reading MAGLEV[{i}]"))
        })
        .collect()
}

struct View {
    iface: String,
    maps: BpfMaps,
    state: DaemonState,
}

impl View {
    fn service_ref(&self, key: &ServiceKey, svc: &Service) -> ServiceRef {
        ServiceRef {
            id: svc.id,
            name: self.state.service(key).map(|s| s.name.clone()),
            vip: ip(key.vip),
            port: u16::from_be(key.port),
            proto: proto_name(key.proto),
        }
    }

    /// Services sorted by id.
    fn service_list(&self) -> anyhow::Result<Vec<(ServiceKey, Service)>> {
        let mut v = StatsReader::services(&self.maps)?;
        v.sort_by_key(|(_, s)| s.id);
        Ok(v)
    }

    /// Service id -> label (name, else VIP:port/proto).
    fn labels(&self, services: &[(ServiceKey, Service)]) -> BTreeMap<u32, String> {
        services
            .iter()
            .map(|(k, s)| {
                let label = self
                    .state
                    .service(k)
                    .map(|s| s.name.clone())
                    .unwrap_or_else(|| service_addr(k));
                (s.id, label)
            })
            .collect()
    }

    fn service_rows(&self) -> anyhow::Result<Vec<ServiceRow>> {
        let backends = StatsReader::backends(&self.maps)?;
        self.service_list()?
            .iter()
            .map(|(k, s)| {
                let mine = backends.iter().filter(|(_, b)| b.service_id == s.id);
                Ok(ServiceRow {
                    service: self.service_ref(k, s),
                    snat: s.snat_addrs[..(s.snat_count as usize).min(s.snat_addrs.len())]
                        .iter()
                        .map(|a| ip(*a).to_string())
                        .collect::<Vec<_>>()
                        .join(","),
                    ring_base: s.ring_base,
                    ring_size: s.ring_size,
                    backends: mine.clone().count(),
                    backends_up: mine.filter(|(_, b)| b.flags & BE_F_UP != 0).count(),
                    hosts: self
                        .state
                        .service(k)
                        .map(|s| s.hosts.clone())
                        .unwrap_or_default(),
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
        for (_, s) in &services {
            for id in read_table(&self.maps, s)? {
                *slots.entry(id).or_default() += 1;
            }
        }
        StatsReader::backends(&self.maps)?
            .into_iter()
            .map(|(id, b)| {
                let (addr, port) = (ip(b.addr), u16::from_be(b.port));
                let known = self.state.backend(id, addr, port).map(|(_, b)| b);
                Ok(BackendRow {
                    id,
                    service_id: b.service_id,
                    service: labels
                        .get(&b.service_id)
                        .cloned()
                        .unwrap_or_else(|| format!("id {}", b.service_id)),
                    addr,
                    port,
                    up: b.flags & BE_F_UP != 0,
                    slots: slots.get(&id).copied().unwrap_or(0),
                    weight: known.map(|b| b.weight),
                    last_error: known.and_then(|b| b.last_error.clone()),
                    stats: self.maps.backend_stats(id)?.into(),
                })
            })
            .collect()
    }

    fn services(&self, json: bool, out: &mut dyn Write) -> anyhow::Result<()> {
        let rows = self.service_rows()?;
        if json {
            return write_json(
                out,
                &serde_json::json!({ "iface": self.iface, "services": rows }),
            );
        }
        let cells = rows
            .iter()
            .map(|r| {
                vec![
                    r.service.id.to_string(),
                    format!("{}:{}/{}", r.service.vip, r.service.port, r.service.proto),
                    r.service.name.clone().unwrap_or_else(|| "-".into()),
                    r.snat.to_string(),
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

    fn backends(&self, json: bool, out: &mut dyn Write) -> anyhow::Result<()> {
        let rows = self.backend_rows()?;
        if json {
            return write_json(
                out,
                &serde_json::json!({ "iface": self.iface, "backends": rows }),
            );
        }
        let cells = rows
            .iter()
            .map(|r| {
                vec![
                    r.id.to_string(),
                    r.service.clone(),
                    format!("{}:{}", r.addr, r.port),
                    if r.up { "UP" } else { "DOWN" }.into(),
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
                "ID", "SERVICE", "BACKEND", "STATE", "SLOTS", "WEIGHT", "PACKETS", "BYTES",
                "FLOWS", "REPLIES", "HEALTH",
            ],
            &cells,
        )
    }

    /// A service by VIP:PORT/PROTO or by name.
    fn find_service(&self, spec: &str) -> anyhow::Result<(ServiceKey, Service)> {
        let services = self.service_list()?;
        let by_addr = parse_service_addr(spec)
            .and_then(|key| services.iter().find(|(k, _)| *k == key).copied());
        let by_name = || {
            let s = self.state.services.iter().find(|s| s.name == spec)?;
            services.iter().find(|(_, v)| v.id == s.id).copied()
        };
        by_addr.or_else(by_name).with_context(|| {
            let known: Vec<String> = services
                .iter()
                .map(|(k, _)| match self.state.service(k) {
                    Some(n) => format!("{} ({})", service_addr(k), n.name),
                    None => service_addr(k),
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

    fn maglev(&self, spec: &str, json: bool, out: &mut dyn Write) -> anyhow::Result<()> {
        let (key, svc) = self.find_service(spec)?;
        let table_ids = read_table(&self.maps, &svc)?;
        let mut slots: BTreeMap<u32, u32> = BTreeMap::new();
        for &id in &table_ids {
            *slots.entry(id).or_default() += 1;
        }
        let empty = slots.remove(&0).unwrap_or(0);
        // Backends of the service with no slot (down, weight 0) are listed too, with 0.
        for (id, b) in StatsReader::backends(&self.maps)? {
            if b.service_id == svc.id {
                slots.entry(id).or_default();
            }
        }
        let backends = slots
            .iter()
            .map(|(&id, &n)| {
                let b: Option<Backend> =
                    self.maps.backends.get(&id, 0).ok().filter(|b| b.addr != 0);
                MaglevBackend {
                    id,
                    addr: b.map(|b| ip(b.addr)),
                    port: b.map(|b| u16::from_be(b.port)),
                    slots: n,
                    share_percent: f64::from(n) * 100.0 / f64::from(svc.ring_size.max(1)),
                }
            })
            .collect();
        let view = MaglevView {
            iface: self.iface.clone(),
            service: self.service_ref(&key, &svc),
            ring_base: svc.ring_base,
            ring_size: svc.ring_size,
            empty_slots: empty,
            backends,
            table: table_ids,
        };
        if json {
            return write_json(out, &view);
        }
        writeln!(
            out,
            "service {} ({}), ring {}+{}, {} empty slots",
            service_addr(&key),
            view.service.name.as_deref().unwrap_or("unnamed"),
            view.ring_base,
            view.ring_size,
            view.empty_slots
        )?;
        let cells = view
            .backends
            .iter()
            .map(|b| {
                vec![
                    b.id.to_string(),
                    match (b.addr, b.port) {
                        (Some(a), Some(p)) => format!("{a}:{p}"),
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

    fn flows(&self, json: bool, out: &mut dyn Write, nat: bool) -> anyhow::Result<()> {
        let labels = self.labels(&self.service_list()?);
        let label = |e: &Flow| {
            labels
                .get(&e.service_id)
                .cloned()
                .unwrap_or_else(|| format!("id {}", e.service_id))
        };
        // Every live flow is one row in both views: its client side (`flows`) and its SNAT
        // tuple (`nat`).
        let entries: Vec<Flow> = self
            .maps
            .live_flows()
            .into_iter()
            .take(MAX_FLOWS_LISTED)
            .map(|(_, f)| f)
            .collect();
        if !nat {
            let rows = entries.iter().map(|e| FlowRow {
                proto: proto_name(e.proto),
                client: sock(e.client_addr, e.client_port),
                vip: sock(e.vip_addr, e.vip_port),
                snat: sock(e.snat_addr, e.snat_port),
                backend: sock(e.backend_addr, e.backend_port),
                backend_id: e.backend_id,
                service_id: e.service_id,
                service: label(e),
                state: state_name(e.state()).into(),
            });
            self.conntrack_view(
                out,
                json,
                "flows",
                ["CLIENT", "VIP", "SNAT", "BACKEND"],
                rows,
            )
        } else {
            let rows = entries.iter().map(|e| NatRow {
                proto: proto_name(e.proto),
                backend: sock(e.backend_addr, e.backend_port),
                snat: sock(e.snat_addr, e.snat_port),
                vip: sock(e.vip_addr, e.vip_port),
                client: sock(e.client_addr, e.client_port),
                backend_id: e.backend_id,
                service_id: e.service_id,
                service: label(e),
                state: state_name(e.state()).into(),
            });
            self.conntrack_view(out, json, "nat", ["BACKEND", "SNAT", "VIP", "CLIENT"], rows)
        }
    }

    /// Both directions print alike: the tuple matched on the wire `a -> b`, the rewrite
    /// `c -> d`, then the backend id and the service.
    fn conntrack_view<R: ConntrackRow>(
        &self,
        out: &mut dyn Write,
        json: bool,
        key: &str,
        [a, b, c, d]: [&str; 4],
        rows: impl Iterator<Item = R>,
    ) -> anyhow::Result<()> {
        let mut rows: Vec<R> = rows.collect();
        rows.sort();
        if json {
            let mut doc = serde_json::json!({ "iface": self.iface });
            doc[key] = serde_json::to_value(&rows)?;
            return write_json(out, &doc);
        }
        let cells = rows.iter().map(ConntrackRow::cells).collect::<Vec<_>>();
        table(
            out,
            &["PROTO", a, "", b, "", c, "", d, "BE", "SERVICE"],
            &cells,
        )
    }

    fn stats(&self, json: bool, out: &mut dyn Write) -> anyhow::Result<()> {
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
        if json {
            return write_json(
                out,
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
                let who = format!("{}:{}/{}", s.vip, s.port, s.proto);
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
            .map(|r| traffic(format!("{}:{} ({})", r.addr, r.port, r.service), &r.stats))
            .collect::<Vec<_>>();
        table(
            out,
            &["BACKEND", "PACKETS", "BYTES", "FLOWS", "REPLIES"],
            &cells,
        )
    }
}

/// "VIP:PORT/PROTO" -> a `SERVICES` key.
pub fn parse_service_addr(s: &str) -> Option<ServiceKey> {
    let (addr, proto) = s.rsplit_once('/')?;
    let addr: SocketAddrV4 = addr.parse().ok()?;
    let proto = match proto.to_ascii_lowercase().as_str() {
        "tcp" => vmlb_common::IPPROTO_TCP,
        "udp" => vmlb_common::IPPROTO_UDP,
        _ => return None,
    };
    Some(ServiceKey {
        vip: u32::from_ne_bytes(addr.ip().octets()),
        port: addr.port().to_be(),
        proto,
        _pad: 0,
    })
}

pub(crate) fn write_json(out: &mut dyn Write, v: &impl Serialize) -> anyhow::Result<()> {
    serde_json::to_writer_pretty(&mut *out, v)?;
    writeln!(out)?;
    Ok(())
}

/// Aligned columns, two spaces apart; columns whose cells are all numbers are right-aligned.
pub(crate) fn table(
    out: &mut dyn Write,
    header: &[&str],
    rows: &[Vec<String>],
) -> anyhow::Result<()> {
    let mut width: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let numeric: Vec<bool> = (0..header.len())
        .map(|i| {
            !rows.is_empty()
                && rows
                    .iter()
                    .all(|r| r.get(i).is_some_and(|c| c.parse::<f64>().is_ok()))
        })
        .collect();
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut s = String::new();
        for (i, c) in cells.enumerate() {
            if i > 0 {
                s.push_str("  ");
            }
            let pad = width[i].saturating_sub(c.chars().count());
            if numeric[i] {
                s.extend(std::iter::repeat_n(' ', pad));
                s.push_str(c);
            } else {
                s.push_str(c);
                s.extend(std::iter::repeat_n(' ', pad));
            }
        }
        s.trim_end().to_string()
    };
    writeln!(out, "{}", line(&mut header.iter().copied()))?;
    for r in rows {
        writeln!(out, "{}", line(&mut r.iter().map(String::as_str)))?;
    }
    Ok(())
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
        assert!(parse(&["maglev"]).is_err(), "SERVICE is required");
        assert!(parse(&[]).is_err(), "a subcommand is required");
    }

    #[test]
    fn every_subcommand_has_help() {
        for sub in ["services", "backends", "maglev", "flows", "nat", "stats"] {
            let e = parse(&[sub, "--help"]).unwrap_err();
            assert_eq!(e.kind(), clap::error::ErrorKind::DisplayHelp);
            assert!(e.to_string().len() > 100, "{sub}: {e}");
        }
    }

    #[test]
    fn missing_pin_dir_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let pins = PinArgs {
            pin_dir: dir.path().join("nope"),
            iface: None,
        };
        let e = resolve(&pins).unwrap_err().to_string();
        assert!(e.contains("is the daemon running? pass --pin-dir"), "{e}");
        // Two interfaces: ask which; one named that has no state: list the ones that do.
        for i in ["eth1", "eth2"] {
            std::fs::create_dir(dir.path().join(i)).unwrap();
        }
        let pins = PinArgs {
            pin_dir: dir.path().into(),
            iface: None,
        };
        let e = resolve(&pins).unwrap_err().to_string();
        assert!(e.contains("eth1, eth2; pass --iface"), "{e}");
        let pins = PinArgs {
            iface: Some("eth3".into()),
            ..pins
        };
        let e = resolve(&pins).unwrap_err().to_string();
        assert!(e.contains("interfaces with state: eth1, eth2"), "{e}");
        let pins = PinArgs {
            iface: Some("eth2".into()),
            ..pins
        };
        assert_eq!(resolve(&pins).unwrap().0, "eth2");
    }

    #[test]
    fn service_addresses_parse() {
        let k = parse_service_addr("10.10.1.128:80/TCP").unwrap();
        assert_eq!(service_addr(&k), "10.10.1.128:80/tcp");
        for bad in [
            "10.10.1.128:80",
            "10.10.1.128/tcp",
            "x:80/tcp",
            "10.10.1.128:80/sctp",
        ] {
            assert!(parse_service_addr(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn tables_align_and_right_align_numbers() {
        let mut out = Vec::new();
        table(
            &mut out,
            &["ID", "NAME", "PACKETS"],
            &[
                vec!["1".into(), "web".into(), "12345".into()],
                vec!["10".into(), "mail-long".into(), "7".into()],
            ],
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "ID  NAME       PACKETS\n 1  web          12345\n10  mail-long        7\n"
        );
    }
}

/// `inspect flows|nat` lists at most this many flows (a full table can hold millions).
const MAX_FLOWS_LISTED: usize = 100_000;

fn state_name(s: u8) -> &'static str {
    match s {
        vmlb_common::flow_state::SYN_SENT => "syn_sent",
        vmlb_common::flow_state::ESTABLISHED => "established",
        vmlb_common::flow_state::CLOSING => "closing",
        vmlb_common::flow_state::UDP => "udp",
        _ => "free",
    }
}
