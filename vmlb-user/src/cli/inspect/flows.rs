//! `inspect flows` and `inspect nat`: every live flow of both families (`FLOW_SLOTS` and
//! `FLOW_SLOTS6`), seen from the client side (`flows`) or from its SNAT tuple (`nat`), filtered
//! and limited. Everything that knows the layout of `Flow` and `Flow6` on the CLI side is in
//! this file (`Tuple::of`, `Tuple::of6`), so a change of the flow maps touches only this file.

use std::{
    io::Write,
    net::{IpAddr, SocketAddr},
};

use anyhow::Context as _;
use serde::Serialize;
use vmlb_common::{flow_state, Flow, Flow6};

use super::{ip6, View};
use crate::{
    addr::{proto_name, sock},
    cli::output::{table, write_doc, Output},
};

/// Which entries to show.
#[derive(clap::Args, Debug, Clone, PartialEq, Eq, Default)]
pub struct FlowArgs {
    /// Only entries of this service: VIP:PORT/PROTO or its name.
    #[arg(long, value_name = "SERVICE")]
    pub service: Option<String>,
    /// Only entries of this backend: IP or IP:PORT.
    #[arg(long, value_name = "IP[:PORT]")]
    pub backend: Option<String>,
    /// Only entries with this address anywhere in them (client, VIP, SNAT or backend).
    #[arg(long, value_name = "IP")]
    pub addr: Option<IpAddr>,
    /// Show at most this many entries (sorted; 0: all). The total is always reported.
    #[arg(long, default_value_t = 1000)]
    pub limit: usize,
}

/// A client's conntrack entry: `client -> vip` is rewritten to `snat -> backend`.
#[derive(Serialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct FlowRow {
    pub proto: String,
    pub client: SocketAddr,
    pub vip: SocketAddr,
    pub snat: SocketAddr,
    pub backend: SocketAddr,
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
    pub backend: SocketAddr,
    pub snat: SocketAddr,
    pub vip: SocketAddr,
    pub client: SocketAddr,
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
    [a, b, c, d]: [SocketAddr; 4],
    backend_id: u32,
    service: &str,
    state: &str,
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
        state.to_string(),
    ]
}

impl ConntrackRow for FlowRow {
    fn cells(&self) -> Vec<String> {
        let t = [self.client, self.vip, self.snat, self.backend];
        conntrack_cells(&self.proto, t, self.backend_id, &self.service, &self.state)
    }
}

impl ConntrackRow for NatRow {
    fn cells(&self) -> Vec<String> {
        let t = [self.backend, self.snat, self.vip, self.client];
        conntrack_cells(&self.proto, t, self.backend_id, &self.service, &self.state)
    }
}

/// What the filters look at, for both row kinds.
trait Filterable {
    fn service_id(&self) -> u32;
    fn backend(&self) -> SocketAddr;
    fn addrs(&self) -> [SocketAddr; 4];
}

impl Filterable for FlowRow {
    fn service_id(&self) -> u32 {
        self.service_id
    }
    fn backend(&self) -> SocketAddr {
        self.backend
    }
    fn addrs(&self) -> [SocketAddr; 4] {
        [self.client, self.vip, self.snat, self.backend]
    }
}

impl Filterable for NatRow {
    fn service_id(&self) -> u32 {
        self.service_id
    }
    fn backend(&self) -> SocketAddr {
        self.backend
    }
    fn addrs(&self) -> [SocketAddr; 4] {
        [self.backend, self.snat, self.vip, self.client]
    }
}

/// A parsed `--backend`: an address, maybe with a port.
fn parse_backend(s: &str) -> anyhow::Result<(IpAddr, Option<u16>)> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok((a.ip(), Some(a.port())));
    }
    let ip = s
        .parse()
        .with_context(|| format!("--backend {s:?}: expected IP or IP:PORT ([IPv6]:PORT)"))?;
    Ok((ip, None))
}

/// The rows' filter: all given conditions hold.
struct Filter {
    service_id: Option<u32>,
    backend: Option<(IpAddr, Option<u16>)>,
    addr: Option<IpAddr>,
}

