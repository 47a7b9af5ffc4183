//! A layout migration, the kernel side of `layout`: from an older version's pinned maps (the
//! running program's) to this version's, with the program swapped in the pinned link between.
//!
//! Order: this version's maps are created under its own directory and the daemon fills the
//! configuration's maps as on a fresh start (`attach`, then the first apply). `finish` then
//! translates the old ids into the new ones (through SERVICES and BACKENDS of both layouts),
//! copies the flows slot by slot and rebuilds their index, swaps the program into the link
//! (BPF_LINK_UPDATE), copies what the old program changed meanwhile (claiming each slot by
//! compare-and-swap, so a slot the new program took first stays its own), adds the counters and
//! removes the old pins. A failure before the swap removes this version's pins again and leaves
//! the old program serving.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    os::fd::{AsFd as _, AsRawFd as _, RawFd},
    ptr::NonNull,
};

use anyhow::Context as _;
use aya::{
    maps::{Array, Map, MapData},
    Ebpf,
};
use tracing::{info, warn};
use vmlb_common::{
    flow_state as st, map_names, map_names6, Addr6, Backend, Backend6, Flow, Flow6, Service,
    Service6, ServiceKey, ServiceKey6, LAYOUT_VERSION,
};

use super::{
    layout::{self, Carry, Index, Plan, Role, Shape},
    loader::VMLB_OBJ,
    maps::BpfMaps,
    pins::PinLayout,
};
use crate::conntrack::{FlowIndex, Slot, SlotTable};

/// The maps of this version's object, as the object defines them (sizes before overrides).
pub fn object_shapes() -> anyhow::Result<BTreeMap<String, Shape>> {
    let obj = aya_obj::Object::parse(VMLB_OBJ).context("parsing the vmlb eBPF object")?;
    Ok(obj
        .maps
        .iter()
        .map(|(name, m)| {
            let shape = Shape {
                map_type: m.map_type(),
                key_size: m.key_size(),
                value_size: m.value_size(),
                max_entries: m.max_entries(),
                flags: m.map_flags(),
            };
            (name.clone(), shape)
        })
        .collect())
}

fn shape_of(info: &aya::maps::MapInfo) -> anyhow::Result<Shape> {
    Ok(Shape {
        map_type: info.map_type()? as u32,
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: info.max_entries(),
        flags: info.map_flags(),
    })
}

/// The map files pinned in `pins`' directory (not the link, not other versions' directories).
fn pinned_files(pins: &PinLayout) -> Vec<String> {
    std::fs::read_dir(pins.dir())
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| !t.is_dir()))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n != layout::LINK)
        .collect()
}

/// What the kernel says of every map pinned in `pins`.
pub fn pinned_shapes(pins: &PinLayout) -> anyhow::Result<BTreeMap<String, Shape>> {
    pinned_files(pins)
        .into_iter()
        .map(|name| {
            let path = pins.map(&name);
            let info = aya::maps::MapInfo::from_pin(&path)
                .with_context(|| format!("reading the pinned map {}", path.display()))?;
            Ok((name, shape_of(&info)?))
        })
        .collect()
}

/// The version (among `present`) whose maps the program in the pinned link uses; `None` when
/// there is no link, the program cannot be looked up (that takes CAP_SYS_ADMIN), or it uses
/// none of them.
pub fn live_version(pins: &PinLayout, present: &BTreeSet<u32>) -> Option<u32> {
    let (id, _) = super::attach::pinned_program(&pins.link()).ok()?;
    let prog = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == id)?;
    let used: BTreeSet<u32> = prog.map_ids().ok()??.into_iter().collect();
    present.iter().copied().find(|&v| {
        let other = pins.with_version(v);
        pinned_files(&other).iter().any(|name| {
            aya::maps::MapInfo::from_pin(other.map(name)).is_ok_and(|i| used.contains(&i.id()))
        })
    })
}

/// A migration prepared by `attach` and finished by the daemon once this version's maps hold
/// its configuration.
pub struct Migration {
    plan: Plan,
    old: PinLayout,
    new: PinLayout,
    /// The flows are not carried over (`--upgrade-drops-flows`).
    drop_flows: bool,
    swapped: bool,
}

