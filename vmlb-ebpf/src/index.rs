//! The flow index stage (`FLOW_INDEX`, `FLOW_INDEX6`; layout and sizing in
//! `vmlb_common::index`): which slot holds the flow of a client 5-tuple.
//!
//! Entries change only by compare-and-swap, here and in user space's sweep. A new flow claims
//! and writes its slot first, then takes an empty entry, then publishes the slot: so an entry
//! always names a slot whose 5-tuple is already written. A lookup follows an entry only when
//! its tag is the packet's hash and accepts the slot only when it is live and holds the same
//! 5-tuple; anything else (a tag collision, a slot reused since) is skipped, never followed.

use aya_ebpf::maps::Array;
use vmlb_common::{
    flow_state as st,
    index::{bucket_of, entry_matches, entry_slot, INDEX_PROBES, INDEX_WAYS},
    Counter, FlowBucket,
};

use crate::ct::{cas_u64, load, Slot};

// Entries are passed around by value, never by address: an address found at way k of 16 is a
// map-value pointer with a constant offset, so each way became a verifier state of its own
// through the rest of the program (it did not fit in a million instructions). A value is looked
// up again where it is changed; within the same buckets that costs a few loads from the cache.

/// The `probe`-th bucket of `hash`, as a pointer to its first entry.
#[inline(always)]
fn bucket(map: &Array<FlowBucket>, buckets: u32, hash: u32, probe: u32) -> Option<*mut u64> {
    Some(
        map.get_ptr_mut(bucket_of(hash, buckets, probe))?
            .cast::<u64>(),
    )
}

/// Run `visit` on each entry of `hash`'s buckets in probe order (entry pointer, value) until it
/// returns something. Written as two passes over one bucket each, not nested loops: the nested
/// form made LLVM keep a register live across the inner loop's exit that the verifier saw
/// uninitialised on one path (`R3 !read_ok`).
#[inline(always)]
fn each<T>(
    map: &Array<FlowBucket>,
    buckets: u32,
    hash: u32,
    mut visit: impl FnMut(*mut u64, u64) -> Option<T>,
) -> Option<T> {
    let mut probe = 0;
    while probe < INDEX_PROBES {
        let b = bucket(map, buckets, hash, probe)?;
        let mut way = 0;
        while way < INDEX_WAYS {
            // SAFETY: `way < INDEX_WAYS`, inside the bucket's entries.
            let at = unsafe { b.add(way) };
            // SAFETY: an aligned u64 inside a map value; 8-byte loads are atomic.
            let e = unsafe { at.read_volatile() };
            if let Some(t) = visit(at, e) {
                return Some(t);
            }
            way += 1;
        }
        probe += 1;
    }
    None
}

/// The live flow of `hash` that `mine` accepts (its 5-tuple is the packet's), with its `ctl`
/// and its entry's value.
#[inline(always)]
pub fn find<F: Slot>(
    map: &Array<FlowBucket>,
    buckets: u32,
    hash: u32,
    slot: impl Fn(u32) -> Option<*mut F>,
    mine: impl Fn(*mut F) -> bool,
) -> Option<(*mut F, u64, u64)> {
    each(map, buckets, hash, |_, e| {
        if !entry_matches(e, hash) {
            return None;
        }
        let f = slot(entry_slot(e))?;
        let c = load(f);
        if c as u8 <= st::CLAIMING {
            return None;
        }
        if mine(f) {
            return Some((f, c, e));
        }
        crate::stats::count(Counter::FlowStale);
        None
    })
}

/// Take the first empty entry of `hash`'s buckets for `value`. False: both buckets are full.
#[inline(always)]
pub fn insert(map: &Array<FlowBucket>, buckets: u32, hash: u32, value: u64) -> bool {
    replace(map, buckets, hash, 0, value)
}

/// Change the first entry of `hash`'s buckets that holds `old` to `new`, by compare-and-swap.
/// False: none held `old` (or each changed first).
#[inline(always)]
pub fn replace(map: &Array<FlowBucket>, buckets: u32, hash: u32, old: u64, new: u64) -> bool {
    each(map, buckets, hash, |at, e| {
        (e == old && cas_u64(at, old, new)).then_some(())
    })
    .is_some()
}

/// Whether an entry other than `own` (this CPU's, by value: no other entry names its slot)
/// names a flow `mine` accepts that is live or being created: another CPU is creating this very
/// flow (a SYN and its retransmission on two CPUs). Called after `own` was taken, so of two
/// such CPUs at least the later one sees the other's entry.
#[inline(always)]
pub fn contested<F: Slot>(
    map: &Array<FlowBucket>,
    buckets: u32,
    hash: u32,
    own: u64,
    slot: impl Fn(u32) -> Option<*mut F>,
    mine: impl Fn(*mut F) -> bool,
) -> bool {
    each(map, buckets, hash, |_, e| {
        if e == own || !entry_matches(e, hash) {
            return None;
        }
        let f = slot(entry_slot(e))?;
        (load(f) as u8 != st::FREE && mine(f)).then_some(())
    })
    .is_some()
}

/// Index a new flow, claimed (`claimed` is its `ctl`) and written in slot `f`: in a free entry,
/// or in place of `replace` (the entry value of the closing flow it replaces). On failure the
/// slot is given back and the reason returned: both buckets full, or another CPU creating or
/// replacing the same 5-tuple first.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub fn take<F: Slot>(
    map: &Array<FlowBucket>,
    buckets: u32,
    hash: u32,
    value: u64,
    replace: Option<u64>,
    (f, claimed): (*mut F, u64),
    slot: impl Fn(u32) -> Option<*mut F>,
    mine: impl Fn(*mut F) -> bool,
) -> Result<(), Counter> {
    let lost = match replace {
        Some(old) if !self::replace(map, buckets, hash, old, value) => Counter::DropFlowRace,
        Some(_) => return Ok(()),
        None if !insert(map, buckets, hash, value) => Counter::DropFlowTableFull,
        None if contested(map, buckets, hash, value, slot, mine) => {
            self::replace(map, buckets, hash, value, 0);
            Counter::DropFlowRace
        }
        None => return Ok(()),
    };
    crate::ct::release(f, claimed);
    Err(lost)
}
