//! VIP pools with MetalLB `IPAddressPool` semantics, and the pure allocator.
//!
//! Pools are `IPAddressPool` documents (`vmlb.io/v1alpha1` or, to ease the move off MetalLB,
//! `metallb.io/v1beta1`): `spec.addresses` holds CIDRs (`10.10.1.128/25`) and ranges
//! (`10.10.1.130-10.10.1.140`), `spec.autoAssign` (default true) says whether Services that ask
//! for nothing in particular may get addresses from it, `spec.avoidBuggyIPs` skips `.0` and
//! `.255`.
//!
//! The allocator keeps no state of its own: the addresses already given are in the Services'
//! `status.loadBalancer.ingress`, so a restarted daemon or a new leader reads them back and
//! gives every Service the address it had. Conflicts are settled in a fixed order (oldest
//! Service first, then namespace/name), so every leader settles them the same way.

use std::{collections::BTreeMap, fmt, net::Ipv4Addr};

use serde::Deserialize;

/// API versions read for pool documents.
pub const POOL_API_VERSIONS: &[&str] = &["vmlb.io/v1alpha1", "metallb.io/v1beta1"];

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pool {
    pub name: String,
    /// Inclusive ranges, in the order written.
    pub ranges: Vec<(Ipv4Addr, Ipv4Addr)>,
    pub auto_assign: bool,
    pub avoid_buggy_ips: bool,
}

impl Pool {
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        self.usable(ip) && self.ranges.iter().any(|&(a, b)| a <= ip && ip <= b)
    }

    fn usable(&self, ip: Ipv4Addr) -> bool {
        !(self.avoid_buggy_ips && matches!(ip.octets()[3], 0 | 255))
    }

    /// The lowest address of the pool not in `used`. Walks at most `used.len() + 1` candidates
    /// per range (plus the skipped buggy ones), so a /8 pool costs no more than a /30.
    fn first_free(&self, used: &BTreeMap<Ipv4Addr, &str>) -> Option<Ipv4Addr> {
        for &(a, b) in &self.ranges {
            let (mut ip, end) = (u32::from(a), u32::from(b));
            loop {
                let cand = Ipv4Addr::from(ip);
                if self.usable(cand) && !used.contains_key(&cand) {
                    return Some(cand);
                }
                if ip == end {
                    break;
                }
                ip += 1;
            }
        }
        None
    }
}

/// Parses one `IPAddressPool` (as JSON/YAML value). Errors name the field.
pub fn parse_pool(doc: &serde_json::Value) -> Result<Pool, String> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Doc {
        api_version: String,
        metadata: Meta,
        spec: Spec,
    }
    #[derive(Deserialize)]
    struct Meta {
        name: String,
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Spec {
        addresses: Vec<String>,
        #[serde(default = "yes")]
        auto_assign: bool,
        #[serde(default, rename = "avoidBuggyIPs")]
        avoid_buggy_ips: bool,
    }
    fn yes() -> bool {
        true
    }
    let d: Doc = serde_json::from_value(doc.clone()).map_err(|e| e.to_string())?;
    if !POOL_API_VERSIONS.contains(&d.api_version.as_str()) {
        return Err(format!(
            "apiVersion {:?}: expected one of {POOL_API_VERSIONS:?}",
            d.api_version
        ));
    }
    let mut ranges = Vec::new();
    for (i, a) in d.spec.addresses.iter().enumerate() {
        ranges.push(parse_range(a).map_err(|e| format!("spec.addresses[{i}]: {e}"))?);
    }
    if ranges.is_empty() {
        return Err("spec.addresses: no address".into());
    }
    Ok(Pool {
        name: d.metadata.name,
        ranges,
        auto_assign: d.spec.auto_assign,
        avoid_buggy_ips: d.spec.avoid_buggy_ips,
    })
}

/// Every `IPAddressPool` in a YAML file (several documents; other kinds are skipped), as a
/// ConfigMap mounts it. Pool names must be unique.
pub fn parse_pools_yaml(text: &str) -> Result<Vec<Pool>, String> {
    let mut pools: Vec<Pool> = Vec::new();
    for (i, doc) in serde_norway::Deserializer::from_str(text).enumerate() {
        let v: serde_json::Value =
            serde::Deserialize::deserialize(doc).map_err(|e| format!("document {}: {e}", i + 1))?;
        if v.is_null() || v.get("kind").and_then(|k| k.as_str()) != Some("IPAddressPool") {
            continue;
        }
        let p = parse_pool(&v).map_err(|e| format!("document {}: {e}", i + 1))?;
        if pools.iter().any(|q| q.name == p.name) {
            return Err(format!(
                "document {}: pool {:?} is defined twice",
                i + 1,
                p.name
            ));
        }
        pools.push(p);
    }
    Ok(pools)
}

