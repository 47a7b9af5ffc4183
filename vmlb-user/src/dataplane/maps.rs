//! Typed handles on the data path's maps, and the `Dataplane` they implement.

use anyhow::Context as _;
use aya::{
    maps::{Array, HashMap, IterableMap, Map, MapData, PerCpuArray, PerCpuValues},
    Ebpf,
};
use tracing::warn;
use vmlb_common::{
    map_names, Backend, Config, Counter, DnatEndpoint, EndpointKey, Flow, Hop, Service, ServiceKey,
    TrafficStats, MAX_SNAT_ADDRS,
};

use std::{
    os::fd::{AsFd as _, AsRawFd as _, RawFd},
    sync::{
        atomic::{fence, AtomicU32, Ordering},
        OnceLock,
    },
};

use super::{maps6::Maps6, mmap, mmap::MappedArray, pins::PinLayout, Dataplane};
use crate::conntrack::{FlowIndex, SlotTable};

pub struct BpfMaps {
    pub services: HashMap<MapData, ServiceKey, Service>,
    pub vips: HashMap<MapData, u32, u32>,
    pub backends: Array<MapData, Backend>,
    pub maglev: Array<MapData, u32>,
    /// `MAGLEV` mapped into this process, mapped on first use (a scrape or a CLI command never
    /// needs it); `None` inside when the map is not BPF_F_MMAPABLE (see `ring_mem`).
    maglev_mem: OnceLock<Option<MappedArray>>,
    /// The flow index (client 5-tuple -> slot), mapped into this process.
    pub index: FlowIndex,
    /// The flows (`FLOW_SLOTS`), mapped into this process.
    pub slots: SlotTable,
    pub config: Array<MapData, Config>,
    /// Per-CPU next hops of the backends (the sweeper invalidates them).
    pub hops: PerCpuArray<MapData, Hop>,
    pub stats: PerCpuArray<MapData, u64>,
    pub svc_stats: PerCpuArray<MapData, TrafficStats>,
    pub be_stats: PerCpuArray<MapData, TrafficStats>,
    /// dnat backends by the source of their replies.
    pub dnat_endpoints: HashMap<MapData, EndpointKey, DnatEndpoint>,
    /// The IPv6 maps of their own (services, VIPs, backends, flows, CONFIG6).
    pub v6: Maps6,
}

fn take(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<Map> {
    ebpf.take_map(name)
        .with_context(|| format!("map {name} missing from the object"))
}

/// An (array) map's descriptor, for the batch operations aya 0.14 lacks; valid while the
/// map handle lives.
fn fd_of<V>(map: &impl IterableMap<u32, V>) -> RawFd {
    map.map().fd().as_fd().as_raw_fd()
}

/// `union bpf_attr`'s `batch` member (BPF_MAP_LOOKUP_BATCH, BPF_MAP_UPDATE_BATCH).
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

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
/// Entries per batch call: bounds the key buffer; the syscall count stays tiny either way.
const BATCH_CHUNK: usize = 1 << 16;

/// One batch syscall; returns how many entries the kernel processed, and its error if any
/// (a lookup that reaches the end of the map reports ENOENT with the entries it did read).
fn batch_call(cmd: libc::c_long, attr: &mut BatchAttr) -> (usize, Option<std::io::Error>) {
    // SAFETY: `attr` is a valid `bpf_attr.batch`; its pointers (set by the callers) point at
    // `count` keys and `count` values that outlive the call, writable for a lookup. The kernel
    // writes back only `count` and, for a lookup, `*out_batch`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut BatchAttr,
            std::mem::size_of::<BatchAttr>(),
        )
    };
    let err = (rc < 0).then(std::io::Error::last_os_error);
    (attr.count as usize, err)
}

/// Whether a batch call failed because the kernel (or this map type) has no batch operations.
fn unsupported(e: &std::io::Error) -> bool {
    // 524: ENOTSUPP.
    matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOTSUP | 524))
}

