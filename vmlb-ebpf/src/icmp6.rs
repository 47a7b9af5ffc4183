//! ICMPv6 for VIPs and NATed IPv6 flows, as icmp.rs does for IPv4:
//! - neighbour solicitations for owned VIPs are answered (ndp.rs);
//! - echo requests to a VIP are answered here, within the same per-CPU rate as IPv4's;
//! - errors (destination unreachable, packet too big, time exceeded, parameter problem) that
//!   quote a NATed packet are translated for the other side: the quoted addresses and ports, the
//!   quoted TCP/UDP checksum when the quote holds it, the outer destination (and the outer source
//!   when the far endpoint sent the error itself), and the ICMPv6 checksum, which also covers
//!   the outer addresses through its pseudo-header. Path-MTU discovery (packet too big) then
//!   works through vmlb from either side, down to IPv6's minimum MTU of 1280.
//!
//! Every read of a quote is bounded by the IPv6 payload length as well as the frame.
//!
//! Header type: network-types' `Icmpv6Hdr` and `Ipv6Hdr`.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use network_types::{icmp::Icmpv6Hdr, ip::Ipv6Hdr};
use vmlb_common::{
    csum, hash::tuple_slot6, Addr6, Config, Config6, Counter, FlowKey6, IPPROTO_TCP, IPPROTO_UDP,
};

use crate::{
    ct6, forward, guard,
    parse::{Eth, Ports, TCP_CHECK_OFF, UDP_CHECK_OFF},
    parse6::{read_addr, write_addr},
    stats::count,
};

const DEST_UNREACH: u8 = 1;
const PACKET_TOO_BIG: u8 = 2;
const TIME_EXCEEDED: u8 = 3;
const PARAM_PROBLEM: u8 = 4;
const ECHO_REQUEST: u8 = 128;
const ECHO_REPLY: u8 = 129;
/// Router and neighbour discovery (133-137) that is not ours: the kernel's.
const ND_FIRST: u8 = 133;
const ND_LAST: u8 = 137;
/// The hop limit of echo replies (Linux's default).
const REPLY_HOP_LIMIT: u8 = 64;

/// A `T` at `off` if it lies within the frame and within the IPv6 payload ending at `end`.
#[inline(always)]
fn within<T>(ctx: &XdpContext, off: usize, end: usize) -> Option<*mut T> {
    if off + core::mem::size_of::<T>() > end {
        return None;
    }
    crate::parse::ptr_at(ctx, off)
}

/// An ICMPv6 message at `l4` of an IPv6 packet at `l3`, payload ending at `end`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub fn handle(
    ctx: &XdpContext,
    eth: *mut Eth,
    ip: *mut Ipv6Hdr,
    l4: usize,
    end: usize,
    vlan_dev: u32,
    cfg: &Config,
    cfg6: &Config6,
) -> Result<u32, Counter> {
    // SAFETY: bounds-checked by parse6().
    let (dst, dst_mac) = unsafe { (read_addr(&(*ip).dst_addr), (*eth).dst) };
    let icmp: *mut Icmpv6Hdr = within(ctx, l4, end).ok_or(Counter::PassTruncated)?;
    // SAFETY: bounds-checked by within().
    let ty = unsafe { (*icmp).type_ };
    if ty == crate::ndp::NEIGHBOR_SOLICIT {
        return crate::ndp::answer(ctx, eth, ip, l4, end, cfg);
    }
    if (ND_FIRST..=ND_LAST).contains(&ty) {
        return Err(Counter::PassNdp);
    }
    let to_vip = crate::lookup::vip6_flags(&dst).is_some();
    let to_snat = !to_vip && ct6::is_snat_addr(&dst, cfg6);
    // With dnat services, an error to any address may be about a packet a client sent to a
    // backend (the quote names the backend); without, only SNAT addresses need a look.
    if !to_vip && !to_snat && cfg6.dnat_endpoints == 0 {
        return Err(Counter::PassNotVip);
    }
    if !forward::for_us(ctx, &dst_mac, cfg) {
        return Err(Counter::PassOtherMac);
    }
    match ty {
        ECHO_REQUEST if to_vip => echo(eth, ip, icmp, cfg, cfg6),
        DEST_UNREACH | PACKET_TOO_BIG | TIME_EXCEEDED | PARAM_PROBLEM => {
            let q = Quote {
                eth,
                ip,
                icmp,
                at: l4 + Icmpv6Hdr::LEN,
                end,
                vlan_dev,
            };
            error(ctx, &q, to_vip, to_snat, cfg, cfg6)
        }
        _ if to_vip => Err(Counter::PassUnsupportedProto),
        _ => Err(Counter::PassNotVip),
    }
}

