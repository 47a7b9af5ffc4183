//! `vmlb simulate`: which backend and SNAT address:port the data path would choose for a client
//! packet, computed from the pinned maps with the program's own hash and probe sequence
//! (`vmlb_common::hash`), so the answer is exact, not a model of it. The one step it cannot
//! replay is the kernel's FIB lookup (an unresolved next hop makes the program pass the packet,
//! `pass_no_neigh`).
//!
//! IPv6 works alike (`--src '[fd00::50]:40000' --dst '[fd00::128]:80'`): the IPv6 maps
//! (`FLOW_INDEX6`, `FLOW_SLOTS6`, `SERVICES6`, `VIPS6`, `BACKENDS6`, `CONFIG6`), `flow_hash6` and
//! `tuple_slot6`, mirroring vmlb-ebpf's `v6.rs` (which adds the martian check: a source that is
//! a VIP, a SNAT address, multicast or unspecified is dropped). Source and destination must be of
//! one family.
//!
//! `-o json` (or `-o yaml`) prints `Prediction`: `{"proto", "src", "dst", "verdict", ...}` where `verdict` is
//! one of
//! - `established`: `{"service_id", "backend_id", "backend", "snat"}` (the flow index has the flow);
//! - `new`: `{"service_id", "rebalanced", "flow_hash", "slot", "backend_id", "backend", "snat",
//!   "snat_attempt"}` (`rebalanced`: the flow existed but its backend is down);
//! - `reply`: `{"service_id", "backend_id", "vip", "client"}` (src is a backend, dst a SNAT port);
//! - `dropped` / `passed`: `{"counter", "message"}` (`counter`: the data-path counter it bumps).

use std::io::Write;
use std::net::{IpAddr, SocketAddr, SocketAddrV4, SocketAddrV6};

use aya::maps::MapError;
use serde::Serialize;
use vmlb_common::{
    addr6, flow_state as st, hash, octets6, Addr6, Backend, Backend6, Config, Config6, Flow, Flow6,
    FlowKey, FlowKey6, Service, Service6, ServiceKey, ServiceKey6, BE_F_UP, MAX_SNAT_PER_SERVICE,
    SNAT_RANDOM_RETRIES, SNAT_RETRIES,
};

use super::{
    output::{write_doc, Output},
    PinArgs,
};
use crate::{
    addr::{self, proto_name, sock},
    dataplane::maps::BpfMaps,
    model::Proto,
};

#[derive(clap::Args, Debug)]
#[command(
    after_help = "Examples:\n  vmlb simulate --proto tcp --src 10.10.1.50:40000 --dst 10.10.1.128:80\n  \
                  vmlb simulate --proto tcp --src '[fd00::50]:40000' --dst '[fd00::128]:80'"
)]
pub struct SimulateArgs {
    #[command(flatten)]
    pub pins: PinArgs,
    /// Output format: a short report, or JSON / YAML (a stable shape for scripts).
    #[arg(long, short, value_enum, default_value_t)]
    pub output: Output,
    /// Protocol of the packet: tcp or udp.
    #[arg(long, value_parser = parse_proto)]
    pub proto: Proto,
    /// Source of the packet, IPv4:PORT or [IPv6]:PORT (the client, or a backend to simulate a
    /// reply).
    #[arg(long, value_name = "IP:PORT", value_parser = parse_endpoint)]
    pub src: SocketAddr,
    /// Destination of the packet, IPv4:PORT or [IPv6]:PORT (a VIP and service port), of the
    /// source's family.
    #[arg(long, value_name = "VIP:PORT", value_parser = parse_endpoint)]
    pub dst: SocketAddr,
}

fn parse_endpoint(s: &str) -> Result<SocketAddr, String> {
    s.parse()
        .map_err(|_| format!("expected IPv4:PORT or [IPv6]:PORT, got {s:?}"))
}

fn parse_proto(s: &str) -> Result<Proto, String> {
    addr::parse_proto(s).ok_or_else(|| format!("expected tcp or udp, got {s:?}"))
}

/// The lookups the data path makes, so `predict` runs on the real maps or on a fake.
pub trait PathMaps {
    /// The live flow indexed under a client 5-tuple (index entry and slot generation agree).
    fn flow(&self, key: &FlowKey) -> anyhow::Result<Option<Flow>>;
    /// `FLOW_SLOTS[index]`.
    fn slot(&self, index: u32) -> anyhow::Result<Option<Flow>>;
    fn config(&self) -> anyhow::Result<Config>;
    /// The data path's clock now (`conntrack::now`).
    fn now(&self) -> u32 {
        crate::conntrack::now()
    }
    fn service(&self, key: &ServiceKey) -> anyhow::Result<Option<Service>>;
    fn is_vip(&self, addr: u32) -> anyhow::Result<bool>;
    /// `MAGLEV[index]`, None outside the array.
    fn maglev(&self, index: u32) -> anyhow::Result<Option<u32>>;
    /// `BACKENDS[id]`, None outside the array.
    fn backend(&self, id: u32) -> anyhow::Result<Option<Backend>>;
}

/// The IPv6 lookups of the data path (`MAGLEV` and the clock are shared with IPv4).
pub trait PathMaps6: PathMaps {
    /// The live flow indexed under an IPv6 client 5-tuple.
    fn flow6(&self, key: &FlowKey6) -> anyhow::Result<Option<Flow6>>;
    /// `FLOW_SLOTS6[index]`.
    fn slot6(&self, index: u32) -> anyhow::Result<Option<Flow6>>;
    fn config6(&self) -> anyhow::Result<Config6>;
    fn service6(&self, key: &ServiceKey6) -> anyhow::Result<Option<Service6>>;
    fn is_vip6(&self, addr: &Addr6) -> anyhow::Result<bool>;
    /// `BACKENDS6[id]`, None outside the array.
    fn backend6(&self, id: u32) -> anyhow::Result<Option<Backend6>>;
}

