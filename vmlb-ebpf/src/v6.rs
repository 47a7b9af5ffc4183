//! The IPv6 packet path, with IPv4's stages and policies (main.rs) on the IPv6 maps:
//! parse6 -> icmp6 (NDP, echo, errors) | index / ct6 (flow index, flow slots) / lookup (service, Maglev,
//! backend) -> guard -> nat (`rewrite6`) -> forward. Full NAT and dnat, as IPv4.
//!
//! A program of its own (`vmlb6` in main.rs), entered by tail call from `vmlb` and re-deriving
//! its pointers from plain offsets: inlined into `vmlb` it did not fit the verifier's 512-byte
//! stack, and a BPF-to-BPF call would add its frame to the entry point's (see maps.rs `JUMP`).

use aya_ebpf::programs::XdpContext;
use vmlb_common::{
    flow_state as st,
    hash::{flow_hash6, snat_addr_index, snat_pick, snat_port, tuple_slot6},
    index::index_entry,
    vip6_filter_word, vip_filter_has, Backend6, Config, Config6, Counter, DnatEndpoint6, Flow6,
    FlowKey6, Service6, DNAT_PROBES, IPPROTO_TCP, MAX_SNAT_PER_SERVICE, SNAT_RANDOM_RETRIES,
    SNAT_RETRIES, SVC_F_DNAT,
};

