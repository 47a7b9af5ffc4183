//! Reconcile: turn the desired services into the fewest dataplane writes, in an order that is
//! safe under traffic. Pure apart from the `Dataplane` it is handed, so it is tested without root.
//!
//! Ordering rules (each packet sees a consistent state):
//! 1. new or changed backends are written before any table names them;
//! 2. a changed Maglev table goes into free space, then the service value is replaced in one map
//!    update (the switch), and the old space is reused only from the next pass on;
//! 3. backends leaving a service are marked down only after no table names them, which moves
//!    their established flows (weight 0 keeps them: draining).
//!
//! IPv4 and IPv6 services go to their own maps (`SERVICES`/`SERVICES6`, `BACKENDS`/`BACKENDS6`,
//! `VIPS`/`VIPS6`) under the same rules, and share the `MAGLEV` array and the id spaces: a
//! service id or backend id names an entry of one family only.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{bail, Context as _};
use vmlb_common::{
    addr6, hash,
    maglev::{self, MaglevBackend},
    octets6, Addr6, Backend, Backend6, DnatEndpoint, DnatEndpoint6, EndpointKey, EndpointKey6,
    Service, Service6, ServiceKey, ServiceKey6, BE_F_UP, MAX_BACKENDS, MAX_SERVICES,
    MAX_SNAT_ADDRS, MAX_SNAT_PER_SERVICE, SVC_F_DNAT, SVC_F_SNAT, VIP_F_OWNED,
};

use crate::{
    dataplane::Dataplane,
    model::{BackendSpec, Mode, Proto, ServiceSpec, SvcKey},
    ring_alloc::RingAlloc,
};

/// A service's value in its family's map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServiceValue {
    V4(Service),
    V6(Service6),
}

impl ServiceValue {
    pub const fn id(&self) -> u32 {
        match self {
            ServiceValue::V4(s) => s.id,
            ServiceValue::V6(s) => s.id,
        }
    }

    pub const fn ring_base(&self) -> u32 {
        match self {
            ServiceValue::V4(s) => s.ring_base,
            ServiceValue::V6(s) => s.ring_base,
        }
    }

    pub const fn ring_size(&self) -> u32 {
        match self {
            ServiceValue::V4(s) => s.ring_size,
            ServiceValue::V6(s) => s.ring_size,
        }
    }

    pub const fn flags(&self) -> u32 {
        match self {
            ServiceValue::V4(s) => s.flags,
            ServiceValue::V6(s) => s.flags,
        }
    }

    /// The SNAT pool as installed.
    pub fn snat(&self) -> Vec<IpAddr> {
        match self {
            ServiceValue::V4(s) => s.snat_addrs
                [..(s.snat_count as usize).min(MAX_SNAT_PER_SERVICE)]
                .iter()
                .map(|a| IpAddr::V4(Ipv4Addr::from(a.to_ne_bytes())))
                .collect(),
            ServiceValue::V6(s) => s.snat_addrs
                [..(s.snat_count as usize).min(MAX_SNAT_PER_SERVICE)]
                .iter()
                .map(|a| IpAddr::V6(Ipv6Addr::from(octets6(a))))
                .collect(),
        }
    }

    /// SNAT ports as (first, last).
    fn snat_ports(&self) -> (u16, u16) {
        let (min, range) = match self {
            ServiceValue::V4(s) => (s.port_min, s.port_range),
            ServiceValue::V6(s) => (s.port_min, s.port_range),
        };
        (min, min.saturating_add(range.saturating_sub(1)))
    }

    fn with_ring_base(mut self, base: u32) -> Self {
        match &mut self {
            ServiceValue::V4(s) => s.ring_base = base,
            ServiceValue::V6(s) => s.ring_base = base,
        }
        self
    }
}

#[derive(Debug)]
struct Installed {
    spec: ServiceSpec,
    value: ServiceValue,
    /// (address, port) -> backend id.
    backend_ids: BTreeMap<(IpAddr, u16), u32>,
    table: Vec<u32>,
    /// `observe::digest` of `table`, computed when first asked (every state publish asks for
    /// every service's; an unchanged service keeps this `Installed` and so its digest).
    digest: std::sync::OnceLock<u64>,
}

impl Installed {
    /// `observe::digest` of the table, computed on first use.
    fn digest(&self) -> u64 {
        *self.digest.get_or_init(|| {
            // Ids by lookup table: a table names its ids in a pseudo-random order, so a search
            // per slot mispredicts most branches. A service's ids are close together unless
            // backends came and went: a dense array over their span, else a map.
            let lo = self.backend_ids.values().min().copied().unwrap_or(0);
            let hi = self.backend_ids.values().max().copied().unwrap_or(0);
            if hi - lo < 4096 {
                let mut dense = vec![None; (hi - lo + 1) as usize];
                for (&k, &id) in &self.backend_ids {
                    dense[(id - lo) as usize] = Some(k);
                }
                let at = |id: u32| dense.get(id.checked_sub(lo)? as usize).copied().flatten();
                crate::observe::digest::digest_ids(&self.table, at)
            } else {
                let by_id: BTreeMap<u32, (IpAddr, u16)> =
                    self.backend_ids.iter().map(|(&k, &id)| (id, k)).collect();
                crate::observe::digest::digest_ids(&self.table, |id| by_id.get(&id).copied())
            }
        })
    }
}

/// What one pass changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub services_added: usize,
    pub services_removed: usize,
    pub tables_swapped: usize,
    pub backends_written: usize,
}

/// A backend read back from the maps, for `Reconciler::adopt`: (id, address, port, up,
/// service id).
type Adopted = (u32, IpAddr, u16, bool, u32);

#[derive(Debug)]
pub struct Reconciler {
    ring: RingAlloc,
    /// Table space released by the previous pass, reusable from this one on.
    pending_free: Vec<(u32, u32)>,
    services: BTreeMap<SvcKey, Installed>,
    /// Installed VIPs (both families) and their `VIP_F_*` flags.
    vips: BTreeMap<IpAddr, u32>,
    /// The VIPs this node owns (answers ARP/NDP for); `None`: all of them (file mode).
    owned: Option<BTreeSet<IpAddr>>,
    service_ids: IdPool,
    backend_ids: IdPool,
    /// Installed `DNAT_ENDPOINTS` entries.
    dnat: BTreeMap<EndpointKey, DnatEndpoint>,
    /// Installed `DNAT_ENDPOINTS6` entries.
    dnat6: BTreeMap<EndpointKey6, DnatEndpoint6>,
}

impl Reconciler {
    /// `ring_entries`: size of the `MAGLEV` array; the id spaces are the compiled-in sizes.
    pub fn new(ring_entries: u32) -> Self {
        Self::with_limits(ring_entries, MAX_SERVICES, MAX_BACKENDS)
    }

    /// Like `new`, for maps loaded with other sizes (`loader::Sizes::services`/`backends`):
    /// ids stay below `max_services` and `max_backends`.
    pub fn with_limits(ring_entries: u32, max_services: u32, max_backends: u32) -> Self {
        Self {
            ring: RingAlloc::new(ring_entries),
            pending_free: Vec::new(),
            services: BTreeMap::new(),
            vips: BTreeMap::new(),
            owned: None,
            service_ids: IdPool::new(max_services),
            backend_ids: IdPool::new(max_backends),
            dnat: BTreeMap::new(),
            dnat6: BTreeMap::new(),
        }
    }

    /// Rebuild the in-memory state from what a previous daemon left in the maps (pinned), so the
    /// next `apply` of the same configuration writes nothing and established flows keep their
    /// backend ids. `ring(base, len)` reads a table from the `MAGLEV` array. IPv6 services are
    /// added with `adopt6`.
    pub fn adopt(
        ring_entries: u32,
        (max_services, max_backends): (u32, u32),
        services: &[(ServiceKey, Service)],
        backends: &[(u32, Backend)],
        dnat: &[(EndpointKey, DnatEndpoint)],
        ring: impl Fn(u32, u32) -> anyhow::Result<Vec<u32>>,
    ) -> anyhow::Result<Self> {
        let mut r = Self::with_limits(ring_entries, max_services, max_backends);
        r.dnat = dnat.iter().copied().collect();
        let backends: Vec<Adopted> = backends
            .iter()
            .filter(|(_, b)| b.addr != 0)
            .map(|(id, b)| {
                let addr = IpAddr::V4(Ipv4Addr::from(b.addr.to_ne_bytes()));
                (
                    *id,
                    addr,
                    u16::from_be(b.port),
                    b.flags & BE_F_UP != 0,
                    b.service_id,
                )
            })
            .collect();
        let services = services
            .iter()
            .map(|(k, v)| (SvcKey::V4(*k), ServiceValue::V4(*v)));
        r.adopt_services(services, &backends, ring)?;
        Ok(r)
    }

