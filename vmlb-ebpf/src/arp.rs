//! ARP for VIPs: a request for a VIP this node owns is answered in place with the interface's
//! MAC (RFC 826: swap sender and target, set our hardware address as sender, opcode reply) and
//! sent back out (XDP_TX). Anything else ARP goes to the kernel: requests for other addresses,
//! replies, and gratuitous ARP (sender = target), which announce rather than ask. Ownership
//! can carry a deadline (`Config::owned_until`): past it nothing is answered.
//!
//! The header type is network-types' `ArpHdr` (byte arrays, so no alignment assumptions); this
//! path runs once per neighbour per reachable-time, so its few extra byte loads cost nothing.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use network_types::arp::ArpHdr;
use vmlb_common::{Config, Counter, VIP_F_OWNED};

use crate::{maps::VIPS, parse::Eth};

const ARP_ETHERNET: u16 = 1;
const ARP_IPV4: u16 = 0x0800;
const ARP_REQUEST: u16 = 1;
const ARP_REPLY: u16 = 2;

/// ARP at offset `l3` of the frame: the XDP action, counted. Like the ICMP stage it takes a
/// plain offset, re-derives its pointers and is inlined (as a BPF-to-BPF call its frame adds
/// to the main one's beyond the verifier's 512-byte stack).
#[inline(always)]
pub fn answer(ctx: *mut aya_ebpf::bindings::xdp_md, l3: usize) -> u32 {
    let ctx = XdpContext::new(ctx);
    let r = match (crate::maps::CONFIG.get(0), crate::parse::ptr_at(&ctx, 0)) {
        (Some(cfg), Some(eth)) => handle(&ctx, eth, l3, cfg),
        _ => Err(Counter::PassArp),
    };
    crate::stats::verdict(r)
}

/// Answer an ARP request for an owned VIP; `Err` is the pass counter otherwise.
#[inline(always)]
fn handle(ctx: &XdpContext, eth: *mut Eth, l3: usize, cfg: &Config) -> Result<u32, Counter> {
    let arp: *mut ArpHdr = crate::parse::ptr_at(ctx, l3).ok_or(Counter::PassTruncated)?;
    // SAFETY: bounds-checked by ptr_at; the frame is ours to rewrite.
    unsafe {
        let a = &mut *arp;
        if a.htype() != ARP_ETHERNET
            || a.ptype() != ARP_IPV4
            || a.hlen != 6
            || a.plen != 4
            || a.oper() != ARP_REQUEST
            || a.spa == a.tpa
        {
            return Err(Counter::PassArp);
        }
        let target = u32::from_ne_bytes(a.tpa);
        match VIPS.get(target) {
            Some(flags) if flags & VIP_F_OWNED != 0 => {}
            _ => return Err(Counter::PassArp),
        }
        // Ownership lapses unless the daemon keeps renewing it (see `Config::owned_until`).
        if cfg.owned_until != 0 && crate::ct::now().wrapping_sub(cfg.owned_until) as i32 >= 0 {
            return Err(Counter::PassArp);
        }
        let (asker_mac, asker_ip) = (a.sha, a.spa);
        a.set_oper(ARP_REPLY);
        a.tha = asker_mac;
        a.tpa = asker_ip;
        a.sha = cfg.mac;
        a.spa = target.to_ne_bytes();
        (*eth).dst = asker_mac;
        (*eth).src = cfg.mac;
    }
    crate::stats::count(Counter::TxArpReply);
    Ok(xdp_action::XDP_TX)
}
