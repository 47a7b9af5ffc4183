//! Helper programs for the benchmark and the lab, never attached by the daemon.
//!
//! `xdp_pass` goes on the far end of a lab veth: a veth's XDP_TX only wakes its peer when the
//! peer runs an XDP program itself (veth_xdp_flush), so without it frames sent back by vmlb
//! would sit in the peer's ring.
//!
//! BPF_PROG_TEST_RUN with a repeat count does not restore the packet between iterations, so a
//! NATed packet would take the cheap pass path from the second iteration on. `bench_restore`
//! copies the original headers back before tail-calling the program under test;
//! `bench_restore_new` also gives every iteration a new client address, so each one is a new
//! flow. Their own cost is measured by tail-calling `bench_floor` and subtracted.
//!
//! The `bench_floor_*` programs are references: the floor plus exactly one operation a
//! load balancer's data path may need, so vmlb's costs can be read as ratios to them.
//!
//! `hop_forward` is the end-to-end benchmark's XDP hop floor: attached where vmlb would be, it
//! forwards frames addressed to the node by rewriting the MACs and sending them back out
//! (XDP_TX), with no NAT and no state, the least any XDP load balancer on that wire can do.
//!
//! `trunk_push` / `trunk_pop` (tc) make a veth an 802.1Q trunk for the lab, whose kernel has no
//! 8021q devices and no bridge VLAN filtering: egress tags untagged frames with `TRUNK_VID`,
//! ingress strips that tag and drops every other frame, as a switch's trunk port that carries
//! one VLAN. `xdp_vlan_census` counts what XDP sees in the frame bytes (tagged with `TRUNK_VID`,
//! tagged otherwise, untagged) and passes everything: the lab's proof that the tag is really on
//! the wire where vmlb's program reads it, not only in the skb's metadata.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{bpf_fib_lookup as FibParams, xdp_action, BPF_NOEXIST, TC_ACT_OK, TC_ACT_SHOT},
    helpers::{bpf_fib_lookup, bpf_skb_vlan_pop, bpf_skb_vlan_push},
    macros::{classifier, map, xdp},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, ProgramArray},
    programs::{TcContext, XdpContext},
};

/// The first 64 bytes of the packet under test (covers Ethernet + IPv4 + TCP headers).
#[map]
static BENCH_PKT: Array<[u64; 8]> = Array::with_max_entries(1, 0);
/// Slot 0: the program under test.
#[map]
static BENCH_PROG: ProgramArray = ProgramArray::with_max_entries(1, 0);
/// Iteration number for new-flow runs. One counter for all CPUs (not per-CPU): the benchmark
/// thread may move between CPUs, and per-CPU counters would then hand out a client address
/// twice. Runs are sequential, so the plain increment does not race.
#[map]
static BENCH_SEQ: Array<u32> = Array::with_max_entries(1, 0);

const SADDR_OFF: usize = 14 + 12;

#[xdp]
pub fn xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// A reference for the benchmark: the floor plus one lookup of the packet's 5-tuple (a 16-byte
/// key, as vmlb's flow index) in an LRU hash, i.e. the least an established-flow path that finds
/// its flow by 5-tuple can cost.
#[map]
static BENCH_LRU: LruHashMap<[u32; 4], [u64; 5]> = LruHashMap::with_max_entries(1 << 19, 0);

/// New-flow references, reached through `bench_restore_new` (a new key every iteration). Both
/// are sized by the benchmark to the flow table's capacity, are emptied between rounds, and
/// hold exactly one entry per iteration afterwards (the benchmark checks that).
///
/// A common (global) LRU with a 16-byte key and a 64-byte value, the size of vmlb's `Flow`: what
/// a design that keeps each flow in one LRU entry pays per new flow, Katran's SYN path included.
#[map]
static BENCH_LRU_NEW: LruHashMap<[u32; 4], [u64; 8]> = LruHashMap::with_max_entries(1 << 18, 0);
/// A preallocated plain hash shaped like layout 2's `FLOWS` index (16-byte key, 8-byte slot):
/// what vmlb's new-flow path paid for its index before `FLOW_INDEX` (kept as a reference).
#[map]
static BENCH_HASH_NEW: HashMap<[u32; 4], [u32; 2]> = HashMap::with_max_entries(1 << 18, 0);

