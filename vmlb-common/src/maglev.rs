//! Maglev consistent hashing (Eisenbud et al., NSDI 2016): the lookup table the data path indexes
//! with `flow_hash % ring_size`.
//!
//! Each backend walks its own permutation of the slots (`offset`, `offset + skip`, ... mod M, M
//! prime) and backends take turns claiming the next still-empty slot of their walk. Because the
//! walk depends only on the backend's stable `key`, every node fed the same backend set builds the
//! same slot -> backend mapping, and adding or removing one backend moves few other slots.
//!
//! Weights: plain Maglev only does equal shares, so the builder first decides how many slots each
//! backend gets — its exact proportional share of M, rounded by largest remainder, so every count
//! is within one slot of `M * w / sum(w)` — and then spreads each backend's claims evenly over the
//! claiming rounds (backend `i` with quota `q_i` claims in round `floor(k * Q / q_i)` for its k-th
//! claim, Q = the largest quota). With equal weights this reduces exactly to textbook Maglev
//! (round-robin in key order, the last partial round going to the first backends).
//!
//! Cost: O(N log N) to sort and validate, O(M) to schedule the claims, and the fill walks each
//! permutation incrementally (no per-backend permutation table, no division in the hot loop), about
//! M·ln M probes in total.

use alloc::collections::BTreeMap;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

/// Ring sizes accepted (primes). Default 16381.
///
/// Primes so that every `skip` in `1..M` is coprime to M and each walk visits every slot once.
pub const RING_SIZES: &[u32] = &[
    251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 65537, 131071,
];
/// Large enough (≥ 100 slots per backend for up to 163 backends) for even shares, small enough to
/// rebuild and push to the kernel map cheaply.
pub const DEFAULT_RING_SIZE: u32 = 16381;
/// Backend id 0 is reserved for "empty slot".
pub const EMPTY: u32 = 0;

/// One backend as the table builder sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevBackend {
    /// Non-zero id stored in the table (the data path's backend index). Node-local.
    pub id: u32,
    /// Stable identity of the backend (e.g. a hash of address+port): the permutation depends only on
    /// this, so every node builds the same slot->backend-identity mapping even when ids differ.
    pub key: u64,
    /// 0 = not in the table (draining or down).
    pub weight: u32,
}

/// Why a table could not be built. Errors are found on the key-sorted input, so the same
/// backend set reports the same error whatever its order.
#[derive(Debug, PartialEq, Eq)]
pub enum MaglevError {
    /// The ring size is not one of [`RING_SIZES`].
    RingSizeNotAllowed(u32),
    /// A backend has id 0, which means [`EMPTY`] in the table.
    ReservedId,
    /// Two backends share this key (the smallest such key is reported).
    DuplicateKey(u64),
    /// Two backends share this id (the smallest such id is reported).
    DuplicateId(u32),
    /// More weighted backends than slots: some could never receive traffic.
    TooManyBackends { backends: usize, ring_size: u32 },
}

impl fmt::Display for MaglevError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::RingSizeNotAllowed(m) => {
                write!(
                    f,
                    "Maglev ring size {m} is not allowed (use one of {RING_SIZES:?})"
                )
            }
            Self::ReservedId => write!(f, "backend id 0 is reserved for empty Maglev slots"),
            Self::DuplicateKey(k) => write!(f, "two backends share the Maglev key {k:#018x}"),
            Self::DuplicateId(id) => write!(f, "two backends share the id {id}"),
            Self::TooManyBackends {
                backends,
                ring_size,
            } => write!(
                f,
                "{backends} weighted backends do not fit a Maglev ring of {ring_size} slots"
            ),
        }
    }
}

impl core::error::Error for MaglevError {}

/// Whether `ring_size` is one of [`RING_SIZES`].
pub fn ring_size_allowed(ring_size: u32) -> bool {
    RING_SIZES.contains(&ring_size)
}

// Hashing. Hand-rolled, fixed constants, never to be changed: every node and every future
// version must derive the same walks from the same keys, or flows would move between backends on
// a failover or an upgrade. Both mixers are bijections on u64.

