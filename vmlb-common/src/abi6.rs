//! The IPv6 maps: their own keys and values (Cilium's lb4/lb6 split), never widened IPv4 keys,
//! so the IPv4 path keeps its small keys and its cache footprint.
//!
//! Shared with IPv4, by id: `MAGLEV` (a v6 service's table names v6 backend ids), `HOPS`,
//! `RATE`, `STATS`, `SVC_STATS`, `BE_STATS`. Service and backend ids come from one space per
//! kind for both families, so an id names either an IPv4 or an IPv6 entry, never both.
//!
//! Addresses are `[u32; 4]`: the 16 wire bytes read as four native words (as IPv4's `u32`), so
//! comparisons are four word compares and checksum deltas four 32-bit steps.

use core::mem::size_of;

use crate::{MAX_SNAT_ADDRS, MAX_SNAT_PER_SERVICE};

/// Map names of the IPv6 maps (at most 15 bytes).
pub mod map_names6 {
    pub const SERVICES6: &str = "SERVICES6";
    pub const VIPS6: &str = "VIPS6";
    pub const BACKENDS6: &str = "BACKENDS6";
    pub const FLOW_INDEX6: &str = "FLOW_INDEX6";
    pub const FLOW_SLOTS6: &str = "FLOW_SLOTS6";
    pub const CONFIG6: &str = "CONFIG6";
    pub const SCRATCH6: &str = "SCRATCH6";
    pub const DNAT_ENDPOINTS6: &str = "DNAT_ENDPOINTS6";
}

/// Default IPv6 flow capacity (`FLOW_INDEX6`, `FLOW_SLOTS6`). Smaller than IPv4's: an IPv6 slot is 112 bytes (`Flow6`), and most
/// VLANs that move to vmlb carry IPv4 first; `--flow6-entries` raises it.
pub const DEFAULT_FLOW6_ENTRIES: u32 = 65_536;

/// An IPv6 address in wire order, as four native words.
pub type Addr6 = [u32; 4];

/// The `Addr6` of 16 wire bytes.
pub const fn addr6(octets: [u8; 16]) -> Addr6 {
    let o = octets;
    [
        u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
        u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
        u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
        u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
    ]
}

/// The 16 wire bytes of an `Addr6`.
pub const fn octets6(a: &Addr6) -> [u8; 16] {
    let [a0, a1, a2, a3] = [
        a[0].to_ne_bytes(),
        a[1].to_ne_bytes(),
        a[2].to_ne_bytes(),
        a[3].to_ne_bytes(),
    ];
    [
        a0[0], a0[1], a0[2], a0[3], a1[0], a1[1], a1[2], a1[3], a2[0], a2[1], a2[2], a2[3], a3[0],
        a3[1], a3[2], a3[3],
    ]
}

/// IPv6 next-header numbers the data path knows.
pub const IPPROTO_ICMPV6: u8 = 58;
/// Extension headers (RFC 8200 4.1 and IANA): hop-by-hop, routing, fragment, ESP, AH,
/// destination options, mobility, HIP, shim6. A packet to a VIP that carries any of them is
/// dropped and counted (`DropIpv6ExtHeader`): vmlb does not walk extension-header chains, and
/// fragments cannot be balanced by ports (policy, as `DropFragment` for IPv4).
pub const IPV6_EXT_HEADERS: [u8; 9] = [0, 43, 44, 50, 51, 60, 135, 139, 140];

/// `SERVICES6` key.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey6 {
    pub vip: Addr6,
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(size_of::<ServiceKey6>() == 20);

/// `SERVICES6` value: as `Service`, with IPv6 SNAT addresses (full NAT only).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Service6 {
    /// Index into `SVC_STATS` (shared id space with IPv4), never 0.
    pub id: u32,
    pub flags: u32,
    pub snat_addrs: [Addr6; MAX_SNAT_PER_SERVICE],
    pub snat_count: u32,
    /// This service's Maglev table in the shared `MAGLEV` array (names `BACKENDS6` ids).
    pub ring_base: u32,
    pub ring_size: u32,
    pub port_min: u16,
    pub port_range: u16,
}
const _: () = assert!(size_of::<Service6>() == 88);

/// `BACKENDS6` value, indexed by backend id (shared id space with `BACKENDS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend6 {
    pub addr: Addr6,
    pub port: u16,
    pub _pad: u16,
    /// `BE_F_UP`.
    pub flags: u32,
    pub service_id: u32,
}
const _: () = assert!(size_of::<Backend6>() == 28);

/// `DNAT_ENDPOINTS6` key: as `EndpointKey`, an IPv6 backend's address, port and protocol (wire
/// order), the source of its replies.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointKey6 {
    pub addr: Addr6,
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(size_of::<EndpointKey6>() == 20);

/// `DNAT_ENDPOINTS6` value: as `DnatEndpoint`, the dnat service this IPv6 backend endpoint
/// serves (its VIP and port, to translate replies without a flow).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnatEndpoint6 {
    pub vip: Addr6,
    pub port: u16,
    pub _pad: u16,
    pub service_id: u32,
    pub backend_id: u32,
}
const _: () = assert!(size_of::<DnatEndpoint6>() == 28);

