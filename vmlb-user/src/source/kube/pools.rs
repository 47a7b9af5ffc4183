//! VIP pools with MetalLB `IPAddressPool` semantics, and the pure allocator.
//!
//! Pools are `IPAddressPool` documents (`vmlb.io/v1alpha1` or, to ease the move off MetalLB,
//! `metallb.io/v1beta1`): `spec.addresses` holds CIDRs (`10.10.1.128/25`,
//! `fd00:10:10:1::1000/120`) and ranges (`10.10.1.130-10.10.1.140`), IPv4 or IPv6 (one pool may
//! hold both), `spec.autoAssign` (default true) says whether Services that ask for nothing in
//! particular may get addresses from it, `spec.avoidBuggyIPs` skips IPv4 `.0` and `.255`.
//!
//! A Service gets one address per family it is served in (`spec.ipFamilies`); its
//! `spec.ipFamilyPolicy` says what a family that cannot be given means (`Policy`).
//!
//! The allocator keeps no state of its own: the addresses already given are in the Services'
//! `status.loadBalancer.ingress`, so a restarted daemon or a new leader reads them back and
//! gives every Service the address it had. Conflicts are settled in a fixed order (oldest
//! Service first, then namespace/name), so every leader settles them the same way.

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use serde::Deserialize;

/// API versions read for pool documents.
pub const POOL_API_VERSIONS: &[&str] = &["vmlb.io/v1alpha1", "metallb.io/v1beta1"];

/// An address family, spelt as `spec.ipFamilies` spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(ip: IpAddr) -> Self {
        if ip.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        }
    }

    pub fn other(self) -> Self {
        match self {
            Family::V4 => Family::V6,
            Family::V6 => Family::V4,
        }
    }

    /// `IPv4` / `IPv6`, the Kubernetes spelling.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "IPv4" => Some(Family::V4),
            "IPv6" => Some(Family::V6),
            _ => None,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

/// `spec.ipFamilyPolicy`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Policy {
    #[default]
    SingleStack,
    /// Every family the Service lists that the pools can give; the others are left out.
    PreferDualStack,
    /// Both families or none: a Service that cannot get one gets no address at all.
    RequireDualStack,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pool {
    pub name: String,
    /// Inclusive ranges, in the order written; both ends of one range are of one family, and
    /// one pool may hold both families (as in MetalLB).
    pub ranges: Vec<(IpAddr, IpAddr)>,
    pub auto_assign: bool,
    pub avoid_buggy_ips: bool,
}

