use which::which;

/// Cargo does not track the linker binary; rebuild the eBPF object when bpf-linker changes.
fn main() {
    if let Ok(path) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}