/// An IPv6 5-tuple as on the wire: hashed into `FLOW_INDEX6` (client -> VIP).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey6 {
    pub src_addr: Addr6,
    pub dst_addr: Addr6,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    pub _pad0: u8,
    pub _pad1: u16,
}
const _: () = assert!(size_of::<FlowKey6>() == 40);

/// `FLOW_SLOTS6` value: one IPv6 flow, both directions, with the lifecycle of `Flow` (the same
/// `ctl`, `last_seen`, `stamp` at the same offsets, so the state machine and the sweep serve
/// both). Its slot is `hash::tuple_slot6` of its SNAT tuple; a dnat flow keeps the client's own
/// address and port in the SNAT fields and sits in the first free of `DNAT_PROBES` slots from
/// that tuple's, as `Flow` does.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow6 {
    /// generation << 8 | state (`flow_state`); changed only by compare-and-swap.
    pub ctl: u64,
    pub last_seen: u32,
    pub stamp: u32,
    pub service_id: u32,
    pub backend_id: u32,
    /// The SNAT tuple (the reply's source and destination).
    pub backend_addr: Addr6,
    pub snat_addr: Addr6,
    pub backend_port: u16,
    pub snat_port: u16,
    /// The client side.
    pub client_addr: Addr6,
    pub vip_addr: Addr6,
    pub client_port: u16,
    pub vip_port: u16,
    pub client_ifindex: u32,
    pub client_mac: [u8; 6],
    pub proto: u8,
    pub touched: u8,
    pub _pad: u32,
}
const _: () = assert!(size_of::<Flow6>() == 112);

impl Flow6 {
    pub const fn state(&self) -> u8 {
        self.ctl as u8
    }
    pub const fn gen(&self) -> u32 {
        (self.ctl >> crate::FLOW_GEN_SHIFT) as u32
    }
    /// This flow's client 5-tuple (hashed into `FLOW_INDEX6`).
    pub const fn client_key(&self) -> FlowKey6 {
        FlowKey6 {
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

/// `CONFIG6` value (one entry): the IPv6 side of the node's settings.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config6 {
    /// The node's IPv6 SNAT addresses: packets to them are reply candidates.
    pub snat_addrs: [Addr6; MAX_SNAT_ADDRS],
    pub snat_count: u32,
    /// Entries of `FLOW_SLOTS6`.
    pub slot_count: u32,
    /// `Config::vip_filter` for the IPv6 VIPs (`vip6_filter_word`): a new flow's source is
    /// looked up in `VIPS6` (a VIP as source is martian) only when its bit is set.
    pub vip_filter: [u32; 4],
    /// Buckets of `FLOW_INDEX6`.
    pub index_buckets: u32,
    /// Entries in `DNAT_ENDPOINTS6` (as `Config::dnat_endpoints`): 0 spares every packet that
    /// is neither to a VIP nor to a SNAT address the lookup of its source there.
    pub dnat_endpoints: u32,
}
const _: () = assert!(size_of::<Config6>() == 160);

/// The word of an IPv6 address that picks its `Config6::vip_filter` bit (through
/// `vip_filter_bit`): the four words folded, so every part of the address counts.
pub const fn vip6_filter_word(a: &Addr6) -> u32 {
    a[0] ^ a[1] ^ a[2] ^ a[3]
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: #[repr(C)], integers and arrays only, explicit padding.
    unsafe impl aya::Pod for super::ServiceKey6 {}
    unsafe impl aya::Pod for super::Service6 {}
    unsafe impl aya::Pod for super::Backend6 {}
    unsafe impl aya::Pod for super::FlowKey6 {}
    unsafe impl aya::Pod for super::Flow6 {}
    unsafe impl aya::Pod for super::Config6 {}
    unsafe impl aya::Pod for super::EndpointKey6 {}
    unsafe impl aya::Pod for super::DnatEndpoint6 {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addr6_round_trips() {
        let o = [
            0xfd, 0, 0x10, 0x10, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, 0x25,
        ];
        assert_eq!(octets6(&addr6(o)), o);
    }

    #[test]
    fn flow6_shares_the_lifecycle_offsets_of_flow() {
        use core::mem::offset_of;
        assert_eq!(offset_of!(Flow6, ctl), offset_of!(crate::Flow, ctl));
        assert_eq!(
            offset_of!(Flow6, last_seen),
            offset_of!(crate::Flow, last_seen)
        );
        assert_eq!(offset_of!(Flow6, stamp), offset_of!(crate::Flow, stamp));
        assert_eq!(
            offset_of!(Flow6, service_id),
            offset_of!(crate::Flow, service_id)
        );
        assert_eq!(
            offset_of!(Flow6, backend_id),
            offset_of!(crate::Flow, backend_id)
        );
    }
}
