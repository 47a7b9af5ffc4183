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
    maglev::{self, MaglevBackend},
    Backend, Service, ServiceKey, BE_F_UP, MAX_BACKENDS, MAX_SERVICES, SVC_F_SNAT,
};

use crate::{dataplane::Dataplane, model::ServiceSpec, ring_alloc::RingAlloc};

#[derive(Debug)]
struct Installed {
    spec: ServiceSpec,
    value: Service,
    /// (address, port) -> backend id.
    backend_ids: BTreeMap<(Ipv4Addr, u16), u32>,
    table: Vec<u32>,
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
    vips: BTreeSet<u32>,
    service_ids: IdPool,
    backend_ids: IdPool,
}

impl Reconciler {
    /// `ring_entries`: size of the `MAGLEV` array.
    pub fn new(ring_entries: u32) -> Self {
        Self {
            ring: RingAlloc::new(ring_entries),
            pending_free: Vec::new(),
            services: BTreeMap::new(),
            vips: BTreeSet::new(),
            service_ids: IdPool::new(MAX_SERVICES),
            backend_ids: IdPool::new(MAX_BACKENDS),
        }
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
                bail!("service {}:{}/{:?} is defined twice", spec.vip, spec.port, spec.proto);
            }
        }

        for spec in desired {
            self.apply_service(spec, dp, &mut summary)
                .with_context(|| format!("service {}:{}/{:?}", spec.vip, spec.port, spec.proto))?;
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

        let vips: BTreeSet<u32> = self.services.keys().map(|k| k.vip).collect();
        for vip in vips.difference(&self.vips) {
            dp.set_vip(*vip)?;
        }
        for vip in self.vips.difference(&vips) {
            dp.remove_vip(*vip)?;
        }
        self.vips = vips;
        Ok(summary)
    }

    fn apply_service(
        &mut self,
        spec: &ServiceSpec,
        dp: &mut impl Dataplane,
        summary: &mut Summary,
    ) -> anyhow::Result<()> {
        let key = spec.key();
        let prev = self.services.remove(&key);
        let id = match &prev {
            Some(p) => p.value.id,
            None => {
                summary.services_added += 1;
                self.service_ids.alloc().context("no free service id")?
            }
        };
        let prev_ids = prev.as_ref().map(|p| p.backend_ids.clone()).unwrap_or_default();
        let prev_spec_backends: BTreeMap<(Ipv4Addr, u16), _> = prev
            .as_ref()
            .map(|p| p.spec.backends.iter().map(|b| ((b.addr, b.port), *b)).collect())
            .unwrap_or_default();

        // 1. Backends, before any table names them.
        let mut backend_ids = BTreeMap::new();
        let mut members = Vec::with_capacity(spec.backends.len());
        for b in &spec.backends {
            let k = (b.addr, b.port);
            if backend_ids.contains_key(&k) {
                bail!("backend {}:{} is listed twice", b.addr, b.port);
            }
            let bid = match prev_ids.get(&k) {
                Some(&bid) => bid,
                None => self.backend_ids.alloc().context("no free backend id")?,
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
            members.push(MaglevBackend {
                id: bid,
                key: maglev::backend_key(b.addr.octets(), b.port),
                weight: if b.up { b.weight } else { 0 },
            });
        }

        // 2. The table, into fresh space, then the switch.
        let table = maglev::build(&members, spec.ring_size)
            .map_err(|e| anyhow::anyhow!("Maglev: {e}"))?;
        let snat_addr = u32::from_ne_bytes(spec.snat.octets());
        let value = match &prev {
            Some(p) if p.table == table && p.value.snat_addr == snat_addr => p.value,
            _ => {
                let ring_base = self.ring.alloc(spec.ring_size)?;
                dp.write_ring(ring_base, &table)?;
                let value = Service {
                    id,
                    flags: SVC_F_SNAT,
                    snat_addr,
                    ring_base,
                    ring_size: spec.ring_size,
                    _pad: 0,
                };
                dp.set_service(&key, &value)?;
                if let Some(p) = &prev {
                    self.pending_free.push((p.value.ring_base, p.value.ring_size));
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

        self.services.insert(
            key,
            Installed {
                spec: spec.clone(),
                value,
                backend_ids,
                table,
            },
        );
        Ok(())
    }
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

    fn release(&mut self, id: u32) {
        self.used.remove(&id);
    }
}
