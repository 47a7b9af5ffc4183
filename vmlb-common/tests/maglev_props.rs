//! Property tests of the Maglev table builder: the acceptance criteria of `vmlb_common::maglev`,
//! each checked over many random backend sets.
#![cfg(feature = "user")]

use std::collections::{BTreeMap, BTreeSet};

use proptest::collection::{btree_set, vec};
use proptest::prelude::*;
use proptest::test_runner::Config;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use vmlb_common::maglev::{
    backend_key, build, slot_counts, walk, MaglevBackend, MaglevError, DEFAULT_RING_SIZE, EMPTY,
    RING_SIZES,
};

/// Failures are reported with their minimal case; no regression files are written into the tree.
fn config(cases: u32) -> Config {
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}

/// `n` backends with distinct random keys, distinct random non-zero ids (unrelated to key order),
/// weights from `weight`, in random order.
fn backends(
    n: impl Strategy<Value = usize>,
    weight: impl Strategy<Value = u32> + Clone,
) -> impl Strategy<Value = Vec<MaglevBackend>> {
    n.prop_flat_map(move |n| {
        (
            btree_set(any::<u64>(), n),
            btree_set(1..=u32::MAX, n).prop_map(|s| s.into_iter().collect::<Vec<_>>()),
            vec(weight.clone(), n),
        )
            .prop_flat_map(|(keys, ids, weights)| {
                // Shuffle ids so they do not follow key order, then shuffle the whole input.
                Just(ids).prop_shuffle().prop_map(move |ids| {
                    keys.iter()
                        .zip(&ids)
                        .zip(&weights)
                        .map(|((&key, &id), &weight)| MaglevBackend { id, key, weight })
                        .collect::<Vec<_>>()
                })
            })
            .prop_shuffle()
    })
}

/// Weights of several shapes: tiny, moderate, and the full u32 range (skewed sets).
fn any_weight() -> impl Strategy<Value = u32> + Clone {
    prop_oneof![1..=3u32, 1..=1000u32, 1..=u32::MAX]
}

fn small_ring() -> impl Strategy<Value = u32> {
    prop::sample::select(&RING_SIZES[..5]) // 251..=4093
}

/// Fraction of slots whose backend differs between two tables.
fn moved(a: &[u32], b: &[u32]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).filter(|(x, y)| x != y).count() as f64 / a.len() as f64
}

