//! Project tasks: `cargo xtask <task>`. Each task bootstraps the machine first (idempotent and
//! quick when already done), so every command works on a fresh machine of the project's kind.

use std::{
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
}

#[derive(Subcommand)]
enum Bench {
    /// ns/packet of the XDP paths under BPF_PROG_TEST_RUN, and Maglev build times. Root.
    Datapath {
        /// Iterations per timed run (new-flow runs use a twentieth).
        #[arg(long, default_value_t = 2_000_000)]
        repeat: u32,
    },
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

fn setup() -> anyhow::Result<()> {
    run(Command::new("bash").arg("scripts/bootstrap.sh"))
}

fn require_root(what: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
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
            // The default members: everything but the BPF-only crate, which build.rs compiles.
            run(cargo().args(["test", "--"]).args(args))
        }
        Task::Lint => {
            run(cargo().args(["fmt", "--all", "--", "--check"]))?;
            run(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))
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
    }
}
