//! `vmlb run` on a per-test lab's node, for scenario tests that live outside `lab_e2e.rs`
//! (the trunk and the ICMP/PMTU tests): the binary built once per process, a directory with the
//! configuration, run dir, log and a bpffs of its own for `--pin-dir` (see `lab::mount_bpffs`),
//! readiness awaited on `/readyz`. Dropping it stops the daemon (SIGTERM, SIGKILL after 5 s),
//! unmounts the bpffs (releasing every pin) and removes the directory, also on panic.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddr},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicU16, AtomicU32, Ordering},
        OnceLock,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

use crate::lab::{mount_bpffs, stop_group, unmount_bpffs, Lab, NODE_ADDR, NODE_DEV, VIP};

const DIR_PREFIX: &str = "vmlb-lab-daemon-";
/// Metrics ports, one per daemon (each node namespace has its own loopback; distinct ports only
/// keep logs unambiguous). Apart from lab_e2e's range.
static NEXT_PORT: AtomicU16 = AtomicU16::new(29434);
static NEXT_DIR: AtomicU32 = AtomicU32::new(0);

/// `vmlb run --kubernetes` as the cluster tests start it, on `cmd` (`<namespace>.command(
/// vmlb_bin())`, so it runs where the API server's loopback listener is): pins under
/// `dir/bpf`, state under `dir/run`, `dir/kubeconfig`, and `dir/pools.yaml` when `pools`; one
/// `--snat-addr` per family; output to `log`; in a process group of its own (`stop_group`).
pub struct KubeRun<'a> {
    pub iface: &'a str,
    /// `native` on the lab's veths, `skb` where nothing is sent.
    pub xdp_mode: &'a str,
    pub snat: &'a [std::net::IpAddr],
    pub metrics: SocketAddr,
    pub dir: &'a Path,
    pub pools: bool,
    /// NODE_NAME and POD_NAMESPACE, as the DaemonSet sets them.
    pub node: &'a str,
    pub namespace: &'a str,
}

impl KubeRun<'_> {
    pub fn spawn(&self, mut cmd: Command, log: &Path) -> std::io::Result<Child> {
        let out = fs::File::create(log)?;
        cmd.args(["run", "--kubernetes", "--iface", self.iface])
            .args(["--xdp-mode", self.xdp_mode])
            .args(["--metrics-addr", &self.metrics.to_string()]);
        for a in self.snat {
            cmd.args(["--snat-addr", &a.to_string()]);
        }
        cmd.arg("--pin-dir")
            .arg(self.dir.join("bpf"))
            .arg("--run-dir")
            .arg(self.dir.join("run"));
        if self.pools {
            cmd.arg("--pools").arg(self.dir.join("pools.yaml"));
        }
        cmd.env("KUBECONFIG", self.dir.join("kubeconfig"))
            .env("NODE_NAME", self.node)
            .env("POD_NAMESPACE", self.namespace)
            .env("NO_COLOR", "1")
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
    }
}

/// The vmlb binary, built once per test process (`cargo test` builds a dependency's library but
/// not its binaries).
pub fn vmlb_bin() -> &'static Path {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let built = BIN.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("tests/ lives in the workspace");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let out = Command::new(&cargo)
            .args(["build", "-p", "vmlb-user", "--bin", "vmlb"])
            .current_dir(root)
            .output()
            .map_err(|e| format!("running {cargo}: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "cargo build -p vmlb-user --bin vmlb failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map_or_else(|| root.join("target"), |t| root.join(t));
        Ok(target.join("debug").join("vmlb"))
    });
    built.as_deref().unwrap_or_else(|e| panic!("{e}"))
}

/// The seed's ServiceEntry: the VIP on port 80 to `endpoints`.
pub fn service_entry(endpoints: &[Ipv4Addr]) -> String {
    let mut y = format!(
        "apiVersion: networking.istio.io/v1beta1\nkind: ServiceEntry\nmetadata:\n  name: vms\n\
         spec:\n  hosts:\n  - vms.vlan-1512.org\n  addresses:\n  - {VIP}\n  ports:\n  \
         - number: 80\n    name: http\n    protocol: TCP\n  resolution: STATIC\n  endpoints:\n"
    );
    for e in endpoints {
        y += &format!("  - address: \"{e}\"\n");
    }
    y
}

/// A ServiceEntry for the IPv6 VIP (`lab::VIP6`) on port 80 with these endpoints.
pub fn service_entry6(endpoints: &[std::net::Ipv6Addr]) -> String {
    let mut y = format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: vms6\nspec:\n  \
         hosts:\n  - vms.vlan-1512.org\n  addresses:\n  - \"{}\"\n  ports:\n  - number: 80\n    \
         name: http\n    protocol: TCP\n  resolution: STATIC\n  endpoints:\n",
        crate::lab::VIP6
    );
    for e in endpoints {
        y += &format!("  - address: \"{e}\"\n");
    }
    y
}

