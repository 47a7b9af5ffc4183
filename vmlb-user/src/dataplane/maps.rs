//! Typed handles on the data path's maps, and the `Dataplane` they implement.

use anyhow::Context as _;
use aya::{
    maps::{Array, HashMap, Map, MapData, PerCpuArray, PerCpuValues},
    Ebpf,
};
use vmlb_common::{
    map_names, Backend, Config, Counter, Flow, FlowKey, FlowRef, Hop, Service, ServiceKey,
    TrafficStats, MAX_SNAT_ADDRS,
};

use std::os::fd::{AsFd as _, AsRawFd as _, OwnedFd};

use super::{pins::PinLayout, Dataplane};
use crate::conntrack::SlotTable;

pub struct BpfMaps {
    pub services: HashMap<MapData, ServiceKey, Service>,
    pub vips: HashMap<MapData, u32, u32>,
    pub backends: Array<MapData, Backend>,
    pub maglev: Array<MapData, u32>,
    /// `maglev`'s descriptor again, for batched writes (aya 0.14 has no batch operations).
    maglev_fd: OwnedFd,
    /// The flow index (client 5-tuple -> slot).
    pub flows: HashMap<MapData, FlowKey, FlowRef>,
    /// The flows (`FLOW_SLOTS`), mapped into this process.
    pub slots: SlotTable,
    pub config: Array<MapData, Config>,
    /// Per-CPU next hops of the backends (the sweeper invalidates them).
    pub hops: PerCpuArray<MapData, Hop>,
    pub stats: PerCpuArray<MapData, u64>,
    pub svc_stats: PerCpuArray<MapData, TrafficStats>,
    pub be_stats: PerCpuArray<MapData, TrafficStats>,
}