    /// The IPv6 half of `adopt`: `SERVICES6` and `BACKENDS6` as a previous daemon left them
    /// (their ids and table space come from the same pools as IPv4's).
    pub fn adopt6(
        mut self,
        services: &[(ServiceKey6, Service6)],
        backends: &[(u32, Backend6)],
        dnat: &[(EndpointKey6, DnatEndpoint6)],
        ring: impl Fn(u32, u32) -> anyhow::Result<Vec<u32>>,
    ) -> anyhow::Result<Self> {
        self.dnat6 = dnat.iter().copied().collect();
        let backends: Vec<Adopted> = backends
            .iter()
            .filter(|(_, b)| b.addr != [0; 4])
            .map(|(id, b)| {
                let addr = IpAddr::V6(Ipv6Addr::from(octets6(&b.addr)));
                (
                    *id,
                    addr,
                    u16::from_be(b.port),
                    b.flags & BE_F_UP != 0,
                    b.service_id,
                )
            })
            .collect();
        let services = services
            .iter()
            .map(|(k, v)| (SvcKey::V6(*k), ServiceValue::V6(*v)));
        self.adopt_services(services, &backends, ring)?;
        Ok(self)
    }

    fn adopt_services(
        &mut self,
        services: impl Iterator<Item = (SvcKey, ServiceValue)>,
        backends: &[Adopted],
        ring: impl Fn(u32, u32) -> anyhow::Result<Vec<u32>>,
    ) -> anyhow::Result<()> {
        // Each service's backends, found once rather than by a scan per service.
        let mut by_service: BTreeMap<u32, Vec<&Adopted>> = BTreeMap::new();
        for b in backends {
            by_service.entry(b.4).or_default().push(b);
        }
        for (key, value) in services {
            let (id, base, size) = (value.id(), value.ring_base(), value.ring_size());
            if !self.ring.reserve(base, size) {
                bail!(
                    "pinned service {id} has a Maglev table at {base}+{size} that overlaps \
                     another or lies outside the array"
                );
            }
            self.service_ids.mark_used(id);
            let mut backend_ids = BTreeMap::new();
            let mut specs = Vec::new();
            for &&(bid, addr, port, up, _) in by_service.get(&id).into_iter().flatten() {
                self.backend_ids.mark_used(bid);
                backend_ids.insert((addr, port), bid);
                // The weight is not in the maps; only `up` and the table are compared later.
                specs.push(BackendSpec {
                    addr,
                    port,
                    weight: 0,
                    up,
                });
            }
            let (port, proto) = match key {
                SvcKey::V4(k) => (k.port, k.proto),
                SvcKey::V6(k) => (k.port, k.proto),
            };
            let spec = ServiceSpec {
                vip: key.vip(),
                port: u16::from_be(port),
                proto: Proto::from_number(proto)
                    .with_context(|| format!("pinned service {id} has protocol {proto}"))?,
                mode: if value.flags() & SVC_F_DNAT != 0 {
                    Mode::Dnat
                } else {
                    Mode::Snat
                },
                snat: value.snat(),
                snat_ports: value.snat_ports(),
                ring_size: size,
                backends: specs,
            };
            let table = ring(base, size)?;
            // Pinned by an earlier daemon; file mode (owning every VIP) wrote the same value.
            self.vips.insert(key.vip(), VIP_F_OWNED);
            self.services.insert(
                key,
                Installed {
                    spec,
                    value,
                    backend_ids,
                    table,
                    digest: Default::default(),
                },
            );
        }
        Ok(())
    }

    /// Backends installed as down (health), as (address, port) probe targets.
    pub fn down_backends(&self) -> BTreeSet<crate::health::Target> {
        self.services
            .values()
            .flat_map(|i| i.spec.backends.iter())
            .filter(|b| !b.up)
            .map(|b| crate::health::Target {
                addr: b.addr,
                port: b.port,
            })
            .collect()
    }

    /// The installed value of a service, if any.
    pub fn service(&self, key: impl Into<SvcKey>) -> Option<&ServiceValue> {
        self.services.get(&key.into()).map(|i| &i.value)
    }

    /// The installed IPv6 services (for `vmlb inspect` and tests).
    pub fn services6(&self) -> impl Iterator<Item = (&ServiceKey6, &Service6)> {
        self.services
            .iter()
            .filter_map(|(k, i)| match (k, &i.value) {
                (SvcKey::V6(k), ServiceValue::V6(v)) => Some((k, v)),
                _ => None,
            })
    }

    /// Backend id assigned to `addr:port` in the service `key`.
    pub fn backend_id(
        &self,
        key: impl Into<SvcKey>,
        addr: impl Into<IpAddr>,
        port: u16,
    ) -> Option<u32> {
        self.services
            .get(&key.into())?
            .backend_ids
            .get(&(addr.into(), port))
            .copied()
    }

    /// `observe::digest` of a service's installed table (ids read as the addresses they stand
    /// for), computed once per installed table.
    pub fn table_digest(&self, key: impl Into<SvcKey>) -> Option<u64> {
        self.services.get(&key.into()).map(Installed::digest)
    }

    /// Compute the digests not computed yet, on every CPU (at most 4 threads): after a start or
    /// a restart, 1000 tables took ~0.2-0.5 s of byte-at-a-time FNV-1a on one thread before
    /// the daemon could publish its state and report ready. Each table's hash is serial, the
    /// tables are independent.
    pub fn compute_digests(&self) {
        let todo: Vec<&Installed> = self
            .services
            .values()
            .filter(|i| i.digest.get().is_none())
            .collect();
        let threads = build_threads().min(todo.len() / 8);
        if threads <= 1 {
            for i in todo {
                i.digest();
            }
            return;
        }
        std::thread::scope(|scope| {
            for chunk in todo.chunks(todo.len().div_ceil(threads)) {
                scope.spawn(move || {
                    for i in chunk {
                        i.digest();
                    }
                });
            }
        });
    }

    /// The installed Maglev table of a service.
    pub fn table(&self, key: impl Into<SvcKey>) -> Option<&[u32]> {
        self.services.get(&key.into()).map(|i| i.table.as_slice())
    }

