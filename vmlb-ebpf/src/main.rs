//! vmlb's XDP program: Maglev-balanced full NAT (DNAT to the backend, SNAT to a node address)
//! for VIP traffic, with connection tracking. Anything else passes untouched.
//!
//! The entry point dispatches and counts; each stage lives in its own module:
//! parse -> index / ct (flow index, flow slots) / lookup (service, Maglev, backend) -> guard (new-flow
//! rate) -> nat -> forward, with stats alongside. ARP (arp.rs), ICMP (icmp.rs) and IPv6 (v6.rs,
//! with parse6, ct6, icmp6, ndp) are stages of their own.
#![no_std]
#![no_main]
// The BPF `cmpxchg` through the intrinsic (see ct.rs); the eBPF build runs with
// RUSTC_BOOTSTRAP=1 for build-std anyway.
#![feature(core_intrinsics)]
#![expect(
    internal_features,
    reason = "core_intrinsics for BPF cmpxchg, see ct.rs"
)]

mod arp;
mod ct;
mod ct6;
mod forward;
mod guard;
mod icmp;
mod icmp6;
mod index;
mod lookup;
mod maps;
mod nat;
mod ndp;
mod parse;
mod parse6;
mod stats;
mod v6;

use aya_ebpf::{macros::xdp, programs::XdpContext};
use vmlb_common::{
    flow_state as st,
    hash::{flow_hash, snat_addr_index, snat_pick, snat_port, tuple_slot},
    index::index_entry,
    vip_filter_has, Backend, Config, Counter, DnatEndpoint, Flow, FlowKey, Service, DNAT_PROBES,
    IPPROTO_TCP, MAX_SNAT_PER_SERVICE, SNAT_RANDOM_RETRIES, SNAT_RETRIES, SVC_F_DNAT,
};

use crate::{
    parse::{Classify, Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    stats::{count, count_traffic},
};

// Inlined into the entry point the macro generates: as a BPF-to-BPF call the whole body paid
// for a call and a second stack frame on every packet.
#[xdp]
#[inline(always)]
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
            stats::action_of(c)
        }
    }
}

/// The IPv6 path (v6.rs), entered by tail call from `vmlb` with a stack of its own. The frame
/// is parsed again up to its IPv6 header (Ethernet and the tag: a few loads).
#[xdp]
#[inline(always)]
pub fn vmlb6(ctx: XdpContext) -> u32 {
    let Some(cfg) = maps::CONFIG.get(0) else {
        return stats::verdict(Err(Counter::PassNotVip));
    };
    match parse::parse(&ctx, cfg) {
        Err(Classify::Ipv6 { l3, vlan_dev }) => v6::handle(ctx.ctx, l3, vlan_dev),
        _ => stats::verdict(Err(Counter::PassNotIpv4)),
    }
}

/// ICMPv6 (v6.rs `handle_icmp`), entered by tail call from `vmlb6`.
#[xdp]
#[inline(always)]
pub fn vmlb6_icmp(ctx: XdpContext) -> u32 {
    let Some(cfg) = maps::CONFIG.get(0) else {
        return stats::verdict(Err(Counter::PassNotVip));
    };
    match parse::parse(&ctx, cfg) {
        Err(Classify::Ipv6 { l3, vlan_dev }) => v6::handle_icmp(ctx.ctx, l3, vlan_dev),
        _ => stats::verdict(Err(Counter::PassNotIpv4)),
    }
}

