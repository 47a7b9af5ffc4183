//! A ServiceEntry document -> its services, every error with file, line and field path.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    path::Path,
    time::Duration,
};

use vmlb_common::{
    maglev::{DEFAULT_RING_SIZE, RING_SIZES},
    MAX_BACKENDS, MAX_SERVICES, MAX_SNAT_PER_SERVICE, SNAT_PORT_MAX, SNAT_PORT_MIN,
};

use super::{
    yaml::{self, Kind, Node, NULL},
    ConfigError,
};
use crate::model::{
    BackendSpec, ConfiguredService, HealthKind, HealthSpec, Mode, NodeConfig, Proto, ServiceSpec,
};

/// The ServiceEntry API versions read (v1alpha3 is the same schema, still served by Istio).
pub const API_VERSIONS: &[&str] = &[
    "networking.istio.io/v1",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1alpha3",
];

const SNAT: &str = "vmlb.io/snat-address";
const SNAT_PORTS: &str = "vmlb.io/snat-ports";
const MODE: &str = "vmlb.io/mode";
const MAGLEV_SIZE: &str = "vmlb.io/maglev-size";
const HEALTH: &str = "vmlb.io/health-check";
const HEALTH_PATH: &str = "vmlb.io/health-path";
const INTERVAL: &str = "vmlb.io/health-interval";
const TIMEOUT: &str = "vmlb.io/health-timeout";
const RISE: &str = "vmlb.io/health-rise";
const FALL: &str = "vmlb.io/health-fall";

/// vmlb's options, as `metadata.annotations` of a ServiceEntry: (name, meaning and default).
/// Any other `vmlb.io/` annotation is an error, so a typo cannot silently fall back to a default.
pub const ANNOTATIONS: &[(&str, &str)] = &[
    (
        SNAT,
        "source address(es) towards the VMs, comma-separated, at most 4 per family (a pool \
         used by flow hash); IPv4 VIPs use the IPv4 ones, IPv6 VIPs the IPv6 ones (default: \
         the node's --snat-addr of that family)",
    ),
    (
        SNAT_PORTS,
        "SNAT source port range, e.g. 1024-65535 on a dedicated SNAT address (default \
         1024-32764, clear of the node's ephemeral ports)",
    ),
    (
        MODE,
        "snat (default: the VMs see a node address) or dnat (the VMs see the client's \
         address and must route replies through the node)",
    ),
    (
        MAGLEV_SIZE,
        "Maglev table size, a prime from vmlb_common::maglev::RING_SIZES (default 16381)",
    ),
    (
        HEALTH,
        "tcp (default, connect), http (GET, 2xx/3xx is healthy) or none",
    ),
    (HEALTH_PATH, "path for http health checks (default /)"),
    (INTERVAL, "time between checks, e.g. 2s (default 2s)"),
    (TIMEOUT, "time a check may take, e.g. 500ms (default 1s)"),
    (RISE, "successes that bring an endpoint up (default 2)"),
    (FALL, "failures that take an endpoint down (default 3)"),
];

/// Services the data path can hold (id 0 is never assigned).
pub(crate) const MAX_SERVICE_COUNT: usize = MAX_SERVICES as usize - 1;
/// Backends the data path can hold (one id per service and endpoint; id 0 means "empty").
pub(crate) const MAX_BACKEND_COUNT: usize = MAX_BACKENDS as usize - 1;

/// A service and the field path of the port that defines it (for duplicate errors).
pub(crate) struct Parsed {
    pub svc: ConfiguredService,
    pub field: String,
}

/// What one file held besides its services, for `config check`'s per-file listing.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Contents {
    pub documents: usize,
    pub service_entries: usize,
    /// Documents of other kinds, skipped.
    pub skipped: usize,
}

