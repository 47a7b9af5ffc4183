//! Map names and the `#[repr(C)]` layouts of every map key and value.
//!
//! Rules: no `bool`/`Option`/enums inside map types, explicit `_pad`, a size assertion per type.
//! Addresses and ports are kept in network byte order exactly as they appear on the wire
//! (`u32::from_ne_bytes(octets)`, `u16::to_be(port)`); user space converts at the edges.

use core::mem::size_of;

/// Map names (ELF symbol names of the `#[map]` statics; at most 15 bytes, the kernel's limit).
pub mod map_names {
    pub const SERVICES: &str = "SERVICES";
    pub const BACKENDS: &str = "BACKENDS";
    pub const MAGLEV: &str = "MAGLEV";
    pub const FLOW_INDEX: &str = "FLOW_INDEX";
    pub const FLOW_SLOTS: &str = "FLOW_SLOTS";
    pub const CONFIG: &str = "CONFIG";
    pub const HOPS: &str = "HOPS";
    pub const RATE: &str = "RATE";
    pub const VIPS: &str = "VIPS";
    pub const STATS: &str = "STATS";
    pub const SVC_STATS: &str = "SVC_STATS";
    pub const BE_STATS: &str = "BE_STATS";
    pub const DNAT_ENDPOINTS: &str = "DNAT_ENDPOINTS";
    pub const JUMP: &str = "JUMP";
}

/// Version of the pinned map layout: the set of maps and each map's type, key, value, flags
/// and the meaning of its entries. Pins live under `<pin-dir>/<iface>/v<N>/` (version 1: flat
/// in `<pin-dir>/<iface>/`), so a daemon never opens another layout's maps as its own; it
/// migrates them (vmlb-user `dataplane::layout`) or refuses. Bump it with any such change, add
/// a line below, and say in `dataplane::layout::MAPS` how the older versions' maps carry over.
///
/// - 1: the flat pins up to commit f85e675 (no version marker).
/// - 2: pins under `v2/`; `DNAT_ENDPOINTS` (dnat mode); the IPv6 maps (`abi6`) and `JUMP` (the
///   IPv6 programs); `STATS` has 44 counters (was 39, append-only); `Config::dnat_endpoints`
///   in what was reserved (the value size is unchanged).
/// - 3: the flow index is `FLOW_INDEX`/`FLOW_INDEX6` (`index`: buckets of tagged slot numbers,
///   mappable) instead of the `FLOWS`/`FLOWS6` hash maps; `FLOW_SLOTS`/`FLOW_SLOTS6` have 2
///   slots per flow (were 4); `Config::index_buckets` and `Config6::index_buckets` in what was
///   reserved; `STATS` has 45 counters (append-only); `DNAT_ENDPOINTS6` (dnat mode for IPv6
///   services) and `Config6::dnat_endpoints` in what was reserved.
pub const LAYOUT_VERSION: u32 = 3;

/// Name of the XDP entry point in the object.
pub const PROGRAM_NAME: &str = "vmlb";
/// Name of the IPv6 program, tail-called from the entry point through `JUMP[JUMP_V6]`.
pub const PROGRAM6_NAME: &str = "vmlb6";
pub const JUMP_V6: u32 = 0;
/// Name of the ICMPv6 program (NDP, echo, errors), tail-called by `vmlb6` at `JUMP_V6_ICMP`.
pub const PROGRAM6_ICMP_NAME: &str = "vmlb6_icmp";
pub const JUMP_V6_ICMP: u32 = 1;

