//! Flow expiry: user space's half of the flow lifecycle.
//!
//! The data path creates flows and moves them through SYN_SENT -> ESTABLISHED -> CLOSING; only
//! this sweep ends them. It walks `FLOW_SLOTS` through a shared memory mapping (the map is
//! BPF_F_MMAPABLE), decides expiry with the pure [`expiry`], frees a slot with the same
//! compare-and-swap on `ctl` the data path uses (so a flow the data path just touched, or a slot
//! a CPU is claiming, is never freed under it), stamps the slot with the earliest time its SNAT
//! tuple may be reused (TIME_WAIT safety). The flow's `FLOW_INDEX` entry goes first, by the same
//! compare-and-swap on the index's shared mapping ([`FlowIndex`]).
//!
//! IPv6 flows (`FLOW_SLOTS6`, `FLOW_INDEX6`) go through the same code: `Flow6` keeps `Flow`'s
//! lifecycle fields at the same offsets, and both implement [`Slot`].

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use crate::dataplane::mmap::MappedArray;
use aya::maps::MapData;
use vmlb_common::{
    clock_units_from_ms, flow_state as st,
    index::{bucket_of, entry_matches, entry_slot, index_capacity, index_entry, INDEX_PROBES},
    Addr6, Flow, Flow6, FlowBucket, FlowKey, FlowKey6, CLOCK_SHIFT,
};

/// A value of a flow slot array: `Flow` in `FLOW_SLOTS`, `Flow6` in `FLOW_SLOTS6`. What the
/// sweep reads and writes of a slot: the lifecycle fields (`ctl`, `last_seen`, `stamp`,
/// `touched`), the backend, and the key of the flow's index entry.
pub trait Slot: Copy + Default + 'static {
    /// The client 5-tuple, hashed into the index (`FLOW_INDEX`, `FLOW_INDEX6`).
    type Key: aya::Pod + Eq + Ord + std::hash::Hash + std::fmt::Debug;
    /// The array's name, for errors.
    const MAP: &'static str;
    /// The index hash of a client 5-tuple (as the data path computes it).
    fn key_hash(key: &Self::Key) -> u32;
    fn ctl(&self) -> u64;
    fn state(&self) -> u8;
    fn last_seen(&self) -> u32;
    fn set_last_seen(&mut self, t: u32);
    fn stamp(&self) -> u32;
    fn touched(&self) -> u8;
    fn backend_id(&self) -> u32;
    /// Service and backend ids (a layout migration translates them).
    fn ids(&self) -> (u32, u32);
    fn set_ids(&mut self, service: u32, backend: u32);
    fn client_key(&self) -> Self::Key;
    /// The slot of this flow's SNAT tuple in a table of `slot_count` slots.
    fn reply_slot(&self, slot_count: u32) -> u32;
    /// `ctl`, `last_seen`, `stamp` and `touched` of the slot at `p`.
    ///
    /// # Safety
    /// `p` points at a slot (in bounds of a mapping of its array).
    unsafe fn fields(p: *mut Self) -> (*mut u64, *mut u32, *mut u32, *mut u8);
}