/// All services of one file; errors go to `errs` and warnings (things that are valid but
/// probably not meant) to `warns`, each sorted by line.
pub(crate) fn parse_file(
    text: &str,
    file: &Path,
    node: &NodeConfig,
    errs: &mut Vec<ConfigError>,
    warns: &mut Vec<ConfigError>,
) -> (Vec<Parsed>, Contents) {
    let (start, wstart) = (errs.len(), warns.len());
    let (docs, syntax) = yaml::parse(text);
    let mut out = Vec::new();
    let mut contents = Contents::default();
    for doc in &docs {
        let path = String::new();
        let val = Val {
            node: doc,
            path,
            line: doc.line,
            file,
        };
        document(val, node, &mut out, &mut contents, errs, warns);
    }
    if let Some(e) = syntax {
        errs.push(ConfigError {
            file: file.to_path_buf(),
            line: Some(e.line),
            field: String::new(),
            message: format!("invalid YAML: {}", e.message),
        });
    }
    errs[start..].sort_by_key(|e| e.line);
    warns[wstart..].sort_by_key(|e| e.line);
    (out, contents)
}

fn document(
    doc: Val,
    node: &NodeConfig,
    out: &mut Vec<Parsed>,
    contents: &mut Contents,
    errs: &mut Vec<ConfigError>,
    warns: &mut Vec<ConfigError>,
) {
    // A `---` with nothing after it: no document, nothing to say.
    if doc.is_null() {
        return;
    }
    contents.documents += 1;
    let kind = doc.get("kind");
    match kind.as_ref().and_then(|k| k.str().ok()) {
        Some("ServiceEntry") => {
            contents.service_entries += 1;
            out.extend(service_entry(&doc, node, errs, warns));
        }
        // `kubectl get ... -o yaml` output.
        Some("List" | "ServiceEntryList") => {
            contents.documents -= 1;
            for item in doc
                .get("items")
                .and_then(|i| i.items().ok())
                .unwrap_or_default()
            {
                document(item, node, out, contents, errs, warns);
            }
        }
        other => {
            contents.skipped += 1;
            let what = match other {
                Some(k) => format!("kind {k:?} is not read by vmlb"),
                None => "no kind".to_string(),
            };
            let at = kind.unwrap_or_else(|| doc.clone());
            warns.push(at.error(format!(
                "{what} (it reads kind ServiceEntry, also inside a List): document skipped"
            )));
        }
    }
}

