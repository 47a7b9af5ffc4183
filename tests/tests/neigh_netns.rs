//! `NeighKeeper` against the real kernel, in two namespaces joined by a veth: the node (where the
//! keeper runs) and a peer that answers ARP for an on-link backend and for the gateway of a
//! routed one. No static entry is ever made for them: the kernel resolves the managed entries.
//! The same for IPv6 backends, resolved through NDP. Needs root.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

use vmlb_tests::netns::{veth, Netns};
use vmlb_user::neigh::{BackendNeigh, NeighKeeper, NeighState, Resolution};

const NODE_MAC: &str = "02:00:00:00:01:0a";
const PEER_MAC: [u8; 6] = [2, 0, 0, 0, 1, 0x0b];
const PEER_MAC_NEW: [u8; 6] = [2, 0, 0, 0, 1, 0x0c];
const STATIC_MAC: [u8; 6] = [2, 0, 0, 0, 1, 0x99];

const NODE: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
/// On-link backend, an address of the peer.
const ON_LINK: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
/// The gateway to `ROUTED`, also an address of the peer.
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 3);
/// Behind the gateway: its managed entry must be the gateway's.
const ROUTED: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 5);
/// Has a permanent entry made by "an administrator": the keeper must leave it alone.
const STATIC: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 9);

fn mac_str(m: [u8; 6]) -> String {
    vmlb_user::neigh::format_mac(&m)
}

struct Topo {
    node: Netns,
    peer: Netns,
}

fn topo() -> Topo {
    vmlb_tests::netns::sweep_stale();
    let node = Netns::new("neigh-node").expect("node namespace");
    let peer = Netns::new("neigh-peer").expect("peer namespace");
    veth(&node, "veth0", NODE_MAC, &peer, "veth1", &mac_str(PEER_MAC)).expect("veth pair");
    node.ip(&["addr", "add", "10.99.0.1/24", "dev", "veth0"])
        .unwrap();
    node.ip(&["route", "add", "10.77.0.0/24", "via", "10.99.0.3"])
        .unwrap();
    node.ip(&[
        "neigh",
        "add",
        "10.99.0.9",
        "lladdr",
        &mac_str(STATIC_MAC),
        "dev",
        "veth0",
        "nud",
        "permanent",
    ])
    .unwrap();
    peer.ip(&["addr", "add", "10.99.0.2/24", "dev", "veth1"])
        .unwrap();
    peer.ip(&["addr", "add", "10.99.0.3/24", "dev", "veth1"])
        .unwrap();
    Topo { node, peer }
}

/// A current-thread runtime whose netlink socket is opened inside `ns`.
fn keeper_in(ns: &Netns, rt: &tokio::runtime::Runtime) -> NeighKeeper {
    let _in = ns.enter().expect("entering the node namespace");
    rt.block_on(NeighKeeper::for_interface("veth0"))
        .expect("opening the keeper")
}

/// Polls `check` until it returns `Some`, failing with the last status after `within`.
fn await_status<T>(
    rt: &tokio::runtime::Runtime,
    keeper: &NeighKeeper,
    within: Duration,
    what: &str,
    mut check: impl FnMut(&BTreeMap<IpAddr, BackendNeigh>) -> Option<T>,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        let status: BTreeMap<_, _> = rt
            .block_on(keeper.status())
            .expect("reading neighbour status")
            .into_iter()
            .map(|b| (b.backend, b))
            .collect();
        if let Some(t) = check(&status) {
            return t;
        }
        assert!(
            Instant::now() < deadline,
            "{what} not within {within:?}; status: {status:#?}"
        );
        rt.block_on(async { tokio::time::sleep(Duration::from_millis(50)).await });
    }
}

fn state_and_mac(s: &BTreeMap<IpAddr, BackendNeigh>, a: Ipv4Addr) -> (NeighState, Option<[u8; 6]>) {
    let b = &s[&IpAddr::V4(a)];
    (b.state, b.mac)
}