    pub fn apply(
        &mut self,
        desired: &[ServiceSpec],
        dp: &mut impl Dataplane,
    ) -> anyhow::Result<Summary> {
        let mut summary = Summary::default();
        for (start, len) in self.pending_free.drain(..) {
            self.ring.free(start, len);
        }
        let mut wanted = BTreeSet::new();
        for spec in desired {
            if !maglev::RING_SIZES.contains(&spec.ring_size) {
                bail!(
                    "service {}: Maglev size {} is not one of {:?}",
                    sock(spec.vip, spec.port),
                    spec.ring_size,
                    maglev::RING_SIZES
                );
            }
            check_family(spec)?;
            if !wanted.insert(spec.key()) {
                bail!(
                    "service {}/{:?} is defined twice",
                    sock(spec.vip, spec.port),
                    spec.proto
                );
            }
        }
        // The sources already refuse this with file and line; checked again because the data
        // path could not tell such services' replies apart.
        let mut dnat_owner = BTreeMap::new();
        for spec in desired.iter().filter(|s| s.mode == Mode::Dnat) {
            for b in &spec.backends {
                if let Some(other) = dnat_owner.insert((b.addr, b.port, spec.proto), spec.key()) {
                    if other != spec.key() {
                        bail!(
                            "endpoint {} serves two dnat services ({} and another)",
                            sock(b.addr, b.port),
                            sock(spec.vip, spec.port)
                        );
                    }
                }
            }
        }

        // SNAT addresses: the data path must know a new one (to translate its replies) before
        // any flow uses it, and forgets an old one only after no service names it.
        let installed_snat = || self.services.values().flat_map(|i| i.spec.snat.iter());
        let desired_snat = || desired.iter().flat_map(|s| s.snat.iter());
        let snat4 = SnatChange::new(
            installed_snat().filter_map(v4).collect(),
            desired_snat().filter_map(v4).collect(),
        )?;
        let snat6 = SnatChange::new(
            installed_snat().filter_map(v6).collect(),
            desired_snat().filter_map(v6).collect(),
        )?;
        if let Some(a) = snat4.first() {
            dp.set_snat_addrs(&a)?;
        }
        if let Some(a) = snat6.first() {
            dp.set_snat_addrs6(&a)?;
        }

        let mut prebuilt = self.prebuild(desired);
        for spec in desired {
            let key = spec.key();
            // Unchanged (same backends, so the same ids, health, weights, ring size and SNAT):
            // `apply_service` would write nothing and keep the same table and value. Skipping
            // it saves copying and comparing a 64 KiB table per service: most of a reload that
            // changes one service of a thousand.
            let prev = match self.services.remove(&key) {
                Some(p) if p.spec == *spec => {
                    self.services.insert(key, p);
                    continue;
                }
                prev => prev,
            };
            let table = prebuilt.remove(&key);
            match self.apply_service(spec, prev.as_ref(), table, dp, &mut summary) {
                Ok(installed) => {
                    self.services.insert(key, installed);
                }
                Err(e) => {
                    // What was installed before is still what the data path uses.
                    if let Some(p) = prev {
                        self.services.insert(key, p);
                    }
                    return Err(e.context(format!(
                        "service {}/{:?}",
                        sock(spec.vip, spec.port),
                        spec.proto
                    )));
                }
            }
        }

        let gone: Vec<SvcKey> = self
            .services
            .keys()
            .filter(|k| !wanted.contains(k))
            .copied()
            .collect();
        for key in gone {
            let inst = self.services.remove(&key).expect("listed above");
            match key {
                SvcKey::V4(k) => dp.remove_service(&k)?,
                SvcKey::V6(k) => dp.remove_service6(&k)?,
            }
            self.unset_endpoints(inst.value.id(), &Endpoints::default(), dp)?;
            for (&(addr, _), &id) in &inst.backend_ids {
                backend_down(dp, addr, id)?;
                self.backend_ids.release(id);
            }
            self.pending_free
                .push((inst.value.ring_base(), inst.value.ring_size()));
            self.service_ids.release(inst.value.id());
            summary.services_removed += 1;
        }

        self.write_vips(dp)?;
        if let Some(a) = snat4.last() {
            dp.set_snat_addrs(&a)?;
        }
        if let Some(a) = snat6.last() {
            dp.set_snat_addrs6(&a)?;
        }
        Ok(summary)
    }

    /// Which VIPs this node owns: `None` owns every VIP (file mode), else only these (the
    /// Kubernetes source's election). Returns the VIPs whose ownership changed, with the new
    /// state, so the caller can announce the ones taken (gratuitous ARP).
    pub fn set_ownership<A: Into<IpAddr> + Copy>(
        &mut self,
        owned: Option<BTreeSet<A>>,
        dp: &mut impl Dataplane,
    ) -> anyhow::Result<Vec<(IpAddr, bool)>> {
        self.owned = owned.map(|s| s.iter().map(|&a| a.into()).collect());
        self.write_vips(dp)
    }

    /// The IPv4 VIPs this node answers ARP for now.
    pub fn owned_vips(&self) -> Vec<Ipv4Addr> {
        self.owned().filter_map(|v| v4(&v)).collect()
    }

    /// The IPv6 VIPs this node owns now (the ones to answer neighbour solicitations for).
    pub fn owned_vips6(&self) -> Vec<Ipv6Addr> {
        self.owned().filter_map(|v| v6(&v)).collect()
    }

    fn owned(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.vips
            .iter()
            .filter(|(_, f)| *f & VIP_F_OWNED != 0)
            .map(|(v, _)| *v)
    }

    /// Bring `VIPS` and `VIPS6` to the installed services' VIPs with their ownership flags;
    /// returns the ownership changes of VIPs that stay.
    fn write_vips(&mut self, dp: &mut impl Dataplane) -> anyhow::Result<Vec<(IpAddr, bool)>> {
        let want: BTreeMap<IpAddr, u32> = self
            .services
            .keys()
            .map(|k| {
                let vip = k.vip();
                let owned = self.owned.as_ref().is_none_or(|o| o.contains(&vip));
                (vip, if owned { VIP_F_OWNED } else { 0 })
            })
            .collect();
        let mut changed = Vec::new();
        for (vip, flags) in &want {
            let before = self.vips.get(vip).copied();
            if before != Some(*flags) {
                match vip {
                    IpAddr::V4(a) => dp.set_vip(u32::from_ne_bytes(a.octets()), *flags)?,
                    IpAddr::V6(a) => dp.set_vip6(addr6(a.octets()), *flags)?,
                }
                if before.is_none_or(|b| b & VIP_F_OWNED != flags & VIP_F_OWNED) {
                    changed.push((*vip, flags & VIP_F_OWNED != 0));
                }
            }
        }
        for vip in self.vips.keys().filter(|v| !want.contains_key(v)) {
            match vip {
                IpAddr::V4(a) => dp.remove_vip(u32::from_ne_bytes(a.octets()))?,
                IpAddr::V6(a) => dp.remove_vip6(addr6(a.octets()))?,
            }
        }
        self.vips = want;
        Ok(changed)
    }

