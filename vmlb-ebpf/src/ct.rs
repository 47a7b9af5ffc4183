//! Conntrack: the flow slots (`FLOW_SLOTS`) and their state machine.
//!
//! One flow = one slot, found by the client through the flow index (index.rs) and by the
//! backend's reply through the SNAT tuple's hash, so both directions are created, found, closed
//! and freed as one. A slot changes hands only by compare-and-swap on `ctl` (generation << 8 |
//! state): a CPU claims a FREE slot whose TIME_WAIT hold (`stamp`) has passed, writes it,
//! indexes it, then publishes it; user space frees expired slots the same way (vmlb-user's
//! conntrack sweep), after taking their index entry away.

use vmlb_common::{flow_state as st, Config, Counter, Flow, Flow6, FlowKey, FLOW_GEN_SHIFT};

use crate::maps::{FLOW_INDEX, FLOW_SLOTS};

/// The data path's clock (see `vmlb_common::CLOCK_SHIFT`).
#[inline(always)]
pub fn now() -> u32 {
    // SAFETY: plain helper call without arguments.
    (unsafe { aya_ebpf::helpers::bpf_ktime_get_coarse_ns() } >> vmlb_common::CLOCK_SHIFT) as u32
}

/// A flow slot of either family: the state machine below touches only `ctl`, `stamp` and
/// `touched`, so IPv4 (`Flow`) and IPv6 (`Flow6`) flows share it.
pub trait Slot {
    fn ctl(f: *mut Self) -> *mut u64;
    fn stamp(f: *mut Self) -> *mut u32;
    fn touched(f: *mut Self) -> *mut u8;
}

/// `Slot` for a flow type with `ctl`, `stamp` and `touched` fields.
macro_rules! slot {
    ($flow:ty) => {
        impl Slot for $flow {
            #[inline(always)]
            fn ctl(f: *mut Self) -> *mut u64 {
                // SAFETY: a field address of a valid pointer, not dereferenced here.
                unsafe { core::ptr::addr_of_mut!((*f).ctl) }
            }
            #[inline(always)]
            fn stamp(f: *mut Self) -> *mut u32 {
                // SAFETY: as above.
                unsafe { core::ptr::addr_of_mut!((*f).stamp) }
            }
            #[inline(always)]
            fn touched(f: *mut Self) -> *mut u8 {
                // SAFETY: as above.
                unsafe { core::ptr::addr_of_mut!((*f).touched) }
            }
        }
    };
}
slot!(Flow);
slot!(Flow6);

/// Compare-and-swap of an aligned u64 in a map value. `AtomicU64::compare_exchange` does not
/// exist on the bpfel target (its spec leaves atomic CAS off), but LLVM lowers the intrinsic to
/// the BPF `cmpxchg` instruction (kernel >= 5.12), so the intrinsic is used directly.
#[inline(always)]
pub fn cas_u64(p: *mut u64, old: u64, new: u64) -> bool {
    use core::intrinsics::{atomic_cxchg, AtomicOrdering::SeqCst};
    // SAFETY: callers pass an aligned u64 inside a live map value.
    unsafe { atomic_cxchg::<u64, { SeqCst }, { SeqCst }>(p, old, new).1 }
}

/// Compare-and-swap of a flow's `ctl`.
#[inline(always)]
fn cas<F: Slot>(f: *mut F, old: u64, new: u64) -> bool {
    cas_u64(F::ctl(f), old, new)
}

/// Read a flow's `ctl`. An aligned 8-byte load is atomic on every BPF JIT; LLVM's acquire
/// loads need BPF v4, and the ordering that matters (fields written before `ctl` publishes
/// them) comes from the writer's full-barrier `cmpxchg`.
#[inline(always)]
pub fn load<F: Slot>(f: *mut F) -> u64 {
    // SAFETY: `ctl` is an aligned u64 inside a live map value.
    unsafe { core::ptr::read_volatile(F::ctl(f)) }
}