/// A missing key (or index) is `None`, any other failure an error.
fn found<T>(r: Result<T, MapError>) -> anyhow::Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(MapError::KeyNotFound | MapError::OutOfBounds { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

impl PathMaps for BpfMaps {
    fn flow(&self, key: &FlowKey) -> anyhow::Result<Option<Flow>> {
        Ok(self.index.find(&self.slots, key).map(|(_, f)| f))
    }
    fn slot(&self, index: u32) -> anyhow::Result<Option<Flow>> {
        Ok(((index as usize) < self.slots.len()).then(|| self.slots.get(index as usize)))
    }
    fn config(&self) -> anyhow::Result<Config> {
        BpfMaps::config(self)
    }
    fn service(&self, key: &ServiceKey) -> anyhow::Result<Option<Service>> {
        found(self.services.get(key, 0))
    }
    fn is_vip(&self, addr: u32) -> anyhow::Result<bool> {
        Ok(found(self.vips.get(&addr, 0))?.is_some())
    }
    fn maglev(&self, index: u32) -> anyhow::Result<Option<u32>> {
        found(self.maglev.get(&index, 0))
    }
    fn backend(&self, id: u32) -> anyhow::Result<Option<Backend>> {
        found(self.backends.get(&id, 0))
    }
}

impl PathMaps6 for BpfMaps {
    fn flow6(&self, key: &FlowKey6) -> anyhow::Result<Option<Flow6>> {
        Ok(self.v6.index.find(&self.v6.slots, key).map(|(_, f)| f))
    }
    fn slot6(&self, index: u32) -> anyhow::Result<Option<Flow6>> {
        let slots = &self.v6.slots;
        Ok(((index as usize) < slots.len()).then(|| slots.get(index as usize)))
    }
    fn config6(&self) -> anyhow::Result<Config6> {
        self.v6.config()
    }
    fn service6(&self, key: &ServiceKey6) -> anyhow::Result<Option<Service6>> {
        found(self.v6.services.get(key, 0))
    }
    fn is_vip6(&self, addr: &Addr6) -> anyhow::Result<bool> {
        Ok(found(self.v6.vips.get(addr, 0))?.is_some())
    }
    fn backend6(&self, id: u32) -> anyhow::Result<Option<Backend6>> {
        found(self.v6.backends.get(&id, 0))
    }
}

#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct Prediction {
    pub proto: String,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    #[serde(flatten)]
    pub outcome: Outcome,
}

#[derive(Serialize, Clone, Debug, PartialEq)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Outcome {
    Established {
        service_id: u32,
        backend_id: u32,
        backend: SocketAddr,
        snat: SocketAddr,
    },
    New {
        service_id: u32,
        rebalanced: bool,
        flow_hash: u32,
        slot: u32,
        backend_id: u32,
        backend: SocketAddr,
        snat: SocketAddr,
        snat_attempt: u32,
    },
    Reply {
        service_id: u32,
        backend_id: u32,
        vip: SocketAddr,
        client: SocketAddr,
    },
    Dropped {
        counter: &'static str,
        message: String,
    },
    Passed {
        counter: &'static str,
        message: String,
    },
}

fn dropped(c: vmlb_common::Counter, message: String) -> Outcome {
    Outcome::Dropped {
        counter: c.name(),
        message,
    }
}

/// What the data path does with a packet `src -> dst`, of either family (both must be of one).
pub fn predict(
    maps: &impl PathMaps6,
    proto: Proto,
    src: SocketAddr,
    dst: SocketAddr,
) -> anyhow::Result<Prediction> {
    match (src, dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => predict4(maps, proto, s, d),
        (SocketAddr::V6(s), SocketAddr::V6(d)) => predict6(maps, proto, s, d),
        _ => {
            anyhow::bail!("{src} and {dst} are of different families; a packet is one or the other")
        }
    }
}