impl Migration {
    /// Plan the migration from the maps pinned in `old` to this version's (`new`). Refused when
    /// the flows cannot be carried over, unless `drop_flows`.
    pub fn prepare(old: PinLayout, new: PinLayout, drop_flows: bool) -> anyhow::Result<Self> {
        let from = old.version();
        let plan = layout::plan(from, &pinned_shapes(&old)?, &object_shapes()?);
        let drop_flows = match plan.flows_lost() {
            Some(why) if !drop_flows => anyhow::bail!(
                "the maps pinned in {} are of layout v{from}, and this vmlb (layout v{}) cannot \
                 carry their flows over ({why}). The running program keeps serving. To upgrade \
                 anyway, dropping every established connection, start this daemon with \
                 --upgrade-drops-flows; or stop the old daemon with --detach-on-exit first.",
                old.dir().display(),
                LAYOUT_VERSION
            ),
            Some(why) => {
                warn!(%why, "--upgrade-drops-flows: the flows of layout v{from} are not carried over");
                true
            }
            None => false,
        };
        for why in plan.counters_lost() {
            warn!("counters start from zero: {why}");
        }
        Ok(Self {
            plan,
            old,
            new,
            drop_flows,
            swapped: false,
        })
    }

    pub fn from(&self) -> u32 {
        self.plan.from
    }

    /// The old layout's size of a map, to create this version's the same size (a migration
    /// is no resize: pinned state keeps its sizes, as on adoption).
    pub fn old_max_entries(&self, name: &str) -> Option<u32> {
        aya::maps::MapInfo::from_pin(self.old.map(name))
            .ok()
            .map(|i| i.max_entries())
    }

    /// Carry the state over and swap this version's program (`ebpf`, whose maps are `maps`, the
    /// configuration already applied) into the pinned link; then remove the old pins.
    pub fn finish(mut self, ebpf: &mut Ebpf, maps: &mut BpfMaps) -> anyhow::Result<()> {
        let started = std::time::Instant::now();
        let ids_readable = [map_names::SERVICES, map_names::BACKENDS]
            .iter()
            .all(|n| self.plan.carry(n) == Some(&Carry::Copy));
        let ids = if ids_readable {
            Some(IdMap::read(&self.old, maps).context("translating the old layout's ids")?)
        } else {
            None
        };
        // Each family's flows: copied before the swap, then what changed meanwhile after it.
        let mut copies = match (&ids, self.drop_flows) {
            (Some(ids), false) => Some(self.copy_flows(maps, ids)?),
            _ => None,
        };
        super::attach::swap_into_link(ebpf, &self.new)
            .context("swapping this version's program into the pinned link")?;
        self.swapped = true;
        let mut summary = String::new();
        if let (Some((v4, v6)), Some(ids)) = (copies.as_mut(), &ids) {
            let mut parts = Vec::new();
            if let Some(f) = v4 {
                f.after_swap(&maps.slots, &maps.index, ids);
                parts.push(f.summary("IPv4"));
            }
            if let Some(f) = v6 {
                f.after_swap(&maps.v6.slots, &maps.v6.index, ids);
                parts.push(f.summary("IPv6"));
            }
            summary = parts.join("; ");
        }
        if let Err(e) = self.add_counters(ids.as_ref()) {
            warn!("carrying the counters over: {e:#}");
        }
        if let Err(e) = self.old.remove_maps() {
            warn!("removing the old pins in {}: {e}", self.old.dir().display());
        }
        info!(
            from = self.plan.from,
            to = LAYOUT_VERSION,
            ms = started.elapsed().as_millis() as u64,
            "migrated the pinned maps to this layout and replaced the program in the link: {}",
            if summary.is_empty() {
                "no flows carried over".to_string()
            } else {
                summary
            }
        );
        Ok(())
    }