proptest! {
    #![proptest_config(config(512))]

    /// 1 and 6: full table iff some backend is weighted, and only weighted backends appear.
    #[test]
    fn fills_every_slot_with_weighted_backends_only(
        bs in backends(0..=40usize, prop_oneof![2 => Just(0u32), 3 => any_weight()]),
        m in small_ring(),
    ) {
        let table = build(&bs, m).unwrap();
        prop_assert_eq!(table.len(), m as usize);
        let weighted: BTreeSet<u32> = bs.iter().filter(|b| b.weight > 0).map(|b| b.id).collect();
        if weighted.is_empty() {
            prop_assert!(table.iter().all(|&x| x == EMPTY));
        } else {
            for &x in &table {
                prop_assert!(x != EMPTY, "empty slot with {} weighted backends", weighted.len());
                prop_assert!(weighted.contains(&x), "id {} is not a weighted backend", x);
            }
        }
    }

    /// 2: equal weights give every backend the same number of slots, give or take one.
    #[test]
    fn equal_weights_differ_by_at_most_one(
        bs in backends(1..=300usize, Just(1u32)),
        w in prop_oneof![Just(1u32), any::<u32>().prop_map(|w| w.max(1))],
        m in prop::sample::select(&RING_SIZES[..7]), // 251..=16381
    ) {
        prop_assume!(bs.len() <= m as usize);
        let bs: Vec<_> = bs.into_iter().map(|b| MaglevBackend { weight: w, ..b }).collect();
        let counts = slot_counts(&build(&bs, m).unwrap());
        let per: Vec<usize> = bs.iter().map(|b| counts.get(&b.id).copied().unwrap_or(0)).collect();
        let (lo, hi) = (per.iter().min().unwrap(), per.iter().max().unwrap());
        prop_assert!(hi - lo <= 1, "counts from {} to {} (N={}, M={})", lo, hi, bs.len(), m);
        prop_assert!(*lo >= 1);
    }

    /// 3: with at least 100 slots per weighted backend, each share is within one percentage
    /// point of weight / sum(weights); in fact every count is within one slot of its exact share.
    #[test]
    fn weighted_shares_are_proportional(
        bs in backends(1..=163usize, any_weight()),
        m in prop::sample::select(&RING_SIZES[..7]),
    ) {
        let bs = &bs[..bs.len().min(m as usize / 100)];
        let counts = slot_counts(&build(bs, m).unwrap());
        let total: u128 = bs.iter().map(|b| u128::from(b.weight)).sum();
        for b in bs {
            let count = counts.get(&b.id).copied().unwrap_or(0);
            let share = count as f64 / f64::from(m);
            let ideal = f64::from(b.weight) / total as f64;
            prop_assert!(
                (share - ideal).abs() <= 0.01,
                "backend {:?}: share {} vs ideal {} (N={}, M={})", b, share, ideal, bs.len(), m
            );
            // |count - M*w/W| < 1, exactly.
            let (have, want) = (count as u128 * total, u128::from(m) * u128::from(b.weight));
            prop_assert!(have.abs_diff(want) < total, "backend {:?}: {} slots", b, count);
        }
    }

    /// 5: the table depends on the set of backends, not on their order.
    #[test]
    fn input_order_does_not_matter(
        bs in backends(0..=60usize, prop_oneof![1 => Just(0u32), 4 => any_weight()]),
        seed in any::<u64>(),
        m in small_ring(),
    ) {
        let mut shuffled = bs.clone();
        shuffled.shuffle(&mut StdRng::seed_from_u64(seed));
        prop_assert_eq!(build(&bs, m), build(&shuffled, m));
    }

    /// 5: so do the errors, when the input is invalid in several ways at once.
    #[test]
    fn errors_do_not_depend_on_order(
        bs in backends(3..=30usize, any_weight()),
        seed in any::<u64>(),
        dup_key in any::<bool>(),
        dup_id in any::<bool>(),
        zero_id in any::<bool>(),
    ) {
        let mut bs = bs;
        let n = bs.len();
        if dup_key {
            bs[0].key = bs[n - 1].key;
        }
        if dup_id {
            bs[1].id = bs[n - 1].id;
        }
        if zero_id {
            bs[n / 2].id = 0;
        }
        let mut shuffled = bs.clone();
        shuffled.shuffle(&mut StdRng::seed_from_u64(seed));
        let (a, b) = (build(&bs, 251), build(&shuffled, 251));
        prop_assert_eq!(&a, &b);
        if zero_id {
            prop_assert_eq!(a, Err(MaglevError::ReservedId));
        } else if dup_key {
            prop_assert_eq!(a, Err(MaglevError::DuplicateKey(bs[0].key)));
        } else if dup_id {
            prop_assert_eq!(a, Err(MaglevError::DuplicateId(bs[1].id)));
        } else {
            prop_assert!(a.is_ok());
        }
    }

    /// 5: ids are node-local; the slot -> backend mapping (by key) is the same on every node.
    #[test]
    fn ids_do_not_affect_the_mapping(
        bs in backends(1..=60usize, any_weight()),
        seed in any::<u64>(),
        m in small_ring(),
    ) {
        let mut other = bs.clone();
        let mut rng = StdRng::seed_from_u64(seed);
        let mut ids: Vec<u32> = other.iter().map(|b| b.id).collect();
        ids.shuffle(&mut rng);
        for (b, id) in other.iter_mut().zip(ids) {
            b.id = id;
        }
        other.shuffle(&mut rng);
        let key_of = |bs: &[MaglevBackend], t: Vec<u32>| -> Vec<u64> {
            let keys: BTreeMap<u32, u64> = bs.iter().map(|b| (b.id, b.key)).collect();
            t.into_iter().map(|id| keys[&id]).collect()
        };
        prop_assert_eq!(
            key_of(&bs, build(&bs, m).unwrap()),
            key_of(&other, build(&other, m).unwrap())
        );
    }

    /// Every walk visits every slot exactly once (what guarantees a full table).
    #[test]
    fn walks_are_permutations(key in any::<u64>(), m in prop::sample::select(&RING_SIZES[..7])) {
        let mut seen = vec![false; m as usize];
        for s in walk(key, m) {
            prop_assert!(!std::mem::replace(&mut seen[s as usize], true), "slot {} twice", s);
        }
        prop_assert!(seen.iter().all(|&x| x));
    }

    /// 6: an id of 0 is rejected, wherever it is and whatever its weight.
    #[test]
    fn id_zero_is_rejected(
        bs in backends(1..=20usize, prop_oneof![Just(0u32), any_weight()]),
        at in any::<prop::sample::Index>(),
    ) {
        let mut bs = bs;
        let i = at.index(bs.len());
        bs[i].id = 0;
        prop_assert_eq!(build(&bs, 251), Err(MaglevError::ReservedId));
    }
}

