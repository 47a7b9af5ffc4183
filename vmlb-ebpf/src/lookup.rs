//! Lookup: conntrack, services, the Maglev ring, backends.

use vmlb_common::{
    hash::maglev_slot, Backend, Counter, FlowEntry, FlowKey, Service, ServiceKey, BE_F_UP,
};

use crate::maps::{BACKENDS, FLOWS, MAGLEV, SERVICES, VIPS};

#[inline(always)]
pub fn flow(key: &FlowKey) -> Option<FlowEntry> {
    // SAFETY: the value is copied out at once; LRU entries may be replaced concurrently, and a
    // copy of a 40-byte plain value is fine either way.
    FLOWS.get_ptr(key).map(|e| unsafe { *e })
}

#[inline(always)]
pub fn service(key: &FlowKey) -> Option<Service> {
    let skey = ServiceKey {
        vip: key.dst_addr,
        port: key.dst_port,
        proto: key.proto,
        _pad: 0,
    };
    // SAFETY: copied out at once.
    SERVICES.get_ptr(&skey).map(|s| unsafe { *s })
}

#[inline(always)]
pub fn is_vip(addr: u32) -> bool {
    VIPS.get_ptr(&addr).is_some()
}

#[inline(always)]
pub fn backend(id: u32) -> Result<Backend, Counter> {
    match BACKENDS.get(id) {
        Some(b) if b.addr != 0 => Ok(*b),
        _ => Err(Counter::DropBadBackend),
    }
}

#[inline(always)]
pub fn backend_up(id: u32) -> bool {
    BACKENDS.get(id).is_some_and(|b| b.flags & BE_F_UP != 0)
}

/// Maglev: the backend id in the service's ring slot for this flow hash.
#[inline(always)]
pub fn pick_backend(svc: &Service, hash: u32) -> Result<u32, Counter> {
    let slot = svc.ring_base + maglev_slot(hash, svc.ring_size);
    match MAGLEV.get(slot) {
        Some(&id) if id != 0 => Ok(id),
        _ => Err(Counter::DropNoBackend),
    }
}

/// Insert the flow's entries: first the reply entry with NOEXIST, which claims a free SNAT port
/// (linear probing from a hash-derived start, bounded), then the client entry.
/// Returns the SNAT port (wire order).
#[inline(always)]
pub fn insert_flow(
    key: &FlowKey,
    hash: u32,
    to_backend: &mut FlowEntry,
    to_client: &FlowEntry,
) -> Result<u16, Counter> {
    let mut reply_key = FlowKey {
        src_addr: to_backend.dst_addr,
        dst_addr: to_backend.src_addr,
        src_port: to_backend.dst_port,
        dst_port: 0,
        proto: key.proto,
        _pad0: 0,
        _pad1: 0,
    };
    let mut port = 0u16;
    for attempt in 0..vmlb_common::SNAT_RETRIES {
        reply_key.dst_port = vmlb_common::hash::snat_port(hash, attempt).to_be();
        if FLOWS
            .insert(
                &reply_key,
                to_client,
                aya_ebpf::bindings::BPF_NOEXIST as u64,
            )
            .is_ok()
        {
            port = reply_key.dst_port;
            break;
        }
        crate::stats::count(Counter::SnatPortCollision);
    }
    if port == 0 {
        return Err(Counter::DropSnatExhausted);
    }
    to_backend.src_port = port;
    if FLOWS
        .insert(key, &*to_backend, aya_ebpf::bindings::BPF_ANY as u64)
        .is_err()
    {
        let _ = FLOWS.remove(&reply_key);
        return Err(Counter::DropFlowInsert);
    }
    Ok(port)
}
