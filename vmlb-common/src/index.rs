//! The flow index (`FLOW_INDEX`, `FLOW_INDEX6`): client 5-tuple -> flow slot, as an array of
//! cache-line buckets of 8-byte entries that both the data path and user space change by
//! compare-and-swap.
//!
//! It replaced a kernel hash map (`FLOWS`, 88 bytes per flow with the kernel's element header,
//! and ~220 ns per insert: a freelist pop, a bucket spinlock and a memcpy) because a flow's
//! identity already lives in its slot: an entry only needs to say where to look. An entry is
//! `tag << 32 | (slot + 1)` with the flow hash as tag (0 = empty), so a lookup hashes the key
//! once (the data path needs that hash for Maglev anyway), reads one bucket and compares tags,
//! and follows only a matching tag to the slot, whose own 5-tuple decides. At 4 entries per
//! flow and 2 probed buckets (16 entries, 4 in use on average with a full table) a bucket pair
//! overflows with probability ~1e-6, and the whole index costs 32 bytes per flow.

use crate::{FlowKey, FlowKey6};

/// Entries per bucket: 8 × 8 bytes = one 64-byte cache line.
pub const INDEX_WAYS: usize = 8;
/// Buckets a key may live in: its own and the next (wrapping).
pub const INDEX_PROBES: u32 = 2;
/// Index entries provisioned per flow of capacity (load factor 1/4).
pub const INDEX_ENTRIES_PER_FLOW: u32 = 4;

/// `FLOW_INDEX` value: one bucket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowBucket {
    pub e: [u64; INDEX_WAYS],
}
const _: () = assert!(core::mem::size_of::<FlowBucket>() == 64);

/// Buckets for `flows` flows of capacity (at least 2, so the two probes differ).
pub const fn index_buckets(flows: u32) -> u32 {
    let n = (flows as u64 * INDEX_ENTRIES_PER_FLOW as u64 / INDEX_WAYS as u64) as u32;
    if n < 2 {
        2
    } else {
        n
    }
}

/// Flows of capacity an index of `buckets` buckets provides (the inverse of `index_buckets`).
pub const fn index_capacity(buckets: u32) -> u32 {
    (buckets as u64 * INDEX_WAYS as u64 / INDEX_ENTRIES_PER_FLOW as u64) as u32
}

/// The `probe`-th bucket of a flow hash. Multiply-shift takes the hash's high bits (Maglev
/// takes its low bits with `%`), and costs a multiply where `%` costs a divide.
#[inline(always)]
pub const fn bucket_of(hash: u32, buckets: u32, probe: u32) -> u32 {
    let b = ((hash as u64 * buckets as u64) >> 32) as u32 + probe;
    if b >= buckets {
        b - buckets
    } else {
        b
    }
}

/// The entry naming `slot` for a flow of hash `hash`.
#[inline(always)]
pub const fn index_entry(hash: u32, slot: u32) -> u64 {
    ((hash as u64) << 32) | (slot as u64 + 1)
}

/// Whether entry `e` is in use and carries `hash`'s tag.
#[inline(always)]
pub const fn entry_matches(e: u64, hash: u32) -> bool {
    (e >> 32) as u32 == hash && e as u32 != 0
}

/// The slot entry `e` names (`e` in use).
#[inline(always)]
pub const fn entry_slot(e: u64) -> u32 {
    (e as u32).wrapping_sub(1)
}

/// The index hash of an IPv4 client 5-tuple (the Maglev hash).
#[inline(always)]
pub const fn key_hash(k: &FlowKey) -> u32 {
    crate::hash::flow_hash(k)
}

/// The index hash of an IPv6 client 5-tuple.
#[inline(always)]
pub const fn key_hash6(k: &FlowKey6) -> u32 {
    crate::hash::flow_hash6(k)
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;

    #[test]
    fn entries_round_trip_and_are_never_empty() {
        for (h, s) in [(0, 0), (u32::MAX, 5), (7, u32::MAX - 1)] {
            let e = index_entry(h, s);
            assert_ne!(e, 0);
            assert!(entry_matches(e, h));
            assert!(!entry_matches(e, h.wrapping_add(1)));
            assert_eq!(entry_slot(e), s);
        }
        assert!(
            !entry_matches(0, 0),
            "an empty entry matches no hash, not even 0"
        );
    }

    #[test]
    fn probes_stay_in_range_and_differ() {
        for buckets in [2, 3, 1000, 131_072] {
            for h in [0, 1, u32::MAX / 2, u32::MAX] {
                let a = bucket_of(h, buckets, 0);
                let b = bucket_of(h, buckets, 1);
                assert!(a < buckets && b < buckets);
                assert_ne!(a, b);
            }
        }
    }

    #[test]
    fn sizing_round_trips() {
        assert_eq!(index_buckets(1_048_576), 524_288);
        assert_eq!(index_capacity(index_buckets(1_048_576)), 1_048_576);
        assert_eq!(index_buckets(0), 2);
    }

    /// A full table (one flow per unit of capacity) fits in its probed buckets: with 64K
    /// flows, no key finds both of its buckets full.
    #[test]
    fn a_full_index_does_not_overflow() {
        let flows = 65_536u32;
        let buckets = index_buckets(flows);
        let mut used = std::vec![0u8; buckets as usize];
        let mut overflow = 0;
        for i in 0..flows {
            let h = crate::hash::flow_hash(&FlowKey {
                src_addr: i.to_be(),
                dst_addr: 0x0a0a_0180,
                src_port: (i as u16).to_be(),
                dst_port: 80u16.to_be(),
                proto: 6,
                _pad0: 0,
                _pad1: 0,
            });
            let placed = (0..INDEX_PROBES)
                .map(|p| bucket_of(h, buckets, p) as usize)
                .find(|&b| used[b] < INDEX_WAYS as u8);
            match placed {
                Some(b) => used[b] += 1,
                None => overflow += 1,
            }
        }
        assert_eq!(overflow, 0);
    }
}
