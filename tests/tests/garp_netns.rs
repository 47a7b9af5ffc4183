//! `GarpSender` on one end of a veth between two namespaces the test creates, captured on the
//! other end with an AF_PACKET socket: bytes, count and spacing of the schedule, cancellation on
//! withdraw, and the 802.1Q tag on a trunk; for an IPv6 VIP, unsolicited neighbour
//! advertisements on the same schedule, which the observer's kernel takes to update its
//! neighbour entry for the VIP. Frames only ever leave on the test's own veth. Needs root.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use nix::{
    errno::Errno,
    sys::{
        socket::{
            recvfrom, setsockopt, socket, sockopt, AddressFamily, LinkAddr, SockFlag, SockProtocol,
            SockType,
        },
        time::TimeVal,
    },
};
use vmlb_tests::{
    netns::{veth, Netns},
    packet6::verify_checksums6,
};
use vmlb_user::garp::{GarpSender, GarpSocket, VlanId};

const SENDER_MAC: [u8; 6] = [2, 0, 0, 0, 2, 0x0a];
const VIP1: Ipv4Addr = Ipv4Addr::new(10, 10, 1, 128);
const VIP2: Ipv4Addr = Ipv4Addr::new(10, 10, 1, 129);
const VIP3: Ipv4Addr = Ipv4Addr::new(10, 10, 1, 130);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x10, 1, 0, 0, 0, 0x128);
/// The MAC the observer held for the VIP before the takeover (another node's).
const OLD_MAC: [u8; 6] = [2, 0, 0, 0, 2, 0x99];

/// The default schedule's shape (0, 1, 2, 4 s) at a fifth of the time, to keep the test short.
const SCHEDULE: [Duration; 4] = [
    Duration::ZERO,
    Duration::from_millis(200),
    Duration::from_millis(400),
    Duration::from_millis(800),
];

/// The expected frame, written out here independently of `garp_frame`.
fn expected(vip: Ipv4Addr, vlan: Option<u16>) -> Vec<u8> {
    let ip = vip.octets();
    let mut f = vec![0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
    f.extend_from_slice(&SENDER_MAC);
    if let Some(id) = vlan {
        f.extend_from_slice(&[0x81, 0x00, (id >> 8) as u8, id as u8]);
    }
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&SENDER_MAC);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&[0; 18]);
    f
}

/// The expected unsolicited NA, written out here independently of `unsolicited_na_frame` (the
/// checksum is checked separately, recomputed by `verify_checksums6`).
fn expected_na(vip: Ipv6Addr, vlan: Option<u16>, checksum: [u8; 2]) -> Vec<u8> {
    let mut f = vec![0x33, 0x33, 0, 0, 0, 1];
    f.extend_from_slice(&SENDER_MAC);
    if let Some(id) = vlan {
        f.extend_from_slice(&[0x81, 0x00, (id >> 8) as u8, id as u8]);
    }
    f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0, 0, 32, 58, 255]);
    f.extend_from_slice(&vip.octets());
    f.extend_from_slice(&Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1).octets());
    f.extend_from_slice(&[136, 0, checksum[0], checksum[1], 0x20, 0, 0, 0]);
    f.extend_from_slice(&vip.octets());
    f.extend_from_slice(&[2, 1]);
    f.extend_from_slice(&SENDER_MAC);
    f
}

struct Frame {
    at: Instant,
    bytes: Vec<u8>,
}

impl Frame {
    /// The announced VIP: an ARP frame's target IP, or a neighbour advertisement's target.
    fn vip(&self) -> Option<IpAddr> {
        self.arp_vip()
            .map(IpAddr::V4)
            .or_else(|| self.na_target().map(IpAddr::V6))
    }

    /// The ICMPv6 message's offset, for frames with or without one VLAN tag.
    fn icmp6(&self) -> Option<usize> {
        let b = &self.bytes;
        let l3 = match b.get(12..14)? {
            [0x86, 0xdd] => 14,
            [0x81, 0x00] if b.get(16..18)? == [0x86, 0xdd] => 18,
            _ => return None,
        };
        (*b.get(l3 + 6)? == 58).then_some(l3 + 40)
    }

    /// The target of a neighbour advertisement (type 136).
    fn na_target(&self) -> Option<Ipv6Addr> {
        let o = self.icmp6()?;
        if *self.bytes.get(o)? != 136 {
            return None;
        }
        let t: [u8; 16] = self.bytes.get(o + 8..o + 24)?.try_into().ok()?;
        Some(Ipv6Addr::from(t))
    }

    /// The ICMPv6 checksum field as sent.
    fn icmp6_checksum(&self) -> [u8; 2] {
        let o = self.icmp6().expect("an ICMPv6 frame");
        [self.bytes[o + 2], self.bytes[o + 3]]
    }

    /// The ARP target IP, for frames with or without one VLAN tag.
    fn arp_vip(&self) -> Option<Ipv4Addr> {
        let b = &self.bytes;
        let l3 = match b.get(12..14)? {
            [0x08, 0x06] => 14,
            [0x81, 0x00] if b.get(16..18)? == [0x08, 0x06] => 18,
            _ => return None,
        };
        let t: [u8; 4] = b.get(l3 + 24..l3 + 28)?.try_into().ok()?;
        Some(Ipv4Addr::from(t))
    }
}