impl Filter {
    fn keeps(&self, r: &impl Filterable) -> bool {
        self.service_id.is_none_or(|id| r.service_id() == id)
            && self.backend.is_none_or(|(ip, port)| {
                r.backend().ip() == ip && port.is_none_or(|p| r.backend().port() == p)
            })
            && self
                .addr
                .is_none_or(|a| r.addrs().iter().any(|s| s.ip() == a))
    }
}

fn state_name(s: u8) -> &'static str {
    match s {
        flow_state::SYN_SENT => "syn_sent",
        flow_state::ESTABLISHED => "established",
        flow_state::CLOSING => "closing",
        flow_state::UDP => "udp",
        _ => "free",
    }
}

/// One live flow of either family, as both views show it.
struct Tuple {
    proto: u8,
    client: SocketAddr,
    vip: SocketAddr,
    snat: SocketAddr,
    backend: SocketAddr,
    backend_id: u32,
    service_id: u32,
    state: u8,
}

impl Tuple {
    fn of(e: &Flow) -> Self {
        Self {
            proto: e.proto,
            client: sock(e.client_addr, e.client_port).into(),
            vip: sock(e.vip_addr, e.vip_port).into(),
            snat: sock(e.snat_addr, e.snat_port).into(),
            backend: sock(e.backend_addr, e.backend_port).into(),
            backend_id: e.backend_id,
            service_id: e.service_id,
            state: e.state(),
        }
    }

    fn of6(e: &Flow6) -> Self {
        let s = |a, port: u16| SocketAddr::new(ip6(a), u16::from_be(port));
        Self {
            proto: e.proto,
            client: s(&e.client_addr, e.client_port),
            vip: s(&e.vip_addr, e.vip_port),
            snat: s(&e.snat_addr, e.snat_port),
            backend: s(&e.backend_addr, e.backend_port),
            backend_id: e.backend_id,
            service_id: e.service_id,
            state: e.state(),
        }
    }
}

/// Both views' rows from the live flows, with service labels.
fn rows(entries: &[Tuple], label: &dyn Fn(u32) -> String) -> (Vec<FlowRow>, Vec<NatRow>) {
    let (mut flows, mut nat) = (Vec::new(), Vec::new());
    for e in entries {
        let (client, vip, snat, backend) = (e.client, e.vip, e.snat, e.backend);
        let state = state_name(e.state).to_string();
        flows.push(FlowRow {
            proto: proto_name(e.proto),
            client,
            vip,
            snat,
            backend,
            backend_id: e.backend_id,
            service_id: e.service_id,
            service: label(e.service_id),
            state: state.clone(),
        });
        nat.push(NatRow {
            proto: proto_name(e.proto),
            backend,
            snat,
            vip,
            client,
            backend_id: e.backend_id,
            service_id: e.service_id,
            service: label(e.service_id),
            state,
        });
    }
    (flows, nat)
}

/// The JSON/YAML document: the shown entries under `key`, and how many matched in all.
#[derive(Serialize)]
struct Doc<'a, R> {
    iface: &'a str,
    #[serde(flatten)]
    rows: std::collections::BTreeMap<&'a str, &'a [R]>,
    /// Entries that matched the filters (`rows` holds at most `--limit` of them).
    matched: usize,
}

impl View {
    /// `nat == false`: client -> VIP entries (`flows`); else backend -> SNAT entries (`nat`).
    pub(super) fn flows(
        &self,
        args: &FlowArgs,
        nat: bool,
        fmt: Output,
        out: &mut dyn Write,
    ) -> anyhow::Result<()> {
        let filter = Filter {
            service_id: match &args.service {
                Some(s) => Some(self.find_service(s)?.id),
                None => None,
            },
            backend: args.backend.as_deref().map(parse_backend).transpose()?,
            addr: args.addr,
        };
        let labels = self.labels(&self.service_list()?);
        let label = |id: u32| {
            labels
                .get(&id)
                .cloned()
                .unwrap_or_else(|| format!("id {id}"))
        };
        let live: Vec<Tuple> = (self.maps.live_flows().iter().map(|(_, f)| Tuple::of(f)))
            .chain(self.maps.v6.live_flows().iter().map(|(_, f)| Tuple::of6(f)))
            .collect();
        let (flows, nats) = rows(&live, &label);
        if nat {
            let head = ["BACKEND", "SNAT", "VIP", "CLIENT"];
            self.conntrack_view(out, fmt, args.limit, "nat", head, nats, &filter)
        } else {
            let head = ["CLIENT", "VIP", "SNAT", "BACKEND"];
            self.conntrack_view(out, fmt, args.limit, "flows", head, flows, &filter)
        }
    }

