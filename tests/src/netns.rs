//! Network namespaces for tests: created with iproute2 exactly as a person would, deleted on
//! drop (also when the test panics), so links and addresses vanish with them.
//!
//! Every namespace is named `vmlbt-<pid>-<n>-<tag>`; `sweep_stale()` removes those left behind
//! by a process that was killed before its destructors ran.

use std::{
    fs::File,
    os::fd::AsFd,
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{bail, Context as _};
use nix::sched::{setns, CloneFlags};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Run a command, failing with its stderr when it fails.
pub fn run(cmd: &str, args: &[&str]) -> anyhow::Result<Output> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("spawning {cmd}"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// Delete namespaces left by test processes that no longer exist.
pub fn sweep_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix("vmlbt-") else {
            continue;
        };
        let pid: i32 = rest
            .split('-')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        let alive = pid > 0 && std::path::Path::new(&format!("/proc/{pid}")).exists();
        if !alive {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

pub struct Netns {
    name: String,
    delete_on_drop: bool,
}

impl Netns {
    /// A fresh namespace named `vmlbt-<pid>-<n>-<tag>`, loopback up, deleted on drop.
    pub fn new(tag: &str) -> anyhow::Result<Self> {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        Self::create(format!("vmlbt-{}-{n}-{tag}", std::process::id()), true)
    }

    /// Create a namespace with this exact name, loopback up.
    pub fn create(name: String, delete_on_drop: bool) -> anyhow::Result<Self> {
        run("ip", &["netns", "add", &name])?;
        let ns = Self {
            name,
            delete_on_drop,
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A handle on a namespace that may exist; never deleted on drop.
    pub fn named(name: &str) -> Self {
        Self {
            name: name.to_string(),
            delete_on_drop: false,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn exists(&self) -> bool {
        std::path::Path::new("/run/netns").join(&self.name).exists()
    }

    /// `ip -n <ns> args...`
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<Output> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Run a program inside the namespace and wait for it; fails with its stderr.
    pub fn exec(&self, args: &[&str]) -> anyhow::Result<Output> {
        let mut all = vec!["netns", "exec", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// A `Command` that runs inside the namespace (for spawning servers). `ip netns exec` execs
    /// the program, so the child's pid is the program's.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", self.name.as_str()]).arg(program);
        c
    }

    pub fn sysctl(&self, key: &str, value: &str) -> anyhow::Result<()> {
        self.exec(&["sysctl", "-qw", &format!("{key}={value}")])?;
        Ok(())
    }

    /// Interface index of `dev` inside the namespace.
    pub fn ifindex(&self, dev: &str) -> anyhow::Result<u32> {
        let out = self.exec(&["cat", &format!("/sys/class/net/{dev}/ifindex")])?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
    }

    /// Move the calling thread into the namespace until the guard drops. BPF_PROG_TEST_RUN,
    /// bpf_fib_lookup and aya's interface-name lookups use the caller's namespace; sockets
    /// opened meanwhile live there too.
    pub fn enter(&self) -> anyhow::Result<NsGuard> {
        let orig = File::open("/proc/thread-self/ns/net").context("opening own netns")?;
        let target = File::open(format!("/run/netns/{}", self.name))
            .with_context(|| format!("opening netns {}", self.name))?;
        setns(target.as_fd(), CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("setns into {}", self.name))?;
        Ok(NsGuard { orig })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Never panic in a destructor (it may run during a panic); deleting the namespace
        // destroys the veths and addresses in it.
        if self.delete_on_drop {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.name])
                .status();
        }
    }
}

/// Restores the thread's original namespace on drop.
pub struct NsGuard {
    orig: File,
}

impl Drop for NsGuard {
    fn drop(&mut self) {
        let _ = setns(self.orig.as_fd(), CloneFlags::CLONE_NEWNET);
    }
}

/// A veth pair between two namespaces: `a_dev` in `a`, `b_dev` in `b`, both up, with fixed MACs.
pub fn veth(
    a: &Netns,
    a_dev: &str,
    a_mac: &str,
    b: &Netns,
    b_dev: &str,
    b_mac: &str,
) -> anyhow::Result<()> {
    a.ip(&[
        "link",
        "add",
        a_dev,
        "address",
        a_mac,
        "type",
        "veth",
        "peer",
        "name",
        b_dev,
        "address",
        b_mac,
        "netns",
        b.name(),
    ])?;
    a.ip(&["link", "set", a_dev, "up"])?;
    b.ip(&["link", "set", b_dev, "up"])?;
    Ok(())
}
