//! Reads and writes of the real array maps against what was written, and a restart's adoption
//! through them (the same configuration applied again writes nothing): Maglev tables through
//! the mapping of a BPF_F_MMAPABLE `MAGLEV`, and through `BPF_MAP_LOOKUP_BATCH`/`UPDATE_BATCH`
//! (split across threads for big tables) when `MAGLEV` was pinned by an older vmlb without the
//! flag; `BACKENDS` always in batches.
//!
//! Needs root (it loads the program, not attached); part of the normal test run.

use std::{
    ffi::CString,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{FromRawFd as _, OwnedFd},
    path::PathBuf,
};

use vmlb_common::{maglev, map_names, Backend, BE_F_UP};
use vmlb_tests::lab::{mount_bpffs, unmount_bpffs};
use vmlb_user::{
    dataplane::{attach, loader, maps::BpfMaps, pins::PinLayout, Dataplane as _},
    model::{BackendSpec, Proto, ServiceSpec},
    reconcile::Reconciler,
};

const RING: u32 = maglev::DEFAULT_RING_SIZE;
/// Room for a few tables at odd offsets (a batch that starts past 0 and ends mid-map).
const ENTRIES: u32 = 4 * RING + 7;

fn sizes() -> loader::Sizes {
    loader::Sizes {
        maglev: Some(ENTRIES),
        services: Some(64),
        backends: Some(256),
        ..Default::default()
    }
}

/// The program and its maps as this vmlb makes them: `MAGLEV` mapped.
fn load() -> (aya::Ebpf, BpfMaps) {
    let mut ebpf = loader::load(sizes()).expect("loading the program (needs root)");
    let maps = BpfMaps::from_ebpf(&mut ebpf).expect("maps");
    assert!(maps.maglev_mapped(), "this vmlb's MAGLEV is BPF_F_MMAPABLE");
    (ebpf, maps)
}

/// A bpffs of its own, unmounted and removed on drop (also when a test fails).
struct PinDir(PathBuf);

