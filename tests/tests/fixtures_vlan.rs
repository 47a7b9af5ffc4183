//! 802.1Q fixtures (BPF_PROG_TEST_RUN): on a trunk, frames of the served VLAN are balanced and
//! leave with their tag; other VLANs pass to the kernel; stacked tags (QinQ) are recognised and
//! passed; ARP and ICMP echo are answered on the VLAN with the tag kept.
//!
//! Needs root (BPF, network namespaces); part of the normal test run.

use vmlb_common::Counter;
use vmlb_tests::{
    fixture::*,
    packet::{arp, diff, tagged, verify_checksums, Packet, TCP_ACK, TCP_SYN},
};
use vmlb_user::model::Proto;

use Counter::*;

const VLAN: u16 = 1512;
const TPID_8021Q: u16 = 0x8100;
const TPID_8021AD: u16 = 0x88a8;

/// A service on VM1, and VLAN 1512 served with fx0 as its device (as in the lab's trunk, where
/// no 802.1Q sub-interface exists and the interface carries the VLAN's routes itself).
fn env() -> Env {
    let mut e = Env::new().expect("fixture environment (needs root)");
    e.install(&[svc(80, Proto::Tcp, &[be(VM1, 8080)])]).unwrap();
    let dev = e.ifindex;
    e.maps
        .update_config(|c| {
            c.vlan_ids[0] = VLAN;
            c.vlan_ifindex[0] = dev;
            c.vlan_count = 1;
        })
        .unwrap();
    e
}

#[track_caller]
fn assert_bytes(got: &[u8], want: &[u8]) {
    assert!(got == want, "output differs:\n{}", diff(got, want));
}

fn syn(sport: u16) -> Packet {
    Packet::tcp((CLIENT, sport), (VIP, 80), TCP_SYN).macs(CLIENT_MAC, NODE_MAC)
}

/// A SYN tagged with the served VLAN is NATed like an untagged one and leaves with its tag;
/// the backend's tagged reply comes back to the client tagged.
#[test]
fn vlan_served_tag_is_balanced_and_kept() {
    let mut e = env();
    let key = flow_key((CLIENT, 42000), (VIP, 80), Proto::Tcp);
    let port = snat_port(&key, 0);
    let (action, out) = e.run(&tagged(&syn(42000).build(), TPID_8021Q, VLAN));
    assert_eq!(action, XDP_TX);
    let want = syn(42000)
        .with_tuple((SNAT, port), (VM1, 8080))
        .macs(NODE_MAC, VM1_MAC)
        .build();
    assert_bytes(&out, &tagged(&want, TPID_8021Q, VLAN));
    verify_checksums(&out).unwrap();
    e.expect_counters(&[(FlowNew, 1), (TxSameIface, 1)]);

    let reply = Packet::tcp((VM1, 8080), (SNAT, port), TCP_SYN | TCP_ACK).macs(VM1_MAC, NODE_MAC);
    let (action, out) = e.run(&tagged(&reply.build(), TPID_8021Q, VLAN));
    assert_eq!(action, XDP_TX);
    let want = reply
        .with_tuple((VIP, 80), (CLIENT, 42000))
        .macs(NODE_MAC, CLIENT_MAC)
        .build();
    assert_bytes(&out, &tagged(&want, TPID_8021Q, VLAN));
    e.expect_counters(&[(ReplyHit, 1), (TxSameIface, 1)]);
}

/// Another VLAN's frames, and tagged frames when no VLAN is configured, are the kernel's.
#[test]
fn vlan_other_vlan_passes() {
    let mut e = env();
    let input = tagged(&syn(42001).build(), TPID_8021Q, 7);
    let (action, out) = e.run(&input);
    assert_eq!((action, out), (XDP_PASS, input));
    e.expect_counters(&[(PassOtherVlan, 1)]);
    assert!(e.maps.live_flows().is_empty());

    e.maps.update_config(|c| c.vlan_count = 0).unwrap();
    let input = tagged(&syn(42002).build(), TPID_8021Q, VLAN);
    let (action, out) = e.run(&input);
    assert_eq!((action, out), (XDP_PASS, input));
    e.expect_counters(&[(PassOtherVlan, 1)]);
}

