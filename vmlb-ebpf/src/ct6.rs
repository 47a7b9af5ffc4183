//! Conntrack for IPv6: `FLOW_INDEX6` and `FLOW_SLOTS6`, with the same design and the same
//! state machine as ct.rs (whose `Slot` functions serve both families): one slot per flow,
//! found by the client through the index and by the reply through its SNAT tuple's hash (a dnat
//! flow's: through its source, `DNAT_ENDPOINTS6`, and the `DNAT_PROBES` slots of its tuple).

use vmlb_common::{flow_state as st, Addr6, Config6, Flow6, FlowKey6};

use crate::{
    ct::load,
    maps::{FLOW_INDEX6, FLOW_SLOTS6, VIPS6},
};

#[inline(always)]
pub fn slot(idx: u32) -> Option<*mut Flow6> {
    FLOW_SLOTS6.get_ptr_mut(idx)
}

#[inline(always)]
fn eq(a: &Addr6, b: &Addr6) -> bool {
    a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3]
}

/// The client direction (see `ct::find`).
#[inline(always)]
pub fn find(key: &FlowKey6, hash: u32, cfg6: &Config6) -> Option<(*mut Flow6, u64, u64)> {
    crate::index::find(&FLOW_INDEX6, cfg6.index_buckets, hash, slot, |f| {
        mine(f, key)
    })
}

/// Whether slot `f` holds the client 5-tuple `key`.
#[inline(always)]
pub fn mine(f: *mut Flow6, key: &FlowKey6) -> bool {
    // SAFETY: a valid map value pointer.
    unsafe {
        eq(&(*f).client_addr, &key.src_addr)
            && eq(&(*f).vip_addr, &key.dst_addr)
            && (*f).client_port == key.src_port
            && (*f).vip_port == key.dst_port
            && (*f).proto == key.proto
    }
}

/// The reply direction: the flow holding this SNAT tuple in slot `idx`.
#[inline(always)]
pub fn find_reply(idx: u32, key: &FlowKey6) -> Option<(*mut Flow6, u64)> {
    let f = slot(idx)?;
    let c = load(f);
    if (c as u8) <= st::CLAIMING {
        return None;
    }
    // SAFETY: `f` is a valid map value pointer.
    let ok = unsafe {
        eq(&(*f).backend_addr, &key.src_addr)
            && eq(&(*f).snat_addr, &key.dst_addr)
            && (*f).backend_port == key.src_port
            && (*f).snat_port == key.dst_port
            && (*f).proto == key.proto
    };
    ok.then_some((f, c))
}

/// The reply direction of a dnat flow: the tuple's slot and the `DNAT_PROBES - 1` after it
/// (see `ct::find_dnat_reply`).
#[inline(always)]
pub fn find_dnat_reply(key: &FlowKey6, slot_count: u32) -> Option<(*mut Flow6, u64)> {
    let base = vmlb_common::hash::tuple_slot6(
        &key.src_addr,
        &key.dst_addr,
        key.src_port,
        key.dst_port,
        key.proto,
        slot_count,
    );
    let mut probe = 0;
    while probe < vmlb_common::DNAT_PROBES {
        if let Some(found) = find_reply(crate::ct::dnat_slot(base, probe, slot_count), key) {
            return Some(found);
        }
        probe += 1;
    }
    None
}

/// Is `addr` one of the node's IPv6 SNAT addresses?
#[inline(always)]
pub fn is_snat_addr(addr: &Addr6, cfg: &Config6) -> bool {
    let n = cfg.snat_count as usize;
    let mut i = 0;
    while i < vmlb_common::MAX_SNAT_ADDRS {
        if i >= n {
            return false;
        }
        if eq(&cfg.snat_addrs[i], addr) {
            return true;
        }
        i += 1;
    }
    false
}

/// A source that must never be NATed: unspecified (::), loopback (::1), multicast (ff00::/8),
/// or one of our own VIP / SNAT addresses.
#[inline(always)]
pub fn martian(src: &Addr6, cfg: &Config6) -> bool {
    let first = src[0].to_ne_bytes()[0];
    let zero_prefix = src[0] == 0 && src[1] == 0 && src[2] == 0;
    let last = u32::from_be(src[3]);
    if first == 0xff || (zero_prefix && last <= 1) {
        return true;
    }
    is_snat_addr(src, cfg)
        || (vmlb_common::vip_filter_has(&cfg.vip_filter, vmlb_common::vip6_filter_word(src))
            && VIPS6.get_ptr(src).is_some())
}
