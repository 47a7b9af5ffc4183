//! Packet fixtures: each case builds an input packet, sets the maps up through the reconciler,
//! runs the real program with BPF_PROG_TEST_RUN and checks the action, the output bytes (with
//! every checksum recomputed from scratch) and exactly which counters moved.
//!
//! Needs root (BPF, network namespaces); part of the normal test run.

use std::net::Ipv4Addr;

use rand::{Rng, SeedableRng};
use vmlb_common::{flow_state, hash, Counter, Flow};
use vmlb_tests::{
    fixture::*,
    packet::{diff, verify_checksums, Packet, L4, TCP_ACK, TCP_PSH, TCP_SYN},
};
use vmlb_user::model::Proto;

use Counter::*;

fn env() -> Env {
    Env::new().expect("fixture environment (needs root)")
}

/// The client's packet to VIP:80 as it arrives at the node.
fn client_tcp(sport: u16, flags: u8) -> Packet {
    Packet::tcp((CLIENT, sport), (VIP, 80), flags).macs(CLIENT_MAC, NODE_MAC)
}

#[track_caller]
fn assert_packet(got: &[u8], want: &[u8]) {
    assert!(
        got == want,
        "output differs from expected:\n{}",
        diff(got, want)
    );
    verify_checksums(got).expect("output checksums");
}

/// One backend VM1:8080 behind VIP:80/tcp.
fn one_backend_env() -> Env {
    let mut e = env();
    e.install(&[svc(80, Proto::Tcp, &[be(VM1, 8080)])]).unwrap();
    e
}

/// Send the client's SYN and check the DNAT+SNAT result; returns the SNAT port.
fn open_flow(e: &mut Env, sport: u16) -> u16 {
    let key = flow_key((CLIENT, sport), (VIP, 80), Proto::Tcp);
    let (baddr, bport, snat_port) = e.predict(&e.services[0].clone(), &key);
    let bmac = if baddr == VM1 {
        VM1_MAC
    } else if baddr == VM2 {
        VM2_MAC
    } else {
        VM3_MAC
    };
    let input = client_tcp(sport, TCP_SYN).build();
    let (action, out) = e.run(&input);
    assert_eq!(action, XDP_TX);
    let want = client_tcp(sport, TCP_SYN)
        .macs(NODE_MAC, bmac)
        .with_tuple((SNAT, snat_port), (baddr, bport))
        .build();
    assert_packet(&out, &want);
    e.expect_counters(&[(FlowNew, 1), (TxSameIface, 1)]);
    snat_port
}

#[test]
fn tcp_syn_new_flow_is_dnated_and_snated() {
    let mut e = one_backend_env();
    let port = open_flow(&mut e, 40000);
    assert!((vmlb_common::SNAT_PORT_MIN..=vmlb_common::SNAT_PORT_MAX).contains(&port));
    let s = e.maps.service_stats(1).unwrap();
    assert_eq!((s.packets, s.new_flows), (1, 1));
}

#[test]
fn tcp_established_keeps_backend_and_snat_port() {
    let mut e = one_backend_env();
    let port = open_flow(&mut e, 40001);
    for _ in 0..3 {
        let input = client_tcp(40001, TCP_ACK | TCP_PSH).payload(b"GET / HTTP/1.0\r\n\r\n");
        let (action, out) = e.run(&input.build());
        assert_eq!(action, XDP_TX);
        let want = input
            .clone()
            .macs(NODE_MAC, VM1_MAC)
            .with_tuple((SNAT, port), (VM1, 8080))
            .build();
        assert_packet(&out, &want);
        e.expect_counters(&[(FlowHit, 1), (TxSameIface, 1)]);
    }
}