/// Drive batch calls over `len` entries: `call(done)` handles entries from `done` on and
/// returns how many it did. When the very first call finds no batch support, `single(i)` does
/// every entry one at a time instead. Returns whether the batch path was taken.
fn batched(
    len: usize,
    mut call: impl FnMut(usize) -> (usize, Option<std::io::Error>),
    mut single: impl FnMut(usize) -> anyhow::Result<()>,
) -> anyhow::Result<bool> {
    let mut done = 0;
    while done < len {
        match call(done) {
            // The kernel may leave `count` as it was on this error: trust only `done`.
            (_, Some(e)) if done == 0 && unsupported(&e) => {
                for i in 0..len {
                    single(i)?;
                }
                return Ok(false);
            }
            (n, Some(e)) if n > 0 && e.raw_os_error() == Some(libc::ENOENT) => done += n,
            (_, Some(e)) => {
                return Err(e).with_context(|| format!("batch operation at entry {done}"));
            }
            (0, None) => anyhow::bail!("batch operation made no progress at entry {done}"),
            (n, None) => done += n,
        }
    }
    Ok(true)
}

/// BPF_MAP_UPDATE_BATCH of `values` at `keys` of an array map (`stride` bytes per value, as
/// the kernel lays them out: the value size, or for a per-CPU array the value size rounded
/// up to 8 times the possible CPUs): one syscall per 64k entries instead of one per entry (a
/// 16381-slot Maglev table took ~11 ms one entry at a time). `single(i)` writes entry `i`
/// when the kernel has no batch operations for the map.
fn update_batch(
    fd: RawFd,
    keys: &[u32],
    values: &[u8],
    stride: usize,
    single: impl FnMut(usize) -> anyhow::Result<()>,
) -> anyhow::Result<bool> {
    anyhow::ensure!(values.len() == keys.len() * stride, "batch of uneven size");
    batched(
        keys.len(),
        |done| {
            let count = (keys.len() - done).min(BATCH_CHUNK);
            let mut attr = BatchAttr {
                in_batch: 0,
                out_batch: 0,
                keys: keys[done..].as_ptr() as u64,
                values: values[done * stride..].as_ptr() as u64,
                count: count as u32,
                map_fd: fd as u32,
                elem_flags: 0,
                flags: 0,
            };
            batch_call(BPF_MAP_UPDATE_BATCH, &mut attr)
        },
        single,
    )
}

