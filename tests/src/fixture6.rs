//! IPv6 services for the fixture runner: specs the reconciler installs into the IPv6 maps, as
//! the daemon does.

use std::net::Ipv6Addr;

use vmlb_user::model::{BackendSpec, Proto, ServiceSpec};

use crate::fixture::{SNAT6, VIP6};

/// An IPv6 backend at `addr:port`, weight 1, up.
pub fn be6(addr: Ipv6Addr, port: u16) -> BackendSpec {
    BackendSpec {
        addr: addr.into(),
        port,
        weight: 1,
        up: true,
    }
}

/// An IPv6 service on `VIP6:port`, full NAT to `SNAT6`, over `backends` (address, port).
pub fn svc6(port: u16, proto: Proto, backends: &[(Ipv6Addr, u16)]) -> ServiceSpec {
    ServiceSpec {
        vip: VIP6.into(),
        port,
        proto,
        mode: Default::default(),
        snat: vec![SNAT6.into()],
        snat_ports: (vmlb_common::SNAT_PORT_MIN, vmlb_common::SNAT_PORT_MAX),
        ring_size: vmlb_common::maglev::DEFAULT_RING_SIZE,
        backends: backends.iter().map(|&(a, p)| be6(a, p)).collect(),
    }
}
