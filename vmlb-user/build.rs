use anyhow::{anyhow, Context as _};
use aya_build::{Package, Toolchain};

/// Builds vmlb-ebpf for the BPF target and leaves the object in OUT_DIR for `include_bytes!`.
///
/// The toolchain is Debian's rustc linked as rustup toolchain "bpf-debian" (scripts/bootstrap.sh):
/// it ships the library source that `-Z build-std=core` needs. It reports itself as stable, so
/// RUSTC_BOOTSTRAP=1 is set for that sub-build only (this build script's own environment).
fn main() -> anyhow::Result<()> {
    let meta = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let pkg = meta
        .packages
        .iter()
        .find(|p| p.name.as_str() == "vmlb-ebpf")
        .ok_or_else(|| anyhow!("vmlb-ebpf package not found"))?;
    let root_dir = pkg
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("vmlb-ebpf manifest has no parent directory"))?;
    // SAFETY: build scripts are single-threaded; the variable is meant for the child cargo.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    aya_build::build_ebpf(
        [Package {
            name: "vmlb-ebpf",
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        Toolchain::Custom("bpf-debian"),
    )
    .context("building the eBPF object (run scripts/bootstrap.sh if bpf-linker or the bpf-debian toolchain is missing)")
}
