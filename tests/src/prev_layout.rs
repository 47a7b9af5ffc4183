//! The vmlb of the previous map layout (`vmlb_common::LAYOUT_VERSION` - 1), built from git, so
//! the upgrade test runs the real previous daemon.
//!
//! Its source is taken with `git archive` (no worktree is registered) into
//! `<target>/layout-prev/<commit>/src` and built there in a target directory of its own (see
//! `build`), offline (the same Cargo.lock, so the registry cache has every crate). The binary
//! is kept as `<target>/layout-prev/<commit>/vmlb`, so later runs skip the build.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::OnceLock,
};

/// The last commit with the previous layout (version 2: the `FLOWS` hash maps as the flow
/// index). When `LAYOUT_VERSION` is bumped, this becomes the last commit of the version before
/// the bump, and `VERSION` follows. (Version 1's was f85e675.)
pub const COMMIT: &str = "19d398dadeb53f852713ca7ee4bed19639f47f9f";
/// The layout version `COMMIT` pins.
pub const VERSION: u32 = 2;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_path_buf()
}

fn target_dir() -> PathBuf {
    let root = workspace();
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), |t| root.join(t))
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running {cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn build() -> Result<PathBuf, String> {
    let target = target_dir();
    let base = target.join("layout-prev").join(COMMIT);
    let bin = base.join("vmlb");
    if bin.exists() {
        return Ok(bin);
    }
    let src = base.join("src");
    let _ = std::fs::remove_dir_all(&src);
    std::fs::create_dir_all(&src).map_err(|e| format!("creating {}: {e}", src.display()))?;
    let archive = format!(
        "git -C {} archive --format=tar {COMMIT} | tar -x -C {}",
        workspace().display(),
        src.display()
    );
    run(Command::new("bash").args(["-o", "pipefail", "-c", &archive]))
        .map_err(|e| format!("{e}\n(the upgrade test needs the git history with {COMMIT})"))?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // A target directory of its own. Sharing this workspace's (to reuse the compiled
    // dependencies) corrupted it: cargo hashes workspace members by their path relative to the
    // workspace root, so the old crates took the current ones' artifact names, and the current
    // daemon was then linked with the old eBPF object (seen: "program vmlb6 missing").
    let own = base.join("target");
    run(Command::new(&cargo)
        .args(["build", "--offline", "-p", "vmlb-user", "--bin", "vmlb"])
        .current_dir(&src)
        .env("CARGO_TARGET_DIR", &own))?;
    let built = own.join("debug").join("vmlb");
    std::fs::copy(&built, &bin).map_err(|e| format!("copying {}: {e}", built.display()))?;
    let _ = std::fs::remove_dir_all(&src);
    let _ = std::fs::remove_dir_all(&own);
    Ok(bin)
}

/// The previous layout's vmlb binary, built once (then kept under the target directory).
pub fn vmlb_bin() -> &'static Path {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(build)
        .as_deref()
        .unwrap_or_else(|e| panic!("building the previous layout's vmlb: {e}"))
}
