//! ICMP fixtures (BPF_PROG_TEST_RUN): echo requests to VIPs answered in XDP (rate-limited),
//! and ICMP errors quoting a NATed flow translated in both directions, byte for byte against
//! what the other side must see, with every checksum recomputed from scratch; quotes cut short
//! are never followed.
//!
//! Needs root (BPF, network namespaces); part of the normal test run.

use std::net::Ipv4Addr;

use vmlb_common::Counter;
use vmlb_tests::{
    fixture::*,
    packet::{diff, verify_checksums, Packet, TCP_ACK, TCP_SYN},
};
use vmlb_user::model::Proto;

use Counter::*;

/// A router on the backends' side of the VLAN, and one on the clients' side.
const ROUTER: Ipv4Addr = Ipv4Addr::new(10, 10, 1, 254);
const CLIENT_ROUTER: Ipv4Addr = Ipv4Addr::new(10, 10, 1, 253);
const ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];
/// What Linux quotes: as much as fits in 576 bytes.
const LINUX_QUOTE: usize = 576 - 20 - 8;

fn env() -> Env {
    let mut e = Env::new().expect("fixture environment (needs root)");
    e.install(&[
        svc(80, Proto::Tcp, &[be(VM1, 8080)]),
        svc(53, Proto::Udp, &[be(VM1, 5353)]),
    ])
    .unwrap();
    e
}

#[track_caller]
fn assert_bytes(got: &[u8], want: &[u8]) {
    assert!(got == want, "output differs:\n{}", diff(got, want));
}

/// Open a flow from the client and return the SNAT port the program chose.
fn open(e: &mut Env, sport: u16, dport: u16, proto: Proto) -> u16 {
    let p = match proto {
        Proto::Tcp => Packet::tcp((CLIENT, sport), (VIP, dport), TCP_SYN),
        Proto::Udp => Packet::udp((CLIENT, sport), (VIP, dport)),
    };
    let (action, out) = e.run(&p.macs(CLIENT_MAC, NODE_MAC).build());
    assert_eq!(action, XDP_TX, "flow opened");
    e.snapshot().unwrap();
    u16::from_be_bytes([out[34], out[35]])
}

/// A large data packet of a NATed TCP flow as one side sent it (DF set, 1400 bytes of data).
fn data(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Packet {
    let payload: Vec<u8> = (0..1400u32).map(|i| (i * 7) as u8).collect();
    Packet::tcp(src, dst, TCP_ACK).payload(&payload)
}

#[test]
fn icmp_echo_to_a_vip_is_answered() {
    let mut e = env();
    let req = Packet::ping(CLIENT, VIP, 0x4242, 7, b"vmlb ping payload")
        .macs(CLIENT_MAC, NODE_MAC)
        .build();
    let (action, out) = e.run(&req);
    assert_eq!(action, XDP_TX);
    let mut want = Packet::icmp(VIP, CLIENT, 0, 0, [0x42, 0x42, 0, 7])
        .payload(b"vmlb ping payload")
        .macs(NODE_MAC, CLIENT_MAC);
    want.ttl = 64;
    assert_bytes(&out, &want.build());
    verify_checksums(&out).unwrap();
    e.expect_counters(&[(TxIcmpEchoReply, 1)]);
}

/// Not answered: echo to a non-VIP (the node's own address: the kernel's), to a VIP in a
/// broadcast frame, and from a martian source (a reflection attempt).
#[test]
fn icmp_echo_that_is_not_ours_is_not_answered() {
    let mut e = env();
    let cases = [
        (
            "to the node's address",
            Packet::ping(CLIENT, SNAT, 1, 1, b"x").macs(CLIENT_MAC, NODE_MAC),
            XDP_PASS,
            PassNotVip,
        ),
        (
            "broadcast frame",
            Packet::ping(CLIENT, VIP, 1, 1, b"x").macs(CLIENT_MAC, [0xff; 6]),
            XDP_PASS,
            PassOtherMac,
        ),
        (
            "martian source",
            Packet::ping(Ipv4Addr::new(127, 0, 0, 1), VIP, 1, 1, b"x").macs(CLIENT_MAC, NODE_MAC),
            XDP_DROP,
            DropIcmpEcho,
        ),
    ];
    for (what, p, want_action, counter) in cases {
        let input = p.build();
        let (action, out) = e.run(&input);
        assert_eq!(action, want_action, "{what}");
        if action == XDP_PASS {
            assert_eq!(out, input, "{what}: passed untouched");
        }
        e.expect_counters(&[(counter, 1)]);
    }
}

/// Echo answers are rate-limited per CPU: with a burst of 2 and 1/s, the third request in a
/// row is dropped. The test pins itself to one CPU, since the bucket is per CPU.
#[test]
fn icmp_echo_is_rate_limited() {
    let mut cpus = nix::sched::CpuSet::new();
    let cpu = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))
        .ok()
        .and_then(|set| (0..nix::sched::CpuSet::count()).find(|&c| set.is_set(c).unwrap_or(false)))
        .expect("some CPU");
    cpus.set(cpu).unwrap();
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &cpus).unwrap();
    let mut e = env();
    e.maps
        .update_config(|c| {
            c.icmp_echo_rate = 1;
            c.icmp_echo_burst = 2;
        })
        .unwrap();
    let req = Packet::ping(CLIENT, VIP, 9, 1, b"x")
        .macs(CLIENT_MAC, NODE_MAC)
        .build();
    let actions: Vec<u32> = (0..3).map(|_| e.run(&req).0).collect();
    assert_eq!(actions, [XDP_TX, XDP_TX, XDP_DROP]);
    e.expect_counters(&[(TxIcmpEchoReply, 2), (DropIcmpEcho, 1)]);
}