fn take(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<Map> {
    ebpf.take_map(name)
        .with_context(|| format!("map {name} missing from the object"))
}

/// A second descriptor of an array map.
fn array_fd(map: &Map) -> anyhow::Result<OwnedFd> {
    match map {
        Map::Array(data) => Ok(data.fd().as_fd().try_clone_to_owned()?),
        _ => anyhow::bail!("not an array map"),
    }
}

/// BPF_MAP_UPDATE_BATCH of `values` at consecutive keys from `base` into an array map: one
/// syscall per 64k entries instead of one per entry (a 16381-slot Maglev table took ~11 ms one
/// entry at a time). Returns false when the kernel has no batch operations for the map.
fn update_batch(fd: &OwnedFd, base: u32, values: &[u32]) -> anyhow::Result<bool> {
    const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
    /// `union bpf_attr`'s `batch` member.
    #[repr(C)]
    struct BatchAttr {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }
    for (n, chunk) in values.chunks(1 << 16).enumerate() {
        let first = base + (n << 16) as u32;
        let keys: Vec<u32> = (first..first + chunk.len() as u32).collect();
        let mut done = 0usize;
        while done < chunk.len() {
            let mut attr = BatchAttr {
                in_batch: 0,
                out_batch: 0,
                keys: keys[done..].as_ptr() as u64,
                values: chunk[done..].as_ptr() as u64,
                count: (chunk.len() - done) as u32,
                map_fd: fd.as_raw_fd() as u32,
                elem_flags: 0,
                flags: 0,
            };
            // SAFETY: attr points at `count` keys and values that outlive the call; the kernel
            // reads them and writes back only `count`.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_bpf,
                    BPF_MAP_UPDATE_BATCH,
                    &mut attr as *mut BatchAttr,
                    std::mem::size_of::<BatchAttr>(),
                )
            };
            if rc < 0 {
                let e = std::io::Error::last_os_error();
                if done == 0 && n == 0 && matches!(e.raw_os_error(), Some(libc::EINVAL | 524)) {
                    // 524: ENOTSUPP, no batch operations for this map or kernel.
                    return Ok(false);
                }
                return Err(e).with_context(|| format!("batch write at {}", first as usize + done));
            }
            anyhow::ensure!(attr.count > 0, "batch write made no progress");
            done += attr.count as usize;
        }
    }
    Ok(true)
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
        let maglev = open(map_names::MAGLEV)?;
        let maglev_fd = array_fd(&maglev)?;
        Ok(Self {
            services: open(map_names::SERVICES)?.try_into()?,
            vips: open(map_names::VIPS)?.try_into()?,
            backends: open(map_names::BACKENDS)?.try_into()?,
            maglev: maglev.try_into()?,
            maglev_fd,
            flows: open(map_names::FLOWS)?.try_into()?,
            slots: slot_table(open(map_names::FLOW_SLOTS)?)?,
            config: open(map_names::CONFIG)?.try_into()?,
            hops: open(map_names::HOPS)?.try_into()?,
            stats: open(map_names::STATS)?.try_into()?,
            svc_stats: open(map_names::SVC_STATS)?.try_into()?,
            be_stats: open(map_names::BE_STATS)?.try_into()?,
        })
    }

    /// Take the maps out of a loaded object (the program keeps its references).
    pub fn from_ebpf(ebpf: &mut Ebpf) -> anyhow::Result<Self> {
        let maglev = take(ebpf, map_names::MAGLEV)?;
        let maglev_fd = array_fd(&maglev)?;
        Ok(Self {
            services: take(ebpf, map_names::SERVICES)?.try_into()?,
            vips: take(ebpf, map_names::VIPS)?.try_into()?,
            backends: take(ebpf, map_names::BACKENDS)?.try_into()?,
            maglev: maglev.try_into()?,
            maglev_fd,
            flows: take(ebpf, map_names::FLOWS)?.try_into()?,
            slots: slot_table(take(ebpf, map_names::FLOW_SLOTS)?)?,
            config: take(ebpf, map_names::CONFIG)?.try_into()?,
            hops: take(ebpf, map_names::HOPS)?.try_into()?,
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

    /// Every live flow, with its slot.
    pub fn live_flows(&self) -> Vec<(u32, Flow)> {
        self.slots.live().collect()
    }

    /// Flow capacity: concurrent flows (`FLOWS`' max_entries), whichever CPUs create them.
    pub fn flow_capacity(&self) -> anyhow::Result<u32> {
        use aya::maps::IterableMap as _;
        Ok(self.flows.map().info()?.max_entries())
    }

    pub fn config(&self) -> anyhow::Result<Config> {
        Ok(self.config.get(&0, 0)?)
    }

    /// Rebuild `Config::vip_filter` from the VIPs in the map (after a removal, and when maps
    /// are taken over, whatever wrote them).
    pub fn refresh_vip_filter(&mut self) -> anyhow::Result<()> {
        let mut filter = [0u32; 4];
        for vip in self.vips.keys() {
            let bit = vmlb_common::vip_filter_bit(vip.context("reading VIPS")?);
            filter[(bit >> 5) as usize] |= 1 << (bit & 31);
        }
        self.update_config(|c| c.vip_filter = filter)
    }

    /// Change the node-wide settings with `f` (read, modify, write: only the daemon writes).
    pub fn update_config(&mut self, f: impl FnOnce(&mut Config)) -> anyhow::Result<()> {
        let mut c = self.config()?;
        f(&mut c);
        self.config.set(0, c, 0).context("writing CONFIG")
    }

    /// Make every CPU look up backend `id`'s next hop again on its next packet (the stamp is
    /// zeroed; the MACs stay as the fallback while the neighbour is being re-resolved).
    pub fn invalidate_hop(&mut self, id: u32) -> anyhow::Result<()> {
        let mut values: Vec<Hop> = self.hops.get(&id, 0)?.iter().copied().collect();
        if values.iter().all(|v| v.stamp == 0) {
            return Ok(());
        }
        for v in &mut values {
            v.stamp = 0;
        }
        self.hops.set(id, PerCpuValues::try_from(values)?, 0)?;
        Ok(())
    }

    /// Settings that follow from the maps and the interface: the slot count (FLOW_SLOTS' size),
    /// the interface and its MAC (the source of frames sent to clients).
    pub fn init_config(&mut self, ifindex: u32, mac: [u8; 6]) -> anyhow::Result<()> {
        let slots = self.slots.len() as u32;
        self.update_config(|c| {
            c.slot_count = slots;
            c.mac = mac;
            c.ifindex = ifindex;
        })?;
        self.refresh_vip_filter()
    }
}

fn slot_table(m: Map) -> anyhow::Result<SlotTable> {
    let Map::Array(data) = m else {
        anyhow::bail!("FLOW_SLOTS is not an array map");
    };
    SlotTable::map(data)
}

impl Dataplane for BpfMaps {
    fn set_backend(&mut self, id: u32, backend: &Backend) -> anyhow::Result<()> {
        self.backends
            .set(id, backend, 0)
            .with_context(|| format!("writing backend {id}"))
    }

    fn write_ring(&mut self, base: u32, table: &[u32]) -> anyhow::Result<()> {
        if update_batch(&self.maglev_fd, base, table)? {
            return Ok(());
        }
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

    fn set_vip(&mut self, vip: u32, flags: u32) -> anyhow::Result<()> {
        // Its filter bit first: the data path never sees a VIP its filter lacks.
        if !vmlb_common::vip_filter_has(&self.config()?.vip_filter, vip) {
            let bit = vmlb_common::vip_filter_bit(vip);
            self.update_config(|c| c.vip_filter[(bit >> 5) as usize] |= 1 << (bit & 31))?;
        }
        self.vips.insert(vip, flags, 0).context("writing a VIP")
    }

    fn remove_vip(&mut self, vip: u32) -> anyhow::Result<()> {
        self.vips.remove(&vip).context("removing a VIP")?;
        self.refresh_vip_filter()
    }

    fn set_snat_addrs(&mut self, addrs: &[std::net::Ipv4Addr]) -> anyhow::Result<()> {
        anyhow::ensure!(
            addrs.len() <= MAX_SNAT_ADDRS,
            "{} SNAT addresses; at most {MAX_SNAT_ADDRS}",
            addrs.len()
        );
        self.update_config(|c| {
            c.snat_addrs = [0; MAX_SNAT_ADDRS];
            for (o, a) in c.snat_addrs.iter_mut().zip(addrs) {
                *o = u32::from_ne_bytes(a.octets());
            }
            c.snat_count = addrs.len() as u32;
        })
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