/// BPF_MAP_LOOKUP_BATCH of `len` entries of an array map from key `base` on, into `out`
/// (`stride` bytes per value as in `update_batch`): a restart reads every pinned Maglev
/// table, 16M entries for 1000 services, which took 16M syscalls one at a time.
/// `single(i, value)` reads entry `base + i` when the kernel has no batch operations.
fn lookup_batch(
    fd: RawFd,
    base: u32,
    len: usize,
    stride: usize,
    out: &mut [u8],
    mut single: impl FnMut(u32, &mut [u8]) -> anyhow::Result<()>,
) -> anyhow::Result<bool> {
    anyhow::ensure!(out.len() == len * stride, "batch of uneven size");
    let mut keys = vec![0u32; len.min(BATCH_CHUNK)];
    let out_ptr = out.as_mut_ptr();
    let batched = batched(
        len,
        |done| {
            let count = (len - done).min(BATCH_CHUNK);
            // An array's batch starts after the key `in_batch` names (at 0 without one).
            let first = base as usize + done;
            let prev = first.wrapping_sub(1) as u32;
            let mut next = 0u32;
            let mut attr = BatchAttr {
                in_batch: if first == 0 {
                    0
                } else {
                    &prev as *const u32 as u64
                },
                out_batch: &mut next as *mut u32 as u64,
                keys: keys.as_mut_ptr() as u64,
                // SAFETY (of the pointer arithmetic): done * stride < out.len().
                values: unsafe { out_ptr.add(done * stride) } as u64,
                count: count as u32,
                map_fd: fd as u32,
                elem_flags: 0,
                flags: 0,
            };
            batch_call(BPF_MAP_LOOKUP_BATCH, &mut attr)
        },
        |_| Ok(()),
    )?;
    if !batched {
        for (i, value) in out.chunks_exact_mut(stride).enumerate() {
            single(base + i as u32, value)?;
        }
    }
    Ok(batched)
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
            maglev_mem: OnceLock::new(),
            index: flow_index(open(map_names::FLOW_INDEX)?)?,
            slots: slot_table(open(map_names::FLOW_SLOTS)?)?,
            config: open(map_names::CONFIG)?.try_into()?,
            hops: open(map_names::HOPS)?.try_into()?,
            stats: open(map_names::STATS)?.try_into()?,
            svc_stats: open(map_names::SVC_STATS)?.try_into()?,
            be_stats: open(map_names::BE_STATS)?.try_into()?,
            dnat_endpoints: open(map_names::DNAT_ENDPOINTS)?.try_into()?,
            v6: Maps6::open(|name| open_pinned(layout, name))?,
        })
    }

    /// Take the maps out of a loaded object (the program keeps its references).
    pub fn from_ebpf(ebpf: &mut Ebpf) -> anyhow::Result<Self> {
        Ok(Self {
            services: take(ebpf, map_names::SERVICES)?.try_into()?,
            vips: take(ebpf, map_names::VIPS)?.try_into()?,
            backends: take(ebpf, map_names::BACKENDS)?.try_into()?,
            maglev: take(ebpf, map_names::MAGLEV)?.try_into()?,
            maglev_mem: OnceLock::new(),
            index: flow_index(take(ebpf, map_names::FLOW_INDEX)?)?,
            slots: slot_table(take(ebpf, map_names::FLOW_SLOTS)?)?,
            config: take(ebpf, map_names::CONFIG)?.try_into()?,
            hops: take(ebpf, map_names::HOPS)?.try_into()?,
            stats: take(ebpf, map_names::STATS)?.try_into()?,
            svc_stats: take(ebpf, map_names::SVC_STATS)?.try_into()?,
            be_stats: take(ebpf, map_names::BE_STATS)?.try_into()?,
            dnat_endpoints: take(ebpf, map_names::DNAT_ENDPOINTS)?.try_into()?,
            v6: Maps6::open(|name| take(ebpf, name))?,
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

    /// Flow capacity: concurrent flows (`FLOW_INDEX`'s), whichever CPUs create them.
    pub fn flow_capacity(&self) -> anyhow::Result<u32> {
        Ok(self.index.capacity())
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

    /// `MAGLEV` as memory, when it was created BPF_F_MMAPABLE (by this vmlb). Writing 1000
    /// tables of 16381 entries through BPF_MAP_UPDATE_BATCH cost ~2 s of kernel time (a
    /// user copy with hardened-usercopy checks and a call per entry); through the mapping it
    /// is a memory copy. A `MAGLEV` pinned by an older vmlb lacks the flag (the kernel keeps a
    /// map's creation flags, whatever the object reusing its pin declares): `None`, and the
    /// tables go through the batched syscalls as before.
    fn ring_mem(&self) -> Option<&MappedArray> {
        self.maglev_mem
            .get_or_init(|| {
                let map = self.maglev.map();
                match mmap::is_mmapable(map) {
                    Ok(true) => {}
                    Ok(false) => {
                        warn!(
                            "the MAGLEV map was made without BPF_F_MMAPABLE (pinned by an older \
                             vmlb): Maglev tables are written with batched syscalls, slower; \
                             restart once with --detach-on-exit to recreate the maps"
                        );
                        return None;
                    }
                    Err(e) => {
                        warn!("MAGLEV: {e:#}; writing tables with syscalls");
                        return None;
                    }
                }
                MappedArray::map(map, size_of::<u32>(), map_names::MAGLEV)
                    .inspect_err(|e| warn!("{e:#}; writing Maglev tables with syscalls"))
                    .ok()
            })
            .as_ref()
    }

    /// Whether Maglev tables are read and written through a mapping of `MAGLEV` (else through
    /// batched syscalls).
    pub fn maglev_mapped(&self) -> bool {
        self.ring_mem().is_some()
    }

    /// `len` Maglev entries from `base` (a table): from the mapping, else in batches.
    pub fn read_ring(&self, base: u32, len: u32) -> anyhow::Result<Vec<u32>> {
        if let Some(mem) = self.ring_mem() {
            let (base, len) = (base as usize, len as usize);
            anyhow::ensure!(
                base + len <= mem.len(),
                "Maglev entries {base}+{len} lie outside the array of {}",
                mem.len()
            );
            return Ok((base..base + len)
                // SAFETY: in bounds (`at` checks too), 8-byte aligned, mapped while `mem`
                // lives; atomic because the data path may read the same memory.
                .map(|i| unsafe { AtomicU32::from_ptr(mem.at(i).cast()) }.load(Ordering::Relaxed))
                .collect());
        }
        let mut out = vec![0u32; len as usize];
        let fd = fd_of(&self.maglev);
        let single = |key: u32, value: &mut [u8]| {
            let v = self.maglev.get(&key, 0)?;
            value.copy_from_slice(&v.to_ne_bytes());
            Ok(())
        };
        let context = || format!("reading Maglev entries {base}+{len}");
        // The first entries find out whether the kernel batches; the rest go in parallel.
        let head = out.len().min(PROBE_ENTRIES);
        let (first, rest) = out.split_at_mut(head);
        let batched =
            lookup_batch(fd, base, head, 4, as_bytes_mut(first), single).with_context(context)?;
        let rest_base = base + head as u32;
        if !batched {
            for (i, value) in rest.iter_mut().enumerate() {
                *value = self
                    .maglev
                    .get(&(rest_base + i as u32), 0)
                    .with_context(context)?;
            }
            return Ok(out);
        }
        let parts = parts(rest.len());
        let size = rest.len().div_ceil(parts.max(1)).max(1);
        std::thread::scope(|scope| {
            let workers: Vec<_> = rest
                .chunks_mut(size)
                .enumerate()
                .map(|(n, chunk)| {
                    scope.spawn(move || {
                        let len = chunk.len();
                        let at = rest_base + (n * size) as u32;
                        lookup_batch(fd, at, len, 4, as_bytes_mut(chunk), |_, _| no_fallback(0))
                    })
                })
                .collect();
            for w in workers {
                w.join()
                    .map_err(|_| anyhow::anyhow!("a reader thread panicked"))?
                    .with_context(context)?;
            }
            anyhow::Ok(())
        })?;
        Ok(out)
    }

    /// Every entry of `BACKENDS` (id = index), in batches.
    pub fn read_backends(&self) -> anyhow::Result<Vec<Backend>> {
        let len = self.backends.len();
        let mut out = vec![Backend::default(); len as usize];
        lookup_batch(
            fd_of(&self.backends),
            0,
            len as usize,
            std::mem::size_of::<Backend>(),
            as_bytes_mut(&mut out),
            |key, value| {
                let b = self.backends.get(&key, 0)?;
                value.copy_from_slice(as_bytes(std::slice::from_ref(&b)));
                Ok(())
            },
        )
        .context("reading BACKENDS")?;
        Ok(out)
    }

    /// Settings that follow from the maps and the interface: the sizes of FLOW_SLOTS and
    /// FLOW_INDEX, the interface and its MAC (the source of frames sent to clients).
    pub fn init_config(&mut self, ifindex: u32, mac: [u8; 6]) -> anyhow::Result<()> {
        let slots = self.slots.len() as u32;
        let buckets = self.index.buckets();
        self.update_config(|c| {
            c.slot_count = slots;
            c.index_buckets = buckets;
            c.mac = mac;
            c.ifindex = ifindex;
        })?;
        self.v6.init_config()?;
        self.refresh_vip_filter()
    }
}

/// Entries done on the calling thread before a table is split across threads: enough to learn
/// whether the kernel batches (and to make splitting a small table not worth it).
const PROBE_ENTRIES: usize = 2048;
/// Fewest entries worth a thread of their own (~0.2 ms of kernel copies at ~100 ns each,
/// against ~30 µs to start a thread).
const MIN_PART: usize = 2048;

/// How many threads for `len` entries: the kernel's per-entry work in a batch (a user copy
/// with hardened-usercopy checks and the element copy, 100-200 ns) is CPU-bound and an array
/// takes no lock, so a 1000-table load or restart is up to this many times faster.
fn parts(len: usize) -> usize {
    // Asked once: the standard library reads the cgroup files each time.
    static CPUS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let cpus = *CPUS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    cpus.min(4).min(len / MIN_PART).max(1)
}

/// Run `f` over `0..len` split in `parts(len)` ranges, each on a thread of its own.
fn in_parallel(
    len: usize,
    f: impl Fn(std::ops::Range<usize>) -> anyhow::Result<()> + Sync,
) -> anyhow::Result<()> {
    let parts = parts(len);
    if parts <= 1 {
        return if len == 0 { Ok(()) } else { f(0..len) };
    }
    let size = len.div_ceil(parts);
    std::thread::scope(|scope| {
        let f = &f;
        let workers: Vec<_> = (0..len)
            .step_by(size)
            .map(|start| scope.spawn(move || f(start..(start + size).min(len))))
            .collect();
        for w in workers {
            w.join()
                .map_err(|_| anyhow::anyhow!("a map writer thread panicked"))??;
        }
        Ok(())
    })
}

/// The fallback for batches after the first succeeded: the kernel cannot lose batch support.
fn no_fallback(_: usize) -> anyhow::Result<()> {
    anyhow::bail!("batch operations failed after the first batch succeeded")
}

/// `values` as the bytes the kernel copies.
fn as_bytes<T: aya::Pod>(values: &[T]) -> &[u8] {
    // SAFETY: `Pod` types are plain data without padding the kernel could not read; the
    // slice covers exactly the values' memory.
    unsafe {
        std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), std::mem::size_of_val(values))
    }
}

/// `values` as bytes the kernel may overwrite.
fn as_bytes_mut<T: aya::Pod>(values: &mut [T]) -> &mut [u8] {
    // SAFETY: as in `as_bytes`; any bytes are a valid `Pod` value.
    unsafe {
        std::slice::from_raw_parts_mut(
            values.as_mut_ptr().cast::<u8>(),
            std::mem::size_of_val(values),
        )
    }
}

fn flow_index(m: Map) -> anyhow::Result<FlowIndex> {
    let Map::Array(data) = m else {
        anyhow::bail!("FLOW_INDEX is not an array map");
    };
    FlowIndex::map(data, map_names::FLOW_INDEX)
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
        if let Some(mem) = self.ring_mem() {
            let base = base as usize;
            anyhow::ensure!(
                base + table.len() <= mem.len(),
                "Maglev entries {base}+{} lie outside the array of {}",
                table.len(),
                mem.len()
            );
            for (i, &id) in table.iter().enumerate() {
                // SAFETY: in bounds (`at` checks too), 8-byte aligned, mapped while `mem`
                // lives. Each entry is one aligned u32 store, so a packet reads an old or a new
                // id, never a torn one; and the space is one no live service points into
                // (reconcile writes a new table beside the old one, then switches the service).
                unsafe { AtomicU32::from_ptr(mem.at(base + i).cast()) }
                    .store(id, Ordering::Relaxed);
            }
            // The switch to this table is the next SERVICES update, a syscall: every entry
            // must be visible before a packet can follow the new `ring_base` here (the kernel's
            // update publishes with release semantics; this orders our stores before it).
            fence(Ordering::Release);
            return Ok(());
        }
        let keys: Vec<u32> = (base..base + table.len() as u32).collect();
        let fd = fd_of(&self.maglev);
        let maglev = &mut self.maglev;
        let mut single = |i: usize| {
            maglev
                .set(keys[i], table[i], 0)
                .with_context(|| format!("writing Maglev entry {}", keys[i]))
        };
        // The first entries find out whether the kernel batches; the rest go in parallel.
        let head = table.len().min(PROBE_ENTRIES);
        if !update_batch(fd, &keys[..head], as_bytes(&table[..head]), 4, &mut single)? {
            return (head..table.len()).try_for_each(single);
        }
        in_parallel(table.len() - head, |r| {
            let r = head + r.start..head + r.end;
            update_batch(fd, &keys[r.clone()], as_bytes(&table[r]), 4, no_fallback).map(drop)
        })
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

    fn set_dnat_endpoint(
        &mut self,
        key: &EndpointKey,
        value: Option<&DnatEndpoint>,
        total: usize,
    ) -> anyhow::Result<()> {
        let what = || {
            format!(
                "dnat endpoint {}:{}",
                std::net::Ipv4Addr::from(key.addr.to_ne_bytes()),
                u16::from_be(key.port)
            )
        };
        // The count turns the lookup on before the first entry, and off before the last goes.
        let count = |maps: &mut Self| maps.update_config(|c| c.dnat_endpoints = total as u32);
        match value {
            Some(v) => {
                count(self)?;
                self.dnat_endpoints
                    .insert(key, v, 0)
                    .with_context(|| format!("writing {}", what()))
            }
            None => {
                count(self)?;
                match self.dnat_endpoints.remove(key) {
                    Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
                    Err(e) => Err(e).with_context(|| format!("removing {}", what())),
                }
            }
        }
    }

    fn set_backend6(&mut self, id: u32, backend: &vmlb_common::Backend6) -> anyhow::Result<()> {
        self.v6.set_backend(id, backend)
    }

    fn set_service6(
        &mut self,
        key: &vmlb_common::ServiceKey6,
        service: &vmlb_common::Service6,
    ) -> anyhow::Result<()> {
        self.v6.set_service(key, service)
    }

    fn remove_service6(&mut self, key: &vmlb_common::ServiceKey6) -> anyhow::Result<()> {
        self.v6.remove_service(key)
    }

    fn set_vip6(&mut self, vip: vmlb_common::Addr6, flags: u32) -> anyhow::Result<()> {
        self.v6.set_vip(vip, flags)
    }

    fn remove_vip6(&mut self, vip: vmlb_common::Addr6) -> anyhow::Result<()> {
        self.v6.remove_vip(vip)
    }

    fn set_snat_addrs6(&mut self, addrs: &[std::net::Ipv6Addr]) -> anyhow::Result<()> {
        self.v6.set_snat_addrs(addrs)
    }

    fn set_dnat_endpoint6(
        &mut self,
        key: &vmlb_common::EndpointKey6,
        value: Option<&vmlb_common::DnatEndpoint6>,
        total: usize,
    ) -> anyhow::Result<()> {
        self.v6.set_dnat_endpoint(key, value, total)
    }
}

fn nr_cpus() -> anyhow::Result<usize> {
    aya::util::nr_cpus().map_err(|(_, e)| anyhow::anyhow!("reading the possible CPUs: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(code: i32) -> Option<std::io::Error> {
        Some(std::io::Error::from_raw_os_error(code))
    }

    #[test]
    fn batches_until_every_entry_is_done() {
        let mut calls = Vec::new();
        let batched = batched(
            10,
            |done| {
                calls.push(done);
                (4.min(10 - done), None)
            },
            |_| panic!("no fallback when batches work"),
        )
        .expect("batches");
        assert!(batched);
        assert_eq!(calls, [0, 4, 8]);
    }

    #[test]
    fn falls_back_to_single_entries_without_batch_support() {
        // ENOTSUPP (524) and EINVAL, with the kernel leaving `count` as it was.
        for code in [524, libc::EINVAL] {
            let mut singles = Vec::new();
            let batched = batched(
                3,
                |_| (3, err(code)),
                |i| {
                    singles.push(i);
                    Ok(())
                },
            )
            .expect("falls back");
            assert!(!batched);
            assert_eq!(singles, [0, 1, 2]);
        }
    }

    #[test]
    fn a_lookup_reaching_the_map_end_counts_what_it_read() {
        let mut calls = 0;
        let batched = batched(
            5,
            |done| {
                calls += 1;
                if done == 0 {
                    (5, err(libc::ENOENT))
                } else {
                    (0, err(libc::ENOENT))
                }
            },
            |_| panic!("no fallback"),
        )
        .expect("ENOENT with entries is progress");
        assert!(batched);
        assert_eq!(calls, 1);
    }

    #[test]
    fn errors_after_progress_and_stalls_are_reported() {
        // Past the end of the map: ENOENT with nothing read.
        let e = batched(
            5,
            |done| {
                if done == 0 {
                    (2, None)
                } else {
                    (0, err(libc::ENOENT))
                }
            },
            |_| Ok(()),
        )
        .expect_err("reading past the end");
        assert!(format!("{e:#}").contains("at entry 2"), "{e:#}");
        // EINVAL after some entries were done is an error, not a reason to start over.
        let e = batched(
            5,
            |done| {
                if done == 0 {
                    (2, None)
                } else {
                    (0, err(libc::EINVAL))
                }
            },
            |_| Ok(()),
        )
        .expect_err("EINVAL later");
        assert!(format!("{e:#}").contains("at entry 2"), "{e:#}");
        let e = batched(5, |_| (0, None), |_| Ok(())).expect_err("no progress");
        assert!(format!("{e:#}").contains("no progress"), "{e:#}");
        // A fallback that fails reports its error.
        let e = batched(
            2,
            |_| (0, err(524)),
            |i| {
                anyhow::ensure!(i == 0, "entry {i}");
                Ok(())
            },
        )
        .expect_err("single write fails");
        assert!(format!("{e:#}").contains("entry 1"), "{e:#}");
    }

    #[test]
    fn byte_views_cover_the_values() {
        let mut v = [1u32, 2];
        assert_eq!(as_bytes(&v).len(), 8);
        as_bytes_mut(&mut v)[4..].copy_from_slice(&7u32.to_ne_bytes());
        assert_eq!(v, [1, 7]);
    }
}
