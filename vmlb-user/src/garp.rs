//! Gratuitous ARP when this node takes an IPv4 VIP, and its IPv6 counterpart, an unsolicited
//! neighbour advertisement, when it takes an IPv6 VIP: so that hosts and switches on the VLAN
//! move the VIP's traffic to us at once instead of after their neighbour entries expire.
//!
//! Frame: the RFC 5227 "ARP Announcement" form — an ARP *request* with sender IP = target IP =
//! VIP, sender MAC = the interface's MAC, target MAC zero, to the broadcast MAC. The request form
//! is what RFC 5227 (section 3) recommends: every ARP implementation processes broadcast
//! requests and updates an existing cache entry for the sender, while some ignore unsolicited
//! replies. Linux does update existing entries from it regardless of `arp_accept`.
//!
//! IPv6 ([`unsolicited_na_frame`], RFC 4861 7.2.6): a neighbour advertisement to the all-nodes
//! group ff02::1 (MAC 33:33:00:00:00:01) with the override flag set and the solicited flag clear,
//! target = VIP, a target link-layer address option carrying the interface's MAC, hop limit 255
//! (receivers drop neighbour discovery with any other). The source address is the VIP itself, as
//! Linux sends its own unsolicited advertisements (`ndisc_send_unsol_na`): the VIP is the
//! address being announced and needs no other address on the interface. The router flag is
//! clear, as in the data path's answers to solicitations (`vmlb-ebpf/src/ndp.rs`). Like ARP
//! announcements, receivers update an entry they already have (to STALE, with the new MAC) and,
//! by default, create none (Linux: `accept_untracked_na`).
//!
//! Schedule ([`GARP_SCHEDULE`], both families): at once, then 1 s, 2 s and 4 s after taking the VIP. The first
//! frame does the work; the repeats cover a lost frame and peers that were busy resolving at that
//! moment (a switch port still learning, a client mid-retransmission), backing off so a failover
//! of many VIPs stays a handful of frames per VIP. Four frames within ~5 s is about what MetalLB's
//! speaker sends. Giving the VIP up cancels its pending frames.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd as _, OwnedFd},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use nix::{
    errno::Errno,
    libc,
    sys::socket::{
        bind, send, socket, AddressFamily, LinkAddr, MsgFlags, SockFlag, SockType,
        SockaddrLike as _,
    },
};
use tokio::task::JoinHandle;

/// When the frames for a newly taken VIP leave, from the moment it is taken.
pub const GARP_SCHEDULE: [Duration; 4] = [
    Duration::ZERO,
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
];

const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IP: u16 = 0x0800;
const ARPHRD_ETHER: u16 = 1;
const ARPOP_REQUEST: u16 = 1;
/// The ARP body (28 bytes) padded to the 46-byte Ethernet minimum payload. Padding the payload
/// rather than the frame keeps a tagged frame valid after a switch strips its tag.
const MIN_PAYLOAD: usize = 46;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_ICMPV6: u8 = 58;
const ND_NEIGHBOR_ADVERT: u8 = 136;
/// Override (0x20) set; router (0x80) and solicited (0x40) clear: the first byte of the flags.
const NA_FLAGS_UNSOLICITED: u8 = 0x20;
/// Target link-layer address option (RFC 4861 4.6.1), 8 bytes for Ethernet.
const ND_OPT_TARGET_LL_ADDR: u8 = 2;
/// ICMPv6 NA (24 bytes) + the link-layer option (8).
const NA_LEN: u16 = 32;
/// ff02::1, all nodes on the link, and its multicast MAC (RFC 2464 7).
const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
const ALL_NODES_MAC: [u8; 6] = [0x33, 0x33, 0, 0, 0, 1];

/// An 802.1Q VLAN id, 1..=4094 (0 means "priority tag only" and 4095 is reserved).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VlanId(u16);

impl VlanId {
    pub const fn new(id: u16) -> Option<Self> {
        if id >= 1 && id <= 4094 {
            Some(Self(id))
        } else {
            None
        }
    }

    pub const fn get(self) -> u16 {
        self.0
    }
}

