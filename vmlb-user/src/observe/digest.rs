//! A digest of a Maglev table as the addresses it sends to, so that nodes can check that they
//! agree: every node builds its tables from the same objects, and any node can take a VIP over
//! only if its table picks the same backend for every flow.
//!
//! Slot by slot, the backend's address and port go into the hash (an empty slot as zeros);
//! backend ids do not, because each node numbers its backends in its own order. FNV-1a, written
//! out like the ownership ranking's hash, so that every vmlb version computes the same value.

use std::net::{IpAddr, Ipv4Addr};

/// The digest of one table: `slots` are the backends the slots name, in slot order (`None`:
/// empty, hashed as 0.0.0.0:0). An IPv4 backend hashes its 4 bytes, an IPv6 one its 16.
pub fn maglev_digest(slots: impl IntoIterator<Item = Option<(IpAddr, u16)>>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    let mut n: u32 = 0;
    for s in slots {
        let (addr, port) = s.unwrap_or((IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0));
        match addr {
            IpAddr::V4(a) => eat(&a.octets()),
            IpAddr::V6(a) => eat(&a.octets()),
        }
        eat(&port.to_be_bytes());
        n += 1;
    }
    // The size too, so that a table and its prefix differ.
    eat(&n.to_be_bytes());
    h
}

/// As shown by `vmlb inspect maglev` and in the metric's label: 16 hex digits.
pub fn hex(d: u64) -> String {
    format!("{d:016x}")
}

/// The digest of a table of backend ids, given what each id stands for.
pub fn digest_ids(table: &[u32], backend: impl Fn(u32) -> Option<(IpAddr, u16)>) -> u64 {
    maglev_digest(
        table
            .iter()
            .map(|&id| if id == 0 { None } else { backend(id) }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: (IpAddr, u16) = (IpAddr::V4(Ipv4Addr::new(10, 10, 1, 2)), 80);
    const B: (IpAddr, u16) = (IpAddr::V4(Ipv4Addr::new(10, 10, 1, 3)), 80);

    #[test]
    fn ids_do_not_matter_addresses_and_order_do() {
        // Node 1 numbered A=1, B=2; node 2 numbered A=7, B=3: same table, same digest.
        let n1 = digest_ids(&[1, 2, 1, 0], |id| [None, Some(A), Some(B)][id as usize]);
        let n2 = digest_ids(&[7, 3, 7, 0], |id| if id == 7 { Some(A) } else { Some(B) });
        assert_eq!(n1, n2);
        let swapped = digest_ids(&[2, 1, 1, 0], |id| [None, Some(A), Some(B)][id as usize]);
        assert_ne!(n1, swapped, "slot order matters");
        let other_port = maglev_digest([Some((A.0, 81)), Some(B), Some(A), None]);
        assert_ne!(n1, other_port);
        assert_ne!(
            maglev_digest([None]),
            maglev_digest([None, None]),
            "size matters"
        );
        assert_eq!(hex(1), "0000000000000001");
    }
}
