//! Batched reads and writes of the real array maps (`BPF_MAP_LOOKUP_BATCH`/`UPDATE_BATCH`,
//! split across threads for big tables) against what was written, and a restart's adoption
//! through them: the same configuration applied again writes nothing.
//!
//! Needs root (it loads the program, not attached); part of the normal test run.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use vmlb_common::{maglev, Backend, BE_F_UP};
use vmlb_user::{
    dataplane::{attach, loader, maps::BpfMaps, Dataplane as _},
    model::{BackendSpec, Proto, ServiceSpec},
    reconcile::Reconciler,
};

const RING: u32 = maglev::DEFAULT_RING_SIZE;
/// Room for a few tables at odd offsets (a batch that starts past 0 and ends mid-map).
const ENTRIES: u32 = 4 * RING + 7;

fn load() -> (aya::Ebpf, BpfMaps) {
    let mut ebpf = loader::load(loader::Sizes {
        maglev: Some(ENTRIES),
        services: Some(64),
        backends: Some(256),
        ..Default::default()
    })
    .expect("loading the program (needs root)");
    let maps = BpfMaps::from_ebpf(&mut ebpf).expect("maps");
    (ebpf, maps)
}

#[test]
fn batched_ring_and_backend_reads_return_what_was_written() {
    let (_ebpf, mut maps) = load();
    // Several tables, including one ending at the array's last entry and a short one.
    let at = [
        (0, RING),
        (RING + 3, RING),
        (ENTRIES - RING, RING),
        (2 * RING + 5, 100),
    ];
    for (n, &(base, len)) in at.iter().enumerate() {
        let table: Vec<u32> = (0..len)
            .map(|i| i.wrapping_mul(2_654_435_761) ^ n as u32)
            .collect();
        maps.write_ring(base, &table).expect("write_ring");
        assert_eq!(
            maps.read_ring(base, len).expect("read_ring"),
            table,
            "table {n} at {base}"
        );
        // Entry by entry agrees with the batch.
        for i in [0, len / 2, len - 1] {
            assert_eq!(
                maps.maglev.get(&(base + i), 0).expect("get"),
                table[i as usize]
            );
        }
    }
    assert!(
        maps.read_ring(ENTRIES - 10, 11).is_err(),
        "a read past the end fails"
    );

    let b = |id: u32| Backend {
        addr: u32::from_ne_bytes([10, 1, 0, id as u8]),
        port: 8080u16.to_be(),
        _pad: 0,
        flags: BE_F_UP,
        service_id: id % 7 + 1,
    };
    for id in [1, 2, 100, 255] {
        maps.set_backend(id, &b(id)).expect("set_backend");
    }
    let all = maps.read_backends().expect("read_backends");
    assert_eq!(all.len(), 256);
    for (id, got) in all.iter().enumerate() {
        let want = if [1, 2, 100, 255].contains(&id) {
            b(id as u32)
        } else {
            Backend::default()
        };
        assert_eq!(*got, want, "backend {id}");
    }
}

#[test]
fn a_restart_adopts_the_maps_and_the_same_configuration_writes_nothing() {
    let (_ebpf, mut maps) = load();
    // Two IPv4 services and an IPv6 one (SERVICES6, BACKENDS6, sharing MAGLEV and the ids).
    let v6 = |k: u8, j: u8| IpAddr::V6(Ipv6Addr::new(0xfd00, 0x65, k.into(), 0, 0, 0, 0, j.into()));
    let specs: Vec<ServiceSpec> = (0..3u8)
        .map(|k| ServiceSpec {
            vip: if k == 2 {
                Ipv6Addr::new(0xfd00, 0x66, 0, 0, 0, 0, 0, 2).into()
            } else {
                Ipv4Addr::new(10, 66, 0, k).into()
            },
            port: 80,
            proto: Proto::Tcp,
            mode: Default::default(),
            snat: vec![if k == 2 {
                Ipv6Addr::new(0xfd00, 0x64, 0, 0, 0, 0, 0, 1).into()
            } else {
                Ipv4Addr::new(10, 64, 0, 1).into()
            }],
            snat_ports: (vmlb_common::SNAT_PORT_MIN, vmlb_common::SNAT_PORT_MAX),
            ring_size: RING,
            backends: (1..=10u8)
                .map(|j| BackendSpec {
                    addr: if k == 2 {
                        v6(k, j)
                    } else {
                        Ipv4Addr::new(10, 65, k, j).into()
                    },
                    port: 80,
                    weight: 1,
                    up: j != 4,
                })
                .collect(),
        })
        .collect();
    let mut first = Reconciler::with_limits(ENTRIES, 64, 256);
    first.apply(&specs, &mut maps).expect("first apply");

    let config6 = maps.v6.config().expect("CONFIG6");
    assert_eq!(config6.snat_count, 1, "the IPv6 SNAT address is in CONFIG6");
    assert_eq!(maps.v6.read_services().expect("SERVICES6").len(), 1);

    let mut adopted = attach::adopt_reconciler(&maps, ENTRIES).expect("adopting");
    assert_eq!(
        adopted.services6().count(),
        1,
        "the IPv6 service is adopted"
    );
    for s in &specs {
        assert_eq!(adopted.table(s.key()), first.table(s.key()), "{}", s.vip);
    }
    let summary = adopted
        .apply(&specs, &mut maps)
        .expect("apply after adopting");
    assert_eq!(
        summary,
        Default::default(),
        "the adopted state is the configured one"
    );
}