/// The IPv4 path (mirrors vmlb-ebpf's `try_vmlb` and `new_flow` step by step; keep them in
/// sync).
fn predict4(
    maps: &impl PathMaps,
    proto: Proto,
    src: SocketAddrV4,
    dst: SocketAddrV4,
) -> anyhow::Result<Prediction> {
    use vmlb_common::Counter::*;
    let key = FlowKey {
        src_addr: addr::raw(*src.ip()),
        dst_addr: addr::raw(*dst.ip()),
        src_port: src.port().to_be(),
        dst_port: dst.port().to_be(),
        proto: proto.number(),
        _pad0: 0,
        _pad1: 0,
    };
    let skey = ServiceKey {
        vip: key.dst_addr,
        port: key.dst_port,
        proto: key.proto,
        _pad: 0,
    };
    let what = format!("{}:{}/{}", dst.ip(), dst.port(), proto_name(key.proto));
    let done = |outcome| {
        Ok(Prediction {
            proto: proto_name(key.proto),
            src: src.into(),
            dst: dst.into(),
            outcome,
        })
    };

    // 1. A reply: to a SNAT address, the tuple's slot holds the flow or nothing.
    let cfg = maps.config()?;
    let n = (cfg.snat_count as usize).min(cfg.snat_addrs.len());
    if cfg.snat_addrs[..n].contains(&key.dst_addr) {
        let idx = hash::tuple_slot(
            key.src_addr,
            key.dst_addr,
            key.src_port,
            key.dst_port,
            key.proto,
            cfg.slot_count,
        );
        return done(match maps.slot(idx)? {
            Some(f)
                if f.state() > st::CLAIMING
                    && (
                        f.backend_addr,
                        f.snat_addr,
                        f.backend_port,
                        f.snat_port,
                        f.proto,
                    ) == (
                        key.src_addr,
                        key.dst_addr,
                        key.src_port,
                        key.dst_port,
                        key.proto,
                    ) =>
            {
                Outcome::Reply {
                    service_id: f.service_id,
                    backend_id: f.backend_id,
                    vip: sock(f.vip_addr, f.vip_port).into(),
                    client: sock(f.client_addr, f.client_port).into(),
                }
            }
            _ => Outcome::Passed {
                counter: PassReplyNoFlow.name(),
                message: format!("passed: no live flow holds the SNAT tuple {src} -> {dst}"),
            },
        });
    }

    // 2. The client direction of a live flow (unless its backend went down).
    let mut rebalanced = false;
    if let Some(f) = maps.flow(&key)? {
        let up = maps
            .backend(f.backend_id)?
            .is_some_and(|b| b.flags & BE_F_UP != 0);
        if up {
            return done(Outcome::Established {
                service_id: f.service_id,
                backend_id: f.backend_id,
                backend: sock(f.backend_addr, f.backend_port).into(),
                snat: sock(f.snat_addr, f.snat_port).into(),
            });
        }
        rebalanced = true;
    }

    // 3. The service (a TCP packet here is taken to be a SYN: only a SYN opens a flow).
    let Some(svc) = maps.service(&skey)? else {
        return done(if rebalanced {
            dropped(
                DropNoBackend,
                format!("dropped: the flow's backend is down and {what} has no service now"),
            )
        } else if maps.is_vip(key.dst_addr)? {
            dropped(DropUnknownPort, format!("dropped: no service on {what}"))
        } else {
            Outcome::Passed {
                counter: PassNotVip.name(),
                message: format!("passed: {} is not a VIP", dst.ip()),
            }
        });
    };

    // 4. Maglev.
    let h = hash::flow_hash(&key);
    let slot = hash::maglev_slot(h, svc.ring_size);
    let backend_id = maps.maglev(svc.ring_base + slot)?.unwrap_or(0);
    if backend_id == 0 {
        return done(dropped(
            DropNoBackend,
            format!("dropped: no backend ({what} slot {slot} is empty)"),
        ));
    }
    let Some(be) = maps.backend(backend_id)?.filter(|b| b.addr != 0) else {
        return done(dropped(
            DropBadBackend,
            format!("dropped: slot {slot} of {what} names backend {backend_id}, which is gone"),
        ));
    };

    // 5. dnat keeps the client's tuple (the data path takes the first free of a few slots).
    if svc.flags & vmlb_common::SVC_F_DNAT != 0 {
        return done(Outcome::New {
            service_id: svc.id,
            rebalanced,
            flow_hash: h,
            slot,
            backend_id,
            backend: sock(be.addr, be.port).into(),
            snat: sock(key.src_addr, key.src_port).into(),
            snat_attempt: 0,
        });
    }
    // The SNAT tuple: the first candidate whose slot is free and past its TIME_WAIT hold.
    let pick = hash::snat_pick(h, svc.snat_count);
    let now = maps.now();
    for attempt in 0..SNAT_RETRIES {
        let a = hash::snat_addr_index(pick, attempt, svc.snat_count) as usize;
        let snat = svc.snat_addrs[a & (MAX_SNAT_PER_SERVICE - 1)];
        let port = hash::snat_port(h, attempt, svc.port_min, svc.port_range);
        let idx = hash::tuple_slot(
            be.addr,
            snat,
            be.port,
            port.to_be(),
            key.proto,
            cfg.slot_count,
        );
        let free = maps
            .slot(idx)?
            .is_some_and(|f| f.state() == st::FREE && (now.wrapping_sub(f.stamp) as i32) >= 0);
        if free {
            return done(Outcome::New {
                service_id: svc.id,
                rebalanced,
                flow_hash: h,
                slot,
                backend_id,
                backend: sock(be.addr, be.port).into(),
                snat: sock(snat, port.to_be()).into(),
                snat_attempt: attempt,
            });
        }
    }
    // The data path then tries random tuples; which one it gets cannot be foretold.
    done(Outcome::New {
        service_id: svc.id,
        rebalanced,
        flow_hash: h,
        slot,
        backend_id,
        backend: sock(be.addr, be.port).into(),
        snat: sock(svc.snat_addrs[0], 0).into(),
        snat_attempt: SNAT_RETRIES,
    })
}

