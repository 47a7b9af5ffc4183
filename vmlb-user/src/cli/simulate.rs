//! `vmlb simulate`: which backend and SNAT address:port the data path would choose for a client
//! packet, computed from the pinned maps with the program's own hash and probe sequence
//! (`vmlb_common::hash`), so the answer is exact, not a model of it. The one step it cannot
//! replay is the kernel's FIB lookup (an unresolved next hop makes the program pass the packet,
//! `pass_no_neigh`).
//!
//! `-o json` (or `-o yaml`) prints `Prediction`: `{"proto", "src", "dst", "verdict", ...}` where `verdict` is
//! one of
//! - `established`: `{"service_id", "backend_id", "backend", "snat"}` (FLOWS has the flow);
//! - `new`: `{"service_id", "rebalanced", "flow_hash", "slot", "backend_id", "backend", "snat",
//!   "snat_attempt"}` (`rebalanced`: the flow existed but its backend is down);
//! - `reply`: `{"service_id", "backend_id", "vip", "client"}` (src is a backend, dst a SNAT port);
//! - `dropped` / `passed`: `{"counter", "message"}` (`counter`: the data-path counter it bumps).

use std::{io::Write, net::SocketAddrV4};

use aya::maps::MapError;
use serde::Serialize;
use vmlb_common::{
    hash, Backend, FlowEntry, FlowKey, Service, ServiceKey, BE_F_UP, DIR_TO_BACKEND, SNAT_RETRIES,
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
    after_help = "Example:\n  vmlb simulate --proto tcp --src 10.10.1.50:40000 --dst 10.10.1.128:80"
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
    /// Source of the packet, IPv4:PORT (the client, or a backend to simulate a reply).
    #[arg(long, value_name = "IP:PORT", value_parser = parse_endpoint)]
    pub src: SocketAddrV4,
    /// Destination of the packet, IPv4:PORT (a VIP and service port).
    #[arg(long, value_name = "VIP:PORT", value_parser = parse_endpoint)]
    pub dst: SocketAddrV4,
}

fn parse_endpoint(s: &str) -> Result<SocketAddrV4, String> {
    s.parse()
        .map_err(|_| format!("expected IPv4:PORT, got {s:?}"))
}

fn parse_proto(s: &str) -> Result<Proto, String> {
    addr::parse_proto(s).ok_or_else(|| format!("expected tcp or udp, got {s:?}"))
}