macro_rules! slot {
    ($flow:ty, $key:ty, $map:literal, $hash:path, $tuple_slot:path) => {
        impl Slot for $flow {
            type Key = $key;
            const MAP: &'static str = $map;
            fn key_hash(key: &$key) -> u32 {
                $hash(key)
            }
            fn ctl(&self) -> u64 {
                self.ctl
            }
            fn state(&self) -> u8 {
                <$flow>::state(self)
            }
            fn last_seen(&self) -> u32 {
                self.last_seen
            }
            fn set_last_seen(&mut self, t: u32) {
                self.last_seen = t;
            }
            fn stamp(&self) -> u32 {
                self.stamp
            }
            fn touched(&self) -> u8 {
                self.touched
            }
            fn backend_id(&self) -> u32 {
                self.backend_id
            }
            fn ids(&self) -> (u32, u32) {
                (self.service_id, self.backend_id)
            }
            fn set_ids(&mut self, service: u32, backend: u32) {
                self.service_id = service;
                self.backend_id = backend;
            }
            fn client_key(&self) -> $key {
                <$flow>::client_key(self)
            }
            fn reply_slot(&self, slot_count: u32) -> u32 {
                $tuple_slot(
                    self.backend_addr,
                    self.snat_addr,
                    self.backend_port,
                    self.snat_port,
                    self.proto,
                    slot_count,
                )
            }
            unsafe fn fields(p: *mut Self) -> (*mut u64, *mut u32, *mut u32, *mut u8) {
                // SAFETY: the caller's `p` is a slot; only field addresses are taken.
                unsafe {
                    (
                        std::ptr::addr_of_mut!((*p).ctl),
                        std::ptr::addr_of_mut!((*p).last_seen),
                        std::ptr::addr_of_mut!((*p).stamp),
                        std::ptr::addr_of_mut!((*p).touched),
                    )
                }
            }
        }
    };
}
slot!(
    Flow,
    FlowKey,
    "FLOW_SLOTS",
    vmlb_common::index::key_hash,
    vmlb_common::hash::tuple_slot
);
slot!(
    Flow6,
    FlowKey6,
    "FLOW_SLOTS6",
    vmlb_common::index::key_hash6,
    tuple_slot6_of
);

/// `hash::tuple_slot6` with its addresses by value, as the `slot!` macro passes them.
fn tuple_slot6_of(b: Addr6, s: Addr6, bport: u16, sport: u16, proto: u8, n: u32) -> u32 {
    vmlb_common::hash::tuple_slot6(&b, &s, bport, sport, proto, n)
}

/// `FLOW_INDEX` (or `FLOW_INDEX6`), mapped into this process. Entries change only by
/// compare-and-swap, as in the data path (vmlb-ebpf index.rs; layout in `vmlb_common::index`).
pub struct FlowIndex {
    mem: MappedArray,
    map: MapData,
}

impl FlowIndex {
    /// Map the index array behind `map` (`what` names it in errors).
    pub fn map(map: MapData, what: &str) -> anyhow::Result<Self> {
        let mem = MappedArray::map(&map, size_of::<FlowBucket>(), what)?;
        anyhow::ensure!(mem.len() >= 2, "{what} has fewer than 2 buckets");
        Ok(Self { mem, map })
    }

    /// The map itself (to pin it, or read its info).
    pub fn map_data(&self) -> &MapData {
        &self.map
    }

    pub fn buckets(&self) -> u32 {
        self.mem.len() as u32
    }

    /// Flows of capacity (`index::index_capacity`).
    pub fn capacity(&self) -> u32 {
        index_capacity(self.buckets())
    }

    fn at(&self, bucket: u32, way: usize) -> &AtomicU64 {
        // SAFETY: a bucket of the mapping (bounds-checked by `at`), `way` within it; entries are
        // aligned u64 (the mapping is page-aligned, buckets are 64 bytes).
        unsafe {
            AtomicU64::from_ptr(
                self.mem
                    .at(bucket as usize)
                    .cast::<u64>()
                    .add(way % vmlb_common::index::INDEX_WAYS),
            )
        }
    }