/// Seeds of the three hashes of a key that parameterize its walk, and of [`backend_key`].
const SEED_WALK_1: u64 = 0x766d_6c62_7761_6c31; // "vmlbwal1"
const SEED_WALK_2: u64 = 0x766d_6c62_7761_6c32; // "vmlbwal2"
const SEED_WALK_3: u64 = 0x766d_6c62_7761_6c33; // "vmlbwal3"
const SEED_BACKEND: u64 = 0x766d_6c62_6b65_7934; // "vmlbkey4"

/// splitmix64's finalizer (Stafford's "Mix13").
#[inline]
const fn mix_stafford13(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// MurmurHash3's 64-bit finalizer: a second, differently built mixer, so the walk's parameters
/// are not simple functions of each other.
#[inline]
const fn mix_murmur3(mut z: u64) -> u64 {
    z = (z ^ (z >> 33)).wrapping_mul(0xff51_afd7_ed55_8ccd);
    z = (z ^ (z >> 33)).wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    z ^ (z >> 33)
}

/// Stable 64-bit key for an IPv4 backend address+port (used by callers to fill `key`).
///
/// A bijective mix of the 48 input bits, so distinct address+port pairs never collide.
pub const fn backend_key(addr: [u8; 4], port: u16) -> u64 {
    let raw = ((u32::from_be_bytes(addr) as u64) << 16) | port as u64;
    mix_stafford13(raw ^ SEED_BACKEND)
}

/// Inverse of an odd number modulo 2^32 (Newton's iteration doubles the correct bits each step).
const fn inverse_mod_2_32(b: u32) -> u32 {
    let mut x = b; // correct to 3 bits for odd b
    let mut i = 0;
    while i < 4 {
        x = x.wrapping_mul(2u32.wrapping_sub(b.wrapping_mul(x)));
        i += 1;
    }
    x
}

/// How walks cover a ring: over the power of two `2^bits` at or above `ring_size` (positions
/// mapping past the ring are holes to skip), or, when `ring_size = 2^bits + 1` (65537), over
/// `2^bits` plus the last slot spliced in at a key-derived position.
#[derive(Clone, Copy, Debug)]
struct Shape {
    mask: u32,
    /// Xorshift distance, more than half the width so that `x ^ (x >> shift)` is its own inverse.
    shift: u32,
    /// Whether the last slot is spliced in (ring size `2^bits + 1`).
    spliced: bool,
    ring_size: u32,
}

impl Shape {
    const fn new(ring_size: u32) -> Self {
        let spliced = ring_size > 2 && (ring_size - 1).is_power_of_two();
        let domain = if spliced {
            ring_size - 1
        } else {
            ring_size.next_power_of_two()
        };
        let bits = domain.trailing_zeros();
        Shape {
            mask: domain - 1,
            shift: bits / 2 + 1,
            spliced,
            ring_size,
        }
    }

    /// Number of positions in a walk (slots plus holes).
    const fn len(&self) -> u32 {
        if self.spliced {
            self.ring_size
        } else {
            self.mask + 1
        }
    }
}

/// A backend's walk: the order in which it tries the slots, a pseudo-random permutation that
/// depends only on its key. Position `j` maps to slot `P(j)` with `P` two rounds of
/// xor-key / multiply-by-odd-key / xorshift on `bits`-wide integers: a bijection, O(1) per step
/// (no per-backend table, no division), invertible (to find an empty slot's position directly).
///
/// Not the paper's `offset + j * skip`: two such walks with equal (or simply related) skips are
/// shifted copies of one cycle and fight over it, so one backend coming or going swaps large
/// blocks of slots between them (up to ~10% of the ring for a handful of backends). Nonlinear
/// walks have no such pairs and behave like truly random permutations.
#[derive(Clone, Copy, Debug)]
struct Walk {
    xor1: u32,
    mul1: u32,
    xor2: u32,
    mul2: u32,
    /// Position of the spliced last slot, `u32::MAX` when not spliced.
    splice_at: u32,
}

impl Walk {
    fn new(key: u64, shape: &Shape) -> Self {
        let h1 = mix_stafford13(key ^ SEED_WALK_1);
        let h2 = mix_murmur3(key ^ SEED_WALK_2);
        let splice_at = if shape.spliced {
            // Multiply-shift range reduction: uniform enough, no division.
            let h3 = mix_stafford13(key ^ SEED_WALK_3) >> 32;
            ((h3 * u64::from(shape.ring_size)) >> 32) as u32
        } else {
            u32::MAX
        };
        Walk {
            xor1: h1 as u32 & shape.mask,
            mul1: (h1 >> 32) as u32 | 1,
            xor2: h2 as u32 & shape.mask,
            mul2: (h2 >> 32) as u32 | 1,
            splice_at,
        }
    }

    /// The slot at position `pos < shape.len()`, or a hole (`>= ring_size`).
    #[inline(always)]
    fn slot(&self, shape: &Shape, pos: u32) -> u32 {
        let j = pos - u32::from(pos > self.splice_at);
        let mut x = (j ^ self.xor1).wrapping_mul(self.mul1) & shape.mask;
        x ^= x >> shape.shift;
        x = (x ^ self.xor2).wrapping_mul(self.mul2) & shape.mask;
        x ^= x >> shape.shift;
        if pos == self.splice_at {
            shape.mask + 1
        } else {
            x
        }
    }

    /// The position of `slot` (inverse of [`Walk::slot`]).
    #[inline(always)]
    fn position(&self, shape: &Shape, slot: u32, inv1: u32, inv2: u32) -> u32 {
        if slot > shape.mask {
            return self.splice_at;
        }
        let mut x = slot ^ (slot >> shape.shift);
        x = (x.wrapping_mul(inv2) & shape.mask) ^ self.xor2;
        x ^= x >> shape.shift;
        let j = (x.wrapping_mul(inv1) & shape.mask) ^ self.xor1;
        j + u32::from(j >= self.splice_at)
    }
}

/// The slots of `key`'s walk over a ring of `ring_size` slots, in order: every slot exactly once.
/// For tests and debugging; `ring_size` must be one of [`RING_SIZES`].
pub fn walk(key: u64, ring_size: u32) -> impl Iterator<Item = u32> {
    let shape = Shape::new(ring_size);
    let w = Walk::new(key, &shape);
    (0..shape.len())
        .map(move |pos| w.slot(&shape, pos))
        .filter(move |&s| s < ring_size)
}

/// Below this many empty slots the builder stops walking and, for each remaining claim, picks
/// the empty slot earliest in the claimer's walk directly: the same slot the walk would reach
/// (everything a walk has passed is full), found in O(empty) instead of O(M / empty) steps.
/// A speed knob only; the table does not depend on it.
const ENDGAME: usize = 256;

/// Build the lookup table: `ring_size` entries, each a backend id or EMPTY (only when no backend has weight > 0).
///
/// Weight-0 backends are validated but left out. Each weighted backend gets
/// `round(ring_size * weight / sum(weights))` slots (largest-remainder rounding, so the counts sum
/// to `ring_size` and each is off by less than one slot); a very light backend may get none.
pub fn build(backends: &[MaglevBackend], ring_size: u32) -> Result<Vec<u32>, MaglevError> {
    build_with(backends, ring_size, ENDGAME)
}

fn build_with(
    backends: &[MaglevBackend],
    ring_size: u32,
    endgame: usize,
) -> Result<Vec<u32>, MaglevError> {
    if !ring_size_allowed(ring_size) {
        return Err(MaglevError::RingSizeNotAllowed(ring_size));
    }
    if backends.iter().any(|b| b.id == EMPTY) {
        return Err(MaglevError::ReservedId);
    }
    // Key order is the tie-break everywhere below, which makes the result independent of the
    // caller's order.
    let mut sorted: Vec<MaglevBackend> = backends.to_vec();
    sorted.sort_unstable_by_key(|b| b.key);
    if let Some(w) = sorted.windows(2).find(|w| w[0].key == w[1].key) {
        return Err(MaglevError::DuplicateKey(w[0].key));
    }
    let mut ids: Vec<u32> = sorted.iter().map(|b| b.id).collect();
    ids.sort_unstable();
    if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
        return Err(MaglevError::DuplicateId(w[0]));
    }
    drop(ids);
    sorted.retain(|b| b.weight > 0);
    let m = ring_size as usize;
    if sorted.is_empty() {
        return Ok(vec![EMPTY; m]);
    }
    if sorted.len() > m {
        return Err(MaglevError::TooManyBackends {
            backends: sorted.len(),
            ring_size,
        });
    }

    let quotas = quotas(&sorted, ring_size);
    let order = claim_order(&quotas, m);
    let shape = Shape::new(ring_size);
    let walks: Vec<Walk> = sorted.iter().map(|b| Walk::new(b.key, &shape)).collect();
    let mut next = vec![0u32; walks.len()];

    // Occupancy bitmap (a few KiB, stays in L1), covering the holes too, marked full so the
    // walks step over them like over taken slots.
    let bits = shape.len().max(ring_size) as usize;
    let mut full = vec![0u64; bits.div_ceil(64)];
    for s in m..bits {
        full[s / 64] |= 1 << (s % 64);
    }
    let mut table = vec![EMPTY; m];

    // Terminates: a walk passes only slots that were full (and stay full), so the empty slots
    // are all still ahead in it, and there are exactly as many claims as slots.
    let walked = m.saturating_sub(endgame);
    for &i in &order[..walked] {
        let i = i as usize;
        let w = &walks[i];
        let mut pos = next[i];
        loop {
            let s = w.slot(&shape, pos) as usize;
            pos += 1;
            let word = &mut full[s / 64];
            let bit = 1u64 << (s % 64);
            if *word & bit == 0 {
                *word |= bit;
                table[s] = sorted[i].id;
                break;
            }
        }
        next[i] = pos;
    }

    // Endgame: the earliest empty slot in each claimer's walk, found directly.
    let mut empty: Vec<u32> = (0..ring_size)
        .filter(|&s| full[s as usize / 64] & (1 << (s % 64)) == 0)
        .collect();
    for &i in &order[walked..] {
        let w = &walks[i as usize];
        let (inv1, inv2) = (inverse_mod_2_32(w.mul1), inverse_mod_2_32(w.mul2));
        let mut best = (u32::MAX, 0);
        for (k, &s) in empty.iter().enumerate() {
            let p = w.position(&shape, s, inv1, inv2);
            if p < best.0 {
                best = (p, k);
            }
        }
        let s = empty.swap_remove(best.1);
        table[s as usize] = sorted[i as usize].id;
    }
    debug_assert!(empty.is_empty());
    Ok(table)
}