/// The lookups the data path makes, so `predict` runs on the real maps or on a fake.
pub trait PathMaps {
    fn flow(&self, key: &FlowKey) -> anyhow::Result<Option<FlowEntry>>;
    fn service(&self, key: &ServiceKey) -> anyhow::Result<Option<Service>>;
    fn is_vip(&self, addr: u32) -> anyhow::Result<bool>;
    /// `MAGLEV[index]`, None outside the array.
    fn maglev(&self, index: u32) -> anyhow::Result<Option<u32>>;
    /// `BACKENDS[id]`, None outside the array.
    fn backend(&self, id: u32) -> anyhow::Result<Option<Backend>>;
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
    fn flow(&self, key: &FlowKey) -> anyhow::Result<Option<FlowEntry>> {
        found(self.flows.get(key, 0))
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

#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct Prediction {
    pub proto: String,
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    #[serde(flatten)]
    pub outcome: Outcome,
}

#[derive(Serialize, Clone, Debug, PartialEq)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Outcome {
    Established {
        service_id: u32,
        backend_id: u32,
        backend: SocketAddrV4,
        snat: SocketAddrV4,
    },
    New {
        service_id: u32,
        rebalanced: bool,
        flow_hash: u32,
        slot: u32,
        backend_id: u32,
        backend: SocketAddrV4,
        snat: SocketAddrV4,
        snat_attempt: u32,
    },
    Reply {
        service_id: u32,
        backend_id: u32,
        vip: SocketAddrV4,
        client: SocketAddrV4,
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

/// What the data path does with a packet `src -> dst` (mirrors vmlb-ebpf's `try_vmlb` and
/// `new_flow` step by step; keep them in sync).
pub fn predict(
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
            src,
            dst,
            outcome,
        })
    };

    // 1. Conntrack: an established flow (unless its backend went down) or a reply.
    let mut rebalanced = false;
    if let Some(e) = maps.flow(&key)? {
        if e.dir != DIR_TO_BACKEND {
            return done(Outcome::Reply {
                service_id: e.service_id,
                backend_id: e.backend_id,
                vip: sock(e.src_addr, e.src_port),
                client: sock(e.dst_addr, e.dst_port),
            });
        }
        let up = maps
            .backend(e.backend_id)?
            .is_some_and(|b| b.flags & BE_F_UP != 0);
        if up {
            return done(Outcome::Established {
                service_id: e.service_id,
                backend_id: e.backend_id,
                backend: sock(e.dst_addr, e.dst_port),
                snat: sock(e.src_addr, e.src_port),
            });
        }
        rebalanced = true;
    }

    // 2. The service.
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

    // 3. Maglev.
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

    // 4. The SNAT port: the first candidate whose reply entry does not exist yet.
    for attempt in 0..SNAT_RETRIES {
        let port = hash::snat_port(h, attempt);
        let reply = FlowKey {
            src_addr: be.addr,
            dst_addr: svc.snat_addr,
            src_port: be.port,
            dst_port: port.to_be(),
            proto: key.proto,
            _pad0: 0,
            _pad1: 0,
        };
        if maps.flow(&reply)?.is_none() {
            return done(Outcome::New {
                service_id: svc.id,
                rebalanced,
                flow_hash: h,
                slot,
                backend_id,
                backend: sock(be.addr, be.port),
                snat: sock(svc.snat_addr, port.to_be()),
                snat_attempt: attempt,
            });
        }
    }
    done(dropped(
        DropSnatExhausted,
        format!(
            "dropped: SNAT ports exhausted (all {SNAT_RETRIES} candidates towards backend {} are \
             in use)",
            sock(be.addr, be.port)
        ),
    ))
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
             backend {backend_id} {backend}, SNAT port candidate {snat_attempt}\n  \
             leaves as {snat} -> {backend}\n",
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
    use vmlb_common::{DIR_TO_CLIENT, IPPROTO_TCP};

    use super::*;
    use crate::cli::{Cli, Command};

    #[derive(Default)]
    struct Fake {
        flows: BTreeMap<FlowKey, FlowEntry>,
        services: BTreeMap<ServiceKey, Service>,
        vips: Vec<u32>,
        maglev: Vec<u32>,
        backends: Vec<Backend>,
    }

    impl PathMaps for Fake {
        fn flow(&self, key: &FlowKey) -> anyhow::Result<Option<FlowEntry>> {
            Ok(self.flows.get(key).copied())
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

    fn a(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }
    fn n(s: &str) -> u32 {
        u32::from_ne_bytes(s.parse::<Ipv4Addr>().unwrap().octets())
    }

    const RING: u32 = 7;

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
            snat_addr: n("10.0.0.9"),
            ring_base: 3,
            ring_size: RING,
            _pad: 0,
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

    fn new_flow(p: &Prediction) -> (u32, SocketAddrV4, u32) {
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
    fn new_flow_follows_the_hash_and_skips_taken_snat_ports() {
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
        assert_eq!(id, 1 + hash::maglev_slot(h, RING) % 2);
        assert_eq!(
            (snat, attempt),
            (a(&format!("10.0.0.9:{}", hash::snat_port(h, 0))), 0)
        );

        // Take the first two candidates: the third is chosen; take all: exhausted.
        let be = f.backends[id as usize];
        let reply = |attempt| FlowKey {
            src_addr: be.addr,
            dst_addr: n("10.0.0.9"),
            src_port: be.port,
            dst_port: hash::snat_port(h, attempt).to_be(),
            proto: IPPROTO_TCP,
            _pad0: 0,
            _pad1: 0,
        };
        let taken = FlowEntry {
            service_id: 1,
            backend_id: id,
            dir: DIR_TO_CLIENT,
            ..Default::default()
        };
        for i in 0..2 {
            f.flows.insert(reply(i), taken);
        }
        let (_, snat, attempt) = new_flow(&predict(&f, Proto::Tcp, src, dst).unwrap());
        assert_eq!((snat.port(), attempt), (hash::snat_port(h, 2), 2));
        for i in 0..SNAT_RETRIES {
            f.flows.insert(reply(i), taken);
        }
        let p = predict(&f, Proto::Tcp, src, dst).unwrap();
        assert!(
            matches!(
                p.outcome,
                Outcome::Dropped {
                    counter: "drop_snat_exhausted",
                    ..
                }
            ),
            "{p:?}"
        );

        // The client's own entry makes it established; a down backend rebalances it.
        let est = FlowEntry {
            src_addr: n("10.0.0.9"),
            dst_addr: be.addr,
            src_port: 2000u16.to_be(),
            dst_port: be.port,
            dir: DIR_TO_BACKEND,
            ..taken
        };
        f.flows.insert(key, est);
        let p = predict(&f, Proto::Tcp, src, dst).unwrap();
        assert_eq!(
            p.outcome,
            Outcome::Established {
                service_id: 1,
                backend_id: id,
                backend: sock(be.addr, be.port),
                snat: a("10.0.0.9:2000"),
            }
        );
        f.backends[id as usize].flags = 0;
        let p = predict(&f, Proto::Tcp, src, dst).unwrap();
        assert!(
            matches!(
                p.outcome,
                Outcome::Dropped {
                    counter: "drop_snat_exhausted",
                    ..
                }
            ),
            "rebalanced, then the same exhausted ports: {p:?}"
        );
        // And the reply entry of a flow is recognised as a reply.
        let r = reply(0);
        let p = predict(
            &f,
            Proto::Tcp,
            sock(be.addr, be.port),
            sock(r.dst_addr, r.dst_port),
        )
        .unwrap();
        assert!(matches!(p.outcome, Outcome::Reply { .. }), "{p:?}");
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
            e.contains("--src") && e.contains("expected IPv4:PORT, got \"1.2.3.4\""),
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
}
