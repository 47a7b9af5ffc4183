//! Parse: Ethernet -> [802.1Q tag] -> ARP | IPv4 -> TCP/UDP | ICMP, every access bounds-checked
//! against `data_end`.
//!
//! A packet we cannot balance returns `Err(Classify)`: whether that is a drop or a pass depends on
//! whether its destination is a VIP, which the caller decides with one lookup. ARP and ICMP are
//! handed to their own stages (arp.rs, icmp.rs) with the offsets found here.

use aya_ebpf::programs::XdpContext;
use network_types::{eth::EtherType, vlan::VlanHdr};
use vmlb_common::{Config, Counter, FlowKey, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, MAX_VLANS};

/// Header layouts with their natural alignment, as in the kernel's and Katran's C headers. On
/// the wire the IPv4 header may be only 2-byte aligned; the verifier and the x86-64/arm64 JITs
/// accept unaligned packet loads, and aligned types let LLVM emit one load per field instead of
/// four byte loads and shifts (network-types uses byte arrays, which costs exactly that).
#[repr(C)]
pub struct Eth {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub proto: u16,
}

#[repr(C)]
pub struct Ipv4 {
    pub vihl: u8,
    pub tos: u8,
    pub tot_len: u16,
    pub id: u16,
    pub frag_off: u16,
    pub ttl: u8,
    pub proto: u8,
    pub check: u16,
    pub saddr: u32,
    pub daddr: u32,
}

/// The first four bytes of TCP and UDP headers.
#[repr(C)]
pub struct Ports {
    pub src: u16,
    pub dst: u16,
}

pub const ETH_LEN: usize = 14;
const ETH_P_IPV4: u16 = EtherType::Ipv4 as u16;
const ETH_P_ARP: u16 = EtherType::Arp as u16;
const ETH_P_IPV6: u16 = EtherType::Ipv6 as u16;
const ETH_P_8021Q: u16 = EtherType::Ieee8021q as u16;
const ETH_P_8021AD: u16 = EtherType::Ieee8021ad as u16;
/// The pre-standard QinQ S-tag still found on older switches.
const ETH_P_QINQ1: u16 = EtherType::Ieee8021QinQ1 as u16;
/// More-fragments flag and fragment offset, in wire order.
const IP_MF_OFFSET: u16 = 0x3fffu16.to_be();
pub const TCP_HDR_LEN: usize = 20;
pub const TCP_CHECK_OFF: usize = 16;
pub const UDP_HDR_LEN: usize = 8;
pub const UDP_CHECK_OFF: usize = 6;

/// A TCP or UDP over IPv4 packet we may rewrite.
pub struct Packet {
    pub eth: *mut Eth,
    pub ip: *mut Ipv4,
    pub ports: *mut Ports,
    /// The L4 checksum field.
    pub l4_check: *mut u16,
    pub key: FlowKey,
    /// TCP flags (byte 13 of the TCP header); 0 for UDP.
    pub tcp_flags: u8,
    /// Bytes on the wire, for the traffic counters.
    pub len: u64,
    /// 0 for an untagged frame; for a tagged one, the device that carries its VLAN's routes
    /// (`Config::vlan_ifindex`): its next hop must be there, and it leaves with its tag.
    pub vlan_dev: u32,
}

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;
pub const TCP_FLAGS_OFF: usize = 13;

/// Why a packet is not balanceable; the caller turns it into a counter.
pub enum Classify {
    /// Nothing to do with VIPs can be said: pass with this counter.
    Pass(Counter),
    /// ARP, at offset `l3`.
    Arp { l3: usize },
    /// An unfragmented ICMP message, complete as its IPv4 header says, at offset `l4`; the
    /// IPv4 packet ends at offset `end`.
    Icmp {
        l3: usize,
        l4: usize,
        end: usize,
        vlan_dev: u32,
    },
    /// IPv6 at offset `l3` (its own stage, v6.rs).
    Ipv6 { l3: usize, vlan_dev: u32 },
    /// IPv4 to `dst`: `if_vip` if `dst` is a VIP, else `if_not_vip`.
    Ipv4 {
        dst: u32,
        if_vip: Counter,
        if_not_vip: Counter,
    },
}

#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *mut T)
}

/// Ethernet and at most one 802.1Q tag of a served VLAN: (EtherType, L3 offset, VLAN device).
/// The tag stays in the frame; everything sent back keeps it.
#[inline(always)]
fn l2(ctx: &XdpContext, eth: *mut Eth, cfg: &Config) -> Result<(u16, usize, u32), Classify> {
    // SAFETY: bounds-checked by the caller.
    let proto = unsafe { (*eth).proto };
    // The common case first, in as few branches as possible.
    if proto == ETH_P_IPV4 || proto == ETH_P_ARP {
        return Ok((proto, ETH_LEN, 0));
    }
    if proto != ETH_P_8021Q {
        if proto == ETH_P_8021AD || proto == ETH_P_QINQ1 {
            return Err(Classify::Pass(Counter::PassQinq));
        }
        return Ok((proto, ETH_LEN, 0));
    }
    let tag: *mut VlanHdr = ptr_at(ctx, ETH_LEN).ok_or(Classify::Pass(Counter::PassTruncated))?;
    // SAFETY: bounds-checked by ptr_at.
    let (vid, inner) = unsafe { ((*tag).vid(), (*tag).ether_type) };
    if inner == ETH_P_8021Q || inner == ETH_P_8021AD || inner == ETH_P_QINQ1 {
        return Err(Classify::Pass(Counter::PassQinq));
    }
    let l3 = ETH_LEN + VlanHdr::LEN;
    // VID 0 is a priority tag: the frame belongs to the untagged VLAN.
    if vid == 0 {
        return Ok((inner, l3, 0));
    }
    for i in 0..MAX_VLANS {
        if (i as u32) < cfg.vlan_count && cfg.vlan_ids[i] == vid {
            return Ok((inner, l3, cfg.vlan_ifindex[i]));
        }
    }
    Err(Classify::Pass(Counter::PassOtherVlan))
}

