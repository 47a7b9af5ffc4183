//! ICMP for VIPs and NATed flows.
//!
//! - Echo requests to a VIP are answered here (XDP_TX), within a per-CPU rate, so `ping VIP`
//!   works without the kernel owning the address.
//! - Errors (destination unreachable, fragmentation needed included; time exceeded; parameter
//!   problem) that quote a NATed packet are translated for the other side, as RFC 5508 asks of
//!   a NAT: the quoted header is rewritten to what that side sent (addresses, ports, the quoted
//!   IPv4 checksum and the quoted L4 checksum when the quote holds it), the outer destination
//!   becomes that side, and the ICMP checksum follows every changed word. Path-MTU discovery
//!   then works through vmlb from either side. An error the far endpoint sent itself also gets
//!   the address that side knows as its source (the VIP or the SNAT address); a router's own
//!   address is kept, as netfilter does.
//!
//! Every read is bounded by the IPv4 total length as well as the frame: a quote cut short is
//! handled as naming no flow (dropped when sent to a VIP, left to the kernel when sent to a
//! SNAT address, which is also the node's own).
//!
//! Header type: network-types' `Icmpv4Hdr` (its byte-array checksum costs nothing here: this
//! path runs for pings and errors, not for data).

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use network_types::icmp::{Icmpv4Hdr, Icmpv4Type};
use vmlb_common::{
    csum, hash::tuple_slot, Config, Counter, FlowKey, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP,
};

use crate::{
    ct, forward, guard, lookup,
    parse::{Eth, Ipv4, Ports},
    stats::count,
};

const ECHO_REQUEST: u8 = Icmpv4Type::Echo as u8;
const ECHO_REPLY: u8 = Icmpv4Type::EchoReply as u8;
const DEST_UNREACH: u8 = Icmpv4Type::DestinationUnreachable as u8;
const PARAM_PROBLEM: u8 = Icmpv4Type::ParameterProblem as u8;
/// network-types 0.2 has no variant for time exceeded (RFC 792 type 11).
const TIME_EXCEEDED: u8 = 11;
/// The TTL of echo replies (Linux's default).
const REPLY_TTL: u8 = 64;
const TCP_CHECK_OFF: usize = 16;
const UDP_CHECK_OFF: usize = 6;

/// A pointer to a `T` at `off` if it lies within the frame and within the IPv4 packet, which
/// ends at `end` (Ethernet padding is not part of a quote).
#[inline(always)]
fn within<T>(ctx: &XdpContext, off: usize, end: usize) -> Option<*mut T> {
    if off + core::mem::size_of::<T>() > end {
        return None;
    }
    crate::parse::ptr_at(ctx, off)
}

/// An unfragmented ICMP message at `l4` of an IPv4 packet at `l3` ending at `end`: the XDP
/// action, counted. The stage takes plain offsets and re-derives its pointers. It is inlined:
/// as a BPF-to-BPF call (tried) its frame adds to the main one's beyond the verifier's
/// 512-byte stack.
#[inline(always)]
pub fn answer(
    ctx: *mut aya_ebpf::bindings::xdp_md,
    l3: usize,
    l4: usize,
    end: usize,
    vlan_dev: u32,
) -> u32 {
    let ctx = XdpContext::new(ctx);
    let r = match (
        crate::maps::CONFIG.get(0),
        crate::parse::ptr_at(&ctx, 0),
        crate::parse::ptr_at(&ctx, l3),
    ) {
        (Some(cfg), Some(eth), Some(ip)) => handle(&ctx, eth, ip, l4, end, vlan_dev, cfg),
        _ => Err(Counter::PassTruncated),
    };
    crate::stats::verdict(r)
}

#[inline(always)]
fn handle(
    ctx: &XdpContext,
    eth: *mut Eth,
    ip: *mut Ipv4,
    l4: usize,
    end: usize,
    vlan_dev: u32,
    cfg: &Config,
) -> Result<u32, Counter> {
    // SAFETY: `ip` and `eth` were bounds-checked by parse().
    let (dst, dst_mac) = unsafe { ((*ip).daddr, (*eth).dst) };
    let to_vip = lookup::is_vip(dst);
    let to_snat = !to_vip && ct::is_snat_addr(dst, cfg);
    // With dnat services, an error to any address may be about a packet a client sent to a
    // backend (the quote names the backend); without, only SNAT addresses need a look.
    if !to_vip && !to_snat && cfg.dnat_endpoints == 0 {
        return Err(Counter::PassNotVip);
    }
    if !forward::for_us(ctx, &dst_mac, cfg) {
        return Err(Counter::PassOtherMac);
    }
    let Some(icmp) = within::<Icmpv4Hdr>(ctx, l4, end) else {
        return Err(if to_vip {
            Counter::DropTruncated
        } else {
            Counter::PassTruncated
        });
    };
    // SAFETY: bounds-checked by within().
    match unsafe { (*icmp).type_ } {
        ECHO_REQUEST if to_vip => echo(eth, ip, icmp, cfg),
        DEST_UNREACH | TIME_EXCEEDED | PARAM_PROBLEM => {
            let quote = Quote {
                eth,
                ip,
                icmp,
                at: l4 + Icmpv4Hdr::LEN,
                end,
                vlan_dev,
            };
            error(ctx, &quote, to_vip, to_snat, cfg)
        }
        _ if to_vip => Err(Counter::PassUnsupportedProto),
        // Echo replies and the like for the node's own address.
        _ => Err(Counter::PassNotVip),
    }
}

