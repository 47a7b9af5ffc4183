//! dnat-mode fixtures (BPF_PROG_TEST_RUN): only the destination is rewritten, so the backend
//! sees the client's own address; its replies, routed through the node, are recognised by their
//! source and translated back. Without a flow (the VIP moved here) both directions still go on
//! without state. Each case compares whole frames with packets built independently, checks
//! every checksum and the exact counter deltas.
//!
//! Needs root (BPF, network namespaces); part of the normal test run.

use std::net::Ipv4Addr;

use vmlb_common::{hash::tuple_slot, Counter};
use vmlb_tests::{
    fixture::*,
    packet::{diff, verify_checksums, Packet, TCP_ACK, TCP_SYN},
};
use vmlb_user::model::{Mode, Proto, ServiceSpec};

use Counter::*;

/// A client behind the VLAN's router (whose MAC is `CLIENT_MAC` here): in dnat mode the VMs
/// route such clients through the node.
const FAR: Ipv4Addr = Ipv4Addr::new(10, 10, 3, 50);
const CLIENT_ROUTER: Ipv4Addr = Ipv4Addr::new(10, 10, 1, 253);
const LINUX_QUOTE: usize = 576 - 20 - 8;

fn dnat(port: u16, proto: Proto, backends: &[vmlb_user::model::BackendSpec]) -> ServiceSpec {
    ServiceSpec {
        mode: Mode::Dnat,
        snat: Vec::new(),
        ..svc(port, proto, backends)
    }
}

