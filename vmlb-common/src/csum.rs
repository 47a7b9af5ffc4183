//! Incremental Internet checksum updates (RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m')).
//!
//! Values are taken exactly as loaded from the packet (native-endian loads of big-endian
//! fields): the one's complement sum is byte-order independent (RFC 1071 §2(B)), so no swaps are
//! needed as long as the checksum and the fields are loaded the same way.

#[inline(always)]
const fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// The (unfolded) one's complement difference of a 16-bit field changing from `old` to `new`:
/// the `~m + m'` of RFC 1624. Differences add up, so several field changes, or the same
/// address change in two checksums (IPv4 header and pseudo-header), cost one fold each.
#[inline(always)]
pub const fn delta2(old: u16, new: u16) -> u32 {
    !old as u32 + new as u32
}

/// `delta2` for a 32-bit field (an IPv4 address).
#[inline(always)]
pub const fn delta4(old: u32, new: u32) -> u32 {
    (!old & 0xffff) + (!old >> 16) + (new & 0xffff) + (new >> 16)
}

/// `delta2` for a 128-bit field (an IPv6 address, as `Addr6`).
#[inline(always)]
pub const fn delta16(old: &crate::Addr6, new: &crate::Addr6) -> u32 {
    delta4(old[0], new[0])
        + delta4(old[1], new[1])
        + delta4(old[2], new[2])
        + delta4(old[3], new[3])
}

/// Checksum after changes whose differences add up to `delta` (a few dozen fields at most, so
/// the sum cannot overflow u32).
#[inline(always)]
pub const fn apply(check: u16, delta: u32) -> u16 {
    !fold(!check as u32 + delta)
}

/// Checksum after one 16-bit field changes from `old` to `new`.
#[inline(always)]
pub const fn replace2(check: u16, old: u16, new: u16) -> u16 {
    apply(check, delta2(old, new))
}

/// Checksum after one 32-bit field (an IPv4 address) changes from `old` to `new`.
#[inline(always)]
pub const fn replace4(check: u16, old: u32, new: u32) -> u16 {
    apply(check, delta4(old, new))
}

/// UDP: a zero checksum means "none" (RFC 768) and must stay zero; a computed zero is sent as
/// 0xffff.
#[inline(always)]
pub const fn udp_fixup(old_check: u16, new_check: u16) -> u16 {
    if old_check == 0 {
        0
    } else if new_check == 0 {
        0xffff
    } else {
        new_check
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Straightforward RFC 1071 checksum over 16-bit native loads, for comparison.
    fn full(words: &[u16]) -> u16 {
        let mut sum: u32 = 0;
        for w in words {
            sum += *w as u32;
        }
        !fold(sum)
    }

    /// xorshift32: deterministic test data without a dependency in a no_std crate.
    fn xorshift(mut state: u32) -> impl FnMut() -> u32 {
        move || {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state
        }
    }

    /// 0x0000 and 0xffff are the same value in one's complement.
    fn same_checksum(a: u16, b: u16) -> bool {
        a == b || (a ^ b) == 0xffff && (a == 0 || a == 0xffff)
    }

    #[test]
    fn incremental_matches_full_recompute() {
        let mut next = xorshift(0x1234_5678);
        for _ in 0..10_000 {
            let mut words: [u16; 10] = core::array::from_fn(|_| next() as u16);
            let check = full(&words);
            // Replace a 32-bit field (words 2..4) and a 16-bit field (word 7).
            let old4 = words[2] as u32 | (words[3] as u32) << 16;
            let new4 = next();
            words[2] = new4 as u16;
            words[3] = (new4 >> 16) as u16;
            let c = replace4(check, old4, new4);
            let old2 = words[7];
            words[7] = next() as u16;
            let c = replace2(c, old2, words[7]);
            let expect = full(&words);
            assert!(same_checksum(c, expect), "{c:#x} vs {expect:#x}");
        }
    }

    #[test]
    fn summed_deltas_match_a_full_recompute() {
        let mut next = xorshift(0x9e37_79b9);
        for _ in 0..10_000 {
            let mut words: [u16; 12] = core::array::from_fn(|_| next() as u16);
            let check = full(&words);
            // Two addresses (words 0..4) and two ports (words 8, 9), as NAT changes them.
            let (a, b) = (next(), next());
            let old_a = words[0] as u32 | (words[1] as u32) << 16;
            let old_b = words[2] as u32 | (words[3] as u32) << 16;
            let (p, q) = (next() as u16, next() as u16);
            let d = delta4(old_a, a) + delta4(old_b, b) + delta2(words[8], p) + delta2(words[9], q);
            words[0] = a as u16;
            words[1] = (a >> 16) as u16;
            words[2] = b as u16;
            words[3] = (b >> 16) as u16;
            words[8] = p;
            words[9] = q;
            let c = apply(check, d);
            let expect = full(&words);
            assert!(same_checksum(c, expect), "{c:#x} vs {expect:#x}");
        }
    }

    #[test]
    fn udp_zero_stays_zero() {
        assert_eq!(udp_fixup(0, 0x1234), 0);
        assert_eq!(udp_fixup(0x55, 0), 0xffff);
        assert_eq!(udp_fixup(0x55, 0x66), 0x66);
    }
}
