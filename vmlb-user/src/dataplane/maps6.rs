//! The IPv6 maps (`vmlb_common::abi6`) and their writes. `BpfMaps` holds them as `v6`; its
//! `Dataplane` impl forwards the IPv6 writes here. `MAGLEV`, `HOPS` and the stats are shared
//! with IPv4 and stay in `BpfMaps`.

use anyhow::Context as _;
use aya::maps::{Array, HashMap, Map, MapData};
use vmlb_common::{
    map_names6, octets6, Addr6, Backend6, Config6, DnatEndpoint6, EndpointKey6, Flow6, Service6,
    ServiceKey6, MAX_SNAT_ADDRS,
};

use crate::conntrack::{FlowIndex, SlotTable};

pub struct Maps6 {
    pub services: HashMap<MapData, ServiceKey6, Service6>,
    pub vips: HashMap<MapData, Addr6, u32>,
    pub backends: Array<MapData, Backend6>,
    /// The IPv6 flow index (client 5-tuple -> slot), mapped into this process.
    pub index: FlowIndex,
    /// `FLOW_SLOTS6`, mapped into this process.
    pub slots: SlotTable<Flow6>,
    pub config: Array<MapData, Config6>,
    /// IPv6 dnat backends by the source of their replies.
    pub dnat_endpoints: HashMap<MapData, EndpointKey6, DnatEndpoint6>,
}

impl Maps6 {
    /// The IPv6 maps, each got by `open(name)` (from pins or out of a loaded object).
    pub fn open(mut open: impl FnMut(&str) -> anyhow::Result<Map>) -> anyhow::Result<Self> {
        let slots = match open(map_names6::FLOW_SLOTS6)? {
            Map::Array(data) => SlotTable::map(data)?,
            _ => anyhow::bail!("FLOW_SLOTS6 is not an array map"),
        };
        let index = match open(map_names6::FLOW_INDEX6)? {
            Map::Array(data) => FlowIndex::map(data, map_names6::FLOW_INDEX6)?,
            _ => anyhow::bail!("FLOW_INDEX6 is not an array map"),
        };
        Ok(Self {
            services: open(map_names6::SERVICES6)?.try_into()?,
            vips: open(map_names6::VIPS6)?.try_into()?,
            backends: open(map_names6::BACKENDS6)?.try_into()?,
            index,
            slots,
            config: open(map_names6::CONFIG6)?.try_into()?,
            dnat_endpoints: open(map_names6::DNAT_ENDPOINTS6)?.try_into()?,
        })
    }

    pub fn config(&self) -> anyhow::Result<Config6> {
        Ok(self.config.get(&0, 0)?)
    }

    /// Change the node-wide IPv6 settings with `f` (read, modify, write: only the daemon
    /// writes).
    pub fn update_config(&mut self, f: impl FnOnce(&mut Config6)) -> anyhow::Result<()> {
        let mut c = self.config()?;
        f(&mut c);
        self.config.set(0, c, 0).context("writing CONFIG6")
    }

    /// `CONFIG6`'s sizes from `FLOW_SLOTS6`' and `FLOW_INDEX6`'s.
    pub fn init_config(&mut self) -> anyhow::Result<()> {
        let slots = self.slots.len() as u32;
        let buckets = self.index.buckets();
        self.update_config(|c| {
            c.slot_count = slots;
            c.index_buckets = buckets;
        })?;
        self.refresh_vip_filter()
    }

    /// Rebuild `Config6::vip_filter` from the VIPs in the map (after a removal, and when maps
    /// are taken over, whatever wrote them), as `BpfMaps::refresh_vip_filter` does for IPv4.
    pub fn refresh_vip_filter(&mut self) -> anyhow::Result<()> {
        let mut filter = [0u32; 4];
        for vip in self.vips.keys() {
            set_bit(&mut filter, &vip.context("reading VIPS6")?);
        }
        self.update_config(|c| c.vip_filter = filter)
    }

    /// Flow capacity: concurrent IPv6 flows (`FLOW_INDEX6`'s).
    pub fn flow_capacity(&self) -> anyhow::Result<u32> {
        Ok(self.index.capacity())
    }

    /// Every live IPv6 flow, with its slot.
    pub fn live_flows(&self) -> Vec<(u32, Flow6)> {
        self.slots.live().collect()
    }

