//! NAT: rewrite addresses and ports to a conntrack entry's, with incremental checksums.

use vmlb_common::{csum, FlowEntry, IPPROTO_UDP};

use crate::parse::Packet;

/// Rewrite the packet's 5-tuple to `to`'s addresses and ports. Both directions use this: towards
/// the backend (DNAT + SNAT) and back to the client (the reverse).
#[inline(always)]
pub fn rewrite(p: &Packet, to: &FlowEntry) {
    let k = &p.key;
    // SAFETY: every pointer in `Packet` was bounds-checked by parse().
    unsafe {
        // Both addresses are in the IPv4 header and in the L4 pseudo-header: one difference.
        let addrs = csum::delta4(k.src_addr, to.src_addr) + csum::delta4(k.dst_addr, to.dst_addr);
        (*p.ip).saddr = to.src_addr;
        (*p.ip).daddr = to.dst_addr;
        (*p.ip).check = csum::apply((*p.ip).check, addrs);

        (*p.ports).src = to.src_port;
        (*p.ports).dst = to.dst_port;
        let old = *p.l4_check;
        if k.proto == IPPROTO_UDP && old == 0 {
            // UDP without checksum stays without.
            return;
        }
        // The L4 checksum covers the pseudo-header's addresses and the ports.
        let ports = csum::delta2(k.src_port, to.src_port) + csum::delta2(k.dst_port, to.dst_port);
        let mut c = csum::apply(old, addrs + ports);
        if k.proto == IPPROTO_UDP {
            c = csum::udp_fixup(old, c);
        }
        *p.l4_check = c;
    }
}