    /// Every entry a flow of hash `hash` may use, in probe order.
    fn entries(&self, hash: u32) -> impl Iterator<Item = &AtomicU64> + '_ {
        let buckets = self.buckets();
        (0..INDEX_PROBES).flat_map(move |p| {
            let b = bucket_of(hash, buckets, p);
            (0..vmlb_common::index::INDEX_WAYS).map(move |w| self.at(b, w))
        })
    }

    /// The slots indexed under `hash`'s tag, in probe order.
    pub fn slots_of(&self, hash: u32) -> impl Iterator<Item = u32> + '_ {
        self.entries(hash).filter_map(move |e| {
            let v = e.load(Ordering::SeqCst);
            entry_matches(v, hash).then(|| entry_slot(v))
        })
    }

    /// The live flow of client 5-tuple `key`, with its slot (as the data path finds it).
    pub fn find<F: Slot>(&self, slots: &SlotTable<F>, key: &F::Key) -> Option<(u32, F)> {
        self.slots_of(F::key_hash(key)).find_map(|i| {
            let f = ((i as usize) < slots.len()).then(|| slots.get(i as usize))?;
            (f.state() > st::CLAIMING && f.client_key() == *key).then_some((i, f))
        })
    }

    /// Index slot `slot` under `hash` in the first empty entry. False: both buckets are full.
    pub fn insert(&self, hash: u32, slot: u32) -> bool {
        let value = index_entry(hash, slot);
        self.entries(hash).any(|e| {
            e.load(Ordering::SeqCst) == 0
                && e.compare_exchange(0, value, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
        })
    }

    /// Take away the entry naming `slot` under `hash`, if there is one.
    pub fn remove(&self, hash: u32, slot: u32) -> bool {
        let value = index_entry(hash, slot);
        self.entries(hash).any(|e| {
            e.compare_exchange(value, 0, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        })
    }

    /// Entries in use.
    pub fn len(&self) -> usize {
        (0..self.buckets())
            .flat_map(|b| (0..vmlb_common::index::INDEX_WAYS).map(move |w| (b, w)))
            .filter(|&(b, w)| self.at(b, w).load(Ordering::Relaxed) != 0)
            .count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Flow timeouts (README: "Flow state"). Defaults and why:
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// SYN forwarded, no answer: 60 s covers a client's SYN retransmissions (1+2+4+8+16 s),
    /// as Cilium's 60 s SYN timeout does.
    pub syn: Duration,
    /// SYN-only flows while the table is under pressure (flood guard): 5 s.
    pub syn_pressure: Duration,
    /// Idle established TCP: 2 h 4 min, RFC 5382 REQ-5's floor for NATs, which lets TCP
    /// keepalives (every 2 h by default) hold an idle connection open.
    pub established: Duration,
    /// After FIN or RST: 10 s to carry the last ACKs and retransmitted FINs.
    pub closing: Duration,
    /// Idle UDP: 60 s (Cilium's non-TCP lifetime; DNS-like exchanges finish far sooner, and
    /// longer-lived UDP "connections" keep themselves alive).
    pub udp: Duration,
    /// A closed TCP flow's SNAT tuple is not reused for this long after the close began: the
    /// VM keeps (SNAT address, port, VM, port) in TIME_WAIT for 60 s (Linux's TCP_TIMEWAIT_LEN),
    /// and a SYN reusing it too early is rejected by PAWS about half the time. But the timer
    /// wheel runs a 60 s timer late by up to its level's granularity (2 s at HZ=250, 5 s at
    /// HZ=100), and TIME_WAIT starts only when the VM sees the client's FIN: with a 61 s hold
    /// the sustained lab test saw 26 PAWS rejections in 144,000 connections. 66 s covers both.
    pub time_wait: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            syn: Duration::from_secs(60),
            syn_pressure: Duration::from_secs(5),
            established: Duration::from_secs(7440),
            closing: Duration::from_secs(10),
            udp: Duration::from_secs(60),
            time_wait: Duration::from_secs(66),
        }
    }
}

/// The timeouts in the data path's clock units.
#[derive(Clone, Copy, Debug)]
struct Units {
    syn: u32,
    syn_pressure: u32,
    established: u32,
    closing: u32,
    udp: u32,
    time_wait: u32,
}

impl From<&Timeouts> for Units {
    fn from(t: &Timeouts) -> Self {
        let u = |d: Duration| clock_units_from_ms(d.as_millis() as u64);
        Self {
            syn: u(t.syn),
            syn_pressure: u(t.syn_pressure),
            established: u(t.established),
            closing: u(t.closing),
            udp: u(t.udp),
            time_wait: u(t.time_wait),
        }
    }
}