/// `a.b.c.d/len` or `a.b.c.d-e.f.g.h`. IPv6 is refused: the Kubernetes source allocates and
/// serves IPv4 VIPs only so far (the data path and the file source serve IPv6).
pub fn parse_range(s: &str) -> Result<(Ipv4Addr, Ipv4Addr), String> {
    let s = s.trim();
    if let Some((ip, len)) = s.split_once('/') {
        let ip: Ipv4Addr = ip.parse().map_err(|_| format!("{s:?}: not an IPv4 CIDR"))?;
        let len: u32 = len
            .parse()
            .ok()
            .filter(|l| *l <= 32)
            .ok_or_else(|| format!("{s:?}: bad prefix length"))?;
        let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
        let base = u32::from(ip) & mask;
        return Ok((Ipv4Addr::from(base), Ipv4Addr::from(base | !mask)));
    }
    if let Some((a, b)) = s.split_once('-') {
        let a: Ipv4Addr = a
            .trim()
            .parse()
            .map_err(|_| format!("{s:?}: bad range start"))?;
        let b: Ipv4Addr = b
            .trim()
            .parse()
            .map_err(|_| format!("{s:?}: bad range end"))?;
        if a > b {
            return Err(format!("{s:?}: range ends before it starts"));
        }
        return Ok((a, b));
    }
    Err(format!("{s:?}: expected a CIDR or a range a.b.c.d-e.f.g.h"))
}

/// What one Service asks of the allocator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// `namespace/name`.
    pub key: String,
    /// Orders conflicts: older Services keep their address. RFC 3339, compared as text.
    pub created: String,
    /// What its status already says (kept when still valid: stable across restarts).
    pub current: Option<Ipv4Addr>,
    /// From `vmlb.io/loadBalancerIPs` or `spec.loadBalancerIP`.
    pub wanted: Option<Ipv4Addr>,
    /// From `vmlb.io/address-pool`.
    pub pool: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NoAddress {
    NotInPool(Ipv4Addr),
    Taken {
        ip: Ipv4Addr,
        by: String,
    },
    NoSuchPool(String),
    Exhausted,
    /// The request itself cannot be read (a bad annotation).
    Invalid(String),
}

impl fmt::Display for NoAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NoAddress::NotInPool(ip) => write!(f, "{ip} is in no vmlb address pool"),
            NoAddress::Taken { ip, by } => write!(f, "{ip} is already allocated to {by}"),
            NoAddress::NoSuchPool(p) => write!(f, "address pool {p:?} does not exist"),
            NoAddress::Exhausted => write!(f, "no free address in the eligible pools"),
            NoAddress::Invalid(m) => f.write_str(m),
        }
    }
}

