//! IPv6 fixtures (BPF_PROG_TEST_RUN through `vmlb`, which tail-calls `vmlb6` and
//! `vmlb6_icmp`): each mirrors an IPv4 case — full NAT both ways, the flow lifecycle's entry
//! policies, hop limit, the extension-header and fragment policy, martians, neighbour
//! discovery for owned VIPs, echo, and packet-too-big translated both ways. Frames are
//! compared byte for byte with packets built independently, every checksum is recomputed from
//! scratch, and counter deltas are exact.
//!
//! Needs root (BPF, network namespaces); part of the normal test run.

use std::net::Ipv6Addr;

use vmlb_common::Counter;
use vmlb_tests::{
    fixture::*,
    fixture6::svc6,
    packet::{diff, TCP_ACK, TCP_SYN},
    packet6::{verify_checksums6, Packet6},
};
use vmlb_user::model::Proto;

use Counter::*;

const ROUTER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x10, 1, 0, 0, 0, 0xfe);
/// What Linux quotes in an ICMPv6 error: as much as fits in 1280 bytes.
const LINUX_QUOTE6: usize = 1280 - 40 - 8;

fn env() -> Env {
    let mut e = Env::new().expect("fixture environment (needs root)");
    e.install(&[
        svc6(80, Proto::Tcp, &[(VM1_6, 8080)]),
        svc6(53, Proto::Udp, &[(VM1_6, 5353)]),
    ])
    .unwrap();
    e.snapshot().unwrap();
    e
}

#[track_caller]
fn assert_bytes(got: &[u8], want: &[u8]) {
    assert!(got == want, "output differs:\n{}", diff(got, want));
}

/// `p` as the node sends it on: one hop later, between these MACs.
fn forwarded(mut p: Packet6, src: [u8; 6], dst: [u8; 6]) -> Vec<u8> {
    p.hop_limit -= 1;
    p.macs(src, dst).build()
}

/// (source, source port, destination, destination port) of an output frame.
fn tuple(out: &[u8]) -> (Ipv6Addr, u16, Ipv6Addr, u16) {
    let a = |o: usize| Ipv6Addr::from(<[u8; 16]>::try_from(&out[o..o + 16]).unwrap());
    let port = |o: usize| u16::from_be_bytes([out[o], out[o + 1]]);
    (a(22), port(54), a(38), port(56))
}

/// Open a TCP flow from the client; its SNAT port.
fn open(e: &mut Env, sport: u16) -> u16 {
    let syn = Packet6::tcp((CLIENT6, sport), (VIP6, 80), TCP_SYN).macs(CLIENT_MAC, NODE_MAC);
    let (action, out) = e.run(&syn.build());
    assert_eq!(action, XDP_TX, "SYN from port {sport}");
    e.snapshot().unwrap();
    tuple(&out).1
}

#[test]
fn full_nat_both_ways_over_ipv6() {
    let mut e = env();
    let syn = Packet6::tcp((CLIENT6, 41000), (VIP6, 80), TCP_SYN);
    let (action, out) = e.run(&syn.clone().macs(CLIENT_MAC, NODE_MAC).build());
    assert_eq!(action, XDP_TX);
    let (src, port, dst, dport) = tuple(&out);
    assert_eq!((src, dst, dport), (SNAT6, VM1_6, 8080));
    assert!((1024..=32764).contains(&port), "SNAT port {port}");
    let want = forwarded(
        Packet6::tcp((SNAT6, port), (VM1_6, 8080), TCP_SYN),
        NODE_MAC,
        VM1_MAC,
    );
    assert_bytes(&out, &want);
    verify_checksums6(&out).unwrap();
    e.expect_counters(&[(FlowNew, 1), (TxSameIface, 1)]);

    let reply = Packet6::tcp((VM1_6, 8080), (SNAT6, port), TCP_SYN | TCP_ACK);
    let (action, out) = e.run(&reply.macs(VM1_MAC, NODE_MAC).build());
    assert_eq!(action, XDP_TX);
    let want = forwarded(
        Packet6::tcp((VIP6, 80), (CLIENT6, 41000), TCP_SYN | TCP_ACK),
        NODE_MAC,
        CLIENT_MAC,
    );
    assert_bytes(&out, &want);
    verify_checksums6(&out).unwrap();
    e.expect_counters(&[(ReplyHit, 1), (TxSameIface, 1)]);

    let ack =
        Packet6::tcp((CLIENT6, 41000), (VIP6, 80), TCP_ACK).payload(b"GET / HTTP/1.1\r\n\r\n");
    let (action, out) = e.run(&ack.macs(CLIENT_MAC, NODE_MAC).build());
    assert_eq!(action, XDP_TX);
    assert_eq!(tuple(&out), (SNAT6, port, VM1_6, 8080));
    verify_checksums6(&out).unwrap();
    e.expect_counters(&[(FlowHit, 1), (TxSameIface, 1)]);
}