#[test]
fn managed_entries_resolve_follow_a_mac_change_and_are_removed() {
    let t = topo();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut keeper = keeper_in(&t.node, &rt);
    let backends = [ON_LINK, ROUTED, STATIC, NODE].map(IpAddr::V4);

    let report = rt.block_on(keeper.sync(backends)).expect("first sync");
    assert_eq!(
        report.added,
        vec![IpAddr::V4(ON_LINK), IpAddr::V4(GATEWAY)],
        "one entry for the on-link backend, one for the routed backend's gateway: {report:?}"
    );
    assert_eq!(report.foreign, vec![IpAddr::V4(STATIC)]);
    assert!(report.failed.is_empty(), "{report:?}");

    let status = rt.block_on(keeper.status()).unwrap();
    let res: BTreeMap<_, _> = status
        .iter()
        .map(|b| (b.backend, b.resolution.clone()))
        .collect();
    assert_eq!(
        res[&IpAddr::V4(ROUTED)],
        Resolution::NextHop(IpAddr::V4(GATEWAY))
    );
    assert_eq!(
        res[&IpAddr::V4(ON_LINK)],
        Resolution::NextHop(IpAddr::V4(ON_LINK))
    );
    assert_eq!(res[&IpAddr::V4(NODE)], Resolution::Local);

    // The kernel resolves both by itself: nothing sent traffic to the peer, no static entry.
    await_status(
        &rt,
        &keeper,
        Duration::from_secs(5),
        "both REACHABLE",
        |s| {
            let want = (NeighState::Reachable, Some(PEER_MAC));
            (state_and_mac(s, ON_LINK) == want && state_and_mac(s, ROUTED) == want).then_some(())
        },
    );
    let status = rt.block_on(keeper.status()).unwrap();
    for b in &status {
        let ours = matches!(b.backend, IpAddr::V4(a) if a == ON_LINK || a == ROUTED);
        assert_eq!(b.managed, ours, "{b:?}");
    }
    let shown = t.node.ip(&["-d", "neigh", "show", "dev", "veth0"]).unwrap();
    let shown = String::from_utf8_lossy(&shown.stdout);
    for a in [ON_LINK, GATEWAY] {
        let line = shown
            .lines()
            .find(|l| l.starts_with(&format!("{a} ")))
            .unwrap_or_else(|| panic!("no entry for {a} in {shown}"));
        assert!(
            line.contains("managed") && line.contains("proto 118"),
            "{line}"
        );
    }

    // The peer is replaced by a machine with another MAC that announces itself (arp_notify, as
    // a booting or migrated VM does): the entries follow within seconds.
    t.peer
        .sysctl("net.ipv4.conf.veth1.arp_notify", "1")
        .unwrap();
    t.peer
        .ip(&["link", "set", "veth1", "address", &mac_str(PEER_MAC_NEW)])
        .unwrap();
    await_status(&rt, &keeper, Duration::from_secs(5), "the new MAC", |s| {
        [ON_LINK, ROUTED]
            .iter()
            .all(|a| {
                let (state, mac) = state_and_mac(s, *a);
                state.is_usable() && mac == Some(PEER_MAC_NEW)
            })
            .then_some(())
    });

    // A second sync with the same set changes nothing.
    let again = rt.block_on(keeper.sync(backends)).unwrap();
    assert!(
        again.added.is_empty() && again.removed.is_empty(),
        "{again:?}"
    );

    // Only the on-link backend stays wanted: the gateway's entry goes, the rest stays.
    let report = rt
        .block_on(keeper.sync([IpAddr::V4(ON_LINK)]))
        .expect("shrinking sync");
    assert_eq!(report.removed, vec![IpAddr::V4(GATEWAY)]);
    let entries = rt.block_on(keeper.entries()).unwrap();
    assert!(!entries.contains_key(&IpAddr::V4(GATEWAY)), "{entries:#?}");
    assert!(entries[&IpAddr::V4(ON_LINK)].is_ours());

    let report = rt.block_on(keeper.release_all()).expect("release");
    assert_eq!(report.removed, vec![IpAddr::V4(ON_LINK)]);
    let entries = rt.block_on(keeper.entries()).unwrap();
    assert!(
        entries.values().all(|e| !e.is_ours()) && !entries.contains_key(&IpAddr::V4(ON_LINK)),
        "{entries:#?}"
    );
    // The administrator's entry was never touched.
    let st = &entries[&IpAddr::V4(STATIC)];
    assert_eq!(
        (st.state, st.mac),
        (NeighState::Permanent, Some(STATIC_MAC))
    );
}