/// Slots per backend: the proportional share of `ring_size`, floors plus one extra slot for the
/// largest remainders (ties to the smaller key), so the total is exactly `ring_size`.
fn quotas(sorted: &[MaglevBackend], ring_size: u32) -> Vec<u32> {
    let total: u64 = sorted.iter().map(|b| u64::from(b.weight)).sum();
    let m = u64::from(ring_size);
    // m < 2^18 and weight < 2^32: the products fit in u64.
    let mut quotas = Vec::with_capacity(sorted.len());
    let mut remainders = Vec::with_capacity(sorted.len());
    let mut assigned = 0u64;
    for (i, b) in sorted.iter().enumerate() {
        let share = m * u64::from(b.weight);
        quotas.push((share / total) as u32);
        remainders.push((share % total, i));
        assigned += share / total;
    }
    // Fewer than N slots are left over (each floor loses less than one).
    let left = (m - assigned) as usize;
    if left > 0 {
        remainders.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        for &(_, i) in &remainders[..left] {
            quotas[i] += 1;
        }
    }
    quotas
}

/// The sequence of backend indices in which slots are claimed: `sum(quotas)` entries.
///
/// Backend `i` makes its k-th claim (k = 0..q_i) in round `floor(k * Q / q_i)`, Q = max quota,
/// so its claims are spread evenly over rounds `0..Q` and every backend takes part from the
/// first round; within a round, backends go in key order. Built with a counting sort on the
/// round: O(N + M), whatever the weights.
fn claim_order(quotas: &[u32], m: usize) -> Vec<u32> {
    let rounds = quotas.iter().copied().max().unwrap_or(0) as usize;
    // `for_each_round` calls `f` with the round of each claim of a backend with quota `q`, in
    // order; incremental `k * Q / q` (quotient and remainder), no division per claim.
    fn for_each_round(q: u32, rounds: usize, mut f: impl FnMut(usize)) {
        if q == 0 {
            return;
        }
        let q = q as usize;
        let (step, frac) = (rounds / q, rounds % q);
        let (mut round, mut rem) = (0usize, 0usize);
        for _ in 0..q {
            f(round);
            round += step;
            rem += frac;
            if rem >= q {
                rem -= q;
                round += 1;
            }
        }
    }
    // starts[r] = number of claims in rounds before r.
    let mut starts = vec![0u32; rounds + 1];
    for &q in quotas {
        for_each_round(q, rounds, |r| starts[r + 1] += 1);
    }
    for r in 0..rounds {
        starts[r + 1] += starts[r];
    }
    let mut order = vec![0u32; m];
    for (i, &q) in quotas.iter().enumerate() {
        for_each_round(q, rounds, |r| {
            order[starts[r] as usize] = i as u32;
            starts[r] += 1;
        });
    }
    order
}

