//! The embedded eBPF object and how to load it.

use anyhow::Context as _;
use aya::{programs::Xdp, Ebpf, EbpfLoader};
use vmlb_common::{map_names, PROGRAM_NAME};

/// The XDP object built by build.rs from vmlb-ebpf.
pub static VMLB_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/vmlb"));

/// Helper programs for the benchmark and the lab (vmlb-ebpf/src/bin/tools.rs).
pub static TOOLS_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/vmlb-tools"));

/// Map sizes that may differ from the compiled-in defaults.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sizes {
    /// Entries of the conntrack map (two per connection).
    pub flows: Option<u32>,
    /// Entries of the Maglev array shared by all services' tables.
    pub maglev: Option<u32>,
}

/// Load the object and its program into the kernel (verifier included), without attaching.
pub fn load(sizes: Sizes) -> anyhow::Result<Ebpf> {
    let mut loader = EbpfLoader::new();
    if let Some(n) = sizes.flows {
        loader.map_max_entries(map_names::FLOWS, n);
    }
    if let Some(n) = sizes.maglev {
        loader.map_max_entries(map_names::MAGLEV, n);
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
    Ok(ebpf)
}