/// Service ids index `SVC_STATS`; id 0 is never assigned. Sized for a node fronting a few hundred
/// ServiceEntry ports with room to spare; per-CPU arrays cost `MAX_SERVICES * ncpu * 32` bytes.
pub const MAX_SERVICES: u32 = 1024;
/// Backend ids index `BACKENDS` and `BE_STATS`; id 0 means "empty Maglev slot".
pub const MAX_BACKENDS: u32 = 8192;
/// Default total entries of the `MAGLEV` array: 64 services at the default ring size, twice
/// over, so every table can be rebuilt into fresh space before the old one is released.
pub const DEFAULT_MAGLEV_ENTRIES: u32 = 2 * 64 * 16381;
/// Default flow capacity: concurrent flows (connections), whichever CPUs create them. Sizes
/// `FLOW_INDEX` (`index::index_buckets`) and `FLOW_SLOTS` (`SLOTS_PER_FLOW` per flow).
pub const DEFAULT_FLOW_ENTRIES: u32 = 262_144;
/// `FLOW_SLOTS` holds this many slots per flow of capacity. A flow's slot is a pure function of
/// its SNAT tuple (direct-mapped, see `hash::tuple_slot`), so a SNAT port candidate is usable
/// only if its slot is free: a full flow table leaves half the slots free, and the 16
/// `SNAT_RETRIES + SNAT_RANDOM_RETRIES` candidates all miss with probability (1/2)^16 (more
/// while slots are held back for TIME_WAIT safety). Layout 2 had 4 slots per flow: 128 MiB more
/// per million flows, for (1/4)^16.
pub const SLOTS_PER_FLOW: u32 = 2;
/// SNAT addresses per service (a pool used by hash) and per node (all services together).
pub const MAX_SNAT_PER_SERVICE: usize = 4;
pub const MAX_SNAT_ADDRS: usize = 8;
/// 802.1Q VLAN ids one interface serves on tagged frames.
pub const MAX_VLANS: usize = 4;

/// IP protocol numbers used in keys.
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// Default SNAT source ports: [SNAT_PORT_MIN, SNAT_PORT_MAX]. The node's own ephemeral range
/// (32768-60999 by default) is outside it so locally originated connections from a SNAT address
/// that is also the node's own never collide. The range holds a prime number of ports (31741)
/// so that every probe step visits every port. A dedicated SNAT address may use the whole range
/// (`SNAT_PORT_MIN..=SNAT_FULL_PORT_MAX`, 64499 ports, also prime).
pub const SNAT_PORT_MIN: u16 = 1024;
pub const SNAT_PORT_MAX: u16 = 32764;
pub const SNAT_FULL_PORT_MAX: u16 = 65522;
/// SNAT candidates derived from the flow hash, tried first (so `vmlb simulate` can say which
/// tuple a new flow gets).
pub const SNAT_RETRIES: u32 = 8;
/// Then this many random candidates, before the flow is dropped as `DropSnatExhausted`. Needed
/// because a client reusing its 5-tuple gets the same hashed candidates every time: one that
/// reconnects eight times within the TIME_WAIT hold would otherwise find all eight held, and
/// its SYN retries would fail the same way (seen in the sustained lab test).
pub const SNAT_RANDOM_RETRIES: u32 = 16;

/// `SERVICES` key: a VIP, port and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub vip: u32,
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(size_of::<ServiceKey>() == 8);

/// `VIPS` value flags: this node owns the VIP, so it answers ARP for it (in file mode a node
/// owns all its VIPs unless told otherwise; with Kubernetes the VIP's elected node does).
pub const VIP_F_OWNED: u32 = 1;

/// `Service::flags`: SNAT the client to `snat_addrs` (full NAT; the backend sees a node
/// address and replies to it).
pub const SVC_F_SNAT: u32 = 1;
/// `Service::flags`: rewrite only the destination, so the backend sees the client's address.
/// Its replies must come back through the node (its gateway or its route to the clients); they
/// are recognised by their source (`DNAT_ENDPOINTS`).
pub const SVC_F_DNAT: u32 = 2;

/// Slots a dnat flow may take, from its reply tuple's own slot on. A dnat flow's tuple is the
/// client's (there is no SNAT port to choose), so a taken slot is skipped instead of choosing
/// another tuple; the reply looks through the same few slots.
pub const DNAT_PROBES: u32 = 4;

/// `DNAT_ENDPOINTS` key: a backend's address, port and protocol (wire order), the source of
/// its replies.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointKey {
    pub addr: u32,
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(size_of::<EndpointKey>() == 8);

/// `DNAT_ENDPOINTS` value: the dnat service this backend endpoint serves (a backend endpoint
/// serves at most one dnat service, so its replies name it without any state). It lets a node
/// that took a VIP over translate replies of connections it has never seen.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnatEndpoint {
    pub vip: u32,
    pub port: u16,
    pub _pad: u16,
    pub service_id: u32,
    pub backend_id: u32,
}
const _: () = assert!(size_of::<DnatEndpoint>() == 16);