/// Number of slots per table value (EMPTY included when present), for tests and the CLI.
pub fn slot_counts(table: &[u32]) -> BTreeMap<u32, usize> {
    let mut counts = BTreeMap::new();
    for &id in table {
        *counts.entry(id).or_insert(0) += 1;
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn be(id: u32, key: u64, weight: u32) -> MaglevBackend {
        MaglevBackend { id, key, weight }
    }

    #[test]
    fn ring_sizes_are_prime_and_sorted() {
        let is_prime = |n: u32| n >= 2 && (2..).take_while(|d| d * d <= n).all(|d| n % d != 0);
        assert!(RING_SIZES.iter().all(|&m| is_prime(m)));
        assert!(RING_SIZES.windows(2).all(|w| w[0] < w[1]));
        assert!(ring_size_allowed(DEFAULT_RING_SIZE));
    }

    #[test]
    fn rejects_ring_sizes_not_listed() {
        for m in [0, 1, 2, 7, 250, 16380, 16383, 65536, 131072, u32::MAX] {
            assert_eq!(
                build(&[be(1, 1, 1)], m),
                Err(MaglevError::RingSizeNotAllowed(m))
            );
        }
        for &m in RING_SIZES {
            assert!(build(&[be(1, 1, 1)], m).is_ok());
        }
    }

    #[test]
    fn error_variants() {
        assert_eq!(build(&[be(0, 1, 1)], 251), Err(MaglevError::ReservedId));
        // Id 0 is rejected even for a backend that would not be in the table.
        assert_eq!(
            build(&[be(1, 1, 1), be(0, 2, 0)], 251),
            Err(MaglevError::ReservedId)
        );
        assert_eq!(
            build(&[be(1, 9, 1), be(2, 5, 1), be(3, 9, 0), be(4, 5, 1)], 251),
            Err(MaglevError::DuplicateKey(5))
        );
        assert_eq!(
            build(&[be(7, 1, 1), be(3, 2, 0), be(7, 3, 1), be(3, 4, 1)], 251),
            Err(MaglevError::DuplicateId(3))
        );
        let many: Vec<_> = (1..=252).map(|i| be(i, u64::from(i), 1)).collect();
        assert_eq!(
            build(&many, 251),
            Err(MaglevError::TooManyBackends {
                backends: 252,
                ring_size: 251
            })
        );
        // Weight-0 backends do not count against the ring size.
        let mut many = many;
        many[0].weight = 0;
        assert!(build(&many, 251).is_ok());
        // Display mentions the offending value.
        let s = alloc::format!("{}", MaglevError::DuplicateId(42));
        assert!(s.contains("42"), "{s}");
    }

    #[test]
    fn single_backend_fills_everything() {
        for &m in RING_SIZES {
            let t = build(&[be(9, 0xdead_beef, 3)], m).unwrap();
            assert_eq!(t.len(), m as usize);
            assert!(t.iter().all(|&x| x == 9));
        }
    }

    #[test]
    fn nothing_weighted_is_all_empty() {
        assert_eq!(build(&[], 251).unwrap(), vec![EMPTY; 251]);
        let t = build(&[be(1, 1, 0), be(2, 2, 0)], 509).unwrap();
        assert_eq!(t, vec![EMPTY; 509]);
    }

    #[test]
    fn walks_visit_every_slot_once() {
        for &m in RING_SIZES {
            for key in [0, 1, u64::MAX, backend_key([10, 0, 0, 1], 80)] {
                let mut seen = vec![false; m as usize];
                let mut n = 0;
                for s in walk(key, m) {
                    assert!(!seen[s as usize], "M={m} key={key}: slot {s} twice");
                    seen[s as usize] = true;
                    n += 1;
                }
                assert_eq!(n, m, "M={m} key={key}");
            }
        }
    }

    #[test]
    fn positions_invert_slots() {
        for &m in RING_SIZES {
            let shape = Shape::new(m);
            for key in [3, 0xfeed_f00d_dead_beef] {
                let w = Walk::new(key, &shape);
                let (i1, i2) = (inverse_mod_2_32(w.mul1), inverse_mod_2_32(w.mul2));
                for pos in (0..shape.len()).step_by(7).chain([shape.len() - 1]) {
                    let s = w.slot(&shape, pos);
                    assert_eq!(w.position(&shape, s, i1, i2), pos, "M={m} pos={pos}");
                }
            }
        }
        assert!(Shape::new(65537).spliced && !Shape::new(65521).spliced);
    }

    #[test]
    fn endgame_does_not_change_the_table() {
        let bs: Vec<_> = (1..=13u32)
            .map(|i| be(i, backend_key([10, 0, 1, i as u8], 443), i % 4 + 1))
            .collect();
        for m in [251, 509, 1021, 2039] {
            let walked = build_with(&bs, m, 0).unwrap();
            assert_eq!(build_with(&bs, m, m as usize).unwrap(), walked);
            assert_eq!(build_with(&bs, m, 100).unwrap(), walked);
            assert_eq!(build(&bs, m).unwrap(), walked);
        }
        let bs = [be(1, 1, 1), be(2, 2, 1)];
        assert_eq!(build_with(&bs, 65537, 0), build_with(&bs, 65537, 3000));
    }

    #[test]
    fn quotas_are_proportional_and_sum_to_m() {
        let bs = [be(1, 1, 1), be(2, 2, 2), be(3, 3, 3)];
        let q = quotas(&bs, 251);
        // 251 * [1, 2, 3] / 6 = 41.83, 83.67, 125.5 -> floors 41, 83, 125 plus 2 extra slots to
        // the two largest remainders (.83 and .67).
        assert_eq!(q, vec![42, 84, 125]);
        // Equal remainders: the smaller key wins.
        let q = quotas(&[be(1, 1, 1), be(2, 2, 1)], 251);
        assert_eq!(q, vec![126, 125]);
    }

    #[test]
    fn claim_order_equal_quotas_is_round_robin() {
        // Textbook Maglev: rounds of 0..N, the last (partial) round going to the first backends.
        let order = claim_order(&[3, 3, 2, 2], 10);
        assert_eq!(order, vec![0, 1, 2, 3, 0, 1, 2, 3, 0, 1]);
    }

    #[test]
    fn claim_order_spreads_claims() {
        // Quotas 4 and 2: backend 1 claims in rounds 0 and 2 of 0..4.
        assert_eq!(claim_order(&[4, 2], 6), vec![0, 1, 0, 0, 1, 0]);
        // Zero quotas never claim.
        assert_eq!(claim_order(&[0, 2, 1], 3), vec![1, 2, 1]);
    }

    /// The hashes and the table layout must never change (nodes and versions must agree): these
    /// values pin them. Changing them is a flag day for every deployment.
    #[test]
    fn hashing_is_pinned() {
        // The offset mixer is splitmix64's: its first output for seed 0 is a published value.
        assert_eq!(mix_stafford13(0x9e37_79b9_7f4a_7c15), 0xe220_a839_7b1d_cdaf);
        assert_eq!(backend_key([10, 0, 0, 1], 80), 0x1740_92cb_26c3_e677);
        assert_eq!(
            walk(0x0123_4567_89ab_cdef, 16381)
                .take(4)
                .collect::<Vec<_>>(),
            vec![0, 0, 0, 0]
        );
        assert_eq!(
            walk(0x0123_4567_89ab_cdef, 65537)
                .take(4)
                .collect::<Vec<_>>(),
            vec![0, 0, 0, 0]
        );
        let bs: Vec<_> = (1..=5u32)
            .map(|i| be(i, backend_key([10, 0, 0, i as u8], 80), i))
            .collect();
        let t = build(&bs, 251).unwrap();
        // FNV-1a over the table.
        let fp = t.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| {
            (h ^ u64::from(x)).wrapping_mul(0x0100_0000_01b3)
        });
        assert_eq!(fp, 0x16f5_3402_1e62_1eb6);
    }

    #[test]
    fn slot_counts_counts_everything() {
        let c = slot_counts(&[1, 2, 2, 0, 2]);
        assert_eq!(
            c.into_iter().collect::<Vec<_>>(),
            vec![(0, 1), (1, 1), (2, 3)]
        );
    }
}