    /// Both directions print alike: the tuple matched on the wire `a -> b`, the rewrite
    /// `c -> d`, then the backend id and the service.
    #[expect(
        clippy::too_many_arguments,
        reason = "one private helper for two callers"
    )]
    fn conntrack_view<R: ConntrackRow + Filterable>(
        &self,
        out: &mut dyn Write,
        fmt: Output,
        limit: usize,
        key: &str,
        [a, b, c, d]: [&str; 4],
        rows: Vec<R>,
        filter: &Filter,
    ) -> anyhow::Result<()> {
        let mut rows: Vec<R> = rows.into_iter().filter(|r| filter.keeps(r)).collect();
        rows.sort();
        let matched = rows.len();
        if limit > 0 {
            rows.truncate(limit);
        }
        if !fmt.is_table() {
            let doc = Doc {
                iface: &self.iface,
                rows: [(key, rows.as_slice())].into(),
                matched,
            };
            return write_doc(out, fmt, &doc);
        }
        let cells = rows.iter().map(ConntrackRow::cells).collect::<Vec<_>>();
        table(
            out,
            &["PROTO", a, "", b, "", c, "", d, "BE", "SERVICE", "STATE"],
            &cells,
        )?;
        if rows.len() < matched {
            writeln!(
                out,
                "({} of {matched} entries shown; --limit 0 shows all)",
                rows.len()
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(client: &str, backend: &str, service_id: u32) -> FlowRow {
        FlowRow {
            proto: "tcp".into(),
            client: client.parse().unwrap(),
            vip: "10.0.0.1:80".parse().unwrap(),
            snat: "10.0.0.9:2000".parse().unwrap(),
            backend: backend.parse().unwrap(),
            backend_id: 1,
            service_id,
            service: "web".into(),
            state: "established".into(),
        }
    }

    #[test]
    fn filters_combine() {
        let r = row("192.0.2.1:4000", "10.0.1.1:8080", 3);
        let f = |service_id, backend: Option<&str>, addr: Option<&str>| Filter {
            service_id,
            backend: backend.map(|b| parse_backend(b).unwrap()),
            addr: addr.map(|a| a.parse().unwrap()),
        };
        assert!(f(None, None, None).keeps(&r));
        assert!(f(Some(3), Some("10.0.1.1"), Some("192.0.2.1")).keeps(&r));
        assert!(f(None, Some("10.0.1.1:8080"), Some("10.0.0.9")).keeps(&r));
        assert!(!f(Some(4), None, None).keeps(&r));
        assert!(!f(None, Some("10.0.1.1:8081"), None).keeps(&r));
        assert!(!f(None, Some("10.0.1.2"), None).keeps(&r));
        assert!(!f(None, None, Some("192.0.2.2")).keeps(&r));
        assert!(parse_backend("10.0.1.1:x").is_err());

        let mut r6 = r.clone();
        r6.client = "[fd00::50]:4000".parse().unwrap();
        r6.backend = "[fd00::2]:8080".parse().unwrap();
        assert!(f(None, Some("fd00::2"), Some("fd00::50")).keeps(&r6));
        assert!(f(None, Some("[fd00::2]:8080"), None).keeps(&r6));
        assert!(!f(None, Some("[fd00::2]:8081"), None).keeps(&r6));
        assert!(!f(None, Some("10.0.1.1"), None).keeps(&r6));
    }
}