/// `hop_forward`'s next hops: IPv4 destination (network order) -> MAC in the first 6 bytes. Key
/// 0 holds the node's own MAC: only frames sent to it are forwarded (a bridge floods frames for
/// MACs it has not learned yet, and forwarding those too would duplicate them).
#[map]
static HOP_MACS: HashMap<u32, [u8; 8]> = HashMap::with_max_entries(16, 0);

/// The XDP hop floor of `bench e2e`: an IPv4 frame to the node's MAC for a destination in
/// `HOP_MACS` leaves again from the node's MAC to the destination's, unchanged otherwise (no
/// TTL, no checksum, no state); anything else goes to the kernel.
#[xdp]
pub fn hop_forward(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    if start + 14 + 20 > ctx.data_end() {
        return xdp_action::XDP_PASS;
    }
    let p = start as *mut u8;
    // SAFETY: 34 bytes (Ethernet + a minimal IPv4 header) are bounds-checked above.
    unsafe {
        if *(p.add(12) as *const u16) != 0x0800u16.to_be() {
            return xdp_action::XDP_PASS;
        }
        let Some(own) = HOP_MACS.get(0) else {
            return xdp_action::XDP_PASS;
        };
        if *(p as *const u32) != *(own.as_ptr() as *const u32)
            || *(p.add(4) as *const u16) != *(own.as_ptr().add(4) as *const u16)
        {
            return xdp_action::XDP_PASS;
        }
        let Some(next) = HOP_MACS.get(*(p.add(30) as *const u32)) else {
            return xdp_action::XDP_PASS;
        };
        core::ptr::copy_nonoverlapping(p, p.add(6), 6);
        core::ptr::copy_nonoverlapping(next.as_ptr(), p, 6);
    }
    xdp_action::XDP_TX
}

/// The floor's parse: an Ethernet/IPv4/TCP frame with its whole TCP header present.
/// Returns the frame start and the L4 offset.
#[inline(always)]
fn tcp_frame(ctx: &XdpContext) -> Option<(*mut u8, usize)> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + 14 + 20 + 20 > end {
        return None;
    }
    let p = start as *mut u8;
    // SAFETY: 54 bytes are bounds-checked above.
    unsafe {
        if *(p.add(12) as *const u16) != 0x0800u16.to_be() || *p.add(14 + 9) != 6 {
            return None;
        }
        let ihl = ((*p.add(14) & 0x0f) as usize) * 4;
        if ihl < 20 || start + 14 + ihl + 20 > end {
            return None;
        }
        Some((p, 14 + ihl))
    }
}

/// Swap the Ethernet addresses of a frame with at least 12 bytes (checked by the caller).
#[inline(always)]
unsafe fn swap_macs(p: *mut u8) {
    let mut tmp = [0u8; 6];
    // SAFETY: the caller checked the 12 bytes.
    unsafe {
        core::ptr::copy_nonoverlapping(p, tmp.as_mut_ptr(), 6);
        core::ptr::copy_nonoverlapping(p.add(6), p, 6);
        core::ptr::copy_nonoverlapping(tmp.as_ptr(), p.add(6), 6);
    }
}

#[xdp]
pub fn bench_floor_lookup(ctx: XdpContext) -> u32 {
    let Some((p, l4)) = tcp_frame(&ctx) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: tcp_frame checked the frame.
    unsafe {
        let key = tuple(p, l4);
        if BENCH_LRU.get_ptr(key).is_none() {
            return xdp_action::XDP_PASS;
        }
        swap_macs(p);
    }
    xdp_action::XDP_TX
}