    /// The first pass of each flow map the plan carries over (IPv4, IPv6).
    #[allow(clippy::type_complexity)]
    fn copy_flows(
        &self,
        maps: &mut BpfMaps,
        ids: &IdMap,
    ) -> anyhow::Result<(Option<FlowCopy<Flow>>, Option<FlowCopy<Flow6>>)> {
        let from = self.plan.from;
        let carried = |name: &str| {
            matches!(
                self.plan.carry(name),
                Some(Carry::Copy) | Some(Carry::Convert)
            )
        };
        let v4 = if carried(map_names::FLOW_SLOTS) {
            let convert = (self.plan.carry(map_names::FLOW_SLOTS) == Some(&Carry::Convert))
                .then(|| self.converter(map_names::FLOW_SLOTS))
                .flatten();
            let old = RawSlots::open(&self.old.map(map_names::FLOW_SLOTS))?;
            let (slots, index) = (&maps.slots, &maps.index);
            Some(FlowCopy::first(
                old, slots, index, ids, convert, from, false,
            )?)
        } else {
            None
        };
        let v6 = if carried(map_names6::FLOW_SLOTS6) {
            let old = RawSlots::open(&self.old.map(map_names6::FLOW_SLOTS6))?;
            // Layout 3 changed the IPv6 tuple hash (`hash::hash6`): every IPv6 flow moves to
            // the slot its SNAT tuple names now.
            let rehash = from < 3;
            let (slots, index) = (&maps.v6.slots, &maps.v6.index);
            Some(FlowCopy::first(old, slots, index, ids, None, from, rehash)?)
        } else {
            None
        };
        Ok((v4, v6))
    }

    fn converter(&self, name: &str) -> Option<layout::FlowConverter> {
        self.plan.maps.iter().find_map(|(m, _)| match m.role {
            Role::Flows { convert, .. } if m.name == name => convert,
            _ => None,
        })
    }

    /// Add the old counters onto the new ones (entries translated by id).
    fn add_counters(&self, ids: Option<&IdMap>) -> anyhow::Result<()> {
        let cpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))?;
        for (spec, carry) in &self.plan.maps {
            let Role::Counters { by, .. } = spec.role else {
                continue;
            };
            if carry != &Carry::Copy {
                continue;
            }
            let translate = |i: u32| -> Option<u32> {
                match by {
                    Index::Plain => Some(i),
                    Index::Service => ids?.services.get(&i).copied(),
                    Index::Backend => ids?.backends.get(&i).copied(),
                }
            };
            let old = MapData::from_pin(self.old.map(spec.name))?;
            let new = MapData::from_pin(self.new.map(spec.name))?;
            let (oi, ni) = (old.info()?, new.info()?);
            let size = oi.value_size() as usize;
            if !size.is_multiple_of(8) {
                continue;
            }
            let stride = size.div_ceil(8) * 8 * cpus;
            let (ofd, nfd) = (old.fd().as_fd().as_raw_fd(), new.fd().as_fd().as_raw_fd());
            let (mut a, mut b) = (vec![0u8; stride], vec![0u8; stride]);
            for i in 0..oi.max_entries() {
                lookup(ofd, &i, &mut a).with_context(|| format!("{} entry {i}", spec.name))?;
                if a.iter().all(|&x| x == 0) {
                    continue;
                }
                let Some(j) = translate(i).filter(|&j| j < ni.max_entries()) else {
                    continue;
                };
                lookup(nfd, &j, &mut b)?;
                for (x, y) in b.chunks_exact_mut(8).zip(a.chunks_exact(8)) {
                    let sum = u64::from_ne_bytes(x.try_into().expect("8 bytes"))
                        .wrapping_add(u64::from_ne_bytes(y.try_into().expect("8 bytes")));
                    x.copy_from_slice(&sum.to_ne_bytes());
                }
                update(nfd, &j, &b)?;
            }
        }
        Ok(())
    }
}

impl Drop for Migration {
    fn drop(&mut self) {
        // Not swapped: this version's maps never served; the old program goes on as it was.
        if !self.swapped {
            if let Err(e) = self.new.remove_maps() {
                warn!(
                    "removing the unused pins in {}: {e}",
                    self.new.dir().display()
                );
            }
        }
    }
}

/// Old ids -> new ids, by what they stand for: a service by its key, a backend by its service
/// and address:port, in either family (ids come from one space per kind for both). An old id
/// missing here no longer exists (0 then: a flow on it moves to another backend on its next
/// packet, as when a backend is removed).
#[derive(Debug, Default)]
struct IdMap {
    services: HashMap<u32, u32>,
    backends: HashMap<u32, u32>,
}