    /// Every installed IPv6 service.
    pub fn read_services(&self) -> anyhow::Result<Vec<(ServiceKey6, Service6)>> {
        self.services
            .iter()
            .collect::<Result<_, _>>()
            .context("reading SERVICES6")
    }

    /// The entries of `BACKENDS6` in use (id, value): one lookup per id, as a restart reads
    /// them once.
    pub fn read_backends(&self) -> anyhow::Result<Vec<(u32, Backend6)>> {
        let mut out = Vec::new();
        for id in 0..self.backends.len() {
            let b = self
                .backends
                .get(&id, 0)
                .with_context(|| format!("reading BACKENDS6[{id}]"))?;
            if b.addr != [0; 4] {
                out.push((id, b));
            }
        }
        Ok(out)
    }

    pub fn set_backend(&mut self, id: u32, backend: &Backend6) -> anyhow::Result<()> {
        self.backends
            .set(id, backend, 0)
            .with_context(|| format!("writing IPv6 backend {id}"))
    }

    pub fn set_service(&mut self, key: &ServiceKey6, service: &Service6) -> anyhow::Result<()> {
        self.services
            .insert(key, service, 0)
            .context("writing an IPv6 service")
    }

    pub fn remove_service(&mut self, key: &ServiceKey6) -> anyhow::Result<()> {
        self.services
            .remove(key)
            .context("removing an IPv6 service")
    }

    pub fn set_vip(&mut self, vip: Addr6, flags: u32) -> anyhow::Result<()> {
        // The filter bit first: a VIP must never be missing from it (its source check).
        let old = self.config()?.vip_filter;
        let mut filter = old;
        set_bit(&mut filter, &vip);
        if filter != old {
            self.update_config(|c| c.vip_filter = filter)?;
        }
        self.vips
            .insert(vip, flags, 0)
            .with_context(|| format!("writing VIP {}", ip6(&vip)))
    }

    pub fn remove_vip(&mut self, vip: Addr6) -> anyhow::Result<()> {
        self.vips
            .remove(&vip)
            .with_context(|| format!("removing VIP {}", ip6(&vip)))?;
        self.refresh_vip_filter()
    }

    /// Every installed IPv6 dnat endpoint.
    pub fn read_dnat_endpoints(&self) -> anyhow::Result<Vec<(EndpointKey6, DnatEndpoint6)>> {
        self.dnat_endpoints
            .iter()
            .collect::<Result<_, _>>()
            .context("reading DNAT_ENDPOINTS6")
    }

    /// As `BpfMaps::set_dnat_endpoint`: the count in `CONFIG6` turns the lookup on before the
    /// first entry, and off before the last goes.
    pub fn set_dnat_endpoint(
        &mut self,
        key: &EndpointKey6,
        value: Option<&DnatEndpoint6>,
        total: usize,
    ) -> anyhow::Result<()> {
        let what = || {
            format!(
                "dnat endpoint [{}]:{}",
                ip6(&key.addr),
                u16::from_be(key.port)
            )
        };
        self.update_config(|c| c.dnat_endpoints = total as u32)?;
        match value {
            Some(v) => self
                .dnat_endpoints
                .insert(key, v, 0)
                .with_context(|| format!("writing {}", what())),
            None => match self.dnat_endpoints.remove(key) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
                Err(e) => Err(e).with_context(|| format!("removing {}", what())),
            },
        }
    }

    pub fn set_snat_addrs(&mut self, addrs: &[std::net::Ipv6Addr]) -> anyhow::Result<()> {
        anyhow::ensure!(
            addrs.len() <= MAX_SNAT_ADDRS,
            "{} IPv6 SNAT addresses; at most {MAX_SNAT_ADDRS}",
            addrs.len()
        );
        self.update_config(|c| {
            c.snat_addrs = [[0; 4]; MAX_SNAT_ADDRS];
            for (o, a) in c.snat_addrs.iter_mut().zip(addrs) {
                *o = vmlb_common::addr6(a.octets());
            }
            c.snat_count = addrs.len() as u32;
        })
    }
}

fn ip6(a: &Addr6) -> std::net::Ipv6Addr {
    std::net::Ipv6Addr::from(octets6(a))
}

/// Set `vip`'s bit of a `Config6::vip_filter`.
fn set_bit(filter: &mut [u32; 4], vip: &Addr6) {
    let bit = vmlb_common::vip_filter_bit(vmlb_common::vip6_filter_word(vip));
    filter[(bit >> 5) as usize] |= 1 << (bit & 31);
}
