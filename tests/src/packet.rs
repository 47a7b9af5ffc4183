//! A small packet builder: a test states the fields it cares about and the builder fills in
//! lengths and checksums. `verify_checksums` recomputes every checksum from scratch, independent
//! of the data path's incremental updates.

use std::net::Ipv4Addr;

pub type Mac = [u8; 6];

pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;
pub const TCP_PSH: u8 = 0x08;

#[derive(Clone, Debug)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        seq: u32,
        ack: u32,
        flags: u8,
    },
    Udp {
        sport: u16,
        dport: u16,
        no_checksum: bool,
    },
    /// ICMP: type, code and the header's last four bytes (identifier and sequence, or unused /
    /// next-hop MTU); the payload follows, and the checksum covers both.
    Icmp { ty: u8, code: u8, rest: [u8; 4] },
    /// Any other protocol number, payload only.
    Raw(u8),
}

#[derive(Clone, Debug)]
pub struct Packet {
    pub dst_mac: Mac,
    pub src_mac: Mac,
    pub ethertype: u16,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub ttl: u8,
    pub id: u16,
    /// Flags and fragment offset (host order, as in the header: 0x2000 = MF).
    pub frag: u16,
    pub options: Vec<u8>,
    pub l4: L4,
    pub payload: Vec<u8>,
}