impl IdMap {
    fn read(old: &PinLayout, new: &BpfMaps) -> anyhow::Result<Self> {
        let open = |name: &str| -> anyhow::Result<Map> {
            let data = MapData::from_pin(old.map(name))
                .with_context(|| format!("opening {}", old.map(name).display()))?;
            Ok(Map::from_map_data(data)?)
        };
        let old_services: aya::maps::HashMap<MapData, ServiceKey, Service> =
            open(map_names::SERVICES)?.try_into()?;
        let old_backends: Array<MapData, Backend> = open(map_names::BACKENDS)?.try_into()?;
        let new_service: HashMap<ServiceKey, u32> = new
            .services
            .iter()
            .map(|r| r.map(|(k, s)| (k, s.id)))
            .collect::<Result<_, _>>()?;
        let mut services = HashMap::new();
        for r in old_services.iter() {
            let (k, s) = r?;
            if let Some(&id) = new_service.get(&k) {
                services.insert(s.id, id);
            }
        }
        let new_backend: HashMap<(u32, u32, u16), u32> = (0u32..)
            .zip(new.read_backends()?)
            .filter(|(_, b)| b.addr != 0)
            .map(|(id, b)| ((b.service_id, b.addr, b.port), id))
            .collect();
        let mut backends = HashMap::new();
        for id in 0..old_backends.len() {
            let b = old_backends.get(&id, 0)?;
            if b.addr == 0 {
                continue;
            }
            let Some(&svc) = services.get(&b.service_id) else {
                continue;
            };
            if let Some(&new_id) = new_backend.get(&(svc, b.addr, b.port)) {
                backends.insert(id, new_id);
            }
        }
        let mut ids = Self { services, backends };
        // IPv6 (layout 2 on; an older layout has no such maps).
        if old.map(map_names6::SERVICES6).exists() {
            ids.read6(&open, new)?;
        }
        Ok(ids)
    }

    fn read6(
        &mut self,
        open: &dyn Fn(&str) -> anyhow::Result<Map>,
        new: &BpfMaps,
    ) -> anyhow::Result<()> {
        let old_services: aya::maps::HashMap<MapData, ServiceKey6, Service6> =
            open(map_names6::SERVICES6)?.try_into()?;
        let old_backends: Array<MapData, Backend6> = open(map_names6::BACKENDS6)?.try_into()?;
        let new_service: HashMap<ServiceKey6, u32> = new
            .v6
            .services
            .iter()
            .map(|r| r.map(|(k, s)| (k, s.id)))
            .collect::<Result<_, _>>()?;
        for r in old_services.iter() {
            let (k, s) = r?;
            if let Some(&id) = new_service.get(&k) {
                self.services.insert(s.id, id);
            }
        }
        let mut new_backend: HashMap<(u32, Addr6, u16), u32> = HashMap::new();
        for id in 0..new.v6.backends.len() {
            let b = new.v6.backends.get(&id, 0)?;
            if b.addr != [0; 4] {
                new_backend.insert((b.service_id, b.addr, b.port), id);
            }
        }
        for id in 0..old_backends.len() {
            let b = old_backends.get(&id, 0)?;
            if b.addr == [0; 4] {
                continue;
            }
            let Some(&svc) = self.services.get(&b.service_id) else {
                continue;
            };
            if let Some(&new_id) = new_backend.get(&(svc, b.addr, b.port)) {
                self.backends.insert(id, new_id);
            }
        }
        Ok(())
    }

    fn translate<F: Slot>(&self, mut f: F) -> F {
        let (svc, be) = f.ids();
        f.set_ids(
            self.services.get(&svc).copied().unwrap_or(0),
            self.backends.get(&be).copied().unwrap_or(0),
        );
        f
    }
}

/// An older layout's flow slots, mapped read-only, whatever their value size.
struct RawSlots {
    base: NonNull<u8>,
    len: usize,
    value_size: usize,
    stride: usize,
    bytes: usize,
    _map: MapData,
}

impl RawSlots {
    fn open(path: &std::path::Path) -> anyhow::Result<Self> {
        let map = MapData::from_pin(path).with_context(|| format!("opening {}", path.display()))?;
        let info = map.info()?;
        let len = info.max_entries() as usize;
        let value_size = info.value_size() as usize;
        // An array's values are 8-byte aligned in its mapping.
        let stride = value_size.div_ceil(8) * 8;
        anyhow::ensure!(
            stride <= MAX_SLOT_WORDS * 8,
            "{} holds {value_size}-byte values, more than a flow slot can be",
            path.display()
        );
        let bytes = (len * stride).div_ceil(4096) * 4096;
        // SAFETY: mapping a BPF array map read-only, as the kernel documents (offset 0,
        // shared), its data rounded up to whole pages.
        let ptr = unsafe {
            nix::sys::mman::mmap(
                None,
                std::num::NonZeroUsize::new(bytes).context("empty flow map")?,
                nix::sys::mman::ProtFlags::PROT_READ,
                nix::sys::mman::MapFlags::MAP_SHARED,
                map.fd().as_fd(),
                0,
            )
        }
        .with_context(|| format!("mapping {}", path.display()))?;
        Ok(Self {
            base: ptr.cast(),
            len,
            value_size,
            stride,
            bytes,
            _map: map,
        })
    }

