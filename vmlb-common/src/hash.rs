//! The flow hash and SNAT port choice. Both sides run this same code: the data path to pick a
//! Maglev slot and a source port, user space to predict (`vmlb simulate`) and to test that the
//! kernel agrees. Hand-rolled (murmur3's 32-bit mixing) because it must be bit-identical in a
//! `no_std` BPF program and on the host, forever, and cost a handful of instructions per flow.

use crate::{FlowKey, SNAT_PORT_MAX, SNAT_PORT_MIN};

const C1: u32 = 0xcc9e_2d51;
const C2: u32 = 0x1b87_3593;
/// Fixed so every node computes the same hash (a node taking over a VIP keeps flows on their
/// backends).
const SEED: u32 = 0x766d_6c62; // "vmlb"

#[inline(always)]
const fn mix(h: u32, k: u32) -> u32 {
    let k = k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

#[inline(always)]
const fn fmix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Hash of a client flow (fields in wire byte order, as in `FlowKey`).
#[inline(always)]
pub const fn flow_hash(k: &FlowKey) -> u32 {
    let ports = (k.src_port as u32) | ((k.dst_port as u32) << 16);
    let mut h = mix(SEED, k.src_addr);
    h = mix(h, k.dst_addr);
    h = mix(h, ports);
    h = mix(h, k.proto as u32);
    fmix(h ^ 13)
}

/// Maglev slot for a flow hash.
#[inline(always)]
pub const fn maglev_slot(hash: u32, ring_size: u32) -> u32 {
    if ring_size == 0 {
        0
    } else {
        hash % ring_size
    }
}

const SNAT_RANGE: u32 = (SNAT_PORT_MAX - SNAT_PORT_MIN) as u32 + 1;

/// The `attempt`-th SNAT source port candidate for a flow, in host byte order. Double hashing:
/// start and step both come from the flow hash (independent of the Maglev slot, which uses the
/// low bits), so flows that collide on a start port do not pile into one run of busy ports as
/// they would with linear probing. The range is prime, so any step reaches every port.
#[inline(always)]
pub const fn snat_port(hash: u32, attempt: u32) -> u16 {
    let start = fmix(hash ^ 0x9e37_79b9) % SNAT_RANGE;
    let step = 1 + fmix(hash ^ 0x85eb_ca6b) % (SNAT_RANGE - 1);
    // attempt < SNAT_RETRIES, so attempt * step cannot overflow.
    (SNAT_PORT_MIN as u32 + (start + attempt * step) % SNAT_RANGE) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(sport: u16) -> FlowKey {
        FlowKey {
            src_addr: u32::from_ne_bytes([192, 0, 2, 1]),
            dst_addr: u32::from_ne_bytes([10, 10, 1, 128]),
            src_port: sport.to_be(),
            dst_port: 80u16.to_be(),
            proto: 6,
            _pad0: 0,
            _pad1: 0,
        }
    }

    #[test]
    fn hash_depends_on_every_field() {
        let base = key(40000);
        let h = flow_hash(&base);
        let mut k = base;
        k.src_port = 40001u16.to_be();
        assert_ne!(h, flow_hash(&k));
        let mut k = base;
        k.proto = 17;
        assert_ne!(h, flow_hash(&k));
        let mut k = base;
        k.dst_addr ^= 1;
        assert_ne!(h, flow_hash(&k));
    }

    #[test]
    fn snat_candidates_are_in_range_and_distinct() {
        for sport in 0..2000u16 {
            let h = flow_hash(&key(sport));
            let mut seen = [0u16; crate::SNAT_RETRIES as usize];
            for (a, slot) in seen.iter_mut().enumerate() {
                *slot = snat_port(h, a as u32);
                assert!((SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(slot));
            }
            for i in 0..seen.len() {
                assert!(!seen[..i].contains(&seen[i]), "repeated candidate {seen:?}");
            }
        }
    }

    #[test]
    fn snat_range_is_prime() {
        let n = SNAT_RANGE;
        assert!((2..n)
            .take_while(|d| d * d <= n)
            .all(|d| !n.is_multiple_of(d)));
    }

    #[test]
    fn hash_spreads_over_slots() {
        let mut counts = [0u32; 7];
        for sport in 0..7000u16 {
            counts[maglev_slot(flow_hash(&key(sport)), 7) as usize] += 1;
        }
        for c in counts {
            assert!((800..1200).contains(&c), "uneven spread {counts:?}");
        }
    }
}