/// `SERVICES` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Service {
    /// Index into `SVC_STATS`, never 0.
    pub id: u32,
    pub flags: u32,
    /// Source addresses towards backends (a pool: a flow uses `snat_addrs[hash % snat_count]`).
    pub snat_addrs: [u32; MAX_SNAT_PER_SERVICE],
    pub snat_count: u32,
    /// This service's Maglev table is `MAGLEV[ring_base .. ring_base + ring_size]`. User space
    /// writes a new table into unused entries and then replaces this value in one map update,
    /// so a packet sees either the old table or the new one, never a mix.
    pub ring_base: u32,
    pub ring_size: u32,
    /// SNAT ports are `port_min + (0 .. port_range)` (host order); `port_range` is prime.
    pub port_min: u16,
    pub port_range: u16,
}
const _: () = assert!(size_of::<Service>() == 40);

/// `Backend::flags`: the backend passes health checks. Without it, existing flows are re-balanced.
pub const BE_F_UP: u32 = 1;

/// `BACKENDS` value, indexed by backend id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    pub addr: u32,
    pub port: u16,
    pub _pad: u16,
    pub flags: u32,
    pub service_id: u32,
}
const _: () = assert!(size_of::<Backend>() == 16);

/// A 5-tuple as seen on the wire: a client's (client -> VIP, hashed into `FLOW_INDEX`), or a
/// reply's (backend -> SNAT address).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    pub src_addr: u32,
    pub dst_addr: u32,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    // Two fields, not `[u8; 3]`: LLVM's BPF backend turns a 3-byte zero fill into a call to a
    // byte-loop memset, on every packet.
    pub _pad0: u8,
    pub _pad1: u16,
}
const _: () = assert!(size_of::<FlowKey>() == 16);

/// Flow states, the low 8 bits of `Flow::ctl`. Every change of `ctl` is a compare-and-swap, by
/// the data path (claim, SYN -> established -> closing) or by user space's expiry (-> free).
pub mod flow_state {
    /// Unused, or expired: claimable once the clock passes `Flow::stamp` (TIME_WAIT safety).
    pub const FREE: u8 = 0;
    /// Being written by the CPU that claimed it; treated as absent by readers.
    pub const CLAIMING: u8 = 1;
    /// TCP: the client's SYN was forwarded, no answer yet.
    pub const SYN_SENT: u8 = 2;
    /// TCP: the backend answered.
    pub const ESTABLISHED: u8 = 3;
    /// TCP: FIN or RST seen from either side, since `Flow::stamp`.
    pub const CLOSING: u8 = 4;
    /// UDP: any packet keeps it alive.
    pub const UDP: u8 = 5;
}

/// `ctl` layout: generation << 8 | state.
pub const FLOW_GEN_SHIFT: u32 = 8;

/// `FLOW_SLOTS` value: one NATed flow, both directions. Its index is a pure function of the SNAT
/// tuple (`hash::tuple_slot`), so a backend's reply finds it with one array access, and a SNAT
/// tuple can be held by at most one flow at a time (the one in its slot), including while it
/// waits out the backend's TIME_WAIT after close. The client direction finds it through `FLOW_INDEX`.
/// One slot per flow means the two directions are created, found, expired and freed as one.
///
/// A dnat flow (`SVC_F_DNAT`) has no SNAT tuple: `snat_addr`/`snat_port` hold the client's own
/// address and port (what the backend replies to), and the flow sits in the first free of
/// `DNAT_PROBES` slots from that reply tuple's slot, so every path that reads the "SNAT" side
/// (reply, ICMP errors, the sweep) serves both modes unchanged.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    /// generation << 8 | state (`flow_state`); changed only by compare-and-swap.
    pub ctl: u64,
    /// Clock (`clock` units) when the flow was created, then when the sweep last found it
    /// `touched`.
    pub last_seen: u32,
    /// CLOSING: when it began. FREE: the earliest time the slot may be claimed again.
    pub stamp: u32,
    pub service_id: u32,
    pub backend_id: u32,
    /// The SNAT tuple (the reply's source and destination).
    pub backend_addr: u32,
    pub snat_addr: u32,
    pub backend_port: u16,
    pub snat_port: u16,
    /// The client side (the forward 5-tuple's source and destination).
    pub client_addr: u32,
    pub vip_addr: u32,
    pub client_port: u16,
    pub vip_port: u16,
    /// Where replies go: the client frame's source MAC and ingress interface.
    pub client_ifindex: u32,
    pub client_mac: [u8; 6],
    pub proto: u8,
    /// Set by the data path when a packet passes (written only when it was 0, so a busy flow
    /// costs no store per packet); the sweep turns it into `last_seen` and clears it. The
    /// established and reply paths thus need no clock at all.
    pub touched: u8,
    pub _pad1: u32,
}
const _: () = assert!(size_of::<Flow>() == 64);

