//! Typed handles on the data path's maps, and the `Dataplane` they implement.

use anyhow::Context as _;
use aya::{
    maps::{Array, HashMap, Map, MapData, PerCpuArray, PerCpuValues},
    Ebpf,
};
use vmlb_common::{
    map_names, Backend, Counter, FlowEntry, FlowKey, Service, ServiceKey, TrafficStats,
};

use super::{pins::PinLayout, Dataplane};

pub struct BpfMaps {
    pub services: HashMap<MapData, ServiceKey, Service>,
    pub vips: HashMap<MapData, u32, u32>,
    pub backends: Array<MapData, Backend>,
    pub maglev: Array<MapData, u32>,
    pub flows: HashMap<MapData, FlowKey, FlowEntry>,
    pub stats: PerCpuArray<MapData, u64>,
    pub svc_stats: PerCpuArray<MapData, TrafficStats>,
    pub be_stats: PerCpuArray<MapData, TrafficStats>,
}

fn take(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<Map> {
    ebpf.take_map(name)
        .with_context(|| format!("map {name} missing from the object"))
}

/// Open a pinned map.
fn open_pinned(layout: &PinLayout, name: &str) -> anyhow::Result<Map> {
    let path = layout.map(name);
    let data = MapData::from_pin(&path)
        .with_context(|| format!("opening pinned map {}", path.display()))?;
    Ok(Map::from_map_data(data)?)
}

impl BpfMaps {
    /// Open the maps a daemon pinned for one interface.
    pub fn from_pins(layout: &PinLayout) -> anyhow::Result<Self> {
        let open = |name| open_pinned(layout, name);
        Ok(Self {
            services: open(map_names::SERVICES)?.try_into()?,
            vips: open(map_names::VIPS)?.try_into()?,
            backends: open(map_names::BACKENDS)?.try_into()?,
            maglev: open(map_names::MAGLEV)?.try_into()?,
            flows: open(map_names::FLOWS)?.try_into()?,
            stats: open(map_names::STATS)?.try_into()?,
            svc_stats: open(map_names::SVC_STATS)?.try_into()?,
            be_stats: open(map_names::BE_STATS)?.try_into()?,
        })
    }

    /// Take the maps out of a loaded object (the program keeps its references).
    pub fn from_ebpf(ebpf: &mut Ebpf) -> anyhow::Result<Self> {
        Ok(Self {
            services: take(ebpf, map_names::SERVICES)?.try_into()?,
            vips: take(ebpf, map_names::VIPS)?.try_into()?,
            backends: take(ebpf, map_names::BACKENDS)?.try_into()?,
            maglev: take(ebpf, map_names::MAGLEV)?.try_into()?,
            flows: take(ebpf, map_names::FLOWS)?.try_into()?,
            stats: take(ebpf, map_names::STATS)?.try_into()?,
            svc_stats: take(ebpf, map_names::SVC_STATS)?.try_into()?,
            be_stats: take(ebpf, map_names::BE_STATS)?.try_into()?,
        })
    }

    /// A global counter summed over CPUs.
    pub fn counter(&self, c: Counter) -> anyhow::Result<u64> {
        let v = self.stats.get(&(c as u32), 0)?;
        Ok(v.iter().sum())
    }

    /// Every counter, summed over CPUs.
    pub fn counters(&self) -> anyhow::Result<Vec<(Counter, u64)>> {
        Counter::ALL
            .iter()
            .map(|&c| Ok((c, self.counter(c)?)))
            .collect()
    }

    fn sum(values: &[TrafficStats]) -> TrafficStats {
        values
            .iter()
            .fold(TrafficStats::default(), |a, v| TrafficStats {
                packets: a.packets + v.packets,
                bytes: a.bytes + v.bytes,
                new_flows: a.new_flows + v.new_flows,
                reply_packets: a.reply_packets + v.reply_packets,
            })
    }

    pub fn service_stats(&self, id: u32) -> anyhow::Result<TrafficStats> {
        Ok(Self::sum(&self.svc_stats.get(&id, 0)?))
    }

    pub fn backend_stats(&self, id: u32) -> anyhow::Result<TrafficStats> {
        Ok(Self::sum(&self.be_stats.get(&id, 0)?))
    }

    /// Every conntrack entry (both directions).
    pub fn flow_entries(&self) -> anyhow::Result<Vec<(FlowKey, FlowEntry)>> {
        Ok(self.flows.iter().collect::<Result<Vec<_>, _>>()?)
    }
}

impl Dataplane for BpfMaps {
    fn set_backend(&mut self, id: u32, backend: &Backend) -> anyhow::Result<()> {
        self.backends
            .set(id, backend, 0)
            .with_context(|| format!("writing backend {id}"))
    }

    fn write_ring(&mut self, base: u32, table: &[u32]) -> anyhow::Result<()> {
        for (i, id) in table.iter().enumerate() {
            self.maglev
                .set(base + i as u32, id, 0)
                .with_context(|| format!("writing Maglev entry {}", base as usize + i))?;
        }
        Ok(())
    }

    fn set_service(&mut self, key: &ServiceKey, service: &Service) -> anyhow::Result<()> {
        self.services
            .insert(key, service, 0)
            .context("writing a service")
    }

    fn remove_service(&mut self, key: &ServiceKey) -> anyhow::Result<()> {
        self.services.remove(key).context("removing a service")
    }

    fn set_vip(&mut self, vip: u32) -> anyhow::Result<()> {
        self.vips.insert(vip, 1, 0).context("writing a VIP")
    }

    fn remove_vip(&mut self, vip: u32) -> anyhow::Result<()> {
        self.vips.remove(&vip).context("removing a VIP")
    }

    fn clear_service_stats(&mut self, id: u32) -> anyhow::Result<()> {
        let zero = PerCpuValues::try_from(vec![TrafficStats::default(); nr_cpus()?])?;
        self.svc_stats
            .set(id, zero, 0)
            .with_context(|| format!("clearing service {id}'s counters"))
    }

    fn clear_backend_stats(&mut self, id: u32) -> anyhow::Result<()> {
        let zero = PerCpuValues::try_from(vec![TrafficStats::default(); nr_cpus()?])?;
        self.be_stats
            .set(id, zero, 0)
            .with_context(|| format!("clearing backend {id}'s counters"))
    }
}

fn nr_cpus() -> anyhow::Result<usize> {
    aya::util::nr_cpus().map_err(|(_, e)| anyhow::anyhow!("reading the possible CPUs: {e}"))
}
