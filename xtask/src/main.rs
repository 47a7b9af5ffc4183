//! Project tasks: `cargo xtask <task>`. Each task bootstraps the machine first (idempotent and
//! quick when already done), so every command works on a fresh machine of the project's kind.

use std::{
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "vmlb project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the toolchain and packages the project needs (scripts/bootstrap.sh).
    Setup,
    /// Run the packet-fixture suite against the real XDP program, printing every case. Root.
    Fixtures,
    /// Run every test: unit, property, fixtures and network-namespace end-to-end. Root.
    Test {
        /// Extra arguments for `cargo test` (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// cargo fmt --check and clippy with warnings denied.
    Lint,
    /// Benchmarks; prints a table and writes JSON under target/bench/.
    Bench {
        #[command(subcommand)]
        which: Bench,
    },
    /// The seed's lab in network namespaces that outlive the command (vmlb-lab-*). Root.
    Lab {
        #[command(subcommand)]
        action: LabAction,
    },
    /// The lab demo (no arguments) or the vmlb binary (`-- <args>`). Root.
    ///
    /// Without arguments: bring the lab up, run the vmlb daemon on its node with
    /// deploy/serviceentry-vms.yaml, show requests to the VIP and live counters until Ctrl-C (at
    /// most 10 minutes), then stop the daemon and take the lab down. With `-- <args>`: build and
    /// run vmlb with those arguments (e.g. `-- run --iface eth1 --config se.yaml`).
    Run {
        /// Stop the live view after this many seconds (for non-interactive use).
        #[arg(long, conflicts_with = "args")]
        duration: Option<u64>,
        /// Arguments for the vmlb binary (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
}

#[derive(Subcommand)]
enum LabAction {
    /// Build the lab (idempotent): client, VLAN segment, node (vlan1512 = 10.10.1.125), two VMs
    /// running Apache httpd.
    Up,
    /// Remove everything the lab created, also when it is only partly up.
    Down,
    /// Show what exists and whether the VIP answers.
    Status,
}

#[derive(Subcommand)]
enum Bench {
    /// ns/packet of the XDP paths under BPF_PROG_TEST_RUN, and Maglev build times. Root.
    Datapath {
        /// Iterations per timed run (new-flow runs use a twentieth).
        #[arg(long, default_value_t = 2_000_000)]
        repeat: u32,
    },
    /// vmlb end to end in the lab against direct, an XDP hop floor, HAProxy and nftables: new
    /// connections/s, keep-alive requests/s with p50/p99, CPU per request. Root. About 4
    /// minutes; VMLB_E2E_REPS and VMLB_E2E_SECS (default 5 x 4 s) make it longer.
    E2e,
    /// 4096 services, 65,536 backends and 1,000,000 live flows loaded; the kernel's memory per
    /// map. Root.
    Scale,
    /// Maglev build times, initial load and config-change latency with 1000 services, daemon
    /// start and restart to ready. Root.
    Control,
}

fn root_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd
        .current_dir(root_dir())
        .status()
        .with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// Where cargo puts binaries (CARGO_TARGET_DIR is relative to the workspace when relative).
fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => root_dir().join(dir),
        None => root_dir().join("target"),
    }
}

/// Build the vmlb binary (dev profile) and return its path.
fn build_vmlb() -> anyhow::Result<PathBuf> {
    run(cargo().args(["build", "-p", "vmlb-user", "--bin", "vmlb"]))?;
    Ok(target_dir().join("debug").join("vmlb"))
}

/// The lab logic lives in the vmlb-tests crate (it needs aya and vmlb); this crate stays light.
fn vmlb_lab(args: &[&str]) -> Command {
    let mut cmd = cargo();
    cmd.args([
        "run",
        "--quiet",
        "-p",
        "vmlb-tests",
        "--bin",
        "vmlb-lab",
        "--",
    ])
    .args(args);
    cmd
}

extern "C" fn ignore(_: libc::c_int) {}

/// Ctrl-C reaches the whole foreground process group: let the lab (our child) handle it and tear
/// itself down while we wait. A handler, not SIG_IGN, so the child starts with the default.
fn outlive_ctrl_c() {
    let handler = ignore as extern "C" fn(libc::c_int);
    // SAFETY: the handler does nothing.
    unsafe { libc::signal(libc::SIGINT, handler as libc::sighandler_t) };
}