impl PinDir {
    fn new(tag: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("vmlb-maps-batch-{}-{tag}", std::process::id()));
        mount_bpffs(&dir).expect("mounting a bpffs");
        Self(dir)
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        unmount_bpffs(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `bpf(cmd, attr)`, the raw syscall (aya creates maps only from an object's definitions).
fn bpf<A>(cmd: libc::c_long, attr: &mut A) -> i64 {
    // SAFETY: `attr` is a valid prefix of `union bpf_attr` for `cmd`; the kernel reads only
    // `size_of::<A>()` bytes and zero-extends the rest.
    unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut A, std::mem::size_of::<A>()) }
}

/// A `MAGLEV` as an older vmlb made and pinned it: a plain array, no BPF_F_MMAPABLE.
fn pin_unmappable_maglev(layout: &PinLayout) {
    #[repr(C)]
    struct MapCreate {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
        inner_map_fd: u32,
        numa_node: u32,
        map_name: [u8; 16],
    }
    #[repr(C)]
    struct ObjPin {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_MAP_TYPE_ARRAY: u32 = 2;
    let mut map_name = [0u8; 16];
    map_name[..map_names::MAGLEV.len()].copy_from_slice(map_names::MAGLEV.as_bytes());
    let fd = bpf(
        BPF_MAP_CREATE,
        &mut MapCreate {
            map_type: BPF_MAP_TYPE_ARRAY,
            key_size: 4,
            value_size: 4,
            max_entries: ENTRIES,
            map_flags: 0,
            inner_map_fd: 0,
            numa_node: 0,
            map_name,
        },
    );
    assert!(
        fd >= 0,
        "BPF_MAP_CREATE: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a descriptor the kernel just returned, owned from here on.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    std::fs::create_dir_all(layout.dir()).expect("pin directory");
    let path = CString::new(
        layout
            .map(map_names::MAGLEV)
            .into_os_string()
            .into_encoded_bytes(),
    )
    .expect("pin path");
    let rc = bpf(
        BPF_OBJ_PIN,
        &mut ObjPin {
            pathname: path.as_ptr() as u64,
            bpf_fd: std::os::fd::AsRawFd::as_raw_fd(&fd) as u32,
            file_flags: 0,
        },
    );
    assert_eq!(rc, 0, "BPF_OBJ_PIN: {}", std::io::Error::last_os_error());
}

/// The program loaded against pins where `MAGLEV` is an older vmlb's (a daemon upgraded in
/// place reuses every pinned map as it is): tables go through syscalls.
fn load_over_unmappable_maglev(pins: &PinDir) -> (aya::Ebpf, BpfMaps, PinLayout) {
    let layout = PinLayout::new(&pins.0, "eth0");
    pin_unmappable_maglev(&layout);
    let mut ebpf = loader::load(loader::Sizes {
        pins: Some(layout.clone()),
        ..sizes()
    })
    .expect("loading the program against the pins (needs root)");
    let maps = BpfMaps::from_ebpf(&mut ebpf).expect("maps");
    assert!(
        !maps.maglev_mapped(),
        "the pinned MAGLEV lacks BPF_F_MMAPABLE: no mapping"
    );
    (ebpf, maps, layout)
}

/// Tables written at odd places read back the same, through `read_ring` and entry by entry,
/// and `BACKENDS` in batches.
fn ring_and_backend_reads_return_what_was_written(maps: &mut BpfMaps) {
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

/// Three services applied (two IPv4, one IPv6: SERVICES6, BACKENDS6, sharing MAGLEV and the
/// ids), then adopted from the maps as a restart does.
fn a_restart_adopts_the_maps_and_the_same_configuration_writes_nothing(maps: &mut BpfMaps) {
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
    first.apply(&specs, maps).expect("first apply");

    let config6 = maps.v6.config().expect("CONFIG6");
    assert_eq!(config6.snat_count, 1, "the IPv6 SNAT address is in CONFIG6");
    assert_eq!(maps.v6.read_services().expect("SERVICES6").len(), 1);

    let mut adopted = attach::adopt_reconciler(maps, ENTRIES).expect("adopting");
    assert_eq!(
        adopted.services6().count(),
        1,
        "the IPv6 service is adopted"
    );
    for s in &specs {
        assert_eq!(adopted.table(s.key()), first.table(s.key()), "{}", s.vip);
    }
    let summary = adopted.apply(&specs, maps).expect("apply after adopting");
    assert_eq!(
        summary,
        Default::default(),
        "the adopted state is the configured one"
    );
}

#[test]
fn mapped_maglev_reads_and_writes_return_what_was_written() {
    let (_ebpf, mut maps) = load();
    ring_and_backend_reads_return_what_was_written(&mut maps);
}

#[test]
fn mapped_maglev_restart_adopts_and_the_same_configuration_writes_nothing() {
    let (_ebpf, mut maps) = load();
    a_restart_adopts_the_maps_and_the_same_configuration_writes_nothing(&mut maps);
}

#[test]
fn a_maglev_pinned_without_mmap_is_read_and_written_with_batched_syscalls() {
    let pins = PinDir::new("rw");
    let (_ebpf, mut maps, layout) = load_over_unmappable_maglev(&pins);
    ring_and_backend_reads_return_what_was_written(&mut maps);
    // The pins opened again (a restart of the same daemon, the CLI) take the same path.
    let reopened = BpfMaps::from_pins(&layout).expect("opening the pins");
    assert!(!reopened.maglev_mapped());
    assert_eq!(
        reopened.read_ring(RING + 3, RING).expect("read_ring"),
        maps.read_ring(RING + 3, RING).expect("read_ring")
    );
}

#[test]
fn a_maglev_pinned_without_mmap_is_adopted_and_the_same_configuration_writes_nothing() {
    let pins = PinDir::new("adopt");
    let (_ebpf, mut maps, _) = load_over_unmappable_maglev(&pins);
    a_restart_adopts_the_maps_and_the_same_configuration_writes_nothing(&mut maps);
}
