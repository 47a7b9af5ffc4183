//! Forward: next hop from the kernel's FIB, MAC rewrite, XDP_TX or redirect.

use aya_ebpf::{
    bindings::{bpf_fib_lookup as FibParams, xdp_action},
    helpers::{bpf_fib_lookup, bpf_redirect},
    programs::XdpContext,
};
use vmlb_common::{Counter, Hop, HOP_TTL};

use crate::{maps::HOPS, parse::Eth, stats::count};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;
const BPF_FIB_LKUP_RET_NO_NEIGH: i64 = 7;

pub struct NextHop {
    pub ifindex: u32,
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
}

/// The next hop towards backend `id` at `addr`, from this CPU's cache, else from the FIB (and
/// cached). `now`: a new flow, which also refreshes a hop older than `HOP_TTL`; established
/// packets (`None`) read no clock and rely on the daemon invalidating the cache every few
/// seconds. A new flow is not created without a hop; an established one keeps its last known
/// hop when a refresh fails (the kernel is re-resolving the neighbour).
///
/// `l3` says what is being forwarded (IPv4 total length, protocol, VLAN device) for the FIB. A
/// tagged frame is only sent back out of its own interface with its tag, so its next hop must be
/// on its VLAN's device (or the interface itself); else it is passed (`pass_other_vlan`).
#[inline(always)]
pub fn hop(
    ctx: &XdpContext,
    l3: &L3,
    id: u32,
    src: u32,
    addr: u32,
    now: Option<u32>,
) -> Result<Hop, Counter> {
    let h = cached_hop(id, now, || lookup(ctx, l3, src, addr))?;
    on_vlan(ctx, l3.vlan_dev, h)
}

/// A tagged frame's next hop must be on its VLAN's device or its own interface.
#[inline(always)]
fn on_vlan(ctx: &XdpContext, vlan_dev: u32, h: Hop) -> Result<Hop, Counter> {
    if vlan_dev != 0 && h.ifindex != vlan_dev && h.ifindex != ctx.ingress_ifindex() as u32 {
        return Err(Counter::PassOtherVlan);
    }
    Ok(h)
}

/// `hop` for an IPv6 backend (the same per-CPU cache, by backend id).
#[inline(always)]
pub fn hop6(
    ctx: &XdpContext,
    p: &crate::parse6::Packet6,
    id: u32,
    src: &vmlb_common::Addr6,
    addr: &vmlb_common::Addr6,
    now: Option<u32>,
) -> Result<Hop, Counter> {
    let h = cached_hop(id, now, || {
        // SAFETY: bounds-checked by parse6(); read only when the FIB is asked.
        let plen = unsafe { u16::from_be_bytes((*p.ip).payload_len) } as u64;
        lookup6(ctx, p.key.proto, plen, src, addr)
    })?;
    on_vlan(ctx, p.vlan_dev, h)
}

/// `hop6` from the FIB inputs themselves (an ICMPv6 error, not a TCP/UDP packet).
#[inline(always)]
pub fn hop6_raw(
    ctx: &XdpContext,
    proto: u8,
    plen: u64,
    vlan_dev: u32,
    id: u32,
    src: &vmlb_common::Addr6,
    addr: &vmlb_common::Addr6,
) -> Result<Hop, Counter> {
    let h = cached_hop(id, None, || lookup6(ctx, proto, plen, src, addr))?;
    on_vlan(ctx, vlan_dev, h)
}

/// What the FIB lookup needs to know of the packet being forwarded.
pub struct L3 {
    /// Its IPv4 header (bounds-checked), read only when the FIB is asked.
    pub ip: *const crate::parse::Ipv4,
    pub proto: u8,
    /// See `parse::Packet::vlan_dev`.
    pub vlan_dev: u32,
}

