//! Layer-2 fixtures (BPF_PROG_TEST_RUN): ARP for VIPs, frames not addressed to the node, and
//! router-correct TTL handling. Each case checks the action, the output bytes and exact counter
//! deltas.
//!
//! Needs root (BPF, network namespaces); part of the normal test run.

use std::{collections::BTreeSet, net::Ipv4Addr};

use vmlb_common::Counter;
use vmlb_tests::{
    fixture::*,
    packet::{arp, diff, verify_checksums, Packet, TCP_SYN},
};
use vmlb_user::model::Proto;

use Counter::*;

const BROADCAST: [u8; 6] = [0xff; 6];
const ZERO: [u8; 6] = [0; 6];

fn env() -> Env {
    let mut e = Env::new().expect("fixture environment (needs root)");
    e.install(&[svc(80, Proto::Tcp, &[be(VM1, 8080)])]).unwrap();
    e
}

#[track_caller]
fn assert_bytes(got: &[u8], want: &[u8]) {
    assert!(got == want, "output differs:\n{}", diff(got, want));
}

/// A request for an owned VIP is answered in place, byte for byte as RFC 826 says: opcode 2,
/// our MAC as sender, the asker as target, back to the asker's MAC.
#[test]
fn l2_arp_request_for_an_owned_vip_is_answered() {
    let mut e = env();
    let req = arp(1, BROADCAST, CLIENT_MAC, CLIENT, ZERO, VIP);
    let (action, out) = e.run(&req);
    assert_eq!(action, XDP_TX);
    let want = arp(2, CLIENT_MAC, NODE_MAC, VIP, CLIENT_MAC, CLIENT);
    // The reply's Ethernet source is the interface's own MAC.
    assert_bytes(&out, &want);
    assert_eq!(&out[6..12], &NODE_MAC);
    e.expect_counters(&[(TxArpReply, 1)]);
}

/// A VIP this node does not own (another node answers for it), a non-VIP address, a reply and
/// a gratuitous announcement all go to the kernel untouched.
#[test]
fn l2_other_arp_passes() {
    let mut e = env();
    e.reconciler
        .set_ownership(Some(BTreeSet::<std::net::Ipv4Addr>::new()), &mut e.maps)
        .unwrap();
    let cases = [
        (
            "VIP not owned",
            arp(1, BROADCAST, CLIENT_MAC, CLIENT, ZERO, VIP),
        ),
        (
            "not a VIP",
            arp(
                1,
                BROADCAST,
                CLIENT_MAC,
                CLIENT,
                ZERO,
                Ipv4Addr::new(10, 10, 1, 77),
            ),
        ),
        (
            "a reply",
            arp(2, NODE_MAC, CLIENT_MAC, CLIENT, NODE_MAC, VIP),
        ),
        (
            "gratuitous",
            arp(1, BROADCAST, CLIENT_MAC, CLIENT, ZERO, CLIENT),
        ),
    ];
    for (what, frame) in cases {
        let (action, out) = e.run(&frame);
        assert_eq!((action, &out), (XDP_PASS, &frame), "{what}");
        e.expect_counters(&[(PassArp, 1)]);
    }
    // Taking the VIP (back) makes the node answer at once.
    let changed = e
        .reconciler
        .set_ownership(Some([VIP].into()), &mut e.maps)
        .unwrap();
    assert_eq!(changed, vec![(VIP.into(), true)]);
    let (action, _) = e.run(&arp(1, BROADCAST, CLIENT_MAC, CLIENT, ZERO, VIP));
    assert_eq!(action, XDP_TX);
    e.expect_counters(&[(TxArpReply, 1)]);
}

/// Frames to a VIP that are not addressed to the node's MAC (broadcast, another host's) are
/// never NATed: they create no flow.
#[test]
fn l2_broadcast_and_foreign_mac_frames_to_a_vip_pass() {
    let mut e = env();
    for dst in [BROADCAST, [0x02, 0, 0, 0, 0x77, 0x77]] {
        let input = Packet::tcp((CLIENT, 40000), (VIP, 80), TCP_SYN)
            .macs(CLIENT_MAC, dst)
            .build();
        let (action, out) = e.run(&input);
        assert_eq!((action, out), (XDP_PASS, input));
        e.expect_counters(&[(PassOtherMac, 1)]);
    }
    assert!(e.maps.live_flows().is_empty());
}

/// TTL: a packet with TTL 1 (or 0) would expire on this hop, so it goes to the kernel (which
/// answers time-exceeded) and creates no flow; TTL 2 leaves with TTL 1 and a correct checksum.
#[test]
fn l2_ttl_is_decremented_and_expiring_packets_go_to_the_kernel() {
    let mut e = env();
    for ttl in [0, 1] {
        let mut p = Packet::tcp((CLIENT, 40001), (VIP, 80), TCP_SYN).macs(CLIENT_MAC, NODE_MAC);
        p.ttl = ttl;
        let input = p.build();
        let (action, out) = e.run(&input);
        assert_eq!((action, out), (XDP_PASS, input), "TTL {ttl}");
        e.expect_counters(&[(PassTtlExceeded, 1)]);
    }
    assert!(e.maps.live_flows().is_empty());
    let mut p = Packet::tcp((CLIENT, 40001), (VIP, 80), TCP_SYN).macs(CLIENT_MAC, NODE_MAC);
    p.ttl = 2;
    let (action, out) = e.run(&p.build());
    assert_eq!(action, XDP_TX);
    assert_eq!(out[14 + 8], 1, "TTL after the hop");
    verify_checksums(&out).expect("checksums after the TTL change");
    // The frame leaves with the interface's own MAC as source.
    assert_eq!(&out[6..12], &NODE_MAC);
    e.expect_counters(&[(FlowNew, 1), (TxSameIface, 1)]);
}

/// With the cluster as source, ownership carries a deadline the daemon moves on with every
/// Lease renewal: past it the node stops answering by itself (a dead daemon renews nothing).
#[test]
fn l2_arp_ownership_lapses_at_its_deadline() {
    let mut e = env();
    let req = arp(1, BROADCAST, CLIENT_MAC, CLIENT, ZERO, VIP);
    let now = vmlb_user::conntrack::now();
    // A second ahead (~954 clock units): answered.
    e.maps.update_config(|c| c.owned_until = now + 954).unwrap();
    assert_eq!(e.run(&req).0, XDP_TX);
    e.expect_counters(&[(TxArpReply, 1)]);
    // Lapsed: passed, as for a VIP not owned.
    e.maps.update_config(|c| c.owned_until = now - 1).unwrap();
    let (action, out) = e.run(&req);
    assert_eq!((action, out), (XDP_PASS, req.clone()));
    e.expect_counters(&[(PassArp, 1)]);
    // 0: no deadline (files only).
    e.maps.update_config(|c| c.owned_until = 0).unwrap();
    assert_eq!(e.run(&req).0, XDP_TX);
    e.expect_counters(&[(TxArpReply, 1)]);
}