fn setup() -> anyhow::Result<()> {
    run(Command::new("bash").arg("scripts/bootstrap.sh"))
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn require_root(what: &str) -> anyhow::Result<()> {
    if !is_root() {
        bail!("{what} loads XDP programs and creates network namespaces: run it as root");
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup => setup(),
        Task::Fixtures => {
            require_root("the fixture suite")?;
            setup()?;
            run(cargo().args([
                "test",
                "-p",
                "vmlb-tests",
                "--test",
                "fixtures",
                "--",
                "--test-threads",
                "2",
            ]))
        }
        Task::Test { args } => {
            require_root("the test suite")?;
            setup()?;
            // The daemon's end-to-end tests run the vmlb binary, which `cargo test` does not
            // build (it is a dependency's binary); building it here saves them the wait.
            build_vmlb()?;
            // The default members: everything but the BPF-only crate, which build.rs compiles.
            run(cargo().args(["test", "--"]).args(args))
        }
        Task::Lint => {
            run(cargo().args(["fmt", "--all", "--", "--check"]))?;
            run(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
            // The BPF crate, checked for the host: the bpf-debian toolchain that builds it has
            // no clippy, and stable's clippy has no library source for bpfel-unknown-none. Both
            // targets are 64-bit little-endian and the bindings are the same, so the lints are
            // too. panic=abort because a no_std binary cannot unwind; RUSTC_BOOTSTRAP for the
            // crate's `core_intrinsics`; its own target dir so these flags do not rebuild the rest.
            run(cargo()
                .args([
                    "clippy",
                    "-p",
                    "vmlb-ebpf",
                    "--bins",
                    "--",
                    "-D",
                    "warnings",
                ])
                .env("RUSTC_BOOTSTRAP", "1")
                .env("RUSTFLAGS", "-C panic=abort")
                .env("CARGO_TARGET_DIR", target_dir().join("clippy-bpf")))
        }
        Task::Bench {
            which: Bench::Datapath { repeat },
        } => {
            require_root("the data-path benchmark")?;
            setup()?;
            run(cargo()
                .args([
                    "run",
                    "--release",
                    "-p",
                    "vmlb-tests",
                    "--bin",
                    "datapath-bench",
                ])
                .env("VMLB_BENCH_REPEAT", repeat.to_string()))
        }
        Task::Bench { which: Bench::E2e } => {
            require_root("the end-to-end benchmark")?;
            setup()?;
            run(cargo().args(["build", "--release", "-p", "vmlb-user", "--bin", "vmlb"]))?;
            run(cargo()
                .args(["run", "--release", "-p", "vmlb-tests", "--bin", "e2e-bench"])
                .env("VMLB_BIN", target_dir().join("release").join("vmlb")))
        }
        Task::Bench {
            which: which @ (Bench::Scale | Bench::Control),
        } => {
            require_root("the benchmark")?;
            setup()?;
            let bin = if matches!(which, Bench::Scale) {
                "scale-bench"
            } else {
                run(cargo().args(["build", "--release", "-p", "vmlb-user", "--bin", "vmlb"]))?;
                "control-bench"
            };
            run(cargo()
                .args(["run", "--release", "-p", "vmlb-tests", "--bin", bin])
                .env("VMLB_BIN", target_dir().join("release").join("vmlb")))
        }
        Task::Lab { action } => {
            require_root("the lab")?;
            setup()?;
            run(&mut vmlb_lab(&[match action {
                LabAction::Up => "up",
                LabAction::Down => "down",
                LabAction::Status => "status",
            }]))
        }
        Task::Run { duration, args } if args.is_empty() => {
            require_root("the lab demo")?;
            setup()?;
            let vmlb = build_vmlb()?;
            let config = root_dir().join("deploy/serviceentry-vms.yaml");
            let mut cmd = vmlb_lab(&["demo"]);
            cmd.arg("--vmlb").arg(&vmlb).arg("--config").arg(&config);
            if let Some(secs) = duration {
                cmd.args(["--duration", &secs.to_string()]);
            }
            outlive_ctrl_c();
            run(&mut cmd)
        }
        Task::Run { args, .. } => {
            if !is_root() {
                bail!("vmlb attaches XDP programs and pins BPF maps: run `cargo xtask run -- ...` as root");
            }
            setup()?;
            let vmlb = build_vmlb()?;
            // Replace this process, so signals (Ctrl-C, SIGTERM, SIGHUP) reach vmlb directly.
            let err = Command::new(&vmlb).args(&args).exec();
            Err(err).with_context(|| format!("executing {}", vmlb.display()))
        }
    }
}
