//! The boundary between reconcile and the kernel: a handful of idempotent writes. `maps::BpfMaps`
//! implements it on the real maps; tests use `FakeDataplane`.
//!
//! Around it: `loader` (the embedded object and how to load it), `pins` (where the maps and the
//! link live), `attach` (load + attach + pin, adopt a pinned program, upgrade it in place),
//! `layout` and `migrate` (the pinned layout's version, and moving from an older one).

pub mod attach;
pub mod layout;
pub mod loader;
pub mod maps;
pub mod maps6;
pub mod migrate;
pub mod mmap;
pub mod pins;

use std::collections::BTreeMap;

use vmlb_common::{
    Addr6, Backend, Backend6, DnatEndpoint, DnatEndpoint6, EndpointKey, EndpointKey6, Service,
    Service6, ServiceKey, ServiceKey6,
};

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
    /// Install (`Some`) or remove a dnat backend endpoint; `total`: how many remain installed
    /// after this write (the data path looks reply sources up only while there are any).
    fn set_dnat_endpoint(
        &mut self,
        key: &EndpointKey,
        value: Option<&DnatEndpoint>,
        total: usize,
    ) -> anyhow::Result<()>;

    // IPv6: the same writes on the v6 maps (`BACKENDS6`, `SERVICES6`, `VIPS6`, `CONFIG6`).
    // Backend and service ids share the IPv4 id spaces; tables go to the shared `MAGLEV`
    // through `write_ring`, stats are cleared through the same `clear_*_stats`.
    fn set_backend6(&mut self, id: u32, backend: &Backend6) -> anyhow::Result<()>;
    fn set_service6(&mut self, key: &ServiceKey6, service: &Service6) -> anyhow::Result<()>;
    fn remove_service6(&mut self, key: &ServiceKey6) -> anyhow::Result<()>;
    fn set_vip6(&mut self, vip: Addr6, flags: u32) -> anyhow::Result<()>;
    fn remove_vip6(&mut self, vip: Addr6) -> anyhow::Result<()>;
    /// The node's IPv6 SNAT addresses (`CONFIG6`).
    fn set_snat_addrs6(&mut self, addrs: &[std::net::Ipv6Addr]) -> anyhow::Result<()>;
    /// As `set_dnat_endpoint`, on `DNAT_ENDPOINTS6` (its count in `CONFIG6`).
    fn set_dnat_endpoint6(
        &mut self,
        key: &EndpointKey6,
        value: Option<&DnatEndpoint6>,
        total: usize,
    ) -> anyhow::Result<()>;
}

/// In-memory dataplane for tests of reconcile.
#[derive(Debug, Default)]
pub struct FakeDataplane {
    pub backends: BTreeMap<u32, Backend>,
    pub ring: BTreeMap<u32, u32>,
    pub services: BTreeMap<ServiceKey, Service>,
    pub vips: std::collections::BTreeSet<u32>,
    pub snat_addrs: Vec<std::net::Ipv4Addr>,
    pub dnat_endpoints: BTreeMap<EndpointKey, DnatEndpoint>,
    pub backends6: BTreeMap<u32, Backend6>,
    pub services6: BTreeMap<ServiceKey6, Service6>,
    pub vips6: BTreeMap<Addr6, u32>,
    pub snat_addrs6: Vec<std::net::Ipv6Addr>,
    pub dnat_endpoints6: BTreeMap<EndpointKey6, DnatEndpoint6>,
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
    fn set_dnat_endpoint(
        &mut self,
        key: &EndpointKey,
        value: Option<&DnatEndpoint>,
        total: usize,
    ) -> anyhow::Result<()> {
        match value {
            Some(v) => {
                self.log.push(format!(
                    "dnat endpoint {:#x}:{} service {}",
                    key.addr,
                    u16::from_be(key.port),
                    v.service_id
                ));
                self.dnat_endpoints.insert(*key, *v);
            }
            None => {
                self.log.push(format!(
                    "remove dnat endpoint {:#x}:{}",
                    key.addr,
                    u16::from_be(key.port)
                ));
                self.dnat_endpoints.remove(key);
            }
        }
        assert_eq!(
            self.dnat_endpoints.len(),
            total,
            "the count given is the map's"
        );
        Ok(())
    }

    fn set_backend6(&mut self, id: u32, backend: &Backend6) -> anyhow::Result<()> {
        self.log
            .push(format!("backend6 {id} flags={}", backend.flags));
        self.backends6.insert(id, *backend);
        Ok(())
    }
    fn set_service6(&mut self, key: &ServiceKey6, service: &Service6) -> anyhow::Result<()> {
        self.log.push(format!(
            "service6 {} ring {}",
            service.id, service.ring_base
        ));
        self.services6.insert(*key, *service);
        Ok(())
    }
    fn remove_service6(&mut self, key: &ServiceKey6) -> anyhow::Result<()> {
        self.log.push("remove service6".into());
        self.services6.remove(key);
        Ok(())
    }
    fn set_vip6(&mut self, vip: Addr6, flags: u32) -> anyhow::Result<()> {
        let a = std::net::Ipv6Addr::from(vmlb_common::octets6(&vip));
        self.log.push(format!("vip6 {a} flags={flags}"));
        self.vips6.insert(vip, flags);
        Ok(())
    }
    fn remove_vip6(&mut self, vip: Addr6) -> anyhow::Result<()> {
        self.vips6.remove(&vip);
        Ok(())
    }
    fn set_snat_addrs6(&mut self, addrs: &[std::net::Ipv6Addr]) -> anyhow::Result<()> {
        self.log.push(format!("snat6 addrs {addrs:?}"));
        self.snat_addrs6 = addrs.to_vec();
        Ok(())
    }
    fn set_dnat_endpoint6(
        &mut self,
        key: &EndpointKey6,
        value: Option<&DnatEndpoint6>,
        total: usize,
    ) -> anyhow::Result<()> {
        let ep = std::net::SocketAddr::new(
            std::net::Ipv6Addr::from(vmlb_common::octets6(&key.addr)).into(),
            u16::from_be(key.port),
        );
        match value {
            Some(v) => {
                self.log
                    .push(format!("dnat6 endpoint {ep} service {}", v.service_id));
                self.dnat_endpoints6.insert(*key, *v);
            }
            None => {
                self.log.push(format!("remove dnat6 endpoint {ep}"));
                self.dnat_endpoints6.remove(key);
            }
        }
        assert_eq!(
            self.dnat_endpoints6.len(),
            total,
            "the count given is the map's"
        );
        Ok(())
    }
}
