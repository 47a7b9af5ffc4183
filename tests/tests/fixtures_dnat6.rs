//! dnat-mode fixtures for IPv6 services (BPF_PROG_TEST_RUN through `vmlb`, which tail-calls
//! `vmlb6` and `vmlb6_icmp`): every case of fixtures_dnat.rs on IPv6. Only the destination is
//! rewritten, so the backend sees the client's own address; its replies, routed through the
//! node, are recognised by their source (`DNAT_ENDPOINTS6`) and translated back. Without a flow
//! both directions still go on without state. Each case compares whole frames with packets
//! built independently, recomputes every checksum and checks the exact counter deltas.
//!
//! Needs root (BPF, network namespaces); part of the normal test run.

use std::net::Ipv6Addr;

use vmlb_common::{addr6, hash::tuple_slot6, Counter, FlowKey6};
use vmlb_tests::{
    fixture::*,
    fixture6::svc6,
    packet::{diff, TCP_ACK, TCP_SYN},
    packet6::{verify_checksums6, Packet6},
};
use vmlb_user::{
    dataplane::loader,
    model::{Mode, Proto, ServiceSpec},
};

use Counter::*;

/// A client behind the VLAN's router (whose MAC is `CLIENT_MAC` here): in dnat mode the VMs
/// route such clients through the node.
const FAR6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x10, 3, 0, 0, 0, 0x50);
const CLIENT_ROUTER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x10, 1, 0, 0, 0, 0xfd);
/// What Linux quotes in an ICMPv6 error: as much as fits in 1280 bytes.
const LINUX_QUOTE6: usize = 1280 - 40 - 8;

fn dnat6(port: u16, proto: Proto, backends: &[(Ipv6Addr, u16)]) -> ServiceSpec {
    ServiceSpec {
        mode: Mode::Dnat,
        snat: Vec::new(),
        ..svc6(port, proto, backends)
    }
}

fn env_with(flows6: Option<u32>) -> Env {
    let mut e = Env::with_sizes(loader::Sizes {
        flows6,
        ..Default::default()
    })
    .expect("fixture environment (needs root)");
    e.install(&[
        dnat6(80, Proto::Tcp, &[(VM1_6, 8080)]),
        dnat6(53, Proto::Udp, &[(VM1_6, 5353)]),
        // A full-NAT service beside them, on another backend.
        svc6(81, Proto::Tcp, &[(VM2_6, 8080)]),
    ])
    .unwrap();
    e.snapshot().unwrap();
    e
}