/// Answer an echo request in place: addresses swapped, type 0, a fresh TTL, the MACs turned
/// round. The identifier, sequence and data go back as they came, as RFC 792 asks.
#[inline(always)]
fn echo(eth: *mut Eth, ip: *mut Ipv4, icmp: *mut Icmpv4Hdr, cfg: &Config) -> Result<u32, Counter> {
    // SAFETY: bounds-checked by the caller.
    let src = unsafe { (*ip).saddr };
    // No answers to spoofed broadcast or loopback sources (a smurf reflector otherwise).
    if ct::martian(src, cfg) {
        return Err(Counter::DropIcmpEcho);
    }
    guard::admit_echo(cfg, ct::now())?;
    // SAFETY: bounds-checked by the caller; the frame is ours to rewrite.
    unsafe {
        // Swapping the addresses changes neither checksum; the TTL shares a word with the
        // protocol, and the type with the code.
        let (dst, ttl, proto) = ((*ip).daddr, (*ip).ttl, (*ip).proto);
        (*ip).saddr = dst;
        (*ip).daddr = src;
        (*ip).check = csum::replace2(
            (*ip).check,
            u16::from_ne_bytes([ttl, proto]),
            u16::from_ne_bytes([REPLY_TTL, proto]),
        );
        (*ip).ttl = REPLY_TTL;
        let code = (*icmp).code;
        (*icmp).type_ = ECHO_REPLY;
        (*icmp).check = csum::replace2(
            u16::from_ne_bytes((*icmp).check),
            u16::from_ne_bytes([ECHO_REQUEST, code]),
            u16::from_ne_bytes([ECHO_REPLY, code]),
        )
        .to_ne_bytes();
        let asker = (*eth).src;
        (*eth).dst = asker;
        (*eth).src = cfg.mac;
    }
    count(Counter::TxIcmpEchoReply);
    Ok(xdp_action::XDP_TX)
}

/// An ICMP error and where its quote starts.
struct Quote {
    eth: *mut Eth,
    ip: *mut Ipv4,
    icmp: *mut Icmpv4Hdr,
    /// Offset of the quoted IPv4 header.
    at: usize,
    /// End of the outer IPv4 packet.
    end: usize,
    vlan_dev: u32,
}

