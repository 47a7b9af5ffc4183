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
    pub const FLOWS: &str = "FLOWS";
    pub const VIPS: &str = "VIPS";
    pub const STATS: &str = "STATS";
    pub const SVC_STATS: &str = "SVC_STATS";
    pub const BE_STATS: &str = "BE_STATS";
}

/// Name of the XDP entry point in the object.
pub const PROGRAM_NAME: &str = "vmlb";

/// Service ids index `SVC_STATS`; id 0 is never assigned. Sized for a node fronting a few hundred
/// ServiceEntry ports with room to spare; per-CPU arrays cost `MAX_SERVICES * ncpu * 32` bytes.
pub const MAX_SERVICES: u32 = 1024;
/// Backend ids index `BACKENDS` and `BE_STATS`; id 0 means "empty Maglev slot".
pub const MAX_BACKENDS: u32 = 8192;
/// Default total entries of the `MAGLEV` array: 64 services at the default ring size, twice
/// over, so every table can be rebuilt into fresh space before the old one is released.
pub const DEFAULT_MAGLEV_ENTRIES: u32 = 2 * 64 * 16381;
/// Default `FLOWS` size: two entries per connection, so 256k connections.
pub const DEFAULT_FLOW_ENTRIES: u32 = 524_288;

/// IP protocol numbers used in keys.
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// SNAT source ports are chosen in [SNAT_PORT_MIN, SNAT_PORT_MAX]; the node's own ephemeral range
/// (32768-60999 by default) is outside it so locally originated connections never collide.
/// The range holds a prime number of ports (31741) so that every probe step visits every port.
pub const SNAT_PORT_MIN: u16 = 1024;
pub const SNAT_PORT_MAX: u16 = 32764;
/// Candidate ports tried per new flow before the flow is dropped as `DropSnatExhausted`.
pub const SNAT_RETRIES: u32 = 8;

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

/// `Service::flags`: SNAT the client to `snat_addr` (the only mode so far; DNAT-only later).
pub const SVC_F_SNAT: u32 = 1;

/// `SERVICES` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Service {
    /// Index into `SVC_STATS`, never 0.
    pub id: u32,
    pub flags: u32,
    /// Node address on the VLAN used as the source towards backends.
    pub snat_addr: u32,
    /// This service's Maglev table is `MAGLEV[ring_base .. ring_base + ring_size]`. User space
    /// writes a new table into unused entries and then replaces this value in one map update,
    /// so a packet sees either the old table or the new one, never a mix.
    pub ring_base: u32,
    pub ring_size: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<Service>() == 24);

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

/// A 5-tuple as seen on the wire: the `FLOWS` key (client -> VIP, or backend -> SNAT address).
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

/// `FlowEntry::dir`: the entry rewrites a client packet towards its backend.
pub const DIR_TO_BACKEND: u8 = 0;
/// `FlowEntry::dir`: the entry rewrites a backend's reply back to the client.
pub const DIR_TO_CLIENT: u8 = 1;

/// `FLOWS` value. Both directions of a NATed connection live in the one conntrack map, each keyed
/// by the 5-tuple it matches on the wire, so the established path and the reply path are the same
/// single lookup followed by the same rewrite: replace the addresses and ports with these, send
/// with these MACs. The `DIR_TO_CLIENT` entry is inserted with `BPF_NOEXIST`: that insert is what
/// reserves the SNAT port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEntry {
    pub src_addr: u32,
    pub dst_addr: u32,
    pub src_port: u16,
    pub dst_port: u16,
    pub service_id: u32,
    pub backend_id: u32,
    /// Egress interface and MACs: from bpf_fib_lookup when the flow was created (towards the
    /// backend), or the client packet's own MACs swapped (towards the client).
    pub ifindex: u32,
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub dir: u8,
    pub _pad0: u8,
    pub _pad1: u16,
}
const _: () = assert!(size_of::<FlowEntry>() == 40);

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
    unsafe impl aya::Pod for super::FlowEntry {}
    unsafe impl aya::Pod for super::TrafficStats {}
}
