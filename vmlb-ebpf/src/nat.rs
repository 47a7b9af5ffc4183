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
