//! Flood guard: a per-CPU token bucket on new flows. Established flows never depend on it (the
//! flow table evicts nothing), so a flood above the rate costs only new flows, counted as
//! `drop_flood`; without a configured rate every new flow is admitted and a full table refuses
//! new flows (`drop_flow_table_full`) until expiry frees room.

use vmlb_common::{Config, Counter};

use crate::maps::NEW_FLOW_RATE;

/// Tokens are kept scaled by 1024 so that sub-flow refills per clock unit add up.
const SCALE: u64 = 1024;

#[inline(always)]
pub fn admit(cfg: &Config, now: u32) -> Result<(), Counter> {
    if cfg.new_flow_rate == 0 {
        return Ok(());
    }
    let Some(b) = NEW_FLOW_RATE.get_ptr_mut(0) else {
        return Ok(());
    };
    // SAFETY: per-CPU slot, only this CPU touches it while the program runs.
    unsafe {
        let burst = (cfg.new_flow_burst.max(1) as u64) * SCALE;
        // Clock units are 2^20 ns: rate per unit = rate * 2^20 / 1e9 ~= rate / 954.
        let elapsed = now.wrapping_sub((*b).stamp) as u64;
        let refill = elapsed * cfg.new_flow_rate as u64 * SCALE / 954;
        let tokens = ((*b).tokens + refill).min(burst);
        (*b).stamp = now;
        if tokens < SCALE {
            (*b).tokens = tokens;
            return Err(Counter::DropFlood);
        }
        (*b).tokens = tokens - SCALE;
    }
    Ok(())
}