    /// The Maglev tables this pass will build, built up front on every CPU (a first load of
    /// 1000 services spent most of its time building 1000 tables one after another). A table
    /// is built with each backend's position in `spec.backends` (+ 1) as its id, because the
    /// real ids are handed out later, in the ordered writes: the table depends only on the
    /// backends' keys and weights, so `relabel` turns it into the table of the real ids.
    fn prebuild(&self, desired: &[ServiceSpec]) -> PrebuiltTables {
        let todo: Vec<&ServiceSpec> = desired
            .iter()
            .filter(|spec| {
                self.services
                    .get(&spec.key())
                    .is_none_or(|p| !same_table(&p.spec, spec))
            })
            .collect();
        let build = |spec: &ServiceSpec| {
            let members: Vec<MaglevBackend> = (1u32..)
                .zip(&spec.backends)
                .map(|(pos, b)| member(pos, b))
                .collect();
            (spec.key(), maglev::build(&members, spec.ring_size))
        };
        let threads = build_threads().min(todo.len());
        if threads <= 1 {
            return todo.into_iter().map(build).collect();
        }
        std::thread::scope(|scope| {
            let workers: Vec<_> = todo
                .chunks(todo.len().div_ceil(threads))
                .map(|chunk| {
                    scope.spawn(move || chunk.iter().copied().map(build).collect::<Vec<_>>())
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().expect("Maglev builds do not panic"))
                .collect()
        })
    }

    fn apply_service(
        &mut self,
        spec: &ServiceSpec,
        prev: Option<&Installed>,
        prebuilt: Option<Result<Vec<u32>, maglev::MaglevError>>,
        dp: &mut impl Dataplane,
        summary: &mut Summary,
    ) -> anyhow::Result<Installed> {
        let key = spec.key();
        let id = match prev {
            Some(p) => p.value.id(),
            None => {
                summary.services_added += 1;
                let id = self.service_ids.alloc().context("no free service id")?;
                dp.clear_service_stats(id)?;
                id
            }
        };
        let prev_ids = prev
            .as_ref()
            .map(|p| p.backend_ids.clone())
            .unwrap_or_default();
        let prev_spec_backends: BTreeMap<(IpAddr, u16), _> = prev
            .as_ref()
            .map(|p| {
                p.spec
                    .backends
                    .iter()
                    .map(|b| ((b.addr, b.port), *b))
                    .collect()
            })
            .unwrap_or_default();

        // 1. Backends, before any table names them.
        let mut backend_ids = BTreeMap::new();
        // The ids in `spec.backends`' order (`relabel` maps the prebuilt table's positions).
        let mut ids = Vec::with_capacity(spec.backends.len());
        for b in &spec.backends {
            let k = (b.addr, b.port);
            if backend_ids.contains_key(&k) {
                bail!("backend {} is listed twice", sock(b.addr, b.port));
            }
            let bid = match prev_ids.get(&k) {
                Some(&bid) => bid,
                None => {
                    let bid = self.backend_ids.alloc().context("no free backend id")?;
                    dp.clear_backend_stats(bid)?;
                    bid
                }
            };
            backend_ids.insert(k, bid);
            if prev_spec_backends.get(&k).is_none_or(|old| old.up != b.up) {
                let flags = if b.up { BE_F_UP } else { 0 };
                match b.addr {
                    IpAddr::V4(a) => dp.set_backend(
                        bid,
                        &Backend {
                            addr: u32::from_ne_bytes(a.octets()),
                            port: b.port.to_be(),
                            _pad: 0,
                            flags,
                            service_id: id,
                        },
                    )?,
                    IpAddr::V6(a) => dp.set_backend6(
                        bid,
                        &Backend6 {
                            addr: addr6(a.octets()),
                            port: b.port.to_be(),
                            _pad: 0,
                            flags,
                            service_id: id,
                        },
                    )?,
                }
                summary.backends_written += 1;
            }
            ids.push(bid);
        }

        // 2. The table, into fresh space, then the switch. A table is kept when `same_table`:
        // a reload that touches one service of a thousand rebuilds one table, not a thousand.
        let table = match prev {
            Some(p) if same_table(&p.spec, spec) => p.table.clone(),
            _ => {
                let by_position = prebuilt.unwrap_or_else(|| {
                    let members: Vec<MaglevBackend> = (1u32..)
                        .zip(&spec.backends)
                        .map(|(pos, b)| member(pos, b))
                        .collect();
                    maglev::build(&members, spec.ring_size)
                });
                relabel(
                    by_position.map_err(|e| anyhow::anyhow!("Maglev: {e}"))?,
                    &ids,
                )
            }
        };
        // A dnat service's replies are recognised by their source before the service exists.
        let endpoints = Endpoints::of(spec, id, &backend_ids);
        for (k, v) in &endpoints.v4 {
            if self.dnat.get(k) != Some(v) {
                self.dnat.insert(*k, *v);
                dp.set_dnat_endpoint(k, Some(v), self.dnat.len())?;
            }
        }
        for (k, v) in &endpoints.v6 {
            if self.dnat6.get(k) != Some(v) {
                self.dnat6.insert(*k, *v);
                dp.set_dnat_endpoint6(k, Some(v), self.dnat6.len())?;
            }
        }
        let unchanged = prev
            .filter(|p| p.table == table)
            .map(|p| p.value)
            .filter(|v| service_value(spec, id, v.ring_base()).ok() == Some(*v));
        let value = match unchanged {
            Some(v) => v,
            None => {
                let value = service_value(spec, id, 0)?;
                let ring_base = self.ring.alloc(spec.ring_size)?;
                dp.write_ring(ring_base, &table)?;
                let value = value.with_ring_base(ring_base);
                match (&key, &value) {
                    (SvcKey::V4(k), ServiceValue::V4(v)) => dp.set_service(k, v)?,
                    (SvcKey::V6(k), ServiceValue::V6(v)) => dp.set_service6(k, v)?,
                    _ => unreachable!("service_value follows the VIP's family"),
                }
                if let Some(p) = prev {
                    self.pending_free
                        .push((p.value.ring_base(), p.value.ring_size()));
                }
                summary.tables_swapped += 1;
                value
            }
        };

        // 3. Backends that left: down, so their flows move (no table names them any more).
        for (k, bid) in &prev_ids {
            if !backend_ids.contains_key(k) {
                backend_down(dp, k.0, *bid)?;
                self.backend_ids.release(*bid);
                summary.backends_written += 1;
            }
        }
        self.unset_endpoints(id, &endpoints, dp)?;

        Ok(Installed {
            spec: spec.clone(),
            value,
            backend_ids,
            table,
            digest: Default::default(),
        })
    }
}

impl Reconciler {
    /// Remove service `id`'s dnat endpoints that `keep` does not have (an endpoint another
    /// service took over meanwhile is that service's now, and stays).
    fn unset_endpoints(
        &mut self,
        id: u32,
        keep: &Endpoints,
        dp: &mut impl Dataplane,
    ) -> anyhow::Result<()> {
        let stale: Vec<EndpointKey> = self
            .dnat
            .iter()
            .filter(|(k, v)| v.service_id == id && !keep.v4.contains_key(k))
            .map(|(k, _)| *k)
            .collect();
        for k in stale {
            self.dnat.remove(&k);
            dp.set_dnat_endpoint(&k, None, self.dnat.len())?;
        }
        let stale6: Vec<EndpointKey6> = self
            .dnat6
            .iter()
            .filter(|(k, v)| v.service_id == id && !keep.v6.contains_key(k))
            .map(|(k, _)| *k)
            .collect();
        for k in stale6 {
            self.dnat6.remove(&k);
            dp.set_dnat_endpoint6(&k, None, self.dnat6.len())?;
        }
        Ok(())
    }
}

/// A service's `DNAT_ENDPOINTS` / `DNAT_ENDPOINTS6` entries (none unless in dnat mode).
#[derive(Default)]
struct Endpoints {
    v4: BTreeMap<EndpointKey, DnatEndpoint>,
    v6: BTreeMap<EndpointKey6, DnatEndpoint6>,
}

impl Endpoints {
    /// The entries of service `id`'s backends (`backend_ids`: their ids).
    fn of(spec: &ServiceSpec, id: u32, backend_ids: &BTreeMap<(IpAddr, u16), u32>) -> Self {
        let mut e = Self::default();
        if spec.mode != Mode::Dnat {
            return e;
        }
        let (port, proto) = (spec.port.to_be(), spec.proto.number());
        for b in &spec.backends {
            let backend_id = backend_ids[&(b.addr, b.port)];
            match (spec.vip, b.addr) {
                (IpAddr::V4(vip), IpAddr::V4(addr)) => {
                    let key = EndpointKey {
                        addr: u32::from_ne_bytes(addr.octets()),
                        port: b.port.to_be(),
                        proto,
                        _pad: 0,
                    };
                    let value = DnatEndpoint {
                        vip: u32::from_ne_bytes(vip.octets()),
                        port,
                        _pad: 0,
                        service_id: id,
                        backend_id,
                    };
                    e.v4.insert(key, value);
                }
                (IpAddr::V6(vip), IpAddr::V6(addr)) => {
                    let key = EndpointKey6 {
                        addr: addr6(addr.octets()),
                        port: b.port.to_be(),
                        proto,
                        _pad: 0,
                    };
                    let value = DnatEndpoint6 {
                        vip: addr6(vip.octets()),
                        port,
                        _pad: 0,
                        service_id: id,
                        backend_id,
                    };
                    e.v6.insert(key, value);
                }
                // `check_family` refuses mixed services before any write.
                _ => {}
            }
        }
        e
    }
}

/// `addr:port`, IPv6 in brackets.
fn sock(addr: IpAddr, port: u16) -> std::net::SocketAddr {
    std::net::SocketAddr::new(addr, port)
}

fn v4(a: &IpAddr) -> Option<Ipv4Addr> {
    match a {
        IpAddr::V4(a) => Some(*a),
        IpAddr::V6(_) => None,
    }
}

fn v6(a: &IpAddr) -> Option<Ipv6Addr> {
    match a {
        IpAddr::V6(a) => Some(*a),
        IpAddr::V4(_) => None,
    }
}

/// A service is of one family: its backends and SNAT addresses are of its VIP's.
fn check_family(spec: &ServiceSpec) -> anyhow::Result<()> {
    let service = || format!("service {}/{:?}", sock(spec.vip, spec.port), spec.proto);
    let family = |a: &IpAddr| a.is_ipv4();
    if let Some(b) = spec
        .backends
        .iter()
        .find(|b| family(&b.addr) != family(&spec.vip))
    {
        bail!(
            "{}: backend {} is not of the VIP's address family",
            service(),
            sock(b.addr, b.port)
        );
    }
    if let Some(a) = spec.snat.iter().find(|a| family(a) != family(&spec.vip)) {
        bail!(
            "{}: SNAT address {a} is not of the VIP's address family",
            service()
        );
    }
    Ok(())
}

/// Maglev's key of a backend: `maglev::backend_key` for IPv4 (the tables every vmlb version
/// builds), and for IPv6 the same mix chained over the four words of the address, so every
/// byte counts and nodes of one version agree.
fn maglev_key(addr: IpAddr, port: u16) -> u64 {
    match addr {
        IpAddr::V4(a) => maglev::backend_key(a.octets(), port),
        IpAddr::V6(a) => a.octets().chunks_exact(4).fold(0u64, |k, w| {
            let w = u32::from_be_bytes([w[0], w[1], w[2], w[3]]);
            let folded = w ^ (k as u32) ^ ((k >> 32) as u32);
            maglev::backend_key(folded.to_be_bytes(), port) ^ k.rotate_left(17)
        }),
    }
}

/// Mark backend `id` (of `addr`'s family) gone: no address, not up.
fn backend_down(dp: &mut impl Dataplane, addr: IpAddr, id: u32) -> anyhow::Result<()> {
    match addr {
        IpAddr::V4(_) => dp.set_backend(id, &Backend::default()),
        IpAddr::V6(_) => dp.set_backend6(id, &Backend6::default()),
    }
}

/// A node-wide SNAT set of one family (`CONFIG` or `CONFIG6`) across one pass: the union of
/// the installed and the desired addresses while services change, the desired ones after.
struct SnatChange<A> {
    installed: BTreeSet<A>,
    during: BTreeSet<A>,
    desired: BTreeSet<A>,
}

impl<A: Ord + Copy> SnatChange<A> {
    fn new(installed: BTreeSet<A>, desired: BTreeSet<A>) -> anyhow::Result<Self> {
        if desired.len() > MAX_SNAT_ADDRS {
            bail!(
                "{} SNAT addresses of one family in use; a node supports at most \
                 {MAX_SNAT_ADDRS}",
                desired.len()
            );
        }
        let both: BTreeSet<A> = installed.union(&desired).copied().collect();
        // During a change from one full set to another the union may not fit: then the new
        // set is written first (replies to a retired address pass to the kernel meanwhile).
        let during = if both.len() <= MAX_SNAT_ADDRS {
            both
        } else {
            desired.clone()
        };
        Ok(Self {
            installed,
            during,
            desired,
        })
    }

