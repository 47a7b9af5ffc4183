//! Desired state: what services should exist, independent of ids and map layout.

use std::net::Ipv4Addr;

use vmlb_common::{IPPROTO_TCP, IPPROTO_UDP};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub const fn number(self) -> u8 {
        match self {
            Proto::Tcp => IPPROTO_TCP,
            Proto::Udp => IPPROTO_UDP,
        }
    }
}

/// A VIP:port/proto balanced over backends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    pub vip: Ipv4Addr,
    pub port: u16,
    pub proto: Proto,
    /// Node address on the VLAN that backends see as the client.
    pub snat: Ipv4Addr,
    /// Maglev table size (one of `vmlb_common::maglev::RING_SIZES`).
    pub ring_size: u32,
    pub backends: Vec<BackendSpec>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendSpec {
    pub addr: Ipv4Addr,
    pub port: u16,
    /// 0 drains: no new flows, existing flows stay.
    pub weight: u32,
    /// Passing health checks. A down backend gets no new flows and its flows move.
    pub up: bool,
}

impl ServiceSpec {
    pub fn key(&self) -> vmlb_common::ServiceKey {
        vmlb_common::ServiceKey {
            vip: u32::from_ne_bytes(self.vip.octets()),
            port: self.port.to_be(),
            proto: self.proto.number(),
            _pad: 0,
        }
    }
}