    /// Slot `i` as this version's `F` (old ids), read as a plain copy of shared memory; `None`
    /// when the slot changed while it was read, or cannot be converted. A slot never used
    /// (`ctl` 0) is an empty `F` without further reads: most are, and the pass after the swap
    /// must be quick.
    fn get<F: Slot>(&self, i: usize, convert: Option<Converter<F>>, from: u32) -> Option<F> {
        assert!(i < self.len);
        let mut words = [0u64; MAX_SLOT_WORDS];
        let n = self.stride / 8;
        // SAFETY: in bounds of the mapping (i < len; n words = one stride); volatile reads of
        // memory the data path may be writing. Every layout keeps a slot's `ctl` in its first
        // 8 bytes, and a changed `ctl` across the copy means it may be torn.
        let same = unsafe {
            let p = self.base.as_ptr().add(i * self.stride).cast::<u64>();
            let before = std::ptr::read_volatile(p);
            if before == 0 {
                return Some(F::default());
            }
            for (k, w) in words[..n].iter_mut().enumerate() {
                *w = std::ptr::read_volatile(p.add(k));
            }
            before == std::ptr::read_volatile(p)
        };
        if !same {
            return None;
        }
        // SAFETY: `words` holds at least `value_size` initialized bytes.
        let bytes =
            unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<u8>(), self.value_size) };
        match convert {
            Some(c) => c(from, bytes),
            None if self.value_size == size_of::<F>() => {
                // SAFETY: both slot types are plain old data, of exactly this size.
                Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<F>()) })
            }
            None => None,
        }
    }
}

/// Largest flow slot an older layout may have, in 8-byte words.
const MAX_SLOT_WORDS: usize = 64;

impl Drop for RawSlots {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `open`, unmapped once.
        let _ = unsafe { nix::sys::mman::munmap(self.base.cast(), self.bytes) };
    }
}

/// Turns an older layout's slot bytes into this version's `F` (`layout::FlowConverter` for
/// IPv4).
type Converter<F> = fn(from: u32, old: &[u8]) -> Option<F>;

/// One family's flows in two passes: before the swap (everything), after it (what the old
/// program changed meanwhile).
struct FlowCopy<F: Slot> {
    old: RawSlots,
    convert: Option<Converter<F>>,
    from: u32,
    /// The tuple hash changed: no flow keeps its slot number.
    rehash: bool,
    /// Each old slot's `ctl` (converted) as the first pass read it.
    seen: Vec<u64>,
    /// Each new slot's `ctl` as the first pass left it.
    left: Vec<u64>,
    /// Client 5-tuples indexed by the first pass.
    indexed: BTreeSet<F::Key>,
    copied: u64,
    late: u64,
    skipped: u64,
}

/// Whether a slot holds something to carry over: a flow, or (same slot count) a closed flow's
/// tuple held for TIME_WAIT.
fn worth<F: Slot>(f: &F, now: u32, same_slots: bool) -> bool {
    match f.state() {
        st::CLAIMING => false,
        st::FREE => same_slots && (f.stamp().wrapping_sub(now) as i32) > 0,
        _ => true,
    }
}