fn service_entry(
    doc: &Val,
    node: &NodeConfig,
    errs: &mut Vec<ConfigError>,
    warns: &mut Vec<ConfigError>,
) -> Vec<Parsed> {
    let start = errs.len();
    duplicate_keys(doc, errs);

    let api = doc.field("apiVersion");
    match api.str() {
        Ok(v) if API_VERSIONS.contains(&v) => {}
        Ok(v) => errs.push(api.error(format!(
            "{v:?} is not a ServiceEntry version vmlb reads (networking.istio.io/v1 or v1beta1)"
        ))),
        Err(e) => errs.push(e),
    }
    let meta = doc.field("metadata");
    let name = ok(errs, meta.field("name").str());
    // Part of the identity: the same name in two namespaces is two services.
    let namespace = meta
        .get("namespace")
        .filter(|n| !n.is_null())
        .and_then(|n| ok(errs, n.str()));
    let spec = doc.field("spec");
    let vips = match spec.entries() {
        Ok(_) => addresses(&spec.field("addresses"), errs),
        Err(_) => Vec::new(),
    };
    let families = Families {
        v4: vips.iter().any(|(v, _)| v.is_ipv4()),
        v6: vips.iter().find(|(v, _)| v.is_ipv6()).map(|(v, _)| *v),
    };
    let opts = options(&meta.field("annotations"), node, families, errs);

    if let Err(e) = spec.entries() {
        errs.push(if spec.is_null() {
            spec.error("required field is missing")
        } else {
            e
        });
        return Vec::new();
    }
    let hosts = spec
        .get("hosts")
        .map(|h| strings(&h, errs))
        .unwrap_or_default();
    let location = spec
        .get("location")
        .and_then(|l| ok(errs, l.str()))
        .map(str::to_string);

    let res = spec.field("resolution");
    let resolution = if res.is_null() {
        Ok("NONE (the default)")
    } else {
        res.str()
    };
    match resolution {
        Ok("STATIC") => {}
        Ok(r) => errs.push(res.error(format!(
            "resolution {r} is not supported: vmlb balances over static endpoint addresses; \
             use STATIC"
        ))),
        Err(e) => errs.push(e),
    }
    if let Some(w) = spec.get("workloadSelector") {
        errs.push(w.error("not supported: list the VM addresses under spec.endpoints"));
    }

    let (ports, names) = ports(&spec.field("ports"), errs);
    let endpoints = endpoints(&spec.field("endpoints"), &names, errs);
    same_families(&vips, &endpoints, errs);

    // Services and backends multiply (VIPs x ports, x endpoints of the VIP's family): refuse
    // what cannot fit before building it, so a small file cannot make the daemon allocate
    // millions of backends.
    let services = vips.len().saturating_mul(ports.len());
    let backends = vips
        .iter()
        .map(|(vip, _)| {
            let same = endpoints
                .iter()
                .filter(|e| e.addr.is_ipv4() == vip.is_ipv4());
            ports.len().saturating_mul(same.count())
        })
        .fold(0usize, usize::saturating_add);
    if services > MAX_SERVICE_COUNT {
        errs.push(spec.field("ports").error(format!(
            "{} VIP(s) x {} port(s) = {services} services; the data path holds at most \
             {MAX_SERVICE_COUNT}",
            vips.len(),
            ports.len()
        )));
        return Vec::new();
    }
    if backends > MAX_BACKEND_COUNT {
        errs.push(spec.field("endpoints").error(format!(
            "{services} service(s) x {} endpoint(s) (of each VIP's family) = {backends} \
             backends; the data path holds at most {MAX_BACKEND_COUNT}",
            endpoints.len()
        )));
        return Vec::new();
    }

    // Backends per port: the endpoint's override for the port's name, else the target port.
    let mut backends = Vec::new();
    let mut reported = HashSet::new();
    for port in &ports {
        let mut seen = HashMap::new();
        let list: Vec<BackendSpec> = endpoints
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let over = e.ports.iter().find(|(n, _)| Some(*n) == port.name);
                let b_port = over.map_or(port.target, |&(_, p)| p);
                if let Some(first) = seen.insert((e.addr, b_port), i) {
                    if reported.insert(i) {
                        errs.push(e.at.error(format!(
                            "{}:{b_port} is listed twice (also {}[{first}])",
                            e.addr,
                            spec.field("endpoints").path
                        )));
                    }
                }
                BackendSpec {
                    addr: e.addr,
                    port: b_port,
                    weight: e.weight,
                    up: true,
                }
            })
            .collect();
        backends.push(list);
    }

    let (Some(name), Some(snat)) = (name, opts.snat) else {
        return Vec::new();
    };
    if errs.len() > start {
        return Vec::new();
    }
    let eps = spec.field("endpoints");
    if endpoints.is_empty() {
        warns.push(eps.error("no endpoints: traffic to this ServiceEntry is dropped"));
    } else if endpoints.iter().all(|e| e.weight == 0) {
        warns
            .push(eps.error("every endpoint has weight 0 (draining): new connections are dropped"));
    }
    let name = match namespace {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_string(),
    };
    let name = name.as_str();
    let mut out = Vec::new();
    for &(vip, _) in &vips {
        // A VIP is served by the endpoints of its own family (`same_families`).
        let snat: Vec<IpAddr> = match opts.mode {
            Mode::Dnat => Vec::new(),
            Mode::Snat => snat
                .iter()
                .filter(|a| a.is_ipv4() == vip.is_ipv4())
                .copied()
                .collect(),
        };
        for (port, backends) in ports.iter().zip(&backends) {
            let backends: Vec<BackendSpec> = backends
                .iter()
                .filter(|b| b.addr.is_ipv4() == vip.is_ipv4())
                .copied()
                .collect();
            let mut svc_name = format!(
                "{name}/{}",
                port.name.map_or(port.number.to_string(), str::to_string)
            );
            if vips.len() > 1 {
                svc_name += &format!("@{vip}");
            }
            let spec = ServiceSpec {
                vip,
                port: port.number,
                proto: port.proto,
                mode: opts.mode,
                snat: snat.clone(),
                snat_ports: opts.snat_ports,
                ring_size: opts.ring_size,
                backends,
            };
            let svc = ConfiguredService {
                spec,
                name: svc_name,
                hosts: hosts.clone(),
                location: location.clone(),
                file: doc.file.to_path_buf(),
                line: port.at.line,
                health: opts.health.clone(),
            };
            out.push(Parsed {
                svc,
                field: port.at.path.clone(),
            });
        }
    }
    out
}