/// An address as a number, so that IPv4 and IPv6 ranges are walked alike.
fn to_num(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

fn from_num(f: Family, n: u128) -> IpAddr {
    match f {
        // Only ever called with a number read from an IPv4 range.
        Family::V4 => IpAddr::V4(Ipv4Addr::from(n as u32)),
        Family::V6 => IpAddr::V6(Ipv6Addr::from(n)),
    }
}

impl Pool {
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.usable(ip)
            && self
                .ranges
                .iter()
                .any(|&(a, b)| Family::of(a) == Family::of(ip) && a <= ip && ip <= b)
    }

    /// Does the pool hold addresses of `f` at all?
    pub fn has(&self, f: Family) -> bool {
        self.ranges.iter().any(|&(a, _)| Family::of(a) == f)
    }

    /// MetalLB's avoidBuggyIPs is about IPv4 `.0` and `.255` (old stacks took them for network
    /// and broadcast addresses); IPv6 has no such addresses.
    fn usable(&self, ip: IpAddr) -> bool {
        !(self.avoid_buggy_ips && matches!(ip, IpAddr::V4(a) if matches!(a.octets()[3], 0 | 255)))
    }

    /// The lowest address of family `f` in the pool not in `used`. Walks at most
    /// `used.len() + 1` candidates per range (plus the skipped buggy ones), so a /8 or a /64
    /// pool costs no more than a /30.
    fn first_free(&self, f: Family, used: &BTreeMap<IpAddr, &str>) -> Option<IpAddr> {
        for &(a, b) in self.ranges.iter().filter(|(a, _)| Family::of(*a) == f) {
            let (mut n, end) = (to_num(a), to_num(b));
            loop {
                let cand = from_num(f, n);
                if self.usable(cand) && !used.contains_key(&cand) {
                    return Some(cand);
                }
                if n == end {
                    break;
                }
                n += 1;
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

/// A CIDR (`10.10.1.128/25`, `fd00:10:10:1::1000/120`) or a range (`a-b`, both ends of one
/// family), IPv4 or IPv6.
pub fn parse_range(s: &str) -> Result<(IpAddr, IpAddr), String> {
    let s = s.trim();
    if let Some((ip, len)) = s.split_once('/') {
        let ip: IpAddr = ip.parse().map_err(|_| format!("{s:?}: not an IP CIDR"))?;
        let bits = if ip.is_ipv4() { 32 } else { 128 };
        let len: u32 = len
            .parse()
            .ok()
            .filter(|l| *l <= bits)
            .ok_or_else(|| format!("{s:?}: bad prefix length"))?;
        // Host bits within the family's width: a /0 of IPv4 is 32 bits, not 128.
        let host = if len == bits {
            0
        } else {
            u128::MAX >> (128 - bits + len)
        };
        let base = to_num(ip) & !host;
        let f = Family::of(ip);
        return Ok((from_num(f, base), from_num(f, base | host)));
    }
    if let Some((a, b)) = s.split_once('-') {
        let a: IpAddr = a
            .trim()
            .parse()
            .map_err(|_| format!("{s:?}: bad range start"))?;
        let b: IpAddr = b
            .trim()
            .parse()
            .map_err(|_| format!("{s:?}: bad range end"))?;
        if Family::of(a) != Family::of(b) {
            return Err(format!(
                "{s:?}: a range is of one family, this one goes from {} to {}",
                Family::of(a),
                Family::of(b)
            ));
        }
        if a > b {
            return Err(format!("{s:?}: range ends before it starts"));
        }
        return Ok((a, b));
    }
    Err(format!(
        "{s:?}: expected a CIDR or a range a.b.c.d-e.f.g.h (or IPv6 a::b-a::c)"
    ))
}

/// What one Service asks of the allocator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// `namespace/name`.
    pub key: String,
    /// Orders conflicts: older Services keep their address. RFC 3339, compared as text.
    pub created: String,
    /// The families to serve, primary first (`spec.ipFamilies`), and what to do when one
    /// cannot be given.
    pub families: Vec<Family>,
    pub policy: Policy,
    /// What its status already says, at most one per family (kept when still valid: stable
    /// across restarts).
    pub current: Vec<IpAddr>,
    /// From `vmlb.io/loadBalancerIPs` or `spec.loadBalancerIP`, at most one per family.
    pub wanted: Vec<IpAddr>,
    /// From `vmlb.io/address-pool`.
    pub pool: Option<String>,
}

/// What a Service is given: one address per served family, primary first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allocated {
    pub ips: Vec<IpAddr>,
    /// PreferDualStack families that could not be given, with why (said in the condition).
    pub left_out: Vec<(Family, NoAddress)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NoAddress {
    NotInPool(IpAddr),
    Taken {
        ip: IpAddr,
        by: String,
    },
    NoSuchPool(String),
    Exhausted(Family),
    /// RequireDualStack and one family cannot be given: the Service gets neither, so that it
    /// is never served half without saying so.
    Required {
        family: Family,
        why: Box<NoAddress>,
    },
    /// The request itself cannot be read (a bad annotation).
    Invalid(String),
}

impl fmt::Display for NoAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NoAddress::NotInPool(ip) => write!(f, "{ip} is in no vmlb address pool"),
            NoAddress::Taken { ip, by } => write!(f, "{ip} is already allocated to {by}"),
            NoAddress::NoSuchPool(p) => write!(f, "address pool {p:?} does not exist"),
            NoAddress::Exhausted(fam) => {
                write!(f, "no free {fam} address in the eligible pools")
            }
            NoAddress::Required { family, why } => write!(
                f,
                "ipFamilyPolicy RequireDualStack: no {family} address ({why}), so neither \
                 family is served"
            ),
            NoAddress::Invalid(m) => f.write_str(m),
        }
    }
}

