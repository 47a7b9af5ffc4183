//! `GarpSender` on one end of a veth between two namespaces the test creates, captured on the
//! other end with an AF_PACKET socket: bytes, count and spacing of the schedule, cancellation on
//! withdraw, and the 802.1Q tag on a trunk. Frames only ever leave on the test's own veth.
//! Needs root.

use std::{
    net::Ipv4Addr,
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
use vmlb_tests::netns::{veth, Netns};
use vmlb_user::garp::{GarpSender, GarpSocket, VlanId};

const SENDER_MAC: [u8; 6] = [2, 0, 0, 0, 2, 0x0a];
const VIP1: Ipv4Addr = Ipv4Addr::new(10, 10, 1, 128);
const VIP2: Ipv4Addr = Ipv4Addr::new(10, 10, 1, 129);
const VIP3: Ipv4Addr = Ipv4Addr::new(10, 10, 1, 130);

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

struct Frame {
    at: Instant,
    bytes: Vec<u8>,
}

impl Frame {
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

    /// Reads for at most one timeout; keeps ARP frames of our interface.
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
                    if ours && frame.arp_vip().is_some() {
                        self.frames.push(frame);
                    }
                }
                Err(Errno::EAGAIN | Errno::EINTR) => return,
                Err(e) => panic!("capture: {e}"),
            }
        }
    }

    fn of(&self, vip: Ipv4Addr) -> Vec<&Frame> {
        self.frames
            .iter()
            .filter(|f| f.arp_vip() == Some(vip))
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
    assert_eq!(sender.pending(), vec![VIP3]);
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
}
