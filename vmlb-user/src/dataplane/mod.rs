//! The boundary between reconcile and the kernel: a handful of idempotent writes. `maps::BpfMaps`
//! implements it on the real maps; tests use `FakeDataplane`.
//!
//! Around it: `loader` (the embedded object and how to load it), `pins` (where the maps and the
//! link live), `attach` (load + attach + pin, adopt a pinned program, upgrade it in place).

pub mod attach;
pub mod loader;
pub mod maps;
pub mod mmap;
pub mod pins;

use std::collections::BTreeMap;

use vmlb_common::{Backend, Service, ServiceKey};

pub trait Dataplane {
    fn set_backend(&mut self, id: u32, backend: &Backend) -> anyhow::Result<()>;
    /// Write a Maglev table at `base` (space no live service points into).
    fn write_ring(&mut self, base: u32, table: &[u32]) -> anyhow::Result<()>;
    fn set_service(&mut self, key: &ServiceKey, service: &Service) -> anyhow::Result<()>;
    fn remove_service(&mut self, key: &ServiceKey) -> anyhow::Result<()>;
    /// Install (or re-flag) a VIP; `flags`: `VIP_F_*`.
    fn set_vip(&mut self, vip: u32, flags: u32) -> anyhow::Result<()>;
    fn remove_vip(&mut self, vip: u32) -> anyhow::Result<()>;
    /// The node's SNAT addresses (every service's pool): packets to them are reply candidates.
    fn set_snat_addrs(&mut self, addrs: &[std::net::Ipv4Addr]) -> anyhow::Result<()>;
    /// Zero the traffic counters of a service id / backend id about to be (re)used, so it does
    /// not inherit a previous holder's numbers.
    fn clear_service_stats(&mut self, id: u32) -> anyhow::Result<()>;
    fn clear_backend_stats(&mut self, id: u32) -> anyhow::Result<()>;
}

/// In-memory dataplane for tests of reconcile.
#[derive(Debug, Default)]
pub struct FakeDataplane {
    pub backends: BTreeMap<u32, Backend>,
    pub ring: BTreeMap<u32, u32>,
    pub services: BTreeMap<ServiceKey, Service>,
    pub vips: std::collections::BTreeSet<u32>,
    pub snat_addrs: Vec<std::net::Ipv4Addr>,
    /// Every write, in order, to check ordering guarantees.
    pub log: Vec<String>,
}

impl Dataplane for FakeDataplane {
    fn set_backend(&mut self, id: u32, backend: &Backend) -> anyhow::Result<()> {
        self.log
            .push(format!("backend {id} flags={}", backend.flags));
        self.backends.insert(id, *backend);
        Ok(())
    }
    fn write_ring(&mut self, base: u32, table: &[u32]) -> anyhow::Result<()> {
        self.log.push(format!("ring {base}+{}", table.len()));
        for (i, id) in table.iter().enumerate() {
            self.ring.insert(base + i as u32, *id);
        }
        Ok(())
    }
    fn set_service(&mut self, key: &ServiceKey, service: &Service) -> anyhow::Result<()> {
        self.log
            .push(format!("service {} ring {}", service.id, service.ring_base));
        self.services.insert(*key, *service);
        Ok(())
    }
    fn remove_service(&mut self, key: &ServiceKey) -> anyhow::Result<()> {
        self.log.push("remove service".into());
        self.services.remove(key);
        Ok(())
    }
    fn set_vip(&mut self, vip: u32, flags: u32) -> anyhow::Result<()> {
        self.log.push(format!("vip {vip:#x} flags={flags}"));
        self.vips.insert(vip);
        Ok(())
    }
    fn remove_vip(&mut self, vip: u32) -> anyhow::Result<()> {
        self.vips.remove(&vip);
        Ok(())
    }
    fn set_snat_addrs(&mut self, addrs: &[std::net::Ipv4Addr]) -> anyhow::Result<()> {
        self.log.push(format!("snat addrs {addrs:?}"));
        self.snat_addrs = addrs.to_vec();
        Ok(())
    }
    fn clear_service_stats(&mut self, id: u32) -> anyhow::Result<()> {
        self.log.push(format!("clear service stats {id}"));
        Ok(())
    }
    fn clear_backend_stats(&mut self, id: u32) -> anyhow::Result<()> {
        self.log.push(format!("clear backend stats {id}"));
        Ok(())
    }
}