/// Answer an echo request in place: addresses swapped, type 129, a fresh hop limit, MACs turned
/// round. Swapping the addresses leaves the pseudo-header's sum as it was, so only the type
/// moves the checksum.
#[inline(always)]
fn echo(
    eth: *mut Eth,
    ip: *mut Ipv6Hdr,
    icmp: *mut Icmpv6Hdr,
    cfg: &Config,
    cfg6: &Config6,
) -> Result<u32, Counter> {
    // SAFETY: bounds-checked by the caller.
    let (src, dst) = unsafe { (read_addr(&(*ip).src_addr), read_addr(&(*ip).dst_addr)) };
    if ct6::martian(&src, cfg6) {
        return Err(Counter::DropIcmpEcho);
    }
    guard::admit_echo(cfg, crate::ct::now())?;
    // SAFETY: bounds-checked by the caller; the frame is ours to rewrite.
    unsafe {
        write_addr(&mut (*ip).src_addr, &dst);
        write_addr(&mut (*ip).dst_addr, &src);
        (*ip).hop_limit = REPLY_HOP_LIMIT;
        (*icmp).type_ = ECHO_REPLY;
        let delta = csum::delta2(
            u16::from_ne_bytes([ECHO_REQUEST, 0]),
            u16::from_ne_bytes([ECHO_REPLY, 0]),
        );
        (*icmp).check = csum::apply(u16::from_ne_bytes((*icmp).check), delta).to_ne_bytes();
        let mac = (*eth).src;
        forward::copy_mac(&mut (*eth).dst, &mac);
        forward::copy_mac(&mut (*eth).src, &cfg.mac);
    }
    count(Counter::TxIcmpEchoReply);
    Ok(xdp_action::XDP_TX)
}

struct Quote {
    eth: *mut Eth,
    ip: *mut Ipv6Hdr,
    icmp: *mut Icmpv6Hdr,
    /// Where the quoted IPv6 header starts (after the 4 bytes of type-specific data).
    at: usize,
    end: usize,
    vlan_dev: u32,
}

/// Replace the address at `field` (in the packet) with `new`; the checksum difference.
///
/// # Safety
/// `field` must be 16 writable bytes of the packet.
#[inline(always)]
unsafe fn replace_addr(field: *mut [u8; 16], new: &Addr6) -> u32 {
    // SAFETY: as the caller promised.
    unsafe {
        let old = read_addr(field);
        write_addr(field, new);
        csum::delta16(&old, new)
    }
}