#[test]
fn udp_over_ipv6_keeps_its_flow() {
    let mut e = env();
    let q = Packet6::udp((CLIENT6, 41001), (VIP6, 53)).payload(b"query");
    let (action, out) = e.run(&q.clone().macs(CLIENT_MAC, NODE_MAC).build());
    assert_eq!(action, XDP_TX);
    let (_, port, dst, dport) = tuple(&out);
    assert_eq!((dst, dport), (VM1_6, 5353));
    verify_checksums6(&out).unwrap();
    let (action, out2) = e.run(&q.macs(CLIENT_MAC, NODE_MAC).build());
    assert_eq!(action, XDP_TX);
    assert_eq!(tuple(&out2).1, port, "the same flow, the same SNAT port");
    e.expect_counters(&[(FlowNew, 1), (FlowHit, 1), (TxSameIface, 2)]);
    let answer = Packet6::udp((VM1_6, 5353), (SNAT6, port)).payload(b"answer");
    let (action, out) = e.run(&answer.macs(VM1_MAC, NODE_MAC).build());
    assert_eq!(action, XDP_TX);
    let want = forwarded(
        Packet6::udp((VIP6, 53), (CLIENT6, 41001)).payload(b"answer"),
        NODE_MAC,
        CLIENT_MAC,
    );
    assert_bytes(&out, &want);
    e.expect_counters(&[(ReplyHit, 1), (TxSameIface, 1)]);
}

/// The entry policies of IPv4, on IPv6: TCP without SYN creates nothing; an unknown port of a
/// VIP is dropped; other destinations pass; a martian source is dropped; a hop limit that would
/// expire goes to the kernel.
#[test]
fn ipv6_entry_policies_match_ipv4() {
    let mut e = env();
    let run = |e: &mut Env, p: Packet6| e.run(&p.macs(CLIENT_MAC, NODE_MAC).build()).0;
    assert_eq!(
        run(&mut e, Packet6::tcp((CLIENT6, 41002), (VIP6, 80), TCP_ACK)),
        XDP_DROP
    );
    e.expect_counters(&[(DropTcpNoFlow, 1)]);
    assert_eq!(
        run(&mut e, Packet6::tcp((CLIENT6, 41002), (VIP6, 81), TCP_SYN)),
        XDP_DROP
    );
    e.expect_counters(&[(DropUnknownPort, 1)]);
    assert_eq!(
        run(&mut e, Packet6::tcp((CLIENT6, 41002), (VM2_6, 80), TCP_SYN)),
        XDP_PASS
    );
    e.expect_counters(&[(PassNotVip, 1)]);
    assert_eq!(
        run(
            &mut e,
            Packet6::tcp((Ipv6Addr::LOCALHOST, 41002), (VIP6, 80), TCP_SYN)
        ),
        XDP_DROP
    );
    e.expect_counters(&[(DropMartian, 1)]);
    // A VIP as source (found through CONFIG6's VIP filter, then VIPS6).
    assert_eq!(
        run(&mut e, Packet6::tcp((VIP6, 41002), (VIP6, 80), TCP_SYN)),
        XDP_DROP
    );
    e.expect_counters(&[(DropMartian, 1)]);
    let mut last_hop = Packet6::tcp((CLIENT6, 41003), (VIP6, 80), TCP_SYN);
    last_hop.hop_limit = 1;
    assert_eq!(run(&mut e, last_hop), XDP_PASS);
    e.expect_counters(&[(PassTtlExceeded, 1)]);
}