/// The gratuitous ARP frame for `vip` from `mac`, 802.1Q-tagged when `vlan` is set (PCP 0, DEI
/// 0). 60 bytes untagged, 64 tagged; the FCS is the NIC's.
pub fn garp_frame(mac: [u8; 6], vip: Ipv4Addr, vlan: Option<VlanId>) -> Vec<u8> {
    let mut f = Vec::with_capacity(64);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac);
    if let Some(v) = vlan {
        f.extend_from_slice(&ETH_P_8021Q.to_be_bytes());
        f.extend_from_slice(&v.get().to_be_bytes());
    }
    f.extend_from_slice(&ETH_P_ARP.to_be_bytes());
    let payload = f.len();
    f.extend_from_slice(&ARPHRD_ETHER.to_be_bytes());
    f.extend_from_slice(&ETH_P_IP.to_be_bytes());
    f.extend_from_slice(&[6, 4]);
    f.extend_from_slice(&ARPOP_REQUEST.to_be_bytes());
    f.extend_from_slice(&mac);
    f.extend_from_slice(&vip.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&vip.octets());
    f.resize(payload + MIN_PAYLOAD, 0);
    f
}

/// The unsolicited neighbour advertisement for the IPv6 `vip` from `mac`, 802.1Q-tagged when
/// `vlan` is set: 86 bytes untagged, 90 tagged (no padding needed); the FCS is the NIC's.
pub fn unsolicited_na_frame(mac: [u8; 6], vip: Ipv6Addr, vlan: Option<VlanId>) -> Vec<u8> {
    let mut f = Vec::with_capacity(90);
    f.extend_from_slice(&ALL_NODES_MAC);
    f.extend_from_slice(&mac);
    if let Some(v) = vlan {
        f.extend_from_slice(&ETH_P_8021Q.to_be_bytes());
        f.extend_from_slice(&v.get().to_be_bytes());
    }
    f.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
    // IPv6 header: version 6, traffic class and flow label 0.
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&NA_LEN.to_be_bytes());
    f.extend_from_slice(&[IPPROTO_ICMPV6, 255]);
    f.extend_from_slice(&vip.octets());
    f.extend_from_slice(&ALL_NODES.octets());
    let icmp = f.len();
    f.extend_from_slice(&[ND_NEIGHBOR_ADVERT, 0, 0, 0]);
    f.extend_from_slice(&[NA_FLAGS_UNSOLICITED, 0, 0, 0]);
    f.extend_from_slice(&vip.octets());
    f.extend_from_slice(&[ND_OPT_TARGET_LL_ADDR, 1]);
    f.extend_from_slice(&mac);
    let sum = icmp6_checksum(vip, ALL_NODES, &f[icmp..]);
    f[icmp + 2..icmp + 4].copy_from_slice(&sum.to_be_bytes());
    f
}

