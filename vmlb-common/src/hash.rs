//! The flow hash and SNAT port choice. Both sides run this same code: the data path to pick a
//! Maglev slot and a source port, user space to predict (`vmlb simulate`) and to test that the
//! kernel agrees. Hand-rolled (murmur3's 32-bit mixing) because it must be bit-identical in a
//! `no_std` BPF program and on the host, forever, and cost a handful of instructions per flow.

use crate::{Addr6, FlowKey, FlowKey6};
#[cfg(test)]
use crate::{SNAT_PORT_MAX, SNAT_PORT_MIN};

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

/// Hash of two IPv6 addresses, two ports and a protocol: each 64-bit half of an address is
/// multiplied on its own lane, the lanes are folded and finished with murmur3's 64-bit mixer.
/// Not `flow_hash`'s ten dependent 32-bit rounds: on the IPv6 established path those cost
/// ~20 ns of ~96 (datapath bench, measured against a one-round hash); the lanes' multiplies
/// overlap, and BPF has no rotate instruction to spend on every round.
#[inline(always)]
const fn hash6(a: &Addr6, b: &Addr6, ports: u32, proto: u8, seed: u64) -> u32 {
    const K: [u64; 5] = [
        0x9e37_79b9_7f4a_7c15,
        0xc2b2_ae3d_27d4_eb4f,
        0x1656_67b1_9e37_79f9,
        0x85eb_ca77_c2b2_ae63,
        0x27d4_eb2f_1656_67c5,
    ];
    const fn word(lo: u32, hi: u32) -> u64 {
        lo as u64 | (hi as u64) << 32
    }
    let l0 = (word(a[0], a[1]) ^ seed).wrapping_mul(K[0]);
    let l1 = (word(a[2], a[3]) ^ seed).wrapping_mul(K[1]);
    let l2 = (word(b[0], b[1]) ^ seed).wrapping_mul(K[2]);
    let l3 = (word(b[2], b[3]) ^ seed).wrapping_mul(K[3]);
    let l4 = (word(ports, proto as u32) ^ seed).wrapping_mul(K[4]);
    // Rotations keep a difference that two lanes share from cancelling out in the fold.
    let mut h = l0 ^ l1.rotate_left(17) ^ l2.rotate_left(31) ^ l3.rotate_left(47) ^ l4;
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h as u32
}

/// Hash of an IPv6 client flow (`hash6` over source, destination, ports and protocol).
#[inline(always)]
pub const fn flow_hash6(k: &FlowKey6) -> u32 {
    let ports = (k.src_port as u32) | ((k.dst_port as u32) << 16);
    hash6(
        &k.src_addr,
        &k.dst_addr,
        ports,
        k.proto,
        SEED as u64 | 0x0606_0606 << 32,
    )
}