impl Packet {
    pub fn tcp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), flags: u8) -> Self {
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

    pub fn udp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Self {
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

    pub fn new(src: Ipv4Addr, dst: Ipv4Addr, l4: L4) -> Self {
        Self {
            dst_mac: [0; 6],
            src_mac: [0; 6],
            ethertype: 0x0800,
            src,
            dst,
            ttl: 64,
            id: 0x1234,
            frag: 0x4000, // DF, as most TCP stacks send
            options: Vec::new(),
            l4,
            payload: Vec::new(),
        }
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

    /// Rewrite the addresses and ports and take one hop off the TTL (what NAT is expected to
    /// do: vmlb forwards like a router), keeping everything else.
    pub fn with_tuple(mut self, src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Self {
        self.src = src.0;
        self.dst = dst.0;
        self.ttl -= 1;
        match &mut self.l4 {
            L4::Tcp { sport, dport, .. } | L4::Udp { sport, dport, .. } => {
                *sport = src.1;
                *dport = dst.1;
            }
            L4::Icmp { .. } | L4::Raw(_) => {}
        }
        self
    }

    /// An ICMP message from `src` to `dst`.
    pub fn icmp(src: Ipv4Addr, dst: Ipv4Addr, ty: u8, code: u8, rest: [u8; 4]) -> Self {
        Self::new(src, dst, L4::Icmp { ty, code, rest })
    }

    /// An ICMP echo request (type 8) with identifier `id`, sequence `seq` and `data`.
    pub fn ping(src: Ipv4Addr, dst: Ipv4Addr, id: u16, seq: u16, data: &[u8]) -> Self {
        let [a, b] = id.to_be_bytes();
        let [c, d] = seq.to_be_bytes();
        Self::icmp(src, dst, 8, 0, [a, b, c, d]).payload(data)
    }

    /// An ICMP error of `ty`/`code` (with the header's last four bytes `rest`) from `src` to
    /// `dst`, quoting the first `quote` bytes of `about`'s IPv4 packet (RFC 792 asks for the
    /// header and 8 bytes; Linux sends as much as fits in 576).
    pub fn icmp_error(
        src: Ipv4Addr,
        dst: Ipv4Addr,
        ty: u8,
        code: u8,
        rest: [u8; 4],
        about: &Packet,
        quote: usize,
    ) -> Self {
        let frame = about.build();
        let ip = &frame[14..];
        Self::icmp(src, dst, ty, code, rest).payload(&ip[..quote.min(ip.len())])
    }

    /// Fragmentation needed (type 3 code 4) with next-hop `mtu`, quoting `quote` bytes.
    pub fn frag_needed(
        src: Ipv4Addr,
        dst: Ipv4Addr,
        mtu: u16,
        about: &Packet,
        quote: usize,
    ) -> Self {
        let [a, b] = mtu.to_be_bytes();
        Self::icmp_error(src, dst, 3, 4, [0, 0, a, b], about, quote)
    }

    pub fn build(&self) -> Vec<u8> {
        let (proto, l4) = l4_bytes(&self.l4, &self.payload, 1, |proto, l4| {
            match proto {
                // ICMP's checksum covers its message only.
                1 => checksum(l4, 0),
                _ => l4_checksum(self.src, self.dst, proto, l4),
            }
        });

        assert!(self.options.len().is_multiple_of(4) && self.options.len() <= 40);
        let ihl = 20 + self.options.len();
        let mut ip = Vec::with_capacity(ihl);
        ip.push(0x40 | (ihl / 4) as u8);
        ip.push(0);
        ip.extend_from_slice(&((ihl + l4.len()) as u16).to_be_bytes());
        ip.extend_from_slice(&self.id.to_be_bytes());
        ip.extend_from_slice(&self.frag.to_be_bytes());
        ip.push(self.ttl);
        ip.push(proto);
        ip.extend_from_slice(&[0, 0]);
        ip.extend_from_slice(&self.src.octets());
        ip.extend_from_slice(&self.dst.octets());
        ip.extend_from_slice(&self.options);
        let c = checksum(&ip, 0);
        ip[10..12].copy_from_slice(&c.to_be_bytes());

        let mut out = Vec::with_capacity(14 + ip.len() + l4.len());
        out.extend_from_slice(&self.dst_mac);
        out.extend_from_slice(&self.src_mac);
        out.extend_from_slice(&self.ethertype.to_be_bytes());
        out.extend_from_slice(&ip);
        out.extend_from_slice(&l4);
        out
    }
}

/// The L4 header and payload of `l4`, checksummed with `sum(protocol, bytes)` (the IP version's
/// pseudo-header is the caller's); `icmp` is the ICMP protocol number of that IP version.
/// Returns the protocol number and the bytes. Shared by the IPv4 and IPv6 builders.
pub fn l4_bytes(
    l4: &L4,
    payload: &[u8],
    icmp: u8,
    sum: impl Fn(u8, &[u8]) -> u16,
) -> (u8, Vec<u8>) {
    let mut out = Vec::new();
    let proto = match *l4 {
        L4::Tcp {
            sport,
            dport,
            seq,
            ack,
            flags,
        } => {
            out.extend_from_slice(&sport.to_be_bytes());
            out.extend_from_slice(&dport.to_be_bytes());
            out.extend_from_slice(&seq.to_be_bytes());
            out.extend_from_slice(&ack.to_be_bytes());
            out.push(5 << 4);
            out.push(flags);
            out.extend_from_slice(&64240u16.to_be_bytes());
            out.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
            6
        }
        L4::Udp { sport, dport, .. } => {
            out.extend_from_slice(&sport.to_be_bytes());
            out.extend_from_slice(&dport.to_be_bytes());
            out.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
            out.extend_from_slice(&[0, 0]);
            17
        }
        L4::Icmp { ty, code, rest } => {
            out.extend_from_slice(&[ty, code, 0, 0]);
            out.extend_from_slice(&rest);
            icmp
        }
        L4::Raw(p) => p,
    };
    out.extend_from_slice(payload);
    match *l4 {
        L4::Icmp { .. } => {
            let c = sum(proto, &out);
            out[2..4].copy_from_slice(&c.to_be_bytes());
        }
        L4::Tcp { .. } => {
            let c = sum(proto, &out);
            out[16..18].copy_from_slice(&c.to_be_bytes());
        }
        L4::Udp {
            no_checksum: false, ..
        } => {
            // A computed zero is sent as 0xffff (RFC 768).
            let c = match sum(proto, &out) {
                0 => 0xffff,
                c => c,
            };
            out[6..8].copy_from_slice(&c.to_be_bytes());
        }
        _ => {}
    }
    (proto, out)
}

/// RFC 1071 one's complement sum over big-endian 16-bit words, plus `initial`.
pub fn checksum(data: &[u8], initial: u32) -> u16 {
    let mut sum = initial;
    for chunk in data.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from_be_bytes([chunk[0], 0])
        };
        sum += word as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn pseudo_sum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> u32 {
    let s = src.octets();
    let d = dst.octets();
    [
        u16::from_be_bytes([s[0], s[1]]),
        u16::from_be_bytes([s[2], s[3]]),
        u16::from_be_bytes([d[0], d[1]]),
        u16::from_be_bytes([d[2], d[3]]),
        proto as u16,
        len as u16,
    ]
    .iter()
    .map(|&w| w as u32)
    .sum()
}

pub fn l4_checksum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4: &[u8]) -> u16 {
    checksum(l4, pseudo_sum(src, dst, proto, l4.len()))
}

/// Recompute the IPv4 header checksum and the TCP/UDP/ICMP checksum of an Ethernet/IPv4 frame
/// (untagged or with one 802.1Q tag) from scratch; `Err` names the first one that is wrong. An
/// ICMP error's quote is checked too: its IPv4 header always, its L4 checksum when the quote
/// holds the whole packet.
pub fn verify_checksums(frame: &[u8]) -> Result<(), String> {
    let l3 = if frame.get(12..14) == Some(&[0x81, 0x00]) {
        18
    } else {
        14
    };
    verify_ip(frame.get(l3..).ok_or("no IPv4 header")?)
}

fn verify_ip(ip: &[u8]) -> Result<(), String> {
    let ihl = ((ip.first().ok_or("empty IPv4")? & 0x0f) as usize) * 4;
    let tot = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    if checksum(&ip[..ihl], 0) != 0 {
        return Err("IPv4 header checksum".into());
    }
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let l4 = &ip[ihl..tot.min(ip.len())];
    if tot > ip.len() {
        // A quote cut short: only its header can be checked.
        return Ok(());
    }
    match ip[9] {
        1 => {
            if checksum(l4, 0) != 0 {
                return Err("ICMP checksum".into());
            }
            match l4[0] {
                3 | 11 | 12 => verify_ip(&l4[8..]).map_err(|e| format!("quoted {e}")),
                _ => Ok(()),
            }
        }
        6 if checksum(l4, pseudo_sum(src, dst, 6, l4.len())) != 0 => Err("TCP checksum".into()),
        17 if u16::from_be_bytes([l4[6], l4[7]]) != 0
            && checksum(l4, pseudo_sum(src, dst, 17, l4.len())) != 0 =>
        {
            Err("UDP checksum".into())
        }
        _ => Ok(()),
    }
}

/// Hex dump side by side, for failure messages.
pub fn diff(got: &[u8], want: &[u8]) -> String {
    let mut s = String::new();
    for i in 0..got.len().max(want.len()) {
        let g = got.get(i).map_or("--".into(), |b| format!("{b:02x}"));
        let w = want.get(i).map_or("--".into(), |b| format!("{b:02x}"));
        if g != w {
            s += &format!("  byte {i}: got {g} want {w}\n");
        }
    }
    s
}

/// An Ethernet/ARP frame (RFC 826, Ethernet and IPv4), padded to the 60-byte minimum.
pub fn arp(op: u16, eth_dst: Mac, sha: Mac, spa: Ipv4Addr, tha: Mac, tpa: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&eth_dst);
    f.extend_from_slice(&sha);
    f.extend_from_slice(&0x0806u16.to_be_bytes());
    f.extend_from_slice(&1u16.to_be_bytes());
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    f.extend_from_slice(&[6, 4]);
    f.extend_from_slice(&op.to_be_bytes());
    f.extend_from_slice(&sha);
    f.extend_from_slice(&spa.octets());
    f.extend_from_slice(&tha);
    f.extend_from_slice(&tpa.octets());
    f.resize(60, 0);
    f
}

/// `frame` with an 802.1Q tag (`tpid`, VLAN `vid`, priority 0) inserted after the MACs.
pub fn tagged(frame: &[u8], tpid: u16, vid: u16) -> Vec<u8> {
    let mut f = frame[..12].to_vec();
    f.extend_from_slice(&tpid.to_be_bytes());
    f.extend_from_slice(&vid.to_be_bytes());
    f.extend_from_slice(&frame[12..]);
    f
}
