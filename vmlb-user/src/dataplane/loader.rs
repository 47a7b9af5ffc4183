//! The embedded eBPF object and how to load it.

use std::path::PathBuf;

use anyhow::Context as _;
use aya::{
    maps::ProgramArray,
    programs::{ProgramFd, Xdp},
    Ebpf, EbpfLoader,
};
use vmlb_common::{
    index::index_buckets, map_names, map_names6, JUMP_V6, JUMP_V6_ICMP, PROGRAM6_ICMP_NAME,
    PROGRAM6_NAME, PROGRAM_NAME,
};

use super::pins::PinLayout;

/// The XDP object built by build.rs from vmlb-ebpf.
pub static VMLB_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/vmlb"));

/// Helper programs for the benchmark and the lab (vmlb-ebpf/src/bin/tools.rs).
pub static TOOLS_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/vmlb-tools"));

/// How to load: map sizes that may differ from the compiled-in defaults, and where to pin.
#[derive(Clone, Debug, Default)]
pub struct Sizes {
    /// Concurrent flows (`FLOW_INDEX` gets `index::index_buckets` of it, `FLOW_SLOTS`
    /// `SLOTS_PER_FLOW` slots per flow).
    pub flows: Option<u32>,
    /// Concurrent IPv6 flows (`FLOW_INDEX6`, `FLOW_SLOTS6` as for IPv4), default
    /// `DEFAULT_FLOW6_ENTRIES`. 112 bytes per slot.
    pub flows6: Option<u32>,
    /// `FLOW_SLOTS` / `FLOW_SLOTS6` entries other than `SLOTS_PER_FLOW` per flow: a layout
    /// migration keeps the old tables' sizes, so every flow keeps its slot (an older layout
    /// had more slots per flow).
    pub flow_slots: Option<u32>,
    pub flow6_slots: Option<u32>,
    /// Entries of the Maglev array shared by all services' tables.
    pub maglev: Option<u32>,
    /// Service ids (`SERVICES`, `VIPS`, `SERVICES6`, `VIPS6`, `SVC_STATS`; id 0 is never
    /// used), default
    /// `MAX_SERVICES`.
    pub services: Option<u32>,
    /// Backend ids (`BACKENDS`, `BACKENDS6`, `HOPS`, `BE_STATS`; id 0 is never used), default
    /// `MAX_BACKENDS`. `HOPS` and `BE_STATS` are per-CPU: 56 bytes per id and CPU.
    pub backends: Option<u32>,
    /// Pin every map under this layout: a map already pinned there (an earlier daemon's state)
    /// is reused, else it is created and pinned.
    pub pins: Option<PinLayout>,
}

/// Load the object and its program into the kernel (verifier included), without attaching.
///
/// The verifier gives up with EAGAIN when a signal is pending for the loading thread (any
/// SIGCHLD of a process with children can land there), so a load that fails that way is simply
/// tried again, as libbpf does; other errors are final.
pub fn load(sizes: Sizes) -> anyhow::Result<Ebpf> {
    const TRIES: usize = 5;
    let mut attempt = 0;
    loop {
        attempt += 1;
        match load_once(&sizes) {
            Err(e) if attempt < TRIES && interrupted(&e) => continue,
            r => return r,
        }
    }
}

fn interrupted(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<aya::programs::ProgramError>(),
            Some(aya::programs::ProgramError::LoadError { io_error, .. })
                if io_error.raw_os_error() == Some(nix::errno::Errno::EAGAIN as i32)
        )
    })
}

fn load_once(sizes: &Sizes) -> anyhow::Result<Ebpf> {
    let mut loader = EbpfLoader::new();
    let pin_paths: Vec<(&str, PathBuf)> = match &sizes.pins {
        Some(layout) => super::layout::map_names()
            .map(|n| (n, layout.map(n)))
            .collect(),
        None => Vec::new(),
    };
    for (name, path) in &pin_paths {
        loader.map_pin_path(name, path.as_path());
    }
    if let Some(n) = sizes.flows {
        loader.map_max_entries(map_names::FLOW_INDEX, index_buckets(n));
        loader.map_max_entries(
            map_names::FLOW_SLOTS,
            n.saturating_mul(vmlb_common::SLOTS_PER_FLOW),
        );
    }
    if let Some(n) = sizes.flows6 {
        loader.map_max_entries(map_names6::FLOW_INDEX6, index_buckets(n));
        loader.map_max_entries(
            map_names6::FLOW_SLOTS6,
            n.saturating_mul(vmlb_common::SLOTS_PER_FLOW),
        );
    }
    if let Some(n) = sizes.flow_slots {
        loader.map_max_entries(map_names::FLOW_SLOTS, n);
    }
    if let Some(n) = sizes.flow6_slots {
        loader.map_max_entries(map_names6::FLOW_SLOTS6, n);
    }
    if let Some(n) = sizes.maglev {
        loader.map_max_entries(map_names::MAGLEV, n);
    }
    if let Some(n) = sizes.services {
        for map in [
            map_names::SERVICES,
            map_names::VIPS,
            map_names6::SERVICES6,
            map_names6::VIPS6,
            map_names::SVC_STATS,
        ] {
            loader.map_max_entries(map, n);
        }
    }
    if let Some(n) = sizes.backends {
        for map in [
            map_names::BACKENDS,
            map_names6::BACKENDS6,
            map_names::HOPS,
            map_names::BE_STATS,
            map_names::DNAT_ENDPOINTS,
            map_names6::DNAT_ENDPOINTS6,
        ] {
            loader.map_max_entries(map, n);
        }
    }
    let mut ebpf = loader
        .load(VMLB_OBJ)
        .context("loading the vmlb eBPF object")?;
    let prog: &mut Xdp = ebpf
        .program_mut(PROGRAM_NAME)
        .context("program vmlb missing from the object")?
        .try_into()?;
    prog.load()
        .context("the verifier rejected the vmlb XDP program")?;
    install_tail_calls(&mut ebpf)?;
    Ok(ebpf)
}

/// Load the IPv6 programs and put them where `vmlb` tail-calls them (`JUMP`).
fn install_tail_calls(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    let mut fds: Vec<(u32, ProgramFd)> = Vec::new();
    for (name, idx) in [(PROGRAM6_NAME, JUMP_V6), (PROGRAM6_ICMP_NAME, JUMP_V6_ICMP)] {
        let prog: &mut Xdp = ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing from the object"))?
            .try_into()?;
        prog.load()
            .with_context(|| format!("the verifier rejected the {name} XDP program"))?;
        fds.push((idx, prog.fd()?.try_clone()?));
    }
    let mut jump: ProgramArray<_> = ebpf
        .map_mut(map_names::JUMP)
        .context("map JUMP missing from the object")?
        .try_into()?;
    for (idx, fd) in &fds {
        jump.set(*idx, fd, 0)
            .with_context(|| format!("installing the IPv6 program at JUMP[{idx}]"))?;
    }
    Ok(())
}