/// Why a flow ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Expiry {
    Syn,
    Established,
    Closing,
    Udp,
}

impl Expiry {
    pub const ALL: [Expiry; 4] = [
        Expiry::Syn,
        Expiry::Established,
        Expiry::Closing,
        Expiry::Udp,
    ];
    pub const fn name(self) -> &'static str {
        match self {
            Expiry::Syn => "syn_timeout",
            Expiry::Established => "idle",
            Expiry::Closing => "closed",
            Expiry::Udp => "udp_idle",
        }
    }
}

/// Has `f` expired at `now`? If so, why, and from when its SNAT tuple may be reused.
/// Pure: the whole expiry policy, tested without a kernel.
pub fn expiry(f: &impl Slot, now: u32, t: &Timeouts, pressure: bool) -> Option<(Expiry, u32)> {
    let u = Units::from(t);
    let idle = now.wrapping_sub(f.last_seen());
    let (why, limit, since) = match f.state() {
        st::SYN_SENT => (
            Expiry::Syn,
            if pressure { u.syn_pressure } else { u.syn },
            idle,
        ),
        st::ESTABLISHED => (Expiry::Established, u.established, idle),
        st::CLOSING => (Expiry::Closing, u.closing, now.wrapping_sub(f.stamp())),
        st::UDP => (Expiry::Udp, u.udp, idle),
        _ => return None,
    };
    if since < limit || (since as i32) < 0 {
        return None;
    }
    // TCP: the tuple waits out the VM's TIME_WAIT from when the close began (or from the last
    // packet, for flows that just went silent). UDP has no TIME_WAIT: free at once.
    let reuse_at = match why {
        Expiry::Closing => f.stamp().wrapping_add(u.time_wait),
        Expiry::Udp => now,
        Expiry::Syn | Expiry::Established => f.last_seen().wrapping_add(u.time_wait),
    };
    // Never earlier than now (the slot is already FREE, a past time just means "now").
    let reuse_at = if (reuse_at.wrapping_sub(now) as i32) < 0 {
        now
    } else {
        reuse_at
    };
    Some((why, reuse_at))
}

/// The data path's clock, read from user space (CLOCK_MONOTONIC_COARSE, as
/// bpf_ktime_get_coarse_ns).
pub fn now() -> u32 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE)
        .expect("CLOCK_MONOTONIC_COARSE is always available on Linux");
    let ns = ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64;
    (ns >> CLOCK_SHIFT) as u32
}

/// `FLOW_SLOTS` (or `FLOW_SLOTS6`: `SlotTable<Flow6>`), mapped into this process. All access
/// to `ctl` is atomic and other fields are read as plain copies (the data path's writes to them
/// are ordered before its `ctl` compare-and-swap).
pub struct SlotTable<F: Slot = Flow> {
    mem: MappedArray,
    map: MapData,
    _slot: std::marker::PhantomData<F>,
}

impl<F: Slot> SlotTable<F> {
    /// Map the `F::MAP` array behind `map` (a handle opened any way: taken from the loaded
    /// object or from its pin).
    pub fn map(map: MapData) -> anyhow::Result<Self> {
        let mem = MappedArray::map(&map, size_of::<F>(), F::MAP)?;
        // Both slot types are multiples of 8 bytes (vmlb-common asserts their sizes): the
        // kernel's stride is the value size, so slot `i` is an `F` at `at(i)`.
        debug_assert_eq!(mem.stride(), size_of::<F>());
        Ok(Self {
            mem,
            map,
            _slot: std::marker::PhantomData,
        })
    }

    /// Slot `i` in the mapping (bounds-checked by `MappedArray::at`).
    fn slot(&self, i: usize) -> *mut F {
        self.mem.at(i).cast()
    }

    /// The map itself (to pin it, or read its info).
    pub fn map_data(&self) -> &MapData {
        &self.map
    }

