//! The one home of address and protocol spelling: the maps hold addresses as `u32` in network
//! byte order (as the packet has them) and ports big-endian; people and metrics read
//! `10.10.1.2:80/tcp`. Every conversion between the two goes through here, and protocols are
//! always spelled in lowercase.

use std::net::{Ipv4Addr, SocketAddrV4};

use vmlb_common::{Backend, ServiceKey};

use crate::model::Proto;

/// An address as a map holds it (network byte order in a `u32`).
pub fn ip(a: u32) -> Ipv4Addr {
    Ipv4Addr::from(a.to_ne_bytes())
}

/// The map form of an address (inverse of [`ip`]).
pub fn raw(a: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(a.octets())
}

/// An address and a big-endian port as a map holds them.
pub fn sock(a: u32, port_be: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip(a), u16::from_be(port_be))
}

/// "tcp", "udp", or the protocol number for anything else.
pub fn proto_name(proto: u8) -> String {
    match Proto::from_number(proto) {
        Some(p) => p.name().to_string(),
        None => proto.to_string(),
    }
}

/// "tcp"/"udp" (any case) -> the protocol.
pub fn parse_proto(s: &str) -> Option<Proto> {
    match s.to_ascii_lowercase().as_str() {
        "tcp" => Some(Proto::Tcp),
        "udp" => Some(Proto::Udp),
        _ => None,
    }
}

/// "VIP:port/proto" of a `SERVICES` key.
pub fn service_addr(key: &ServiceKey) -> String {
    format!("{}/{}", sock(key.vip, key.port), proto_name(key.proto))
}

/// "VIP:PORT/PROTO" -> a `SERVICES` key.
pub fn parse_service_addr(s: &str) -> Option<ServiceKey> {
    let (addr, proto) = s.rsplit_once('/')?;
    let addr: SocketAddrV4 = addr.parse().ok()?;
    Some(ServiceKey {
        vip: raw(*addr.ip()),
        port: addr.port().to_be(),
        proto: parse_proto(proto)?.number(),
        _pad: 0,
    })
}

/// "addr:port" of a backend.
pub fn backend_addr(b: &Backend) -> String {
    sock(b.addr, b.port).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_addresses_round_trip() {
        let k = parse_service_addr("10.10.1.128:80/TCP").unwrap();
        assert_eq!(service_addr(&k), "10.10.1.128:80/tcp");
        assert_eq!(ip(k.vip), Ipv4Addr::new(10, 10, 1, 128));
        assert_eq!(u16::from_be(k.port), 80);
        for bad in [
            "10.10.1.128:80",
            "10.10.1.128/tcp",
            "x:80/tcp",
            "10.10.1.128:80/sctp",
        ] {
            assert!(parse_service_addr(bad).is_none(), "{bad}");
        }
        assert_eq!(proto_name(1), "1");
        assert_eq!(proto_name(17), "udp");
    }
}