/// Extension headers are not walked: to a VIP they are dropped and counted (a fragment header
/// included, as IPv4 fragments to VIPs are), elsewhere they pass.
#[test]
fn ipv6_extension_headers_and_fragments_are_a_counted_policy() {
    let mut e = env();
    let hop_by_hop = (0u8, vec![0, 0, 1, 4, 0, 0, 0, 0]);
    let fragment = (44u8, vec![0, 0, 0, 1, 0, 0, 0x12, 0x34]);
    for ext in [hop_by_hop, fragment] {
        let mut p = Packet6::tcp((CLIENT6, 41004), (VIP6, 80), TCP_SYN).macs(CLIENT_MAC, NODE_MAC);
        p.ext = vec![ext.clone()];
        assert_eq!(e.run(&p.build()).0, XDP_DROP, "next header {}", ext.0);
        e.expect_counters(&[(DropIpv6ExtHeader, 1)]);
        let mut p = Packet6::tcp((CLIENT6, 41004), (VM2_6, 80), TCP_SYN).macs(CLIENT_MAC, NODE_MAC);
        p.ext = vec![ext.clone()];
        assert_eq!(e.run(&p.build()).0, XDP_PASS, "next header {}", ext.0);
        e.expect_counters(&[(PassNotVip, 1)]);
    }
}

#[test]
fn neighbour_solicitation_for_an_owned_vip_is_answered() {
    let mut e = env();
    let ns = Packet6::neighbour_solicit(CLIENT6, CLIENT_MAC, VIP6);
    let (action, out) = e.run(&ns.build());
    assert_eq!(action, XDP_TX);
    let want = Packet6::neighbour_advert(VIP6, CLIENT6, VIP6, NODE_MAC).macs(NODE_MAC, CLIENT_MAC);
    assert_bytes(&out, &want.build());
    verify_checksums6(&out).unwrap();
    e.expect_counters(&[(TxNdpAdvert, 1)]);

    // Not ours, a duplicate-address probe (from ::), and one that crossed a router.
    let other = Packet6::neighbour_solicit(CLIENT6, CLIENT_MAC, VM2_6);
    let dad = Packet6::neighbour_solicit(Ipv6Addr::UNSPECIFIED, CLIENT_MAC, VIP6);
    let mut routed = Packet6::neighbour_solicit(CLIENT6, CLIENT_MAC, VIP6);
    routed.hop_limit = 254;
    for p in [other, dad, routed] {
        let frame = p.build();
        let (action, out) = e.run(&frame);
        assert_eq!(action, XDP_PASS);
        assert_bytes(&out, &frame);
    }
    e.expect_counters(&[(PassNdp, 3)]);
}

#[test]
fn icmpv6_echo_to_a_vip_is_answered() {
    let mut e = env();
    let req =
        Packet6::ping(CLIENT6, VIP6, 0x4242, 7, b"vmlb ping6 payload").macs(CLIENT_MAC, NODE_MAC);
    let (action, out) = e.run(&req.build());
    assert_eq!(action, XDP_TX);
    let want = Packet6::icmp(VIP6, CLIENT6, 129, 0, [0x42, 0x42, 0, 7])
        .payload(b"vmlb ping6 payload")
        .macs(NODE_MAC, CLIENT_MAC);
    assert_bytes(&out, &want.build());
    verify_checksums6(&out).unwrap();
    e.expect_counters(&[(TxIcmpEchoReply, 1)]);
}