/// Gives every request one address per family, or a reason. Pure and deterministic: the same
/// pools and requests give the same answer on every node and every leader.
pub fn allocate(
    pools: &[Pool],
    requests: &[Request],
) -> BTreeMap<String, Result<Allocated, NoAddress>> {
    // A RequireDualStack Service that fails one family must not hold its other family's
    // address: the round is run again without it, until no such failure is left (each run
    // removes at least one Service, and a removal only frees addresses for the others).
    let mut failed: BTreeMap<String, Result<Allocated, NoAddress>> = BTreeMap::new();
    loop {
        let rest: Vec<&Request> = requests
            .iter()
            .filter(|r| !failed.contains_key(&r.key))
            .collect();
        let got = allocate_round(pools, &rest);
        let before = failed.len();
        for r in &rest {
            if r.policy == Policy::RequireDualStack && got[&r.key].is_err() {
                failed.insert(r.key.clone(), got[&r.key].clone());
            }
        }
        if failed.len() == before {
            return got.into_iter().chain(failed).collect();
        }
    }
}

fn allocate_round(
    pools: &[Pool],
    requests: &[&Request],
) -> BTreeMap<String, Result<Allocated, NoAddress>> {
    // One sub-request per (Service, family), each decided as a single-family Service would
    // be; `used` is shared, so no address is given twice.
    struct Sub<'a> {
        r: &'a Request,
        family: Family,
        current: Option<IpAddr>,
        wanted: Option<IpAddr>,
    }
    let of = |l: &[IpAddr], f: Family| l.iter().copied().find(|ip| Family::of(*ip) == f);
    let mut order: Vec<Sub> = requests
        .iter()
        .flat_map(|&r| {
            r.families.iter().map(move |&family| Sub {
                r,
                family,
                current: of(&r.current, family),
                wanted: of(&r.wanted, family),
            })
        })
        .collect();
    order.sort_by(|a, b| {
        (&a.r.created, &a.r.key, a.family).cmp(&(&b.r.created, &b.r.key, b.family))
    });
    let in_pool = |ip: IpAddr, name: Option<&String>| {
        pools
            .iter()
            .any(|p| p.contains(ip) && name.is_none_or(|n| *n == p.name))
    };
    let mut used: BTreeMap<IpAddr, &str> = BTreeMap::new();
    let mut got: BTreeMap<(&str, Family), Result<IpAddr, NoAddress>> = BTreeMap::new();
    // 1. Keep what status already holds if it still fits the request: a restart or a new leader
    //    changes nothing. Oldest first, so a later duplicate (two leaders racing) loses. An
    //    address outside every pool is kept too (unless a pool is named): a pools file that is
    //    wrong or missing for a moment must not take every VIP away.
    for s in &order {
        let Some(ip) = s.current else { continue };
        let fits = s.wanted.is_none_or(|w| w == ip)
            && s.r.pool.as_ref().is_none_or(|name| in_pool(ip, Some(name)));
        if fits && !used.contains_key(&ip) {
            used.insert(ip, &s.r.key);
            got.insert((&s.r.key, s.family), Ok(ip));
        }
    }
    // 2. Explicit requests, then 3. automatic assignment.
    for pass in [true, false] {
        for s in &order {
            if got.contains_key(&(s.r.key.as_str(), s.family)) || s.wanted.is_some() != pass {
                continue;
            }
            let res = match (s.wanted, &s.r.pool) {
                (_, Some(p)) if !pools.iter().any(|x| &x.name == p) => {
                    Err(NoAddress::NoSuchPool(p.clone()))
                }
                (Some(ip), _) if !in_pool(ip, s.r.pool.as_ref()) => Err(NoAddress::NotInPool(ip)),
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
                        .find_map(|p| p.first_free(s.family, &used))
                        .ok_or(NoAddress::Exhausted(s.family))
                }
            };
            if let Ok(ip) = res {
                used.insert(ip, &s.r.key);
            }
            got.insert((&s.r.key, s.family), res);
        }
    }
    requests
        .iter()
        .map(|r| {
            let mut ips = Vec::new();
            let mut left_out = Vec::new();
            for &f in &r.families {
                match got.remove(&(r.key.as_str(), f)) {
                    Some(Ok(ip)) => ips.push(ip),
                    Some(Err(e)) => left_out.push((f, e)),
                    None => left_out.push((f, NoAddress::Exhausted(f))),
                }
            }
            let res = match (r.policy, left_out.is_empty()) {
                (_, true) => Ok(Allocated { ips, left_out }),
                (Policy::RequireDualStack, false) => {
                    let (family, why) = left_out.swap_remove(0);
                    Err(NoAddress::Required {
                        family,
                        why: Box::new(why),
                    })
                }
                // PreferDualStack serves what it can; nothing at all is a failure.
                (Policy::PreferDualStack, false) if !ips.is_empty() => {
                    Ok(Allocated { ips, left_out })
                }
                (_, false) => Err(left_out.swap_remove(0).1),
            };
            (r.key.clone(), res)
        })
        .collect()
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
            families: vec![Family::V4],
            policy: Policy::SingleStack,
            current: Vec::new(),
            wanted: Vec::new(),
            pool: None,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// The single address given (single-stack requests).
    fn one(r: &Result<Allocated, NoAddress>) -> Result<IpAddr, NoAddress> {
        r.clone().map(|a| {
            assert_eq!(a.ips.len(), 1, "{a:?}");
            a.ips[0]
        })
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
        assert_eq!(
            parse_range("fd00:10:10:1::1000/120").unwrap(),
            (ip("fd00:10:10:1::1000"), ip("fd00:10:10:1::10ff"))
        );
        assert_eq!(
            parse_range("fd00::5 - fd00::9").unwrap(),
            (ip("fd00::5"), ip("fd00::9"))
        );
        assert_eq!(
            parse_range("::/0").unwrap().1,
            ip("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")
        );
        assert_eq!(
            parse_range("fd00::1/128").unwrap(),
            (ip("fd00::1"), ip("fd00::1"))
        );
        for bad in [
            "10.0.0.9-10.0.0.5",
            "10.0.0.0/33",
            "fd00::/129",
            "fd00::9-fd00::5",
            "10.0.0.1-fd00::1",
            "x",
            "10.0.0.1",
            "fd00::1",
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
        assert_eq!(
            one(&got["default/a"]),
            Ok(ip("10.10.1.128")),
            "oldest first"
        );
        assert_eq!(one(&got["default/b"]), Ok(ip("10.10.1.129")));
    }

    #[test]
    fn status_is_kept_across_restarts_even_when_a_lower_address_is_free() {
        let pools = [pool("p", &["10.10.1.128/25"], true)];
        let mut a = req("ns/a", "1");
        a.current = vec![ip("10.10.1.140")];
        let got = allocate(&pools, &[a.clone(), req("ns/b", "2")]);
        assert_eq!(one(&got["ns/a"]), Ok(ip("10.10.1.140")));
        assert_eq!(one(&got["ns/b"]), Ok(ip("10.10.1.128")));
        // Same input, same answer: what a new leader computes.
        assert_eq!(got, allocate(&pools, &[req("ns/b", "2"), a]));
    }

    #[test]
    fn an_address_is_never_taken_away_because_the_pools_changed() {
        let mut a = req("ns/a", "1");
        a.current = vec![ip("10.10.1.140")];
        assert_eq!(
            one(&allocate(&[], &[a.clone()])["ns/a"]),
            Ok(ip("10.10.1.140"))
        );
        // Naming a pool that does not hold it moves it.
        a.pool = Some("p".into());
        let pools = [pool("p", &["10.0.0.0/30"], false)];
        assert_eq!(one(&allocate(&pools, &[a])["ns/a"]), Ok(ip("10.0.0.0")));
    }

    #[test]
    fn duplicate_status_goes_to_the_older_service() {
        let pools = [pool("p", &["10.10.1.128/30"], true)];
        let (mut a, mut b) = (req("ns/a", "1"), req("ns/b", "2"));
        a.current = vec![ip("10.10.1.129")];
        b.current = vec![ip("10.10.1.129")];
        let got = allocate(&pools, &[b, a]);
        assert_eq!(one(&got["ns/a"]), Ok(ip("10.10.1.129")));
        assert_eq!(
            one(&got["ns/b"]),
            Ok(ip("10.10.1.128")),
            "the younger one is moved"
        );
    }

    #[test]
    fn explicit_requests_must_be_in_a_pool_and_free() {
        let pools = [pool("p", &["10.10.1.128/25"], false)];
        let (mut a, mut b, mut c) = (req("ns/a", "1"), req("ns/b", "2"), req("ns/c", "3"));
        a.wanted = vec![ip("10.10.1.130")];
        b.wanted = vec![ip("10.10.1.130")];
        c.wanted = vec![ip("10.10.1.5")];
        let d = req("ns/d", "4");
        let got = allocate(&pools, &[a, b, c, d]);
        assert_eq!(
            one(&got["ns/a"]),
            Ok(ip("10.10.1.130")),
            "autoAssign does not limit requests"
        );
        assert_eq!(
            one(&got["ns/b"]),
            Err(NoAddress::Taken {
                ip: ip("10.10.1.130"),
                by: "ns/a".into()
            })
        );
        assert_eq!(
            one(&got["ns/c"]),
            Err(NoAddress::NotInPool(ip("10.10.1.5")))
        );
        assert_eq!(
            one(&got["ns/d"]),
            Err(NoAddress::Exhausted(Family::V4)),
            "no autoAssign pool"
        );
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
        assert_eq!(one(&got["ns/a"]), Ok(ip("10.0.1.10")));
        assert_eq!(one(&got["ns/b"]), Err(NoAddress::NoSuchPool("nope".into())));
        assert_eq!(one(&got["ns/c"]), Ok(ip("10.0.0.0")));
        assert_eq!(one(&got["ns/d"]), Ok(ip("10.0.0.1")));
        assert_eq!(one(&got["ns/e"]), Err(NoAddress::Exhausted(Family::V4)));
    }

    #[test]
    fn avoid_buggy_ips_and_huge_pools() {
        let mut p = pool("p", &["10.0.0.0/8"], true);
        p.avoid_buggy_ips = true;
        let reqs: Vec<_> = (0..300).map(|i| req(&format!("ns/s{i:03}"), "1")).collect();
        let got = allocate(&[p], &reqs);
        assert_eq!(one(&got["ns/s000"]), Ok(ip("10.0.0.1")));
        assert_eq!(one(&got["ns/s253"]), Ok(ip("10.0.0.254")));
        assert_eq!(
            one(&got["ns/s254"]),
            Ok(ip("10.0.1.1")),
            ".255 and .0 skipped"
        );
        let distinct: BTreeSet<_> = got.values().map(|r| one(r).unwrap()).collect();
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

    fn dual(key: &str, created: &str, policy: Policy) -> Request {
        Request {
            families: vec![Family::V4, Family::V6],
            policy,
            ..req(key, created)
        }
    }

    #[test]
    fn a_mixed_pool_gives_each_family_its_own_addresses() {
        let text = "apiVersion: metallb.io/v1beta1\nkind: IPAddressPool\nmetadata: {name: dual}\n\
                    spec: {addresses: [10.10.1.128/25, 'fd00:10:10:1::1000/120']}\n";
        let pools = parse_pools_yaml(text).unwrap();
        assert!(pools[0].has(Family::V4) && pools[0].has(Family::V6));
        assert!(pools[0].contains(ip("fd00:10:10:1::10ff")));
        assert!(!pools[0].contains(ip("fd00:10:10:1::1100")));
        let v6 = Request {
            families: vec![Family::V6],
            ..req("ns/v6", "1")
        };
        let got = allocate(
            &pools,
            &[
                v6,
                dual("ns/both", "2", Policy::RequireDualStack),
                req("ns/v4", "3"),
            ],
        );
        assert_eq!(one(&got["ns/v6"]), Ok(ip("fd00:10:10:1::1000")));
        assert_eq!(
            got["ns/both"].as_ref().unwrap().ips,
            [ip("10.10.1.128"), ip("fd00:10:10:1::1001")],
            "one address per family, in ipFamilies order"
        );
        assert_eq!(one(&got["ns/v4"]), Ok(ip("10.10.1.129")));
    }

    #[test]
    fn avoid_buggy_ips_is_about_ipv4_only() {
        let mut p = pool("p", &["fd00::ff-fd00::100", "10.0.0.255-10.0.1.0"], true);
        p.avoid_buggy_ips = true;
        assert!(p.contains(ip("fd00::100")) && !p.contains(ip("10.0.1.0")));
        let v6 = Request {
            families: vec![Family::V6],
            ..req("ns/a", "1")
        };
        let got = allocate(&[p], &[v6, req("ns/b", "2")]);
        assert_eq!(one(&got["ns/a"]), Ok(ip("fd00::ff")));
        assert_eq!(one(&got["ns/b"]), Err(NoAddress::Exhausted(Family::V4)));
    }

    #[test]
    fn dual_stack_policies_when_a_family_is_missing() {
        // The pools have no IPv6 at all.
        let pools = [pool("p", &["10.10.1.128/30"], true)];
        let got = allocate(
            &pools,
            &[
                dual("ns/prefer", "1", Policy::PreferDualStack),
                dual("ns/require", "2", Policy::RequireDualStack),
            ],
        );
        let prefer = got["ns/prefer"].as_ref().unwrap();
        assert_eq!(prefer.ips, [ip("10.10.1.128")], "served with what there is");
        assert_eq!(
            prefer.left_out,
            [(Family::V6, NoAddress::Exhausted(Family::V6))]
        );
        let Err(e) = &got["ns/require"] else {
            panic!("RequireDualStack half served: {:?}", got["ns/require"])
        };
        assert_eq!(
            e,
            &NoAddress::Required {
                family: Family::V6,
                why: Box::new(NoAddress::Exhausted(Family::V6))
            }
        );
        assert!(e.to_string().contains("neither family is served"), "{e}");
        // Nor does it hold its IPv4 address: a younger Service gets it.
        let got = allocate(
            &[pool("p", &["10.10.1.128/32"], true)],
            &[
                dual("ns/require", "1", Policy::RequireDualStack),
                req("ns/younger", "2"),
            ],
        );
        assert!(got["ns/require"].is_err());
        assert_eq!(one(&got["ns/younger"]), Ok(ip("10.10.1.128")));
        // Kept addresses stay per family, and requests are per family.
        let pools = [pool("p", &["10.10.1.128/30", "fd00::10-fd00::20"], false)];
        let mut a = dual("ns/a", "1", Policy::RequireDualStack);
        a.current = vec![ip("fd00::15")];
        a.wanted = vec![ip("10.10.1.130")];
        let got = allocate(&pools, &[a]);
        assert_eq!(
            got["ns/a"].as_ref().unwrap().ips,
            [ip("10.10.1.130"), ip("fd00::15")]
        );
    }
}