/// Translate an ICMP error quoting a NATed packet. `to_vip`: sent by the client's side about a
/// packet we sent it (VIP -> client), so it goes to the backend; else sent by the backend's
/// side about a packet we sent there (SNAT address -> backend, `to_snat`; or, for a dnat
/// flow, client -> backend), so it goes to the client.
#[inline(always)]
fn error(
    ctx: &XdpContext,
    q: &Quote,
    to_vip: bool,
    to_snat: bool,
    cfg: &Config,
) -> Result<u32, Counter> {
    let no_flow = if to_vip {
        Counter::DropIcmpError
    } else if to_snat {
        Counter::PassReplyNoFlow
    } else {
        Counter::PassNotVip
    };
    // SAFETY: bounds-checked by parse().
    let (osrc, odst, ttl) = unsafe { ((*q.ip).saddr, (*q.ip).daddr, (*q.ip).ttl) };
    // Forwarded like any packet: the kernel answers one about to expire.
    if ttl <= 1 {
        return Err(Counter::PassTtlExceeded);
    }
    let qip: *mut Ipv4 = within(ctx, q.at, q.end).ok_or(no_flow)?;
    // SAFETY: bounds-checked by within().
    let (qvihl, qproto, qsrc, qdst, qcheck) = unsafe {
        (
            (*qip).vihl,
            (*qip).proto,
            (*qip).saddr,
            (*qip).daddr,
            (*qip).check,
        )
    };
    let qihl = ((qvihl & 0x0f) as usize) * 4;
    // The quote must be of a packet we sent to that side: from the address it was sent to.
    if qvihl >> 4 != 4 || qihl < 20 || qsrc != odst {
        return Err(no_flow);
    }
    let (l4_check_off, udp) = match qproto {
        IPPROTO_TCP => (TCP_CHECK_OFF, false),
        IPPROTO_UDP => (UDP_CHECK_OFF, true),
        _ => return Err(no_flow),
    };
    let ql4 = q.at + qihl;
    // RFC 792 quotes at least 8 bytes past the IPv4 header: the ports are always there.
    let qports: *mut Ports = within(ctx, ql4, q.end).ok_or(no_flow)?;
    // SAFETY: bounds-checked by within().
    let (qsport, qdport) = unsafe { ((*qports).src, (*qports).dst) };
    // The quoted packet reversed is what that side sends us: a client 5-tuple, or a reply's.
    let key = FlowKey {
        src_addr: qdst,
        dst_addr: qsrc,
        src_port: qdport,
        dst_port: qsport,
        proto: qproto,
        _pad0: 0,
        _pad1: 0,
    };
    let (f, _) = if to_vip {
        ct::find(&key, vmlb_common::hash::flow_hash(&key), cfg).map(|(f, c, _)| (f, c))
    } else if !to_snat {
        ct::find_dnat_reply(&key, cfg.slot_count)
    } else {
        let idx = tuple_slot(
            key.src_addr,
            key.dst_addr,
            key.src_port,
            key.dst_port,
            key.proto,
            cfg.slot_count,
        );
        ct::find_reply(idx, &key)
    }
    .ok_or(no_flow)?;
    // SAFETY: a valid map value pointer; copied out at once.
    let fl = unsafe { &*f };
    // The quote as the other side sent it, the outer destination, and where it goes.
    let (nqsrc, nqsport, nqdst, nqdport, ndst, nsrc_if_endpoint, peer) = if to_vip {
        (
            fl.backend_addr,
            fl.backend_port,
            fl.snat_addr,
            fl.snat_port,
            fl.backend_addr,
            fl.snat_addr,
            fl.client_addr,
        )
    } else {
        (
            fl.client_addr,
            fl.client_port,
            fl.vip_addr,
            fl.vip_port,
            fl.client_addr,
            fl.vip_addr,
            fl.backend_addr,
        )
    };
    let nsrc = if osrc == peer { nsrc_if_endpoint } else { osrc };
    let (backend_id, snat, client_ifindex, client_mac) = (
        fl.backend_id,
        fl.snat_addr,
        fl.client_ifindex,
        fl.client_mac,
    );

    // Where it goes, decided before anything is rewritten (a passed packet stays intact).
    let (ifindex, dst_mac, src_mac) = if to_vip {
        let l3 = forward::L3 {
            ip: q.ip,
            proto: IPPROTO_ICMP,
            vlan_dev: q.vlan_dev,
        };
        let hop = forward::hop(ctx, &l3, backend_id, snat, ndst, None)?;
        (hop.ifindex, hop.dst_mac, hop.src_mac)
    } else {
        if q.vlan_dev != 0 && client_ifindex != ctx.ingress_ifindex() as u32 {
            return Err(Counter::PassOtherVlan);
        }
        (client_ifindex, client_mac, cfg.mac)
    };

    // SAFETY: all pointers bounds-checked above; the frame is ours to rewrite.
    unsafe {
        let addrs = csum::delta4(qsrc, nqsrc) + csum::delta4(qdst, nqdst);
        let ports = csum::delta2(qsport, nqsport) + csum::delta2(qdport, nqdport);
        let nqcheck = csum::apply(qcheck, addrs);
        // Every changed word of the ICMP payload moves the ICMP checksum.
        let mut icmp_delta = addrs + ports + csum::delta2(qcheck, nqcheck);
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
        (*qip).saddr = nqsrc;
        (*qip).daddr = nqdst;
        (*qip).check = nqcheck;
        (*qports).src = nqsport;
        (*qports).dst = nqdport;
        (*q.icmp).check =
            csum::apply(u16::from_ne_bytes((*q.icmp).check), icmp_delta).to_ne_bytes();

        let proto = (*q.ip).proto;
        let outer = csum::delta4(osrc, nsrc)
            + csum::delta4(odst, ndst)
            + csum::delta2(
                u16::from_ne_bytes([ttl, proto]),
                u16::from_ne_bytes([ttl - 1, proto]),
            );
        (*q.ip).saddr = nsrc;
        (*q.ip).daddr = ndst;
        (*q.ip).ttl = ttl - 1;
        (*q.ip).check = csum::apply((*q.ip).check, outer);
    }
    count(Counter::IcmpErrorTranslated);
    Ok(forward::send(
        ctx, q.eth, q.vlan_dev, ifindex, &dst_mac, &src_mac,
    ))
}
