//! Maglev consistent hashing (Eisenbud et al., NSDI 2016): the lookup table the data path indexes
//! with `flow_hash % ring_size`.
//!
//! Each backend has its own walk, a pseudo-random order of all slots derived from its stable
//! `key` alone, and backends take turns claiming the first still-empty slot of their walk. Every
//! node fed the same backends therefore builds the same slot -> backend mapping, and one backend
//! coming or going moves little more than its own share of slots.
//!
//! Weights: plain Maglev only does equal shares. Here each backend's slot count (its quota) is
//! fixed first: its proportional share of M with largest-remainder rounding, so each count is
//! within one slot of `M * w / sum(w)`. Claims are then spread evenly over rounds: the k-th claim
//! of a backend with quota `q` happens in round `floor(k * Q / q)`, Q being the largest quota.
//! With equal weights this is textbook Maglev: round-robin in key order, the last partial round
//! going to the first backends.
//!
//! Cost: O(N log N) to validate and sort, O(M) to schedule, about M·ln(M/256) walk steps of a
//! dozen instructions each (no per-backend permutation table, no division), then an exact
//! shortcut for the last 256 claims.

use alloc::collections::BTreeMap;
use alloc::vec;
use alloc::vec::Vec;
use core::cmp::Reverse;
use core::fmt;

/// Ring sizes accepted (primes). Default 16381.
///
/// Primes as in the paper; each is just below a power of two (or is 2^16 + 1), which keeps the
/// walks (over powers of two) from wasting steps.
pub const RING_SIZES: &[u32] = &[
    251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 65537, 131071,
];
/// Large enough for even shares with ≥ 100 slots per backend up to 163 backends, small enough to
/// rebuild and write to the kernel map cheaply.
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

/// Why a table could not be built. Checked on the key-sorted input, so a backend set reports the
/// same error whatever its order.
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

const SEED_WALK_1: u64 = 0x766d_6c62_7761_6c31; // "vmlbwal1"
const SEED_WALK_2: u64 = 0x766d_6c62_7761_6c32; // "vmlbwal2"
const SEED_BACKEND: u64 = 0x766d_6c62_6b65_7934; // "vmlbkey4"