#[inline(always)]
fn cached_hop(
    id: u32,
    now: Option<u32>,
    lookup: impl FnOnce() -> Result<NextHop, Counter>,
) -> Result<Hop, Counter> {
    let cached = HOPS.get_ptr_mut(id).ok_or(Counter::DropBadBackend)?;
    // SAFETY: per-CPU slot, only this CPU touches it while the program runs.
    unsafe {
        // ifindex 0: never looked up, or invalidated.
        let valid = (*cached).ifindex != 0;
        // The daemon invalidates a hop by zeroing its stamp (keeping the MACs as a fallback).
        let fresh = match now {
            // (The stamp is made odd, so it may be one unit ahead of an even `now`.)
            Some(now) => {
                let age = now.wrapping_sub((*cached).stamp) as i32;
                (-1..HOP_TTL as i32).contains(&age)
            }
            None => (*cached).stamp != 0,
        };
        if valid && fresh {
            return Ok(*cached);
        }
        count(Counter::HopLookup);
        match lookup() {
            Ok(h) => {
                (*cached).ifindex = h.ifindex;
                (*cached).dst_mac = h.dst_mac;
                (*cached).src_mac = h.src_mac;
                (*cached).stamp = now.unwrap_or_else(crate::ct::now) | 1;
                Ok(*cached)
            }
            Err(_) if now.is_none() && valid => Ok(*cached),
            Err(c) => Err(c),
        }
    }
}

/// Route `src -> dst` as if forwarding the packet received on the ingress interface.
#[inline(always)]
fn lookup(ctx: &XdpContext, l3: &L3, src: u32, dst: u32) -> Result<NextHop, Counter> {
    // The helper's argument must be initialised to the last byte (the verifier insists). It is
    // written as eight volatile words because LLVM merges plain zero stores into a `memset`,
    // which the BPF backend emits as a call to a byte loop. `struct bpf_fib_lookup` on bpfel:
    // family, l4_protocol, sport, dport, tot_len | ifindex, tos | ipv4_src (+12 bytes of
    // ipv6_src) | ipv4_dst (+12) | tbid, smac, dmac.
    const _: () = assert!(core::mem::size_of::<FibParams>() == 64);
    let mut raw = core::mem::MaybeUninit::<[u64; 8]>::uninit();
    // SAFETY: bounds-checked by parse().
    let tot_len = unsafe { u16::from_be((*l3.ip).tot_len) } as u64;
    let words = [
        AF_INET as u64 | (l3.proto as u64) << 8 | tot_len << 48,
        ctx.ingress_ifindex() as u64 & 0xffff_ffff,
        src as u64,
        0,
        dst as u64,
        0,
        0,
        0,
    ];
    fib(ctx, &mut raw, &words)
}

/// IPv6: family, protocol, payload length | ifindex, flowinfo 0 | source | destination, written
/// into this CPU's scratch entry (`SCRATCH6`: the IPv6 programs have no stack to spare).
#[inline(always)]
fn lookup6(
    ctx: &XdpContext,
    proto: u8,
    plen: u64,
    src: &vmlb_common::Addr6,
    dst: &vmlb_common::Addr6,
) -> Result<NextHop, Counter> {
    let scratch = crate::maps::SCRATCH6
        .get_ptr_mut(0)
        .ok_or(Counter::PassFibFailed)?;
    // SAFETY: this CPU's scratch entry, ours for the program's run.
    let base = unsafe { core::ptr::addr_of_mut!((*scratch).fib) }.cast::<u64>();
    let pair = |a: u32, b: u32| a as u64 | (b as u64) << 32;
    // SAFETY: every write is within the 8-word buffer.
    unsafe {
        base.write_volatile(AF_INET6 as u64 | (proto as u64) << 8 | (plen + 40) << 48);
        base.add(1)
            .write_volatile(ctx.ingress_ifindex() as u64 & 0xffff_ffff);
        base.add(2).write_volatile(pair(src[0], src[1]));
        base.add(3).write_volatile(pair(src[2], src[3]));
        base.add(4).write_volatile(pair(dst[0], dst[1]));
        base.add(5).write_volatile(pair(dst[2], dst[3]));
        base.add(6).write_volatile(0);
        base.add(7).write_volatile(0);
    }
    ask(ctx, base.cast::<FibParams>())
}

