//! Reconcile: turn the desired services into the fewest dataplane writes, in an order that is
//! safe under traffic. Pure apart from the `Dataplane` it is handed, so it is tested without root.
//!
//! Ordering rules (each packet sees a consistent state):
//! 1. new or changed backends are written before any table names them;
//! 2. a changed Maglev table goes into free space, then the service value is replaced in one map
//!    update (the switch), and the old space is reused only from the next pass on;
//! 3. backends leaving a service are marked down only after no table names them, which moves
//!    their established flows (weight 0 keeps them: draining).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use anyhow::{bail, Context as _};
use vmlb_common::{
    hash,
    maglev::{self, MaglevBackend},
    Backend, Service, ServiceKey, BE_F_UP, MAX_BACKENDS, MAX_SERVICES, MAX_SNAT_ADDRS,
    MAX_SNAT_PER_SERVICE, SVC_F_SNAT, VIP_F_OWNED,
};

use crate::{
    dataplane::Dataplane,
    model::{BackendSpec, Proto, ServiceSpec},
    ring_alloc::RingAlloc,
};

#[derive(Debug)]
struct Installed {
    spec: ServiceSpec,
    value: Service,
    /// (address, port) -> backend id.
    backend_ids: BTreeMap<(Ipv4Addr, u16), u32>,
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
                let by_id: BTreeMap<u32, (Ipv4Addr, u16)> =
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

#[derive(Debug)]
pub struct Reconciler {
    ring: RingAlloc,
    /// Table space released by the previous pass, reusable from this one on.
    pending_free: Vec<(u32, u32)>,
    services: BTreeMap<ServiceKey, Installed>,
    /// Installed VIPs and their `VIP_F_*` flags.
    vips: BTreeMap<u32, u32>,
    /// The VIPs this node owns (answers ARP for); `None`: all of them (file mode).
    owned: Option<BTreeSet<u32>>,
    service_ids: IdPool,
    backend_ids: IdPool,
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
        }
    }

    /// Rebuild the in-memory state from what a previous daemon left in the maps (pinned), so the
    /// next `apply` of the same configuration writes nothing and established flows keep their
    /// backend ids. `ring(base, len)` reads a table from the `MAGLEV` array.
    pub fn adopt(
        ring_entries: u32,
        (max_services, max_backends): (u32, u32),
        services: &[(ServiceKey, Service)],
        backends: &[(u32, Backend)],
        ring: impl Fn(u32, u32) -> anyhow::Result<Vec<u32>>,
    ) -> anyhow::Result<Self> {
        let mut r = Self::with_limits(ring_entries, max_services, max_backends);
        // Each service's backends, found once rather than by a scan per service.
        let mut by_service: BTreeMap<u32, Vec<(u32, &Backend)>> = BTreeMap::new();
        for (id, b) in backends.iter().filter(|(_, b)| b.addr != 0) {
            by_service.entry(b.service_id).or_default().push((*id, b));
        }
        for (key, value) in services {
            if !r.ring.reserve(value.ring_base, value.ring_size) {
                bail!(
                    "pinned service {} has a Maglev table at {}+{} that overlaps another or lies                      outside the array",
                    value.id,
                    value.ring_base,
                    value.ring_size
                );
            }
            r.service_ids.mark_used(value.id);
            let mut backend_ids = BTreeMap::new();
            let mut specs = Vec::new();
            for &(id, b) in by_service.get(&value.id).into_iter().flatten() {
                let addr = Ipv4Addr::from(b.addr.to_ne_bytes());
                let port = u16::from_be(b.port);
                r.backend_ids.mark_used(id);
                backend_ids.insert((addr, port), id);
                // The weight is not in the maps; only `up` and the table are compared later.
                specs.push(BackendSpec {
                    addr,
                    port,
                    weight: 0,
                    up: b.flags & BE_F_UP != 0,
                });
            }
            let spec = ServiceSpec {
                vip: Ipv4Addr::from(key.vip.to_ne_bytes()),
                port: u16::from_be(key.port),
                proto: Proto::from_number(key.proto).with_context(|| {
                    format!("pinned service {} has protocol {}", value.id, key.proto)
                })?,
                snat: value.snat_addrs[..(value.snat_count as usize).min(MAX_SNAT_PER_SERVICE)]
                    .iter()
                    .map(|a| Ipv4Addr::from(a.to_ne_bytes()))
                    .collect(),
                snat_ports: (
                    value.port_min,
                    value
                        .port_min
                        .saturating_add(value.port_range.saturating_sub(1)),
                ),
                ring_size: value.ring_size,
                backends: specs,
            };
            let table = ring(value.ring_base, value.ring_size)?;
            // Pinned by an earlier daemon; file mode (owning every VIP) wrote the same value.
            r.vips.insert(key.vip, VIP_F_OWNED);
            r.services.insert(
                *key,
                Installed {
                    spec,
                    value: *value,
                    backend_ids,
                    table,
                    digest: Default::default(),
                },
            );
        }
        Ok(r)
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
    pub fn service(&self, key: &ServiceKey) -> Option<&Service> {
        self.services.get(key).map(|i| &i.value)
    }

    /// Backend id assigned to `addr:port` in the service `key`.
    pub fn backend_id(&self, key: &ServiceKey, addr: Ipv4Addr, port: u16) -> Option<u32> {
        self.services
            .get(key)?
            .backend_ids
            .get(&(addr, port))
            .copied()
    }

    /// `observe::digest` of a service's installed table (ids read as the addresses they stand
    /// for), computed once per installed table.
    pub fn table_digest(&self, key: &ServiceKey) -> Option<u64> {
        self.services.get(key).map(Installed::digest)
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
    pub fn table(&self, key: &ServiceKey) -> Option<&[u32]> {
        self.services.get(key).map(|i| i.table.as_slice())
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
                    "service {}:{}: Maglev size {} is not one of {:?}",
                    spec.vip,
                    spec.port,
                    spec.ring_size,
                    maglev::RING_SIZES
                );
            }
            if !wanted.insert(spec.key()) {
                bail!(
                    "service {}:{}/{:?} is defined twice",
                    spec.vip,
                    spec.port,
                    spec.proto
                );
            }
        }

        // SNAT addresses: the data path must know a new one (to translate its replies) before
        // any flow uses it, and forgets an old one only after no service names it.
        let installed_snat: BTreeSet<Ipv4Addr> = self
            .services
            .values()
            .flat_map(|i| i.spec.snat.iter().copied())
            .collect();
        let desired_snat: BTreeSet<Ipv4Addr> = desired
            .iter()
            .flat_map(|s| s.snat.iter().copied())
            .collect();
        let both: BTreeSet<Ipv4Addr> = installed_snat.union(&desired_snat).copied().collect();
        if desired_snat.len() > MAX_SNAT_ADDRS {
            bail!(
                "{} SNAT addresses in use; a node supports at most {MAX_SNAT_ADDRS}",
                desired_snat.len()
            );
        }
        // During a change from one full set to another the union may not fit: then the new
        // set is written first (replies to a retired address pass to the kernel meanwhile).
        let during = if both.len() <= MAX_SNAT_ADDRS {
            &both
        } else {
            &desired_snat
        };
        if *during != installed_snat {
            dp.set_snat_addrs(&during.iter().copied().collect::<Vec<_>>())?;
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
                        "service {}:{}/{:?}",
                        spec.vip, spec.port, spec.proto
                    )));
                }
            }
        }

        let gone: Vec<ServiceKey> = self
            .services
            .keys()
            .filter(|k| !wanted.contains(k))
            .copied()
            .collect();
        for key in gone {
            let inst = self.services.remove(&key).expect("listed above");
            dp.remove_service(&key)?;
            for &id in inst.backend_ids.values() {
                dp.set_backend(id, &Backend::default())?;
                self.backend_ids.release(id);
            }
            self.pending_free
                .push((inst.value.ring_base, inst.value.ring_size));
            self.service_ids.release(inst.value.id);
            summary.services_removed += 1;
        }

        self.write_vips(dp)?;
        if *during != desired_snat {
            dp.set_snat_addrs(&desired_snat.iter().copied().collect::<Vec<_>>())?;
        }
        Ok(summary)
    }

    /// Which VIPs this node owns: `None` owns every VIP (file mode), else only these (the
    /// Kubernetes source's election). Returns the VIPs whose ownership changed, with the new
    /// state, so the caller can announce the ones taken (gratuitous ARP).
    pub fn set_ownership(
        &mut self,
        owned: Option<BTreeSet<Ipv4Addr>>,
        dp: &mut impl Dataplane,
    ) -> anyhow::Result<Vec<(Ipv4Addr, bool)>> {
        self.owned = owned.map(|s| s.iter().map(|a| u32::from_ne_bytes(a.octets())).collect());
        self.write_vips(dp)
    }

    /// The VIPs this node answers ARP for now.
    pub fn owned_vips(&self) -> Vec<Ipv4Addr> {
        self.vips
            .iter()
            .filter(|(_, f)| *f & VIP_F_OWNED != 0)
            .map(|(v, _)| Ipv4Addr::from(v.to_ne_bytes()))
            .collect()
    }

    /// Bring `VIPS` to the installed services' VIPs with their ownership flags; returns the
    /// ownership changes of VIPs that stay.
    fn write_vips(&mut self, dp: &mut impl Dataplane) -> anyhow::Result<Vec<(Ipv4Addr, bool)>> {
        let want: BTreeMap<u32, u32> = self
            .services
            .keys()
            .map(|k| {
                let owned = self.owned.as_ref().is_none_or(|o| o.contains(&k.vip));
                (k.vip, if owned { VIP_F_OWNED } else { 0 })
            })
            .collect();
        let mut changed = Vec::new();
        for (vip, flags) in &want {
            let before = self.vips.get(vip).copied();
            if before != Some(*flags) {
                dp.set_vip(*vip, *flags)?;
                if before.is_none_or(|b| b & VIP_F_OWNED != flags & VIP_F_OWNED) {
                    changed.push((Ipv4Addr::from(vip.to_ne_bytes()), flags & VIP_F_OWNED != 0));
                }
            }
        }
        for vip in self.vips.keys().filter(|v| !want.contains_key(v)) {
            dp.remove_vip(*vip)?;
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
            Some(p) => p.value.id,
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
        let prev_spec_backends: BTreeMap<(Ipv4Addr, u16), _> = prev
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
                bail!("backend {}:{} is listed twice", b.addr, b.port);
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
                let value = Backend {
                    addr: u32::from_ne_bytes(b.addr.octets()),
                    port: b.port.to_be(),
                    _pad: 0,
                    flags: if b.up { BE_F_UP } else { 0 },
                    service_id: id,
                };
                dp.set_backend(bid, &value)?;
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
        let (snat_addrs, snat_count) = snat_pool(&spec.snat)?;
        let (port_min, port_max) = spec.snat_ports;
        let port_range = hash::prime_range(port_min, port_max);
        let same_snat = |v: &Service| {
            v.snat_addrs == snat_addrs
                && v.snat_count == snat_count
                && v.port_min == port_min
                && v.port_range == port_range
        };
        let value = match prev {
            Some(p) if p.table == table && same_snat(&p.value) => p.value,
            _ => {
                let ring_base = self.ring.alloc(spec.ring_size)?;
                dp.write_ring(ring_base, &table)?;
                let value = Service {
                    id,
                    flags: SVC_F_SNAT,
                    snat_addrs,
                    snat_count,
                    ring_base,
                    ring_size: spec.ring_size,
                    port_min,
                    port_range,
                };
                dp.set_service(&key, &value)?;
                if let Some(p) = prev {
                    self.pending_free
                        .push((p.value.ring_base, p.value.ring_size));
                }
                summary.tables_swapped += 1;
                value
            }
        };

        // 3. Backends that left: down, so their flows move (no table names them any more).
        for (k, bid) in &prev_ids {
            if !backend_ids.contains_key(k) {
                dp.set_backend(*bid, &Backend::default())?;
                self.backend_ids.release(*bid);
                summary.backends_written += 1;
            }
        }

        Ok(Installed {
            spec: spec.clone(),
            value,
            backend_ids,
            table,
            digest: Default::default(),
        })
    }
}

