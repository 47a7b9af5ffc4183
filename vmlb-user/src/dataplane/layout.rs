//! The pinned map layout (`vmlb_common::LAYOUT_VERSION`): which versions an interface's pin
//! directory holds, what to do about them, and how each map of an older layout carries over
//! into this one (`MAPS`). All pure; `migrate` does the kernel side.
//!
//! A daemon never opens another version's maps as its own. Finding an older version in use it
//! creates its own maps beside them, fills the configuration's maps as on a fresh start, copies
//! the state that still means the same (flows, counters), swaps its program into the pinned
//! link and removes the old pins. A newer version (a downgrade) is refused.

use std::collections::{BTreeMap, BTreeSet};

use vmlb_common::{map_names as n, map_names6 as n6, Flow, LAYOUT_VERSION};

/// The pinned link's file name, beside the version directories (it outlives every layout, so
/// an upgrade swaps the program inside it).
pub const LINK: &str = "link";

/// `BPF_F_MMAPABLE`: the flow slots are read by mapping them.
pub const BPF_F_MMAPABLE: u32 = 1 << 10;

/// The directory of version `v` inside an interface's pin directory; version 1 had none (its
/// maps lie flat beside the link).
pub fn version_dir(v: u32) -> Option<String> {
    (v >= 2).then(|| format!("v{v}"))
}

/// The version a directory entry named `name` stands for: `v<N>` directories (N >= 2), or any
/// other file but the link (a version-1 map).
pub fn entry_version(name: &str, is_dir: bool) -> Option<u32> {
    if is_dir {
        let v: u32 = name.strip_prefix('v')?.parse().ok()?;
        (v >= 2 && name == format!("v{v}")).then_some(v)
    } else {
        (name != LINK).then_some(1)
    }
}

/// The layout versions present among an interface directory's entries (name, is a directory).
pub fn versions_present<S: AsRef<str>>(
    entries: impl IntoIterator<Item = (S, bool)>,
) -> BTreeSet<u32> {
    entries
        .into_iter()
        .filter_map(|(name, dir)| entry_version(name.as_ref(), dir))
        .collect()
}

/// What a starting daemon does with an interface's pins.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// No program of ours is pinned: load, attach and pin (this version's pins, if any, are
    /// reused as before).
    Fresh,
    /// The link runs on this version's maps (or on none, and this version's exist): adopt the
    /// program, or upgrade it in place.
    Adopt,
    /// The link runs on an older version's maps: migrate from it.
    Migrate { from: u32 },
    /// A newer vmlb's pins: never touched.
    RefuseNewer { version: u32 },
}

/// Decide from the versions present, whether the link is pinned, and the version whose maps
/// the link's program uses (`None`: unknown, or none of them). Also returns the versions whose
/// pins are leftovers to remove (an interrupted migration's, or ones nothing runs on).
pub fn decide(present: &BTreeSet<u32>, link: bool, live: Option<u32>) -> (Action, Vec<u32>) {
    let current = LAYOUT_VERSION;
    if let Some(&newest) = present.iter().next_back().filter(|&&v| v > current) {
        return (Action::RefuseNewer { version: newest }, Vec::new());
    }
    let others = |keep: u32| present.iter().copied().filter(|&v| v != keep).collect();
    if !link {
        return (Action::Fresh, others(current));
    }
    match live {
        Some(v) if v == current => (Action::Adopt, others(current)),
        Some(v) => (Action::Migrate { from: v }, others(v)),
        None if present.contains(&current) => (Action::Adopt, others(current)),
        None => match present.iter().next_back() {
            Some(&v) => (Action::Migrate { from: v }, others(v)),
            None => (Action::Adopt, Vec::new()),
        },
    }
}

/// What indexes a per-CPU counter array.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Index {
    /// The entry's number means the same in both layouts (a counter enum, append-only).
    Plain,
    /// A service id (translated through SERVICES).
    Service,
    /// A backend id (translated through BACKENDS).
    Backend,
}

/// Turns an older layout's flow slot (its bytes) into this version's `Flow`, ids still the old
/// layout's. `None`: that slot is not carried over.
pub type FlowConverter = fn(from: u32, old: &[u8]) -> Option<Flow>;