/// The `FLOW_SLOTS6` index of an IPv6 SNAT tuple (as `tuple_slot`, with `hash6`).
#[inline(always)]
pub const fn tuple_slot6(
    backend_addr: &Addr6,
    snat_addr: &Addr6,
    backend_port: u16,
    snat_port: u16,
    proto: u8,
    slot_count: u32,
) -> u32 {
    let ports = (backend_port as u32) | ((snat_port as u32) << 16);
    let h = hash6(
        backend_addr,
        snat_addr,
        ports,
        proto,
        SEED as u64 | 0xa5a5_a5a5 << 32,
    );
    if slot_count == 0 {
        0
    } else {
        h % slot_count
    }
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

/// The `attempt`-th SNAT source port candidate for a flow, in host byte order, in
/// `port_min + [0, range)`. Double hashing: start and step both come from the flow hash
/// (independent of the Maglev slot, which uses the low bits), so flows that collide on a start
/// port do not pile into one run of busy ports as they would with linear probing. `range` is
/// prime (user space guarantees it), so any step reaches every port.
#[inline(always)]
pub const fn snat_port(hash: u32, attempt: u32, port_min: u16, range: u16) -> u16 {
    let range = if range < 2 { 2 } else { range as u32 };
    let start = fmix(hash ^ 0x9e37_79b9) % range;
    let step = 1 + fmix(hash ^ 0x85eb_ca6b) % (range - 1);
    // attempt < SNAT_RETRIES and step < 65536, so attempt * step cannot overflow.
    (port_min as u32 + (start + attempt * step) % range) as u16
}

/// Which SNAT address of a service's pool a flow uses.
#[inline(always)]
pub const fn snat_pick(hash: u32, count: u32) -> u32 {
    if count <= 1 {
        0
    } else {
        (hash >> 16) % count
    }
}

/// The pool address a flow's `attempt`-th SNAT candidate uses: the flow's own pick first, then
/// the others in turn.
#[inline(always)]
pub const fn snat_addr_index(pick: u32, attempt: u32, count: u32) -> u32 {
    if count <= 1 {
        0
    } else {
        (pick + attempt) % count
    }
}

/// The `FLOW_SLOTS` index of a SNAT tuple: backend address and port, SNAT address and port
/// (wire order), protocol. The reply path computes it from the packet alone, and the new-flow
/// path claims exactly this slot, so one SNAT tuple can never be held by two flows.
#[inline(always)]
pub const fn tuple_slot(
    backend_addr: u32,
    snat_addr: u32,
    backend_port: u16,
    snat_port: u16,
    proto: u8,
    slot_count: u32,
) -> u32 {
    let mut h = mix(SEED ^ 0x5a5a_5a5a, backend_addr);
    h = mix(h, snat_addr);
    h = mix(h, (backend_port as u32) | ((snat_port as u32) << 16));
    h = mix(h, proto as u32);
    let h = fmix(h ^ 13);
    if slot_count == 0 {
        0
    } else {
        h % slot_count
    }
}

/// Smallest prime-sized range of ports starting at `min` that fits in `[min, max]`: the largest
/// prime p <= max - min + 1 (user space; double hashing needs a prime range).
pub const fn prime_range(min: u16, max: u16) -> u16 {
    if max <= min {
        return 2;
    }
    let mut n = (max - min) as u32 + 1;
    while n > 2 {
        let mut d = 2;
        let mut prime = true;
        while d * d <= n {
            if n.is_multiple_of(d) {
                prime = false;
                break;
            }
            d += 1;
        }
        if prime {
            return n as u16;
        }
        n -= 1;
    }
    2
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
                *slot = snat_port(h, a as u32, SNAT_PORT_MIN, SNAT_RANGE as u16);
                assert!((SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(slot));
            }
            for i in 0..seen.len() {
                assert!(!seen[..i].contains(&seen[i]), "repeated candidate {seen:?}");
            }
        }
    }

    const SNAT_RANGE: u32 = (SNAT_PORT_MAX - SNAT_PORT_MIN) as u32 + 1;

    #[test]
    fn prime_range_matches_the_default_and_full_ranges() {
        assert_eq!(prime_range(SNAT_PORT_MIN, SNAT_PORT_MAX) as u32, SNAT_RANGE);
        assert_eq!(prime_range(SNAT_PORT_MIN, u16::MAX), 64499);
        assert_eq!(prime_range(1024, 1033), 7);
    }

    #[test]
    fn tuple_slots_spread() {
        let mut counts = [0u32; 16];
        for p in 0..16000u16 {
            counts[tuple_slot(1, 2, 80u16.to_be(), p.to_be(), 6, 16) as usize] += 1;
        }
        for c in counts {
            assert!((800..1200).contains(&c), "uneven spread {counts:?}");
        }
    }

    #[test]
    fn snat_range_is_prime() {
        let n = SNAT_RANGE;
        assert!((2..n)
            .take_while(|d| d * d <= n)
            .all(|d| !n.is_multiple_of(d)));
    }

    fn key6(src_last: u32, sport: u16) -> crate::FlowKey6 {
        crate::FlowKey6 {
            src_addr: [0x20010db8u32.to_be(), 0, 0, src_last.to_be()],
            dst_addr: [0xfd000000u32.to_be(), 0, 0, 0x80u32.to_be()],
            src_port: sport.to_be(),
            dst_port: 443u16.to_be(),
            proto: 6,
            _pad0: 0,
            _pad1: 0,
        }
    }

    /// Sequential clients (one /64, ports in a row, as a load generator makes them) spread
    /// evenly over Maglev slots and index buckets, and every field changes the hash.
    #[test]
    fn ipv6_hash_spreads_and_depends_on_every_field() {
        for (n, make) in [
            (
                7000u32,
                (|i: u32| key6(i + 1, 40000)) as fn(u32) -> crate::FlowKey6,
            ),
            (7000, |i| key6(1, 20000 + i as u16)),
        ] {
            let mut counts = [0u32; 7];
            let mut buckets = [0u32; 16];
            for i in 0..n {
                let h = flow_hash6(&make(i));
                counts[maglev_slot(h, 7) as usize] += 1;
                buckets[crate::index::bucket_of(h, 16, 0) as usize] += 1;
            }
            assert!(counts.iter().all(|c| (850..1150).contains(c)), "{counts:?}");
            assert!(
                buckets.iter().all(|c| (330..550).contains(c)),
                "{buckets:?}"
            );
        }
        let base = key6(1, 40000);
        let h = flow_hash6(&base);
        for i in 0..4 {
            let (mut a, mut b) = (base, base);
            a.src_addr[i] ^= 1 << 31;
            b.dst_addr[i] ^= 1;
            assert_ne!(h, flow_hash6(&a), "src word {i}");
            assert_ne!(h, flow_hash6(&b), "dst word {i}");
        }
        let (mut p, mut q) = (base, base);
        p.dst_port ^= 1;
        q.proto = 17;
        assert_ne!(h, flow_hash6(&p));
        assert_ne!(h, flow_hash6(&q));
        let mut slots = [0u32; 16];
        for port in 0..16000u16 {
            slots[tuple_slot6(&base.src_addr, &base.dst_addr, 80, port.to_be(), 6, 16) as usize] +=
                1;
        }
        assert!(slots.iter().all(|c| (800..1200).contains(c)), "{slots:?}");
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