proptest! {
    #![proptest_config(config(1000))]

    /// 4: removing one of N equal backends moves at most 1/N + 2% of the slots, adding one at
    /// most 1/(N+1) + 2% (the backend's own share plus a little collateral reshuffling).
    #[test]
    fn few_slots_move_when_a_backend_comes_or_goes(
        bs in backends(3..=51usize, Just(1u32)),
        out in any::<prop::sample::Index>(),
    ) {
        let m = DEFAULT_RING_SIZE;
        let mut bs = bs;
        // The extra backend, added to the N others.
        let extra = bs.pop().unwrap();
        let n = bs.len() as f64;
        let before = build(&bs, m).unwrap();

        let mut fewer = bs.clone();
        fewer.remove(out.index(bs.len()));
        let f = moved(&before, &build(&fewer, m).unwrap());
        prop_assert!(f <= 1.0 / n + 0.02, "removing one of {}: {:.4} moved", n, f);

        let mut more = bs.clone();
        more.push(extra);
        let f = moved(&before, &build(&more, m).unwrap());
        prop_assert!(f <= 1.0 / (n + 1.0) + 0.02, "adding one to {}: {:.4} moved", n, f);
    }

    /// Weight 0 (draining) behaves like removal, and the builder never mixes them up.
    #[test]
    fn zero_weight_is_like_absence(
        bs in backends(2..=40usize, any_weight()),
        out in any::<prop::sample::Index>(),
        m in small_ring(),
    ) {
        let i = out.index(bs.len());
        let mut drained = bs.clone();
        drained[i].weight = 0;
        let mut removed = bs.clone();
        removed.remove(i);
        let table = build(&drained, m).unwrap();
        prop_assert!(!table.contains(&bs[i].id));
        prop_assert_eq!(table, build(&removed, m).unwrap());
    }
}

/// 2, at the big ring sizes (too slow for many proptest cases in debug builds).
#[test]
fn equal_weights_at_large_rings() {
    let mut rng = StdRng::seed_from_u64(0x6d61676c6576);
    for &m in &RING_SIZES[7..] {
        for n in [1usize, 2, 7, 100, 1000] {
            let bs: Vec<_> = (0..n)
                .map(|i| MaglevBackend {
                    id: i as u32 + 1,
                    key: rng.gen(),
                    weight: 5,
                })
                .collect();
            let counts = slot_counts(&build(&bs, m).unwrap());
            assert_eq!(counts.len(), n);
            let lo = counts.values().min().unwrap();
            let hi = counts.values().max().unwrap();
            assert!(hi - lo <= 1, "M={m} N={n}: {lo}..{hi}");
        }
    }
}

/// 4, at the target scale: 1000 backends in 65537 slots, a few random removals and additions.
#[test]
fn few_slots_move_at_scale() {
    let mut rng = StdRng::seed_from_u64(0x6469737275707421);
    let m = 65537;
    let n = 1000usize;
    let bs: Vec<_> = (0..n + 1)
        .map(|i| MaglevBackend {
            id: i as u32 + 1,
            key: backend_key([10, (i >> 8) as u8, i as u8, 1], 8080),
            weight: 1,
        })
        .collect();
    let before = build(&bs[..n], m).unwrap();
    let more = moved(&before, &build(&bs, m).unwrap());
    assert!(more <= 1.0 / (n as f64 + 1.0) + 0.02, "{more}");
    for _ in 0..3 {
        let mut fewer = bs[..n].to_vec();
        fewer.remove(rng.gen_range(0..n));
        let f = moved(&before, &build(&fewer, m).unwrap());
        assert!(f <= 1.0 / n as f64 + 0.02, "{f}");
    }
}

/// Different addresses and ports give different keys (the key is a bijective mix).
#[test]
fn backend_keys_are_distinct() {
    let mut seen = BTreeSet::new();
    for a in 0..=255u8 {
        for port in [0u16, 80, 443, 8080, 65535] {
            assert!(seen.insert(backend_key([10, 0, 0, a], port)));
            if a != 10 {
                assert!(seen.insert(backend_key([a, 0, 0, 10], port)));
            }
        }
    }
    assert_eq!(seen.len(), (2 * 256 - 1) * 5);
}
