//! Parse IPv6: the fixed header, then TCP/UDP or ICMPv6 directly behind it. Extension headers
//! are not walked: a packet to a VIP that has one (a fragment header included) is dropped and
//! counted, anything else passes to the kernel (policy, `vmlb_common::IPV6_EXT_HEADERS`).
//!
//! Header type: network-types' `Ipv6Hdr` (byte arrays; the addresses are read as four
//! unaligned words, the same loads a hand-laid struct would give).

use aya_ebpf::programs::XdpContext;
use network_types::ip::Ipv6Hdr;
use vmlb_common::{Addr6, Counter, FlowKey6, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP};

/// The destination of the IPv6 header at `l3`, if the frame holds it.
#[inline(always)]
pub fn dst_of(ctx: &XdpContext, l3: usize) -> Option<Addr6> {
    let ip: *mut Ipv6Hdr = ptr_at(ctx, l3)?;
    // SAFETY: bounds-checked by ptr_at.
    Some(unsafe { read_addr(&(*ip).dst_addr) })
}

use crate::parse::{
    ptr_at, Eth, Ports, TCP_CHECK_OFF, TCP_FLAGS_OFF, TCP_HDR_LEN, UDP_CHECK_OFF, UDP_HDR_LEN,
};

/// A TCP or UDP over IPv6 packet we may rewrite.
pub struct Packet6 {
    pub eth: *mut Eth,
    pub ip: *mut Ipv6Hdr,
    pub ports: *mut Ports,
    pub l4_check: *mut u16,
    pub key: FlowKey6,
    pub tcp_flags: u8,
    pub len: u64,
    pub vlan_dev: u32,
}

/// Why an IPv6 packet is not balanceable.
pub enum Classify6 {
    Pass(Counter),
    /// ICMPv6: the ICMPv6 program's (v6.rs `handle_icmp`).
    Icmp,
    /// `if_vip` if the destination (in the header at `l3`) is a VIP, else `if_not_vip`. The
    /// address is not carried here: every byte of this enum is stack the IPv6 program lacks.
    Exception {
        if_vip: Counter,
        if_not_vip: Counter,
    },
}

/// The address at `p` (16 bytes inside the packet, bounds-checked by the caller).
///
/// # Safety
/// `p` must point at 16 readable bytes.
#[inline(always)]
pub unsafe fn read_addr(p: *const [u8; 16]) -> Addr6 {
    let w = p.cast::<u32>();
    // SAFETY: as the caller promised; unaligned loads are fine for packet data.
    unsafe {
        [
            w.read_unaligned(),
            w.add(1).read_unaligned(),
            w.add(2).read_unaligned(),
            w.add(3).read_unaligned(),
        ]
    }
}

/// Write an address at `p`.
///
/// # Safety
/// `p` must point at 16 writable bytes.
#[inline(always)]
pub unsafe fn write_addr(p: *mut [u8; 16], a: &Addr6) {
    let w = p.cast::<u32>();
    // SAFETY: as the caller promised.
    unsafe {
        w.write_unaligned(a[0]);
        w.add(1).write_unaligned(a[1]);
        w.add(2).write_unaligned(a[2]);
        w.add(3).write_unaligned(a[3]);
    }
}

#[inline(always)]
pub fn parse6(
    ctx: &XdpContext,
    eth: *mut Eth,
    l3: usize,
    vlan_dev: u32,
) -> Result<Packet6, Classify6> {
    let ip: *mut Ipv6Hdr = ptr_at(ctx, l3).ok_or(Classify6::Pass(Counter::PassTruncated))?;
    // SAFETY: bounds-checked by ptr_at.
    let (version, plen, nh) = unsafe {
        (
            (*ip).vcf[0] >> 4,
            u16::from_be_bytes((*ip).payload_len) as usize,
            (*ip).next_hdr,
        )
    };
    let exception = |if_vip, if_not_vip| Classify6::Exception { if_vip, if_not_vip };
    if version != 6 {
        return Err(exception(Counter::DropBadHeader, Counter::PassNotVip));
    }
    let l4 = l3 + Ipv6Hdr::LEN;
    // Everything the header claims must be present (Ethernet padding may add, never cut).
    if ctx.data() + l4 + plen > ctx.data_end() {
        return Err(exception(Counter::DropTruncated, Counter::PassTruncated));
    }
    if nh == IPPROTO_ICMPV6 {
        return Err(Classify6::Icmp);
    }
    let (hdr_len, check_off) = match nh {
        IPPROTO_TCP => (TCP_HDR_LEN, TCP_CHECK_OFF),
        IPPROTO_UDP => (UDP_HDR_LEN, UDP_CHECK_OFF),
        _ if vmlb_common::IPV6_EXT_HEADERS.contains(&nh) => {
            return Err(exception(Counter::DropIpv6ExtHeader, Counter::PassNotVip))
        }
        _ => {
            return Err(exception(
                Counter::PassUnsupportedProto,
                Counter::PassNotVip,
            ))
        }
    };
    if plen < hdr_len {
        return Err(exception(Counter::DropTruncated, Counter::PassTruncated));
    }
    let cut = || exception(Counter::DropTruncated, Counter::PassTruncated);
    let ports: *mut Ports = ptr_at(ctx, l4).ok_or_else(cut)?;
    let l4_check: *mut u16 = ptr_at(ctx, l4 + check_off).ok_or_else(cut)?;
    let tcp_flags = if nh == IPPROTO_TCP {
        let f: *mut u8 = ptr_at(ctx, l4 + TCP_FLAGS_OFF).ok_or_else(cut)?;
        // SAFETY: bounds-checked by ptr_at.
        unsafe { *f }
    } else {
        0
    };
    // SAFETY: bounds-checked by ptr_at.
    let key = unsafe {
        FlowKey6 {
            src_addr: read_addr(&(*ip).src_addr),
            dst_addr: read_addr(&(*ip).dst_addr),
            src_port: (*ports).src,
            dst_port: (*ports).dst,
            proto: nh,
            _pad0: 0,
            _pad1: 0,
        }
    };
    Ok(Packet6 {
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