/// Fragmentation needed from a router on the backend's side, about a large packet of the
/// client's that vmlb NATed: the client gets it with the quote it would recognise (its own
/// 5-tuple, client -> VIP:80), every checksum correct, from the router's address.
#[test]
fn icmp_frag_needed_from_the_backend_side_reaches_the_client() {
    let mut e = env();
    let port = open(&mut e, 41000, 80, Proto::Tcp);
    let sent = data((SNAT, port), (VM1, 8080));
    let err =
        Packet::frag_needed(ROUTER, SNAT, 1280, &sent, LINUX_QUOTE).macs(ROUTER_MAC, NODE_MAC);
    let (action, out) = e.run(&err.build());
    assert_eq!(action, XDP_TX);
    let mut want = Packet::frag_needed(
        ROUTER,
        CLIENT,
        1280,
        &data((CLIENT, 41000), (VIP, 80)),
        LINUX_QUOTE,
    )
    .macs(NODE_MAC, CLIENT_MAC);
    want.ttl = 63;
    assert_bytes(&out, &want.build());
    verify_checksums(&out).unwrap();
    e.expect_counters(&[(IcmpErrorTranslated, 1), (TxSameIface, 1)]);
}

/// The same from the client's side: a router there cannot pass a large reply (VIP -> client);
/// the backend gets the error about the packet it sent (backend -> SNAT address), so that its
/// path MTU towards the SNAT address drops.
#[test]
fn icmp_frag_needed_from_the_client_side_reaches_the_backend() {
    let mut e = env();
    let port = open(&mut e, 41001, 80, Proto::Tcp);
    let sent = data((VIP, 80), (CLIENT, 41001));
    let err = Packet::frag_needed(CLIENT_ROUTER, VIP, 1280, &sent, LINUX_QUOTE)
        .macs(CLIENT_MAC, NODE_MAC);
    let (action, out) = e.run(&err.build());
    assert_eq!(action, XDP_TX);
    let mut want = Packet::frag_needed(
        CLIENT_ROUTER,
        VM1,
        1280,
        &data((VM1, 8080), (SNAT, port)),
        LINUX_QUOTE,
    )
    .macs(NODE_MAC, VM1_MAC);
    want.ttl = 63;
    assert_bytes(&out, &want.build());
    verify_checksums(&out).unwrap();
    e.expect_counters(&[(IcmpErrorTranslated, 1), (TxSameIface, 1)]);
}

/// An error the far endpoint sends itself (the VM's port unreachable for a UDP flow) reaches
/// the client from the VIP, the address the client knows, with the quoted UDP checksum fixed.
#[test]
fn icmp_port_unreachable_from_the_backend_comes_from_the_vip() {
    let mut e = env();
    let port = open(&mut e, 41002, 53, Proto::Udp);
    let sent = Packet::udp((SNAT, port), (VM1, 5353)).payload(b"query");
    let err =
        Packet::icmp_error(VM1, SNAT, 3, 3, [0; 4], &sent, LINUX_QUOTE).macs(VM1_MAC, NODE_MAC);
    let (action, out) = e.run(&err.build());
    assert_eq!(action, XDP_TX);
    let mut want = Packet::icmp_error(
        VIP,
        CLIENT,
        3,
        3,
        [0; 4],
        &Packet::udp((CLIENT, 41002), (VIP, 53)).payload(b"query"),
        LINUX_QUOTE,
    )
    .macs(NODE_MAC, CLIENT_MAC);
    want.ttl = 63;
    assert_bytes(&out, &want.build());
    verify_checksums(&out).unwrap();
    e.expect_counters(&[(IcmpErrorTranslated, 1), (TxSameIface, 1)]);
}