    pub fn len(&self) -> usize {
        self.mem.len()
    }

    pub fn is_empty(&self) -> bool {
        self.mem.is_empty()
    }

    /// The lifecycle fields of slot `i` (see `Slot::fields`).
    fn fields(&self, i: usize) -> (*mut u64, *mut u32, *mut u32, *mut u8) {
        // SAFETY: a slot of the mapping (bounds-checked by `slot`).
        unsafe { F::fields(self.slot(i)) }
    }

    fn ctl(&self, i: usize) -> &AtomicU64 {
        // SAFETY: in bounds; `ctl` is the first, 8-byte aligned field of a page-aligned array
        // of 8-byte multiples.
        unsafe { AtomicU64::from_ptr(self.fields(i).0) }
    }

    /// A copy of slot `i`.
    pub fn get(&self, i: usize) -> F {
        // SAFETY: in bounds; a plain copy of shared memory (see the Sync impl).
        unsafe { std::ptr::read_volatile(self.slot(i)) }
    }

    /// A packet passed since the last sweep: record when, clear the mark.
    fn seen(&self, i: usize, now: u32) {
        // SAFETY: in bounds; plain stores racing with the data path's store of `touched = 1`
        // lose at most one mark, which the next packet sets again.
        let (_, last_seen, _, touched) = self.fields(i);
        unsafe {
            last_seen.write_volatile(now);
            touched.write_volatile(0);
        }
    }

    /// Overwrite slot `i` (tests and tools: not atomic with the data path).
    pub fn set(&self, i: usize, f: &F) {
        // SAFETY: in bounds of the shared mapping.
        unsafe { std::ptr::write_volatile(self.slot(i), *f) }
    }

    /// Slot `i`'s `ctl` now.
    pub fn ctl_now(&self, i: usize) -> u64 {
        self.ctl(i).load(Ordering::SeqCst)
    }

    /// Put `f` (its state included) into slot `i` if the slot's `ctl` is still `expected`, the
    /// way the data path creates a flow: claim by compare-and-swap (CLAIMING, next generation),
    /// write the other fields, publish. Returns the slot's new `ctl`, or `None` when someone
    /// changed the slot first (a layout migration then leaves it to them).
    pub fn install(&self, i: usize, expected: u64, f: &F) -> Option<u64> {
        let claimed = ((expected >> vmlb_common::FLOW_GEN_SHIFT).wrapping_add(1)
            << vmlb_common::FLOW_GEN_SHIFT)
            | st::CLAIMING as u64;
        self.ctl(i)
            .compare_exchange(expected, claimed, Ordering::SeqCst, Ordering::SeqCst)
            .ok()?;
        // `ctl` is the first 8 bytes of both slot types.
        let skip = size_of::<u64>();
        // SAFETY: in bounds; everything after `ctl` is copied. Only the claimer writes a
        // CLAIMING slot, and readers ignore it until the store below publishes it.
        unsafe {
            let dst = self.slot(i).cast::<u8>().add(skip);
            let src = (f as *const F).cast::<u8>().add(skip);
            std::ptr::copy_nonoverlapping(src, dst, size_of::<F>() - skip);
        }
        let published = (claimed & !0xff) | f.state() as u64;
        self.ctl(i).store(published, Ordering::SeqCst);
        Some(published)
    }