/// Ask the FIB with `words` as `struct bpf_fib_lookup`.
#[inline(always)]
fn fib(
    ctx: &XdpContext,
    raw: &mut core::mem::MaybeUninit<[u64; 8]>,
    words: &[u64; 8],
) -> Result<NextHop, Counter> {
    let base = raw.as_mut_ptr().cast::<u64>();
    for (i, w) in words.iter().enumerate() {
        // SAFETY: in bounds of the 8-word buffer.
        unsafe { base.add(i).write_volatile(*w) };
    }
    ask(ctx, base.cast::<FibParams>())
}

/// `bpf_fib_lookup` on filled-in parameters.
#[inline(always)]
fn ask(ctx: &XdpContext, params: *mut FibParams) -> Result<NextHop, Counter> {
    // SAFETY: `params` is a fully initialised bpf_fib_lookup of the size passed.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx as *mut _,
            params,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    // SAFETY: the helper filled it in; it is still initialised.
    let params = unsafe { &*params };
    match rc {
        BPF_FIB_LKUP_RET_SUCCESS => Ok(NextHop {
            ifindex: params.ifindex,
            dst_mac: params.dmac,
            src_mac: params.smac,
        }),
        BPF_FIB_LKUP_RET_NO_NEIGH => Err(Counter::PassNoNeigh),
        _ => Err(Counter::PassFibFailed),
    }
}

/// Put the next hop's MACs on the frame and send it out of `ifindex`. A tagged frame (`vlan_dev`
/// set; `hop` checked its next hop is on its VLAN) goes back out of its interface, tag and all.
#[inline(always)]
pub fn send(
    ctx: &XdpContext,
    eth: *mut Eth,
    vlan_dev: u32,
    ifindex: u32,
    dst_mac: &[u8; 6],
    src_mac: &[u8; 6],
) -> u32 {
    // SAFETY: `eth` was bounds-checked by parse().
    unsafe {
        copy_mac(&mut (*eth).dst, dst_mac);
        copy_mac(&mut (*eth).src, src_mac);
    }
    if vlan_dev != 0 || ifindex == ctx.ingress_ifindex() as u32 {
        count(Counter::TxSameIface);
        xdp_action::XDP_TX
    } else {
        count(Counter::TxRedirect);
        // SAFETY: plain helper call. With flags 0 it cannot fail: it returns XDP_REDIRECT.
        unsafe { bpf_redirect(ifindex, 0) as u32 }
    }
}

/// Whether a frame is addressed to us: on the interface vmlb serves, its own MAC only (not
/// broadcast, not another host's); on any other interface (a backend's reply redirected in),
/// any unicast MAC.
#[inline(always)]
pub fn for_us(ctx: &XdpContext, dst_mac: &[u8; 6], cfg: &vmlb_common::Config) -> bool {
    if ctx.ingress_ifindex() as u32 == cfg.ifindex {
        *dst_mac == cfg.mac
    } else {
        dst_mac[0] & 1 == 0
    }
}

impl L3 {
    /// The FIB inputs of a TCP/UDP packet.
    #[inline(always)]
    pub fn of(p: &crate::parse::Packet) -> Self {
        L3 {
            ip: p.ip,
            proto: p.key.proto,
            vlan_dev: p.vlan_dev,
        }
    }
}

/// Copy a MAC address as three 16-bit words. A plain `[u8; 6]` assignment between a map value
/// and the packet becomes a call to a byte-loop `memmove` in the BPF backend (it cannot tell
/// that the two do not overlap): measured on the reply path, which sends every frame with the
/// interface's MAC from `CONFIG`.
///
/// # Safety
/// Both must be valid and 2-byte aligned, which every MAC field of ours is (the Ethernet
/// header, `Config`, `Hop`, `Flow`).
#[inline(always)]
pub unsafe fn copy_mac(dst: *mut [u8; 6], src: *const [u8; 6]) {
    let (d, s) = (dst.cast::<u16>(), src.cast::<u16>());
    // SAFETY: as the caller promised.
    unsafe {
        let words = (s.read(), s.add(1).read(), s.add(2).read());
        d.write(words.0);
        d.add(1).write(words.1);
        d.add(2).write(words.2);
    }
}
