//! Conntrack for IPv6: `FLOWS6` and `FLOW_SLOTS6`, with the same design and the same state
//! machine as ct.rs (whose `Slot` functions serve both families): one slot per flow, found by
//! the client through the index and by the reply through its SNAT tuple's hash.

use aya_ebpf::bindings::{BPF_ANY, BPF_NOEXIST};
use vmlb_common::{flow_state as st, Addr6, Config6, Counter, Flow6, FlowKey6, FlowRef};

use crate::{
    ct::load,
    maps::{FLOWS6, FLOW_SLOTS6, VIPS6},
};

const EEXIST: i32 = -17;

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
pub fn find(key: &FlowKey6) -> Option<(*mut Flow6, u64)> {
    // SAFETY: copied out at once.
    let r = unsafe { *FLOWS6.get_ptr(key)? };
    let f = slot(r.slot)?;
    let c = load(f);
    let state = c as u8;
    if state == st::CLAIMING {
        return None;
    }
    // SAFETY: a valid map value pointer.
    let mine = unsafe {
        eq(&(*f).client_addr, &key.src_addr)
            && eq(&(*f).vip_addr, &key.dst_addr)
            && (*f).client_port == key.src_port
            && (*f).vip_port == key.dst_port
            && (*f).proto == key.proto
    };
    if mine && state > st::CLAIMING {
        return Some((f, c));
    }
    crate::stats::count(Counter::FlowStale);
    let _ = FLOWS6.remove(key);
    None
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

/// Index a new flow under its client 5-tuple (see `ct::index`).
#[inline(always)]
pub fn index(key: &FlowKey6, idx: u32, replace: bool) -> Result<crate::ct::Indexed, Counter> {
    let r = FlowRef { slot: idx, _pad: 0 };
    let flags = if replace { BPF_ANY } else { BPF_NOEXIST };
    match FLOWS6.insert(key, &r, flags as u64) {
        Ok(()) => Ok(crate::ct::Indexed::Done),
        Err(EEXIST) => Ok(crate::ct::Indexed::Exists),
        Err(_) => Err(Counter::DropFlowTableFull),
    }
}

#[inline(always)]
pub fn reindex(key: &FlowKey6, idx: u32) {
    if let Some(r) = FLOWS6.get_ptr_mut(key) {
        // SAFETY: a valid map value pointer; only this CPU is creating this flow.
        unsafe { (*r).slot = idx };
    }
}

#[inline(always)]
pub fn unindex(key: &FlowKey6) {
    let _ = FLOWS6.remove(key);
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