#[test]
fn a_new_keeper_adopts_and_removes_entries_left_by_a_previous_one() {
    let t = topo();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    {
        let mut first = keeper_in(&t.node, &rt);
        let r = rt.block_on(first.sync([IpAddr::V4(ON_LINK)])).unwrap();
        assert_eq!(r.added, vec![IpAddr::V4(ON_LINK)]);
        // Dropped as a daemon that exits: its entry stays in the kernel.
    }
    let mut second = keeper_in(&t.node, &rt);
    let entries = rt.block_on(second.entries()).unwrap();
    assert!(entries[&IpAddr::V4(ON_LINK)].is_ours(), "{entries:#?}");
    // The gateway has a plain dynamic entry, as traffic through the stack leaves behind: a cache
    // entry, which the keeper turns into a managed one of its own.
    t.node
        .ip(&[
            "neigh",
            "add",
            "10.99.0.3",
            "lladdr",
            &mac_str(PEER_MAC),
            "dev",
            "veth0",
            "nud",
            "stale",
        ])
        .unwrap();
    assert!(!rt.block_on(second.entries()).unwrap()[&IpAddr::V4(GATEWAY)].is_ours());
    let r = rt
        .block_on(second.sync([IpAddr::V4(ON_LINK), IpAddr::V4(ROUTED)]))
        .unwrap();
    assert_eq!(
        r.added,
        vec![IpAddr::V4(GATEWAY)],
        "the on-link one is already there"
    );
    assert!(r.failed.is_empty(), "{r:?}");
    assert!(rt.block_on(second.entries()).unwrap()[&IpAddr::V4(GATEWAY)].is_ours());
    let r = rt.block_on(second.sync([IpAddr::V4(ROUTED)])).unwrap();
    assert_eq!(
        r.removed,
        vec![IpAddr::V4(ON_LINK)],
        "the previous keeper's entry goes"
    );
}

/// A peer that changes its MAC without a word (no gratuitous ARP) is found again by the kernel's
/// own re-probing of the managed entry. With default timers that takes a reachable time (15-45 s)
/// plus probes; the node's interface here runs them ~30x faster, so the test takes seconds.
#[test]
fn a_silent_mac_change_is_found_by_the_kernels_reprobing() {
    let t = topo();
    for kv in [
        "base_reachable_time_ms=500",
        "delay_first_probe_time=1",
        "retrans_time_ms=200",
        "interval_probe_time_ms=500",
    ] {
        let (k, v) = kv.split_once('=').unwrap();
        t.node
            .sysctl(&format!("net.ipv4.neigh.veth0.{k}"), v)
            .unwrap();
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut keeper = keeper_in(&t.node, &rt);
    rt.block_on(keeper.sync([IpAddr::V4(ON_LINK)])).unwrap();
    await_status(&rt, &keeper, Duration::from_secs(5), "REACHABLE", |s| {
        (state_and_mac(s, ON_LINK) == (NeighState::Reachable, Some(PEER_MAC))).then_some(())
    });
    // arp_notify is off by default: the peer announces nothing.
    t.peer
        .ip(&["link", "set", "veth1", "address", &mac_str(PEER_MAC_NEW)])
        .unwrap();
    await_status(&rt, &keeper, Duration::from_secs(10), "the new MAC", |s| {
        (state_and_mac(s, ON_LINK) == (NeighState::Reachable, Some(PEER_MAC_NEW))).then_some(())
    });
}

const NODE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 1);
const ON_LINK6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 2);
const GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 3);
const ROUTED6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 5);

fn state_and_mac6(
    s: &BTreeMap<IpAddr, BackendNeigh>,
    a: Ipv6Addr,
) -> (NeighState, Option<[u8; 6]>) {
    let b = &s[&IpAddr::V6(a)];
    (b.state, b.mac)
}

