//! The IPv6 side of the packet builder: Ethernet/IPv6 frames with TCP, UDP or ICMPv6 (echo,
//! errors, neighbour discovery), and `verify_checksums6`, which recomputes every checksum from
//! scratch with the IPv6 pseudo-header, independent of the data path's incremental updates.

use std::net::Ipv6Addr;

use crate::packet::{checksum, l4_bytes, Mac, L4};

#[derive(Clone, Debug)]
pub struct Packet6 {
    pub dst_mac: Mac,
    pub src_mac: Mac,
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub hop_limit: u8,
    /// Extension headers put before the L4 header, as (next-header number of this header,
    /// its bytes); the first entry's number is the IPv6 header's next header.
    pub ext: Vec<(u8, Vec<u8>)>,
    pub l4: L4,
    pub payload: Vec<u8>,
}

pub const IPPROTO_ICMPV6: u8 = 58;

impl Packet6 {
    pub fn new(src: Ipv6Addr, dst: Ipv6Addr, l4: L4) -> Self {
        Self {
            dst_mac: [0; 6],
            src_mac: [0; 6],
            src,
            dst,
            hop_limit: 64,
            ext: Vec::new(),
            l4,
            payload: Vec::new(),
        }
    }

    pub fn tcp(src: (Ipv6Addr, u16), dst: (Ipv6Addr, u16), flags: u8) -> Self {
        Self::new(
            src.0,
            dst.0,
            L4::Tcp {
                sport: src.1,
                dport: dst.1,
                seq: 0x1000_0001,
                ack: 0,
                flags,
            },
        )
    }

    pub fn udp(src: (Ipv6Addr, u16), dst: (Ipv6Addr, u16)) -> Self {
        Self::new(
            src.0,
            dst.0,
            L4::Udp {
                sport: src.1,
                dport: dst.1,
                no_checksum: false,
            },
        )
    }

    /// An ICMPv6 message: type, code and the header's last four bytes; the payload follows.
    pub fn icmp(src: Ipv6Addr, dst: Ipv6Addr, ty: u8, code: u8, rest: [u8; 4]) -> Self {
        Self::new(src, dst, L4::Icmp { ty, code, rest })
    }

    pub fn ping(src: Ipv6Addr, dst: Ipv6Addr, id: u16, seq: u16, data: &[u8]) -> Self {
        let [a, b] = id.to_be_bytes();
        let [c, d] = seq.to_be_bytes();
        Self::icmp(src, dst, 128, 0, [a, b, c, d]).payload(data)
    }

    /// An ICMPv6 error quoting the first `quote` bytes of `about`'s IPv6 packet.
    pub fn icmp_error(
        src: Ipv6Addr,
        dst: Ipv6Addr,
        ty: u8,
        code: u8,
        rest: [u8; 4],
        about: &Packet6,
        quote: usize,
    ) -> Self {
        let frame = about.build();
        let ip = &frame[14..];
        Self::icmp(src, dst, ty, code, rest).payload(&ip[..quote.min(ip.len())])
    }

    /// Packet too big (type 2) with `mtu`.
    pub fn packet_too_big(
        src: Ipv6Addr,
        dst: Ipv6Addr,
        mtu: u32,
        about: &Packet6,
        quote: usize,
    ) -> Self {
        Self::icmp_error(src, dst, 2, 0, mtu.to_be_bytes(), about, quote)
    }

    /// A neighbour solicitation for `target` (RFC 4861 4.3) with the source link-layer option,
    /// sent to the solicited-node multicast address, hop limit 255.
    pub fn neighbour_solicit(src: Ipv6Addr, src_mac: Mac, target: Ipv6Addr) -> Self {
        let t = target.octets();
        let group = Ipv6Addr::new(
            0xff02,
            0,
            0,
            0,
            0,
            1,
            0xff00 | t[13] as u16,
            u16::from_be_bytes([t[14], t[15]]),
        );
        let mut body = t.to_vec();
        body.extend_from_slice(&[1, 1]);
        body.extend_from_slice(&src_mac);
        let mut p = Self::icmp(src, group, 135, 0, [0; 4]).payload(&body);
        p.hop_limit = 255;
        p.src_mac = src_mac;
        p.dst_mac = [0x33, 0x33, 0xff, t[13], t[14], t[15]];
        p
    }