/// splitmix64's finalizer (Stafford's "Mix13").
#[inline]
const fn mix_stafford13(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// MurmurHash3's 64-bit finalizer: a second, differently built mixer, so the two halves of a
/// walk's parameters are unrelated.
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

/// How walks cover a ring. A walk is a permutation of `0..2^bits`, the power of two at or above
/// the ring size: values past the ring are holes, stepped over like taken slots. A ring of
/// `2^bits + 1` slots (65537) instead gets its last slot appended to every walk; it thus goes to
/// the very last claim.
#[derive(Clone, Copy, Debug)]
struct Shape {
    bits: u32,
    mask: u32,
    /// Xorshift distance, more than half the width so that `x ^ (x >> shift)` is its own inverse.
    shift: u32,
    ring_size: u32,
}

impl Shape {
    const fn new(ring_size: u32) -> Self {
        let domain = if ring_size > 2 && (ring_size - 1).is_power_of_two() {
            ring_size - 1
        } else {
            ring_size.next_power_of_two()
        };
        let bits = domain.trailing_zeros();
        Shape {
            bits,
            mask: domain - 1,
            shift: bits / 2 + 1,
            ring_size,
        }
    }

    /// The appended last slot, if any.
    const fn appended(&self) -> Option<u32> {
        if self.ring_size > self.mask + 1 {
            Some(self.mask + 1)
        } else {
            None
        }
    }
}

/// A backend's walk, a pseudo-random permutation depending only on its key: position `j` maps to
/// `G((j + add) * mul1 mod 2^bits)` with `G(x)` = xorshift, xor `xor`, multiply by `mul2`,
/// xorshift (all mod 2^bits, multipliers odd). A bijection; the next step costs an addition plus
/// `G`, about ten instructions, with no per-backend table and no division; and it is invertible,
/// which finds where an empty slot sits in a walk.
///
/// Not the paper's `offset + j * skip` (mod prime M): two such walks with equal or simply related
/// skips (likely among a few dozen backends) trace the same cycle and fight over it, so one backend
/// coming or going swaps blocks of slots between them: in random trials at M = 16381, up to 5.5%
/// of the ring moved beyond the `1/N` that must (12% once, with 5 backends). These walks have no
/// such structure and measure like truly random permutations: at most 1.3% beyond `1/N` in 22,000
/// trials with 2..=50 backends.
#[derive(Clone, Copy, Debug)]
struct Walk {
    add: u32,
    mul1: u32,
    xor: u32,
    mul2: u32,
}

/// `G` above, applied to `x & mask`. One function for the hot loop (where `shift` and `mask` are
/// constants) and everything else, so they cannot drift apart.
#[inline(always)]
const fn scramble(x: u32, shift: u32, mask: u32, xor: u32, mul2: u32) -> u32 {
    let x = (x & mask) ^ ((x & mask) >> shift);
    let x = (x ^ xor).wrapping_mul(mul2) & mask;
    x ^ (x >> shift)
}

impl Walk {
    const fn new(key: u64, shape: &Shape) -> Self {
        let h1 = mix_stafford13(key ^ SEED_WALK_1);
        let h2 = mix_murmur3(key ^ SEED_WALK_2);
        Walk {
            add: h1 as u32 & shape.mask,
            mul1: (h1 >> 32) as u32 | 1,
            xor: h2 as u32 & shape.mask,
            mul2: (h2 >> 32) as u32 | 1,
        }
    }

    /// The pre-scramble state at position 0; each step adds `mul1`.
    const fn start(&self) -> u32 {
        self.add.wrapping_mul(self.mul1)
    }

    /// The value at position `pos < 2^bits` (a slot, or a hole when `>= ring_size`).
    const fn at(&self, shape: &Shape, pos: u32) -> u32 {
        let state = pos.wrapping_add(self.add).wrapping_mul(self.mul1);
        scramble(state, shape.shift, shape.mask, self.xor, self.mul2)
    }

    /// Position of `slot` in the walk (the inverse of [`Walk::at`]; the appended slot is last).
    fn position(&self, shape: &Shape, slot: u32, inv_mul1: u32, inv_mul2: u32) -> u32 {
        if slot > shape.mask {
            return slot;
        }
        let x = slot ^ (slot >> shape.shift);
        let x = (x.wrapping_mul(inv_mul2) & shape.mask) ^ self.xor;
        let x = x ^ (x >> shape.shift);
        x.wrapping_mul(inv_mul1).wrapping_sub(self.add) & shape.mask
    }
}

/// The slots of `key`'s walk over a ring of `ring_size` slots, in order: every slot exactly once.
/// For tests and debugging; `ring_size` must be one of [`RING_SIZES`].
pub fn walk(key: u64, ring_size: u32) -> impl Iterator<Item = u32> {
    let shape = Shape::new(ring_size);
    let w = Walk::new(key, &shape);
    (0..=shape.mask)
        .map(move |pos| w.at(&shape, pos))
        .filter(move |&s| s < ring_size)
        .chain(shape.appended())
}

/// When this many claims are left, the builder stops walking: each remaining claim takes the
/// empty slot that comes first in the claimer's walk, computed from the walk's inverse. That is
/// the slot the walk would reach (all a walk has passed is taken), found in O(empty slots) instead
/// of O(M / empty slots) steps. A speed knob only: the table does not depend on it.
const ENDGAME: usize = 256;

/// Build the lookup table: `ring_size` entries, each a backend id or EMPTY (only when no backend has weight > 0).
///
/// Weight-0 backends are validated but left out. Each weighted backend gets its share
/// `ring_size * weight / sum(weights)` rounded up or down (largest remainders first, so the counts
/// add up to `ring_size`); a very light backend may get no slot at all.
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

    let order = Schedule::new(&quotas(&sorted, ring_size)).order();
    let shape = Shape::new(ring_size);
    let walks: Vec<Walk> = sorted.iter().map(|b| Walk::new(b.key, &shape)).collect();
    let ids: Vec<u32> = sorted.iter().map(|b| b.id).collect();
    let mut fill = Fill {
        walks: &walks,
        ids: &ids,
        states: walks.iter().map(Walk::start).collect(),
        // Holes count as taken.
        taken: vec![0; TAKEN_WORDS],
        table: vec![EMPTY; m],
    };
    for s in m..=shape.mask as usize {
        fill.taken[s / 64] |= 1 << (s % 64);
    }

    // Walking never reaches an appended slot: at least one claim is left to the endgame, so
    // two slots are empty and a walk meets the other first.
    let (walking, endgame) = order.split_at(m - endgame.clamp(1, m));
    match shape.bits {
        8 => fill.walk::<8>(walking),
        9 => fill.walk::<9>(walking),
        10 => fill.walk::<10>(walking),
        11 => fill.walk::<11>(walking),
        12 => fill.walk::<12>(walking),
        13 => fill.walk::<13>(walking),
        14 => fill.walk::<14>(walking),
        15 => fill.walk::<15>(walking),
        16 => fill.walk::<16>(walking),
        17 => fill.walk::<17>(walking),
        _ => unreachable!("ring sizes are 251..=131071"),
    }

    let mut empty: Vec<u32> = (0..ring_size)
        .filter(|&s| fill.taken[s as usize / 64] & (1 << (s % 64)) == 0)
        .collect();
    for &i in endgame {
        let w = &walks[i as usize];
        let (inv1, inv2) = (inverse_mod_2_32(w.mul1), inverse_mod_2_32(w.mul2));
        let (mut first, mut at) = (u32::MAX, 0);
        for (k, &s) in empty.iter().enumerate() {
            let pos = w.position(&shape, s, inv1, inv2);
            if pos < first {
                (first, at) = (pos, k);
            }
        }
        fill.table[empty.swap_remove(at) as usize] = ids[i as usize];
    }
    debug_assert!(empty.is_empty());
    Ok(fill.table)
}