/// The ICMPv6 checksum of `msg` (its checksum field zero) between `src` and `dst` (RFC 8200
/// 8.1: the pseudo-header with the upper-layer length and next header 58).
fn icmp6_checksum(src: Ipv6Addr, dst: Ipv6Addr, msg: &[u8]) -> u16 {
    let words = |b: &[u8]| -> u32 {
        b.chunks(2)
            .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
            .sum()
    };
    let mut sum = words(&src.octets()) + words(&dst.octets()) + words(msg);
    sum += (msg.len() as u32 >> 16) + (msg.len() as u32 & 0xffff) + u32::from(IPPROTO_ICMPV6);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The announcement of `vip` from `mac`: a gratuitous ARP for IPv4, an unsolicited neighbour
/// advertisement for IPv6.
pub fn announcement_frame(mac: [u8; 6], vip: IpAddr, vlan: Option<VlanId>) -> Vec<u8> {
    match vip {
        IpAddr::V4(a) => garp_frame(mac, a, vlan),
        IpAddr::V6(a) => unsolicited_na_frame(mac, a, vlan),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GarpError {
    #[error("interface {0:?} not found")]
    NoInterface(String),
    #[error("{op} on the packet socket for ifindex {ifindex}")]
    Socket {
        op: &'static str,
        ifindex: u32,
        #[source]
        source: nix::Error,
    },
    #[error("interface with ifindex {0} has no Ethernet address")]
    NoMac(u32),
}

/// An AF_PACKET socket bound to one interface, for sending whole Ethernet frames. Bound with
/// protocol 0, so the kernel queues no received frames on it.
#[derive(Debug)]
pub struct GarpSocket {
    fd: OwnedFd,
    ifindex: u32,
}

impl GarpSocket {
    /// Opens the socket on `iface`, looked up in the calling thread's network namespace (the
    /// socket stays in that namespace). Needs CAP_NET_RAW.
    pub fn open(iface: &str) -> Result<Self, GarpError> {
        let ifindex = nix::net::if_::if_nametoindex(iface)
            .map_err(|_| GarpError::NoInterface(iface.into()))?;
        Self::open_index(ifindex)
    }

    pub fn open_index(ifindex: u32) -> Result<Self, GarpError> {
        let err = |op| {
            move |source| GarpError::Socket {
                op,
                ifindex,
                source,
            }
        };
        // Non-blocking: a full device queue must fail a send (counted), not stall the runtime.
        let fd = socket(
            AddressFamily::Packet,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .map_err(err("socket"))?;
        bind(fd.as_raw_fd(), &link_addr(ifindex)).map_err(err("bind"))?;
        Ok(Self { fd, ifindex })
    }

    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// The interface's current MAC (asked for each time: an interface's address can change).
    pub fn mac(&self) -> Result<[u8; 6], GarpError> {
        // Hand-rolled because nix's getsockname insists on a full-size sockaddr_ll, while the
        // kernel returns only as much of it as the address needs (18 bytes for Ethernet).
        let mut sll = sockaddr_ll(0);
        let mut len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: `sll` is a writable sockaddr_ll and `len` its size; the kernel writes at most
        // `len` bytes into it.
        let rc = unsafe { libc::getsockname(self.fd.as_raw_fd(), (&raw mut sll).cast(), &mut len) };
        Errno::result(rc).map_err(|source| GarpError::Socket {
            op: "getsockname",
            ifindex: self.ifindex,
            source,
        })?;
        match sll.sll_halen {
            6 => Ok(sll.sll_addr[..6].try_into().expect("6 bytes")),
            _ => Err(GarpError::NoMac(self.ifindex)),
        }
    }

    /// Sends one announcement for `vip` now: gratuitous ARP for IPv4, an unsolicited neighbour
    /// advertisement for IPv6.
    pub fn announce(&self, vip: impl Into<IpAddr>, vlan: Option<VlanId>) -> Result<(), GarpError> {
        let frame = announcement_frame(self.mac()?, vip.into(), vlan);
        send(self.fd.as_raw_fd(), &frame, MsgFlags::empty()).map_err(|source| {
            GarpError::Socket {
                op: "send",
                ifindex: self.ifindex,
                source,
            }
        })?;
        Ok(())
    }
}

/// A `sockaddr_ll` of family AF_PACKET, protocol 0 (send only) on `ifindex`.
fn sockaddr_ll(ifindex: u32) -> libc::sockaddr_ll {
    libc::sockaddr_ll {
        sll_family: libc::AF_PACKET as u16,
        sll_protocol: 0,
        sll_ifindex: ifindex as i32,
        sll_hatype: 0,
        sll_pkttype: 0,
        sll_halen: 0,
        sll_addr: [0; 8],
    }
}

/// The address `bind` takes.
fn link_addr(ifindex: u32) -> LinkAddr {
    let sll = sockaddr_ll(ifindex);
    let len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
    // nix offers no safe constructor for LinkAddr, only conversion from a raw sockaddr.
    // SAFETY: `sll` is a fully initialised sockaddr_ll that lives across the call, `len` is its
    // size, and from_raw copies it (after checking the family and the length).
    unsafe { LinkAddr::from_raw((&raw const sll).cast(), Some(len)) }
        .expect("a full sockaddr_ll of AF_PACKET converts to LinkAddr")
}

/// Sends the announcement schedule (gratuitous ARP or unsolicited neighbour advertisements) for
/// each VIP this node takes, one tokio task per VIP.
pub struct GarpSender {
    socket: Arc<GarpSocket>,
    vlan: Option<VlanId>,
    schedule: Arc<[Duration]>,
    tasks: HashMap<IpAddr, JoinHandle<()>>,
    counts: Arc<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    sent: AtomicU64,
    failed: AtomicU64,
}

impl GarpSender {
    /// Frames leave through `socket`, tagged with `vlan` when the interface is a trunk.
    pub fn new(socket: GarpSocket, vlan: Option<VlanId>) -> Self {
        Self::with_schedule(socket, vlan, &GARP_SCHEDULE)
    }

    /// Another schedule (offsets from the takeover, ascending); tests use a compressed one.
    pub fn with_schedule(socket: GarpSocket, vlan: Option<VlanId>, schedule: &[Duration]) -> Self {
        Self {
            socket: Arc::new(socket),
            vlan,
            schedule: schedule.into(),
            tasks: HashMap::new(),
            counts: Arc::default(),
        }
    }

    /// This node has taken `vip`: send the first frame now and the rest on schedule. Taking a
    /// VIP that is still being announced starts its schedule over. Needs a tokio runtime.
    pub fn announce(&mut self, vip: impl Into<IpAddr>) {
        let vip = vip.into();
        self.withdraw(vip);
        let socket = Arc::clone(&self.socket);
        let schedule = Arc::clone(&self.schedule);
        let counts = Arc::clone(&self.counts);
        let vlan = self.vlan;
        let task = tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            for offset in schedule.iter() {
                tokio::time::sleep_until(start + *offset).await;
                match socket.announce(vip, vlan) {
                    Ok(()) => counts.sent.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        tracing::warn!(%vip, error = %e, "VIP announcement not sent");
                        counts.failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        });
        self.tasks.insert(vip, task);
    }

    /// This node gave `vip` up: its pending frames are cancelled. (A frame being written at this
    /// very moment on another runtime thread still leaves; none is started afterwards.)
    pub fn withdraw(&mut self, vip: impl Into<IpAddr>) {
        if let Some(task) = self.tasks.remove(&vip.into()) {
            task.abort();
        }
        self.tasks.retain(|_, t| !t.is_finished());
    }

    /// VIPs whose schedule has frames still to send.
    pub fn pending(&self) -> Vec<IpAddr> {
        let mut v: Vec<_> = self
            .tasks
            .iter()
            .filter(|(_, t)| !t.is_finished())
            .map(|(vip, _)| *vip)
            .collect();
        v.sort();
        v
    }

    /// Frames sent, for metrics.
    pub fn sent_total(&self) -> u64 {
        self.counts.sent.load(Ordering::Relaxed)
    }

    /// Frames that could not be sent (logged each time), for metrics.
    pub fn failed_total(&self) -> u64 {
        self.counts.failed.load(Ordering::Relaxed)
    }
}

impl Drop for GarpSender {
    fn drop(&mut self) {
        for task in self.tasks.values() {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x02, 0x00, 0x5e, 0x10, 0x01, 0x7d];
    const VIP: Ipv4Addr = Ipv4Addr::new(10, 10, 1, 128);

    /// The ARP body written out field by field (RFC 826 order), padded to 46 bytes.
    #[rustfmt::skip]
    const ARP_BODY: [u8; 46] = [
        0x00, 0x01,                         // htype Ethernet
        0x08, 0x00,                         // ptype IPv4
        6, 4,                               // hlen, plen
        0x00, 0x01,                         // op request
        0x02, 0x00, 0x5e, 0x10, 0x01, 0x7d, // sender MAC
        10, 10, 1, 128,                     // sender IP = VIP
        0, 0, 0, 0, 0, 0,                   // target MAC: unknown (RFC 5227)
        10, 10, 1, 128,                     // target IP = VIP
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, // padding to 46
    ];

    #[test]
    fn untagged_frame_is_a_broadcast_arp_announcement() {
        let mut want = vec![0xff; 6];
        want.extend_from_slice(&MAC);
        want.extend_from_slice(&[0x08, 0x06]);
        want.extend_from_slice(&ARP_BODY);
        assert_eq!(garp_frame(MAC, VIP, None), want);
        assert_eq!(want.len(), 60, "minimum Ethernet frame without FCS");
    }

    #[test]
    fn tagged_frame_carries_the_vlan_id_before_the_arp_ethertype() {
        let vlan = VlanId::new(1512).unwrap();
        let mut want = vec![0xff; 6];
        want.extend_from_slice(&MAC);
        want.extend_from_slice(&[0x81, 0x00, 0x05, 0xe8, 0x08, 0x06]); // TPID, TCI 1512, ARP
        want.extend_from_slice(&ARP_BODY);
        assert_eq!(garp_frame(MAC, VIP, Some(vlan)), want);
        let top = garp_frame(MAC, VIP, VlanId::new(4094));
        assert_eq!(&top[14..16], &[0x0f, 0xfe]);
    }

    const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x10, 1, 0, 0, 0, 0x128);

    /// The one's-complement sum of an IPv6 pseudo-header and `msg`, written independently of
    /// `icmp6_checksum`: the pseudo-header laid out as bytes (RFC 8200 8.1), summed in a u64.
    fn ones_sum(src: Ipv6Addr, dst: Ipv6Addr, next: u8, msg: &[u8]) -> u16 {
        let mut buf = Vec::new();
        buf.extend_from_slice(&src.octets());
        buf.extend_from_slice(&dst.octets());
        buf.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        buf.extend_from_slice(&[0, 0, 0, next]);
        buf.extend_from_slice(msg);
        if buf.len() % 2 == 1 {
            buf.push(0);
        }
        let mut sum: u64 = buf
            .chunks_exact(2)
            .map(|c| u64::from(c[0]) << 8 | u64::from(c[1]))
            .sum();
        while sum >> 16 != 0 {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        sum as u16
    }

    /// The NA written out field by field (RFC 4861 4.4), checksum field zero.
    #[rustfmt::skip]
    fn na_body() -> Vec<u8> {
        let mut b = vec![
            136, 0,                             // type NA, code 0
            0, 0,                               // checksum (filled below)
            0x20, 0, 0, 0,                      // R=0 S=0 O=1, reserved
        ];
        b.extend_from_slice(&VIP6.octets());    // target = VIP
        b.extend_from_slice(&[2, 1]);           // target link-layer address, 8 bytes
        b.extend_from_slice(&MAC);
        b
    }

    fn expected_na(vlan: Option<[u8; 2]>) -> Vec<u8> {
        let mut want = vec![0x33, 0x33, 0, 0, 0, 1];
        want.extend_from_slice(&MAC);
        if let Some(tci) = vlan {
            want.extend_from_slice(&[0x81, 0x00, tci[0], tci[1]]);
        }
        want.extend_from_slice(&[0x86, 0xdd]);
        // version 6, payload 32, next header ICMPv6, hop limit 255
        want.extend_from_slice(&[0x60, 0, 0, 0, 0, 32, 58, 255]);
        want.extend_from_slice(&VIP6.octets());
        want.extend_from_slice(&[0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        let mut body = na_body();
        let all_nodes = "ff02::1".parse().unwrap();
        let sum = !ones_sum(VIP6, all_nodes, 58, &body);
        body[2..4].copy_from_slice(&sum.to_be_bytes());
        want.extend_from_slice(&body);
        want
    }

    #[test]
    fn unsolicited_na_is_an_override_advertisement_to_all_nodes() {
        let got = unsolicited_na_frame(MAC, VIP6, None);
        assert_eq!(got, expected_na(None));
        assert_eq!(got.len(), 86);
        // A receiver's check: the sum over pseudo-header and message, checksum included, is
        // all ones.
        let all_nodes = "ff02::1".parse().unwrap();
        assert_eq!(ones_sum(VIP6, all_nodes, 58, &got[54..]), 0xffff);
        assert_eq!(announcement_frame(MAC, VIP6.into(), None), got);
        assert_eq!(
            announcement_frame(MAC, VIP.into(), None),
            garp_frame(MAC, VIP, None)
        );
    }

    #[test]
    fn tagged_na_carries_the_vlan_id_and_the_same_checksum() {
        let got = unsolicited_na_frame(MAC, VIP6, VlanId::new(1512));
        assert_eq!(got, expected_na(Some([0x05, 0xe8])));
        assert_eq!(got.len(), 90);
        assert_eq!(
            got[18 + 40 + 2..18 + 40 + 4],
            expected_na(None)[54 + 2..54 + 4]
        );
    }

    #[test]
    fn vlan_ids_outside_1_to_4094_are_refused() {
        assert_eq!(VlanId::new(0), None);
        assert_eq!(VlanId::new(4095), None);
        assert_eq!(VlanId::new(1).map(VlanId::get), Some(1));
        assert_eq!(VlanId::new(4094).map(VlanId::get), Some(4094));
    }

    #[test]
    fn schedule_starts_at_once_ascends_and_ends_within_five_seconds() {
        assert_eq!(GARP_SCHEDULE[0], Duration::ZERO);
        assert!(GARP_SCHEDULE.windows(2).all(|w| w[0] < w[1]));
        assert!(*GARP_SCHEDULE.last().unwrap() <= Duration::from_secs(5));
    }
}
