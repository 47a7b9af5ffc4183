//! Lookup: services, the Maglev ring, backends.

use vmlb_common::{
    hash::maglev_slot, Backend, Counter, DnatEndpoint, EndpointKey, FlowKey, Service, ServiceKey,
    BE_F_UP,
};

use crate::maps::{BACKENDS, DNAT_ENDPOINTS, MAGLEV, SERVICES, VIPS};

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

/// The dnat service whose backend sent this packet (its source), if any.
#[inline(always)]
pub fn dnat_endpoint(key: &FlowKey) -> Option<DnatEndpoint> {
    let ekey = EndpointKey {
        addr: key.src_addr,
        port: key.src_port,
        proto: key.proto,
        _pad: 0,
    };
    // SAFETY: copied out at once.
    DNAT_ENDPOINTS.get_ptr(&ekey).map(|e| unsafe { *e })
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