/// The IPv6 path (mirrors vmlb-ebpf's `v6.rs` `run` and `new_flow`, as `predict4` mirrors the
/// IPv4 one; keep them in sync).
fn predict6(
    maps: &impl PathMaps6,
    proto: Proto,
    src: SocketAddrV6,
    dst: SocketAddrV6,
) -> anyhow::Result<Prediction> {
    use vmlb_common::Counter::*;
    let key = FlowKey6 {
        src_addr: addr6(src.ip().octets()),
        dst_addr: addr6(dst.ip().octets()),
        src_port: src.port().to_be(),
        dst_port: dst.port().to_be(),
        proto: proto.number(),
        _pad0: 0,
        _pad1: 0,
    };
    let skey = ServiceKey6 {
        vip: key.dst_addr,
        port: key.dst_port,
        proto: key.proto,
        _pad: 0,
    };
    let what = format!("{dst}/{}", proto_name(key.proto));
    let done = |outcome| {
        Ok(Prediction {
            proto: proto_name(key.proto),
            src: src.into(),
            dst: dst.into(),
            outcome,
        })
    };
    let sock6 = |a: &Addr6, port_be: u16| -> SocketAddr {
        SocketAddr::new(IpAddr::from(octets6(a)), u16::from_be(port_be))
    };

    // 1. A reply: to an IPv6 SNAT address, the tuple's slot holds the flow or nothing.
    let cfg = maps.config6()?;
    let n = (cfg.snat_count as usize).min(cfg.snat_addrs.len());
    if cfg.snat_addrs[..n].contains(&key.dst_addr) {
        let idx = hash::tuple_slot6(
            &key.src_addr,
            &key.dst_addr,
            key.src_port,
            key.dst_port,
            key.proto,
            cfg.slot_count,
        );
        return done(match maps.slot6(idx)? {
            Some(f)
                if f.state() > st::CLAIMING
                    && (
                        f.backend_addr,
                        f.snat_addr,
                        f.backend_port,
                        f.snat_port,
                        f.proto,
                    ) == (
                        key.src_addr,
                        key.dst_addr,
                        key.src_port,
                        key.dst_port,
                        key.proto,
                    ) =>
            {
                Outcome::Reply {
                    service_id: f.service_id,
                    backend_id: f.backend_id,
                    vip: sock6(&f.vip_addr, f.vip_port),
                    client: sock6(&f.client_addr, f.client_port),
                }
            }
            _ => Outcome::Passed {
                counter: PassReplyNoFlow.name(),
                message: format!("passed: no live flow holds the SNAT tuple {src} -> {dst}"),
            },
        });
    }

    // 2. The client direction of a live flow (unless its backend went down).
    let mut rebalanced = false;
    if let Some(f) = maps.flow6(&key)? {
        let up = maps
            .backend6(f.backend_id)?
            .is_some_and(|b| b.flags & BE_F_UP != 0);
        if up {
            return done(Outcome::Established {
                service_id: f.service_id,
                backend_id: f.backend_id,
                backend: sock6(&f.backend_addr, f.backend_port),
                snat: sock6(&f.snat_addr, f.snat_port),
            });
        }
        rebalanced = true;
    }

    // 3. The service (a TCP packet here is taken to be a SYN: only a SYN opens a flow).
    let Some(svc) = maps.service6(&skey)? else {
        return done(if rebalanced {
            dropped(
                DropNoBackend,
                format!("dropped: the flow's backend is down and {what} has no service now"),
            )
        } else if maps.is_vip6(&key.dst_addr)? {
            dropped(DropUnknownPort, format!("dropped: no service on {what}"))
        } else {
            Outcome::Passed {
                counter: PassNotVip.name(),
                message: format!("passed: {} is not a VIP", dst.ip()),
            }
        });
    };
    // 4. Martian sources (`ct6::martian`): multicast, unspecified or loopback, a SNAT address or
    //    a VIP.
    let s = src.ip();
    if s.is_multicast()
        || s.is_unspecified()
        || s.is_loopback()
        || cfg.snat_addrs[..n].contains(&key.src_addr)
        || maps.is_vip6(&key.src_addr)?
    {
        return done(dropped(
            DropMartian,
            format!("dropped: {s} cannot be a client's source"),
        ));
    }

    // 5. Maglev (the shared MAGLEV array, naming BACKENDS6 ids).
    let h = hash::flow_hash6(&key);
    let slot = hash::maglev_slot(h, svc.ring_size);
    let backend_id = maps.maglev(svc.ring_base + slot)?.unwrap_or(0);
    if backend_id == 0 {
        return done(dropped(
            DropNoBackend,
            format!("dropped: no backend ({what} slot {slot} is empty)"),
        ));
    }
    let Some(be) = maps.backend6(backend_id)?.filter(|b| b.addr != [0; 4]) else {
        return done(dropped(
            DropBadBackend,
            format!("dropped: slot {slot} of {what} names backend {backend_id}, which is gone"),
        ));
    };

    // 6. dnat keeps the client's tuple (the data path takes the first free of a few slots).
    if svc.flags & vmlb_common::SVC_F_DNAT != 0 {
        return done(Outcome::New {
            service_id: svc.id,
            rebalanced,
            flow_hash: h,
            slot,
            backend_id,
            backend: sock6(&be.addr, be.port),
            snat: sock6(&key.src_addr, key.src_port),
            snat_attempt: 0,
        });
    }
    // 7. The SNAT tuple: the first candidate whose slot is free and past its TIME_WAIT hold.
    let pick = hash::snat_pick(h, svc.snat_count);
    let now = maps.now();
    for attempt in 0..SNAT_RETRIES {
        let a = hash::snat_addr_index(pick, attempt, svc.snat_count) as usize;
        let snat = svc.snat_addrs[a & (MAX_SNAT_PER_SERVICE - 1)];
        let port = hash::snat_port(h, attempt, svc.port_min, svc.port_range);
        let idx = hash::tuple_slot6(
            &be.addr,
            &snat,
            be.port,
            port.to_be(),
            key.proto,
            cfg.slot_count,
        );
        let free = maps
            .slot6(idx)?
            .is_some_and(|f| f.state() == st::FREE && (now.wrapping_sub(f.stamp) as i32) >= 0);
        if free {
            return done(Outcome::New {
                service_id: svc.id,
                rebalanced,
                flow_hash: h,
                slot,
                backend_id,
                backend: sock6(&be.addr, be.port),
                snat: sock6(&snat, port.to_be()),
                snat_attempt: attempt,
            });
        }
    }
    done(Outcome::New {
        service_id: svc.id,
        rebalanced,
        flow_hash: h,
        slot,
        backend_id,
        backend: sock6(&be.addr, be.port),
        snat: sock6(&svc.snat_addrs[0], 0),
        snat_attempt: SNAT_RETRIES,
    })
}