/// Translate an ICMPv6 error quoting a NATed packet (see icmp.rs `error`, the same rules: a
/// dnat flow's error from the backend's side is sent to the client's own address).
/// Written in steps that each rewrite their field at once and keep only the running checksum
/// difference: holding the seven addresses involved at the same time spilled this program past
/// the verifier's 512-byte stack.
#[inline(always)]
fn error(
    ctx: &XdpContext,
    q: &Quote,
    to_vip: bool,
    to_snat: bool,
    cfg: &Config,
    cfg6: &Config6,
) -> Result<u32, Counter> {
    let no_flow = if to_vip {
        Counter::DropIcmpError
    } else if to_snat {
        Counter::PassReplyNoFlow
    } else {
        Counter::PassNotVip
    };
    // SAFETY: bounds-checked by parse6().
    let hops = unsafe { (*q.ip).hop_limit };
    if hops <= 1 {
        return Err(Counter::PassTtlExceeded);
    }
    let qip: *mut Ipv6Hdr = within(ctx, q.at, q.end).ok_or(no_flow)?;
    // SAFETY: bounds-checked by within() and parse6().
    let (qver, qnh, from_there) = unsafe {
        (
            (*qip).vcf[0] >> 4,
            (*qip).next_hdr,
            // The quote must be of a packet we sent to that side: from the address it was
            // sent to.
            (*qip).src_addr == (*q.ip).dst_addr,
        )
    };
    if qver != 6 || !from_there {
        return Err(no_flow);
    }
    let (l4_check_off, udp) = match qnh {
        IPPROTO_TCP => (TCP_CHECK_OFF, false),
        IPPROTO_UDP => (UDP_CHECK_OFF, true),
        _ => return Err(no_flow),
    };
    let ql4 = q.at + Ipv6Hdr::LEN;
    let qports: *mut Ports = within(ctx, ql4, q.end).ok_or(no_flow)?;
    // The quoted packet reversed is what that side sends us: a client 5-tuple, or a reply's.
    // Built in this CPU's scratch entry (`SCRATCH6`), not on the stack.
    let scratch = crate::maps::SCRATCH6.get_ptr_mut(0).ok_or(no_flow)?;
    // SAFETY: bounds-checked by within(); the scratch entry is ours for the program's run.
    let key: &FlowKey6 = unsafe {
        let k = core::ptr::addr_of_mut!((*scratch).key);
        (*k).src_addr = read_addr(&(*qip).dst_addr);
        (*k).dst_addr = read_addr(&(*qip).src_addr);
        (*k).src_port = (*qports).dst;
        (*k).dst_port = (*qports).src;
        (*k).proto = qnh;
        (*k)._pad0 = 0;
        (*k)._pad1 = 0;
        &*k
    };
    let (f, _) = if to_vip {
        ct6::find(key, vmlb_common::hash::flow_hash6(key), cfg6).map(|(f, c, _)| (f, c))
    } else if !to_snat {
        ct6::find_dnat_reply(key, cfg6.slot_count)
    } else {
        let idx = tuple_slot6(
            &key.src_addr,
            &key.dst_addr,
            key.src_port,
            key.dst_port,
            key.proto,
            cfg6.slot_count,
        );
        ct6::find_reply(idx, key)
    }
    .ok_or(no_flow)?;
    // SAFETY: a valid map value pointer for the program's run; read in place.
    let fl = unsafe { &*f };
    // The quote as the other side sent it (its source is the outer destination), and the peer
    // whose own errors come from the address this side knows it by.
    let (nqsrc, nqsport, nqdst, nqdport, peer) = if to_vip {
        (
            &fl.backend_addr,
            fl.backend_port,
            &fl.snat_addr,
            fl.snat_port,
            &fl.client_addr,
        )
    } else {
        (
            &fl.client_addr,
            fl.client_port,
            &fl.vip_addr,
            fl.vip_port,
            &fl.backend_addr,
        )
    };

    // Where it goes, decided before anything is rewritten (a passed packet stays intact).
    let (ifindex, dst_mac, src_mac) = if to_vip {
        // SAFETY: bounds-checked by parse6().
        let plen = unsafe { u16::from_be_bytes((*q.ip).payload_len) } as u64;
        let h = forward::hop6_raw(
            ctx,
            vmlb_common::IPPROTO_ICMPV6,
            plen,
            q.vlan_dev,
            fl.backend_id,
            &fl.snat_addr,
            nqsrc,
        )?;
        (h.ifindex, h.dst_mac, h.src_mac)
    } else {
        if q.vlan_dev != 0 && fl.client_ifindex != ctx.ingress_ifindex() as u32 {
            return Err(Counter::PassOtherVlan);
        }
        (fl.client_ifindex, fl.client_mac, cfg.mac)
    };

    // SAFETY: all pointers bounds-checked above; the frame is ours to rewrite.
    unsafe {
        // The quote: addresses and ports, and its L4 checksum with them.
        let addrs =
            replace_addr(&mut (*qip).src_addr, nqsrc) + replace_addr(&mut (*qip).dst_addr, nqdst);
        let ports = csum::delta2((*qports).src, nqsport) + csum::delta2((*qports).dst, nqdport);
        (*qports).src = nqsport;
        (*qports).dst = nqdport;
        // The ICMPv6 checksum moves with every changed word of the message, and with the
        // outer addresses through its pseudo-header.
        let mut icmp_delta = addrs + ports;
        if let Some(c) = within::<u16>(ctx, ql4 + l4_check_off, q.end) {
            let old = *c;
            if !(udp && old == 0) {
                let mut new = csum::apply(old, addrs + ports);
                if udp {
                    new = csum::udp_fixup(old, new);
                }
                *c = new;
                icmp_delta += csum::delta2(old, new);
            }
        }
        if read_addr(&(*q.ip).src_addr) == *peer {
            icmp_delta += replace_addr(&mut (*q.ip).src_addr, nqdst);
        }
        icmp_delta += replace_addr(&mut (*q.ip).dst_addr, nqsrc);
        (*q.icmp).check =
            csum::apply(u16::from_ne_bytes((*q.icmp).check), icmp_delta).to_ne_bytes();
        (*q.ip).hop_limit = hops - 1;
    }
    count(Counter::IcmpErrorTranslated);
    Ok(forward::send(
        ctx, q.eth, q.vlan_dev, ifindex, &dst_mac, &src_mac,
    ))
}