#[test]
fn backend_reply_is_reverse_nated_to_the_client() {
    let mut e = one_backend_env();
    let port = open_flow(&mut e, 40002);
    let reply = Packet::tcp((VM1, 8080), (SNAT, port), TCP_SYN | TCP_ACK)
        .macs(VM1_MAC, NODE_MAC)
        .payload(b"odd");
    let (action, out) = e.run(&reply.build());
    assert_eq!(action, XDP_TX);
    let want = reply
        .clone()
        .macs(NODE_MAC, CLIENT_MAC)
        .with_tuple((VIP, 80), (CLIENT, 40002))
        .build();
    assert_packet(&out, &want);
    e.expect_counters(&[(ReplyHit, 1), (TxSameIface, 1)]);
    let b = e.maps.backend_stats(1).unwrap();
    assert_eq!((b.packets, b.reply_packets), (2, 1));
}

#[test]
fn udp_flow_and_reply() {
    let mut e = env();
    e.install(&[svc(53, Proto::Udp, &[be(VM2, 5353)])]).unwrap();
    let key = flow_key((CLIENT, 33333), (VIP, 53), Proto::Udp);
    let port = snat_port(&key, 0);
    let q = Packet::udp((CLIENT, 33333), (VIP, 53))
        .macs(CLIENT_MAC, NODE_MAC)
        .payload(b"query");
    let (action, out) = e.run(&q.build());
    assert_eq!(action, XDP_TX);
    let want = q
        .clone()
        .macs(NODE_MAC, VM2_MAC)
        .with_tuple((SNAT, port), (VM2, 5353));
    assert_packet(&out, &want.build());
    e.expect_counters(&[(FlowNew, 1), (TxSameIface, 1)]);

    let r = Packet::udp((VM2, 5353), (SNAT, port))
        .macs(VM2_MAC, NODE_MAC)
        .payload(b"answer!");
    let (action, out) = e.run(&r.build());
    assert_eq!(action, XDP_TX);
    let want = r
        .clone()
        .macs(NODE_MAC, CLIENT_MAC)
        .with_tuple((VIP, 53), (CLIENT, 33333));
    assert_packet(&out, &want.build());
    e.expect_counters(&[(ReplyHit, 1), (TxSameIface, 1)]);
}

#[test]
fn udp_without_checksum_stays_without() {
    let mut e = env();
    e.install(&[svc(53, Proto::Udp, &[be(VM2, 53)])]).unwrap();
    let key = flow_key((CLIENT, 33334), (VIP, 53), Proto::Udp);
    let port = snat_port(&key, 0);
    let mut q = Packet::udp((CLIENT, 33334), (VIP, 53))
        .macs(CLIENT_MAC, NODE_MAC)
        .payload(b"q");
    q.l4 = L4::Udp {
        sport: 33334,
        dport: 53,
        no_checksum: true,
    };
    let (action, out) = e.run(&q.build());
    assert_eq!(action, XDP_TX);
    let want = q
        .clone()
        .macs(NODE_MAC, VM2_MAC)
        .with_tuple((SNAT, port), (VM2, 53))
        .build();
    assert_packet(&out, &want);
    assert_eq!(
        &out[14 + 20 + 6..14 + 20 + 8],
        &[0, 0],
        "UDP checksum must stay 0"
    );
    e.expect_counters(&[(FlowNew, 1), (TxSameIface, 1)]);
}

#[test]
fn non_vip_traffic_passes_untouched() {
    let mut e = one_backend_env();
    for dst in [
        Ipv4Addr::new(10, 10, 1, 77),
        SNAT,
        Ipv4Addr::new(192, 0, 2, 1),
    ] {
        let input = Packet::tcp((CLIENT, 40010), (dst, 22), TCP_SYN)
            .macs(CLIENT_MAC, NODE_MAC)
            .build();
        let (action, out) = e.run(&input);
        assert_eq!((action, out), (XDP_PASS, input));
        // The node's own traffic to its SNAT address is told apart by the slot lookup.
        let c = if dst == SNAT {
            PassReplyNoFlow
        } else {
            PassNotVip
        };
        e.expect_counters(&[(c, 1)]);
    }
}