/// Gives every request an address or a reason. Pure and deterministic: the same pools and
/// requests give the same answer on every node and every leader.
pub fn allocate(
    pools: &[Pool],
    requests: &[Request],
) -> BTreeMap<String, Result<Ipv4Addr, NoAddress>> {
    let mut order: Vec<&Request> = requests.iter().collect();
    order.sort_by(|a, b| (&a.created, &a.key).cmp(&(&b.created, &b.key)));
    let in_pool = |ip: Ipv4Addr, name: Option<&String>| {
        pools
            .iter()
            .any(|p| p.contains(ip) && name.is_none_or(|n| *n == p.name))
    };
    let mut used: BTreeMap<Ipv4Addr, &str> = BTreeMap::new();
    let mut out = BTreeMap::new();
    // 1. Keep what status already holds if it still fits the request: a restart or a new leader
    //    changes nothing. Oldest first, so a later duplicate (two leaders racing) loses. An
    //    address outside every pool is kept too (unless a pool is named): a pools file that is
    //    wrong or missing for a moment must not take every VIP away.
    for r in &order {
        let Some(ip) = r.current else { continue };
        let fits = r.wanted.is_none_or(|w| w == ip)
            && r.pool.as_ref().is_none_or(|name| in_pool(ip, Some(name)));
        if fits && !used.contains_key(&ip) {
            used.insert(ip, &r.key);
            out.insert(r.key.clone(), Ok(ip));
        }
    }
    // 2. Explicit requests, then 3. automatic assignment.
    for pass in [true, false] {
        for r in &order {
            if out.contains_key(&r.key) || r.wanted.is_some() != pass {
                continue;
            }
            let res = match (r.wanted, &r.pool) {
                (_, Some(p)) if !pools.iter().any(|x| &x.name == p) => {
                    Err(NoAddress::NoSuchPool(p.clone()))
                }
                (Some(ip), _) if !in_pool(ip, r.pool.as_ref()) => Err(NoAddress::NotInPool(ip)),
                (Some(ip), _) => match used.get(&ip) {
                    Some(by) => Err(NoAddress::Taken {
                        ip,
                        by: by.to_string(),
                    }),
                    None => Ok(ip),
                },
                (None, name) => {
                    pools
                        .iter()
                        // An explicitly named pool serves even without autoAssign (as in
                        // MetalLB); otherwise only autoAssign pools, in the order given.
                        .filter(|p| name.as_ref().map_or(p.auto_assign, |n| **n == p.name))
                        .find_map(|p| p.first_free(&used))
                        .ok_or(NoAddress::Exhausted)
                }
            };
            if let Ok(ip) = res {
                used.insert(ip, &r.key);
            }
            out.insert(r.key.clone(), res);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn pool(name: &str, addrs: &[&str], auto: bool) -> Pool {
        Pool {
            name: name.into(),
            ranges: addrs.iter().map(|a| parse_range(a).unwrap()).collect(),
            auto_assign: auto,
            avoid_buggy_ips: false,
        }
    }

    fn req(key: &str, created: &str) -> Request {
        Request {
            key: key.into(),
            created: created.into(),
            current: None,
            wanted: None,
            pool: None,
        }
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn cidr_and_range_parse() {
        assert_eq!(
            parse_range("10.10.1.128/25").unwrap(),
            (ip("10.10.1.128"), ip("10.10.1.255"))
        );
        assert_eq!(
            parse_range("10.10.1.200/25").unwrap().0,
            ip("10.10.1.128"),
            "host bits are masked off"
        );
        assert_eq!(
            parse_range("10.0.0.5 - 10.0.0.9").unwrap(),
            (ip("10.0.0.5"), ip("10.0.0.9"))
        );
        assert_eq!(parse_range("0.0.0.0/0").unwrap().1, ip("255.255.255.255"));
        for bad in [
            "10.0.0.9-10.0.0.5",
            "10.0.0.0/33",
            "fd00::/64",
            "x",
            "10.0.0.1",
        ] {
            assert!(parse_range(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn seed_pool_gives_the_seed_vip_first_and_never_twice() {
        let pools = [pool("vlan-1512-pool", &["10.10.1.128/25"], true)];
        let got = allocate(
            &pools,
            &[
                req("default/b", "2026-01-02T00:00:00Z"),
                req("default/a", "2026-01-01T00:00:00Z"),
            ],
        );
        assert_eq!(got["default/a"], Ok(ip("10.10.1.128")), "oldest first");
        assert_eq!(got["default/b"], Ok(ip("10.10.1.129")));
    }

    #[test]
    fn status_is_kept_across_restarts_even_when_a_lower_address_is_free() {
        let pools = [pool("p", &["10.10.1.128/25"], true)];
        let mut a = req("ns/a", "1");
        a.current = Some(ip("10.10.1.140"));
        let got = allocate(&pools, &[a.clone(), req("ns/b", "2")]);
        assert_eq!(got["ns/a"], Ok(ip("10.10.1.140")));
        assert_eq!(got["ns/b"], Ok(ip("10.10.1.128")));
        // Same input, same answer: what a new leader computes.
        assert_eq!(got, allocate(&pools, &[req("ns/b", "2"), a]));
    }

    #[test]
    fn an_address_is_never_taken_away_because_the_pools_changed() {
        let mut a = req("ns/a", "1");
        a.current = Some(ip("10.10.1.140"));
        assert_eq!(allocate(&[], &[a.clone()])["ns/a"], Ok(ip("10.10.1.140")));
        // Naming a pool that does not hold it moves it.
        a.pool = Some("p".into());
        let pools = [pool("p", &["10.0.0.0/30"], false)];
        assert_eq!(allocate(&pools, &[a])["ns/a"], Ok(ip("10.0.0.0")));
    }

    #[test]
    fn duplicate_status_goes_to_the_older_service() {
        let pools = [pool("p", &["10.10.1.128/30"], true)];
        let (mut a, mut b) = (req("ns/a", "1"), req("ns/b", "2"));
        a.current = Some(ip("10.10.1.129"));
        b.current = Some(ip("10.10.1.129"));
        let got = allocate(&pools, &[b, a]);
        assert_eq!(got["ns/a"], Ok(ip("10.10.1.129")));
        assert_eq!(
            got["ns/b"],
            Ok(ip("10.10.1.128")),
            "the younger one is moved"
        );
    }

    #[test]
    fn explicit_requests_must_be_in_a_pool_and_free() {
        let pools = [pool("p", &["10.10.1.128/25"], false)];
        let (mut a, mut b, mut c) = (req("ns/a", "1"), req("ns/b", "2"), req("ns/c", "3"));
        a.wanted = Some(ip("10.10.1.130"));
        b.wanted = Some(ip("10.10.1.130"));
        c.wanted = Some(ip("10.10.1.5"));
        let d = req("ns/d", "4");
        let got = allocate(&pools, &[a, b, c, d]);
        assert_eq!(
            got["ns/a"],
            Ok(ip("10.10.1.130")),
            "autoAssign does not limit requests"
        );
        assert_eq!(
            got["ns/b"],
            Err(NoAddress::Taken {
                ip: ip("10.10.1.130"),
                by: "ns/a".into()
            })
        );
        assert_eq!(got["ns/c"], Err(NoAddress::NotInPool(ip("10.10.1.5"))));
        assert_eq!(got["ns/d"], Err(NoAddress::Exhausted), "no autoAssign pool");
    }

    #[test]
    fn a_named_pool_serves_without_auto_assign_and_others_are_skipped() {
        let pools = [
            pool("auto", &["10.0.0.0/31"], true),
            pool("manual", &["10.0.1.10-10.0.1.11"], false),
        ];
        let mut a = req("ns/a", "1");
        a.pool = Some("manual".into());
        let mut b = req("ns/b", "2");
        b.pool = Some("nope".into());
        let got = allocate(
            &pools,
            &[a, b, req("ns/c", "3"), req("ns/d", "4"), req("ns/e", "5")],
        );
        assert_eq!(got["ns/a"], Ok(ip("10.0.1.10")));
        assert_eq!(got["ns/b"], Err(NoAddress::NoSuchPool("nope".into())));
        assert_eq!(got["ns/c"], Ok(ip("10.0.0.0")));
        assert_eq!(got["ns/d"], Ok(ip("10.0.0.1")));
        assert_eq!(got["ns/e"], Err(NoAddress::Exhausted));
    }

    #[test]
    fn avoid_buggy_ips_and_huge_pools() {
        let mut p = pool("p", &["10.0.0.0/8"], true);
        p.avoid_buggy_ips = true;
        let reqs: Vec<_> = (0..300).map(|i| req(&format!("ns/s{i:03}"), "1")).collect();
        let got = allocate(&[p], &reqs);
        assert_eq!(got["ns/s000"], Ok(ip("10.0.0.1")));
        assert_eq!(got["ns/s253"], Ok(ip("10.0.0.254")));
        assert_eq!(got["ns/s254"], Ok(ip("10.0.1.1")), ".255 and .0 skipped");
        let distinct: BTreeSet<_> = got.values().map(|r| *r.as_ref().unwrap()).collect();
        assert_eq!(distinct.len(), 300, "no address given twice");
    }

    #[test]
    fn pool_files_hold_several_documents() {
        let text = "apiVersion: vmlb.io/v1alpha1\nkind: IPAddressPool\nmetadata: {name: a}\n\
                    spec: {addresses: [10.0.0.0/30]}\n---\nkind: L2Advertisement\n---\n\
                    apiVersion: vmlb.io/v1alpha1\nkind: IPAddressPool\nmetadata: {name: b}\n\
                    spec: {addresses: [10.0.1.1-10.0.1.2], autoAssign: false}\n";
        let p = parse_pools_yaml(text).unwrap();
        assert_eq!(
            p.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert!(!p[1].auto_assign);
        let twice = format!("{text}---\n{}", text.split("---").next().unwrap());
        assert!(parse_pools_yaml(&twice)
            .unwrap_err()
            .contains("defined twice"));
    }

    #[test]
    fn pool_documents_metallb_and_vmlb() {
        let doc = serde_json::json!({
            "apiVersion": "metallb.io/v1beta1", "kind": "IPAddressPool",
            "metadata": {"name": "vlan-1512-pool", "namespace": "metallb-system"},
            "spec": {"addresses": ["10.10.1.128/25"], "autoAssign": false}
        });
        let p = parse_pool(&doc).unwrap();
        assert_eq!(p.name, "vlan-1512-pool");
        assert!(!p.auto_assign);
        assert!(p.contains(ip("10.10.1.128")) && !p.contains(ip("10.10.1.127")));
        let bad = serde_json::json!({
            "apiVersion": "vmlb.io/v1alpha1", "kind": "IPAddressPool",
            "metadata": {"name": "x"}, "spec": {"addresses": ["10.10.1.0/24", "oops"]}
        });
        assert!(parse_pool(&bad).unwrap_err().contains("spec.addresses[1]"));
    }
}