#[inline(always)]
fn try_vmlb(ctx: &XdpContext) -> Result<u32, Counter> {
    let cfg = maps::CONFIG.get(0).ok_or(Counter::PassNotVip)?;
    let p = match parse::parse(ctx, cfg) {
        Ok(p) => p,
        Err(Classify::Pass(c)) => return Err(c),
        Err(Classify::Arp { l3 }) => return Ok(arp::answer(ctx.ctx, l3)),
        Err(Classify::Ipv6 { .. }) => {
            // SAFETY: a tail call with our own context; it returns only when no IPv6 program
            // is installed, and then the frame goes to the kernel.
            unsafe { maps::JUMP.tail_call(ctx, vmlb_common::JUMP_V6) };
            return Err(Counter::PassNotIpv4);
        }
        Err(Classify::Icmp {
            l3,
            l4,
            end,
            vlan_dev,
        }) => return Ok(icmp::answer(ctx.ctx, l3, l4, end, vlan_dev)),
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
    // Only frames addressed to this interface are NATed (not broadcast, not another host's);
    // and a packet whose TTL would expire is the kernel's to answer (time-exceeded).
    // SAFETY: `eth` and `ip` were bounds-checked by parse().
    let (dst_mac, ttl) = unsafe { ((*p.eth).dst, (*p.ip).ttl) };
    if !forward::for_us(ctx, &dst_mac, cfg) {
        return Err(Counter::PassOtherMac);
    }
    if ttl <= 1 {
        return Err(Counter::PassTtlExceeded);
    }

    // A backend's reply: the SNAT tuple names its slot.
    if ct::is_snat_addr(p.key.dst_addr, cfg) {
        return reply(ctx, &p, cfg);
    }
    // A dnat backend's reply, named by its source (looked up only when dnat services exist).
    // The same endpoint talking to a VIP is a client, not a reply.
    if cfg.dnat_endpoints != 0 {
        if let Some(ep) = lookup::dnat_endpoint(&p.key) {
            let dst = p.key.dst_addr;
            if !(vip_filter_has(&cfg.vip_filter, dst) && lookup::is_vip(dst)) {
                return dnat_reply(ctx, &p, cfg, &ep);
            }
        }
    }

    let hash = flow_hash(&p.key);
    // A SYN goes to the new-flow path at once, which looks for an existing flow (a
    // retransmission, or the client reusing a closing flow's 5-tuple) only once it has asked
    // for its first SNAT candidate's slot, so the two cache misses overlap.
    if p.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) == TCP_SYN {
        if let Some(action) = new_flow(ctx, &p, cfg, hash, ct::New::IfAbsent)? {
            return Ok(action);
        }
    }

    // The client direction of a known flow: one index bucket, one slot.
    let mut replace = None;
    let mut rebalance = false;
    if let Some((f, c, entry)) = ct::find(&p.key, hash, cfg) {
        let syn = p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
        // SAFETY: a valid map value pointer.
        let backend_id = unsafe { (*f).backend_id };
        if syn && c as u8 == st::CLOSING {
            // The client reuses the 5-tuple of a closing flow. If the table still sends it to
            // the same backend, the flow is reopened on its SNAT tuple, as conntrack does: the
            // backend's TIME_WAIT for that tuple came from this same client, whose timestamps
            // (and ISNs) go on increasing, so the backend accepts the SYN. This keeps a client
            // that cycles through its ports fast from using up SNAT tuples held for TIME_WAIT.
            // Otherwise: a new flow on a new tuple.
            count(Counter::FlowTupleReuse);
            let same = lookup::service(&p.key)
                .and_then(|svc| lookup::pick_backend(&svc, hash).ok())
                == Some(backend_id);
            if same && lookup::backend_up(backend_id) && ct::transition(f, c, st::SYN_SENT) {
                let reopened = (c & !0xff) | st::SYN_SENT as u64;
                return established(ctx, &p, f, reopened);
            }
            replace = Some(entry);
        } else if !lookup::backend_up(backend_id) {
            // Its backend is down: close it (the old SNAT tuple waits out its hold) and move
            // the flow to a backend the Maglev table still has.
            ct::transition(f, c, st::CLOSING);
            count(Counter::FlowRebalanced);
            replace = Some(entry);
            rebalance = true;
        } else {
            return established(ctx, &p, f, c);
        }
    }
    let how = match replace {
        Some(old) if rebalance => ct::New::Rebalance(old),
        Some(old) => ct::New::Replace(old),
        None => ct::New::Fresh,
    };
    // `None` comes back only for `IfAbsent`.
    new_flow(ctx, &p, cfg, hash, how)?.ok_or(Counter::DropFlowRace)
}

#[inline(always)]
fn established(ctx: &XdpContext, p: &Packet, f: *mut Flow, c: u64) -> Result<u32, Counter> {
    ct::track(f, c, p.tcp_flags, false);
    ct::touch(f);
    // SAFETY: a valid map value pointer; copied out at once.
    let fl = unsafe { &*f };
    let (snat, sport, baddr, bport) =
        (fl.snat_addr, fl.snat_port, fl.backend_addr, fl.backend_port);
    let (svc_id, backend_id) = (fl.service_id, fl.backend_id);
    let hop = forward::hop(ctx, &forward::L3::of(p), backend_id, snat, baddr, None)?;
    count(Counter::FlowHit);
    nat::rewrite(p, snat, sport, baddr, bport);
    count_traffic(svc_id, backend_id, p.len, false, false);
    Ok(forward::send(
        ctx,
        p.eth,
        p.vlan_dev,
        hop.ifindex,
        &hop.dst_mac,
        &hop.src_mac,
    ))
}