/// `spec.addresses`: the VIPs (IPv4 or IPv6), each with where it is written.
fn addresses<'a>(v: &Val<'a>, errs: &mut Vec<ConfigError>) -> Vec<(IpAddr, Val<'a>)> {
    let Some(items) = ok(errs, v.list()) else {
        return Vec::new();
    };
    if items.is_empty() {
        errs.push(v.error(
            "vmlb needs at least one VIP address to answer for (e.g. addresses: [10.10.1.128])",
        ));
    }
    let vip = |a: &Val| -> Result<IpAddr, ConfigError> {
        let s = a.str()?;
        let (ip, prefix) = s.split_once('/').unwrap_or((s, ""));
        let ip: IpAddr = ip
            .parse()
            .map_err(|_| a.error(format!("invalid IP address {s:?}")))?;
        let single = if ip.is_ipv4() { "32" } else { "128" };
        match ip {
            _ if !prefix.is_empty() && prefix != single => Err(a.error(format!(
                "{s:?}: a VIP is a single address (/{single}), not a range"
            ))),
            IpAddr::V4(v4) if v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast() => {
                Err(a.error(format!("{ip} cannot be a VIP")))
            }
            // Link-local addresses need an interface scope that a VIP does not have.
            IpAddr::V6(v6)
                if v6.is_unspecified()
                    || v6.is_multicast()
                    || v6.is_loopback()
                    || v6.is_unicast_link_local() =>
            {
                Err(a.error(format!("{ip} cannot be a VIP")))
            }
            ip => Ok(ip),
        }
    };
    items
        .into_iter()
        .filter_map(|a| ok(errs, vip(&a)).map(|ip| (ip, a)))
        .collect()
}

/// Which address families the VIPs have, for the annotations: any IPv4 VIP, and the first
/// IPv6 VIP (named in errors).
#[derive(Clone, Copy)]
struct Families {
    v4: bool,
    v6: Option<IpAddr>,
}

/// The family rule: a VIP is served by the endpoints of its own family, so with endpoints
/// listed every VIP needs one of its family (else its traffic could only be dropped) and every
/// endpoint needs a VIP of its family (else it serves nothing). An entry with IPv4 and IPv6
/// VIPs and endpoints of both is two sets of services, one per family.
fn same_families(vips: &[(IpAddr, Val)], endpoints: &[Endpoint], errs: &mut Vec<ConfigError>) {
    if endpoints.is_empty() || vips.is_empty() {
        return;
    }
    let family = |v4: bool| if v4 { "IPv4" } else { "IPv6" };
    for (vip, at) in vips {
        if !endpoints.iter().any(|e| e.addr.is_ipv4() == vip.is_ipv4()) {
            let f = family(vip.is_ipv4());
            errs.push(at.error(format!(
                "{f} VIP {vip} has no {f} endpoint: a VIP is served only by endpoints of its \
                 own address family"
            )));
        }
    }
    for e in endpoints {
        if !vips.iter().any(|(v, _)| v.is_ipv4() == e.addr.is_ipv4()) {
            let f = family(e.addr.is_ipv4());
            errs.push(e.at.field("address").error(format!(
                "{f} endpoint {} has no {f} VIP in spec.addresses to serve: a VIP is served \
                 only by endpoints of its own address family",
                e.addr
            )));
        }
    }
}

struct Port<'a> {
    number: u16,
    proto: Proto,
    name: Option<&'a str>,
    /// Backend port unless an endpoint overrides it.
    target: u16,
    at: Val<'a>,
}