impl Flow {
    pub const fn state(&self) -> u8 {
        self.ctl as u8
    }
    pub const fn gen(&self) -> u32 {
        (self.ctl >> FLOW_GEN_SHIFT) as u32
    }
    /// The client 5-tuple (hashed into `FLOW_INDEX`).
    pub const fn client_key(&self) -> FlowKey {
        FlowKey {
            src_addr: self.client_addr,
            dst_addr: self.vip_addr,
            src_port: self.client_port,
            dst_port: self.vip_port,
            proto: self.proto,
            _pad0: 0,
            _pad1: 0,
        }
    }
}

/// The data path's clock: `bpf_ktime_get_coarse_ns() >> CLOCK_SHIFT` (CLOCK_MONOTONIC_COARSE in
/// units of 2^20 ns, about 1.05 ms), as a wrapping u32 (49 days); compare with wrapping
/// differences only. User space reads the same clock for expiry.
pub const CLOCK_SHIFT: u32 = 20;

/// Convert a duration in milliseconds to clock units.
pub const fn clock_units_from_ms(ms: u64) -> u32 {
    let units = (ms * 1_000_000) >> CLOCK_SHIFT;
    if units > u32::MAX as u64 / 4 {
        u32::MAX / 4
    } else {
        units as u32
    }
}

/// `CONFIG` value (one entry): node-wide settings the data path reads on every packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Every SNAT address of every service: a packet to one of them is a reply candidate.
    pub snat_addrs: [u32; MAX_SNAT_ADDRS],
    pub snat_count: u32,
    /// `FLOW_SLOTS` entries (its max_entries).
    pub slot_count: u32,
    /// New flows each CPU may create per second (token bucket, `burst` deep); 0 = unlimited.
    pub new_flow_rate: u32,
    pub new_flow_burst: u32,
    /// Non-zero while user space finds the flow table above its pressure threshold: SYN-only
    /// flows then expire early (see README, flood guard).
    pub pressure: u32,
    /// The interface's own MAC: the source of every frame sent back to clients, and the only
    /// destination MAC whose frames are NATed when they arrive on that interface.
    pub mac: [u8; 6],
    pub _pad0: u16,
    /// That interface (frames arriving elsewhere, e.g. replies from a backend behind another
    /// interface, must only not be broadcast or multicast).
    pub ifindex: u32,
    /// VLAN ids served on 802.1Q-tagged frames (the first `vlan_count`). Untagged frames (and
    /// priority tags, VID 0) are always served; a tag of any other VLAN is passed.
    pub vlan_ids: [u16; MAX_VLANS],
    /// Per served VLAN, the device that carries its routes (the 802.1Q sub-interface on a
    /// node, the interface itself when it has none): a next hop found there is on the frame's
    /// own VLAN, so the frame goes back out of the interface with its tag.
    pub vlan_ifindex: [u32; MAX_VLANS],
    pub vlan_count: u32,
    /// ICMP echo requests to VIPs each CPU answers per second (token bucket, `burst` deep);
    /// 0 = unlimited.
    pub icmp_echo_rate: u32,
    pub icmp_echo_burst: u32,
    /// Non-zero: owned VIPs are answered (ARP) only while the data path's clock is before this
    /// value. With the cluster as source the daemon pushes it forward on every accepted Lease
    /// renewal, so a node whose daemon died or cannot reach the API server stops answering by
    /// itself, before the others count it dead. 0: no expiry (files only).
    pub owned_until: u32,
    /// A one-hash Bloom filter of the VIPs (`vip_filter_bit`): a new flow's source is looked
    /// up in `VIPS` (a VIP as source is martian) only when its bit is set, which saves a hash
    /// lookup on nearly every new flow (measured: ~25 ns of ~460). User space sets a bit
    /// before the VIP is written and rebuilds the filter after one is removed.
    pub vip_filter: [u32; 4],
    /// Entries in `DNAT_ENDPOINTS`: 0 spares every packet that is neither to a VIP nor to a
    /// SNAT address the lookup of its source there.
    pub dnat_endpoints: u32,
    /// Buckets of `FLOW_INDEX` (its max_entries).
    pub index_buckets: u32,
}
const _: () = assert!(size_of::<Config>() == 128);