#[inline(always)]
pub fn parse(ctx: &XdpContext, cfg: &Config) -> Result<Packet, Classify> {
    let eth: *mut Eth = ptr_at(ctx, 0).ok_or(Classify::Pass(Counter::PassTruncated))?;
    let (proto, l3, vlan_dev) = l2(ctx, eth, cfg)?;
    if proto == ETH_P_ARP {
        return Err(Classify::Arp { l3 });
    }
    if proto != ETH_P_IPV4 {
        if proto == ETH_P_IPV6 {
            return Err(Classify::Ipv6 { l3, vlan_dev });
        }
        return Err(Classify::Pass(Counter::PassNotIpv4));
    }
    // Two copies of the IPv4 parse, each with a constant offset: the untagged one (nearly
    // every frame) then needs no offset arithmetic.
    if l3 == ETH_LEN {
        ipv4(ctx, eth, ETH_LEN, 0)
    } else {
        ipv4(ctx, eth, ETH_LEN + VlanHdr::LEN, vlan_dev)
    }
}

/// IPv4 -> TCP/UDP (or ICMP) at offset `l3`.
#[inline(always)]
fn ipv4(ctx: &XdpContext, eth: *mut Eth, l3: usize, vlan_dev: u32) -> Result<Packet, Classify> {
    let ip: *mut Ipv4 = ptr_at(ctx, l3).ok_or(Classify::Pass(Counter::PassTruncated))?;
    // SAFETY: bounds-checked by ptr_at.
    let (vihl, frag_off, proto, tot_len, dst) = unsafe {
        (
            (*ip).vihl,
            (*ip).frag_off,
            (*ip).proto,
            u16::from_be((*ip).tot_len) as usize,
            (*ip).daddr,
        )
    };
    let exception = |if_vip, if_not_vip| Classify::Ipv4 {
        dst,
        if_vip,
        if_not_vip,
    };
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if vihl >> 4 != 4 || ihl < 20 || tot_len < ihl {
        return Err(exception(Counter::DropBadHeader, Counter::PassNotVip));
    }
    // The IPv4 header (with options) and everything it claims must be present; Ethernet padding
    // may make the frame longer, never shorter.
    if ctx.data() + l3 + tot_len > ctx.data_end() {
        return Err(exception(Counter::DropTruncated, Counter::PassTruncated));
    }
    if frag_off & IP_MF_OFFSET != 0 {
        return Err(exception(Counter::DropFragment, Counter::PassNotVip));
    }
    let l4_off = l3 + ihl;
    if proto == IPPROTO_ICMP {
        return Err(Classify::Icmp {
            l3,
            l4: l4_off,
            end: l3 + tot_len,
            vlan_dev,
        });
    }
    let (hdr_len, check_off) = match proto {
        IPPROTO_TCP => (TCP_HDR_LEN, TCP_CHECK_OFF),
        IPPROTO_UDP => (UDP_HDR_LEN, UDP_CHECK_OFF),
        _ => {
            return Err(exception(
                Counter::PassUnsupportedProto,
                Counter::PassNotVip,
            ))
        }
    };
    if tot_len < ihl + hdr_len {
        return Err(exception(Counter::DropTruncated, Counter::PassTruncated));
    }
    let ports: *mut Ports =
        ptr_at(ctx, l4_off).ok_or(exception(Counter::DropTruncated, Counter::PassTruncated))?;
    let l4_check: *mut u16 = ptr_at(ctx, l4_off + check_off)
        .ok_or(exception(Counter::DropTruncated, Counter::PassTruncated))?;
    let tcp_flags = if proto == IPPROTO_TCP {
        let f: *mut u8 = ptr_at(ctx, l4_off + TCP_FLAGS_OFF)
            .ok_or(exception(Counter::DropTruncated, Counter::PassTruncated))?;
        // SAFETY: bounds-checked by ptr_at.
        unsafe { *f }
    } else {
        0
    };
    // SAFETY: bounds-checked by ptr_at.
    let key = unsafe {
        FlowKey {
            src_addr: (*ip).saddr,
            dst_addr: dst,
            src_port: (*ports).src,
            dst_port: (*ports).dst,
            proto,
            _pad0: 0,
            _pad1: 0,
        }
    };
    Ok(Packet {
        eth,
        ip,
        ports,
        l4_check,
        key,
        tcp_flags,
        len: (ctx.data_end() - ctx.data()) as u64,
        vlan_dev,
    })
}