/// Path-MTU discovery at IPv6's minimum MTU: a router on the client's side cannot pass a large
/// reply (VIP -> client); the backend gets packet-too-big about what it sent (backend -> SNAT).
#[test]
fn packet_too_big_from_the_client_side_reaches_the_backend() {
    let mut e = env();
    let port = open(&mut e, 41005);
    let big: Vec<u8> = (0..1400u32).map(|i| (i * 7) as u8).collect();
    let sent = Packet6::tcp((VIP6, 80), (CLIENT6, 41005), TCP_ACK).payload(&big);
    let err = Packet6::packet_too_big(ROUTER6, VIP6, 1280, &sent, LINUX_QUOTE6)
        .macs(CLIENT_MAC, NODE_MAC);
    let (action, out) = e.run(&err.build());
    assert_eq!(action, XDP_TX);
    let want = forwarded(
        Packet6::packet_too_big(
            ROUTER6,
            VM1_6,
            1280,
            &Packet6::tcp((VM1_6, 8080), (SNAT6, port), TCP_ACK).payload(&big),
            LINUX_QUOTE6,
        ),
        NODE_MAC,
        VM1_MAC,
    );
    assert_bytes(&out, &want);
    verify_checksums6(&out).unwrap();
    e.expect_counters(&[(IcmpErrorTranslated, 1), (TxSameIface, 1)]);
}

/// And from the backend's side: the client gets it quoting its own packet (client -> VIP); an
/// error the backend sends itself comes from the VIP.
#[test]
fn icmpv6_errors_from_the_backend_side_reach_the_client() {
    let mut e = env();
    let port = open(&mut e, 41006);
    let big: Vec<u8> = (0..1400u32).map(|i| (i * 3) as u8).collect();
    let sent = Packet6::tcp((SNAT6, port), (VM1_6, 8080), TCP_ACK).payload(&big);
    let err =
        Packet6::packet_too_big(ROUTER6, SNAT6, 1280, &sent, LINUX_QUOTE6).macs(VM1_MAC, NODE_MAC);
    let (action, out) = e.run(&err.build());
    assert_eq!(action, XDP_TX);
    let quoted = Packet6::tcp((CLIENT6, 41006), (VIP6, 80), TCP_ACK).payload(&big);
    let want = forwarded(
        Packet6::packet_too_big(ROUTER6, CLIENT6, 1280, &quoted, LINUX_QUOTE6),
        NODE_MAC,
        CLIENT_MAC,
    );
    assert_bytes(&out, &want);
    verify_checksums6(&out).unwrap();
    e.expect_counters(&[(IcmpErrorTranslated, 1), (TxSameIface, 1)]);

    // Port unreachable from the VM itself, about a UDP flow: from the VIP.
    let q = Packet6::udp((CLIENT6, 41007), (VIP6, 53)).payload(b"query");
    let (action, out) = e.run(&q.clone().macs(CLIENT_MAC, NODE_MAC).build());
    assert_eq!(action, XDP_TX);
    let uport = tuple(&out).1;
    e.snapshot().unwrap();
    let sent = Packet6::udp((SNAT6, uport), (VM1_6, 5353)).payload(b"query");
    let err = Packet6::icmp_error(VM1_6, SNAT6, 1, 4, [0; 4], &sent, LINUX_QUOTE6)
        .macs(VM1_MAC, NODE_MAC);
    let (action, out) = e.run(&err.build());
    assert_eq!(action, XDP_TX);
    let want = forwarded(
        Packet6::icmp_error(VIP6, CLIENT6, 1, 4, [0; 4], &q, LINUX_QUOTE6),
        NODE_MAC,
        CLIENT_MAC,
    );
    assert_bytes(&out, &want);
    verify_checksums6(&out).unwrap();
    e.expect_counters(&[(IcmpErrorTranslated, 1), (TxSameIface, 1)]);
}