/// The valid ports, and the names of all (so that an endpoint naming a port with an error does
/// not add a second error).
fn ports<'a>(v: &Val<'a>, errs: &mut Vec<ConfigError>) -> (Vec<Port<'a>>, Vec<&'a str>) {
    let Some(items) = ok(errs, v.list()) else {
        return (Vec::new(), Vec::new());
    };
    if items.is_empty() {
        errs.push(v.error("at least one port is required"));
    }
    let mut names: Vec<(&str, String)> = Vec::new();
    let mut out = Vec::new();
    for p in items {
        if let Err(e) = p.entries() {
            errs.push(e);
            continue;
        }
        let number = ok(errs, p.field("number").port());
        let protocol = p.field("protocol");
        // Istio's protocols; all but UDP run over TCP, which is what an L4 balancer sees.
        let proto = if protocol.is_null() {
            Some(Proto::Tcp)
        } else {
            ok(errs, protocol.str()).and_then(|s| match s.to_ascii_uppercase().as_str() {
                "HTTP" | "HTTPS" | "HTTP2" | "GRPC" | "TCP" | "TLS" | "MONGO" => Some(Proto::Tcp),
                "UDP" => Some(Proto::Udp),
                _ => {
                    errs.push(protocol.error(format!(
                        "protocol {s} is not supported (HTTP, HTTPS, HTTP2, GRPC, TCP, TLS, \
                         MONGO or UDP)"
                    )));
                    None
                }
            })
        };
        let name = p.get("name").and_then(|n| {
            let s = ok(errs, n.str())?;
            if let Some((_, first)) = names.iter().find(|(name, _)| *name == s) {
                errs.push(n.error(format!("port name {s:?} is already used by {first}")));
            } else {
                names.push((s, n.path.clone()));
            }
            Some(s)
        });
        let target = p.get("targetPort").map(|t| ok(errs, t.port()));
        if let (Some(number), Some(proto), Some(target)) = (number, proto, target.unwrap_or(number))
        {
            out.push(Port {
                number,
                proto,
                name,
                target,
                at: p,
            });
        }
    }
    (out, names.into_iter().map(|(name, _)| name).collect())
}

struct Endpoint<'a> {
    addr: IpAddr,
    /// Per-port target port overrides: (port name, port).
    ports: Vec<(&'a str, u16)>,
    weight: u32,
    at: Val<'a>,
}

fn endpoints<'a>(v: &Val<'a>, names: &[&str], errs: &mut Vec<ConfigError>) -> Vec<Endpoint<'a>> {
    let mut out = Vec::new();
    for e in ok(errs, v.list()).unwrap_or_default() {
        if let Err(err) = e.entries() {
            errs.push(err);
            continue;
        }
        let address = e.field("address");
        let addr = address.str().and_then(|s| {
            s.parse::<IpAddr>().map_err(|_| {
                address.error(
                    if !s.contains(':') && s.contains(|c: char| c.is_ascii_alphabetic()) {
                        format!(
                            "{s:?} is not an IP address: with resolution STATIC, vmlb needs the \
                             VM's address, not a name"
                        )
                    } else {
                        format!("invalid IP address {s:?}")
                    },
                )
            })
        });
        let addr = ok(errs, addr);
        let mut overrides = Vec::new();
        if let Some(map) = e.get("ports").and_then(|m| ok(errs, m.entries())) {
            for (name, p) in map {
                if !names.contains(&name) {
                    let names = names.join(", ");
                    errs.push(p.error(format!("no port named {name:?} in spec.ports ({names})")));
                } else if let Some(n) = ok(errs, p.port()) {
                    overrides.push((name, n));
                }
            }
        }
        let weight = match e.get("weight") {
            Some(w) => ok(errs, w.number(0, u32::MAX.into()).map(|w| w as u32)),
            None => Some(1),
        };
        if let (Some(addr), Some(weight)) = (addr, weight) {
            out.push(Endpoint {
                addr,
                ports: overrides,
                weight,
                at: e,
            });
        }
    }
    out
}

struct Options {
    mode: Mode,
    /// Of both families (each VIP takes its own family's).
    snat: Option<Vec<IpAddr>>,
    snat_ports: (u16, u16),
    ring_size: u32,
    health: HealthSpec,
}