/// What a map holds, which decides what a layout migration does with it. `since`: the oldest
/// layout version whose entries mean the same as this version's (same type, key and value
/// sizes are required too); older ones need a converter.
#[derive(Clone, Copy, Debug)]
pub enum Role {
    /// Derived from the configuration or the interface: filled by the daemon as on a fresh
    /// start, never copied.
    Rebuilt,
    /// Configuration that also names the ids flows and counters refer to (SERVICES: service key
    /// -> id; BACKENDS: id -> service id, address, port). Rebuilt; the old map is read only to
    /// translate old ids into the new ones.
    Ids { since: u32 },
    /// The flows (FLOW_SLOTS, FLOW_SLOTS6: direct-mapped by SNAT tuple): copied slot by slot,
    /// ids translated. From a layout older than `since` that has no such map, there is nothing
    /// to carry over.
    Flows {
        since: u32,
        convert: Option<FlowConverter>,
    },
    /// The flow index (FLOW_INDEX, FLOW_INDEX6: client 5-tuple -> slot; the FLOWS hash maps
    /// before version 3): rebuilt from the migrated flows.
    FlowIndex,
    /// Per-CPU arrays of u64 counters: added onto the new map's entries (index translated).
    Counters { since: u32, by: Index },
}

/// One map of this version's layout.
#[derive(Clone, Copy, Debug)]
pub struct MapSpec {
    pub name: &'static str,
    pub role: Role,
}

/// Every map of this layout and how an older layout's map of the same name carries over. A new
/// map, or a changed one, goes here in the same commit that bumps `LAYOUT_VERSION` (a unit
/// test checks that this table and the object name the same maps).
pub const MAPS: &[MapSpec] = &[
    MapSpec {
        name: n::SERVICES,
        role: Role::Ids { since: 1 },
    },
    MapSpec {
        name: n::VIPS,
        role: Role::Rebuilt,
    },
    MapSpec {
        name: n::BACKENDS,
        role: Role::Ids { since: 1 },
    },
    MapSpec {
        name: n::MAGLEV,
        role: Role::Rebuilt,
    },
    MapSpec {
        name: n::FLOW_INDEX,
        role: Role::FlowIndex,
    },
    MapSpec {
        name: n::FLOW_SLOTS,
        role: Role::Flows {
            since: 1,
            convert: None,
        },
    },
    MapSpec {
        name: n::CONFIG,
        role: Role::Rebuilt,
    },
    MapSpec {
        name: n::HOPS,
        role: Role::Rebuilt,
    },
    MapSpec {
        name: n::RATE,
        role: Role::Rebuilt,
    },
    MapSpec {
        name: n::STATS,
        role: Role::Counters {
            since: 1,
            by: Index::Plain,
        },
    },
    MapSpec {
        name: n::SVC_STATS,
        role: Role::Counters {
            since: 1,
            by: Index::Service,
        },
    },
    MapSpec {
        name: n::BE_STATS,
        role: Role::Counters {
            since: 1,
            by: Index::Backend,
        },
    },
    MapSpec {
        name: n::DNAT_ENDPOINTS,
        role: Role::Rebuilt,
    },
    // The IPv6 programs, put there by the loader of whichever version runs.
    MapSpec {
        name: n::JUMP,
        role: Role::Rebuilt,
    },
    // IPv6, new in version 2 (from version 1 there is nothing to carry over).
    MapSpec {
        name: n6::SERVICES6,
        role: Role::Rebuilt,
    },
    MapSpec {
        name: n6::VIPS6,
        role: Role::Rebuilt,
    },
    MapSpec {
        name: n6::BACKENDS6,
        role: Role::Rebuilt,
    },
    MapSpec {
        name: n6::FLOW_INDEX6,
        role: Role::FlowIndex,
    },
    MapSpec {
        name: n6::FLOW_SLOTS6,
        role: Role::Flows {
            since: 2,
            convert: None,
        },
    },
    MapSpec {
        name: n6::CONFIG6,
        role: Role::Rebuilt,
    },
    // Per-CPU scratch of the IPv6 programs, meaningful only within one run.
    MapSpec {
        name: n6::SCRATCH6,
        role: Role::Rebuilt,
    },
    // New in version 3, as `DNAT_ENDPOINTS`: filled from the services.
    MapSpec {
        name: n6::DNAT_ENDPOINTS6,
        role: Role::Rebuilt,
    },
];

/// Every map name of this layout.
pub fn map_names() -> impl Iterator<Item = &'static str> {
    MAPS.iter().map(|m| m.name)
}

