//! Per-CPU counters: no atomics needed, user space sums the CPUs.

use vmlb_common::{Counter, TrafficStats};

use crate::maps::{BE_STATS, STATS, SVC_STATS};

#[inline(always)]
pub fn count(c: Counter) {
    if let Some(v) = STATS.get_ptr_mut(c as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *v += 1 };
    }
}

/// The XDP action of a packet that ended in counter `c` (a drop, or a pass).
#[inline(always)]
pub fn action_of(c: Counter) -> u32 {
    if c.is_drop() {
        aya_ebpf::bindings::xdp_action::XDP_DROP
    } else {
        aya_ebpf::bindings::xdp_action::XDP_PASS
    }
}

/// Count the end of a packet handled by a stage of its own: its action, or its counter.
#[inline(always)]
pub fn verdict(r: Result<u32, Counter>) -> u32 {
    match r {
        Ok(action) => action,
        Err(c) => {
            count(c);
            action_of(c)
        }
    }
}

#[inline(always)]
fn traffic(t: *mut TrafficStats, bytes: u64, new_flow: bool, reply: bool) {
    // SAFETY: as above, a per-CPU slot.
    unsafe {
        (*t).packets += 1;
        (*t).bytes += bytes;
        if new_flow {
            (*t).new_flows += 1;
        }
        if reply {
            (*t).reply_packets += 1;
        }
    }
}

/// Account a forwarded packet to its service and backend.
#[inline(always)]
pub fn count_traffic(service_id: u32, backend_id: u32, bytes: u64, new_flow: bool, reply: bool) {
    if let Some(t) = SVC_STATS.get_ptr_mut(service_id) {
        traffic(t, bytes, new_flow, reply);
    }
    if let Some(t) = BE_STATS.get_ptr_mut(backend_id) {
        traffic(t, bytes, new_flow, reply);
    }
}