/// Words in the taken-slots bitmap: enough for walks over 2^17 positions.
const TAKEN_WORDS: usize = (1 << 17) / 64;

/// The table being filled, and where each walk stands.
struct Fill<'a> {
    walks: &'a [Walk],
    ids: &'a [u32],
    /// Per backend: the pre-scramble state of its next position.
    states: Vec<u32>,
    /// Bitmap of taken slots (and holes), [`TAKEN_WORDS`] long: at most 16 KiB, so walking stays in
    /// L1, and a fixed size lets the compiler drop the bounds checks.
    taken: Vec<u64>,
    table: Vec<u32>,
}

impl Fill<'_> {
    /// Each claim takes the first empty slot at or after its backend's walk position. Walks pass
    /// only taken slots, which stay taken, so every empty slot is still ahead: a walk cannot run
    /// out while a non-appended slot is empty. `BITS` is a constant so that the shifts are.
    fn walk<const BITS: u32>(&mut self, claims: &[u32]) {
        let mask = (1u32 << BITS) - 1;
        let shift = BITS / 2 + 1;
        let taken: &mut [u64; TAKEN_WORDS] = self.taken.as_mut_slice().try_into().unwrap();
        for &i in claims {
            let i = i as usize;
            let w = self.walks[i];
            let mut state = self.states[i];
            let slot = loop {
                let s = scramble(state, shift, mask, w.xor, w.mul2) as usize;
                state = state.wrapping_add(w.mul1);
                if taken[s / 64] & (1 << (s % 64)) == 0 {
                    break s;
                }
            };
            // `^=`, not `|=`, so the compiler cannot merge it into the loop as an unconditional
            // store (which measurably slows the loop down).
            taken[slot / 64] ^= 1 << (slot % 64);
            self.table[slot] = self.ids[i];
            self.states[i] = state;
        }
    }
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

