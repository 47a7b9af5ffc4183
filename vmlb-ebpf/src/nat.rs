//! NAT: rewrite addresses and ports, with incremental checksums.

use vmlb_common::{csum, IPPROTO_UDP};

use crate::parse::Packet;

/// Rewrite the packet's 5-tuple to `src:sport -> dst:dport` (addresses and ports in wire
/// order) and decrement its TTL, as a router does (the caller made sure it stays above 0).
/// Both directions use this: towards the backend (DNAT + SNAT) and back to the client.
#[inline(always)]
pub fn rewrite(p: &Packet, src: u32, sport: u16, dst: u32, dport: u16) {
    let k = &p.key;
    // SAFETY: every pointer in `Packet` was bounds-checked by parse().
    unsafe {
        // Both addresses are in the IPv4 header and in the L4 pseudo-header: one difference.
        let addrs = csum::delta4(k.src_addr, src) + csum::delta4(k.dst_addr, dst);
        // TTL and protocol share one 16-bit word of the header checksum.
        let (ttl, proto) = ((*p.ip).ttl, (*p.ip).proto);
        let ttl_word = csum::delta2(
            u16::from_ne_bytes([ttl, proto]),
            u16::from_ne_bytes([ttl - 1, proto]),
        );
        (*p.ip).ttl = ttl - 1;
        (*p.ip).saddr = src;
        (*p.ip).daddr = dst;
        (*p.ip).check = csum::apply((*p.ip).check, addrs + ttl_word);

        (*p.ports).src = sport;
        (*p.ports).dst = dport;
        let old = *p.l4_check;
        if k.proto == IPPROTO_UDP && old == 0 {
            // UDP without checksum stays without.
            return;
        }
        // The L4 checksum covers the pseudo-header's addresses and the ports.
        let ports = csum::delta2(k.src_port, sport) + csum::delta2(k.dst_port, dport);
        let mut c = csum::apply(old, addrs + ports);
        if k.proto == IPPROTO_UDP {
            c = csum::udp_fixup(old, c);
        }
        *p.l4_check = c;
    }
}

/// The IPv6 `rewrite`: the 5-tuple to `src:sport -> dst:dport` and the hop limit one lower.
/// IPv6 has no header checksum; the L4 checksum covers the pseudo-header's addresses and the
/// ports. (A UDP checksum of 0 is invalid over IPv6; such a packet stays as broken as it came.)
#[inline(always)]
pub fn rewrite6(
    p: &crate::parse6::Packet6,
    src: &vmlb_common::Addr6,
    sport: u16,
    dst: &vmlb_common::Addr6,
    dport: u16,
) {
    let k = &p.key;
    // SAFETY: every pointer in `Packet6` was bounds-checked by parse6().
    unsafe {
        let addrs = csum::delta16(&k.src_addr, src) + csum::delta16(&k.dst_addr, dst);
        (*p.ip).hop_limit -= 1;
        crate::parse6::write_addr(&mut (*p.ip).src_addr, src);
        crate::parse6::write_addr(&mut (*p.ip).dst_addr, dst);
        (*p.ports).src = sport;
        (*p.ports).dst = dport;
        let old = *p.l4_check;
        let ports = csum::delta2(k.src_port, sport) + csum::delta2(k.dst_port, dport);
        let mut c = csum::apply(old, addrs + ports);
        if k.proto == IPPROTO_UDP {
            c = csum::udp_fixup(old, c);
        }
        *p.l4_check = c;
    }
}