/// The packet's 5-tuple as the references' key (the same layout as `bench_floor_lookup`'s).
///
/// # Safety
/// `tcp_frame` must have returned `(p, l4)`.
#[inline(always)]
unsafe fn tuple(p: *mut u8, l4: usize) -> [u32; 4] {
    // SAFETY: the caller's tcp_frame checked the IPv4 header and a whole TCP header at `l4`.
    unsafe {
        [
            *(p.add(26) as *const u32),
            *(p.add(30) as *const u32),
            *(p.add(l4) as *const u32),
            6,
        ]
    }
}

/// The floor plus one insert of a new key into the common LRU (fails -> XDP_PASS).
#[xdp]
pub fn bench_floor_lru_insert(ctx: XdpContext) -> u32 {
    let Some((p, l4)) = tcp_frame(&ctx) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: tcp_frame checked the frame.
    let key = unsafe { tuple(p, l4) };
    // Non-zero words from the packet, so the value is built by plain stores, not a memset.
    let value = [key[0] as u64, key[1] as u64, key[2] as u64, 6, 1, 2, 3, 4];
    if BENCH_LRU_NEW
        .insert(key, value, BPF_NOEXIST as u64)
        .is_err()
    {
        return xdp_action::XDP_PASS;
    }
    // SAFETY: tcp_frame checked the frame.
    unsafe { swap_macs(p) };
    xdp_action::XDP_TX
}

/// The floor plus one insert of a new key into the preallocated plain hash (fails -> XDP_PASS).
#[xdp]
pub fn bench_floor_hash_insert(ctx: XdpContext) -> u32 {
    let Some((p, l4)) = tcp_frame(&ctx) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: tcp_frame checked the frame.
    let key = unsafe { tuple(p, l4) };
    if BENCH_HASH_NEW
        .insert(key, [key[0], 1], BPF_NOEXIST as u64)
        .is_err()
    {
        return xdp_action::XDP_PASS;
    }
    // SAFETY: tcp_frame checked the frame.
    unsafe { swap_macs(p) };
    xdp_action::XDP_TX
}

/// The floor plus one `bpf_fib_lookup` of the packet's own source and destination, as received
/// on its ingress interface; the frame leaves with the next hop's MACs. Not resolved (no route,
/// no neighbour) -> XDP_PASS, so the benchmark sees it in the return value.
#[xdp]
pub fn bench_floor_fib(ctx: XdpContext) -> u32 {
    let Some((p, _)) = tcp_frame(&ctx) else {
        return xdp_action::XDP_PASS;
    };
    const AF_INET: u64 = 2;
    // Filled word by word with volatile stores, as vmlb's forward.rs does: the verifier wants
    // every byte initialised, and LLVM would turn plain zero stores into a byte-loop memset.
    // Words: family | l4 protocol << 8 | tot_len << 48; ifindex; ipv4_src; ipv4_dst at 16.
    let mut raw = core::mem::MaybeUninit::<[u64; 8]>::uninit();
    // SAFETY: tcp_frame checked the IPv4 header (tot_len at 16, addresses at 26 and 30).
    let words = unsafe {
        let tot_len = u16::from_be(*(p.add(16) as *const u16)) as u64;
        [
            AF_INET | 6 << 8 | tot_len << 48,
            ctx.ingress_ifindex() as u64 & 0xffff_ffff,
            *(p.add(26) as *const u32) as u64,
            0,
            *(p.add(30) as *const u32) as u64,
            0,
            0,
            0,
        ]
    };
    let base = raw.as_mut_ptr().cast::<u64>();
    for (i, w) in words.iter().enumerate() {
        // SAFETY: in bounds of the 8-word buffer.
        unsafe { base.add(i).write_volatile(*w) };
    }
    let params = base.cast::<FibParams>();
    // SAFETY: a fully initialised bpf_fib_lookup (64 bytes) of the size passed.
    let rc = unsafe { bpf_fib_lookup(ctx.ctx as *mut _, params, 64, 0) };
    if rc != 0 {
        return xdp_action::XDP_PASS;
    }
    // SAFETY: the helper filled in the MACs; tcp_frame checked the Ethernet header.
    unsafe {
        core::ptr::copy_nonoverlapping((*params).dmac.as_ptr(), p, 6);
        core::ptr::copy_nonoverlapping((*params).smac.as_ptr(), p.add(6), 6);
    }
    xdp_action::XDP_TX
}

