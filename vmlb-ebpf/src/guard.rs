//! Per-CPU token buckets. The flood guard: a new flow over the rate is refused (`drop_flood`);
//! established flows never depend on it (the flow table evicts nothing), and without a
//! configured rate every new flow is admitted and a full table refuses new flows
//! (`drop_flow_table_full`) until expiry frees room. ICMP echo answers for VIPs use a bucket of
//! their own, so a ping flood cannot turn the node into a reflector.

use vmlb_common::{Config, Counter, RATE_ICMP_ECHO, RATE_NEW_FLOW};

use crate::maps::RATE;

/// Tokens are kept scaled by 1024 so that sub-unit refills per clock unit add up.
const SCALE: u64 = 1024;

/// A new flow may be created now.
#[inline(always)]
pub fn admit(cfg: &Config, now: u32) -> Result<(), Counter> {
    take(RATE_NEW_FLOW, cfg.new_flow_rate, cfg.new_flow_burst, now).ok_or(Counter::DropFlood)
}

/// An ICMP echo request may be answered now.
#[inline(always)]
pub fn admit_echo(cfg: &Config, now: u32) -> Result<(), Counter> {
    take(RATE_ICMP_ECHO, cfg.icmp_echo_rate, cfg.icmp_echo_burst, now).ok_or(Counter::DropIcmpEcho)
}

/// Take one token from bucket `idx` refilled at `rate` per second, `burst` deep; rate 0 means
/// unlimited.
#[inline(always)]
fn take(idx: u32, rate: u32, burst: u32, now: u32) -> Option<()> {
    if rate == 0 {
        return Some(());
    }
    let Some(b) = RATE.get_ptr_mut(idx) else {
        return Some(());
    };
    // SAFETY: per-CPU slot, only this CPU touches it while the program runs.
    unsafe {
        let burst = (burst.max(1) as u64) * SCALE;
        // Clock units are 2^20 ns: rate per unit = rate * 2^20 / 1e9 ~= rate / 954.
        let elapsed = now.wrapping_sub((*b).stamp) as u64;
        let refill = elapsed * rate as u64 * SCALE / 954;
        let tokens = ((*b).tokens + refill).min(burst);
        (*b).stamp = now;
        if tokens < SCALE {
            (*b).tokens = tokens;
            return None;
        }
        (*b).tokens = tokens - SCALE;
    }
    Some(())
}