    /// The set to write before services change, if it differs from the installed one.
    fn first(&self) -> Option<Vec<A>> {
        (self.during != self.installed).then(|| self.during.iter().copied().collect())
    }

    /// The set to write after, if the one written first still holds retired addresses.
    fn last(&self) -> Option<Vec<A>> {
        (self.during != self.desired).then(|| self.desired.iter().copied().collect())
    }
}

/// Tables built ahead of the writes, by service; entries are positions in the service's
/// backends + 1 (see `Reconciler::prebuild`).
type PrebuiltTables = BTreeMap<SvcKey, Result<Vec<u32>, maglev::MaglevError>>;

/// Whether a service installed as `prev` keeps its table as `spec`: the same backends
/// (addresses, weights and health, so the same ids and keys) and ring size give the same table.
fn same_table(prev: &ServiceSpec, spec: &ServiceSpec) -> bool {
    prev.backends == spec.backends && prev.ring_size == spec.ring_size
}

/// Backend `b` as the table builder sees it, with `id` as its id.
fn member(id: u32, b: &BackendSpec) -> MaglevBackend {
    MaglevBackend {
        id,
        key: maglev_key(b.addr, b.port),
        weight: if b.up { b.weight } else { 0 },
    }
}

/// A table built with positions (+ 1) as ids, with `ids[position]` instead (EMPTY stays).
fn relabel(mut table: Vec<u32>, ids: &[u32]) -> Vec<u32> {
    for e in &mut table {
        if *e != maglev::EMPTY {
            *e = ids[*e as usize - 1];
        }
    }
    table
}

/// Threads for building tables: the CPUs this process may use, at most 4 (beyond that the
/// writes after the builds dominate).
fn build_threads() -> usize {
    // Asked once: the standard library reads the cgroup files each time.
    static CPUS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CPUS.get_or_init(|| {
        std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(4)
    })
}

/// Ids 1..max, handed out round-robin so a released id is not reused soon: conntrack entries
/// may still name it until they are re-balanced or age out.
#[derive(Debug)]
struct IdPool {
    max: u32,
    next: u32,
    used: BTreeSet<u32>,
}

impl IdPool {
    fn new(max: u32) -> Self {
        Self {
            max,
            next: 1,
            used: BTreeSet::new(),
        }
    }

    fn alloc(&mut self) -> Option<u32> {
        for _ in 1..self.max {
            let id = self.next;
            self.next = if id + 1 >= self.max { 1 } else { id + 1 };
            if self.used.insert(id) {
                return Some(id);
            }
        }
        None
    }

    fn mark_used(&mut self, id: u32) {
        self.used.insert(id);
        self.next = if id + 1 >= self.max { 1 } else { id + 1 };
    }