/// Remove directories (and unmount the bpffs) of test processes that were killed.
fn sweep_stale_dirs() {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(DIR_PREFIX) else {
            continue;
        };
        let pid = rest.split('-').next().unwrap_or("");
        if !Path::new("/proc").join(pid).exists() {
            unmount_bpffs(&e.path().join("bpf"));
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

/// The daemon's directory; dropping it unmounts the bpffs (releasing the pins) and removes it.
struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        unmount_bpffs(&self.0.join("bpf"));
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Field order is drop order: the daemon is stopped (`Drop`) before its directory goes.
pub struct LabDaemon {
    child: Child,
    pub metrics: SocketAddr,
    dir: Dir,
}

impl LabDaemon {
    /// Start `vmlb run` on the lab's node with `config` and the extra arguments (e.g.
    /// `["--vlan", "1512"]`), and wait (at most 20 s) until it is ready.
    pub fn start(lab: &Lab, config: &str, extra: &[&str]) -> anyhow::Result<Self> {
        Self::start_bin(lab, vmlb_bin(), config, extra)
    }

    /// `start` with another vmlb binary (e.g. an older version's).
    pub fn start_bin(lab: &Lab, bin: &Path, config: &str, extra: &[&str]) -> anyhow::Result<Self> {
        sweep_stale_dirs();
        let n = NEXT_DIR.fetch_add(1, Ordering::Relaxed);
        let dir = Dir(std::env::temp_dir().join(format!("{DIR_PREFIX}{}-{n}", std::process::id())));
        fs::create_dir_all(dir.0.join("run"))?;
        mount_bpffs(&dir.0.join("bpf"))?;
        fs::write(dir.0.join("services.yaml"), config)?;
        let metrics = SocketAddr::from(([127, 0, 0, 1], NEXT_PORT.fetch_add(1, Ordering::Relaxed)));
        let child = Self::spawn(lab, bin, &dir.0, metrics, extra)?;
        let mut d = Self {
            child,
            metrics,
            dir,
        };
        d.wait_ready(lab)?;
        Ok(d)
    }

    fn spawn(
        lab: &Lab,
        bin: &Path,
        dir: &Path,
        metrics: SocketAddr,
        extra: &[&str],
    ) -> anyhow::Result<Child> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("daemon.log"))?;
        lab.node
            .command(bin)
            .args([
                "run",
                "--iface",
                NODE_DEV,
                "--xdp-mode",
                "native",
                "--config",
            ])
            .arg(dir.join("services.yaml"))
            .args(["--snat-addr", &NODE_ADDR.to_string(), "--pin-dir"])
            .arg(dir.join("bpf"))
            .arg("--run-dir")
            .arg(dir.join("run"))
            .args(["--metrics-addr", &metrics.to_string()])
            .args(extra)
            .env("NO_COLOR", "1")
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning vmlb run")
    }

    /// Stop this daemon (SIGTERM: the program stays attached and pinned) and start `bin` on the
    /// same pins, run directory and configuration, as an upgrade does; wait until it is ready.
    /// On failure the error carries the new daemon's output (it may have refused to start).
    pub fn restart_with(&mut self, lab: &Lab, bin: &Path, extra: &[&str]) -> anyhow::Result<()> {
        self.stop();
        self.child = Self::spawn(lab, bin, &self.dir.0, self.metrics, extra)?;
        self.wait_ready(lab)
    }

    /// Stop the daemon (SIGTERM, SIGKILL after 5 s), leaving its pins.
    pub fn stop(&mut self) {
        let child = &mut self.child;
        if matches!(child.try_wait(), Ok(None)) {
            stop_group(child.id(), Duration::from_secs(5), || {
                matches!(child.try_wait(), Ok(Some(_)))
            });
            let _ = child.wait();
        }
    }

    /// Whether the daemon process has exited, with its status.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The daemon's `--pin-dir`.
    pub fn pins(&self) -> PathBuf {
        self.dir.0.join("bpf")
    }

    /// The daemon's output so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.0.join("daemon.log")).unwrap_or_default()
    }

    fn wait_ready(&mut self, lab: &Lab) -> anyhow::Result<()> {
        let url = format!("http://{}/readyz", self.metrics);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("vmlb exited ({status}):\n{}", self.log());
            }
            let last = match lab.node.exec(&["curl", "-sf", "--max-time", "1", &url]) {
                Ok(_) => return Ok(()),
                Err(e) => e,
            };
            if Instant::now() > deadline {
                bail!(
                    "not ready after 20 s ({last:#}); vmlb's output:\n{}",
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// `vmlb inspect <args>` against this daemon's pins and run dir, run in the node namespace.
    pub fn inspect(&self, lab: &Lab, args: &[&str]) -> anyhow::Result<String> {
        let pins = self.pins();
        let run = self.dir.0.join("run");
        let mut all = vec![vmlb_bin().to_str().context("binary path")?, "inspect"];
        all.extend_from_slice(&["--pin-dir", pins.to_str().context("pin path")?]);
        all.extend_from_slice(&["--run-dir", run.to_str().context("run path")?]);
        all.extend_from_slice(&["--iface", NODE_DEV]);
        all.extend_from_slice(args);
        let out = lab.node.exec(&all)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The daemon's log and what `inspect` says, for failure reports.
    pub fn report(&self, lab: &Lab) -> String {
        let mut out = format!("=== vmlb output\n{}", self.log());
        for what in ["stats", "backends", "neighbours", "flows"] {
            let text = self
                .inspect(lab, &[what])
                .unwrap_or_else(|e| format!("{e:#}\n"));
            out += &format!("=== vmlb inspect {what}\n{text}");
        }
        out
    }
}

impl Drop for LabDaemon {
    fn drop(&mut self) {
        self.stop();
    }
}
