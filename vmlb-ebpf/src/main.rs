//! vmlb's XDP program: Maglev-balanced full NAT (DNAT to the backend, SNAT to a node address)
//! for VIP traffic, with connection tracking. Anything else passes untouched.
//!
//! The entry point dispatches and counts; each stage lives in its own module:
//! parse -> lookup (conntrack, service, Maglev) -> nat -> forward, with stats alongside.
#![no_std]
#![no_main]

mod forward;
mod lookup;
mod maps;
mod nat;
mod parse;
mod stats;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use vmlb_common::{hash::flow_hash, Counter, FlowEntry, Service, DIR_TO_BACKEND, DIR_TO_CLIENT};

use crate::{
    parse::{Classify, Packet},
    stats::{count, count_traffic},
};

#[xdp]
pub fn vmlb(ctx: XdpContext) -> u32 {
    match try_vmlb(&ctx) {
        Ok(action) => action,
        Err(c) => {
            count(c);
            if matches!(
                c,
                Counter::DropSnatExhausted | Counter::DropFlowInsert | Counter::DropBadBackend
            ) {
                // Rare and actionable (the daemon turns these into tracing events); the
                // counters carry the volume.
                aya_log_ebpf::warn!(&ctx, "new flow dropped: counter {}", c as u32);
            }
            if c.is_drop() {
                xdp_action::XDP_DROP
            } else {
                xdp_action::XDP_PASS
            }
        }
    }
}

#[inline(always)]
fn try_vmlb(ctx: &XdpContext) -> Result<u32, Counter> {
    let p = match parse::parse(ctx) {
        Ok(p) => p,
        Err(Classify::Pass(c)) => return Err(c),
        Err(Classify::Ipv4 {
            dst,
            if_vip,
            if_not_vip,
        }) => {
            return Err(if lookup::is_vip(dst) {
                if_vip
            } else {
                if_not_vip
            })
        }
    };

    // Established flows and replies: one lookup, one rewrite.
    if let Some(e) = lookup::flow(&p.key) {
        if e.dir == DIR_TO_BACKEND {
            if !lookup::backend_up(e.backend_id) {
                count(Counter::FlowRebalanced);
                let svc = lookup::service(&p.key).ok_or(Counter::DropNoBackend)?;
                return new_flow(ctx, &p, &svc);
            }
            count(Counter::FlowHit);
        } else {
            count(Counter::ReplyHit);
        }
        nat::rewrite(&p, &e);
        count_traffic(
            e.service_id,
            e.backend_id,
            p.len,
            false,
            e.dir == DIR_TO_CLIENT,
        );
        return Ok(forward::send(ctx, &p, e.ifindex, &e.dst_mac, &e.src_mac));
    }

    if let Some(svc) = lookup::service(&p.key) {
        return new_flow(ctx, &p, &svc);
    }
    Err(if lookup::is_vip(p.key.dst_addr) {
        Counter::DropUnknownPort
    } else {
        Counter::PassNotVip
    })
}

/// A flow without a (usable) conntrack entry: Maglev picks the backend, the FIB the next hop,
/// a free SNAT port is claimed, both conntrack entries are written, then the packet is rewritten.
/// Nothing is written before the next hop is known, so a packet passed for an unresolved
/// neighbour leaves no state behind.
#[inline(always)]
fn new_flow(ctx: &XdpContext, p: &Packet, svc: &Service) -> Result<u32, Counter> {
    let k = &p.key;
    let hash = flow_hash(k);
    let backend_id = lookup::pick_backend(svc, hash)?;
    let be = lookup::backend(backend_id)?;
    let hop = forward::lookup(ctx, p, svc.snat_addr, be.addr)?;

    let mut to_backend = FlowEntry {
        src_addr: svc.snat_addr,
        dst_addr: be.addr,
        src_port: 0, // set by insert_flow
        dst_port: be.port,
        service_id: svc.id,
        backend_id,
        ifindex: hop.ifindex,
        dst_mac: hop.dst_mac,
        src_mac: hop.src_mac,
        dir: DIR_TO_BACKEND,
        _pad0: 0,
        _pad1: 0,
    };
    // SAFETY: `eth` was bounds-checked by parse().
    let (client_mac, our_mac) = unsafe { ((*p.eth).src, (*p.eth).dst) };
    let to_client = FlowEntry {
        src_addr: k.dst_addr,
        dst_addr: k.src_addr,
        src_port: k.dst_port,
        dst_port: k.src_port,
        service_id: svc.id,
        backend_id,
        ifindex: ctx.ingress_ifindex() as u32,
        dst_mac: client_mac,
        src_mac: our_mac,
        dir: DIR_TO_CLIENT,
        _pad0: 0,
        _pad1: 0,
    };
    lookup::insert_flow(k, hash, &mut to_backend, &to_client)?;

    count(Counter::FlowNew);
    nat::rewrite(p, &to_backend);
    count_traffic(svc.id, backend_id, p.len, true, false);
    Ok(forward::send(
        ctx,
        p,
        hop.ifindex,
        &hop.dst_mac,
        &hop.src_mac,
    ))
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