/// QinQ: an 802.1ad S-tag, or two stacked 802.1Q tags, is recognised and passed, never parsed
/// as if the inner header were IPv4.
#[test]
fn vlan_qinq_is_recognised_and_passed() {
    let mut e = env();
    let inner = tagged(&syn(42003).build(), TPID_8021Q, VLAN);
    for (what, input) in [
        ("802.1ad outer tag", tagged(&inner, TPID_8021AD, 100)),
        ("two 802.1Q tags", tagged(&inner, TPID_8021Q, VLAN)),
    ] {
        let (action, out) = e.run(&input);
        assert_eq!((action, out), (XDP_PASS, input), "{what}");
        e.expect_counters(&[(PassQinq, 1)]);
    }
}

/// A priority tag (VID 0) belongs to the untagged VLAN: served, tag kept.
#[test]
fn vlan_priority_tag_is_served() {
    let mut e = env();
    let (action, out) = e.run(&tagged(&syn(42004).build(), TPID_8021Q, 0));
    assert_eq!(action, XDP_TX);
    assert_eq!(&out[12..16], &[0x81, 0x00, 0, 0], "tag kept");
    e.expect_counters(&[(FlowNew, 1), (TxSameIface, 1)]);
}

/// ARP and ICMP echo on the served VLAN are answered with the tag kept.
#[test]
fn vlan_arp_and_ping_are_answered_tagged() {
    let mut e = env();
    let req = arp(1, [0xff; 6], CLIENT_MAC, CLIENT, [0; 6], VIP);
    let (action, out) = e.run(&tagged(&req, TPID_8021Q, VLAN));
    assert_eq!(action, XDP_TX);
    let want = arp(2, CLIENT_MAC, NODE_MAC, VIP, CLIENT_MAC, CLIENT);
    assert_bytes(&out, &tagged(&want, TPID_8021Q, VLAN));
    e.expect_counters(&[(TxArpReply, 1)]);

    let ping = Packet::ping(CLIENT, VIP, 1, 2, b"tagged").macs(CLIENT_MAC, NODE_MAC);
    let (action, out) = e.run(&tagged(&ping.build(), TPID_8021Q, VLAN));
    assert_eq!(action, XDP_TX);
    let mut want = Packet::icmp(VIP, CLIENT, 0, 0, [0, 1, 0, 2])
        .payload(b"tagged")
        .macs(NODE_MAC, CLIENT_MAC);
    want.ttl = 64;
    assert_bytes(&out, &tagged(&want.build(), TPID_8021Q, VLAN));
    verify_checksums(&out).unwrap();
    e.expect_counters(&[(TxIcmpEchoReply, 1)]);
}

/// A tagged frame leaves by the interface it came in on, tag and all; a backend whose next hop
/// is on another device (another VLAN, another link) cannot be reached that way: passed, no
/// flow created.
#[test]
fn vlan_next_hop_on_another_device_passes() {
    let mut e = env();
    const REMOTE_PORT: u16 = 8443;
    e.install(&[svc(443, Proto::Tcp, &[be(REMOTE, REMOTE_PORT)])])
        .unwrap();
    let input = tagged(
        &Packet::tcp((CLIENT, 42005), (VIP, 443), TCP_SYN)
            .macs(CLIENT_MAC, NODE_MAC)
            .build(),
        TPID_8021Q,
        VLAN,
    );
    let (action, out) = e.run(&input);
    assert_eq!((action, out), (XDP_PASS, input));
    e.expect_counters(&[(PassOtherVlan, 1)]);
    assert!(e.maps.live_flows().is_empty());
    // Untagged, the same flow is redirected to that device as before.
    let (action, _) = e.run(
        &Packet::tcp((CLIENT, 42005), (VIP, 443), TCP_SYN)
            .macs(CLIENT_MAC, NODE_MAC)
            .build(),
    );
    assert_eq!(action, XDP_REDIRECT);
}