pub fn simulate(args: SimulateArgs) -> anyhow::Result<()> {
    simulate_to(&args, &mut std::io::stdout().lock())
}

/// `simulate`, writing to `out` (tests capture it).
pub fn simulate_to(args: &SimulateArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let (_, maps) = args.pins.open_maps()?;
    let p = predict(&maps, args.proto, args.src, args.dst)?;
    if !args.output.is_table() {
        return write_doc(out, args.output, &p);
    }
    write!(out, "{}", describe(&p))?;
    Ok(())
}

/// The human-readable report.
pub fn describe(p: &Prediction) -> String {
    let pkt = format!("{} {} -> {}", p.proto, p.src, p.dst);
    match &p.outcome {
        Outcome::Established {
            service_id,
            backend_id,
            backend,
            snat,
        } => format!(
            "established: {pkt}\n  service {service_id}, backend {backend_id} {backend}\n  \
             leaves as {snat} -> {backend}\n"
        ),
        Outcome::New {
            service_id,
            rebalanced,
            flow_hash,
            slot,
            backend_id,
            backend,
            snat,
            snat_attempt,
        } => format!(
            "{}: {pkt}\n  service {service_id}, flow hash {flow_hash:#010x}, Maglev slot {slot}\n  \
             backend {backend_id} {backend}, {}\n",
            if *snat == p.src {
                format!("dnat (the client's address is kept)\n  leaves as {snat} -> {backend}")
            } else if *snat_attempt < SNAT_RETRIES {
                format!("SNAT port candidate {snat_attempt}\n  leaves as {snat} -> {backend}")
            } else {
                format!(
                    "all {SNAT_RETRIES} hashed SNAT candidates are held: a random free tuple \
                     of the pool is tried ({SNAT_RANDOM_RETRIES} tries)"
                )
            },
            if *rebalanced {
                "new flow (rebalanced: its backend is down)"
            } else {
                "new flow"
            }
        ),
        Outcome::Reply {
            service_id,
            backend_id,
            vip,
            client,
        } => format!(
            "reply: {pkt}\n  service {service_id}, from backend {backend_id}\n  \
             leaves as {vip} -> {client}\n"
        ),
        Outcome::Dropped { counter, message } | Outcome::Passed { counter, message } => {
            format!("{message}\n  {pkt} (counter {counter})\n")
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use std::net::Ipv4Addr;

    use clap::Parser as _;
    use vmlb_common::{IPPROTO_TCP, SNAT_PORT_MIN};

    use super::*;
    use crate::cli::{Cli, Command};

    #[derive(Default)]
    struct Fake {
        flows: BTreeMap<FlowKey, Flow>,
        slots: BTreeMap<u32, Flow>,
        services: BTreeMap<ServiceKey, Service>,
        vips: Vec<u32>,
        maglev: Vec<u32>,
        backends: Vec<Backend>,
    }

    /// No IPv6 service (the IPv6 path has `Fake6`).
    impl PathMaps6 for Fake {
        fn flow6(&self, _: &FlowKey6) -> anyhow::Result<Option<Flow6>> {
            Ok(None)
        }
        fn slot6(&self, _: u32) -> anyhow::Result<Option<Flow6>> {
            Ok(None)
        }
        fn config6(&self) -> anyhow::Result<Config6> {
            Ok(Config6::default())
        }
        fn service6(&self, _: &ServiceKey6) -> anyhow::Result<Option<Service6>> {
            Ok(None)
        }
        fn is_vip6(&self, _: &Addr6) -> anyhow::Result<bool> {
            Ok(false)
        }
        fn backend6(&self, _: u32) -> anyhow::Result<Option<Backend6>> {
            Ok(None)
        }
    }

    impl PathMaps for Fake {
        fn flow(&self, key: &FlowKey) -> anyhow::Result<Option<Flow>> {
            Ok(self.flows.get(key).copied())
        }
        fn slot(&self, index: u32) -> anyhow::Result<Option<Flow>> {
            Ok((index < SLOTS).then(|| self.slots.get(&index).copied().unwrap_or_default()))
        }
        fn config(&self) -> anyhow::Result<Config> {
            let mut c = Config {
                slot_count: SLOTS,
                snat_count: 1,
                ..Default::default()
            };
            c.snat_addrs[0] = n("10.0.0.9");
            Ok(c)
        }
        fn now(&self) -> u32 {
            NOW
        }
        fn service(&self, key: &ServiceKey) -> anyhow::Result<Option<Service>> {
            Ok(self.services.get(key).copied())
        }
        fn is_vip(&self, addr: u32) -> anyhow::Result<bool> {
            Ok(self.vips.contains(&addr))
        }
        fn maglev(&self, index: u32) -> anyhow::Result<Option<u32>> {
            Ok(self.maglev.get(index as usize).copied())
        }
        fn backend(&self, id: u32) -> anyhow::Result<Option<Backend>> {
            Ok(self.backends.get(id as usize).copied())
        }
    }

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }
    fn n(s: &str) -> u32 {
        u32::from_ne_bytes(s.parse::<Ipv4Addr>().unwrap().octets())
    }

    const RING: u32 = 7;
    const SLOTS: u32 = 4096;
    const RANGE: u16 = 31741;
    const NOW: u32 = 1_000_000;

    /// VIP 10.0.0.1:80/tcp, SNAT 10.0.0.9, ring of 7 at base 3 alternating backends 1 and 2.
    fn fake() -> Fake {
        let key = ServiceKey {
            vip: n("10.0.0.1"),
            port: 80u16.to_be(),
            proto: IPPROTO_TCP,
            _pad: 0,
        };
        let svc = Service {
            id: 1,
            flags: 1,
            snat_addrs: [n("10.0.0.9"), 0, 0, 0],
            snat_count: 1,
            ring_base: 3,
            ring_size: RING,
            port_min: SNAT_PORT_MIN,
            port_range: RANGE,
        };
        let be = |last: &str| Backend {
            addr: n(last),
            port: 8080u16.to_be(),
            _pad: 0,
            flags: BE_F_UP,
            service_id: 1,
        };
        let mut maglev = vec![0; 3];
        maglev.extend((0..RING).map(|i| 1 + i % 2));
        Fake {
            services: [(key, svc)].into(),
            vips: vec![key.vip],
            maglev,
            backends: vec![Backend::default(), be("10.0.1.1"), be("10.0.1.2")],
            ..Default::default()
        }
    }

    fn new_flow(p: &Prediction) -> (u32, SocketAddr, u32) {
        match p.outcome {
            Outcome::New {
                backend_id,
                snat,
                snat_attempt,
                ..
            } => (backend_id, snat, snat_attempt),
            ref o => panic!("not a new flow: {o:?}"),
        }
    }

    #[test]
    fn new_flow_follows_the_hash_and_skips_held_snat_tuples() {
        let mut f = fake();
        let (src, dst) = (a("192.0.2.1:40000"), a("10.0.0.1:80"));
        let p = predict(&f, Proto::Tcp, src, dst).unwrap();
        let (id, snat, attempt) = new_flow(&p);
        let key = FlowKey {
            src_addr: n("192.0.2.1"),
            dst_addr: n("10.0.0.1"),
            src_port: 40000u16.to_be(),
            dst_port: 80u16.to_be(),
            proto: IPPROTO_TCP,
            _pad0: 0,
            _pad1: 0,
        };
        let h = hash::flow_hash(&key);
        let port = |attempt| hash::snat_port(h, attempt, SNAT_PORT_MIN, RANGE);
        assert_eq!(id, 1 + hash::maglev_slot(h, RING) % 2);
        assert_eq!((snat, attempt), (a(&format!("10.0.0.9:{}", port(0))), 0));

        // Hold the first two candidates' slots: the third is chosen; hold all: exhausted.
        let be = f.backends[id as usize];
        let slot_of = |attempt| {
            hash::tuple_slot(
                be.addr,
                n("10.0.0.9"),
                be.port,
                port(attempt).to_be(),
                6,
                SLOTS,
            )
        };
        let held = |attempt| Flow {
            ctl: st::ESTABLISHED as u64,
            backend_addr: be.addr,
            snat_addr: n("10.0.0.9"),
            backend_port: be.port,
            snat_port: port(attempt).to_be(),
            proto: IPPROTO_TCP,
            service_id: 1,
            backend_id: id,
            client_addr: n("192.0.2.77"),
            client_port: 1234u16.to_be(),
            vip_addr: n("10.0.0.1"),
            vip_port: 80u16.to_be(),
            ..Default::default()
        };
        for i in 0..2 {
            f.slots.insert(slot_of(i), held(i));
        }
        let (_, snat, attempt) = new_flow(&predict(&f, Proto::Tcp, src, dst).unwrap());
        assert_eq!((snat.port(), attempt), (port(2), 2));
        // A closed flow's tuple is held until its stamp passes, like a live one.
        for i in 0..SNAT_RETRIES {
            let mut fl = held(i);
            if i % 2 == 0 {
                fl.ctl = st::FREE as u64;
                fl.stamp = NOW + 100;
            }
            f.slots.insert(slot_of(i), fl);
        }
        let p = predict(&f, Proto::Tcp, src, dst).unwrap();
        assert_eq!(new_flow(&p).2, SNAT_RETRIES, "then random tuples: {p:?}");

        // The client's own index entry makes it established; a down backend rebalances it.
        f.flows.insert(key, held(1));
        let p = predict(&f, Proto::Tcp, src, dst).unwrap();
        assert_eq!(
            p.outcome,
            Outcome::Established {
                service_id: 1,
                backend_id: id,
                backend: sock(be.addr, be.port).into(),
                snat: sock(n("10.0.0.9"), port(1).to_be()).into(),
            }
        );
        f.backends[id as usize].flags = 0;
        let p = predict(&f, Proto::Tcp, src, dst).unwrap();
        assert!(
            matches!(
                p.outcome,
                Outcome::New {
                    rebalanced: true,
                    snat_attempt: SNAT_RETRIES,
                    ..
                }
            ),
            "rebalanced, then the same held tuples: {p:?}"
        );
        // A backend's packet to a held tuple is a reply; to a free one it passes.
        let p = predict(
            &f,
            Proto::Tcp,
            sock(be.addr, be.port).into(),
            a(&format!("10.0.0.9:{}", port(1))),
        )
        .unwrap();
        assert!(matches!(p.outcome, Outcome::Reply { .. }), "{p:?}");
        let p = predict(
            &f,
            Proto::Tcp,
            sock(be.addr, be.port).into(),
            a(&format!("10.0.0.9:{}", port(0))),
        )
        .unwrap();
        assert!(
            matches!(
                p.outcome,
                Outcome::Passed {
                    counter: "pass_reply_no_flow",
                    ..
                }
            ),
            "{p:?}"
        );
    }

    #[test]
    fn no_service_no_backend_not_a_vip() {
        let mut f = fake();
        let src = a("192.0.2.1:40000");
        let p = predict(&f, Proto::Udp, src, a("10.0.0.1:80")).unwrap();
        assert_eq!(
            p.outcome,
            Outcome::Dropped {
                counter: "drop_unknown_port",
                message: "dropped: no service on 10.0.0.1:80/udp".into()
            }
        );
        let p = predict(&f, Proto::Tcp, src, a("10.0.0.2:80")).unwrap();
        assert!(
            matches!(
                p.outcome,
                Outcome::Passed {
                    counter: "pass_not_vip",
                    ..
                }
            ),
            "{p:?}"
        );
        f.maglev.iter_mut().for_each(|s| *s = 0);
        let p = predict(&f, Proto::Tcp, src, a("10.0.0.1:80")).unwrap();
        match p.outcome {
            Outcome::Dropped { counter, message } => {
                assert_eq!(counter, "drop_no_backend");
                assert!(message.starts_with("dropped: no backend"), "{message}");
            }
            o => panic!("{o:?}"),
        }
    }

    #[test]
    fn json_shape_is_tagged_by_verdict() {
        let p = predict(&fake(), Proto::Tcp, a("192.0.2.1:1"), a("10.0.0.1:80")).unwrap();
        let v = serde_json::to_value(&p).unwrap();
        assert_eq!(v["verdict"], "new");
        assert_eq!(v["src"], "192.0.2.1:1");
        assert_eq!(v["proto"], "tcp");
        for k in [
            "service_id",
            "rebalanced",
            "flow_hash",
            "slot",
            "backend_id",
            "backend",
            "snat",
            "snat_attempt",
        ] {
            assert!(v.get(k).is_some(), "{k} missing in {v}");
        }
    }

    #[test]
    fn bad_arguments_are_named() {
        let parse = |args: &[&str]| {
            let mut argv = vec!["vmlb", "simulate"];
            argv.extend_from_slice(args);
            Cli::try_parse_from(argv).map(|c| match c.command {
                Command::Simulate(s) => s,
                o => panic!("{o:?}"),
            })
        };
        let ok = parse(&[
            "--proto",
            "udp",
            "--src",
            "1.2.3.4:5",
            "--dst",
            "10.0.0.1:53",
        ])
        .unwrap();
        assert_eq!(
            (ok.proto, ok.src.port(), ok.dst.port()),
            (Proto::Udp, 5, 53)
        );
        let e = parse(&["--proto", "tcp", "--src", "1.2.3.4", "--dst", "10.0.0.1:80"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--src") && e.contains("expected IPv4:PORT or [IPv6]:PORT, got \"1.2.3.4\""),
            "{e}"
        );
        let e = parse(&[
            "--proto",
            "icmp",
            "--src",
            "1.2.3.4:1",
            "--dst",
            "10.0.0.1:80",
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("expected tcp or udp"), "{e}");
    }

    /// IPv6 maps: VIP6 [fd00::128]:80/tcp, SNAT fd00::9, the same ring of backends 1 and 2
    /// (fd00::1:1, fd00::1:2); IPv4 lookups come from the IPv4 fake (nothing on IPv6 there).
    struct Fake6 {
        v4: Fake,
        flows: BTreeMap<FlowKey6, Flow6>,
        slots: BTreeMap<u32, Flow6>,
        service: (ServiceKey6, Service6),
        backends: Vec<Backend6>,
    }

    fn n6(s: &str) -> Addr6 {
        addr6(s.parse::<std::net::Ipv6Addr>().unwrap().octets())
    }

    impl PathMaps for Fake6 {
        fn flow(&self, key: &FlowKey) -> anyhow::Result<Option<Flow>> {
            self.v4.flow(key)
        }
        fn slot(&self, index: u32) -> anyhow::Result<Option<Flow>> {
            self.v4.slot(index)
        }
        fn config(&self) -> anyhow::Result<Config> {
            self.v4.config()
        }
        fn now(&self) -> u32 {
            NOW
        }
        fn service(&self, key: &ServiceKey) -> anyhow::Result<Option<Service>> {
            self.v4.service(key)
        }
        fn is_vip(&self, addr: u32) -> anyhow::Result<bool> {
            self.v4.is_vip(addr)
        }
        fn maglev(&self, index: u32) -> anyhow::Result<Option<u32>> {
            self.v4.maglev(index)
        }
        fn backend(&self, id: u32) -> anyhow::Result<Option<Backend>> {
            self.v4.backend(id)
        }
    }

    impl PathMaps6 for Fake6 {
        fn flow6(&self, key: &FlowKey6) -> anyhow::Result<Option<Flow6>> {
            Ok(self.flows.get(key).copied())
        }
        fn slot6(&self, index: u32) -> anyhow::Result<Option<Flow6>> {
            Ok((index < SLOTS).then(|| self.slots.get(&index).copied().unwrap_or_default()))
        }
        fn config6(&self) -> anyhow::Result<Config6> {
            let mut c = Config6 {
                slot_count: SLOTS,
                snat_count: 1,
                ..Default::default()
            };
            c.snat_addrs[0] = n6("fd00::9");
            Ok(c)
        }
        fn service6(&self, key: &ServiceKey6) -> anyhow::Result<Option<Service6>> {
            Ok((*key == self.service.0).then_some(self.service.1))
        }
        fn is_vip6(&self, addr: &Addr6) -> anyhow::Result<bool> {
            Ok(*addr == self.service.0.vip)
        }
        fn backend6(&self, id: u32) -> anyhow::Result<Option<Backend6>> {
            Ok(self.backends.get(id as usize).copied())
        }
    }

    fn fake6() -> Fake6 {
        let key = ServiceKey6 {
            vip: n6("fd00::128"),
            port: 80u16.to_be(),
            proto: IPPROTO_TCP,
            _pad: 0,
        };
        let mut snat_addrs = [[0; 4]; MAX_SNAT_PER_SERVICE];
        snat_addrs[0] = n6("fd00::9");
        let svc = Service6 {
            id: 5,
            flags: 1,
            snat_addrs,
            snat_count: 1,
            ring_base: 3,
            ring_size: RING,
            port_min: SNAT_PORT_MIN,
            port_range: RANGE,
        };
        let be = |a: &str| Backend6 {
            addr: n6(a),
            port: 8080u16.to_be(),
            _pad: 0,
            flags: BE_F_UP,
            service_id: 5,
        };
        let mut v4 = fake();
        v4.services.clear();
        v4.vips.clear();
        Fake6 {
            v4,
            flows: BTreeMap::new(),
            slots: BTreeMap::new(),
            service: (key, svc),
            backends: vec![Backend6::default(), be("fd00::1:1"), be("fd00::1:2")],
        }
    }

    #[test]
    fn ipv6_new_flow_established_reply_and_refusals() {
        let mut f = fake6();
        let (src, dst) = (a("[fd00::50]:40000"), a("[fd00::128]:80"));
        let key = FlowKey6 {
            src_addr: n6("fd00::50"),
            dst_addr: n6("fd00::128"),
            src_port: 40000u16.to_be(),
            dst_port: 80u16.to_be(),
            proto: IPPROTO_TCP,
            _pad0: 0,
            _pad1: 0,
        };
        let h = hash::flow_hash6(&key);
        let port = |attempt| hash::snat_port(h, attempt, SNAT_PORT_MIN, RANGE);
        let id = 1 + hash::maglev_slot(h, RING) % 2;
        let be = f.backends[id as usize];
        let backend = a(&format!("[fd00::1:{id}]:8080"));
        let p = predict(&f, Proto::Tcp, src, dst).unwrap();
        assert_eq!(
            p.outcome,
            Outcome::New {
                service_id: 5,
                rebalanced: false,
                flow_hash: h,
                slot: hash::maglev_slot(h, RING),
                backend_id: id,
                backend,
                snat: a(&format!("[fd00::9]:{}", port(0))),
                snat_attempt: 0,
            }
        );
        assert!(describe(&p).contains(&format!("leaves as [fd00::9]:{}", port(0))));

        // The first candidate's tuple held in FLOW_SLOTS6 (tuple_slot6): the second is chosen.
        let slot0 = hash::tuple_slot6(
            &be.addr,
            &n6("fd00::9"),
            be.port,
            port(0).to_be(),
            IPPROTO_TCP,
            SLOTS,
        );
        let held = Flow6 {
            ctl: st::ESTABLISHED as u64,
            service_id: 5,
            backend_id: id,
            backend_addr: be.addr,
            snat_addr: n6("fd00::9"),
            backend_port: be.port,
            snat_port: port(0).to_be(),
            client_addr: n6("fd00::77"),
            vip_addr: n6("fd00::128"),
            client_port: 1234u16.to_be(),
            vip_port: 80u16.to_be(),
            proto: IPPROTO_TCP,
            ..Default::default()
        };
        f.slots.insert(slot0, held);
        let (_, snat, attempt) = new_flow(&predict(&f, Proto::Tcp, src, dst).unwrap());
        assert_eq!((snat, attempt), (a(&format!("[fd00::9]:{}", port(1))), 1));

        // The held tuple answers a reply from the backend; the client's index entry makes it
        // established.
        let p = predict(
            &f,
            Proto::Tcp,
            backend,
            a(&format!("[fd00::9]:{}", port(0))),
        )
        .unwrap();
        assert_eq!(
            p.outcome,
            Outcome::Reply {
                service_id: 5,
                backend_id: id,
                vip: a("[fd00::128]:80"),
                client: a("[fd00::77]:1234"),
            }
        );
        let p = predict(
            &f,
            Proto::Tcp,
            backend,
            a(&format!("[fd00::9]:{}", port(2))),
        )
        .unwrap();
        assert!(
            matches!(
                p.outcome,
                Outcome::Passed {
                    counter: "pass_reply_no_flow",
                    ..
                }
            ),
            "{p:?}"
        );
        f.flows.insert(key, held);
        let p = predict(&f, Proto::Tcp, src, dst).unwrap();
        assert!(matches!(p.outcome, Outcome::Established { .. }), "{p:?}");

        let verdict =
            |src: &str, dst: &str, proto| match predict(&f, proto, a(src), a(dst)).unwrap().outcome
            {
                Outcome::Dropped { counter, .. } => format!("dropped {counter}"),
                Outcome::Passed { counter, .. } => format!("passed {counter}"),
                o => format!("{o:?}"),
            };
        assert_eq!(
            verdict("[fd00::50]:1", "[fd00::128]:80", Proto::Udp),
            "dropped drop_unknown_port"
        );
        assert_eq!(
            verdict("[fd00::50]:1", "[fd00::129]:80", Proto::Tcp),
            "passed pass_not_vip"
        );
        assert_eq!(
            verdict("[fd00::128]:1", "[fd00::128]:80", Proto::Tcp),
            "dropped drop_martian"
        );
        assert_eq!(
            verdict("[ff02::1]:1", "[fd00::128]:80", Proto::Tcp),
            "dropped drop_martian"
        );
        let e = predict(&f, Proto::Tcp, a("10.0.0.5:1"), dst).unwrap_err();
        assert!(e.to_string().contains("different families"), "{e}");
        // The IPv4 path is untouched by the IPv6 maps.
        assert_eq!(
            verdict("192.0.2.1:1", "10.0.0.1:80", Proto::Tcp),
            "passed pass_not_vip"
        );
    }
}
