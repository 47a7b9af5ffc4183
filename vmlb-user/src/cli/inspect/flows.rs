//! `inspect flows` and `inspect nat`: the conntrack map, one row per entry, filtered and
//! limited. Everything that knows the layout of `FlowKey`/`FlowEntry` on the CLI side is in
//! this file (`rows`), so a change of the flow map touches only this file.

use std::{
    io::Write,
    net::{Ipv4Addr, SocketAddrV4},
};

use anyhow::Context as _;
use serde::Serialize;
use vmlb_common::{FlowEntry, FlowKey, DIR_TO_BACKEND};

use super::View;
use crate::{
    addr::{proto_name, sock},
    cli::output::{table, write_doc, Output},
    observe::metrics::capped_entries,
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
    pub addr: Option<Ipv4Addr>,
    /// Show at most this many entries (sorted; 0: all). The total is always reported.
    #[arg(long, default_value_t = 1000)]
    pub limit: usize,
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

/// What the filters look at, for both row kinds.
trait Filterable {
    fn service_id(&self) -> u32;
    fn backend(&self) -> SocketAddrV4;
    fn addrs(&self) -> [SocketAddrV4; 4];
}

impl Filterable for FlowRow {
    fn service_id(&self) -> u32 {
        self.service_id
    }
    fn backend(&self) -> SocketAddrV4 {
        self.backend
    }
    fn addrs(&self) -> [SocketAddrV4; 4] {
        [self.client, self.vip, self.snat, self.backend]
    }
}

impl Filterable for NatRow {
    fn service_id(&self) -> u32 {
        self.service_id
    }
    fn backend(&self) -> SocketAddrV4 {
        self.backend
    }
    fn addrs(&self) -> [SocketAddrV4; 4] {
        [self.backend, self.snat, self.vip, self.client]
    }
}

/// A parsed `--backend`: an address, maybe with a port.
fn parse_backend(s: &str) -> anyhow::Result<(Ipv4Addr, Option<u16>)> {
    if let Ok(a) = s.parse::<SocketAddrV4>() {
        return Ok((*a.ip(), Some(a.port())));
    }
    let ip = s
        .parse()
        .with_context(|| format!("--backend {s:?}: expected IP or IP:PORT"))?;
    Ok((ip, None))
}

/// The rows' filter: all given conditions hold.
struct Filter {
    service_id: Option<u32>,
    backend: Option<(Ipv4Addr, Option<u16>)>,
    addr: Option<Ipv4Addr>,
}

impl Filter {
    fn keeps(&self, r: &impl Filterable) -> bool {
        self.service_id.is_none_or(|id| r.service_id() == id)
            && self.backend.is_none_or(|(ip, port)| {
                *r.backend().ip() == ip && port.is_none_or(|p| r.backend().port() == p)
            })
            && self
                .addr
                .is_none_or(|a| r.addrs().iter().any(|s| *s.ip() == a))
    }
}

/// The whole rows of one direction from the map entries, with service labels.
fn rows(
    entries: &[(FlowKey, FlowEntry)],
    label: &dyn Fn(u32) -> String,
) -> (Vec<FlowRow>, Vec<NatRow>) {
    let (mut flows, mut nat) = (Vec::new(), Vec::new());
    for (k, e) in entries {
        if e.dir == DIR_TO_BACKEND {
            flows.push(FlowRow {
                proto: proto_name(k.proto),
                client: sock(k.src_addr, k.src_port),
                vip: sock(k.dst_addr, k.dst_port),
                snat: sock(e.src_addr, e.src_port),
                backend: sock(e.dst_addr, e.dst_port),
                backend_id: e.backend_id,
                service_id: e.service_id,
                service: label(e.service_id),
            });
        } else {
            nat.push(NatRow {
                proto: proto_name(k.proto),
                backend: sock(k.src_addr, k.src_port),
                snat: sock(k.dst_addr, k.dst_port),
                vip: sock(e.src_addr, e.src_port),
                client: sock(e.dst_addr, e.dst_port),
                backend_id: e.backend_id,
                service_id: e.service_id,
                service: label(e.service_id),
            });
        }
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
                Some(s) => Some(self.find_service(s)?.1.id),
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
        let (flows, nats) = rows(&capped_entries(&self.maps.flows)?, &label);
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
            &["PROTO", a, "", b, "", c, "", d, "BE", "SERVICE"],
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
    }
}
