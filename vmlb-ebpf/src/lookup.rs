//! Lookup: services, the Maglev ring, backends.

use vmlb_common::{
    hash::maglev_slot, Addr6, Backend, Backend6, Counter, DnatEndpoint, DnatEndpoint6, EndpointKey,
    EndpointKey6, FlowKey, FlowKey6, Service, Service6, ServiceKey, ServiceKey6, BE_F_UP,
};

use crate::maps::{
    BACKENDS, BACKENDS6, DNAT_ENDPOINTS, DNAT_ENDPOINTS6, MAGLEV, SERVICES, SERVICES6, VIPS, VIPS6,
};

#[inline(always)]
pub fn service(key: &FlowKey) -> Option<Service> {
    let skey = ServiceKey {
        vip: key.dst_addr,
        port: key.dst_port,
        proto: key.proto,
        _pad: 0,
    };
    // SAFETY: copied out at once.
    SERVICES.get_ptr(skey).map(|s| unsafe { *s })
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
    DNAT_ENDPOINTS.get_ptr(ekey).map(|e| unsafe { *e })
}

#[inline(always)]
pub fn is_vip(addr: u32) -> bool {
    VIPS.get_ptr(addr).is_some()
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
    pick(svc.ring_base, svc.ring_size, hash)
}

#[inline(always)]
fn pick(ring_base: u32, ring_size: u32, hash: u32) -> Result<u32, Counter> {
    let slot = ring_base + maglev_slot(hash, ring_size);
    match MAGLEV.get(slot) {
        Some(&id) if id != 0 => Ok(id),
        _ => Err(Counter::DropNoBackend),
    }
}

/// The IPv6 service, by reference into the map (IPv6 values are large: copying them out cost
/// stack the IPv6 program does not have; a concurrent update is seen as IPv4's copy would be).
#[inline(always)]
pub fn service6(key: &FlowKey6) -> Option<&'static Service6> {
    let skey = ServiceKey6 {
        vip: key.dst_addr,
        port: key.dst_port,
        proto: key.proto,
        _pad: 0,
    };
    // SAFETY: a map value stays valid for the program's run.
    SERVICES6.get_ptr(skey).map(|s| unsafe { &*s })
}

/// The IPv6 dnat service whose backend sent this packet (its source), if any; by reference
/// into the map, as `service6`.
#[inline(always)]
pub fn dnat_endpoint6(key: &FlowKey6) -> Option<&'static DnatEndpoint6> {
    let ekey = EndpointKey6 {
        addr: key.src_addr,
        port: key.src_port,
        proto: key.proto,
        _pad: 0,
    };
    // SAFETY: a map value stays valid for the program's run.
    DNAT_ENDPOINTS6.get_ptr(ekey).map(|e| unsafe { &*e })
}

#[inline(always)]
pub fn vip6_flags(addr: &Addr6) -> Option<u32> {
    // SAFETY: copied out at once.
    VIPS6.get_ptr(addr).map(|f| unsafe { *f })
}

#[inline(always)]
pub fn backend6(id: u32) -> Result<&'static Backend6, Counter> {
    match BACKENDS6.get(id) {
        Some(b) if b.addr != [0; 4] => Ok(b),
        _ => Err(Counter::DropBadBackend),
    }
}

#[inline(always)]
pub fn backend6_up(id: u32) -> bool {
    BACKENDS6.get(id).is_some_and(|b| b.flags & BE_F_UP != 0)
}

/// Maglev for an IPv6 service (the same shared array; its table names `BACKENDS6` ids).
#[inline(always)]
pub fn pick_backend6(svc: &Service6, hash: u32) -> Result<u32, Counter> {
    pick(svc.ring_base, svc.ring_size, hash)
}