    /// The advertisement answering it: solicited and override, with the target link-layer
    /// option.
    pub fn neighbour_advert(src: Ipv6Addr, dst: Ipv6Addr, target: Ipv6Addr, mac: Mac) -> Self {
        let mut body = target.octets().to_vec();
        body.extend_from_slice(&[2, 1]);
        body.extend_from_slice(&mac);
        let mut p = Self::icmp(src, dst, 136, 0, [0x60, 0, 0, 0]).payload(&body);
        p.hop_limit = 255;
        p
    }

    pub fn macs(mut self, src: Mac, dst: Mac) -> Self {
        self.src_mac = src;
        self.dst_mac = dst;
        self
    }

    pub fn payload(mut self, p: &[u8]) -> Self {
        self.payload = p.to_vec();
        self
    }

    pub fn build(&self) -> Vec<u8> {
        // ICMPv6's checksum covers the pseudo-header, as TCP's and UDP's do.
        let (proto, l4) = l4_bytes(&self.l4, &self.payload, IPPROTO_ICMPV6, |proto, l4| {
            checksum(l4, pseudo_sum6(self.src, self.dst, proto, l4.len()))
        });
        let mut exts = Vec::new();
        let first = match self.ext.first() {
            Some((n, _)) => *n,
            None => proto,
        };
        for (i, (_, bytes)) in self.ext.iter().enumerate() {
            let next = self.ext.get(i + 1).map_or(proto, |e| e.0);
            let mut h = bytes.clone();
            h[0] = next;
            exts.extend_from_slice(&h);
        }
        let plen = exts.len() + l4.len();
        let mut out = Vec::with_capacity(54 + plen);
        out.extend_from_slice(&self.dst_mac);
        out.extend_from_slice(&self.src_mac);
        out.extend_from_slice(&0x86ddu16.to_be_bytes());
        out.extend_from_slice(&[0x60, 0, 0, 0]);
        out.extend_from_slice(&(plen as u16).to_be_bytes());
        out.push(first);
        out.push(self.hop_limit);
        out.extend_from_slice(&self.src.octets());
        out.extend_from_slice(&self.dst.octets());
        out.extend_from_slice(&exts);
        out.extend_from_slice(&l4);
        out
    }
}

/// The IPv6 pseudo-header's sum (RFC 8200 8.1).
pub fn pseudo_sum6(src: Ipv6Addr, dst: Ipv6Addr, proto: u8, len: usize) -> u32 {
    let words = |a: Ipv6Addr| a.segments().iter().map(|&w| w as u32).sum::<u32>();
    words(src) + words(dst) + (len as u32 >> 16) + (len as u32 & 0xffff) + proto as u32
}

/// Recompute the TCP/UDP/ICMPv6 checksum of an Ethernet/IPv6 frame from scratch; an ICMPv6
/// error's quoted L4 checksum too when the quote holds the whole packet.
pub fn verify_checksums6(frame: &[u8]) -> Result<(), String> {
    verify_ip6(frame.get(14..).ok_or("no IPv6 header")?)
}

fn verify_ip6(ip: &[u8]) -> Result<(), String> {
    if ip.len() < 40 || ip[0] >> 4 != 6 {
        return Err("not IPv6".into());
    }
    let plen = u16::from_be_bytes([ip[4], ip[5]]) as usize;
    if 40 + plen > ip.len() {
        // A quote cut short: nothing to check beyond the header.
        return Ok(());
    }
    let addr = |o: usize| Ipv6Addr::from(<[u8; 16]>::try_from(&ip[o..o + 16]).unwrap());
    let (src, dst) = (addr(8), addr(24));
    let l4 = &ip[40..40 + plen];
    let ok = |proto| checksum(l4, pseudo_sum6(src, dst, proto, l4.len())) == 0;
    match ip[6] {
        IPPROTO_ICMPV6 => {
            if !ok(IPPROTO_ICMPV6) {
                return Err("ICMPv6 checksum".into());
            }
            match l4[0] {
                1..=4 => verify_ip6(&l4[8..]).map_err(|e| format!("quoted {e}")),
                _ => Ok(()),
            }
        }
        6 if !ok(6) => Err("TCP checksum".into()),
        17 if !ok(17) => Err("UDP checksum".into()),
        _ => Ok(()),
    }
}