use crate::{
    ct, ct6, forward, guard, index, lookup, nat,
    parse::{ptr_at, Eth, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    parse6::{parse6, Classify6, Packet6},
    stats::{count, count_traffic},
};

/// An ICMPv6 message (NDP, echo, errors: icmp6.rs), entered by its own tail call from `handle`
/// (the ICMPv6 stage's stack and the TCP/UDP path's do not fit in one program's 512 bytes).
#[inline(always)]
pub fn handle_icmp(ctx: *mut aya_ebpf::bindings::xdp_md, l3: usize, vlan_dev: u32) -> u32 {
    let ctx = XdpContext::new(ctx);
    let r = match (
        crate::maps::CONFIG.get(0),
        crate::maps::CONFIG6.get(0),
        ptr_at(&ctx, 0),
        ptr_at(&ctx, l3),
    ) {
        (Some(cfg), Some(cfg6), Some(eth), Some(ip)) => {
            // Not parse6(): its check that the frame holds the whole payload would let LLVM
            // drop the frame-end checks of the reads below (it knows `end` is within the
            // frame; the verifier does not). `icmp6` bounds every read by both instead.
            let ip: *mut network_types::ip::Ipv6Hdr = ip;
            // SAFETY: bounds-checked by ptr_at.
            let (version, nh, plen) = unsafe {
                (
                    (*ip).vcf[0] >> 4,
                    (*ip).next_hdr,
                    u16::from_be_bytes((*ip).payload_len) as usize,
                )
            };
            if version == 6 && nh == vmlb_common::IPPROTO_ICMPV6 {
                let l4 = l3 + network_types::ip::Ipv6Hdr::LEN;
                crate::icmp6::handle(&ctx, eth, ip, l4, l4 + plen, vlan_dev, cfg, cfg6)
            } else {
                Err(Counter::PassNotVip)
            }
        }
        _ => Err(Counter::PassNotVip),
    };
    crate::stats::verdict(r)
}

/// An IPv6 frame whose header starts at `l3`: the XDP action, counted.
#[inline(always)]
pub fn handle(ctx: *mut aya_ebpf::bindings::xdp_md, l3: usize, vlan_dev: u32) -> u32 {
    let ctx = XdpContext::new(ctx);
    let r = match (
        crate::maps::CONFIG.get(0),
        crate::maps::CONFIG6.get(0),
        ptr_at(&ctx, 0),
    ) {
        (Some(cfg), Some(cfg6), Some(eth)) => run(&ctx, eth, l3, vlan_dev, cfg, cfg6),
        _ => Err(Counter::PassNotVip),
    };
    crate::stats::verdict(r)
}

#[inline(always)]
fn run(
    ctx: &XdpContext,
    eth: *mut Eth,
    l3: usize,
    vlan_dev: u32,
    cfg: &Config,
    cfg6: &Config6,
) -> Result<u32, Counter> {
    let p = match parse6(ctx, eth, l3, vlan_dev) {
        Ok(p) => p,
        Err(Classify6::Pass(c)) => return Err(c),
        Err(Classify6::Icmp) => {
            // SAFETY: a tail call with our own context; it returns only when the ICMPv6
            // program is not installed.
            unsafe { crate::maps::JUMP.tail_call(ctx, vmlb_common::JUMP_V6_ICMP) };
            return Err(Counter::PassNotVip);
        }
        Err(Classify6::Exception { if_vip, if_not_vip }) => {
            let vip =
                crate::parse6::dst_of(ctx, l3).is_some_and(|d| lookup::vip6_flags(&d).is_some());
            return Err(if vip { if_vip } else { if_not_vip });
        }
    };
    // SAFETY: bounds-checked by parse6().
    let (dst_mac, hops) = unsafe { ((*p.eth).dst, (*p.ip).hop_limit) };
    if !forward::for_us(ctx, &dst_mac, cfg) {
        return Err(Counter::PassOtherMac);
    }
    if hops <= 1 {
        return Err(Counter::PassTtlExceeded);
    }
    if ct6::is_snat_addr(&p.key.dst_addr, cfg6) {
        return reply(ctx, &p, cfg, cfg6);
    }
    // A dnat backend's reply, named by its source (see main.rs).
    if cfg6.dnat_endpoints != 0 {
        if let Some(ep) = lookup::dnat_endpoint6(&p.key) {
            let dst = &p.key.dst_addr;
            if !(vip_filter_has(&cfg6.vip_filter, vip6_filter_word(dst))
                && lookup::vip6_flags(dst).is_some())
            {
                return dnat_reply(ctx, &p, cfg, cfg6, ep);
            }
        }
    }
    let hash = flow_hash6(&p.key);
    // A SYN first: see main.rs.
    if p.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) == TCP_SYN {
        if let Some(action) = new_flow(ctx, &p, cfg, cfg6, hash, ct::New::IfAbsent)? {
            return Ok(action);
        }
    }
    let mut replace = None;
    let mut rebalance = false;
    if let Some((f, c, entry)) = ct6::find(&p.key, hash, cfg6) {
        let syn = p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
        // SAFETY: a valid map value pointer.
        let backend_id = unsafe { (*f).backend_id };
        if syn && c as u8 == st::CLOSING {
            // A closing flow's 5-tuple reused: reopened on its SNAT tuple when Maglev still
            // names its backend (see main.rs).
            count(Counter::FlowTupleReuse);
            let same = lookup::service6(&p.key)
                .and_then(|svc| lookup::pick_backend6(svc, hash).ok())
                == Some(backend_id);
            if same && lookup::backend6_up(backend_id) && ct::transition(f, c, st::SYN_SENT) {
                let reopened = (c & !0xff) | st::SYN_SENT as u64;
                return established(ctx, &p, f, reopened);
            }
            replace = Some(entry);
        } else if !lookup::backend6_up(backend_id) {
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
    new_flow(ctx, &p, cfg, cfg6, hash, how)?.ok_or(Counter::DropFlowRace)
}

#[inline(always)]
fn established(ctx: &XdpContext, p: &Packet6, f: *mut Flow6, c: u64) -> Result<u32, Counter> {
    ct::track(f, c, p.tcp_flags, false);
    ct::touch(f);
    // SAFETY: a valid map value pointer for the program's run (read in place: the addresses
    // would cost the IPv6 program stack it does not have).
    let fl = unsafe { &*f };
    let (svc_id, backend_id) = (fl.service_id, fl.backend_id);
    let hop = forward::hop6(ctx, p, backend_id, &fl.snat_addr, &fl.backend_addr, None)?;
    count(Counter::FlowHit);
    nat::rewrite6(
        p,
        &fl.snat_addr,
        fl.snat_port,
        &fl.backend_addr,
        fl.backend_port,
    );
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
fn reply(ctx: &XdpContext, p: &Packet6, cfg: &Config, cfg6: &Config6) -> Result<u32, Counter> {
    let k = &p.key;
    let idx = tuple_slot6(
        &k.src_addr,
        &k.dst_addr,
        k.src_port,
        k.dst_port,
        k.proto,
        cfg6.slot_count,
    );
    let (f, c) = ct6::find_reply(idx, k).ok_or(Counter::PassReplyNoFlow)?;
    to_client(ctx, p, cfg, f, c)
}

/// A reply to an IPv6 dnat service's client; without a flow here, translated by its source
/// alone and left to the node's kernel to route (see main.rs `dnat_reply`).
#[inline(always)]
fn dnat_reply(
    ctx: &XdpContext,
    p: &Packet6,
    cfg: &Config,
    cfg6: &Config6,
    ep: &DnatEndpoint6,
) -> Result<u32, Counter> {
    let k = &p.key;
    if let Some((f, c)) = ct6::find_dnat_reply(k, cfg6.slot_count) {
        return to_client(ctx, p, cfg, f, c);
    }
    nat::rewrite6(p, &ep.vip, ep.port, &k.dst_addr, k.dst_port);
    count_traffic(ep.service_id, ep.backend_id, p.len, false, true);
    Err(Counter::PassDnatStateless)
}

/// The reply of flow `f` (state `c`), translated back and sent to its client.
#[inline(always)]
fn to_client(
    ctx: &XdpContext,
    p: &Packet6,
    cfg: &Config,
    f: *mut Flow6,
    c: u64,
) -> Result<u32, Counter> {
    ct::track(f, c, p.tcp_flags, true);
    ct::touch(f);
    // SAFETY: a valid map value pointer for the program's run (read in place, as above).
    let fl = unsafe { &*f };
    let (svc_id, backend_id, ifindex, mac) = (
        fl.service_id,
        fl.backend_id,
        fl.client_ifindex,
        fl.client_mac,
    );
    if p.vlan_dev != 0 && ifindex != ctx.ingress_ifindex() as u32 {
        return Err(Counter::PassOtherVlan);
    }
    count(Counter::ReplyHit);
    nat::rewrite6(
        p,
        &fl.vip_addr,
        fl.vip_port,
        &fl.client_addr,
        fl.client_port,
    );
    count_traffic(svc_id, backend_id, p.len, false, true);
    Ok(forward::send(
        ctx, p.eth, p.vlan_dev, ifindex, &mac, &cfg.mac,
    ))
}

/// A flow without a (usable) entry: as main.rs `new_flow`, on the IPv6 maps.
#[inline(always)]
fn new_flow(
    ctx: &XdpContext,
    p: &Packet6,
    cfg: &Config,
    cfg6: &Config6,
    hash: u32,
    how: ct::New,
) -> Result<Option<u32>, Counter> {
    let k = &p.key;
    let (replace, rebalance) = how.replacing();
    let Some(svc) = lookup::service6(k) else {
        return Err(if lookup::vip6_flags(&k.dst_addr).is_some() {
            Counter::DropUnknownPort
        } else {
            Counter::PassNotVip
        });
    };
    if ct6::martian(&k.src_addr, cfg6) {
        return Err(Counter::DropMartian);
    }
    let dnat = svc.flags & SVC_F_DNAT != 0;
    if k.proto == IPPROTO_TCP
        && !rebalance
        && p.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) != TCP_SYN
    {
        if dnat {
            // No state needed to go on (see main.rs).
            return dnat_stateless(ctx, p, svc, hash).map(Some);
        }
        return Err(Counter::DropTcpNoFlow);
    }
    let now = ct::now();
    guard::admit(cfg, now)?;
    let backend_id = lookup::pick_backend6(svc, hash)?;
    let be = lookup::backend6(backend_id)?;
    let pick = snat_pick(hash, svc.snat_count);
    // The FIB source only matters for policy routing; any address of the pool will do.
    let fib_src = if dnat {
        &k.src_addr
    } else {
        &svc.snat_addrs[0]
    };
    let hop = forward::hop6(ctx, p, backend_id, fib_src, &be.addr, Some(now))?;

    let (snat0, port0, idx0) = candidate(svc, be, k, hash, pick, 0, cfg6.slot_count);
    let f0 = ct6::slot(idx0).ok_or(Counter::DropBadBackend)?;
    let c0 = ct::load(f0);
    if matches!(how, ct::New::IfAbsent) && ct6::find(k, hash, cfg6).is_some() {
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
            let (snat, port, idx) = candidate(svc, be, k, hash, pick, attempt, cfg6.slot_count);
            if let Some(f) = ct6::slot(idx) {
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
    // SAFETY: the slot is ours (CLAIMING) until published; `eth` was bounds-checked.
    unsafe {
        (*f).last_seen = now;
        (*f).stamp = 0;
        (*f).service_id = svc.id;
        (*f).backend_id = backend_id;
        copy_addr(&mut (*f).backend_addr, &be.addr);
        // The pool's address by its index (a pointer carried out of the candidate loop would
        // be a verifier state per offset); a dnat flow's "SNAT" side is the client's own.
        if dnat {
            copy_addr(&mut (*f).snat_addr, &k.src_addr);
        } else {
            copy_addr(
                &mut (*f).snat_addr,
                &svc.snat_addrs[snat as usize & (MAX_SNAT_PER_SERVICE - 1)],
            );
        }
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
    // Indexed as main.rs `new_flow` does.
    let value = index_entry(hash, idx);
    index::take(
        &crate::maps::FLOW_INDEX6,
        cfg6.index_buckets,
        hash,
        value,
        replace,
        (f, c),
        ct6::slot,
        |f| ct6::mine(f, k),
    )?;
    let state = if k.proto == IPPROTO_TCP {
        st::SYN_SENT
    } else {
        st::UDP
    };
    ct::publish(f, c, state);
    count(Counter::FlowNew);
    // SAFETY: the slot written above; read in place (the address would cost stack).
    nat::rewrite6(p, unsafe { &(*f).snat_addr }, port, &be.addr, be.port);
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

/// A dnat service's client packet without a flow and not a SYN: to its Maglev backend, no
/// state (see main.rs).
#[inline(always)]
fn dnat_stateless(
    ctx: &XdpContext,
    p: &Packet6,
    svc: &Service6,
    hash: u32,
) -> Result<u32, Counter> {
    let k = &p.key;
    let backend_id = lookup::pick_backend6(svc, hash)?;
    let be = lookup::backend6(backend_id)?;
    let hop = forward::hop6(ctx, p, backend_id, &k.src_addr, &be.addr, None)?;
    count(Counter::DnatStateless);
    nat::rewrite6(p, &k.src_addr, k.src_port, &be.addr, be.port);
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

/// The `attempt`-th SNAT candidate (see main.rs `candidate`): the index of its address in the
/// service's pool, its port (wire order) and its slot. A dnat flow keeps the client's tuple
/// (index 0, unused): its candidates are the slots after that tuple's own.
#[inline(always)]
fn candidate(
    svc: &Service6,
    be: &Backend6,
    k: &FlowKey6,
    hash: u32,
    pick: u32,
    attempt: u32,
    slot_count: u32,
) -> (u32, u16, u32) {
    let proto = k.proto;
    if svc.flags & SVC_F_DNAT != 0 {
        let base = tuple_slot6(
            &be.addr,
            &k.src_addr,
            be.port,
            k.src_port,
            proto,
            slot_count,
        );
        return (0, k.src_port, ct::dnat_slot(base, attempt, slot_count));
    }
    let a = snat_addr_index(pick, attempt, svc.snat_count) & (MAX_SNAT_PER_SERVICE as u32 - 1);
    let snat = &svc.snat_addrs[a as usize];
    let port = if attempt < SNAT_RETRIES {
        snat_port(hash, attempt, svc.port_min, svc.port_range)
    } else {
        // SAFETY: plain helper call.
        let r = unsafe { aya_ebpf::helpers::bpf_get_prandom_u32() };
        snat_port(r, 0, svc.port_min, svc.port_range)
    }
    .to_be();
    let idx = tuple_slot6(&be.addr, snat, be.port, port, proto, slot_count);
    (a, port, idx)
}

/// Copy an address between map values word by word: a plain assignment becomes a call to a
/// byte-loop `memmove` in the BPF backend (it cannot tell the two do not overlap).
///
/// # Safety
/// Both must be valid, 4-byte aligned addresses (every `Addr6` in a map value is).
#[inline(always)]
unsafe fn copy_addr(dst: *mut vmlb_common::Addr6, src: *const vmlb_common::Addr6) {
    let (d, s) = (dst.cast::<u32>(), src.cast::<u32>());
    // SAFETY: as the caller promised.
    unsafe {
        let w = (s.read(), s.add(1).read(), s.add(2).read(), s.add(3).read());
        d.write(w.0);
        d.add(1).write(w.1);
        d.add(2).write(w.2);
        d.add(3).write(w.3);
    }
}