fn env() -> Env {
    env_with(None)
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

fn client_syn(sport: u16) -> Packet6 {
    Packet6::tcp((FAR6, sport), (VIP6, 80), TCP_SYN)
}

#[test]
fn dnat6_keeps_the_client_address_both_ways() {
    let mut e = env();
    let (action, out) = e.run(&client_syn(41000).macs(CLIENT_MAC, NODE_MAC).build());
    assert_eq!(action, XDP_TX);
    let want = forwarded(
        Packet6::tcp((FAR6, 41000), (VM1_6, 8080), TCP_SYN),
        NODE_MAC,
        VM1_MAC,
    );
    assert_bytes(&out, &want);
    verify_checksums6(&out).unwrap();
    e.expect_counters(&[(FlowNew, 1), (TxSameIface, 1)]);

    // The VM answers the client's own address, through the node (its route to the client).
    let reply = Packet6::tcp((VM1_6, 8080), (FAR6, 41000), TCP_SYN | TCP_ACK);
    let (action, out) = e.run(&reply.macs(VM1_MAC, NODE_MAC).build());
    assert_eq!(action, XDP_TX);
    let want = forwarded(
        Packet6::tcp((VIP6, 80), (FAR6, 41000), TCP_SYN | TCP_ACK),
        NODE_MAC,
        CLIENT_MAC,
    );
    assert_bytes(&out, &want);
    verify_checksums6(&out).unwrap();
    e.expect_counters(&[(ReplyHit, 1), (TxSameIface, 1)]);

    let (action, out) = e.run(
        &Packet6::tcp((FAR6, 41000), (VIP6, 80), TCP_ACK)
            .macs(CLIENT_MAC, NODE_MAC)
            .build(),
    );
    assert_eq!(action, XDP_TX);
    assert_eq!(tuple(&out), (FAR6, 41000, VM1_6, 8080));
    e.expect_counters(&[(FlowHit, 1), (TxSameIface, 1)]);
}

/// A reply no flow here knows (a connection made through the node that owned the VIP before):
/// its source names the service, so it is translated and left to the kernel to route.
#[test]
fn a_dnat6_reply_without_a_flow_is_translated_and_routed_by_the_kernel() {
    let mut e = env();
    let reply = Packet6::tcp((VM1_6, 8080), (FAR6, 41001), TCP_ACK).payload(b"response");
    let (action, out) = e.run(&reply.macs(VM1_MAC, NODE_MAC).build());
    assert_eq!(action, XDP_PASS);
    let want = forwarded(
        Packet6::tcp((VIP6, 80), (FAR6, 41001), TCP_ACK).payload(b"response"),
        VM1_MAC,
        NODE_MAC,
    );
    assert_bytes(&out, &want);
    verify_checksums6(&out).unwrap();
    e.expect_counters(&[(PassDnatStateless, 1)]);
}

/// The client's side of such a connection: not a SYN, no flow. A full-NAT service drops it; a
/// dnat service sends it to the backend Maglev picks, creating nothing.
#[test]
fn a_dnat6_client_packet_without_a_flow_goes_on_without_state() {
    let mut e = env();
    let ack = Packet6::tcp((FAR6, 41002), (VIP6, 80), TCP_ACK).payload(b"request");
    let (action, out) = e.run(&ack.macs(CLIENT_MAC, NODE_MAC).build());
    assert_eq!(action, XDP_TX);
    let want = forwarded(
        Packet6::tcp((FAR6, 41002), (VM1_6, 8080), TCP_ACK).payload(b"request"),
        NODE_MAC,
        VM1_MAC,
    );
    assert_bytes(&out, &want);
    verify_checksums6(&out).unwrap();
    e.expect_counters(&[(DnatStateless, 1), (TxSameIface, 1)]);
    let key = FlowKey6 {
        src_addr: addr6(FAR6.octets()),
        dst_addr: addr6(VIP6.octets()),
        src_port: 41002u16.to_be(),
        dst_port: 80u16.to_be(),
        proto: 6,
        _pad0: 0,
        _pad1: 0,
    };
    assert!(
        e.maps.v6.index.find(&e.maps.v6.slots, &key).is_none(),
        "no flow was created"
    );

    // The full-NAT service on port 81, same situation.
    let ack81 = Packet6::tcp((FAR6, 41002), (VIP6, 81), TCP_ACK);
    let (action, _) = e.run(&ack81.macs(CLIENT_MAC, NODE_MAC).build());
    assert_eq!(action, XDP_DROP);
    e.expect_counters(&[(DropTcpNoFlow, 1)]);
}

/// A dnat flow cannot choose another tuple when its slot is held: it takes one of the next
/// `DNAT_PROBES` slots, and its replies look there too.
#[test]
fn a_dnat6_flow_takes_the_next_slot_when_its_own_is_held() {
    let mut e = env_with(Some(16));
    let slots = e.maps.v6.slots.len() as u32;
    let slot = |sport: u16| {
        let (b, f) = (addr6(VM1_6.octets()), addr6(FAR6.octets()));
        tuple_slot6(&b, &f, 8080u16.to_be(), sport.to_be(), 6, slots)
    };
    // Two client ports whose reply tuples share a slot.
    let first = 42000u16;
    let second = (first + 1..first + 2000)
        .find(|&p| slot(p) == slot(first))
        .expect("a colliding port among 2000");
    for sport in [first, second] {
        let (action, _) = e.run(&client_syn(sport).macs(CLIENT_MAC, NODE_MAC).build());
        assert_eq!(action, XDP_TX, "SYN from port {sport}");
    }
    e.expect_counters(&[(FlowNew, 2), (TxSameIface, 2), (SnatPortCollision, 1)]);
    for sport in [first, second] {
        let reply = Packet6::tcp((VM1_6, 8080), (FAR6, sport), TCP_SYN | TCP_ACK);
        let (action, out) = e.run(&reply.macs(VM1_MAC, NODE_MAC).build());
        assert_eq!(action, XDP_TX, "reply to port {sport}");
        let want = forwarded(
            Packet6::tcp((VIP6, 80), (FAR6, sport), TCP_SYN | TCP_ACK),
            NODE_MAC,
            CLIENT_MAC,
        );
        assert_bytes(&out, &want);
    }
    e.expect_counters(&[(ReplyHit, 2), (TxSameIface, 2)]);
}

/// The full-NAT service beside the dnat ones is unchanged: SNAT towards its backend, replies to
/// the SNAT address translated back.
#[test]
fn full_nat_ipv6_services_work_beside_dnat_ones() {
    let mut e = env();
    let (action, out) = e.run(
        &Packet6::tcp((FAR6, 41005), (VIP6, 81), TCP_SYN)
            .macs(CLIENT_MAC, NODE_MAC)
            .build(),
    );
    assert_eq!(action, XDP_TX);
    let (src, port, dst, _) = tuple(&out);
    assert_eq!((src, dst), (SNAT6, VM2_6));
    let reply = Packet6::tcp((VM2_6, 8080), (SNAT6, port), TCP_SYN | TCP_ACK);
    let (action, out) = e.run(&reply.macs(VM2_MAC, NODE_MAC).build());
    assert_eq!(action, XDP_TX);
    let want = forwarded(
        Packet6::tcp((VIP6, 81), (FAR6, 41005), TCP_SYN | TCP_ACK),
        NODE_MAC,
        CLIENT_MAC,
    );
    assert_bytes(&out, &want);
    e.expect_counters(&[(FlowNew, 1), (ReplyHit, 1), (TxSameIface, 2)]);
}

/// Path-MTU discovery through a dnat flow: a router on the client's side cannot pass a large
/// reply (VIP -> client); the VM gets the packet-too-big quoting what it sent (VM -> client).
#[test]
fn dnat6_packet_too_big_from_the_client_side_reaches_the_backend() {
    let mut e = env();
    let (action, _) = e.run(&client_syn(41003).macs(CLIENT_MAC, NODE_MAC).build());
    assert_eq!(action, XDP_TX);
    e.snapshot().unwrap();
    let big: Vec<u8> = (0..1400u32).map(|i| (i * 7) as u8).collect();
    let sent = Packet6::tcp((VIP6, 80), (FAR6, 41003), TCP_ACK).payload(&big);
    let err = Packet6::packet_too_big(CLIENT_ROUTER6, VIP6, 1280, &sent, LINUX_QUOTE6)
        .macs(CLIENT_MAC, NODE_MAC);
    let (action, out) = e.run(&err.build());
    assert_eq!(action, XDP_TX);
    let want = forwarded(
        Packet6::packet_too_big(
            CLIENT_ROUTER6,
            VM1_6,
            1280,
            &Packet6::tcp((VM1_6, 8080), (FAR6, 41003), TCP_ACK).payload(&big),
            LINUX_QUOTE6,
        ),
        NODE_MAC,
        VM1_MAC,
    );
    assert_bytes(&out, &want);
    verify_checksums6(&out).unwrap();
    e.expect_counters(&[(IcmpErrorTranslated, 1), (TxSameIface, 1)]);
}

/// The VM's own port unreachable for a dnat UDP flow, sent to the client's address: the client
/// gets it from the VIP, quoting what it sent (client -> VIP).
#[test]
fn dnat6_port_unreachable_from_the_backend_comes_from_the_vip() {
    let mut e = env();
    let query = |dst: (Ipv6Addr, u16)| Packet6::udp((FAR6, 41004), dst).payload(b"query");
    let (action, _) = e.run(&query((VIP6, 53)).macs(CLIENT_MAC, NODE_MAC).build());
    assert_eq!(action, XDP_TX);
    e.snapshot().unwrap();
    let err = Packet6::icmp_error(
        VM1_6,
        FAR6,
        1,
        4,
        [0; 4],
        &query((VM1_6, 5353)),
        LINUX_QUOTE6,
    )
    .macs(VM1_MAC, NODE_MAC);
    let (action, out) = e.run(&err.build());
    assert_eq!(action, XDP_TX);
    let want = forwarded(
        Packet6::icmp_error(VIP6, FAR6, 1, 4, [0; 4], &query((VIP6, 53)), LINUX_QUOTE6),
        NODE_MAC,
        CLIENT_MAC,
    );
    assert_bytes(&out, &want);
    verify_checksums6(&out).unwrap();
    e.expect_counters(&[(IcmpErrorTranslated, 1), (TxSameIface, 1)]);
}

/// Removing the dnat services removes their endpoints, and the lookup is off again: a VM's
/// packet to a far address is the node's to route, untouched.
#[test]
fn removing_dnat6_services_turns_the_reply_lookup_off() {
    let mut e = env();
    assert_eq!(e.maps.v6.config().unwrap().dnat_endpoints, 2);
    assert_eq!(
        e.maps.config().unwrap().dnat_endpoints,
        0,
        "IPv4's untouched"
    );
    e.install(&[svc6(81, Proto::Tcp, &[(VM2_6, 8080)])])
        .unwrap();
    assert_eq!(e.maps.v6.config().unwrap().dnat_endpoints, 0);
    assert_eq!(e.maps.v6.dnat_endpoints.keys().count(), 0);
    let reply = Packet6::tcp((VM1_6, 8080), (FAR6, 41006), TCP_ACK).macs(VM1_MAC, NODE_MAC);
    let frame = reply.build();
    let (action, out) = e.run(&frame);
    assert_eq!(action, XDP_PASS);
    assert_bytes(&out, &frame);
    e.expect_counters(&[(PassNotVip, 1)]);
}

/// An IPv4 and an IPv6 dnat service on the same node keep their endpoints apart.
#[test]
fn ipv4_and_ipv6_dnat_endpoints_are_counted_apart() {
    let mut e = env();
    let mut v4 = svc(80, Proto::Tcp, &[be(VM1, 8080)]);
    v4.mode = Mode::Dnat;
    v4.snat = Vec::new();
    let mut all = e.services.clone();
    all.push(v4);
    e.install(&all).unwrap();
    assert_eq!(e.maps.config().unwrap().dnat_endpoints, 1);
    assert_eq!(e.maps.v6.config().unwrap().dnat_endpoints, 2);
}