    /// Every live flow with its slot index.
    pub fn live(&self) -> impl Iterator<Item = (u32, F)> + '_ {
        (0..self.len()).filter_map(|i| {
            let f = self.get(i);
            (f.state() > st::CLAIMING).then_some((i as u32, f))
        })
    }

    /// Free slot `i` if its `ctl` is still `expected`, holding its tuple until `reuse_at`.
    fn free(&self, i: usize, expected: u64, reuse_at: u32) -> bool {
        // `stamp` first: a claimer reads it only after seeing FREE, and the swap orders it.
        // SAFETY: in bounds; `stamp` of a live slot is written only by the CPU that moves it to
        // CLOSING, which cannot happen once our swap succeeds (it swaps from the same `ctl`).
        let stamp = self.fields(i).2;
        let old_stamp = unsafe { stamp.read_volatile() };
        unsafe { stamp.write_volatile(reuse_at) };
        let freed = self
            .ctl(i)
            .compare_exchange(
                expected,
                expected & !0xff,
                Ordering::SeqCst,
                Ordering::SeqCst,
            )
            .is_ok();
        if !freed {
            // The data path changed the flow meanwhile (e.g. it started closing and wrote its
            // own stamp after ours, or not): put back what it may rely on.
            let now_ctl = self.ctl(i).load(Ordering::SeqCst);
            if now_ctl == expected {
                unsafe { stamp.write_volatile(old_stamp) };
            }
        }
        freed
    }
}

/// What one sweep saw and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sweep {
    /// Live flows after the sweep, by state.
    pub syn_sent: u64,
    pub established: u64,
    pub closing: u64,
    pub udp: u64,
    /// Flows ended by this sweep, by reason (indexed like `Expiry::ALL`).
    pub expired: [u64; 4],
    /// Slots holding a closed flow's tuple until its TIME_WAIT hold passes.
    pub held: u64,
}

impl Sweep {
    pub fn live(&self) -> u64 {
        self.syn_sent + self.established + self.closing + self.udp
    }
}

/// End every expired flow. `pressure`: the table is above the flood guard's threshold, so
/// SYN-only flows expire early.
///
/// Per live slot: a `touched` mark (a packet passed since the last sweep) becomes `last_seen =
/// now`; an expired flow first loses its index entry (if it still names this slot: the client
/// may have opened a new flow on the same 5-tuple, whose entry names its own slot), then its
/// slot is freed by compare-and-swap. In that order no index entry can ever name a slot freed
/// under it. A flow the data path changed meanwhile (a FIN on a reply) fails the swap, gets its
/// entry back and is looked at again next time.
pub fn sweep<F: Slot>(
    slots: &SlotTable<F>,
    index: &FlowIndex,
    t: &Timeouts,
    pressure: bool,
) -> Sweep {
    let mut out = Sweep::default();
    let now = now();
    for i in 0..slots.len() {
        let mut f = slots.get(i);
        let state = f.state();
        if state == st::FREE {
            if (f.stamp().wrapping_sub(now) as i32) > 0 {
                out.held += 1;
            }
            continue;
        }
        if state == st::CLAIMING {
            continue;
        }
        if f.touched() != 0 {
            slots.seen(i, now);
            f.set_last_seen(now);
        }
        if let Some((why, reuse_at)) = expiry(&f, now, t, pressure) {
            let hash = F::key_hash(&f.client_key());
            let unindexed = index.remove(hash, i as u32);
            if slots.free(i, f.ctl(), reuse_at) {
                out.expired[why as usize] += 1;
                if reuse_at != now {
                    out.held += 1;
                }
                continue;
            }
            if unindexed {
                index.insert(hash, i as u32);
            }
        }
        match slots.get(i).state() {
            st::SYN_SENT => out.syn_sent += 1,
            st::ESTABLISHED => out.established += 1,
            st::CLOSING => out.closing += 1,
            st::UDP => out.udp += 1,
            _ => {}
        }
    }
    out
}