/// The IPv6 references: the same floor, lookup and insert with IPv6's key (40 bytes, vmlb's
/// `FlowKey6`) and value sizes (`Flow6`, 112 bytes), to tell what the IPv6 paths pay for the
/// key and value from what they pay elsewhere.
#[map]
static BENCH_LRU6: LruHashMap<[u32; 10], [u64; 5]> = LruHashMap::with_max_entries(1 << 16, 0);
#[map]
static BENCH_LRU_NEW6: LruHashMap<[u32; 10], [u64; 14]> = LruHashMap::with_max_entries(1 << 18, 0);

/// The floor's parse for IPv6: an Ethernet/IPv6/TCP frame (no extension header) with its whole
/// TCP header present. Returns the frame start.
#[inline(always)]
fn tcp6_frame(ctx: &XdpContext) -> Option<*mut u8> {
    let start = ctx.data();
    if start + 14 + 40 + 20 > ctx.data_end() {
        return None;
    }
    let p = start as *mut u8;
    // SAFETY: 74 bytes are bounds-checked above.
    unsafe {
        if *(p.add(12) as *const u16) != 0x86ddu16.to_be() || *p.add(14 + 6) != 6 {
            return None;
        }
    }
    Some(p)
}

/// The IPv6 5-tuple as the references' key, laid out as vmlb's `FlowKey6`.
///
/// # Safety
/// `tcp6_frame` must have returned `p`.
#[inline(always)]
unsafe fn tuple6(p: *mut u8) -> [u32; 10] {
    let w = |o: usize| {
        // SAFETY: within the 74 bytes tcp6_frame checked.
        unsafe { core::ptr::read_unaligned(p.add(o) as *const u32) }
    };
    [
        w(22),
        w(26),
        w(30),
        w(34),
        w(38),
        w(42),
        w(46),
        w(50),
        w(54),
        6,
    ]
}

/// The IPv6 floor: parse Ethernet/IPv6/TCP, swap MACs, send back.
#[xdp]
pub fn bench_floor6(ctx: XdpContext) -> u32 {
    let Some(p) = tcp6_frame(&ctx) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: tcp6_frame checked the frame.
    unsafe { swap_macs(p) };
    xdp_action::XDP_TX
}

/// The IPv6 floor plus one LRU lookup of the 40-byte 5-tuple.
#[xdp]
pub fn bench_floor_lookup6(ctx: XdpContext) -> u32 {
    let Some(p) = tcp6_frame(&ctx) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: tcp6_frame checked the frame.
    unsafe {
        let key = tuple6(p);
        if BENCH_LRU6.get_ptr(key).is_none() {
            return xdp_action::XDP_PASS;
        }
        swap_macs(p);
    }
    xdp_action::XDP_TX
}

/// The IPv6 floor plus one insert of a new 40-byte key with a 112-byte value into a common LRU.
#[xdp]
pub fn bench_floor_lru_insert6(ctx: XdpContext) -> u32 {
    let Some(p) = tcp6_frame(&ctx) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: tcp6_frame checked the frame.
    let key = unsafe { tuple6(p) };
    let k = |i: usize| key[i] as u64;
    // Non-zero words from the packet, so the value is built by plain stores, not a memset.
    let value = [
        k(0),
        k(1),
        k(2),
        k(3),
        k(4),
        k(5),
        k(6),
        k(7),
        k(8),
        6,
        1,
        2,
        3,
        4,
    ];
    if BENCH_LRU_NEW6
        .insert(key, value, BPF_NOEXIST as u64)
        .is_err()
    {
        return xdp_action::XDP_PASS;
    }
    // SAFETY: tcp6_frame checked the frame.
    unsafe { swap_macs(p) };
    xdp_action::XDP_TX
}