/// Every frame seen on one interface (both directions), read with a short timeout per call.
struct Capture {
    fd: OwnedFd,
    ifindex: u32,
    frames: Vec<Frame>,
}

impl Capture {
    fn open(ns: &Netns, dev: &str) -> Self {
        let _in = ns.enter().expect("entering the namespace");
        let ifindex = nix::net::if_::if_nametoindex(dev).expect("capture interface");
        let fd = socket(
            AddressFamily::Packet,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::EthAll,
        )
        .expect("AF_PACKET capture socket");
        setsockopt(&fd, sockopt::ReceiveTimeout, &TimeVal::new(0, 20_000)).unwrap();
        Self {
            fd,
            ifindex,
            frames: Vec::new(),
        }
    }

    /// Reads for at most one timeout; keeps ARP frames and neighbour advertisements of our
    /// interface.
    fn poll(&mut self) {
        let mut buf = [0u8; 2048];
        loop {
            match recvfrom::<LinkAddr>(self.fd.as_raw_fd(), &mut buf) {
                Ok((n, from)) => {
                    let frame = Frame {
                        at: Instant::now(),
                        bytes: buf[..n].to_vec(),
                    };
                    let ours = from.is_some_and(|a| a.ifindex() == self.ifindex as usize);
                    if ours && frame.vip().is_some() {
                        self.frames.push(frame);
                    }
                }
                Err(Errno::EAGAIN | Errno::EINTR) => return,
                Err(e) => panic!("capture: {e}"),
            }
        }
    }

    fn of(&self, vip: impl Into<IpAddr>) -> Vec<&Frame> {
        let vip = vip.into();
        self.frames
            .iter()
            .filter(|f| f.vip() == Some(vip))
            .collect()
    }

    /// Captures until `done` holds, failing after `within`.
    fn until(&mut self, within: Duration, what: &str, mut done: impl FnMut(&Self) -> bool) {
        let deadline = Instant::now() + within;
        while !done(self) {
            assert!(Instant::now() < deadline, "{what} not within {within:?}");
            self.poll();
        }
    }
}

struct Pair {
    sender: Netns,
    receiver: Netns,
}

fn pair() -> Pair {
    vmlb_tests::netns::sweep_stale();
    let sender = Netns::new("garp-tx").expect("sender namespace");
    let receiver = Netns::new("garp-rx").expect("receiver namespace");
    let mac = vmlb_user::neigh::format_mac(&SENDER_MAC);
    veth(&sender, "ga", &mac, &receiver, "gb", "02:00:00:00:02:0b").expect("veth pair");
    Pair { sender, receiver }
}

fn garp_socket(ns: &Netns) -> GarpSocket {
    let _in = ns.enter().expect("entering the sender namespace");
    GarpSocket::open("ga").expect("packet socket on the sender's veth")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_time()
        .build()
        .unwrap()
}