impl<F: Slot> FlowCopy<F> {
    fn first(
        old: RawSlots,
        new: &SlotTable<F>,
        index: &FlowIndex,
        ids: &IdMap,
        convert: Option<Converter<F>>,
        from: u32,
        rehash: bool,
    ) -> anyhow::Result<Self> {
        let mut c = Self {
            seen: vec![0; old.len],
            left: (0..new.len()).map(|j| new.ctl_now(j)).collect(),
            old,
            convert,
            from,
            rehash,
            indexed: BTreeSet::new(),
            copied: 0,
            late: 0,
            skipped: 0,
        };
        let now = crate::conntrack::now();
        // Client 5-tuple -> (slot, rank): a client that reused a closing flow's 5-tuple has two
        // slots with it; the index names the open one (then the more recent).
        let mut best: HashMap<F::Key, (u32, (bool, u32))> = HashMap::new();
        for i in 0..c.old.len {
            let Some(f) = c.old.get::<F>(i, c.convert, c.from) else {
                continue;
            };
            c.seen[i] = f.ctl();
            if !worth(&f, now, c.same_slots(new)) {
                continue;
            }
            let f = ids.translate(f);
            let j = c.slot(i, &f, new);
            match new.install(j, c.left[j], &f) {
                Some(ctl) => {
                    c.left[j] = ctl;
                    c.copied += 1;
                    if f.state() > st::CLAIMING {
                        let rank = (f.state() != st::CLOSING, f.last_seen());
                        let e = best.entry(f.client_key()).or_insert((j as u32, rank));
                        if rank > e.1 {
                            *e = (j as u32, rank);
                        }
                    }
                }
                None => c.skipped += 1,
            }
        }
        for (key, (slot, _)) in best {
            anyhow::ensure!(
                index.insert(F::key_hash(&key), slot),
                "indexing a migrated flow: its buckets of {} are full",
                F::MAP
            );
            c.indexed.insert(key);
        }
        Ok(c)
    }

    /// Whether every flow keeps its slot number: same table size (a migration keeps the old
    /// sizes) and the same tuple hash.
    fn same_slots(&self, new: &SlotTable<F>) -> bool {
        !self.rehash && self.old.len == new.len()
    }

    /// Where old slot `i`'s flow goes: the same slot (`same_slots`), else the slot of its SNAT
    /// tuple in the new table.
    fn slot(&self, i: usize, f: &F, new: &SlotTable<F>) -> usize {
        if self.same_slots(new) {
            return i;
        }
        f.reply_slot(new.len() as u32) as usize
    }

    /// After the swap: the flows the old program created or changed since the first pass, into
    /// slots the new program has not taken since; their index entries unless the new program
    /// made its own.
    fn after_swap(&mut self, new: &SlotTable<F>, index: &FlowIndex, ids: &IdMap) {
        for i in 0..self.old.len {
            let Some(f) = self.old.get::<F>(i, self.convert, self.from) else {
                continue;
            };
            if f.ctl() == self.seen[i] || f.state() <= st::CLAIMING {
                continue;
            }
            let f = ids.translate(f);
            let j = self.slot(i, &f, new);
            if new.install(j, self.left[j], &f).is_none() {
                self.skipped += 1;
                continue;
            }
            self.late += 1;
            self.copied += 1;
            let key = f.client_key();
            // The new program's own flow for this 5-tuple wins.
            if !self.indexed.contains(&key) && index.find(new, &key).is_none() {
                index.insert(F::key_hash(&key), j as u32);
            }
        }
    }

    fn summary(&self, family: &str) -> String {
        format!(
            "{family}: {} flows carried over ({} after the swap), {} not (slot taken)",
            self.copied, self.late, self.skipped
        )
    }
}
/// `union bpf_attr` for BPF_MAP_LOOKUP_ELEM / BPF_MAP_UPDATE_ELEM.
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

fn elem_call(cmd: libc::c_long, fd: RawFd, key: &u32, value: *const u8) -> std::io::Result<()> {
    let mut attr = ElemAttr {
        map_fd: fd as u32,
        _pad: 0,
        key: key as *const u32 as u64,
        value: value as u64,
        flags: 0,
    };
    // SAFETY: a valid `bpf_attr` for the command; `key` and `value` point at a key and a
    // per-CPU value buffer of the map's sizes (the callers size them), writable for a lookup.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            &mut attr as *mut ElemAttr,
            size_of::<ElemAttr>(),
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A per-CPU array entry, raw (every CPU's value, each rounded up to 8 bytes).
fn lookup(fd: RawFd, key: &u32, out: &mut [u8]) -> std::io::Result<()> {
    elem_call(1, fd, key, out.as_mut_ptr())
}

fn update(fd: RawFd, key: &u32, value: &[u8]) -> std::io::Result<()> {
    elem_call(2, fd, key, value.as_ptr())
}