/// The floor: parse Ethernet/IPv4/TCP, swap MACs, send back.
#[xdp]
pub fn bench_floor(ctx: XdpContext) -> u32 {
    let Some((p, _)) = tcp_frame(&ctx) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: tcp_frame checked the frame.
    unsafe { swap_macs(p) };
    xdp_action::XDP_TX
}

/// Copy the saved headers over the packet; returns the (bounds-checked) packet start.
#[inline(always)]
fn restore(ctx: &XdpContext) -> Option<usize> {
    let start = ctx.data();
    if start + 64 > ctx.data_end() {
        return None;
    }
    let saved = BENCH_PKT.get(0)?;
    let dst = start as *mut u64;
    // SAFETY: 64 bytes are bounds-checked above. Plain (aligned-typed) stores: the JIT does
    // unaligned stores on x86-64; write_unaligned would make LLVM emit 64 byte stores.
    unsafe {
        for (i, w) in saved.iter().enumerate() {
            *dst.add(i) = *w;
        }
    }
    Some(start)
}

#[xdp]
pub fn bench_restore(ctx: XdpContext) -> u32 {
    if restore(&ctx).is_none() {
        return xdp_action::XDP_ABORTED;
    }
    // SAFETY: tail call; falls through only if slot 0 is empty.
    unsafe { BENCH_PROG.tail_call(&ctx, 0) };
    xdp_action::XDP_ABORTED
}

#[xdp]
pub fn bench_restore_new(ctx: XdpContext) -> u32 {
    let Some(start) = restore(&ctx) else {
        return xdp_action::XDP_ABORTED;
    };
    if let Some(seq) = BENCH_SEQ.get_ptr_mut(0) {
        // SAFETY: the packet holds SADDR_OFF + 4 bytes (checked in restore).
        unsafe {
            *seq += 1;
            let saddr = (start + SADDR_OFF) as *mut u32;
            // Client addresses 1.0.0.0 + n: a new flow every iteration. The checksums go stale,
            // which the program under test neither checks nor minds (it updates incrementally).
            *saddr = (0x0100_0000u32 + *seq).to_be();
        }
    }
    // SAFETY: as above.
    unsafe { BENCH_PROG.tail_call(&ctx, 0) };
    xdp_action::XDP_ABORTED
}

/// The VLAN id of the lab's trunk; set at load time (`EbpfLoader::override_global`).
#[no_mangle]
static TRUNK_VID: u16 = 0;

/// What the trunk programs did and what `xdp_vlan_census` saw, per CPU; indices below.
#[map]
static TRUNK_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(TRUNK_STAT_COUNT, 0);
/// trunk_push: an untagged frame tagged.
pub const TRUNK_PUSHED: u32 = 0;
/// trunk_push: a frame that already carried a tag (a packet socket writing its own, as vmlb's
/// gratuitous ARP does on a trunk) left as it was.
pub const TRUNK_ALREADY_TAGGED: u32 = 1;
/// trunk_pop: the trunk's tag removed.
pub const TRUNK_POPPED: u32 = 2;
/// trunk_pop: untagged or another VLAN, dropped.
pub const TRUNK_DROPPED: u32 = 3;
/// xdp_vlan_census: a frame whose bytes carry an 802.1Q tag with `TRUNK_VID`.
pub const CENSUS_TRUNK_VID: u32 = 4;
/// xdp_vlan_census: tagged (0x8100 or 0x88a8) with another VLAN id.
pub const CENSUS_OTHER_TAG: u32 = 5;
/// xdp_vlan_census: untagged.
pub const CENSUS_UNTAGGED: u32 = 6;
const TRUNK_STAT_COUNT: u32 = 7;