fn env_with(flows: Option<u32>) -> Env {
    let mut e = Env::with_flows(flows).expect("fixture environment (needs root)");
    e.install(&[
        dnat(80, Proto::Tcp, &[be(VM1, 8080)]),
        dnat(53, Proto::Udp, &[be(VM1, 5353)]),
        // A full-NAT service beside them, on another backend.
        svc(81, Proto::Tcp, &[be(VM2, 8080)]),
    ])
    .unwrap();
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
fn forwarded(mut p: Packet, src: [u8; 6], dst: [u8; 6]) -> Vec<u8> {
    p.ttl -= 1;
    p.macs(src, dst).build()
}

fn client_syn(sport: u16) -> Packet {
    Packet::tcp((FAR, sport), (VIP, 80), TCP_SYN)
}

#[test]
fn dnat_keeps_the_client_address_both_ways() {
    let mut e = env();
    let (action, out) = e.run(&client_syn(41000).macs(CLIENT_MAC, NODE_MAC).build());
    assert_eq!(action, XDP_TX);
    let want = forwarded(
        Packet::tcp((FAR, 41000), (VM1, 8080), TCP_SYN),
        NODE_MAC,
        VM1_MAC,
    );
    assert_bytes(&out, &want);
    verify_checksums(&out).unwrap();
    e.expect_counters(&[(FlowNew, 1), (TxSameIface, 1)]);

    // The VM answers the client's own address, through the node (its route to the client).
    let reply = Packet::tcp((VM1, 8080), (FAR, 41000), TCP_SYN | TCP_ACK);
    let (action, out) = e.run(&reply.clone().macs(VM1_MAC, NODE_MAC).build());
    assert_eq!(action, XDP_TX);
    let want = forwarded(
        Packet::tcp((VIP, 80), (FAR, 41000), TCP_SYN | TCP_ACK),
        NODE_MAC,
        CLIENT_MAC,
    );
    assert_bytes(&out, &want);
    verify_checksums(&out).unwrap();
    e.expect_counters(&[(ReplyHit, 1), (TxSameIface, 1)]);

    let (action, _) = e.run(
        &Packet::tcp((FAR, 41000), (VIP, 80), TCP_ACK)
            .macs(CLIENT_MAC, NODE_MAC)
            .build(),
    );
    assert_eq!(action, XDP_TX);
    e.expect_counters(&[(FlowHit, 1), (TxSameIface, 1)]);
}

/// A reply no flow here knows (a connection made through the node that owned the VIP before):
/// its source names the service, so it is translated and left to the kernel to route.
#[test]
fn a_dnat_reply_without_a_flow_is_translated_and_routed_by_the_kernel() {
    let mut e = env();
    let reply = Packet::tcp((VM1, 8080), (FAR, 41001), TCP_ACK).payload(b"response");
    let (action, out) = e.run(&reply.macs(VM1_MAC, NODE_MAC).build());
    assert_eq!(action, XDP_PASS);
    let want = forwarded(
        Packet::tcp((VIP, 80), (FAR, 41001), TCP_ACK).payload(b"response"),
        VM1_MAC,
        NODE_MAC,
    );
    assert_bytes(&out, &want);
    verify_checksums(&out).unwrap();
    e.expect_counters(&[(PassDnatStateless, 1)]);
}

/// The client's side of such a connection: not a SYN, no flow. A full-NAT service drops it
/// (its SNAT tuple is gone with the other node); a dnat service sends it to the backend Maglev
/// picks, creating nothing, so an ACK flood cannot fill the flow table.
#[test]
fn a_dnat_client_packet_without_a_flow_goes_on_without_state() {
    let mut e = env();
    let ack = Packet::tcp((FAR, 41002), (VIP, 80), TCP_ACK).payload(b"request");
    let (action, out) = e.run(&ack.clone().macs(CLIENT_MAC, NODE_MAC).build());
    assert_eq!(action, XDP_TX);
    let want = forwarded(
        Packet::tcp((FAR, 41002), (VM1, 8080), TCP_ACK).payload(b"request"),
        NODE_MAC,
        VM1_MAC,
    );
    assert_bytes(&out, &want);
    e.expect_counters(&[(DnatStateless, 1), (TxSameIface, 1)]);
    let key = flow_key((FAR, 41002), (VIP, 80), Proto::Tcp);
    assert!(
        e.maps.index.find(&e.maps.slots, &key).is_none(),
        "no flow was created"
    );

    // The full-NAT service on port 81, same situation.
    let ack81 = Packet::tcp((FAR, 41002), (VIP, 81), TCP_ACK);
    let (action, _) = e.run(&ack81.macs(CLIENT_MAC, NODE_MAC).build());
    assert_eq!(action, XDP_DROP);
    e.expect_counters(&[(DropTcpNoFlow, 1)]);
}

/// A dnat flow cannot choose another tuple when its slot is held: it takes one of the next
/// `DNAT_PROBES` slots, and its replies look there too.
#[test]
fn a_dnat_flow_takes_the_next_slot_when_its_own_is_held() {
    let mut e = env_with(Some(16));
    let slots = e.maps.slots.len() as u32;
    let slot = |sport: u16| {
        let [b, f] = [VM1, FAR].map(|a| u32::from_ne_bytes(a.octets()));
        tuple_slot(b, f, 8080u16.to_be(), sport.to_be(), 6, slots)
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
        let reply = Packet::tcp((VM1, 8080), (FAR, sport), TCP_SYN | TCP_ACK);
        let (action, out) = e.run(&reply.macs(VM1_MAC, NODE_MAC).build());
        assert_eq!(action, XDP_TX, "reply to port {sport}");
        let want = forwarded(
            Packet::tcp((VIP, 80), (FAR, sport), TCP_SYN | TCP_ACK),
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
fn full_nat_services_work_beside_dnat_ones() {
    let mut e = env();
    let (action, out) = e.run(
        &Packet::tcp((FAR, 41005), (VIP, 81), TCP_SYN)
            .macs(CLIENT_MAC, NODE_MAC)
            .build(),
    );
    assert_eq!(action, XDP_TX);
    let (src, dst) = (
        Ipv4Addr::new(out[26], out[27], out[28], out[29]),
        Ipv4Addr::new(out[30], out[31], out[32], out[33]),
    );
    assert_eq!((src, dst), (SNAT, VM2));
    let port = u16::from_be_bytes([out[34], out[35]]);
    let reply = Packet::tcp((VM2, 8080), (SNAT, port), TCP_SYN | TCP_ACK);
    let (action, out) = e.run(&reply.macs(VM2_MAC, NODE_MAC).build());
    assert_eq!(action, XDP_TX);
    let want = forwarded(
        Packet::tcp((VIP, 81), (FAR, 41005), TCP_SYN | TCP_ACK),
        NODE_MAC,
        CLIENT_MAC,
    );
    assert_bytes(&out, &want);
    e.expect_counters(&[(FlowNew, 1), (ReplyHit, 1), (TxSameIface, 2)]);
}

/// Path-MTU discovery through a dnat flow: a router on the client's side cannot pass a large
/// reply (VIP -> client); the VM gets the error quoting what it sent (VM -> client).
#[test]
fn dnat_frag_needed_from_the_client_side_reaches_the_backend() {
    let mut e = env();
    let (action, _) = e.run(&client_syn(41003).macs(CLIENT_MAC, NODE_MAC).build());
    assert_eq!(action, XDP_TX);
    e.snapshot().unwrap();
    let big: Vec<u8> = (0..1400u32).map(|i| (i * 7) as u8).collect();
    let sent = Packet::tcp((VIP, 80), (FAR, 41003), TCP_ACK).payload(&big);
    let err = Packet::frag_needed(CLIENT_ROUTER, VIP, 1280, &sent, LINUX_QUOTE)
        .macs(CLIENT_MAC, NODE_MAC);
    let (action, out) = e.run(&err.build());
    assert_eq!(action, XDP_TX);
    let want = forwarded(
        Packet::frag_needed(
            CLIENT_ROUTER,
            VM1,
            1280,
            &Packet::tcp((VM1, 8080), (FAR, 41003), TCP_ACK).payload(&big),
            LINUX_QUOTE,
        ),
        NODE_MAC,
        VM1_MAC,
    );
    assert_bytes(&out, &want);
    verify_checksums(&out).unwrap();
    e.expect_counters(&[(IcmpErrorTranslated, 1), (TxSameIface, 1)]);
}

/// The VM's own port unreachable for a dnat UDP flow, sent to the client's address: the client
/// gets it from the VIP, quoting what it sent (client -> VIP).
#[test]
fn dnat_port_unreachable_from_the_backend_comes_from_the_vip() {
    let mut e = env();
    let query = |dst: (Ipv4Addr, u16)| Packet::udp((FAR, 41004), dst).payload(b"query");
    let (action, _) = e.run(&query((VIP, 53)).macs(CLIENT_MAC, NODE_MAC).build());
    assert_eq!(action, XDP_TX);
    e.snapshot().unwrap();
    let err = Packet::icmp_error(VM1, FAR, 3, 3, [0; 4], &query((VM1, 5353)), LINUX_QUOTE)
        .macs(VM1_MAC, NODE_MAC);
    let (action, out) = e.run(&err.build());
    assert_eq!(action, XDP_TX);
    let want = forwarded(
        Packet::icmp_error(VIP, FAR, 3, 3, [0; 4], &query((VIP, 53)), LINUX_QUOTE),
        NODE_MAC,
        CLIENT_MAC,
    );
    assert_bytes(&out, &want);
    verify_checksums(&out).unwrap();
    e.expect_counters(&[(IcmpErrorTranslated, 1), (TxSameIface, 1)]);
}

/// Removing the dnat services removes their endpoints, and the lookup is off again: a VM's
/// packet to a far address is the node's to route, untouched.
#[test]
fn removing_dnat_services_turns_the_reply_lookup_off() {
    let mut e = env();
    assert_eq!(e.maps.config().unwrap().dnat_endpoints, 2);
    e.install(&[svc(81, Proto::Tcp, &[be(VM2, 8080)])]).unwrap();
    assert_eq!(e.maps.config().unwrap().dnat_endpoints, 0);
    assert_eq!(e.maps.dnat_endpoints.keys().count(), 0);
    let reply = Packet::tcp((VM1, 8080), (FAR, 41006), TCP_ACK).macs(VM1_MAC, NODE_MAC);
    let frame = reply.build();
    let (action, out) = e.run(&frame);
    assert_eq!(action, XDP_PASS);
    assert_bytes(&out, &frame);
    e.expect_counters(&[(PassNotVip, 1)]);
}