/// Waits until the sender has nothing left to send.
fn await_idle(sender: &GarpSender) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !sender.pending().is_empty() {
        assert!(
            Instant::now() < deadline,
            "still pending: {:?}",
            sender.pending()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn announces_on_schedule_byte_exact_and_withdraw_cancels() {
    let p = pair();
    let mut rx = Capture::open(&p.receiver, "gb");
    let rt = runtime();
    let _rt = rt.enter();
    let socket = garp_socket(&p.sender);
    assert_eq!(socket.mac().unwrap(), SENDER_MAC);
    let mut sender = GarpSender::with_schedule(socket, None, &SCHEDULE);

    sender.announce(VIP1);
    rx.until(Duration::from_secs(5), "4 frames for VIP1", |c| {
        c.of(VIP1).len() >= SCHEDULE.len()
    });
    await_idle(&sender);
    rx.poll();
    let frames = rx.of(VIP1);
    assert_eq!(frames.len(), SCHEDULE.len(), "exactly the schedule's count");
    for f in &frames {
        assert_eq!(f.bytes, expected(VIP1, None));
    }
    // Spacing as scheduled (generous upper bound: two CPUs shared with builds).
    for (f, offset) in frames.iter().zip(SCHEDULE) {
        let since_first = f.at - frames[0].at;
        assert!(
            since_first + Duration::from_millis(30) >= offset
                && since_first < offset + Duration::from_millis(500),
            "frame at {since_first:?}, scheduled at {offset:?}"
        );
    }
    assert_eq!((sender.sent_total(), sender.failed_total()), (4, 0));

    // VIP2 is given up right after its first frame; VIP3's full schedule marks the time by which
    // VIP2's later frames would have left.
    sender.announce(VIP2);
    sender.announce(VIP3);
    rx.until(Duration::from_secs(5), "VIP2's first frame", |c| {
        !c.of(VIP2).is_empty()
    });
    sender.withdraw(VIP2);
    assert_eq!(sender.pending(), vec![IpAddr::V4(VIP3)]);
    rx.until(Duration::from_secs(5), "VIP3's 4 frames", |c| {
        c.of(VIP3).len() >= SCHEDULE.len()
    });
    await_idle(&sender);
    rx.poll();
    assert_eq!(rx.of(VIP2).len(), 1, "withdraw cancels the pending frames");
    assert_eq!(rx.of(VIP3).len(), SCHEDULE.len());
}

#[test]
fn trunk_frames_carry_the_vlan_tag() {
    let p = pair();
    let mut rx = Capture::open(&p.receiver, "gb");
    // The sender's own veth shows the frame exactly as it left, tag inline.
    let mut tx = Capture::open(&p.sender, "ga");
    let rt = runtime();
    let _rt = rt.enter();
    let vlan = VlanId::new(1512).unwrap();
    let mut sender = GarpSender::with_schedule(garp_socket(&p.sender), Some(vlan), &SCHEDULE[..2]);

    sender.announce(VIP1);
    tx.until(Duration::from_secs(5), "2 frames leaving", |c| {
        c.of(VIP1).len() >= 2
    });
    rx.until(Duration::from_secs(5), "2 frames arriving", |c| {
        c.of(VIP1).len() >= 2
    });
    for f in tx.of(VIP1) {
        assert_eq!(f.bytes, expected(VIP1, Some(1512)));
        assert_eq!(f.bytes.len(), 64);
    }
    // The receiving kernel parsed the 802.1Q header and moved the tag into the packet's metadata
    // (as it does for every tagged frame), so the frame reads untagged there.
    for f in rx.of(VIP1) {
        assert_eq!(f.bytes, expected(VIP1, None));
    }

    // An IPv6 VIP's advertisements carry the same tag; the checksum does not cover it.
    sender.announce(VIP6);
    tx.until(Duration::from_secs(5), "2 NAs leaving", |c| {
        c.of(VIP6).len() >= 2
    });
    for f in tx.of(VIP6) {
        assert_eq!(f.bytes, expected_na(VIP6, Some(1512), f.icmp6_checksum()));
        let mut untagged = f.bytes.clone();
        untagged.drain(12..16);
        verify_checksums6(&untagged).expect("ICMPv6 checksum");
    }
}

/// The observer's neighbour entry for `vip` on `dev`: (lladdr, state) as `ip -6 neigh` prints.
fn neigh6(ns: &Netns, dev: &str, vip: Ipv6Addr) -> Option<(String, String)> {
    let out = ns
        .ip(&["-6", "neigh", "show", &vip.to_string(), "dev", dev])
        .expect("ip -6 neigh show");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let words: Vec<&str> = text.split_whitespace().collect();
    let mac = words.iter().position(|w| *w == "lladdr")?;
    Some((words.get(mac + 1)?.to_string(), words.last()?.to_string()))
}

#[test]
fn ipv6_vips_are_announced_with_unsolicited_advertisements_the_observer_accepts() {
    let p = pair();
    // The observer is an IPv6 host on the VIP's link that had reached the VIP through another
    // node: its entry holds that node's MAC.
    p.receiver
        .ip(&["addr", "add", "fd00:10:10:1::50/64", "dev", "gb", "nodad"])
        .unwrap();
    p.receiver
        .ip(&[
            "-6",
            "neigh",
            "replace",
            &VIP6.to_string(),
            "lladdr",
            &vmlb_user::neigh::format_mac(&OLD_MAC),
            "dev",
            "gb",
            "nud",
            "stale",
        ])
        .unwrap();
    assert_eq!(
        neigh6(&p.receiver, "gb", VIP6).map(|e| e.0),
        Some(vmlb_user::neigh::format_mac(&OLD_MAC))
    );
    let mut rx = Capture::open(&p.receiver, "gb");
    let rt = runtime();
    let _rt = rt.enter();
    let mut sender = GarpSender::with_schedule(garp_socket(&p.sender), None, &SCHEDULE);

    sender.announce(VIP6);
    rx.until(Duration::from_secs(5), "4 NAs for the IPv6 VIP", |c| {
        c.of(VIP6).len() >= SCHEDULE.len()
    });
    await_idle(&sender);
    rx.poll();
    let frames = rx.of(VIP6);
    assert_eq!(frames.len(), SCHEDULE.len(), "the schedule's count");
    for f in &frames {
        assert_eq!(f.bytes, expected_na(VIP6, None, f.icmp6_checksum()));
        verify_checksums6(&f.bytes).expect("ICMPv6 checksum");
    }
    assert!(rx.of(VIP1).is_empty(), "no ARP for an IPv6 VIP");
    assert_eq!((sender.sent_total(), sender.failed_total()), (4, 0));

    // The observer's kernel accepted them (hop limit 255, valid checksum, override): its entry
    // for the VIP now names this node.
    let want = vmlb_user::neigh::format_mac(&SENDER_MAC);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let entry = neigh6(&p.receiver, "gb", VIP6);
        if entry.as_ref().is_some_and(|e| e.0 == want) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the observer's entry for {VIP6} is {entry:?}, want {want}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