/// IPv6 backends next to an IPv4 one: NDP entries for the on-link backend and the routed one's
/// gateway, managed and marked like the ARP ones, resolved by the kernel's own solicitations,
/// following the peer's new MAC (its unsolicited advertisement, `ndisc_notify`), and removed.
#[test]
fn ipv6_backends_get_managed_ndp_entries_that_follow_a_mac_change() {
    let t = topo();
    // nodad: the addresses are usable at once (duplicate address detection would hold them
    // tentative for a second).
    for (ns, addr, dev) in [
        (&t.node, "fd00:99::1/64", "veth0"),
        (&t.peer, "fd00:99::2/64", "veth1"),
        (&t.peer, "fd00:99::3/64", "veth1"),
    ] {
        ns.ip(&["addr", "add", addr, "dev", dev, "nodad"]).unwrap();
    }
    t.node
        .ip(&["-6", "route", "add", "fd00:77::/64", "via", "fd00:99::3"])
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut keeper = keeper_in(&t.node, &rt);
    let backends = [
        IpAddr::V6(ON_LINK6),
        IpAddr::V6(ROUTED6),
        IpAddr::V6(NODE6),
        IpAddr::V4(ON_LINK),
    ];
    let report = rt.block_on(keeper.sync(backends)).expect("first sync");
    assert_eq!(
        report.added,
        vec![
            IpAddr::V4(ON_LINK),
            IpAddr::V6(ON_LINK6),
            IpAddr::V6(GATEWAY6)
        ],
        "{report:?}"
    );
    assert!(report.failed.is_empty(), "{report:?}");
    let res: BTreeMap<_, _> = rt
        .block_on(keeper.status())
        .unwrap()
        .into_iter()
        .map(|b| (b.backend, b.resolution))
        .collect();
    assert_eq!(
        res[&IpAddr::V6(ROUTED6)],
        Resolution::NextHop(IpAddr::V6(GATEWAY6))
    );
    assert_eq!(
        res[&IpAddr::V6(ON_LINK6)],
        Resolution::NextHop(IpAddr::V6(ON_LINK6))
    );
    assert_eq!(res[&IpAddr::V6(NODE6)], Resolution::Local);

    // Resolved by the kernel through NDP: nothing sent traffic, no static entry.
    await_status(
        &rt,
        &keeper,
        Duration::from_secs(5),
        "IPv6 REACHABLE",
        |s| {
            let want = (NeighState::Reachable, Some(PEER_MAC));
            (state_and_mac6(s, ON_LINK6) == want
                && state_and_mac6(s, ROUTED6) == want
                && state_and_mac(s, ON_LINK) == want)
                .then_some(())
        },
    );
    let shown = t
        .node
        .ip(&["-6", "-d", "neigh", "show", "dev", "veth0"])
        .unwrap();
    let shown = String::from_utf8_lossy(&shown.stdout);
    for a in [ON_LINK6, GATEWAY6] {
        let line = shown
            .lines()
            .find(|l| l.starts_with(&format!("{a} ")))
            .unwrap_or_else(|| panic!("no entry for {a} in {shown}"));
        assert!(
            line.contains("managed") && line.contains("proto 118"),
            "{line}"
        );
    }
    let status = rt.block_on(keeper.status()).unwrap();
    assert!(
        status
            .iter()
            .filter(|b| b.backend != IpAddr::V6(NODE6))
            .all(|b| b.managed),
        "{status:?}"
    );

    // The peer comes back with another MAC and says so (ndisc_notify: unsolicited
    // advertisements on an address change, as arp_notify for IPv4).
    t.peer
        .sysctl("net.ipv6.conf.veth1.ndisc_notify", "1")
        .unwrap();
    t.peer
        .ip(&["link", "set", "veth1", "address", &mac_str(PEER_MAC_NEW)])
        .unwrap();
    await_status(&rt, &keeper, Duration::from_secs(10), "the new MAC", |s| {
        [ON_LINK6, ROUTED6]
            .iter()
            .all(|a| {
                let (state, mac) = state_and_mac6(s, *a);
                state.is_usable() && mac == Some(PEER_MAC_NEW)
            })
            .then_some(())
    });

    // The IPv6 backends go: their entries with them; the IPv4 one stays.
    let report = rt
        .block_on(keeper.sync([IpAddr::V4(ON_LINK)]))
        .expect("shrinking sync");
    assert_eq!(
        report.removed,
        vec![IpAddr::V6(ON_LINK6), IpAddr::V6(GATEWAY6)]
    );
    let entries = rt.block_on(keeper.entries()).unwrap();
    assert!(
        !entries.contains_key(&IpAddr::V6(ON_LINK6))
            && !entries.contains_key(&IpAddr::V6(GATEWAY6)),
        "{entries:#?}"
    );
    assert!(entries[&IpAddr::V4(ON_LINK)].is_ours());
}