/// What the kernel says of a map (`bpf_map_info`), or the object of a map definition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

impl Shape {
    /// Same entries, whatever the size: type, key and value sizes.
    fn same_entries(&self, other: &Shape) -> bool {
        (self.map_type, self.key_size, self.value_size)
            == (other.map_type, other.key_size, other.value_size)
    }
}

/// How one map carries over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Carry {
    /// Filled as on a fresh start.
    Rebuild,
    /// Entries copied (or, for `Ids`, read to translate ids).
    Copy,
    /// Entries converted from the old layout.
    Convert,
    /// Not carried over, and why.
    Lost(String),
}

/// A migration's plan: how each map of this layout carries over from version `from`.
#[derive(Clone, Debug)]
pub struct Plan {
    pub from: u32,
    pub maps: Vec<(MapSpec, Carry)>,
}

impl Plan {
    pub fn carry(&self, name: &str) -> Option<&Carry> {
        self.maps
            .iter()
            .find(|(m, _)| m.name == name)
            .map(|(_, c)| c)
    }

    /// Why the flows cannot be carried over (they, or the ids they refer to, are lost).
    pub fn flows_lost(&self) -> Option<String> {
        let why: Vec<String> = self
            .maps
            .iter()
            .filter(|(m, _)| matches!(m.role, Role::Flows { .. } | Role::Ids { .. }))
            .filter_map(|(m, c)| match c {
                Carry::Lost(why) => Some(format!("{}: {why}", m.name)),
                _ => None,
            })
            .collect();
        (!why.is_empty()).then(|| why.join("; "))
    }

    /// Counter maps that start from zero, with why.
    pub fn counters_lost(&self) -> Vec<String> {
        self.maps
            .iter()
            .filter(|(m, _)| matches!(m.role, Role::Counters { .. }))
            .filter_map(|(m, c)| match c {
                Carry::Lost(why) => Some(format!("{}: {why}", m.name)),
                _ => None,
            })
            .collect()
    }
}

/// Plan a migration from version `from`, whose maps have the shapes `old` (by name), into this
/// version's maps `new` (by name, from the object).
pub fn plan(from: u32, old: &BTreeMap<String, Shape>, new: &BTreeMap<String, Shape>) -> Plan {
    Plan {
        from,
        maps: MAPS
            .iter()
            .map(|m| (*m, carry(m, from, old, new)))
            .collect(),
    }
}