const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;

#[inline(always)]
fn trunk_vid() -> u16 {
    // SAFETY: a plain read of a global; volatile so the compiler keeps the load-time value.
    unsafe { core::ptr::read_volatile(&TRUNK_VID) }
}

#[inline(always)]
fn count(i: u32) {
    if let Some(c) = TRUNK_STATS.get_ptr_mut(i) {
        // SAFETY: a per-CPU slot of this map, written only by this CPU.
        unsafe { *c += 1 };
    }
}

/// The frame's own ethertype, from its bytes.
#[inline(always)]
fn wire_ethertype(ctx: &TcContext) -> Option<u16> {
    ctx.load::<u16>(12).ok().map(u16::from_be)
}

/// tc egress: tag an untagged frame with `TRUNK_VID`. The tag is put in the skb's metadata
/// (`skb_vlan_push`); the device writes it into the frame only when it has no tx VLAN offload,
/// so the lab turns that off (`ethtool -K dev txvlan off`) or a veth would hand the peer the tag
/// as metadata, which the peer's XDP program never sees.
#[classifier]
pub fn trunk_push(ctx: TcContext) -> i32 {
    // SAFETY: the context's __sk_buff, valid for the program's run.
    let present = unsafe { (*ctx.skb.skb).vlan_present } != 0;
    let in_bytes = matches!(wire_ethertype(&ctx), Some(ETH_P_8021Q | ETH_P_8021AD));
    if present || in_bytes {
        count(TRUNK_ALREADY_TAGGED);
        return TC_ACT_OK;
    }
    // SAFETY: the context's __sk_buff; the helper takes the protocol in network order.
    let rc = unsafe { bpf_skb_vlan_push(ctx.skb.skb, ETH_P_8021Q.to_be(), trunk_vid()) };
    if rc != 0 {
        count(TRUNK_DROPPED);
        return TC_ACT_SHOT;
    }
    count(TRUNK_PUSHED);
    TC_ACT_OK
}

/// tc ingress: strip the trunk's tag, drop the rest. By the time tc ingress runs the kernel has
/// moved a tag from the frame into the skb's metadata (`skb_vlan_untag`), so that is where it is
/// read; XDP, which runs before, sees it in the bytes.
#[classifier]
pub fn trunk_pop(ctx: TcContext) -> i32 {
    // SAFETY: the context's __sk_buff, valid for the program's run.
    let (present, tci) = unsafe { ((*ctx.skb.skb).vlan_present, (*ctx.skb.skb).vlan_tci) };
    if present == 0 || (tci & 0x0fff) as u16 != trunk_vid() {
        count(TRUNK_DROPPED);
        return TC_ACT_SHOT;
    }
    // SAFETY: the context's __sk_buff.
    if unsafe { bpf_skb_vlan_pop(ctx.skb.skb) } != 0 {
        count(TRUNK_DROPPED);
        return TC_ACT_SHOT;
    }
    count(TRUNK_POPPED);
    TC_ACT_OK
}

/// Count what the frame bytes say about VLAN tags, and pass.
#[xdp]
pub fn xdp_vlan_census(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    if start + 16 > ctx.data_end() {
        return xdp_action::XDP_PASS;
    }
    let p = start as *const u8;
    // SAFETY: 16 bytes are bounds-checked above.
    let (ethertype, tci) = unsafe {
        (
            u16::from_be(core::ptr::read_unaligned(p.add(12) as *const u16)),
            u16::from_be(core::ptr::read_unaligned(p.add(14) as *const u16)),
        )
    };
    count(match ethertype {
        ETH_P_8021Q if tci & 0x0fff == trunk_vid() => CENSUS_TRUNK_VID,
        ETH_P_8021Q | ETH_P_8021AD => CENSUS_OTHER_TAG,
        _ => CENSUS_UNTAGGED,
    });
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