/// An error to a VIP that quotes no flow is dropped, as for IPv4.
#[test]
fn an_icmpv6_error_quoting_no_flow_is_dropped() {
    let mut e = env();
    let sent = Packet6::tcp((VIP6, 80), (CLIENT6, 49999), TCP_ACK);
    let err = Packet6::packet_too_big(ROUTER6, VIP6, 1280, &sent, LINUX_QUOTE6)
        .macs(CLIENT_MAC, NODE_MAC);
    assert_eq!(e.run(&err.build()).0, XDP_DROP);
    e.expect_counters(&[(DropIcmpError, 1)]);
}

/// Mirrors `truncated_at_every_header_boundary_never_aborts`: cut at Ethernet's end, inside
/// the IPv6 header, at its end, inside TCP, one byte short. Before the destination is known the
/// frame passes; after, a VIP's is dropped and another's passes.
#[test]
fn truncated_ipv6_at_every_header_boundary_never_aborts() {
    let mut e = env();
    let full = Packet6::tcp((CLIENT6, 40040), (VIP6, 80), TCP_SYN)
        .macs(CLIENT_MAC, NODE_MAC)
        .build();
    let other = Packet6::tcp((CLIENT6, 40040), (VM2_6, 80), TCP_SYN)
        .macs(CLIENT_MAC, NODE_MAC)
        .build();
    for len in [14, 30, 53, 54, 60, 73] {
        let (action, out) = e.run(&full[..len]);
        let want = if len < 54 {
            (XDP_PASS, PassTruncated)
        } else {
            (XDP_DROP, DropTruncated)
        };
        assert_eq!(action, want.0, "VIP packet cut at {len}");
        if action == XDP_PASS {
            assert_eq!(out, &full[..len], "passed packets are untouched");
        }
        e.expect_counters(&[(want.1, 1)]);
        let (action, _) = e.run(&other[..len]);
        assert_eq!(action, XDP_PASS, "non-VIP packet cut at {len}");
        e.expect_counters(&[(PassTruncated, 1)]);
    }
    assert_eq!(e.run(&full).0, XDP_TX);
}

/// Mirrors `flow_of_a_down_backend_is_rebalanced`: the flow moves to the backend the table
/// still has, on its next packet, and stays there.
#[test]
fn ipv6_flow_of_a_down_backend_is_rebalanced() {
    let mut e = Env::new().expect("fixture environment (needs root)");
    let spec = svc6(80, Proto::Tcp, &[(VM1_6, 8080), (VM2_6, 8080)]);
    e.install(std::slice::from_ref(&spec)).unwrap();
    let syn =
        |sport| Packet6::tcp((CLIENT6, sport), (VIP6, 80), TCP_SYN).macs(CLIENT_MAC, NODE_MAC);
    // A client port whose flow Maglev puts on VM1.
    let sport = (41100..41300)
        .find(|&p| tuple(&e.run(&syn(p).build()).1).2 == VM1_6)
        .expect("a flow on VM1 among 200");
    let mut down = spec.clone();
    down.backends[0].up = false;
    e.install(&[down]).unwrap();
    e.snapshot().unwrap();
    let ack = Packet6::tcp((CLIENT6, sport), (VIP6, 80), TCP_ACK).macs(CLIENT_MAC, NODE_MAC);
    let (action, out) = e.run(&ack.build());
    assert_eq!(action, XDP_TX);
    assert_eq!(tuple(&out).2, VM2_6);
    verify_checksums6(&out).unwrap();
    e.expect_counters(&[(FlowRebalanced, 1), (FlowNew, 1), (TxSameIface, 1)]);
    let (_, out2) = e.run(&ack.build());
    assert_eq!(tuple(&out2).2, VM2_6);
    e.expect_counters(&[(FlowHit, 1), (TxSameIface, 1)]);
}

