//! vmlb's XDP program: Maglev-balanced full NAT (DNAT to the backend, SNAT to a node address)
//! for VIP traffic, with connection tracking. Anything else passes untouched.
//!
//! The entry point dispatches and counts; each stage lives in its own module:
//! parse -> ct (flow index and slots) / lookup (service, Maglev, backend) -> guard (new-flow
//! rate) -> nat -> forward, with stats alongside.
#![no_std]
#![no_main]
// The BPF `cmpxchg` through the intrinsic (see ct.rs); the eBPF build runs with
// RUSTC_BOOTSTRAP=1 for build-std anyway.
#![feature(core_intrinsics)]
#![expect(
    internal_features,
    reason = "core_intrinsics for BPF cmpxchg, see ct.rs"
)]

mod ct;
mod forward;
mod guard;
mod lookup;
mod maps;
mod nat;
mod parse;
mod stats;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use vmlb_common::{
    flow_state as st,
    hash::{flow_hash, snat_addr_index, snat_pick, snat_port, tuple_slot},
    Config, Counter, Flow, IPPROTO_TCP, MAX_SNAT_PER_SERVICE, SNAT_RANDOM_RETRIES, SNAT_RETRIES,
};

use crate::{
    parse::{Classify, Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
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
                Counter::DropSnatExhausted | Counter::DropFlowTableFull | Counter::DropBadBackend
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
    let cfg = maps::CONFIG.get(0).ok_or(Counter::PassNotVip)?;
    let now = ct::now();

    // A backend's reply: the SNAT tuple names its slot.
    if ct::is_snat_addr(p.key.dst_addr, cfg) {
        return reply(ctx, &p, cfg, now);
    }

    // The client direction of a known flow: one index lookup, one slot access.
    let mut replace = false;
    let mut rebalance = false;
    if let Some((f, c)) = ct::find(&p.key) {
        let syn = p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
        // SAFETY: a valid map value pointer.
        let backend_id = unsafe { (*f).backend_id };
        if syn && c as u8 == st::CLOSING {
            // The client reuses the 5-tuple of a closing flow: a new flow, and a new SNAT
            // tuple, since the backend may hold the old one in TIME_WAIT.
            count(Counter::FlowTupleReuse);
            replace = true;
        } else if !lookup::backend_up(backend_id) {
            // Its backend is down: close it (the old SNAT tuple waits out its hold) and move
            // the flow to a backend the Maglev table still has.
            ct::transition(f, c, st::CLOSING, now);
            count(Counter::FlowRebalanced);
            replace = true;
            rebalance = true;
        } else {
            return established(ctx, &p, f, c, now);
        }
    }
    new_flow(ctx, &p, cfg, now, replace, rebalance)
}

#[inline(always)]
fn established(
    ctx: &XdpContext,
    p: &Packet,
    f: *mut Flow,
    c: u64,
    now: u32,
) -> Result<u32, Counter> {
    ct::track(f, c, p.tcp_flags, false, now);
    ct::touch(f, now);
    // SAFETY: a valid map value pointer; copied out at once.
    let fl = unsafe { &*f };
    let (snat, sport, baddr, bport) =
        (fl.snat_addr, fl.snat_port, fl.backend_addr, fl.backend_port);
    let (svc_id, backend_id) = (fl.service_id, fl.backend_id);
    let hop = forward::hop(ctx, p, backend_id, snat, baddr, now, true)?;
    count(Counter::FlowHit);
    nat::rewrite(p, snat, sport, baddr, bport);
    count_traffic(svc_id, backend_id, p.len, false, false);
    Ok(forward::send(
        ctx,
        p,
        hop.ifindex,
        &hop.dst_mac,
        &hop.src_mac,
    ))
}

#[inline(always)]
fn reply(ctx: &XdpContext, p: &Packet, cfg: &Config, now: u32) -> Result<u32, Counter> {
    let k = &p.key;
    let idx = tuple_slot(
        k.src_addr,
        k.dst_addr,
        k.src_port,
        k.dst_port,
        k.proto,
        cfg.slot_count,
    );
    let (f, c) = ct::find_reply(idx, k).ok_or(Counter::PassReplyNoFlow)?;
    ct::track(f, c, p.tcp_flags, true, now);
    ct::touch(f, now);
    // SAFETY: a valid map value pointer; copied out at once.
    let fl = unsafe { &*f };
    let (vip, vport, client, cport) = (fl.vip_addr, fl.vip_port, fl.client_addr, fl.client_port);
    let (svc_id, backend_id, ifindex, mac) = (
        fl.service_id,
        fl.backend_id,
        fl.client_ifindex,
        fl.client_mac,
    );
    count(Counter::ReplyHit);
    nat::rewrite(p, vip, vport, client, cport);
    count_traffic(svc_id, backend_id, p.len, false, true);
    Ok(forward::send(ctx, p, ifindex, &mac, &cfg.mac))
}

/// A flow without a (usable) entry: Maglev picks the backend, the hop cache (or the FIB) the
/// next hop, a free SNAT tuple's slot is claimed and written, the flow is indexed, then the
/// packet is rewritten. Nothing is written before the next hop is known, so a packet passed for
/// an unresolved neighbour leaves no state behind.
#[inline(always)]
fn new_flow(
    ctx: &XdpContext,
    p: &Packet,
    cfg: &Config,
    now: u32,
    replace: bool,
    rebalance: bool,
) -> Result<u32, Counter> {
    let k = &p.key;
    let Some(svc) = lookup::service(k) else {
        return Err(if lookup::is_vip(k.dst_addr) {
            Counter::DropUnknownPort
        } else {
            Counter::PassNotVip
        });
    };
    if ct::martian(k.src_addr, cfg) {
        return Err(Counter::DropMartian);
    }
    // Only a SYN opens a TCP flow (an ACK or RST flood creates no state); a flow moved off a
    // down backend is the exception: its next packet reaches the new backend, which resets it.
    if k.proto == IPPROTO_TCP
        && !rebalance
        && p.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) != TCP_SYN
    {
        return Err(Counter::DropTcpNoFlow);
    }
    guard::admit(cfg, now)?;
    let hash = flow_hash(k);
    let backend_id = lookup::pick_backend(&svc, hash)?;
    let be = lookup::backend(backend_id)?;
    let pick = snat_pick(hash, svc.snat_count);
    // The FIB source only matters for policy routing; any address of the pool will do.
    let hop = forward::hop(ctx, p, backend_id, svc.snat_addrs[0], be.addr, now, false)?;

    let mut claimed = None;
    for attempt in 0..SNAT_RETRIES + SNAT_RANDOM_RETRIES {
        // Each candidate moves on to the next address of the pool as well as to another port,
        // so a pool of N addresses gives every flow N times the tuple space to find a free one.
        let a = snat_addr_index(pick, attempt, svc.snat_count) as usize;
        let snat = *svc
            .snat_addrs
            .get(a & (MAX_SNAT_PER_SERVICE - 1))
            .ok_or(Counter::DropBadBackend)?;
        let port = if attempt < SNAT_RETRIES {
            snat_port(hash, attempt, svc.port_min, svc.port_range)
        } else {
            // SAFETY: plain helper call.
            let r = unsafe { aya_ebpf::helpers::bpf_get_prandom_u32() };
            snat_port(r, 0, svc.port_min, svc.port_range)
        }
        .to_be();
        let idx = tuple_slot(be.addr, snat, be.port, port, k.proto, cfg.slot_count);
        if let Some((f, c)) = ct::claim(idx, now) {
            claimed = Some((f, c, idx, snat, port));
            break;
        }
        count(Counter::SnatPortCollision);
    }
    let (f, c, idx, snat, port) = claimed.ok_or(Counter::DropSnatExhausted)?;
    // SAFETY: the slot is ours (CLAIMING) until published; `eth` was bounds-checked by parse().
    unsafe {
        (*f).last_seen = now;
        (*f).stamp = 0;
        (*f).service_id = svc.id;
        (*f).backend_id = backend_id;
        (*f).backend_addr = be.addr;
        (*f).snat_addr = snat;
        (*f).backend_port = be.port;
        (*f).snat_port = port;
        (*f).client_addr = k.src_addr;
        (*f).vip_addr = k.dst_addr;
        (*f).client_port = k.src_port;
        (*f).vip_port = k.dst_port;
        (*f).client_ifindex = ctx.ingress_ifindex() as u32;
        (*f).client_mac = (*p.eth).src;
        (*f).proto = k.proto;
    }
    let state = if k.proto == IPPROTO_TCP {
        st::SYN_SENT
    } else {
        st::UDP
    };
    let c = ct::publish(f, c, state);
    if let Err(e) = ct::index(k, idx, c, replace) {
        ct::release(f, c);
        return Err(e);
    }

    count(Counter::FlowNew);
    nat::rewrite(p, snat, port, be.addr, be.port);
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