#[inline(always)]
fn reply(ctx: &XdpContext, p: &Packet, cfg: &Config) -> Result<u32, Counter> {
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
    to_client(ctx, p, cfg, f, c)
}

/// A reply to a dnat service's client. Without a flow here (the VIP moved to this node, or the
/// flow expired) its source alone names the service: it is translated to the VIP and left to
/// the node's kernel, which routes it to the client (the node is the backend's gateway). Its
/// TTL then drops twice on this node (the rewrite's and the kernel's forward): one hop
/// counted as two, on a path that only serves connections a takeover interrupted.
#[inline(always)]
fn dnat_reply(
    ctx: &XdpContext,
    p: &Packet,
    cfg: &Config,
    ep: &DnatEndpoint,
) -> Result<u32, Counter> {
    let k = &p.key;
    if let Some((f, c)) = ct::find_dnat_reply(k, cfg.slot_count) {
        return to_client(ctx, p, cfg, f, c);
    }
    nat::rewrite(p, ep.vip, ep.port, k.dst_addr, k.dst_port);
    count_traffic(ep.service_id, ep.backend_id, p.len, false, true);
    Err(Counter::PassDnatStateless)
}

/// The reply of flow `f` (state `c`), translated back and sent to its client.
#[inline(always)]
fn to_client(
    ctx: &XdpContext,
    p: &Packet,
    cfg: &Config,
    f: *mut Flow,
    c: u64,
) -> Result<u32, Counter> {
    ct::track(f, c, p.tcp_flags, true);
    ct::touch(f);
    // SAFETY: a valid map value pointer; copied out at once.
    let fl = unsafe { &*f };
    let (vip, vport, client, cport) = (fl.vip_addr, fl.vip_port, fl.client_addr, fl.client_port);
    let (svc_id, backend_id, ifindex, mac) = (
        fl.service_id,
        fl.backend_id,
        fl.client_ifindex,
        fl.client_mac,
    );
    // A tagged reply leaves with its tag, so its client must be behind this same interface.
    if p.vlan_dev != 0 && ifindex != ctx.ingress_ifindex() as u32 {
        return Err(Counter::PassOtherVlan);
    }
    count(Counter::ReplyHit);
    nat::rewrite(p, vip, vport, client, cport);
    count_traffic(svc_id, backend_id, p.len, false, true);
    Ok(forward::send(
        ctx, p.eth, p.vlan_dev, ifindex, &mac, &cfg.mac,
    ))
}