#[inline(always)]
pub fn slot(idx: u32) -> Option<*mut Flow> {
    FLOW_SLOTS.get_ptr_mut(idx)
}

/// The client direction: the live flow of this 5-tuple (of hash `hash`), with its `ctl` and
/// its index entry's value.
#[inline(always)]
pub fn find(key: &FlowKey, hash: u32, cfg: &Config) -> Option<(*mut Flow, u64, u64)> {
    crate::index::find(&FLOW_INDEX, cfg.index_buckets, hash, slot, |f| mine(f, key))
}

/// Whether slot `f` holds the client 5-tuple `key`.
#[inline(always)]
pub fn mine(f: *mut Flow, key: &FlowKey) -> bool {
    // SAFETY: a valid map value pointer.
    unsafe {
        (*f).client_addr == key.src_addr
            && (*f).vip_addr == key.dst_addr
            && (*f).client_port == key.src_port
            && (*f).vip_port == key.dst_port
            && (*f).proto == key.proto
    }
}

/// The reply direction: the flow holding the SNAT tuple in slot `idx`, checked field by field
/// (a slot may hold another tuple that hashes to the same index).
#[inline(always)]
pub fn find_reply(idx: u32, key: &FlowKey) -> Option<(*mut Flow, u64)> {
    let f = slot(idx)?;
    let c = load(f);
    if (c as u8) <= st::CLAIMING {
        return None;
    }
    // SAFETY: `f` is a valid map value pointer.
    let ok = unsafe {
        (*f).backend_addr == key.src_addr
            && (*f).snat_addr == key.dst_addr
            && (*f).backend_port == key.src_port
            && (*f).snat_port == key.dst_port
            && (*f).proto == key.proto
    };
    ok.then_some((f, c))
}

/// The `probe`-th slot a dnat flow with this reply tuple may take (`DNAT_PROBES`): the tuple's
/// own slot, then the ones after it, wrapping.
#[inline(always)]
pub fn dnat_slot(base: u32, probe: u32, slot_count: u32) -> u32 {
    let idx = base + probe;
    if idx >= slot_count {
        idx - slot_count
    } else {
        idx
    }
}

/// The reply direction of a dnat flow: the tuple's slot and the `DNAT_PROBES - 1` after it.
#[inline(always)]
pub fn find_dnat_reply(key: &FlowKey, slot_count: u32) -> Option<(*mut Flow, u64)> {
    let base = vmlb_common::hash::tuple_slot(
        key.src_addr,
        key.dst_addr,
        key.src_port,
        key.dst_port,
        key.proto,
        slot_count,
    );
    let mut probe = 0;
    while probe < vmlb_common::DNAT_PROBES {
        if let Some(found) = find_reply(dnat_slot(base, probe, slot_count), key) {
            return Some(found);
        }
        probe += 1;
    }
    None
}

/// Move a live flow to `to` (a TCP state change), unless someone changed it first. Closing
/// records its time (the only clock read on the established and reply paths, once per flow).
#[inline(always)]
pub fn transition<F: Slot>(f: *mut F, c: u64, to: u8) -> bool {
    let new = (c & !0xff) | to as u64;
    if !cas(f, c, new) {
        return false;
    }
    if to == st::CLOSING {
        // SAFETY: valid map value; only the CPU that won the CAS writes the closing time.
        unsafe { *F::stamp(f) = now() };
    }
    true
}

/// TCP flags on a live flow: FIN/RST start closing; a reply ends SYN_SENT. Returns the state.
#[inline(always)]
pub fn track<F: Slot>(f: *mut F, c: u64, flags: u8, reply: bool) -> u8 {
    let state = c as u8;
    if state == st::UDP || state == st::CLOSING {
        return state;
    }
    if flags & (crate::parse::TCP_FIN | crate::parse::TCP_RST) != 0 {
        if transition(f, c, st::CLOSING) {
            crate::stats::count(Counter::FlowClosing);
        }
        return st::CLOSING;
    }
    if reply && state == st::SYN_SENT && transition(f, c, st::ESTABLISHED) {
        return st::ESTABLISHED;
    }
    state
}