/// How the map `spec` carries over from version `from`.
fn carry(
    spec: &MapSpec,
    from: u32,
    old: &BTreeMap<String, Shape>,
    new: &BTreeMap<String, Shape>,
) -> Carry {
    let (since, convertible) = match spec.role {
        Role::Rebuilt | Role::FlowIndex => return Carry::Rebuild,
        Role::Ids { since } | Role::Counters { since, .. } => (since, false),
        Role::Flows { since, convert } => (since, convert.is_some()),
    };
    let (Some(o), Some(nw)) = (old.get(spec.name), new.get(spec.name)) else {
        if matches!(spec.role, Role::Flows { since, .. } if from < since) {
            return Carry::Rebuild;
        }
        return Carry::Lost(format!("no such map in layout v{from}"));
    };
    if matches!(spec.role, Role::Flows { .. }) && o.flags & BPF_F_MMAPABLE == 0 {
        return Carry::Lost(format!("layout v{from}'s map cannot be mapped"));
    }
    if o.same_entries(nw) && from >= since {
        Carry::Copy
    } else if convertible {
        Carry::Convert
    } else if o.same_entries(nw) {
        Carry::Lost(format!(
            "its entries mean something else since layout v{since}, and there is no converter from v{from}"
        ))
    } else {
        Carry::Lost(format!(
            "layout v{from} has type {}, {}-byte keys and {}-byte values, this one {}, {} and {}, and there is no converter",
            o.map_type, o.key_size, o.value_size, nw.map_type, nw.key_size, nw.value_size
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(v: &[u32]) -> BTreeSet<u32> {
        v.iter().copied().collect()
    }

    #[test]
    fn versions_come_from_the_directory_listing() {
        // Version 1: maps flat beside the link.
        let flat = [("link", false), ("FLOWS", false), ("SERVICES", false)];
        assert_eq!(versions_present(flat), set(&[1]));
        let v2 = [("link", false), ("v2", true)];
        assert_eq!(versions_present(v2), set(&[2]));
        // Mid-migration: both.
        let both = [("link", false), ("FLOWS", false), ("v2", true)];
        assert_eq!(versions_present(both), set(&[1, 2]));
        // Only a link, unknown directories and non-canonical names are no version.
        let none = [
            ("link", false),
            ("v1", true),
            ("v02", true),
            ("vx", true),
            ("tmp", true),
        ];
        assert_eq!(versions_present(none), set(&[]));
        assert_eq!(versions_present([("v13", true)]), set(&[13]));
        assert_eq!(version_dir(1), None);
        assert_eq!(version_dir(2).as_deref(), Some("v2"));
    }

    #[test]
    fn what_to_do_with_the_pins_found() {
        let cur = LAYOUT_VERSION;
        let newer = cur + 1;
        // Nothing pinned, or no link: a fresh start; older pins nothing runs on are removed.
        assert_eq!(decide(&set(&[]), false, None), (Action::Fresh, vec![]));
        assert_eq!(decide(&set(&[1]), false, None), (Action::Fresh, vec![1]));
        assert_eq!(decide(&set(&[cur]), false, None), (Action::Fresh, vec![]));
        // The link runs on this version's maps: adopt; an older leftover (a migration
        // interrupted after its swap) goes.
        assert_eq!(
            decide(&set(&[cur]), true, Some(cur)),
            (Action::Adopt, vec![])
        );
        assert_eq!(
            decide(&set(&[1, cur]), true, Some(cur)),
            (Action::Adopt, vec![1])
        );
        // The link runs on version 1: migrate, dropping a partial current directory (a
        // migration interrupted before its swap).
        assert_eq!(
            decide(&set(&[1]), true, Some(1)),
            (Action::Migrate { from: 1 }, vec![])
        );
        assert_eq!(
            decide(&set(&[1, cur]), true, Some(1)),
            (Action::Migrate { from: 1 }, vec![cur])
        );
        // A program that uses none of them (another program put into the link).
        assert_eq!(decide(&set(&[cur]), true, None), (Action::Adopt, vec![]));
        assert_eq!(
            decide(&set(&[1]), true, None),
            (Action::Migrate { from: 1 }, vec![])
        );
        // A newer layout anywhere: refused, nothing removed.
        for (present, live) in [
            (set(&[newer]), Some(newer)),
            (set(&[cur, newer]), Some(cur)),
            (set(&[newer]), None),
        ] {
            assert_eq!(
                decide(&present, true, live),
                (Action::RefuseNewer { version: newer }, vec![])
            );
        }
        assert_eq!(
            decide(&set(&[newer]), false, None),
            (Action::RefuseNewer { version: newer }, vec![])
        );
    }

    const ARRAY: u32 = 2;
    const PERCPU_ARRAY: u32 = 6;

    fn shape(map_type: u32, key: u32, value: u32, flags: u32) -> Shape {
        Shape {
            map_type,
            key_size: key,
            value_size: value,
            max_entries: 16,
            flags,
        }
    }

    fn shapes() -> BTreeMap<String, Shape> {
        let mut m = BTreeMap::new();
        for spec in MAPS {
            let s = match spec.role {
                Role::Flows { .. } => shape(ARRAY, 4, 64, BPF_F_MMAPABLE),
                Role::Counters { .. } => shape(PERCPU_ARRAY, 4, 32, 0),
                Role::FlowIndex => shape(ARRAY, 4, 64, BPF_F_MMAPABLE),
                _ => shape(ARRAY, 4, 16, 0),
            };
            m.insert(spec.name.to_string(), s);
        }
        m
    }

    #[test]
    fn same_entries_are_copied_and_configuration_rebuilt() {
        let p = plan(2, &shapes(), &shapes());
        assert_eq!(p.flows_lost(), None);
        assert!(p.counters_lost().is_empty());
        for (spec, carry) in &p.maps {
            let want = match spec.role {
                Role::Rebuilt | Role::FlowIndex => Carry::Rebuild,
                _ => Carry::Copy,
            };
            assert_eq!(carry, &want, "{}", spec.name);
        }
        // Sizes and flags other than mmapable do not matter.
        let mut old = shapes();
        for s in old.values_mut() {
            s.max_entries *= 2;
        }
        old.get_mut(n::STATS).unwrap().flags = 1;
        let p = plan(2, &old, &shapes());
        assert_eq!(p.carry(n::FLOW_SLOTS), Some(&Carry::Copy));
        assert_eq!(p.carry(n::STATS), Some(&Carry::Copy));
    }

    #[test]
    fn changed_flows_are_lost_without_a_converter() {
        let mut old = shapes();
        old.get_mut(n::FLOW_SLOTS).unwrap().value_size = 48;
        let p = plan(2, &old, &shapes());
        assert!(matches!(p.carry(n::FLOW_SLOTS), Some(Carry::Lost(_))));
        let why = p.flows_lost().expect("flows lost");
        assert!(why.contains("48-byte values"), "{why}");
        // Rebuilt maps do not care.
        old.get_mut(n::MAGLEV).unwrap().value_size = 8;
        assert_eq!(
            plan(2, &old, &shapes()).carry(n::MAGLEV),
            Some(&Carry::Rebuild)
        );
        // Ids that cannot be read lose the flows too (their backend ids would be wrong).
        let mut old = shapes();
        old.get_mut(n::BACKENDS).unwrap().value_size = 24;
        let why = plan(2, &old, &shapes()).flows_lost().expect("flows lost");
        assert!(why.starts_with("BACKENDS"), "{why}");
        // A missing map, or unmappable slots.
        let mut old = shapes();
        old.remove(n::FLOW_SLOTS);
        assert!(plan(2, &old, &shapes()).flows_lost().is_some());
        let mut old = shapes();
        old.get_mut(n::FLOW_SLOTS).unwrap().flags = 0;
        assert!(plan(2, &old, &shapes()).flows_lost().is_some());
        // Counters of another shape start from zero, without losing the flows.
        let mut old = shapes();
        old.get_mut(n::BE_STATS).unwrap().value_size = 16;
        let p = plan(2, &old, &shapes());
        assert_eq!(p.flows_lost(), None);
        assert_eq!(p.counters_lost().len(), 1);
    }

    #[test]
    fn flow_maps_newer_than_the_old_layout_have_nothing_to_carry() {
        // Layout 1 had no IPv6 maps: its IPv4 flows carry over, IPv6 starts empty.
        let mut old = shapes();
        for name in [n6::FLOW_SLOTS6, n6::FLOW_INDEX6] {
            old.remove(name);
        }
        let p = plan(1, &old, &shapes());
        assert_eq!(p.flows_lost(), None);
        assert_eq!(p.carry(n6::FLOW_SLOTS6), Some(&Carry::Rebuild));
        assert_eq!(p.carry(n::FLOW_SLOTS), Some(&Carry::Copy));
        // Layout 2 had them: missing there, they are lost.
        assert!(plan(2, &old, &shapes()).flows_lost().is_some());
    }

    #[test]
    fn entries_whose_meaning_changed_need_a_converter() {
        fn conv(_: u32, _: &[u8]) -> Option<Flow> {
            None
        }
        let (old, new) = (shapes(), shapes());
        // As if version 3 changed what a slot means, with the same sizes.
        let mut spec = MapSpec {
            name: n::FLOW_SLOTS,
            role: Role::Flows {
                since: 3,
                convert: None,
            },
        };
        let c = carry(&spec, 2, &old, &new);
        assert!(
            matches!(&c, Carry::Lost(w) if w.contains("since layout v3")),
            "{c:?}"
        );
        spec.role = Role::Flows {
            since: 3,
            convert: Some(conv),
        };
        assert_eq!(carry(&spec, 2, &old, &new), Carry::Convert);
        assert_eq!(carry(&spec, 3, &old, &new), Carry::Copy);
    }

    #[test]
    fn the_table_names_every_map_of_the_object() {
        let obj = aya_obj::Object::parse(crate::dataplane::loader::VMLB_OBJ).expect("object");
        let object: BTreeSet<&str> = obj.maps.keys().map(String::as_str).collect();
        // Data sections (.rodata: the globals set at load) and aya-log's buffers are not pinned.
        let object: BTreeSet<&str> = object
            .into_iter()
            .filter(|m| !m.starts_with('.') && !m.starts_with("AYA_LOG"))
            .collect();
        let table: BTreeSet<&str> = map_names().collect();
        assert_eq!(object, table, "dataplane::layout::MAPS must list every map");
    }
}
