//! IPv6 services for the fixture runner, written straight into the IPv6 maps with the shared
//! Maglev builder: ids from the top of the id spaces and table space from the top of `MAGLEV`,
//! clear of what the reconciler hands out from the bottom for the IPv4 services of the same
//! test. (The reconciler learns IPv6 in a separate change; fixtures then switch to it.)

use std::net::Ipv6Addr;

use anyhow::Context as _;
use aya::maps::{Array, HashMap, MapData};
use vmlb_common::{
    addr6, hash,
    maglev::{self, MaglevBackend},
    map_names6, Backend6, Config6, Service6, ServiceKey6, BE_F_UP, SNAT_PORT_MAX, SNAT_PORT_MIN,
    SVC_F_SNAT, VIP_F_OWNED,
};
use vmlb_user::model::Proto;

use crate::fixture::{Env, SNAT6};

/// An IPv6 service on `vip:port`, full NAT to `SNAT6`, over `backends`.
#[derive(Clone, Debug)]
pub struct Svc6 {
    pub vip: Ipv6Addr,
    pub port: u16,
    pub proto: Proto,
    pub backends: Vec<(Ipv6Addr, u16)>,
}

pub fn svc6(port: u16, proto: Proto, backends: &[(Ipv6Addr, u16)]) -> Svc6 {
    Svc6 {
        vip: crate::fixture::VIP6,
        port,
        proto,
        backends: backends.to_vec(),
    }
}

const RING: u32 = maglev::DEFAULT_RING_SIZE;

impl Env {
    /// Install these IPv6 services (with `SNAT6` as the node's IPv6 SNAT address).
    pub fn install6(&mut self, services: &[Svc6]) -> anyhow::Result<()> {
        let slots = self
            .ebpf
            .map(map_names6::FLOW_SLOTS6)
            .context("FLOW_SLOTS6")?;
        let slot_count = Array::<_, vmlb_common::Flow6>::try_from(slots)?.len();
        let mut cfg6: Array<&mut MapData, Config6> =
            Array::try_from(self.ebpf.map_mut(map_names6::CONFIG6).context("CONFIG6")?)?;
        let mut c = Config6 {
            snat_count: 1,
            slot_count,
            ..Default::default()
        };
        c.snat_addrs[0] = addr6(SNAT6.octets());
        cfg6.set(0, c, 0)?;

        let maglev_len = self.maps.maglev.len();
        let (max_services, max_backends) = (self.maps.svc_stats.len(), self.maps.backends.len());
        let mut backend_id = max_backends;
        for (i, s) in services.iter().enumerate() {
            let id = max_services - 1 - i as u32;
            let ring_base = maglev_len - RING * (i as u32 + 1);
            let mut members = Vec::new();
            let mut backends6: Array<&mut MapData, Backend6> = Array::try_from(
                self.ebpf
                    .map_mut(map_names6::BACKENDS6)
                    .context("BACKENDS6")?,
            )?;
            for &(addr, port) in &s.backends {
                backend_id -= 1;
                backends6.set(
                    backend_id,
                    Backend6 {
                        addr: addr6(addr.octets()),
                        port: port.to_be(),
                        _pad: 0,
                        flags: BE_F_UP,
                        service_id: id,
                    },
                    0,
                )?;
                let mut key = [0u8; 16];
                key.copy_from_slice(&addr.octets());
                members.push(MaglevBackend {
                    id: backend_id,
                    key: maglev::backend_key6(key, port),
                    weight: 1,
                });
            }
            let table = maglev::build(&members, RING).map_err(|e| anyhow::anyhow!("{e}"))?;
            for (j, b) in table.iter().enumerate() {
                self.maps.maglev.set(ring_base + j as u32, b, 0)?;
            }
            let mut snat_addrs = [[0u32; 4]; 4];
            snat_addrs[0] = addr6(SNAT6.octets());
            let value = Service6 {
                id,
                flags: SVC_F_SNAT,
                snat_addrs,
                snat_count: 1,
                ring_base,
                ring_size: RING,
                port_min: SNAT_PORT_MIN,
                port_range: hash::prime_range(SNAT_PORT_MIN, SNAT_PORT_MAX),
            };
            let key = ServiceKey6 {
                vip: addr6(s.vip.octets()),
                port: s.port.to_be(),
                proto: s.proto.number(),
                _pad: 0,
            };
            let mut svcs: HashMap<&mut MapData, ServiceKey6, Service6> = HashMap::try_from(
                self.ebpf
                    .map_mut(map_names6::SERVICES6)
                    .context("SERVICES6")?,
            )?;
            svcs.insert(key, value, 0)?;
            let mut vips: HashMap<&mut MapData, [u32; 4], u32> =
                HashMap::try_from(self.ebpf.map_mut(map_names6::VIPS6).context("VIPS6")?)?;
            vips.insert(addr6(s.vip.octets()), VIP_F_OWNED, 0)?;
        }
        Ok(())
    }
}