/// Mark the flow as seen since the last sweep, storing only when the mark is not set yet (a busy
/// flow's cache line is then only read).
#[inline(always)]
pub fn touch<F: Slot>(f: *mut F) {
    // SAFETY: valid map value pointer; racing stores of 1 are harmless.
    unsafe {
        let t = F::touched(f);
        if *t == 0 {
            *t = 1;
        }
    }
}

/// Claim slot `f` (whose `ctl` was read as `c`) for a new flow: it must be FREE and past its
/// TIME_WAIT hold. Returns its new `ctl` (state CLAIMING) on success.
#[inline(always)]
pub fn claim<F: Slot>(f: *mut F, c: u64, now: u32) -> Option<u64> {
    if c as u8 != st::FREE {
        return None;
    }
    // SAFETY: valid map value pointer. `stamp` of a FREE slot is its earliest reuse time; a
    // never-used slot has 0, and wrapping comparison treats "ahead by more than half the clock
    // range" as past, so a slot can never be held for more than ~24 days by a bogus stamp.
    let hold = unsafe { *F::stamp(f) };
    if (now.wrapping_sub(hold) as i32) < 0 {
        return None;
    }
    let claimed = ((c >> FLOW_GEN_SHIFT).wrapping_add(1) << FLOW_GEN_SHIFT) | st::CLAIMING as u64;
    cas(f, c, claimed).then_some(claimed)
}

/// Make a claimed and written slot visible with its first state; returns the new `ctl`.
#[inline(always)]
pub fn publish<F: Slot>(f: *mut F, claimed: u64, state: u8) -> u64 {
    // Only this CPU changes a CLAIMING slot, so the swap cannot fail.
    let c = (claimed & !0xff) | state as u64;
    cas(f, claimed, c);
    c
}

/// How a new flow comes to be, and what it does with the index.
#[derive(Clone, Copy)]
pub enum New {
    /// A SYN not looked up yet: `None` if its 5-tuple has a live flow.
    IfAbsent,
    /// No flow was found.
    Fresh,
    /// The flow replaces a closing one (its index entry's value).
    Replace(u64),
    /// The flow moves off a down backend (its old entry's value); not only a SYN may do that.
    Rebalance(u64),
}

impl New {
    /// The index entry value the new flow replaces, and whether it moves off a down backend.
    #[inline(always)]
    pub fn replacing(self) -> (Option<u64>, bool) {
        match self {
            New::Replace(old) => (Some(old), false),
            New::Rebalance(old) => (Some(old), true),
            New::IfAbsent | New::Fresh => (None, false),
        }
    }
}

/// Give back a claimed slot whose flow could not be indexed (it was never published, so no
/// packet went out on its tuple and it needs no TIME_WAIT hold).
#[inline(always)]
pub fn release<F: Slot>(f: *mut F, claimed: u64) {
    publish(f, claimed, st::FREE);
}

/// A source that must never be NATed: 0/8, 127/8, multicast and reserved (224/3), limited
/// broadcast (in 240/4), or one of our own VIP / SNAT addresses.
#[inline(always)]
pub fn martian(src: u32, cfg: &Config) -> bool {
    let first = src.to_ne_bytes()[0];
    if first == 0 || first == 127 || first >= 224 {
        return true;
    }
    is_snat_addr(src, cfg)
        || (vmlb_common::vip_filter_has(&cfg.vip_filter, src) && crate::lookup::is_vip(src))
}

/// Is `addr` one of the node's SNAT addresses (a reply candidate)?
#[inline(always)]
pub fn is_snat_addr(addr: u32, cfg: &Config) -> bool {
    let n = cfg.snat_count as usize;
    let mut i = 0;
    while i < vmlb_common::MAX_SNAT_ADDRS {
        if i >= n {
            return false;
        }
        if cfg.snat_addrs[i] == addr {
            return true;
        }
        i += 1;
    }
    false
}