/// Backend ids of the live flows (whose next hops the sweeper keeps fresh).
pub fn live_backends<F: Slot>(slots: &SlotTable<F>) -> std::collections::BTreeSet<u32> {
    slots.live().map(|(_, f)| f.backend_id()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(state: u8, last_seen: u32, stamp: u32) -> Flow {
        Flow {
            ctl: (7 << vmlb_common::FLOW_GEN_SHIFT) | state as u64,
            last_seen,
            stamp,
            ..Default::default()
        }
    }

    fn units(d: Duration) -> u32 {
        clock_units_from_ms(d.as_millis() as u64)
    }

    #[test]
    fn live_flows_within_their_timeouts_stay() {
        let t = Timeouts::default();
        let now = 100_000_000;
        for (state, timeout) in [
            (st::SYN_SENT, t.syn),
            (st::ESTABLISHED, t.established),
            (st::UDP, t.udp),
        ] {
            let f = flow(state, now - units(timeout) + 1, 0);
            assert_eq!(expiry(&f, now, &t, false), None, "state {state}");
        }
        let f = flow(st::CLOSING, now, now - units(t.closing) + 1);
        assert_eq!(expiry(&f, now, &t, false), None);
    }

    #[test]
    fn closed_tcp_holds_its_tuple_for_time_wait_from_the_close() {
        let t = Timeouts::default();
        let closed = 50_000_000;
        let now = closed + units(t.closing);
        let f = flow(st::CLOSING, closed, closed);
        assert_eq!(
            expiry(&f, now, &t, false),
            Some((Expiry::Closing, closed + units(t.time_wait)))
        );
    }

    #[test]
    fn udp_frees_at_once_and_idle_tcp_waits() {
        let t = Timeouts::default();
        let now = 90_000_000;
        let f = flow(st::UDP, now - units(t.udp), 0);
        assert_eq!(expiry(&f, now, &t, false), Some((Expiry::Udp, now)));
        let seen = now - units(t.established);
        let f = flow(st::ESTABLISHED, seen, 0);
        assert_eq!(expiry(&f, now, &t, false), Some((Expiry::Established, now)));
        // (time_wait < established: the hold is already over.)
        let _ = seen;
    }

    #[test]
    fn pressure_shortens_only_syn_flows() {
        let t = Timeouts::default();
        let now = 3_000_000;
        let syn = flow(st::SYN_SENT, now - units(t.syn_pressure), 0);
        assert_eq!(expiry(&syn, now, &t, false), None);
        assert_eq!(expiry(&syn, now, &t, true).map(|e| e.0), Some(Expiry::Syn));
        let est = flow(st::ESTABLISHED, now - units(t.syn_pressure), 0);
        assert_eq!(expiry(&est, now, &t, true), None);
    }

    #[test]
    fn clock_wraps_are_handled() {
        let t = Timeouts::default();
        let now = 5u32;
        let f = flow(st::UDP, now.wrapping_sub(units(t.udp)), 0);
        assert_eq!(expiry(&f, now, &t, false).map(|e| e.0), Some(Expiry::Udp));
        // A last_seen slightly in the future (a CPU's racing refresh) is not expired.
        let f = flow(st::UDP, now + 3, 0);
        assert_eq!(expiry(&f, now, &t, false), None);
    }

    #[test]
    fn free_and_claiming_slots_never_expire() {
        let t = Timeouts::default();
        for s in [st::FREE, st::CLAIMING] {
            assert_eq!(expiry(&flow(s, 0, 0), u32::MAX / 2, &t, false), None);
        }
    }

    /// `Flow6` goes through the same policy (the sweep is generic over the slot type).
    #[test]
    fn ipv6_flows_expire_like_ipv4_flows() {
        let t = Timeouts::default();
        let now = 90_000_000;
        let f = |state: u8, last_seen: u32| Flow6 {
            ctl: (7 << vmlb_common::FLOW_GEN_SHIFT) | state as u64,
            last_seen,
            ..Default::default()
        };
        assert_eq!(
            expiry(&f(st::UDP, now - units(t.udp)), now, &t, false),
            Some((Expiry::Udp, now))
        );
        assert_eq!(expiry(&f(st::ESTABLISHED, now - 1), now, &t, false), None);
        let flow = f(st::SYN_SENT, 5);
        assert_eq!(Slot::state(&flow), st::SYN_SENT);
        assert_eq!(Slot::ctl(&flow), flow.ctl);
        assert_eq!(<Flow6 as Slot>::MAP, "FLOW_SLOTS6");
    }
}
