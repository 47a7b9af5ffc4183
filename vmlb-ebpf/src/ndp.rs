//! Neighbour discovery for IPv6 VIPs (ARP's IPv6 counterpart, RFC 4861): a neighbour
//! solicitation for a VIP this node owns is answered in place with a neighbour advertisement
//! (solicited, override, with the interface's MAC as target link-layer address) and sent back
//! out (XDP_TX). Everything else (solicitations for other addresses, duplicate address
//! detection probes from `::`, advertisements, router messages) goes to the kernel. Ownership
//! and its deadline are IPv4's (`VIP_F_OWNED`, `Config::owned_until`).

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use network_types::ip::Ipv6Hdr;
use vmlb_common::{csum, Addr6, Config, Counter, IPPROTO_ICMPV6, VIP_F_OWNED};

use crate::parse::{ptr_at, Eth};
use crate::parse6::{read_addr, write_addr};

pub const NEIGHBOR_SOLICIT: u8 = 135;
const NEIGHBOR_ADVERT: u8 = 136;
/// Solicited and override flags, in wire order.
const NA_FLAGS: u32 = 0x6000_0000u32.to_be();
const OPT_TARGET_LL_ADDR: u8 = 2;
/// ICMPv6 type/code/checksum/flags/target (24 bytes), then an 8-byte link-layer option.
const NA_LEN: usize = 24;
const NA_WITH_OPT_LEN: usize = 32;

/// The message after the 4-byte ICMPv6 header, as in RFC 4861 4.3/4.4.
#[repr(C)]
struct Nd {
    type_: u8,
    code: u8,
    check: u16,
    flags: u32,
    target: [u8; 16],
}

#[repr(C)]
struct LlOpt {
    type_: u8,
    len: u8,
    mac: [u8; 6],
}

/// Answer a neighbour solicitation at `l4` (the IPv6 payload ends at `end`) for an owned VIP.
#[inline(always)]
pub fn answer(
    ctx: &XdpContext,
    eth: *mut Eth,
    ip: *mut Ipv6Hdr,
    l4: usize,
    end: usize,
    cfg: &Config,
) -> Result<u32, Counter> {
    let nd: *mut Nd = ptr_at(ctx, l4).ok_or(Counter::PassNdp)?;
    // SAFETY: bounds-checked by ptr_at and parse6; the frame is ours to rewrite.
    unsafe {
        // RFC 4861 7.1.1: hop limit 255 (not forwarded), code 0, at least 24 bytes.
        if (*ip).hop_limit != 255 || (*nd).code != 0 || end < l4 + NA_LEN {
            return Err(Counter::PassNdp);
        }
        let src = read_addr(&(*ip).src_addr);
        // Duplicate address detection (from ::) is the kernel's to judge.
        if src == [0; 4] {
            return Err(Counter::PassNdp);
        }
        let target = read_addr(&(*nd).target);
        match crate::lookup::vip6_flags(&target) {
            Some(flags) if flags & VIP_F_OWNED != 0 => {}
            _ => return Err(Counter::PassNdp),
        }
        if cfg.owned_until != 0 && crate::ct::now().wrapping_sub(cfg.owned_until) as i32 >= 0 {
            return Err(Counter::PassNdp);
        }
        // The link-layer option goes where the solicitation's own options were; a unicast
        // solicitation without any (RFC 4861 allows it) gets an advertisement without (7.2.4:
        // SHOULD include), since the frame cannot grow here.
        let opt: Option<*mut LlOpt> = if end >= l4 + NA_WITH_OPT_LEN {
            ptr_at(ctx, l4 + NA_LEN)
        } else {
            None
        };
        let len = if opt.is_some() {
            NA_WITH_OPT_LEN
        } else {
            NA_LEN
        } as u16;

        let asker_mac = (*eth).src;
        crate::forward::copy_mac(&mut (*eth).dst, &asker_mac);
        crate::forward::copy_mac(&mut (*eth).src, &cfg.mac);
        (*ip).payload_len = len.to_be_bytes();
        (*ip).hop_limit = 255;
        write_addr(&mut (*ip).dst_addr, &src);
        write_addr(&mut (*ip).src_addr, &target);
        (*nd).type_ = NEIGHBOR_ADVERT;
        (*nd).flags = NA_FLAGS;
        let mut sum = pseudo(&target, &src, len)
            + words2([NEIGHBOR_ADVERT, 0])
            + sum32(NA_FLAGS)
            + addr_sum(&target);
        if let Some(o) = opt {
            (*o).type_ = OPT_TARGET_LL_ADDR;
            (*o).len = 1;
            crate::forward::copy_mac(&mut (*o).mac, &cfg.mac);
            let m = cfg.mac;
            sum += words2([OPT_TARGET_LL_ADDR, 1])
                + words2([m[0], m[1]])
                + words2([m[2], m[3]])
                + words2([m[4], m[5]]);
        }
        (*nd).check = csum::apply(0xffff, sum);
    }
    crate::stats::count(Counter::TxNdpAdvert);
    Ok(xdp_action::XDP_TX)
}

/// Two wire bytes as the checksum sums them.
#[inline(always)]
fn words2(b: [u8; 2]) -> u32 {
    u16::from_ne_bytes(b) as u32
}

/// A 32-bit field's two 16-bit words, summed.
#[inline(always)]
fn sum32(x: u32) -> u32 {
    (x & 0xffff) + (x >> 16)
}

#[inline(always)]
fn addr_sum(a: &Addr6) -> u32 {
    sum32(a[0]) + sum32(a[1]) + sum32(a[2]) + sum32(a[3])
}

/// The ICMPv6 pseudo-header's sum (RFC 8200 8.1): addresses, upper-layer length, next header.
#[inline(always)]
pub fn pseudo(src: &Addr6, dst: &Addr6, len: u16) -> u32 {
    addr_sum(src) + addr_sum(dst) + words2(len.to_be_bytes()) + words2([0, IPPROTO_ICMPV6])
}