/// The order of claims. A backend with quota `q` makes its k-th claim in round `floor(k * Q / q)`
/// (Q = the largest quota), so its claims are spread evenly and it takes part from round 0. In a
/// round, backends go by quota, largest first, then in key order. Backends with equal quotas
/// claim in the same rounds, so the schedule is kept per group of them: usually a few groups.
struct Schedule {
    /// Backend indices, by quota (largest first) then index.
    members: Vec<u32>,
    /// Per group: its range in `members`.
    groups: Vec<(u32, u32)>,
    /// The groups claiming, round after round.
    events: Vec<u32>,
}

impl Schedule {
    fn new(quotas: &[u32]) -> Self {
        let mut members: Vec<u32> = (0..quotas.len() as u32)
            .filter(|&i| quotas[i as usize] > 0)
            .collect();
        members.sort_unstable_by_key(|&i| (Reverse(quotas[i as usize]), i));
        let mut groups: Vec<(u32, u32)> = Vec::new();
        let mut group_quotas = Vec::new();
        for (k, &i) in members.iter().enumerate() {
            let q = quotas[i as usize];
            if group_quotas.last() != Some(&q) {
                group_quotas.push(q);
                groups.push((k as u32, k as u32));
            }
            groups.last_mut().unwrap().1 += 1;
        }
        let rounds = group_quotas.first().copied().unwrap_or(0);
        // Counting sort of (round, group) events by round; groups in order within a round.
        let mut starts = vec![0u32; rounds as usize + 1];
        for &q in &group_quotas {
            for_each_round(q, rounds, |r| starts[r as usize + 1] += 1);
        }
        for r in 0..rounds as usize {
            starts[r + 1] += starts[r];
        }
        let mut events = vec![0u32; starts[rounds as usize] as usize];
        for (g, &q) in group_quotas.iter().enumerate() {
            for_each_round(q, rounds, |r| {
                events[starts[r as usize] as usize] = g as u32;
                starts[r as usize] += 1;
            });
        }
        Schedule {
            members,
            groups,
            events,
        }
    }

    /// Backend indices, one per claim, in claiming order.
    fn order(&self) -> Vec<u32> {
        let mut order = Vec::with_capacity(self.members.len().max(self.events.len()));
        for &g in &self.events {
            let (start, end) = self.groups[g as usize];
            if end - start == 1 {
                order.push(self.members[start as usize]); // cheaper than a one-element memcpy
            } else {
                order.extend_from_slice(&self.members[start as usize..end as usize]);
            }
        }
        order
    }
}