#[test]
fn reply_for_unknown_flow_passes_untouched() {
    let mut e = one_backend_env();
    let input = Packet::tcp((VM1, 8080), (SNAT, 5555), TCP_ACK)
        .macs(VM1_MAC, NODE_MAC)
        .build();
    let (action, out) = e.run(&input);
    assert_eq!((action, out), (XDP_PASS, input));
    e.expect_counters(&[(PassReplyNoFlow, 1)]);
}

#[test]
fn vip_on_unknown_port_is_dropped() {
    let mut e = one_backend_env();
    let (action, _) = e.run(
        &Packet::tcp((CLIENT, 40020), (VIP, 81), TCP_SYN)
            .macs(CLIENT_MAC, NODE_MAC)
            .build(),
    );
    assert_eq!(action, XDP_DROP);
    e.expect_counters(&[(DropUnknownPort, 1)]);
}

#[test]
fn vip_with_other_protocol_on_served_port_is_dropped() {
    let mut e = one_backend_env();
    let (action, _) = e.run(
        &Packet::udp((CLIENT, 40021), (VIP, 80))
            .macs(CLIENT_MAC, NODE_MAC)
            .build(),
    );
    assert_eq!(action, XDP_DROP);
    e.expect_counters(&[(DropUnknownPort, 1)]);
}

/// ICMP other than echo requests and errors (here a timestamp request) is not vmlb's.
#[test]
fn other_icmp_to_vip_passes() {
    let mut e = one_backend_env();
    let input = Packet::new(CLIENT, VIP, L4::Raw(1))
        .macs(CLIENT_MAC, NODE_MAC)
        .payload(&[13, 0, 0xf2, 0xfe, 0, 1, 0, 1])
        .build();
    let (action, out) = e.run(&input);
    assert_eq!((action, out), (XDP_PASS, input));
    e.expect_counters(&[(PassUnsupportedProto, 1)]);
}

#[test]
fn service_without_backends_drops_and_counts() {
    let mut e = env();
    e.install(&[svc(80, Proto::Tcp, &[])]).unwrap();
    let (action, _) = e.run(&client_tcp(40030, TCP_SYN).build());
    assert_eq!(action, XDP_DROP);
    e.expect_counters(&[(DropNoBackend, 1)]);
}

#[test]
fn service_whose_backends_all_have_weight_zero_drops() {
    let mut e = env();
    let mut b = be(VM1, 80);
    b.weight = 0;
    e.install(&[svc(80, Proto::Tcp, &[b])]).unwrap();
    let (action, _) = e.run(&client_tcp(40031, TCP_SYN).build());
    assert_eq!(action, XDP_DROP);
    e.expect_counters(&[(DropNoBackend, 1)]);
}

#[test]
fn non_vip_arp_ipv6_and_other_ethertypes_pass_untouched() {
    let mut e = one_backend_env();
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&CLIENT_MAC);
    arp.extend_from_slice(&[0x08, 0x06]);
    arp.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&[0; 20]);
    let v6 = vmlb_tests::packet6::Packet6::tcp((CLIENT6, 1), (VM2_6, 80), TCP_SYN)
        .macs(CLIENT_MAC, NODE_MAC)
        .build();
    let mut lldp = Packet::tcp((CLIENT, 1), (VIP, 80), TCP_SYN).build();
    lldp[12..14].copy_from_slice(&[0x88, 0xcc]);
    // (An ARP request for 0.0.0.0, not a VIP: fixtures_l2.rs covers ARP for VIPs, and
    // fixtures_v6.rs IPv6 for VIPs.)
    for (input, c) in [(arp, PassArp), (v6, PassNotVip), (lldp, PassNotIpv4)] {
        let (action, out) = e.run(&input);
        assert_eq!((action, out), (XDP_PASS, input));
        e.expect_counters(&[(c, 1)]);
    }
}