/// The `vmlb.io/` annotations over their defaults.
fn options(
    ann: &Val,
    node: &NodeConfig,
    families: Families,
    errs: &mut Vec<ConfigError>,
) -> Options {
    let entries = if ann.is_null() {
        Ok(Vec::new())
    } else {
        ann.entries()
    };
    let mut set = HashMap::new();
    for (key, v) in ok(errs, entries).unwrap_or_default() {
        if !key.starts_with("vmlb.io/") {
            continue;
        }
        if !ANNOTATIONS.iter().any(|(k, _)| *k == key) {
            let known: Vec<_> = ANNOTATIONS.iter().map(|(k, _)| *k).collect();
            errs.push(v.error(format!(
                "unknown vmlb annotation; known: {}",
                known.join(", ")
            )));
        } else if let Some(s) = ok(errs, v.str()) {
            set.insert(key, (s.trim(), v));
        }
    }
    let mut a = Annotations { set, errs };

    let snat = a.get(SNAT, |s, _| {
        let addrs = s
            .split(',')
            .map(|a| {
                a.trim()
                    .parse::<IpAddr>()
                    .map_err(|_| format!("invalid IP address {:?}", a.trim()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        for (v4, family) in [(true, "IPv4"), (false, "IPv6")] {
            let n = addrs.iter().filter(|a| a.is_ipv4() == v4).count();
            if n > MAX_SNAT_PER_SERVICE {
                return Err(format!(
                    "{n} {family} addresses; at most {MAX_SNAT_PER_SERVICE} per service"
                ));
            }
        }
        Ok(addrs)
    });
    let snat_ports = a.get(SNAT_PORTS, |s, _| {
        let (lo, hi) = s
            .split_once('-')
            .ok_or_else(|| format!("{s:?} is not a range like 1024-65535"))?;
        let parse = |p: &str| {
            p.trim()
                .parse::<u16>()
                .map_err(|_| format!("invalid port {:?}", p.trim()))
        };
        let (lo, hi) = (parse(lo)?, parse(hi)?);
        if lo < 1024 || hi < lo + 1023 {
            return Err(format!(
                "{lo}-{hi}: must start at 1024 or above and hold at least 1024 ports"
            ));
        }
        Ok((lo, hi))
    });
    let mode = a
        .get(MODE, |s, _| match s {
            "snat" => Ok(Mode::Snat),
            "dnat" => Ok(Mode::Dnat),
            _ => Err(format!("unknown mode {s:?} (snat or dnat)")),
        })
        .unwrap_or_default();
    let ring_size = a.get(MAGLEV_SIZE, |s, v| match count(0)(s, v)? {
        n if RING_SIZES.contains(&n) => Ok(n),
        n => Err(format!(
            "Maglev size {n} is not allowed (one of {RING_SIZES:?})"
        )),
    });
    let check = a.get(HEALTH, |s, _| match s {
        "tcp" | "http" | "none" => Ok(s.to_string()),
        _ => Err(format!("unknown health check {s:?} (tcp, http or none)")),
    });
    let path = a.get(HEALTH_PATH, |s, _| match s.starts_with('/') {
        true => Ok(s.to_string()),
        false => Err(format!("{s:?} must start with /")),
    });
    let defaults = HealthSpec::default();
    let health = HealthSpec {
        kind: match check.as_deref() {
            Some("none") => HealthKind::None,
            Some("http") => HealthKind::Http {
                path: path.clone().unwrap_or_else(|| "/".into()),
            },
            _ => HealthKind::Tcp,
        },
        interval: a.get(INTERVAL, duration).unwrap_or(defaults.interval),
        timeout: a.get(TIMEOUT, duration).unwrap_or(defaults.timeout),
        rise: a.get(RISE, count(1)).unwrap_or(defaults.rise),
        fall: a.get(FALL, count(1)).unwrap_or(defaults.fall),
    };
    // Only when the check itself is valid, so one mistake gives one error.
    if path.is_some() && matches!(check.as_deref(), None | Some("tcp" | "none")) {
        let v = &a.set[HEALTH_PATH].1;
        a.errs
            .push(v.error(format!("only used with {HEALTH}: http")));
    }
    if mode == Mode::Dnat {
        // Nothing is translated at the source in dnat mode: a SNAT setting is a mistake.
        for key in [SNAT, SNAT_PORTS] {
            if let Some((_, v)) = a.set.get(key) {
                a.errs.push(v.error(format!(
                    "not used with {MODE}: dnat (the VMs see the client's address)"
                )));
            }
        }
        return Options {
            mode,
            snat: Some(Vec::new()),
            snat_ports: (SNAT_PORT_MIN, SNAT_PORT_MAX),
            ring_size: ring_size.unwrap_or(DEFAULT_RING_SIZE),
            health,
        };
    }
    // Per family: the annotation's addresses of that family, else the node's.
    let node_snat: Vec<IpAddr> = [node.snat.map(IpAddr::V4), node.snat6.map(IpAddr::V6)]
        .into_iter()
        .flatten()
        .collect();
    let annotated = a.set.contains_key(SNAT);
    let mut pool = Vec::new();
    for v4 in [true, false] {
        let mine = |l: &[IpAddr]| -> Vec<IpAddr> {
            l.iter().filter(|x| x.is_ipv4() == v4).copied().collect()
        };
        let from_ann = snat.as_deref().map(mine).unwrap_or_default();
        pool.extend(if from_ann.is_empty() {
            mine(&node_snat)
        } else {
            from_ann
        });
        let needed = if v4 {
            families.v4
        } else {
            families.v6.is_some()
        };
        let have = pool.iter().any(|x| x.is_ipv4() == v4);
        // An invalid annotation already has its error.
        if needed && !have && (snat.is_some() || !annotated) {
            let (family, flag) = if v4 {
                ("IPv4", "--snat-addr (the node's IPv4 address on the VLAN)")
            } else {
                (
                    "IPv6",
                    "--snat-addr with the node's IPv6 address on the VLAN",
                )
            };
            a.errs.push(ann.field(SNAT).error(format!(
                "no {family} SNAT address for the {family} VIPs: pass {flag} or list one in \
                 this annotation"
            )));
        }
    }
    Options {
        mode,
        snat: (!annotated || snat.is_some()).then_some(pool),
        snat_ports: snat_ports.unwrap_or((SNAT_PORT_MIN, SNAT_PORT_MAX)),
        ring_size: ring_size.unwrap_or(DEFAULT_RING_SIZE),
        health,
    }
}

/// The known `vmlb.io/` annotations that are set: key -> (trimmed value, node).
struct Annotations<'a, 'e> {
    set: HashMap<&'a str, (&'a str, Val<'a>)>,
    errs: &'e mut Vec<ConfigError>,
}

impl Annotations<'_, '_> {
    /// `key` parsed by `parse`; None when unset or invalid (the error recorded).
    fn get<T>(&mut self, key: &str, parse: impl Fn(&str, &Val) -> Result<T, String>) -> Option<T> {
        let (s, v) = self.set.get(key)?;
        ok(self.errs, parse(s, v).map_err(|msg| v.error(msg)))
    }
}

/// A u32 of at least `min`, for annotation parsers.
fn count(min: u64) -> impl Fn(&str, &Val) -> Result<u32, String> {
    move |_, v| match v.number(min, u32::MAX.into()) {
        Ok(n) => Ok(n as u32),
        Err(e) => Err(e.message),
    }
}

fn duration(s: &str, _: &Val) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(Duration::ZERO) => Err("must be longer than 0".to_string()),
        Ok(d) => Ok(d),
        Err(e) => Err(format!("invalid duration {s:?} (e.g. 2s, 500ms): {e}")),
    }
}

fn strings<'a>(v: &Val<'a>, errs: &mut Vec<ConfigError>) -> Vec<String> {
    let items = ok(errs, v.items()).unwrap_or_default();
    items
        .iter()
        .filter_map(|i| ok(errs, i.str()))
        .map(str::to_string)
        .collect()
}

/// Duplicate keys would make one of the values silently lost.
fn duplicate_keys(v: &Val, errs: &mut Vec<ConfigError>) {
    match &v.node.kind {
        Kind::Map(_) => {
            let mut seen = HashSet::new();
            for (key, child) in v.entries().unwrap_or_default() {
                if !seen.insert(key) {
                    errs.push(child.error("duplicate key"));
                }
                duplicate_keys(&child, errs);
            }
        }
        Kind::Seq(_) => v
            .items()
            .unwrap_or_default()
            .iter()
            .for_each(|i| duplicate_keys(i, errs)),
        Kind::Scalar { .. } => {}
    }
}

fn ok<T>(errs: &mut Vec<ConfigError>, r: Result<T, ConfigError>) -> Option<T> {
    r.map_err(|e| errs.push(e)).ok()
}

/// A node with its field path and the line to report for it: the key's line for a mapping
/// value (`addresses:` rather than the first item below it), the item's for a list item, the
/// parent's for an absent field.
#[derive(Clone)]
struct Val<'a> {
    node: &'a Node,
    path: String,
    line: usize,
    file: &'a Path,
}