/// Calls `f` with `floor(k * rounds / q)` for k in `0..q`, incrementally (no division per call).
fn for_each_round(q: u32, rounds: u32, mut f: impl FnMut(u32)) {
    if q == 0 {
        return;
    }
    let (step, frac) = (rounds / q, rounds % q);
    let (mut round, mut rem) = (0, 0);
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

    fn claim_order(quotas: &[u32]) -> Vec<u32> {
        Schedule::new(quotas).order()
    }

    #[test]
    fn ring_sizes_are_prime_and_sorted() {
        let is_prime = |n: u32| {
            n >= 2
                && (2..)
                    .take_while(|d| d * d <= n)
                    .all(|d| !n.is_multiple_of(d))
        };
        assert!(RING_SIZES.iter().all(|&m| is_prime(m)));
        assert!(RING_SIZES.windows(2).all(|w| w[0] < w[1]));
        assert!(ring_size_allowed(DEFAULT_RING_SIZE));
        // Walks waste at most 2% of their steps on holes.
        for &m in RING_SIZES {
            let shape = Shape::new(m);
            assert!((8..=17).contains(&shape.bits), "{m}");
            assert!((shape.mask + 1).saturating_sub(m) * 50 <= m, "{m}");
        }
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
    fn positions_invert_walks() {
        for &m in RING_SIZES {
            let shape = Shape::new(m);
            for key in [3, 0xfeed_f00d_dead_beef] {
                let w = Walk::new(key, &shape);
                let (i1, i2) = (inverse_mod_2_32(w.mul1), inverse_mod_2_32(w.mul2));
                for pos in (0..=shape.mask).step_by(7).chain([shape.mask]) {
                    let s = w.at(&shape, pos);
                    assert_eq!(w.position(&shape, s, i1, i2), pos, "M={m} pos={pos}");
                }
            }
        }
        assert_eq!(Shape::new(65537).appended(), Some(65536));
        assert_eq!(Shape::new(65521).appended(), None);
    }

    #[test]
    fn endgame_does_not_change_the_table() {
        let bs: Vec<_> = (1..=13u32)
            .map(|i| be(i, backend_key([10, 0, 1, i as u8], 443), i % 4 + 1))
            .collect();
        for m in [251, 509, 1021, 2039] {
            let walked = build_with(&bs, m, 1).unwrap();
            assert_eq!(build_with(&bs, m, m as usize).unwrap(), walked);
            assert_eq!(build_with(&bs, m, 100).unwrap(), walked);
            assert_eq!(build(&bs, m).unwrap(), walked);
        }
        let bs = [be(1, 1, 1), be(2, 2, 1), be(3, 3, 2)];
        assert_eq!(build_with(&bs, 65537, 1), build_with(&bs, 65537, 3000));
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
        assert_eq!(
            claim_order(&[3, 3, 2, 2]),
            vec![0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
        );
        assert_eq!(claim_order(&[2, 2, 2]), vec![0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn claim_order_spreads_claims() {
        // Quotas 2 and 4: backend 0 claims in rounds 0 and 2 of 0..4, after backend 1.
        assert_eq!(claim_order(&[2, 4]), vec![1, 0, 1, 1, 0, 1]);
        // Zero quotas never claim.
        assert_eq!(claim_order(&[0, 2, 1]), vec![1, 2, 1]);
        // Groups by quota, then key order.
        assert_eq!(claim_order(&[1, 3, 1, 3]), vec![1, 3, 0, 2, 1, 3, 1, 3]);
    }

    /// The hashes and the table layout must never change (nodes and versions must agree): these
    /// values pin them. Changing them is a flag day for every deployment.
    #[test]
    fn hashing_is_pinned() {
        // The first mixer is splitmix64's: its first output for seed 0 is a published value.
        assert_eq!(mix_stafford13(0x9e37_79b9_7f4a_7c15), 0xe220_a839_7b1d_cdaf);
        assert_eq!(backend_key([10, 0, 0, 1], 80), 0x1740_92cb_26c3_e677);
        let key = 0x0123_4567_89ab_cdef;
        assert_eq!(
            walk(key, 16381).take(4).collect::<Vec<_>>(),
            [8318, 15121, 12944, 8711]
        );
        assert_eq!(
            walk(key, 65537).take(4).collect::<Vec<_>>(),
            [61626, 46908, 4036, 3176]
        );
        let bs: Vec<_> = (1..=5u32)
            .map(|i| be(i, backend_key([10, 0, 0, i as u8], 80), i))
            .collect();
        // FNV-1a over the table.
        let fingerprint = |m| {
            build(&bs, m)
                .unwrap()
                .iter()
                .fold(0xcbf2_9ce4_8422_2325u64, |h, &x| {
                    (h ^ u64::from(x)).wrapping_mul(0x0100_0000_01b3)
                })
        };
        assert_eq!(fingerprint(251), 0xa11b_7fdc_3d66_979e);
        assert_eq!(fingerprint(65537), 0xedfe_f418_a019_19c9);
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