#[test]
fn truncated_at_every_header_boundary_never_aborts() {
    let mut e = one_backend_env();
    let full = client_tcp(40040, TCP_SYN).build();
    let other = Packet::tcp((CLIENT, 40040), (Ipv4Addr::new(10, 10, 1, 77), 80), TCP_SYN).build();
    // At Ethernet's end, inside IPv4, at IPv4's end, inside TCP, one byte short. (Frames shorter
    // than an Ethernet header cannot be run: BPF_PROG_TEST_RUN rejects them with EINVAL.)
    for len in [14, 20, 33, 34, 40, 53] {
        let (action, out) = e.run(&full[..len]);
        let want = if len < 34 {
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
    // Whole packet still works.
    let (action, _) = e.run(&full);
    assert_eq!(action, XDP_TX);
}

#[test]
fn udp_header_cut_short_is_dropped() {
    let mut e = env();
    e.install(&[svc(53, Proto::Udp, &[be(VM2, 53)])]).unwrap();
    let full = Packet::udp((CLIENT, 1000), (VIP, 53)).build();
    let mut cut = full[..14 + 20 + 4].to_vec();
    // A consistent IPv4 header that claims only 4 bytes of UDP.
    cut[16..18].copy_from_slice(&24u16.to_be_bytes());
    let (action, _) = e.run(&cut);
    assert_eq!(action, XDP_DROP);
    e.expect_counters(&[(DropTruncated, 1)]);
}

#[test]
fn ipv4_options_are_kept_and_nat_still_applies() {
    let mut e = one_backend_env();
    let key = flow_key((CLIENT, 40050), (VIP, 80), Proto::Tcp);
    let port = snat_port(&key, 0);
    let mut input = client_tcp(40050, TCP_SYN).payload(b"x");
    // Router alert (4 bytes), then NOP padding to 8.
    input.options = vec![0x94, 0x04, 0x00, 0x00, 0x01, 0x01, 0x01, 0x00];
    let (action, out) = e.run(&input.build());
    assert_eq!(action, XDP_TX);
    let want = input
        .clone()
        .macs(NODE_MAC, VM1_MAC)
        .with_tuple((SNAT, port), (VM1, 8080));
    assert_packet(&out, &want.build());
    e.expect_counters(&[(FlowNew, 1), (TxSameIface, 1)]);
}

#[test]
fn ethernet_padding_is_kept() {
    let mut e = one_backend_env();
    let key = flow_key((CLIENT, 40051), (VIP, 80), Proto::Tcp);
    let port = snat_port(&key, 0);
    let mut input = client_tcp(40051, TCP_SYN).build();
    input.extend_from_slice(&[0xaa; 6]);
    let (action, out) = e.run(&input);
    assert_eq!(action, XDP_TX);
    let mut want = client_tcp(40051, TCP_SYN)
        .macs(NODE_MAC, VM1_MAC)
        .with_tuple((SNAT, port), (VM1, 8080))
        .build();
    want.extend_from_slice(&[0xaa; 6]);
    assert_eq!(out, want, "{}", diff(&out, &want));
    verify_checksums(&out).expect("output checksums");
    e.expect_counters(&[(FlowNew, 1), (TxSameIface, 1)]);
}

#[test]
fn fragments_to_a_vip_are_dropped() {
    let mut e = one_backend_env();
    for frag in [
        0x2000u16, /* first, MF */
        0x0010,    /* last, offset 128 */
        0x2020,
    ] {
        let mut p = client_tcp(40060, TCP_ACK);
        p.frag = frag;
        let (action, _) = e.run(&p.build());
        assert_eq!(action, XDP_DROP, "fragment {frag:#06x}");
        e.expect_counters(&[(DropFragment, 1)]);
    }
    assert!(e.maps.live_flows().is_empty(), "no state from fragments");
}

#[test]
fn fragments_not_to_a_vip_pass() {
    let mut e = one_backend_env();
    let mut p = Packet::tcp((CLIENT, 40061), (SNAT, 22), TCP_ACK);
    p.frag = 0x2000;
    let input = p.build();
    let (action, out) = e.run(&input);
    assert_eq!((action, out), (XDP_PASS, input));
    e.expect_counters(&[(PassNotVip, 1)]);
}

#[test]
fn bad_ipv4_header_to_vip_is_dropped() {
    let mut e = one_backend_env();
    let good = client_tcp(40070, TCP_SYN).build();
    let mut ihl4 = good.clone();
    ihl4[14] = 0x44;
    let mut v6in4 = good.clone();
    v6in4[14] = 0x65;
    let mut short_total = good.clone();
    short_total[16..18].copy_from_slice(&10u16.to_be_bytes());
    for bad in [ihl4, v6in4, short_total] {
        let (action, _) = e.run(&bad);
        assert_eq!(action, XDP_DROP);
        e.expect_counters(&[(DropBadHeader, 1)]);
    }
}

/// Hold the SNAT tuple `SNAT:port` towards VM1:8080 with a live flow of another client, in
/// the slot the data path would claim for it.
fn occupy(e: &mut Env, port: u16) {
    let idx = hash::tuple_slot(
        u32::from_ne_bytes(VM1.octets()),
        u32::from_ne_bytes(SNAT.octets()),
        8080u16.to_be(),
        port.to_be(),
        6,
        e.maps.slots.len() as u32,
    );
    e.maps.slots.set(
        idx as usize,
        &Flow {
            ctl: flow_state::ESTABLISHED as u64,
            backend_addr: u32::from_ne_bytes(VM1.octets()),
            snat_addr: u32::from_ne_bytes(SNAT.octets()),
            backend_port: 8080u16.to_be(),
            snat_port: port.to_be(),
            proto: 6,
            client_addr: u32::from_ne_bytes([192, 0, 2, 99]),
            client_port: 999u16.to_be(),
            vip_addr: u32::from_ne_bytes(VIP.octets()),
            vip_port: 80u16.to_be(),
            ..Default::default()
        },
    );
}

#[test]
fn snat_port_collision_takes_the_next_port() {
    let mut e = one_backend_env();
    let key = flow_key((CLIENT, 40080), (VIP, 80), Proto::Tcp);
    occupy(&mut e, snat_port(&key, 0));
    let next = snat_port(&key, 1);
    let (action, out) = e.run(&client_tcp(40080, TCP_SYN).build());
    assert_eq!(action, XDP_TX);
    let want = client_tcp(40080, TCP_SYN)
        .macs(NODE_MAC, VM1_MAC)
        .with_tuple((SNAT, next), (VM1, 8080));
    assert_packet(&out, &want.build());
    e.expect_counters(&[(SnatPortCollision, 1), (FlowNew, 1), (TxSameIface, 1)]);
}

/// A client that reuses its 5-tuple gets the same hashed candidates each time: once all eight
/// are held, random ones are tried.
#[test]
fn held_hashed_candidates_fall_back_to_random_ones() {
    let mut e = one_backend_env();
    let key = flow_key((CLIENT, 40082), (VIP, 80), Proto::Tcp);
    let hashed: Vec<u16> = (0..vmlb_common::SNAT_RETRIES)
        .map(|a| snat_port(&key, a))
        .collect();
    for &p in &hashed {
        occupy(&mut e, p);
    }
    let (action, out) = e.run(&client_tcp(40082, TCP_SYN).build());
    assert_eq!(action, XDP_TX);
    let port = u16::from_be_bytes([out[34], out[35]]);
    assert!(
        !hashed.contains(&port),
        "a held tuple was given out: {port}"
    );
    let mut d = e.delta();
    // Each random try also collides with probability 8/31741.
    let collisions = d.remove(&SnatPortCollision).unwrap_or(0);
    assert!((8..16).contains(&collisions), "{collisions} collisions");
    assert_eq!(d, [(FlowNew, 1), (TxSameIface, 1)].into_iter().collect());
}

#[test]
fn snat_ports_exhausted_drops_without_state() {
    // Seven SNAT ports (1024-1030), all held: every hashed and random candidate collides.
    let mut e = env();
    let mut spec = svc(80, Proto::Tcp, &[be(VM1, 8080)]);
    spec.snat_ports = (1024, 1030);
    e.install(&[spec]).unwrap();
    for port in 1024..=1030 {
        occupy(&mut e, port);
    }
    let before = e.maps.live_flows().len();
    let records = Records::default();
    let mut logger = aya_log::EbpfLogger::init_with_logger(&mut e.ebpf, records.clone())
        .expect("the program carries aya-log records");
    let (action, _) = e.run(&client_tcp(40081, TCP_SYN).build());
    assert_eq!(action, XDP_DROP);
    e.expect_counters(&[
        (
            SnatPortCollision,
            (vmlb_common::SNAT_RETRIES + vmlb_common::SNAT_RANDOM_RETRIES) as u64,
        ),
        (DropSnatExhausted, 1),
    ]);
    assert_eq!(e.maps.live_flows().len(), before);
    // The drop is also reported as a log record (the daemon forwards these to tracing).
    logger.flush();
    let got = records.0.lock().unwrap().clone();
    let want = format!("new flow dropped: counter {}", DropSnatExhausted as u32);
    assert!(
        got.iter().any(|r| r.contains(&want)),
        "log records: {got:?}"
    );
}

/// Collects aya-log records.
#[derive(Clone, Default)]
struct Records(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl log::Log for Records {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        self.0.lock().unwrap().push(record.args().to_string());
    }
    fn flush(&self) {}
}

/// Two backends; returns the env and a client port whose flow went to VM1.
fn two_backends_flow_on_vm1() -> (Env, u16) {
    let mut e = env();
    e.install(&[svc(80, Proto::Tcp, &[be(VM1, 80), be(VM2, 80)])])
        .unwrap();
    let spec = e.services[0].clone();
    let sport = (41000..42000)
        .find(|&p| {
            e.predict(&spec, &flow_key((CLIENT, p), (VIP, 80), Proto::Tcp))
                .0
                == VM1
        })
        .expect("some flow maps to VM1");
    open_flow(&mut e, sport);
    (e, sport)
}

#[test]
fn flow_of_a_down_backend_is_rebalanced() {
    let (mut e, sport) = two_backends_flow_on_vm1();
    let mut spec = e.services[0].clone();
    spec.backends[0].up = false;
    e.install(&[spec]).unwrap();
    let key = flow_key((CLIENT, sport), (VIP, 80), Proto::Tcp);
    let port = snat_port(&key, 0);
    let input = client_tcp(sport, TCP_ACK);
    let (action, out) = e.run(&input.build());
    assert_eq!(action, XDP_TX);
    let want = input
        .clone()
        .macs(NODE_MAC, VM2_MAC)
        .with_tuple((SNAT, port), (VM2, 80));
    assert_packet(&out, &want.build());
    e.expect_counters(&[(FlowRebalanced, 1), (FlowNew, 1), (TxSameIface, 1)]);
    // And it stays there.
    let (_, out2) = e.run(&input.build());
    assert_packet(&out2, &want.build());
    e.expect_counters(&[(FlowHit, 1), (TxSameIface, 1)]);
}

#[test]
fn draining_backend_keeps_its_flows_but_gets_no_new_ones() {
    let (mut e, sport) = two_backends_flow_on_vm1();
    let mut spec = e.services[0].clone();
    spec.backends[0].weight = 0;
    e.install(&[spec]).unwrap();
    let input = client_tcp(sport, TCP_ACK);
    let (action, out) = e.run(&input.build());
    assert_eq!(action, XDP_TX);
    assert_eq!(
        &out[30..34],
        &VM1.octets(),
        "existing flow stays on the draining backend"
    );
    e.expect_counters(&[(FlowHit, 1), (TxSameIface, 1)]);
    for p in 43000..43050 {
        let (_, out) = e.run(&client_tcp(p, TCP_SYN).build());
        assert_eq!(
            &out[30..34],
            &VM2.octets(),
            "new flow {p} must avoid the draining backend"
        );
    }
}

#[test]
fn removed_backend_flows_move_to_the_remaining_one() {
    let (mut e, sport) = two_backends_flow_on_vm1();
    let mut spec = e.services[0].clone();
    spec.backends.remove(0);
    e.install(&[spec]).unwrap();
    let (_, out) = e.run(&client_tcp(sport, TCP_ACK).build());
    assert_eq!(&out[30..34], &VM2.octets());
    e.expect_counters(&[(FlowRebalanced, 1), (FlowNew, 1), (TxSameIface, 1)]);
}

#[test]
fn adding_a_backend_keeps_established_flows() {
    let (mut e, sport) = two_backends_flow_on_vm1();
    let mut spec = e.services[0].clone();
    spec.backends.push(be(VM3, 80));
    e.install(std::slice::from_ref(&spec)).unwrap();
    let (_, out) = e.run(&client_tcp(sport, TCP_ACK).build());
    assert_eq!(&out[30..34], &VM1.octets());
    e.expect_counters(&[(FlowHit, 1), (TxSameIface, 1)]);
    // New flows follow the new table, as user space predicts.
    let mut to_vm3 = 0;
    for p in 44000..44100 {
        let want = e
            .predict(&spec, &flow_key((CLIENT, p), (VIP, 80), Proto::Tcp))
            .0;
        let (_, out) = e.run(&client_tcp(p, TCP_SYN).build());
        assert_eq!(&out[30..34], &want.octets());
        to_vm3 += usize::from(want == VM3);
    }
    assert!(to_vm3 > 10, "the new backend gets new flows ({to_vm3}/100)");
}

#[test]
fn unresolved_neighbour_passes_without_state() {
    let mut e = env();
    e.install(&[svc(80, Proto::Tcp, &[be(NO_NEIGH, 80)])])
        .unwrap();
    let input = client_tcp(40090, TCP_SYN).build();
    let (action, out) = e.run(&input);
    assert_eq!((action, out), (XDP_PASS, input));
    e.expect_counters(&[(PassNoNeigh, 1)]);
    assert!(e.maps.live_flows().is_empty());
}

#[test]
fn unroutable_backend_passes_without_state() {
    let mut e = env();
    e.install(&[svc(80, Proto::Tcp, &[be(Ipv4Addr::new(192, 0, 2, 10), 80)])])
        .unwrap();
    let input = client_tcp(40091, TCP_SYN).build();
    let (action, out) = e.run(&input);
    assert_eq!((action, out), (XDP_PASS, input));
    e.expect_counters(&[(PassFibFailed, 1)]);
    assert!(e.maps.live_flows().is_empty());
}

#[test]
fn backend_on_another_interface_is_redirected_and_replies_come_back() {
    let mut e = env();
    e.install(&[svc(80, Proto::Tcp, &[be(REMOTE, 80)])])
        .unwrap();
    let key = flow_key((CLIENT, 40095), (VIP, 80), Proto::Tcp);
    let port = snat_port(&key, 0);
    let (action, out) = e.run(&client_tcp(40095, TCP_SYN).build());
    assert_eq!(action, XDP_REDIRECT);
    let want = client_tcp(40095, TCP_SYN)
        .macs(NODE2_MAC, REMOTE_MAC)
        .with_tuple((SNAT, port), (REMOTE, 80));
    assert_packet(&out, &want.build());
    e.expect_counters(&[(FlowNew, 1), (TxRedirect, 1)]);
    // The reply arrives on fx2 and goes back out of fx0 to the client.
    let reply =
        Packet::tcp((REMOTE, 80), (SNAT, port), TCP_SYN | TCP_ACK).macs(REMOTE_MAC, NODE2_MAC);
    let (action, out) = e.run_on(e.ifindex2, &reply.build());
    assert_eq!(action, XDP_REDIRECT);
    let want = reply
        .clone()
        .macs(NODE_MAC, CLIENT_MAC)
        .with_tuple((VIP, 80), (CLIENT, 40095));
    assert_packet(&out, &want.build());
    e.expect_counters(&[(ReplyHit, 1), (TxRedirect, 1)]);
}

#[test]
fn services_on_one_vip_are_independent() {
    let mut e = env();
    e.install(&[
        svc(80, Proto::Tcp, &[be(VM1, 80)]),
        svc(443, Proto::Tcp, &[be(VM2, 443)]),
    ])
    .unwrap();
    let (_, out) = e.run(&client_tcp(40100, TCP_SYN).build());
    assert_eq!(&out[30..34], &VM1.octets());
    let tls = Packet::tcp((CLIENT, 40100), (VIP, 443), TCP_SYN).macs(CLIENT_MAC, NODE_MAC);
    let (_, out) = e.run(&tls.build());
    assert_eq!(&out[30..34], &VM2.octets());
    assert_eq!(&out[36..38], &443u16.to_be_bytes());
    e.expect_counters(&[(FlowNew, 2), (TxSameIface, 2)]);
}

#[test]
fn removing_a_service_stops_balancing_its_vip() {
    let mut e = one_backend_env();
    e.install(&[]).unwrap();
    let input = client_tcp(40110, TCP_SYN).build();
    let (action, out) = e.run(&input);
    assert_eq!((action, out), (XDP_PASS, input), "VIP no longer ours");
    e.expect_counters(&[(PassNotVip, 1)]);
}

#[test]
fn many_flows_spread_over_three_backends() {
    let mut e = env();
    e.install(&[svc(
        80,
        Proto::Tcp,
        &[be(VM1, 80), be(VM2, 80), be(VM3, 80)],
    )])
    .unwrap();
    let mut counts = [0u32; 3];
    for p in 0..3000u16 {
        let (action, out) = e.run(&client_tcp(20000 + p, TCP_SYN).build());
        assert_eq!(action, XDP_TX);
        counts[(out[33] - 2) as usize] += 1;
    }
    for c in counts {
        assert!((800..1200).contains(&c), "uneven spread {counts:?}");
    }
    // ~1000 flows per backend over 31744 SNAT ports: a few first candidates collide (birthday
    // problem) and take the next port; none may run out.
    let mut d = e.delta();
    let collisions = d.remove(&SnatPortCollision).unwrap_or(0);
    assert!(collisions < 150, "{collisions} SNAT collisions");
    assert_eq!(
        d,
        [(FlowNew, 3000), (TxSameIface, 3000)].into_iter().collect()
    );
}

/// For 10,000 random flows the program's backend and SNAT port equal what user space computes
/// with its own Maglev table and the shared hash.
#[test]
fn kernel_and_user_space_agree_on_10000_random_flows() {
    let mut e = env();
    let backends: Vec<_> = [VM1, VM2, VM3]
        .iter()
        .flat_map(|&a| [be(a, 80), be(a, 8080)])
        .collect();
    e.install(&[svc(80, Proto::Tcp, &backends)]).unwrap();
    let spec = e.services[0].clone();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x766d6c62);
    for i in 0..10_000 {
        // Any unicast source that is not a martian (1.0.0.0 .. 223.255.255.255, not 127/8).
        let mut client = Ipv4Addr::from(rng.gen_range(0x0100_0000u32..0xe000_0000));
        if client.octets()[0] == 127 {
            client = Ipv4Addr::from(u32::from(client) ^ 0x0100_0000);
        }
        let sport: u16 = rng.gen_range(1024..=65535);
        let input = Packet::tcp((client, sport), (VIP, 80), TCP_SYN).macs(CLIENT_MAC, NODE_MAC);
        let (action, out) = e.run(&input.build());
        assert_eq!(action, XDP_TX, "flow {i}");
        let key = flow_key((client, sport), (VIP, 80), Proto::Tcp);
        let (addr, port, _) = e.predict(&spec, &key);
        assert_eq!(&out[30..34], &addr.octets(), "flow {i}: backend address");
        assert_eq!(&out[36..38], &port.to_be_bytes(), "flow {i}: backend port");
        let snat_port = u16::from_be_bytes([out[34], out[35]]);
        assert!(
            (0..vmlb_common::SNAT_RETRIES)
                .any(|a| vmlb_tests::fixture::snat_port(&key, a) == snat_port),
            "flow {i}: SNAT port {snat_port} is not one of the flow's candidates"
        );
    }
    let d = e.delta();
    assert_eq!(d.get(&FlowNew), Some(&10_000));
}