impl<'a> Val<'a> {
    fn error(&self, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.to_path_buf(),
            line: Some(self.line),
            field: self.path.clone(),
            message: message.into(),
        }
    }

    fn is_null(&self) -> bool {
        self.node.is_null()
    }

    /// The value of `key`, or a null placeholder on this node's line when absent.
    fn field(&self, key: &str) -> Val<'a> {
        let path = join(&self.path, key);
        let (node, line) = match &self.node.kind {
            Kind::Map(entries) => entries
                .iter()
                .find(|(k, _)| k.scalar() == Some(key))
                .map_or((&NULL, self.line), |(k, v)| (v, k.line)),
            _ => (&NULL, self.line),
        };
        Val {
            node,
            path,
            line,
            file: self.file,
        }
    }

    /// The value of `key` unless absent or null.
    fn get(&self, key: &str) -> Option<Val<'a>> {
        Some(self.field(key)).filter(|v| !v.is_null())
    }

    /// Any scalar (annotation values are often numbers written unquoted, or quoted numbers).
    fn str(&self) -> Result<&'a str, ConfigError> {
        match &self.node.kind {
            _ if self.is_null() => Err(self.error("required field is missing")),
            Kind::Scalar { value, .. } => Ok(value),
            _ => Err(self.error(format!("expected a string, found {}", self.node.describe()))),
        }
    }

    fn number(&self, min: u64, max: u64) -> Result<u64, ConfigError> {
        let n = self
            .node
            .scalar()
            .and_then(|s| s.trim().parse::<u64>().ok());
        n.filter(|n| (min..=max).contains(n)).ok_or_else(|| {
            let found = self.node.describe();
            self.error(format!(
                "expected a number from {min} to {max}, found {found}"
            ))
        })
    }

    fn port(&self) -> Result<u16, ConfigError> {
        self.number(1, 65535).map(|n| n as u16)
    }

    /// A list that may be absent.
    fn list(&self) -> Result<Vec<Val<'a>>, ConfigError> {
        if self.is_null() {
            Ok(Vec::new())
        } else {
            self.items()
        }
    }

    fn items(&self) -> Result<Vec<Val<'a>>, ConfigError> {
        let Kind::Seq(items) = &self.node.kind else {
            return Err(self.error(format!("expected a list, found {}", self.node.describe())));
        };
        let val = |(i, node): (usize, &'a Node)| Val {
            node,
            path: format!("{}[{i}]", self.path),
            line: node.line,
            file: self.file,
        };
        Ok(items.iter().enumerate().map(val).collect())
    }

    /// Entries with scalar keys (others cannot be field names and are skipped).
    fn entries(&self) -> Result<Vec<(&'a str, Val<'a>)>, ConfigError> {
        let Kind::Map(entries) = &self.node.kind else {
            return Err(self.error(format!(
                "expected a mapping, found {}",
                self.node.describe()
            )));
        };
        let entry = |(k, node): &'a (Node, Node)| {
            let key = k.scalar()?;
            let path = join(&self.path, key);
            Some((
                key,
                Val {
                    node,
                    path,
                    line: k.line,
                    file: self.file,
                },
            ))
        };
        Ok(entries.iter().filter_map(entry).collect())
    }
}

/// `spec.ports`, and `metadata.annotations."vmlb.io/mode"` for keys that are not identifiers.
fn join(path: &str, key: &str) -> String {
    let plain = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    let key = if plain {
        key.to_string()
    } else {
        format!("{key:?}")
    };
    if path.is_empty() {
        key
    } else {
        format!("{path}.{key}")
    }
}
