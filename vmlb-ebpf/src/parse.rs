//! Parse: Ethernet -> IPv4 -> TCP/UDP, every access bounds-checked against `data_end`.
//!
//! (802.1Q tags, ARP, IPv6 and ICMP come later; they slot in between Ethernet and IPv4 here.)
//! A packet we cannot balance returns `Err(Classify)`: whether that is a drop or a pass depends on
//! whether its destination is a VIP, which the caller decides with one lookup.

use aya_ebpf::programs::XdpContext;
use vmlb_common::{Counter, FlowKey, IPPROTO_TCP, IPPROTO_UDP};

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
const ETH_P_IPV4: u16 = network_types::eth::EtherType::Ipv4 as u16;
const ETH_P_ARP: u16 = network_types::eth::EtherType::Arp as u16;
/// More-fragments flag and fragment offset, in wire order.
const IP_MF_OFFSET: u16 = 0x3fffu16.to_be();
const TCP_HDR_LEN: usize = 20;
const TCP_CHECK_OFF: usize = 16;
const UDP_HDR_LEN: usize = 8;
const UDP_CHECK_OFF: usize = 6;

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
}

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;
const TCP_FLAGS_OFF: usize = 13;

/// Why a packet is not balanceable; the caller turns it into a counter.
pub enum Classify {
    /// Nothing to do with VIPs can be said: pass with this counter.
    Pass(Counter),
    /// ARP, at offset `l3`.
    Arp { eth: *mut Eth, l3: usize },
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

#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Result<Packet, Classify> {
    let eth: *mut Eth = ptr_at(ctx, 0).ok_or(Classify::Pass(Counter::PassTruncated))?;
    // SAFETY: bounds-checked by ptr_at.
    let proto = unsafe { (*eth).proto };
    if proto == ETH_P_ARP {
        return Err(Classify::Arp { eth, l3: ETH_LEN });
    }
    if proto != ETH_P_IPV4 {
        return Err(Classify::Pass(Counter::PassNotIpv4));
    }
    let ip: *mut Ipv4 = ptr_at(ctx, ETH_LEN).ok_or(Classify::Pass(Counter::PassTruncated))?;
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
    if ctx.data() + ETH_LEN + tot_len > ctx.data_end() {
        return Err(exception(Counter::DropTruncated, Counter::PassTruncated));
    }
    if frag_off & IP_MF_OFFSET != 0 {
        return Err(exception(Counter::DropFragment, Counter::PassNotVip));
    }
    let l4_off = ETH_LEN + ihl;
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
    })
}