/// The bit of `Config::vip_filter` for an address (in wire order): 7 bits of a multiplicative
/// hash, so VIPs from one pool spread over the 128 bits.
pub const fn vip_filter_bit(addr: u32) -> u32 {
    addr.wrapping_mul(0x9E37_79B1) >> 25
}

/// Whether `addr` may be a VIP according to `filter` (no false negatives).
#[inline(always)]
pub const fn vip_filter_has(filter: &[u32; 4], addr: u32) -> bool {
    let bit = vip_filter_bit(addr);
    filter[(bit >> 5) as usize] & (1 << (bit & 31)) != 0
}

/// `HOPS` value (per CPU, per backend id): the backend's next hop from `bpf_fib_lookup`. New
/// flows refresh it when older than `HOP_TTL`; established packets only check that it is
/// valid, and the daemon's sweeper invalidates the hops of live backends every few seconds, so
/// a neighbour whose MAC changed reaches established flows within seconds without a clock read
/// per packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Hop {
    /// 0: never looked up.
    pub ifindex: u32,
    /// Clock of the lookup (odd); 0: invalidated by the daemon.
    pub stamp: u32,
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
}
const _: () = assert!(size_of::<Hop>() == 20);
/// ~1 s in clock units.
pub const HOP_TTL: u32 = 1 << 10;

/// `RATE` value (per CPU, indexed by `RATE_*`): a token bucket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateBucket {
    /// Tokens scaled by 1024, so that refills of less than one flow per clock unit add up.
    pub tokens: u64,
    pub stamp: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<RateBucket>() == 16);
/// `RATE` index of the flood guard (new flows).
pub const RATE_NEW_FLOW: u32 = 0;
/// `RATE` index of ICMP echo answers.
pub const RATE_ICMP_ECHO: u32 = 1;
/// `RATE` entries.
pub const RATE_COUNT: u32 = 2;

/// `SVC_STATS` / `BE_STATS` value (per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficStats {
    pub packets: u64,
    pub bytes: u64,
    /// Flows created (client direction) towards this service/backend.
    pub new_flows: u64,
    /// Reply packets reverse-NATed.
    pub reply_packets: u64,
}
const _: () = assert!(size_of::<TrafficStats>() == 32);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)], made only of integers and byte arrays, with explicit
    // padding, so every bit pattern is valid and there are no implicit holes.
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::Service {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for crate::index::FlowBucket {}
    unsafe impl aya::Pod for super::Flow {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::Hop {}
    unsafe impl aya::Pod for super::RateBucket {}
    unsafe impl aya::Pod for super::TrafficStats {}
    unsafe impl aya::Pod for super::EndpointKey {}
    unsafe impl aya::Pod for super::DnatEndpoint {}
}

#[cfg(test)]
mod vip_filter_tests {
    use super::*;

    fn wire(a: [u8; 4]) -> u32 {
        u32::from_ne_bytes(a)
    }

    #[test]
    fn the_vip_filter_has_no_false_negatives_and_few_false_positives() {
        // The seed's pool, 10.10.1.128/25, in a filter with four of its VIPs.
        let vips: [u32; 4] = [128, 129, 200, 255].map(|i| wire([10, 10, 1, i]));
        let mut f = [0u32; 4];
        for v in vips {
            let bit = vip_filter_bit(v);
            f[(bit >> 5) as usize] |= 1 << (bit & 31);
        }
        assert!(vips.iter().all(|&v| vip_filter_has(&f, v)));
        // Clients from a /16: at most 4 bits of 128 are set, so about 3% pass the filter.
        let hits = (0..=255u8)
            .flat_map(|a| (0..=255u8).map(move |b| wire([172, 16, a, b])))
            .filter(|&a| vip_filter_has(&f, a))
            .count();
        assert!(hits < 65536 * 5 / 100, "{hits} of 65536 passed the filter");
        // The pool's 128 addresses spread over the bits (a filter of them all is not full of
        // collisions on a few bits).
        let mut bits = [false; 128];
        for i in 128..=255u8 {
            bits[vip_filter_bit(wire([10, 10, 1, i])) as usize] = true;
        }
        let distinct = bits.iter().filter(|&&b| b).count();
        assert!(distinct > 64, "{distinct} distinct bits");
    }
}