/// A flow without a (usable) entry: Maglev picks the backend, the hop cache (or the FIB) the
/// next hop; a free SNAT tuple's slot is claimed and written, indexed under the client 5-tuple
/// (`replace`: in the entry of the flow it replaces) and published; then the packet is
/// rewritten. Nothing is written before the next hop is known, so a packet passed for an
/// unresolved neighbour leaves no state behind.
#[inline(always)]
fn new_flow(
    ctx: &XdpContext,
    p: &Packet,
    cfg: &Config,
    hash: u32,
    how: ct::New,
) -> Result<Option<u32>, Counter> {
    let k = &p.key;
    let (replace, rebalance) = how.replacing();
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
    let dnat = svc.flags & SVC_F_DNAT != 0;
    // Only a SYN opens a TCP flow (an ACK or RST flood creates no state); a flow moved off a
    // down backend is the exception: its next packet reaches the new backend, which resets it.
    if k.proto == IPPROTO_TCP
        && !rebalance
        && p.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) != TCP_SYN
    {
        if dnat {
            // A dnat connection needs no state to go on: the client's own tuple reaches the
            // backend Maglev still picks, so connections made through another node survive
            // a takeover (their replies: `dnat_reply`).
            return dnat_stateless(ctx, p, &svc).map(Some);
        }
        return Err(Counter::DropTcpNoFlow);
    }
    let now = ct::now();
    guard::admit(cfg, now)?;
    let backend_id = lookup::pick_backend(&svc, hash)?;
    let be = lookup::backend(backend_id)?;
    let pick = snat_pick(hash, svc.snat_count);
    // The FIB source only matters for policy routing; any address of the pool will do.
    let fib_src = if dnat { k.src_addr } else { svc.snat_addrs[0] };
    let hop = forward::hop(
        ctx,
        &forward::L3::of(p),
        backend_id,
        fib_src,
        be.addr,
        Some(now),
    )?;

    let (snat0, port0, idx0) = candidate(&svc, &be, k, hash, pick, 0, cfg.slot_count)?;
    let f0 = ct::slot(idx0).ok_or(Counter::DropBadBackend)?;
    let c0 = ct::load(f0);
    if matches!(how, ct::New::IfAbsent) && ct::find(k, hash, cfg).is_some() {
        return Ok(None);
    }
    let mut claimed = ct::claim(f0, c0, now).map(|c| (f0, c, idx0, snat0, port0));
    if claimed.is_none() {
        count(Counter::SnatPortCollision);
        let attempts = if dnat {
            DNAT_PROBES
        } else {
            SNAT_RETRIES + SNAT_RANDOM_RETRIES
        };
        for attempt in 1..attempts {
            let (snat, port, idx) = candidate(&svc, &be, k, hash, pick, attempt, cfg.slot_count)?;
            if let Some(f) = ct::slot(idx) {
                if let Some(c) = ct::claim(f, ct::load(f), now) {
                    claimed = Some((f, c, idx, snat, port));
                    break;
                }
            }
            count(Counter::SnatPortCollision);
        }
    }
    let Some((f, c, idx, snat, port)) = claimed else {
        return Err(if dnat {
            Counter::DropFlowTableFull
        } else {
            Counter::DropSnatExhausted
        });
    };
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
        forward::copy_mac(&mut (*f).client_mac, &(*p.eth).src);
        (*f).proto = k.proto;
        (*f).touched = 0;
    }
    let value = index_entry(hash, idx);
    index::take(
        &maps::FLOW_INDEX,
        cfg.index_buckets,
        hash,
        value,
        replace,
        (f, c),
        ct::slot,
        |f| ct::mine(f, k),
    )?;
    let state = if k.proto == IPPROTO_TCP {
        st::SYN_SENT
    } else {
        st::UDP
    };
    ct::publish(f, c, state);

    count(Counter::FlowNew);
    nat::rewrite(p, snat, port, be.addr, be.port);
    count_traffic(svc.id, backend_id, p.len, true, false);
    Ok(Some(forward::send(
        ctx,
        p.eth,
        p.vlan_dev,
        hop.ifindex,
        &hop.dst_mac,
        &hop.src_mac,
    )))
}

/// A dnat service's client packet without a flow and not a SYN: to its Maglev backend, no state.
#[inline(always)]
fn dnat_stateless(ctx: &XdpContext, p: &Packet, svc: &Service) -> Result<u32, Counter> {
    let k = &p.key;
    let backend_id = lookup::pick_backend(svc, flow_hash(k))?;
    let be = lookup::backend(backend_id)?;
    let hop = forward::hop(
        ctx,
        &forward::L3::of(p),
        backend_id,
        k.src_addr,
        be.addr,
        None,
    )?;
    count(Counter::DnatStateless);
    nat::rewrite(p, k.src_addr, k.src_port, be.addr, be.port);
    count_traffic(svc.id, backend_id, p.len, false, false);
    Ok(forward::send(
        ctx,
        p.eth,
        p.vlan_dev,
        hop.ifindex,
        &hop.dst_mac,
        &hop.src_mac,
    ))
}

/// The `attempt`-th SNAT candidate of a flow: (address, port in wire order, slot). The first
/// `SNAT_RETRIES` come from the flow hash, so `vmlb simulate` can name them; then random ones,
/// because a client that reuses its 5-tuple gets the same hashed candidates every time. Each
/// candidate also moves on to the next address of the pool.
///
/// A dnat flow keeps the client's tuple: its candidates are the slots after that tuple's own.
#[inline(always)]
fn candidate(
    svc: &Service,
    be: &Backend,
    k: &FlowKey,
    hash: u32,
    pick: u32,
    attempt: u32,
    slot_count: u32,
) -> Result<(u32, u16, u32), Counter> {
    let proto = k.proto;
    if svc.flags & SVC_F_DNAT != 0 {
        let base = tuple_slot(be.addr, k.src_addr, be.port, k.src_port, proto, slot_count);
        let idx = ct::dnat_slot(base, attempt, slot_count);
        return Ok((k.src_addr, k.src_port, idx));
    }
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
    let idx = tuple_slot(be.addr, snat, be.port, port, proto, slot_count);
    Ok((snat, port, idx))
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