    fn release(&mut self, id: u32) {
        self.used.remove(&id);
    }
}

/// A service's value as the data path stores it (`ring_base` as given), in its family's type.
fn service_value(spec: &ServiceSpec, id: u32, ring_base: u32) -> anyhow::Result<ServiceValue> {
    let (port_min, port_max) = spec.snat_ports;
    let port_range = hash::prime_range(port_min, port_max);
    let flags = match spec.mode {
        Mode::Snat => SVC_F_SNAT,
        Mode::Dnat => SVC_F_DNAT,
    };
    let snat_count = snat_count(&spec.snat, spec.mode)?;
    Ok(match spec.vip {
        IpAddr::V4(_) => {
            let mut snat_addrs = [0u32; MAX_SNAT_PER_SERVICE];
            for (o, a) in snat_addrs.iter_mut().zip(spec.snat.iter().filter_map(v4)) {
                *o = u32::from_ne_bytes(a.octets());
            }
            ServiceValue::V4(Service {
                id,
                flags,
                snat_addrs,
                snat_count,
                ring_base,
                ring_size: spec.ring_size,
                port_min,
                port_range,
            })
        }
        IpAddr::V6(_) => {
            let mut snat_addrs: [Addr6; MAX_SNAT_PER_SERVICE] = [[0; 4]; MAX_SNAT_PER_SERVICE];
            for (o, a) in snat_addrs.iter_mut().zip(spec.snat.iter().filter_map(v6)) {
                *o = addr6(a.octets());
            }
            ServiceValue::V6(Service6 {
                id,
                flags,
                snat_addrs,
                snat_count,
                ring_base,
                ring_size: spec.ring_size,
                port_min,
                port_range,
            })
        }
    })
}

/// How many SNAT addresses a service's pool holds (none in dnat mode).
fn snat_count(addrs: &[IpAddr], mode: Mode) -> anyhow::Result<u32> {
    if mode == Mode::Dnat {
        anyhow::ensure!(addrs.is_empty(), "a dnat service has no SNAT addresses");
        return Ok(0);
    }
    if addrs.is_empty() || addrs.len() > MAX_SNAT_PER_SERVICE {
        anyhow::bail!(
            "a service needs 1 to {MAX_SNAT_PER_SERVICE} SNAT addresses, not {}",
            addrs.len()
        );
    }
    Ok(addrs.len() as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        dataplane::FakeDataplane,
        model::{BackendSpec, Proto},
    };

    const VIP: Ipv4Addr = Ipv4Addr::new(10, 10, 1, 128);

    fn be(last: u8, weight: u32, up: bool) -> BackendSpec {
        BackendSpec {
            addr: Ipv4Addr::new(10, 10, 1, last).into(),
            port: 80,
            weight,
            up,
        }
    }

    fn svc(port: u16, backends: Vec<BackendSpec>) -> ServiceSpec {
        ServiceSpec {
            vip: VIP.into(),
            port,
            proto: Proto::Tcp,
            mode: Default::default(),
            snat: vec![Ipv4Addr::new(10, 10, 1, 125).into()],
            snat_ports: (vmlb_common::SNAT_PORT_MIN, vmlb_common::SNAT_PORT_MAX),
            ring_size: 251,
            backends,
        }
    }

    /// The `SERVICES` key of an IPv4 service.
    fn key4(spec: &ServiceSpec) -> ServiceKey {
        match spec.key() {
            SvcKey::V4(k) => k,
            SvcKey::V6(_) => panic!("an IPv4 service"),
        }
    }

    /// The table the data path would read for a service, through the installed service value.
    fn live_table(dp: &FakeDataplane, key: impl Into<SvcKey>) -> Vec<u32> {
        let SvcKey::V4(key) = key.into() else {
            panic!("an IPv4 service")
        };
        let s = dp.services[&key];
        (s.ring_base..s.ring_base + s.ring_size)
            .map(|i| dp.ring[&i])
            .collect()
    }

    /// What `maglev::build` gives with the ids the reconciler assigned.
    fn direct_table(r: &Reconciler, spec: &ServiceSpec) -> Vec<u32> {
        let key = spec.key();
        let members: Vec<MaglevBackend> = spec
            .backends
            .iter()
            .map(|b| member(r.backend_id(key, b.addr, b.port).unwrap(), b))
            .collect();
        maglev::build(&members, spec.ring_size).unwrap()
    }

    #[test]
    fn tables_built_ahead_by_position_are_the_tables_of_the_real_ids() {
        // Enough services for several build threads; weights, a down backend, and ids that
        // are not positions (ids are handed out in service order, and a change reuses some).
        let specs = |extra: bool| -> Vec<ServiceSpec> {
            (0..9u16)
                .map(|k| {
                    let mut b = vec![be(9, 3, true), be(2, 1, true), be(5, 1, k % 3 != 0)];
                    if extra || k % 2 == 0 {
                        b.insert(1, be(40 + k as u8, 2, true));
                    }
                    svc(80 + k, b)
                })
                .collect()
        };
        let mut r = Reconciler::new(100 * 251);
        let mut dp = FakeDataplane::default();
        for extra in [false, true, false] {
            r.apply(&specs(extra), &mut dp).unwrap();
            for spec in specs(extra) {
                let want = direct_table(&r, &spec);
                assert_eq!(r.table(spec.key()).unwrap(), want, "{}", spec.port);
                assert_eq!(live_table(&dp, spec.key()), want, "{}", spec.port);
            }
        }
    }

    #[test]
    fn digests_name_addresses_whatever_the_ids_and_are_computed_once() {
        let spec = svc(80, vec![be(2, 1, true), be(3, 2, true), be(4, 1, false)]);
        let key = spec.key();
        let mut r = Reconciler::new(1000);
        r.apply(std::slice::from_ref(&spec), &mut FakeDataplane::default())
            .unwrap();
        // What the slots send to, straight from the addresses.
        let addr_of = |r: &Reconciler, id: u32| {
            spec.backends
                .iter()
                .map(|b| (b.addr, b.port))
                .find(|&(a, p)| r.backend_id(key, a, p) == Some(id))
        };
        let want = crate::observe::digest::maglev_digest(
            r.table(key).unwrap().iter().map(|&id| addr_of(&r, id)),
        );
        r.compute_digests();
        assert_eq!(r.table_digest(key), Some(want));
        // The same table under ids too far apart for the dense lookup.
        let inst = r.services.get_mut(&key).unwrap();
        let far = |id: u32| if id == 0 { 0 } else { id * 5000 };
        inst.table.iter_mut().for_each(|e| *e = far(*e));
        inst.backend_ids.values_mut().for_each(|id| *id = far(*id));
        inst.digest = Default::default();
        assert_eq!(r.table_digest(key), Some(want));
    }

    #[test]
    fn install_writes_backends_before_the_table_and_the_service_last() {
        let mut r = Reconciler::new(1000);
        let mut dp = FakeDataplane::default();
        let spec = svc(80, vec![be(2, 1, true), be(3, 1, true)]);
        let s = r.apply(std::slice::from_ref(&spec), &mut dp).unwrap();
        assert_eq!(s.services_added, 1);
        assert_eq!(
            dp.log,
            [
                "snat addrs [10.10.1.125]",
                "clear service stats 1",
                "clear backend stats 1",
                "backend 1 flags=1",
                "clear backend stats 2",
                "backend 2 flags=1",
                "ring 0+251",
                "service 1 ring 0",
                &format!("vip {:#x} flags=1", u32::from_ne_bytes(VIP.octets())),
            ]
        );
        assert!(dp.vips.contains(&key4(&spec).vip));
        let t = live_table(&dp, key4(&spec));
        assert!(t.iter().all(|&id| id == 1 || id == 2));
    }

    #[test]
    fn unchanged_config_writes_nothing() {
        let mut r = Reconciler::new(1000);
        let mut dp = FakeDataplane::default();
        let spec = [svc(80, vec![be(2, 1, true)])];
        r.apply(&spec, &mut dp).unwrap();
        dp.log.clear();
        let s = r.apply(&spec, &mut dp).unwrap();
        assert_eq!(s, Summary::default());
        assert!(dp.log.is_empty(), "{:?}", dp.log);
    }

    #[test]
    fn a_changed_table_goes_to_fresh_space_and_old_space_is_reused_later() {
        let mut r = Reconciler::new(600);
        let mut dp = FakeDataplane::default();
        r.apply(&[svc(80, vec![be(2, 1, true)])], &mut dp).unwrap();
        let key = key4(&svc(80, vec![]));
        assert_eq!(dp.services[&key].ring_base, 0);
        let old = live_table(&dp, key);

        r.apply(&[svc(80, vec![be(2, 1, true), be(3, 1, true)])], &mut dp)
            .unwrap();
        // The new table lives elsewhere; the old range was not overwritten during the swap.
        assert_eq!(dp.services[&key].ring_base, 251);
        let old_range: Vec<u32> = (0..251).map(|i| dp.ring[&i]).collect();
        assert_eq!(old_range, old);

        // The next change may reuse the first range.
        r.apply(&[svc(80, vec![be(3, 1, true)])], &mut dp).unwrap();
        assert_eq!(dp.services[&key].ring_base, 0);
    }

    #[test]
    fn backend_ids_are_stable_and_a_removed_backend_is_marked_down_after_the_swap() {
        let mut r = Reconciler::new(1000);
        let mut dp = FakeDataplane::default();
        let key = key4(&svc(80, vec![]));
        r.apply(&[svc(80, vec![be(2, 1, true), be(3, 1, true)])], &mut dp)
            .unwrap();
        let id3 = r.backend_id(key, Ipv4Addr::new(10, 10, 1, 3), 80).unwrap();
        dp.log.clear();
        r.apply(&[svc(80, vec![be(3, 1, true)])], &mut dp).unwrap();
        assert_eq!(
            r.backend_id(key, Ipv4Addr::new(10, 10, 1, 3), 80),
            Some(id3)
        );
        let swap = dp
            .log
            .iter()
            .position(|l| l.starts_with("service"))
            .unwrap();
        let down = dp
            .log
            .iter()
            .position(|l| l == "backend 1 flags=0")
            .unwrap();
        assert!(swap < down, "{:?}", dp.log);
        assert!(live_table(&dp, key).iter().all(|&id| id == id3));
    }

    #[test]
    fn down_and_draining_backends_leave_the_table_but_only_down_clears_the_flag() {
        let mut r = Reconciler::new(1000);
        let mut dp = FakeDataplane::default();
        let key = key4(&svc(80, vec![]));
        r.apply(
            &[svc(
                80,
                vec![be(2, 0, true), be(3, 1, false), be(4, 1, true)],
            )],
            &mut dp,
        )
        .unwrap();
        let t = live_table(&dp, key);
        let id4 = r.backend_id(key, Ipv4Addr::new(10, 10, 1, 4), 80).unwrap();
        assert!(t.iter().all(|&id| id == id4));
        let flags = |last| {
            let id = r
                .backend_id(key, Ipv4Addr::new(10, 10, 1, last), 80)
                .unwrap();
            dp.backends[&id].flags
        };
        assert_eq!((flags(2), flags(3), flags(4)), (BE_F_UP, 0, BE_F_UP));
    }

    #[test]
    fn removing_the_last_service_of_a_vip_removes_the_vip() {
        let mut r = Reconciler::new(1000);
        let mut dp = FakeDataplane::default();
        r.apply(
            &[
                svc(80, vec![be(2, 1, true)]),
                svc(443, vec![be(2, 1, true)]),
            ],
            &mut dp,
        )
        .unwrap();
        r.apply(&[svc(443, vec![be(2, 1, true)])], &mut dp).unwrap();
        assert_eq!(dp.services.len(), 1);
        assert_eq!(dp.vips.len(), 1);
        let s = r.apply(&[], &mut dp).unwrap();
        assert_eq!(s.services_removed, 1);
        assert!(dp.services.is_empty() && dp.vips.is_empty());
        assert!(dp.backends.values().all(|b| b.flags == 0));
    }

    #[test]
    fn an_adopted_state_needs_no_writes_for_the_same_config() {
        let mut r = Reconciler::new(1000);
        let mut dp = FakeDataplane::default();
        let desired = [
            svc(80, vec![be(2, 1, true), be(3, 1, false)]),
            svc(443, vec![be(2, 1, true)]),
        ];
        r.apply(&desired, &mut dp).unwrap();
        let services: Vec<_> = dp.services.iter().map(|(k, v)| (*k, *v)).collect();
        let backends: Vec<_> = dp.backends.iter().map(|(k, v)| (*k, *v)).collect();
        let ring = dp.ring.clone();
        let mut adopted = Reconciler::adopt(
            1000,
            (MAX_SERVICES, MAX_BACKENDS),
            &services,
            &backends,
            &[],
            |base, len| Ok((base..base + len).map(|i| ring[&i]).collect()),
        )
        .unwrap();
        dp.log.clear();
        let s = adopted.apply(&desired, &mut dp).unwrap();
        assert_eq!(s, Summary::default());
        assert!(dp.log.is_empty(), "{:?}", dp.log);
        // New ids do not collide with adopted ones, and new tables avoid adopted ring space.
        adopted
            .apply(
                &[
                    desired[0].clone(),
                    desired[1].clone(),
                    svc(8080, vec![be(4, 1, true)]),
                ],
                &mut dp,
            )
            .unwrap();
        let key = key4(&svc(8080, vec![]));
        let v = dp.services[&key];
        assert!(v.id > 2 && v.ring_base >= 2 * 251, "{v:?}");
        let id4 = adopted
            .backend_id(key, Ipv4Addr::new(10, 10, 1, 4), 80)
            .unwrap();
        assert!(id4 > 3);
    }

    #[test]
    fn invalid_input_is_rejected_before_any_write() {
        let mut r = Reconciler::new(1000);
        let mut dp = FakeDataplane::default();
        let mut bad = svc(80, vec![be(2, 1, true)]);
        bad.ring_size = 1000;
        let err = r.apply(&[bad], &mut dp).unwrap_err().to_string();
        assert!(err.contains("Maglev size 1000"), "{err}");
        let twice = svc(80, vec![be(2, 1, true)]);
        let err = r
            .apply(&[twice.clone(), twice], &mut dp)
            .unwrap_err()
            .to_string();
        assert!(err.contains("defined twice"), "{err}");
        assert!(dp.log.is_empty());
    }

    #[test]
    fn full_maglev_array_is_a_clear_error() {
        let mut r = Reconciler::new(300);
        let mut dp = FakeDataplane::default();
        let err = r
            .apply(
                &[svc(80, vec![be(2, 1, true)]), svc(81, vec![be(2, 1, true)])],
                &mut dp,
            )
            .unwrap_err();
        assert!(
            format!("{err:#}").contains("no free range of 251"),
            "{err:#}"
        );
    }

    #[test]
    fn ownership_flags_follow_the_owned_set_and_report_changes() {
        let mut r = Reconciler::new(1000);
        let mut dp = FakeDataplane::default();
        r.apply(&[svc(80, vec![be(2, 1, true)])], &mut dp).unwrap();
        assert_eq!(r.owned_vips(), vec![VIP], "file mode owns every VIP");
        dp.log.clear();
        let changed = r
            .set_ownership(Some(BTreeSet::<IpAddr>::new()), &mut dp)
            .unwrap();
        assert_eq!(changed, vec![(VIP.into(), false)]);
        assert!(r.owned_vips().is_empty());
        assert_eq!(dp.log.len(), 1, "{:?}", dp.log);
        // The same set again writes nothing; taking it back reports it taken.
        assert!(r
            .set_ownership(Some(BTreeSet::<IpAddr>::new()), &mut dp)
            .unwrap()
            .is_empty());
        let changed = r.set_ownership(Some([VIP].into()), &mut dp).unwrap();
        assert_eq!(changed, vec![(VIP.into(), true)]);
    }

    fn dnat(port: u16, backends: Vec<BackendSpec>) -> ServiceSpec {
        ServiceSpec {
            mode: Mode::Dnat,
            snat: Vec::new(),
            ..svc(port, backends)
        }
    }

    /// A dnat service's endpoints are installed before the service (its first reply must be
    /// recognised), follow its backends, and leave with it or when it turns to snat.
    #[test]
    fn dnat_endpoints_come_before_the_service_and_follow_it() {
        let mut r = Reconciler::new(100_000);
        let mut dp = FakeDataplane::default();
        r.apply(&[dnat(80, vec![be(2, 1, true), be(3, 1, true)])], &mut dp)
            .unwrap();
        let first_endpoint = dp.log.iter().position(|l| l.starts_with("dnat endpoint"));
        let service = dp.log.iter().position(|l| l.starts_with("service"));
        assert!(first_endpoint < service, "{:?}", dp.log);
        assert_eq!(dp.dnat_endpoints.len(), 2);
        let value = dp.services.values().next().unwrap();
        assert_eq!((value.flags, value.snat_count), (SVC_F_DNAT, 0));

        r.apply(&[dnat(80, vec![be(3, 1, true)])], &mut dp).unwrap();
        assert_eq!(dp.dnat_endpoints.len(), 1);
        // To snat: the endpoints go, after the service value changed.
        dp.log.clear();
        r.apply(&[svc(80, vec![be(3, 1, true)])], &mut dp).unwrap();
        assert!(dp.dnat_endpoints.is_empty());
        let service = dp.log.iter().position(|l| l.starts_with("service"));
        let removed = dp.log.iter().position(|l| l.starts_with("remove dnat"));
        assert!(service < removed, "{:?}", dp.log);
        // And back, then away.
        r.apply(&[dnat(80, vec![be(3, 1, true)])], &mut dp).unwrap();
        assert_eq!(dp.dnat_endpoints.len(), 1);
        r.apply(&[], &mut dp).unwrap();
        assert!(dp.dnat_endpoints.is_empty());
    }

    #[test]
    fn an_endpoint_in_two_dnat_services_is_refused() {
        let mut r = Reconciler::new(100_000);
        let mut dp = FakeDataplane::default();
        let err = r
            .apply(
                &[
                    dnat(80, vec![be(2, 1, true)]),
                    dnat(81, vec![be(2, 1, true)]),
                ],
                &mut dp,
            )
            .unwrap_err();
        assert!(
            err.to_string().contains("serves two dnat services"),
            "{err}"
        );
        assert!(dp.log.is_empty(), "nothing written: {:?}", dp.log);
    }

    const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, 0x128);