/// Tables built ahead of the writes, by service; entries are positions in the service's
/// backends + 1 (see `Reconciler::prebuild`).
type PrebuiltTables = BTreeMap<ServiceKey, Result<Vec<u32>, maglev::MaglevError>>;

/// Whether a service installed as `prev` keeps its table as `spec`: the same backends
/// (addresses, weights and health, so the same ids and keys) and ring size give the same table.
fn same_table(prev: &ServiceSpec, spec: &ServiceSpec) -> bool {
    prev.backends == spec.backends && prev.ring_size == spec.ring_size
}

/// Backend `b` as the table builder sees it, with `id` as its id.
fn member(id: u32, b: &BackendSpec) -> MaglevBackend {
    MaglevBackend {
        id,
        key: maglev::backend_key(b.addr.octets(), b.port),
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

/// A service's SNAT pool as the data path stores it.
fn snat_pool(addrs: &[Ipv4Addr]) -> anyhow::Result<([u32; MAX_SNAT_PER_SERVICE], u32)> {
    if addrs.is_empty() || addrs.len() > MAX_SNAT_PER_SERVICE {
        anyhow::bail!(
            "a service needs 1 to {MAX_SNAT_PER_SERVICE} SNAT addresses, not {}",
            addrs.len()
        );
    }
    let mut out = [0u32; MAX_SNAT_PER_SERVICE];
    for (o, a) in out.iter_mut().zip(addrs) {
        *o = u32::from_ne_bytes(a.octets());
    }
    Ok((out, addrs.len() as u32))
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
            addr: Ipv4Addr::new(10, 10, 1, last),
            port: 80,
            weight,
            up,
        }
    }

    fn svc(port: u16, backends: Vec<BackendSpec>) -> ServiceSpec {
        ServiceSpec {
            vip: VIP,
            port,
            proto: Proto::Tcp,
            snat: vec![Ipv4Addr::new(10, 10, 1, 125)],
            snat_ports: (vmlb_common::SNAT_PORT_MIN, vmlb_common::SNAT_PORT_MAX),
            ring_size: 251,
            backends,
        }
    }

    /// The table the data path would read for a service, through the installed service value.
    fn live_table(dp: &FakeDataplane, key: &ServiceKey) -> Vec<u32> {
        let s = dp.services[key];
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
            .map(|b| member(r.backend_id(&key, b.addr, b.port).unwrap(), b))
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
                assert_eq!(r.table(&spec.key()).unwrap(), want, "{}", spec.port);
                assert_eq!(live_table(&dp, &spec.key()), want, "{}", spec.port);
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
                .find(|&(a, p)| r.backend_id(&key, a, p) == Some(id))
        };
        let want = crate::observe::digest::maglev_digest(
            r.table(&key).unwrap().iter().map(|&id| addr_of(&r, id)),
        );
        r.compute_digests();
        assert_eq!(r.table_digest(&key), Some(want));
        // The same table under ids too far apart for the dense lookup.
        let inst = r.services.get_mut(&key).unwrap();
        let far = |id: u32| if id == 0 { 0 } else { id * 5000 };
        inst.table.iter_mut().for_each(|e| *e = far(*e));
        inst.backend_ids.values_mut().for_each(|id| *id = far(*id));
        inst.digest = Default::default();
        assert_eq!(r.table_digest(&key), Some(want));
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
        assert!(dp.vips.contains(&spec.key().vip));
        let t = live_table(&dp, &spec.key());
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
        let key = svc(80, vec![]).key();
        assert_eq!(dp.services[&key].ring_base, 0);
        let old = live_table(&dp, &key);

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
        let key = svc(80, vec![]).key();
        r.apply(&[svc(80, vec![be(2, 1, true), be(3, 1, true)])], &mut dp)
            .unwrap();
        let id3 = r.backend_id(&key, Ipv4Addr::new(10, 10, 1, 3), 80).unwrap();
        dp.log.clear();
        r.apply(&[svc(80, vec![be(3, 1, true)])], &mut dp).unwrap();
        assert_eq!(
            r.backend_id(&key, Ipv4Addr::new(10, 10, 1, 3), 80),
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
        assert!(live_table(&dp, &key).iter().all(|&id| id == id3));
    }

    #[test]
    fn down_and_draining_backends_leave_the_table_but_only_down_clears_the_flag() {
        let mut r = Reconciler::new(1000);
        let mut dp = FakeDataplane::default();
        let key = svc(80, vec![]).key();
        r.apply(
            &[svc(
                80,
                vec![be(2, 0, true), be(3, 1, false), be(4, 1, true)],
            )],
            &mut dp,
        )
        .unwrap();
        let t = live_table(&dp, &key);
        let id4 = r.backend_id(&key, Ipv4Addr::new(10, 10, 1, 4), 80).unwrap();
        assert!(t.iter().all(|&id| id == id4));
        let flags = |last| {
            let id = r
                .backend_id(&key, Ipv4Addr::new(10, 10, 1, last), 80)
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
        let key = svc(8080, vec![]).key();
        let v = dp.services[&key];
        assert!(v.id > 2 && v.ring_base >= 2 * 251, "{v:?}");
        let id4 = adopted
            .backend_id(&key, Ipv4Addr::new(10, 10, 1, 4), 80)
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
        let changed = r.set_ownership(Some(BTreeSet::new()), &mut dp).unwrap();
        assert_eq!(changed, vec![(VIP, false)]);
        assert!(r.owned_vips().is_empty());
        assert_eq!(dp.log.len(), 1, "{:?}", dp.log);
        // The same set again writes nothing; taking it back reports it taken.
        assert!(r
            .set_ownership(Some(BTreeSet::new()), &mut dp)
            .unwrap()
            .is_empty());
        let changed = r.set_ownership(Some([VIP].into()), &mut dp).unwrap();
        assert_eq!(changed, vec![(VIP, true)]);
    }
}