/// Mirrors `xdp_ct_syn_reusing_a_closing_tuple_reopens_it`: a SYN on a closing flow's 5-tuple
/// reopens it on its SNAT tuple.
#[test]
fn ipv6_syn_reusing_a_closing_tuple_reopens_it() {
    let mut e = env();
    let port = open(&mut e, 41200);
    let rst = Packet6::tcp((CLIENT6, 41200), (VIP6, 80), 0x04).macs(CLIENT_MAC, NODE_MAC);
    assert_eq!(e.run(&rst.build()).0, XDP_TX);
    e.expect_counters(&[(FlowHit, 1), (FlowClosing, 1), (TxSameIface, 1)]);
    let syn = Packet6::tcp((CLIENT6, 41200), (VIP6, 80), TCP_SYN).macs(CLIENT_MAC, NODE_MAC);
    let (action, out) = e.run(&syn.build());
    assert_eq!(action, XDP_TX);
    assert_eq!(tuple(&out).1, port, "the same SNAT tuple");
    e.expect_counters(&[(FlowTupleReuse, 1), (FlowHit, 1), (TxSameIface, 1)]);
}

const VLAN: u16 = 1512;

/// Mirrors fixtures_vlan.rs: on a trunk, an IPv6 frame of the served VLAN is balanced and leaves
/// with its tag, a solicitation for the VIP is answered tagged, another VLAN's frame passes.
#[test]
fn ipv6_on_the_served_vlan_keeps_its_tag() {
    use vmlb_tests::packet::tagged;
    let mut e = env();
    let dev = e.ifindex;
    e.maps
        .update_config(|c| {
            c.vlan_ids[0] = VLAN;
            c.vlan_ifindex[0] = dev;
            c.vlan_count = 1;
        })
        .unwrap();
    let syn = Packet6::tcp((CLIENT6, 41300), (VIP6, 80), TCP_SYN).macs(CLIENT_MAC, NODE_MAC);
    let (action, out) = e.run(&tagged(&syn.build(), 0x8100, VLAN));
    assert_eq!(action, XDP_TX);
    let untagged: Vec<u8> = out[..12].iter().chain(&out[16..]).copied().collect();
    assert_eq!(&out[12..16], &[0x81, 0x00, (VLAN >> 8) as u8, VLAN as u8]);
    let (_, port, dst, _) = tuple(&untagged);
    assert_eq!(dst, VM1_6);
    let want = forwarded(
        Packet6::tcp((SNAT6, port), (VM1_6, 8080), TCP_SYN),
        NODE_MAC,
        VM1_MAC,
    );
    assert_bytes(&out, &tagged(&want, 0x8100, VLAN));
    e.expect_counters(&[(FlowNew, 1), (TxSameIface, 1)]);

    let ns = Packet6::neighbour_solicit(CLIENT6, CLIENT_MAC, VIP6);
    let (action, out) = e.run(&tagged(&ns.build(), 0x8100, VLAN));
    assert_eq!(action, XDP_TX);
    let na = Packet6::neighbour_advert(VIP6, CLIENT6, VIP6, NODE_MAC).macs(NODE_MAC, CLIENT_MAC);
    assert_bytes(&out, &tagged(&na.build(), 0x8100, VLAN));
    e.expect_counters(&[(TxNdpAdvert, 1)]);

    let frame = tagged(&syn.build(), 0x8100, VLAN + 1);
    let (action, out) = e.run(&frame);
    assert_eq!((action, out), (XDP_PASS, frame));
    e.expect_counters(&[(PassOtherVlan, 1)]);
}

/// Mirrors `l2_arp_ownership_lapses_at_its_deadline`: past the ownership deadline the
/// solicitation is the kernel's.
#[test]
fn ndp_ownership_lapses_at_its_deadline() {
    let mut e = env();
    let ns = Packet6::neighbour_solicit(CLIENT6, CLIENT_MAC, VIP6).build();
    let now = vmlb_user::conntrack::now();
    e.maps.update_config(|c| c.owned_until = now + 954).unwrap();
    assert_eq!(e.run(&ns).0, XDP_TX);
    e.expect_counters(&[(TxNdpAdvert, 1)]);
    e.maps.update_config(|c| c.owned_until = now - 1).unwrap();
    let (action, out) = e.run(&ns);
    assert_eq!((action, out), (XDP_PASS, ns.clone()));
    e.expect_counters(&[(PassNdp, 1)]);
}