    fn be6(last: u16, weight: u32, up: bool) -> BackendSpec {
        BackendSpec {
            addr: Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, last).into(),
            port: 80,
            weight,
            up,
        }
    }

    fn svc6(port: u16, backends: Vec<BackendSpec>) -> ServiceSpec {
        ServiceSpec {
            vip: VIP6.into(),
            snat: vec![Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, 0x125).into()],
            ..svc(port, backends)
        }
    }

    fn key6(spec: &ServiceSpec) -> ServiceKey6 {
        match spec.key() {
            SvcKey::V6(k) => k,
            SvcKey::V4(_) => panic!("an IPv6 service"),
        }
    }

    /// An IPv6 service takes the IPv4 path's order (SNAT set, stats, backends, table, service,
    /// VIP) on the v6 maps, with ids and table space from the shared pools.
    #[test]
    fn an_ipv6_service_goes_to_the_v6_maps_in_the_same_order() {
        let mut r = Reconciler::new(1000);
        let mut dp = FakeDataplane::default();
        let v4 = svc(80, vec![be(2, 1, true)]);
        let v6 = svc6(80, vec![be6(2, 1, true), be6(3, 1, true)]);
        r.apply(&[v4.clone(), v6.clone()], &mut dp).unwrap();
        assert_eq!(
            dp.log,
            [
                "snat addrs [10.10.1.125]",
                "snat6 addrs [fd00:10::125]",
                "clear service stats 1",
                "clear backend stats 1",
                "backend 1 flags=1",
                "ring 0+251",
                "service 1 ring 0",
                "clear service stats 2",
                "clear backend stats 2",
                "backend6 2 flags=1",
                "clear backend stats 3",
                "backend6 3 flags=1",
                "ring 251+251",
                "service6 2 ring 251",
                &format!("vip {:#x} flags=1", u32::from_ne_bytes(VIP.octets())),
                "vip6 fd00:10::128 flags=1",
            ]
        );
        let s6 = dp.services6[&key6(&v6)];
        assert_eq!((s6.flags, s6.snat_count), (SVC_F_SNAT, 1));
        assert_eq!(
            s6.snat_addrs[0],
            addr6(Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, 0x125).octets())
        );
        let table: Vec<u32> = (s6.ring_base..s6.ring_base + s6.ring_size)
            .map(|i| dp.ring[&i])
            .collect();
        assert!(table.iter().all(|&id| id == 2 || id == 3), "v6 backend ids");
        assert_eq!(dp.backends6[&2].addr, addr6(be6(2, 1, true).addr_octets6()));
        assert!(!dp.backends.contains_key(&2), "an id names one family only");
        assert_eq!(r.owned_vips(), [VIP]);
        assert_eq!(r.owned_vips6(), [VIP6]);
        assert!(dp.snat_addrs.len() == 1 && dp.snat_addrs6.len() == 1);

        // A removed IPv6 backend goes down on BACKENDS6 after the switch; the whole service
        // leaves SERVICES6 and VIPS6, and the v6 SNAT set empties.
        dp.log.clear();
        r.apply(&[v4.clone(), svc6(80, vec![be6(3, 1, true)])], &mut dp)
            .unwrap();
        let switch = dp.log.iter().position(|l| l.starts_with("service6"));
        let down = dp.log.iter().position(|l| l == "backend6 2 flags=0");
        assert!(switch.is_some() && switch < down, "{:?}", dp.log);
        r.apply(std::slice::from_ref(&v4), &mut dp).unwrap();
        assert!(dp.services6.is_empty() && dp.vips6.is_empty());
        assert!(dp.snat_addrs6.is_empty());
        assert_eq!(dp.services.len(), 1);
        assert!(dp.backends6.values().all(|b| *b == Backend6::default()));
    }

    #[test]
    fn mixed_families_are_refused_before_any_write() {
        let mut r = Reconciler::new(1000);
        let mut dp = FakeDataplane::default();
        let cases = [
            (
                svc(80, vec![be6(2, 1, true)]),
                "not of the VIP's address family",
            ),
            (
                ServiceSpec {
                    snat: vec![Ipv4Addr::new(10, 0, 0, 1).into()],
                    ..svc6(80, vec![be6(2, 1, true)])
                },
                "SNAT address 10.0.0.1 is not of the VIP's",
            ),
        ];
        for (spec, want) in cases {
            let e = r.apply(&[spec], &mut dp).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
        assert!(dp.log.is_empty(), "{:?}", dp.log);
    }

    /// IPv6 dnat: its endpoints in `DNAT_ENDPOINTS6`, before the service, following its
    /// backends; an endpoint in two IPv6 dnat services is refused as an IPv4 one is.
    #[test]
    fn ipv6_dnat_endpoints_come_before_the_service_and_follow_it() {
        let mut r = Reconciler::new(100_000);
        let mut dp = FakeDataplane::default();
        let dnat6 = |port: u16, backends: Vec<BackendSpec>| ServiceSpec {
            mode: Mode::Dnat,
            snat: Vec::new(),
            ..svc6(port, backends)
        };
        r.apply(
            &[dnat6(80, vec![be6(2, 1, true), be6(3, 1, true)])],
            &mut dp,
        )
        .unwrap();
        let first_endpoint = dp.log.iter().position(|l| l.starts_with("dnat6 endpoint"));
        let service = dp.log.iter().position(|l| l.starts_with("service6"));
        assert!(first_endpoint < service, "{:?}", dp.log);
        assert_eq!(dp.dnat_endpoints6.len(), 2);
        assert!(dp.dnat_endpoints.is_empty());
        let value = dp.services6.values().next().unwrap();
        assert_eq!((value.flags, value.snat_count), (SVC_F_DNAT, 0));
        let (key, ep) = dp.dnat_endpoints6.iter().next().unwrap();
        assert_eq!(u16::from_be(key.port), 80);
        assert_eq!((ep.vip, u16::from_be(ep.port)), (addr6(VIP6.octets()), 80));

        r.apply(&[dnat6(80, vec![be6(3, 1, true)])], &mut dp)
            .unwrap();
        assert_eq!(dp.dnat_endpoints6.len(), 1);
        r.apply(&[svc6(80, vec![be6(3, 1, true)])], &mut dp)
            .unwrap();
        assert!(dp.dnat_endpoints6.is_empty());
        r.apply(&[dnat6(80, vec![be6(3, 1, true)])], &mut dp)
            .unwrap();
        r.apply(&[], &mut dp).unwrap();
        assert!(dp.dnat_endpoints6.is_empty());

        dp.log.clear();
        let err = r
            .apply(
                &[
                    dnat6(80, vec![be6(2, 1, true)]),
                    dnat6(81, vec![be6(2, 1, true)]),
                ],
                &mut dp,
            )
            .unwrap_err();
        assert!(
            err.to_string().contains("serves two dnat services"),
            "{err}"
        );
        assert!(dp.log.is_empty(), "nothing written: {:?}", dp.log);
    }

    #[test]
    fn an_adopted_ipv6_service_needs_no_writes() {
        let mut r = Reconciler::new(1000);
        let mut dp = FakeDataplane::default();
        let desired = [
            svc(80, vec![be(2, 1, true)]),
            svc6(80, vec![be6(2, 1, true), be6(3, 1, false)]),
        ];
        r.apply(&desired, &mut dp).unwrap();
        let services: Vec<_> = dp.services.iter().map(|(k, v)| (*k, *v)).collect();
        let backends: Vec<_> = dp.backends.iter().map(|(k, v)| (*k, *v)).collect();
        let services6: Vec<_> = dp.services6.iter().map(|(k, v)| (*k, *v)).collect();
        let backends6: Vec<_> = dp.backends6.iter().map(|(k, v)| (*k, *v)).collect();
        let ring = dp.ring.clone();
        let read = |base: u32, len: u32| Ok((base..base + len).map(|i| ring[&i]).collect());
        let mut adopted = Reconciler::adopt(
            1000,
            (MAX_SERVICES, MAX_BACKENDS),
            &services,
            &backends,
            &[],
            read,
        )
        .unwrap()
        .adopt6(&services6, &backends6, &[], read)
        .unwrap();
        dp.log.clear();
        assert_eq!(
            adopted.apply(&desired, &mut dp).unwrap(),
            Summary::default()
        );
        assert!(dp.log.is_empty(), "{:?}", dp.log);
        assert_eq!(adopted.owned_vips6(), [VIP6]);
        assert_eq!(
            adopted
                .down_backends()
                .into_iter()
                .map(|t| t.addr)
                .collect::<Vec<_>>(),
            [be6(3, 1, false).addr]
        );
        // A new service's ids avoid the adopted ones of both families.
        adopted
            .apply(
                &[
                    desired[0].clone(),
                    desired[1].clone(),
                    svc6(443, vec![be6(4, 1, true)]),
                ],
                &mut dp,
            )
            .unwrap();
        let v = dp.services6[&key6(&svc6(443, vec![]))];
        assert!(v.id > 2 && v.ring_base >= 2 * 251, "{v:?}");
    }

    #[test]
    fn ipv6_backend_keys_differ_and_ipv4_keys_are_maglevs() {
        let a = maglev_key(be6(2, 1, true).addr, 80);
        let b = maglev_key(be6(3, 1, true).addr, 80);
        let c = maglev_key(be6(2, 1, true).addr, 81);
        assert!(a != b && a != c && b != c);
        assert_eq!(
            maglev_key(Ipv4Addr::new(10, 0, 0, 1).into(), 80),
            maglev::backend_key([10, 0, 0, 1], 80)
        );
    }

    impl BackendSpec {
        fn addr_octets6(&self) -> [u8; 16] {
            match self.addr {
                IpAddr::V6(a) => a.octets(),
                IpAddr::V4(_) => panic!("IPv6"),
            }
        }
    }
}