/// Time exceeded is translated like the unreachables.
#[test]
fn icmp_time_exceeded_is_translated() {
    let mut e = env();
    let port = open(&mut e, 41003, 80, Proto::Tcp);
    let mut sent = Packet::tcp((SNAT, port), (VM1, 8080), TCP_SYN);
    sent.ttl = 1;
    let err = Packet::icmp_error(ROUTER, SNAT, 11, 0, [0; 4], &sent, LINUX_QUOTE)
        .macs(ROUTER_MAC, NODE_MAC);
    let (action, out) = e.run(&err.build());
    assert_eq!(action, XDP_TX);
    let mut about = Packet::tcp((CLIENT, 41003), (VIP, 80), TCP_SYN);
    about.ttl = 1;
    let mut want = Packet::icmp_error(ROUTER, CLIENT, 11, 0, [0; 4], &about, LINUX_QUOTE)
        .macs(NODE_MAC, CLIENT_MAC);
    want.ttl = 63;
    assert_bytes(&out, &want.build());
    e.expect_counters(&[(IcmpErrorTranslated, 1), (TxSameIface, 1)]);
}

/// RFC 792's minimum quote (IPv4 header + 8 bytes) holds the ports but not TCP's checksum:
/// translated all the same, the ICMP checksum still right.
#[test]
fn icmp_minimal_quote_is_translated() {
    let mut e = env();
    let port = open(&mut e, 41004, 80, Proto::Tcp);
    let sent = data((SNAT, port), (VM1, 8080));
    let err = Packet::frag_needed(ROUTER, SNAT, 1280, &sent, 28).macs(ROUTER_MAC, NODE_MAC);
    let (action, out) = e.run(&err.build());
    assert_eq!(action, XDP_TX);
    let mut want = Packet::frag_needed(ROUTER, CLIENT, 1280, &data((CLIENT, 41004), (VIP, 80)), 28)
        .macs(NODE_MAC, CLIENT_MAC);
    want.ttl = 63;
    assert_bytes(&out, &want.build());
    verify_checksums(&out).unwrap();
    e.expect_counters(&[(IcmpErrorTranslated, 1), (TxSameIface, 1)]);
}

/// Quotes too short to name a flow are never followed: to a VIP they are dropped, to the SNAT
/// address (also the node's own) they go to the kernel untouched. Ethernet padding after a
/// short quote must not be read as ports.
#[test]
fn icmp_truncated_quotes_are_not_followed() {
    let mut e = env();
    let port = open(&mut e, 41005, 80, Proto::Tcp);
    let to_backend = data((SNAT, port), (VM1, 8080));
    let to_client = data((VIP, 80), (CLIENT, 41005));
    for quote in [0, 12, 20, 22] {
        let input = Packet::frag_needed(CLIENT_ROUTER, VIP, 1280, &to_client, quote)
            .macs(CLIENT_MAC, NODE_MAC)
            .build();
        let (action, _) = e.run(&input);
        assert_eq!(action, XDP_DROP, "quote of {quote} bytes to the VIP");
        e.expect_counters(&[(DropIcmpError, 1)]);

        let input = Packet::frag_needed(ROUTER, SNAT, 1280, &to_backend, quote)
            .macs(ROUTER_MAC, NODE_MAC)
            .build();
        let (action, out) = e.run(&input);
        assert_eq!((action, out), (XDP_PASS, input), "quote of {quote} to SNAT");
        e.expect_counters(&[(PassReplyNoFlow, 1)]);
    }
    // The quote's ports lie in the frame's padding, beyond the IPv4 total length.
    let mut input = Packet::frag_needed(ROUTER, SNAT, 1280, &to_backend, 20)
        .macs(ROUTER_MAC, NODE_MAC)
        .build();
    let sent = to_backend.build();
    input.extend_from_slice(&sent[34..42]);
    let (action, out) = e.run(&input);
    assert_eq!((action, out), (XDP_PASS, input), "ports in the padding");
    e.expect_counters(&[(PassReplyNoFlow, 1)]);
}

/// Errors quoting no flow of ours: to a VIP, dropped; to the SNAT address, the kernel's.
#[test]
fn icmp_errors_without_a_flow() {
    let mut e = env();
    let stranger = data((VIP, 80), (CLIENT, 9));
    let input = Packet::frag_needed(CLIENT_ROUTER, VIP, 1280, &stranger, LINUX_QUOTE)
        .macs(CLIENT_MAC, NODE_MAC)
        .build();
    assert_eq!(e.run(&input).0, XDP_DROP);
    e.expect_counters(&[(DropIcmpError, 1)]);
    // The node's own connection to somewhere: not vmlb's.
    let own = data((SNAT, 50000), (ROUTER, 22));
    let input = Packet::frag_needed(ROUTER, SNAT, 1280, &own, LINUX_QUOTE)
        .macs(ROUTER_MAC, NODE_MAC)
        .build();
    let (action, out) = e.run(&input);
    assert_eq!((action, out), (XDP_PASS, input));
    e.expect_counters(&[(PassReplyNoFlow, 1)]);
}
