//! End to end through the daemon: `vmlb run` on the node of a per-test lab (unique namespace
//! names, so tests run in parallel and beside a `vmlb-lab up` lab), configured by a ServiceEntry
//! file the test edits, with the client sending real HTTP to Apache VMs through the VIP.
//!
//! Needs root, apache2, curl, wrk and ethtool (scripts/bootstrap.sh installs them). `cargo test`
//! builds a dependency's library but not its binaries, so the first test of this process runs
//! `cargo build -p vmlb-user --bin vmlb` once (`cargo xtask test` has already built it).
//!
//! Each test owns a directory `<tmp>/vmlb-lab-e2e-<pid>-<n>` with the config, the daemon's run
//! dir and logs, and a bpffs of its own for `--pin-dir`: `ip netns exec` remounts /sys, so pins
//! under /sys/fs/bpf would not outlive the daemon process, and a restarted daemon must find
//! them. Dropping a test's `World` kills the daemon, stops the servers, deletes the namespaces,
//! unmounts the bpffs (which releases every pin) and removes the directory, also on failure;
//! directories of killed test processes are swept by the next run.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::{Ipv4Addr, SocketAddr},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    sync::atomic::{AtomicU16, AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _};
use serde_json::Value;
use vmlb_common::{SNAT_PORT_MAX, SNAT_PORT_MIN};
use vmlb_tests::daemon::vmlb_bin;
use vmlb_tests::lab::{
    curl, mount_bpffs, stop_group, unmount_bpffs, vm_mac, HttpConn, Httpd, Lab, NODE_ADDR,
    NODE_DEV, VIP, VM1_ADDR, VM2_ADDR, VM3_ADDR,
};

/// Metrics ports, one per daemon start (each node namespace has its own loopback, so this only
/// keeps logs unambiguous).
static NEXT_PORT: AtomicU16 = AtomicU16::new(19434);
static NEXT_DIR: AtomicU32 = AtomicU32::new(0);
const DIR_PREFIX: &str = "vmlb-lab-e2e-";

/// Fast health checks for the test that stops a VM: down after 2 failed probes 500 ms apart.
const FAST_HEALTH: &[(&str, &str)] = &[
    ("vmlb.io/health-interval", "500ms"),
    ("vmlb.io/health-timeout", "300ms"),
    ("vmlb.io/health-fall", "2"),
];

/// A ServiceEntry like the seed's: VIP 10.10.1.128 on `ports`, one endpoint per address (taken
/// as written, so a test can write an invalid one).
fn service_entry(endpoints: &[&str], ports: &[u16], annotations: &[(&str, &str)]) -> String {
    let mut y = String::from(
        "apiVersion: networking.istio.io/v1beta1\nkind: ServiceEntry\nmetadata:\n  name: vms\n",
    );
    if !annotations.is_empty() {
        y += "  annotations:\n";
        for (k, v) in annotations {
            y += &format!("    {k}: \"{v}\"\n");
        }
    }
    y += &format!("spec:\n  hosts:\n  - vms.vlan-1512.org\n  addresses:\n  - {VIP}\n  ports:\n");
    for p in ports {
        let name = if *p == 443 { "https" } else { "http" };
        y += &format!("  - number: {p}\n    name: {name}\n    protocol: TCP\n");
    }
    y += "  resolution: STATIC\n  location: MESH_EXTERNAL\n  endpoints:\n";
    for e in endpoints {
        y += &format!("  - address: \"{e}\"\n");
    }
    y
}

/// Delete directories (and unmount the bpffs) of test processes that were killed.
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

/// One test's directory; dropping it unmounts its bpffs (releasing the pins) and removes it.
struct TestDir {
    path: PathBuf,
}

impl TestDir {
    fn new() -> anyhow::Result<Self> {
        sweep_stale_dirs();
        let n = NEXT_DIR.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("{DIR_PREFIX}{}-{n}", std::process::id()));
        fs::create_dir_all(path.join("run"))?;
        let dir = Self { path };
        mount_bpffs(&dir.pins())?;
        Ok(dir)
    }
    fn pins(&self) -> PathBuf {
        self.path.join("bpf")
    }
    fn config(&self) -> PathBuf {
        self.path.join("services.yaml")
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        unmount_bpffs(&self.pins());
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// The daemon, in its own process group; dropping it stops it (SIGTERM, SIGKILL after 5 s).
struct Daemon {
    child: Child,
    metrics: SocketAddr,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let child = &mut self.child;
        // Not once reaped (the restart test kills and waits itself): its pid may be reused.
        if matches!(child.try_wait(), Ok(None)) {
            stop_group(child.id(), Duration::from_secs(5), || {
                matches!(child.try_wait(), Ok(Some(_)))
            });
            let _ = child.wait();
        }
    }
}

/// One test's world. Field order is drop order: daemon, servers, namespaces, then the pins.
struct World {
    daemon: Option<Daemon>,
    servers: Vec<Httpd>,
    lab: Lab,
    dir: TestDir,
    /// Daemon starts so far; each writes daemon-<n>.log.
    starts: usize,
    /// `setpriv` capability list the daemon runs with (None: root's full set).
    caps: Option<&'static str>,
}

impl World {
    /// Lab, httpd on vm1 and vm2, the config, and a ready daemon.
    fn start(config: &str) -> anyhow::Result<Self> {
        Self::start_with(config, None)
    }

    /// `start`, the daemon limited to the capabilities in `caps` (a `setpriv` list).
    fn start_with(config: &str, caps: Option<&'static str>) -> anyhow::Result<Self> {
        let bin = vmlb_bin();
        let lab = Lab::new().context("building the lab")?;
        let servers = lab
            .vms
            .iter()
            .map(|vm| Httpd::start(&vm.ns, vm.name, vm.addr))
            .collect::<anyhow::Result<_>>()?;
        let mut w = Self {
            daemon: None,
            servers,
            lab,
            dir: TestDir::new()?,
            starts: 0,
            caps,
        };
        fs::write(w.dir.config(), config)?;
        w.start_daemon(bin)?;
        Ok(w)
    }

    fn start_daemon(&mut self, bin: &Path) -> anyhow::Result<()> {
        self.starts += 1;
        let log = fs::File::create(self.log_path(self.starts))?;
        let metrics = SocketAddr::from(([127, 0, 0, 1], NEXT_PORT.fetch_add(1, Ordering::Relaxed)));
        let mut command = match self.caps {
            // The bounding set limits what root gets on exec: exactly these, nothing else.
            Some(caps) => {
                let mut c = self.lab.node.command("setpriv");
                c.arg(format!("--bounding-set=-all,{caps}"))
                    .arg("--inh-caps=-all")
                    .arg("--")
                    .arg(bin);
                c
            }
            None => self.lab.node.command(bin),
        };
        let child = command
            .args([
                "run",
                "--iface",
                NODE_DEV,
                "--xdp-mode",
                "native",
                "--config",
            ])
            .arg(self.dir.config())
            .args(["--snat-addr", &NODE_ADDR.to_string(), "--pin-dir"])
            .arg(self.dir.pins())
            .arg("--run-dir")
            .arg(self.dir.path.join("run"))
            .args(["--metrics-addr", &metrics.to_string()])
            // Plain text logs (tracing colours them otherwise), for the reports.
            .env("NO_COLOR", "1")
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning vmlb run")?;
        self.daemon = Some(Daemon { child, metrics });
        self.wait_ready()
    }

    fn log_path(&self, n: usize) -> PathBuf {
        self.dir.path.join(format!("daemon-{n}.log"))
    }

    /// The current daemon's output so far.
    fn log(&self) -> String {
        fs::read_to_string(self.log_path(self.starts)).unwrap_or_default()
    }

    fn daemon(&mut self) -> anyhow::Result<&mut Daemon> {
        self.daemon.as_mut().context("no daemon")
    }

    /// Fail if the daemon has exited.
    fn daemon_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.daemon()?.child.try_wait()? {
            bail!("vmlb exited ({status}):\n{}", self.log());
        }
        Ok(())
    }

    fn readyz(&mut self) -> anyhow::Result<()> {
        let url = format!("http://{}/readyz", self.daemon()?.metrics);
        self.lab
            .node
            .exec(&["curl", "-sf", "--max-time", "1", &url])?;
        Ok(())
    }

    /// One scrape of /metrics, from inside the node namespace.
    fn metrics(&mut self) -> anyhow::Result<String> {
        let url = format!("http://{}/metrics", self.daemon()?.metrics);
        let out = self
            .lab
            .node
            .exec(&["curl", "-sf", "--max-time", "2", &url])?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Poll /readyz from inside the node namespace (at most 20 s).
    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            self.daemon_alive()?;
            let last = match self.readyz() {
                Ok(()) => return Ok(()),
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

    /// Replace the config the way editors and ConfigMap updates do: write aside, rename over.
    fn write_config(&self, text: &str) -> anyhow::Result<()> {
        let tmp = self.dir.path.join(".services.yaml.tmp");
        fs::write(&tmp, text)?;
        fs::rename(&tmp, self.dir.config())?;
        Ok(())
    }

    /// `vmlb inspect <what> -o json` against this test's pins and run dir.
    fn inspect(&self, what: &str) -> anyhow::Result<Value> {
        let out = self.inspect_raw(&[what, "-o", "json"])?;
        serde_json::from_str(&out).with_context(|| format!("inspect {what} JSON: {out}"))
    }

    fn inspect_raw(&self, args: &[&str]) -> anyhow::Result<String> {
        let pins = self.dir.pins();
        let run = self.dir.path.join("run");
        // The pin options belong to `inspect` itself, before the subcommand.
        let mut all = vec![vmlb_bin().to_str().context("binary path")?, "inspect"];
        all.extend_from_slice(&["--pin-dir", pins.to_str().context("pin path")?]);
        all.extend_from_slice(&["--run-dir", run.to_str().context("run path")?]);
        all.extend_from_slice(&["--iface", NODE_DEV]);
        all.extend_from_slice(args);
        let out = self.lab.node.exec(&all)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `n` sequential requests (each a new connection, so a new flow) to the VIP on port 80,
    /// tagged `t=<tag>-<i>` in the access logs: answers per VM. Any failure fails (after at
    /// most 3, so a broken path does not cost seconds per remaining request).
    fn spread(&self, n: usize, tag: &str) -> anyhow::Result<BTreeMap<String, usize>> {
        let mut answers = BTreeMap::new();
        let mut failures = Vec::new();
        for i in 0..n {
            match curl(&self.lab.client, &format!("http://{VIP}/?t={tag}-{i}"), 2) {
                Ok(body) => *answers.entry(body.trim().to_string()).or_default() += 1,
                Err(e) => failures.push(format!("request {i}: {e:#}")),
            }
            if failures.len() == 3 {
                break;
            }
        }
        ensure!(
            failures.is_empty(),
            "requests failed (answers so far {answers:?}):\n{}",
            failures.join("\n")
        );
        Ok(answers)
    }

    fn server(&self, name: &str) -> anyhow::Result<&Httpd> {
        self.servers
            .iter()
            .find(|s| s.name == name)
            .with_context(|| format!("no server {name}"))
    }

    /// Access log lines (after readiness) of every server whose request carries `t=<tag>-`.
    fn tagged_lines(&self, tag: &str) -> BTreeMap<String, Vec<String>> {
        let needle = format!("t={tag}-");
        self.servers
            .iter()
            .map(|s| {
                let lines = s.access_lines().into_iter();
                (
                    s.name.clone(),
                    lines.filter(|l| l.contains(&needle)).collect(),
                )
            })
            .collect()
    }

    /// Apache logs after answering: wait (at most 5 s) until `n` tagged requests are logged.
    fn wait_logged(&self, tag: &str, n: usize) -> BTreeMap<String, Vec<String>> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let lines = self.tagged_lines(tag);
            if lines.values().map(Vec::len).sum::<usize>() >= n || Instant::now() > deadline {
                return lines;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything that helps to understand a failure.
    fn report(&self) -> String {
        let mut out = String::new();
        for n in 1..=self.starts {
            let log = fs::read_to_string(self.log_path(n)).unwrap_or_default();
            out += &format!("=== vmlb output (start {n})\n{log}");
        }
        for what in ["stats", "services", "backends", "flows"] {
            let text = self
                .inspect_raw(&[what])
                .unwrap_or_else(|e| format!("{e:#}\n"));
            out += &format!("=== vmlb inspect {what}\n{text}");
        }
        out += &self.lab.describe();
        for s in &self.servers {
            out += &s.logs();
        }
        out
    }
}

/// Build a world with `config`, run `body`, and on failure print the diagnostics and panic.
/// Lab tests share the machine's two CPUs; the sustained-rate test must have them to itself
/// (its rate is the point), so it holds this exclusively and every other scenario shares it.
static MACHINE: std::sync::RwLock<()> = std::sync::RwLock::new(());

fn scenario(config: &str, body: impl FnOnce(&mut World) -> anyhow::Result<()>) {
    let _shared = MACHINE.read().unwrap_or_else(|e| e.into_inner());
    run_scenario(config, body);
}

fn run_scenario(config: &str, body: impl FnOnce(&mut World) -> anyhow::Result<()>) {
    let mut w = World::start(config).unwrap_or_else(|e| panic!("starting the lab: {e:#}"));
    if let Err(e) = body(&mut w) {
        eprintln!("{}", w.report());
        panic!("{e:#}");
    }
}

fn seed_config(extra: &[(&str, &str)]) -> String {
    service_entry(&["10.10.1.2", "10.10.1.3"], &[80], extra)
}

#[test]
fn requests_spread_over_both_vms_with_the_snat_source() {
    scenario(&seed_config(&[]), |w| {
        let answers = w.spread(40, "a")?;
        println!("answers: {answers:?}");
        // With 40 new flows over two equal backends, fewer than 5 on one has p ~ 1e-7.
        for vm in ["vm1", "vm2"] {
            let n = answers.get(vm).copied().unwrap_or(0);
            ensure!(n >= 5, "{vm} answered {n} of 40: {answers:?}");
        }
        ensure!(answers.len() == 2, "unexpected bodies: {answers:?}");
        let logged = w.wait_logged("a", 40);
        let snat_ports = SNAT_PORT_MIN..=SNAT_PORT_MAX;
        for (vm, lines) in &logged {
            ensure!(
                lines.len() == answers[vm],
                "{vm} logged {} requests but answered {}",
                lines.len(),
                answers[vm]
            );
            for line in lines {
                let mut f = line.split(' ');
                let addr: Option<Ipv4Addr> = f.next().and_then(|a| a.parse().ok());
                let port: Option<u16> = f.next().and_then(|p| p.parse().ok());
                ensure!(
                    addr == Some(NODE_ADDR) && port.is_some_and(|p| snat_ports.contains(&p)),
                    "{vm} saw a client other than {NODE_ADDR}:{snat_ports:?}: {line}"
                );
            }
        }
        Ok(())
    });
}

#[test]
fn a_keepalive_connection_keeps_its_backend() {
    scenario(&seed_config(&[]), |w| {
        // One curl, 20 URLs: curl reuses its connection; %{num_connects} says how many it opened.
        let urls: Vec<String> = (0..20).map(|i| format!("http://{VIP}/?t=b-{i}")).collect();
        let mut args = vec!["curl", "-sS", "--max-time", "10", "-w", "%{num_connects}\n"];
        args.extend(urls.iter().map(String::as_str));
        let out = w.lab.client.exec(&args)?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let lines: Vec<&str> = text.lines().collect();
        ensure!(lines.len() == 40, "want body + connects per URL:\n{text}");
        let bodies: BTreeSet<&str> = lines.iter().step_by(2).copied().collect();
        let connects: u32 = lines
            .iter()
            .skip(1)
            .step_by(2)
            .map(|c| c.parse::<u32>().unwrap_or(99))
            .sum();
        ensure!(connects == 1, "curl opened {connects} connections:\n{text}");
        ensure!(
            bodies.len() == 1,
            "one connection, several backends: {bodies:?}"
        );
        // The VM saw one client port for all of them: one SNATed connection.
        let logged = w.wait_logged("b", 20);
        let vm = *bodies.first().expect("one body");
        let ports: BTreeSet<&str> = logged[vm]
            .iter()
            .filter_map(|l| l.split(' ').nth(1))
            .collect();
        ensure!(
            logged[vm].len() == 20 && ports.len() == 1,
            "{vm} logged {} requests from ports {ports:?}",
            logged[vm].len()
        );
        Ok(())
    });
}

#[test]
fn adding_a_vm_moves_about_a_third_of_new_flows_and_no_established_one() {
    scenario(&seed_config(&[]), |w| {
        let vm3 = w.lab.add_vm("vm3", VM3_ADDR)?;
        let server = Httpd::start(&vm3.ns, "vm3", VM3_ADDR)?;
        w.servers.push(server);

        // Established before the edit: 12 kept-alive connections. If the daemon re-balanced
        // established flows, ~1/3 would move and break; all 12 staying by chance has p ~ 0.008.
        let vip = SocketAddr::from((VIP, 80));
        let mut conns = Vec::new();
        for i in 0..12 {
            let mut c = HttpConn::open(&w.lab.client, vip)?;
            let body = c.get(&format!("/?t=c-before-{i}"))?;
            conns.push((c, body));
        }

        w.write_config(&service_entry(
            &["10.10.1.2", "10.10.1.3", "10.10.1.4"],
            &[80],
            &[],
        ))?;
        // The reload has happened once a new connection lands on vm3 (at most 100 tries, 15 s).
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut tries = 0;
        loop {
            w.daemon_alive()?;
            let body = curl(
                &w.lab.client,
                &format!("http://{VIP}/?t=c-probe-{tries}"),
                2,
            );
            if body.is_ok_and(|b| b.trim() == "vm3") {
                break;
            }
            tries += 1;
            ensure!(
                tries < 100 && Instant::now() < deadline,
                "vm3 never answered after the config edit ({tries} tries)"
            );
            thread::sleep(Duration::from_millis(100));
        }

        let answers = w.spread(60, "c-new")?;
        println!("60 new connections after adding vm3: {answers:?}");
        let on_vm3 = answers.get("vm3").copied().unwrap_or(0);
        // Maglev gives the third backend ~1/3 of the table: 20 of 60 expected; 9..=33 is
        // 15 %..55 %, far outside sampling noise.
        ensure!(
            (9..=33).contains(&on_vm3),
            "vm3 got {on_vm3} of 60 new flows: {answers:?}"
        );

        for (i, (c, before)) in conns.iter_mut().enumerate() {
            let after = c
                .get(&format!("/?t=c-after-{i}"))
                .with_context(|| format!("established connection {i} (was on {before})"))?;
            ensure!(
                after == *before,
                "established connection {i} moved from {} to {}",
                before.trim(),
                after.trim()
            );
        }
        Ok(())
    });
}

#[test]
fn a_stopped_vm_leaves_within_the_health_check_window() {
    scenario(&seed_config(FAST_HEALTH), |w| {
        let answers = w.spread(20, "d-before")?;
        ensure!(answers.len() == 2, "both VMs first: {answers:?}");

        let i = w
            .servers
            .iter()
            .position(|s| s.name == "vm2")
            .context("vm2")?;
        w.servers.remove(i).stop();
        let stopped = Instant::now();
        // Down after fall (2) failed probes 500 ms apart, plus up to one interval until the
        // first, the 300 ms timeout and the reconcile: ~2 s; allow 4 s.
        let window = Duration::from_secs(4);
        // Await the data path's own word that vm2 is down (its BE_F_UP flag, as inspect shows
        // it), not a run of answers from vm1: ten in a row from vm1 happen by chance 1 in 1024.
        let vm2_up = |w: &World| -> anyhow::Result<Vec<bool>> {
            let backends = w.inspect("backends")?;
            Ok(rows(&backends, "backends")?
                .iter()
                .filter(|b| b["addr"] == VM2_ADDR.to_string())
                .map(|b| b["up"].as_bool().unwrap_or(true))
                .collect())
        };
        loop {
            if vm2_up(w)? == [false] {
                break;
            }
            ensure!(
                stopped.elapsed() < window,
                "vm2 still up {:?} after its httpd stopped",
                stopped.elapsed()
            );
            thread::sleep(Duration::from_millis(50));
        }
        println!(
            "vm2 marked down and out of the table {:?} after its httpd stopped",
            stopped.elapsed()
        );
        let answers = w.spread(30, "d-after")?;
        ensure!(
            answers.keys().eq(["vm1"].iter()),
            "after removal: {answers:?}"
        );
        let backends = w.inspect("backends")?;
        let slots: Vec<u64> = rows(&backends, "backends")?
            .iter()
            .filter(|b| b["addr"] == VM2_ADDR.to_string())
            .map(|b| b["slots"].as_u64().unwrap_or(u64::MAX))
            .collect();
        ensure!(slots == [0], "vm2 still holds Maglev slots: {backends:#}");
        Ok(())
    });
}

/// wrk's totals: (requests, socket error counts, non-2xx/3xx responses).
fn parse_wrk(out: &str) -> anyhow::Result<(u64, Vec<u64>, u64)> {
    let mut requests = None;
    let mut socket_errors = Vec::new();
    let mut non_2xx = 0;
    for line in out.lines().map(str::trim) {
        if let Some((n, _)) = line.split_once(" requests in ") {
            requests = Some(n.trim().parse()?);
        } else if let Some(rest) = line.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 0"
            socket_errors = rest
                .split(',')
                .filter_map(|f| f.split_whitespace().nth(1)?.parse().ok())
                .collect();
        } else if let Some(n) = line.strip_prefix("Non-2xx or 3xx responses:") {
            non_2xx = n.trim().parse()?;
        }
    }
    Ok((
        requests.context("no request count")?,
        socket_errors,
        non_2xx,
    ))
}

#[test]
fn restarting_the_daemon_under_load_fails_no_request() {
    scenario(&seed_config(&[]), |w| {
        let wrk = w
            .lab
            .client
            .command("wrk")
            .args(["-t1", "-c4", "-d6s", "--timeout", "2s"])
            .arg(format!("http://{VIP}/"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning wrk (apt-get install wrk)")?;
        // The load is flowing once the VMs log it (at most 3 s).
        let deadline = Instant::now() + Duration::from_secs(3);
        let logged = || {
            w.servers
                .iter()
                .map(|s| s.access_lines().len())
                .sum::<usize>()
        };
        while logged() < 50 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        ensure!(logged() >= 50, "wrk's load never reached the VMs");

        // kill -9: no cleanup at all; the pinned link keeps the program attached meanwhile.
        let d = w.daemon()?;
        d.child.kill()?;
        d.child.wait()?;
        let restarted = Instant::now();
        w.start_daemon(vmlb_bin())?;
        println!("daemon restarted and ready in {:?}", restarted.elapsed());

        // wrk stops by itself after 6 s; its --timeout bounds every request.
        let out = wrk.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        println!("{text}");
        ensure!(
            out.status.success(),
            "wrk failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (requests, socket_errors, non_2xx) = parse_wrk(&text)?;
        ensure!(requests > 0, "wrk made no request");
        ensure!(
            socket_errors.iter().all(|&n| n == 0),
            "socket errors (connect, read, write, timeout): {socket_errors:?}"
        );
        ensure!(non_2xx == 0, "{non_2xx} non-2xx/3xx responses");
        // And the restarted daemon still serves new flows.
        w.spread(10, "e-after")?;
        Ok(())
    });
}

/// A daemon that finds a different program in the pinned link (an older version, here the lab's
/// XDP_PASS stand-in) swaps its own in place, against the same pinned maps; the next restart of
/// the same version adopts it unchanged.
#[test]
fn a_different_pinned_program_is_replaced_in_place() {
    use aya::programs::{
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
        Xdp,
    };
    scenario(&seed_config(&[]), |w| {
        // Put another program into the pinned link, as an older vmlb would have left it.
        let link_pin = w.dir.pins().join(NODE_DEV).join("link");
        let mut other = aya::Ebpf::load(vmlb_user::dataplane::loader::TOOLS_OBJ)?;
        let pass: &mut Xdp = other
            .program_mut("xdp_pass")
            .context("xdp_pass")?
            .try_into()?;
        pass.load()?;
        let link = XdpLink::try_from(FdLink::from(PinnedLink::from_pin(&link_pin)?))?;
        let id = pass.attach_to_link(link)?;
        drop(pass.take_link(id)?);
        drop(other);

        let d = w.daemon()?;
        d.child.kill()?;
        d.child.wait()?;
        w.start_daemon(vmlb_bin())?;
        ensure!(
            w.log().contains("replaced the pinned program"),
            "the daemon did not replace the foreign program:\n{}",
            w.log()
        );
        let answers = w.spread(10, "u")?;
        ensure!(
            answers.values().sum::<usize>() == 10,
            "after the upgrade: {answers:?}"
        );

        let d = w.daemon()?;
        d.child.kill()?;
        d.child.wait()?;
        w.start_daemon(vmlb_bin())?;
        ensure!(
            w.log().contains("adopted the pinned XDP program"),
            "the same version should adopt:\n{}",
            w.log()
        );
        Ok(())
    });
}

/// The array under `key` of an inspect JSON object.
fn rows<'a>(v: &'a Value, key: &str) -> anyhow::Result<&'a Vec<Value>> {
    v[key]
        .as_array()
        .with_context(|| format!("no {key:?} array in {v:#}"))
}

#[test]
fn inspect_agrees_with_the_configuration() {
    scenario(
        &service_entry(&["10.10.1.2", "10.10.1.3"], &[80, 443], &[]),
        |w| {
            // Traffic on both ports first, so both services have flows to show.
            for port in [80, 443] {
                let body = curl(&w.lab.client, &format!("http://{VIP}:{port}/"), 2)?;
                ensure!(body.starts_with("vm"), "port {port}: {body:?}");
            }

            let services = w.inspect("services")?;
            let mut seen = BTreeMap::new();
            for s in rows(&services, "services")? {
                ensure!(
                    s["vip"] == VIP.to_string()
                        && s["proto"] == "tcp"
                        && s["snat"] == NODE_ADDR.to_string()
                        && s["backends"] == 2,
                    "service row {s:#}"
                );
                let port = s["port"].as_u64().context("port")?;
                seen.insert(
                    port,
                    (
                        s["name"].clone(),
                        s["ring_size"].as_u64().context("ring_size")?,
                    ),
                );
            }
            ensure!(
                seen.keys().copied().eq([80, 443]),
                "services {:?}, want ports 80 and 443:\n{services:#}",
                seen.keys()
            );
            ensure!(
                seen[&80].0 == "vms/http" && seen[&443].0 == "vms/https",
                "names {seen:?}"
            );

            let backends = w.inspect("backends")?;
            let mut pairs = BTreeSet::new();
            let mut slots: BTreeMap<u64, u64> = BTreeMap::new();
            for b in rows(&backends, "backends")? {
                let addr: Ipv4Addr = b["addr"].as_str().context("addr")?.parse()?;
                let port = b["port"].as_u64().context("port")?;
                ensure!(b["up"] == true, "backend not up: {b:#}");
                pairs.insert((addr, port));
                *slots.entry(port).or_default() += b["slots"].as_u64().context("slots")?;
            }
            let want: BTreeSet<(Ipv4Addr, u64)> = [VM1_ADDR, VM2_ADDR]
                .into_iter()
                .flat_map(|a| [(a, 80), (a, 443)])
                .collect();
            ensure!(
                pairs == want,
                "backends {pairs:?}, want {want:?}:\n{backends:#}"
            );
            // Every slot of each Maglev table names one of its backends.
            for (port, (_, ring)) in &seen {
                ensure!(
                    slots.get(port) == Some(ring),
                    "port {port}: backends hold {:?} slots of {ring}",
                    slots.get(port)
                );
            }

            // Each VM's neighbour, resolved by the kernel for the daemon's managed entry (the
            // lab has no static one), with the VM's own MAC; the daemon reads it back every 2 s.
            let usable = ["reachable", "stale", "delay", "probe"];
            let deadline = Instant::now() + Duration::from_secs(10);
            let neighbours = loop {
                let v = w.inspect("neighbours")?;
                let all_resolved = [VM1_ADDR, VM2_ADDR].iter().all(|vm| {
                    rows(&v, "neighbours").is_ok_and(|r| {
                        r.iter().any(|n| {
                            n["backend"] == vm.to_string()
                                && n["next_hop"] == vm.to_string()
                                && n["route"] == "on-link"
                                && usable.iter().any(|s| n["state"] == *s)
                                && n["mac"] == vm_mac(*vm)
                                && n["managed"] == true
                        })
                    })
                });
                if all_resolved {
                    break v;
                }
                ensure!(
                    Instant::now() < deadline,
                    "the VMs' neighbours not shown resolved within 10 s:\n{v:#}"
                );
                thread::sleep(Duration::from_millis(200));
            };
            ensure!(
                rows(&neighbours, "neighbours")?.len() == 2,
                "one row per backend address: {neighbours:#}"
            );
            let table = w.inspect_raw(&["neighbours"])?;
            let line = table
                .lines()
                .find(|l| l.starts_with(&format!("{VM1_ADDR} ")))
                .with_context(|| format!("no row for {VM1_ADDR}:\n{table}"))?;
            ensure!(
                line.contains(&vm_mac(VM1_ADDR)) && line.ends_with("vmlb"),
                "{line}"
            );
            let backends = w.inspect("backends")?;
            for b in rows(&backends, "backends")? {
                ensure!(
                    b["neighbour"].as_str().is_some_and(|s| usable.contains(&s)),
                    "backend row without a usable neighbour: {b:#}"
                );
            }
            let metrics = w.metrics()?;
            for vm in [VM1_ADDR, VM2_ADDR] {
                let series = format!("vmlb_backend_neighbour_state{{backend=\"{vm}\",state=\"");
                let lines: Vec<&str> = metrics.lines().filter(|l| l.starts_with(&series)).collect();
                ensure!(
                    lines.len() == 1 && lines[0].ends_with("\"} 1"),
                    "one neighbour series per backend: {lines:?}"
                );
            }
            Ok(())
        },
    );
}

#[test]
fn a_malformed_edit_is_refused_and_the_old_config_keeps_serving() {
    scenario(&seed_config(&[]), |w| {
        let before = w.spread(20, "g-before")?;
        ensure!(before.len() == 2, "both VMs first: {before:?}");

        // Drops vm2 and adds an invalid address: applying any part of it would take vm2 away.
        let bad = service_entry(&["10.10.1.2", "10.10.1.300"], &[80], &[]);
        let line = 1 + bad
            .lines()
            .position(|l| l.contains("10.10.1.300"))
            .context("bad line")?;
        w.write_config(&bad)?;
        let want = format!("{}:{line}", w.dir.config().display());
        let deadline = Instant::now() + Duration::from_secs(10);
        while !w.log().contains(&want) {
            w.daemon_alive()?;
            ensure!(
                Instant::now() < deadline,
                "the daemon never reported {want} for the invalid address"
            );
            thread::sleep(Duration::from_millis(100));
        }
        w.daemon_alive()?;
        w.readyz().context("/readyz after the refused edit")?;

        let after = w.spread(30, "g-after")?;
        println!("after the refused edit: {after:?}");
        ensure!(
            after.keys().eq(["vm1", "vm2"].iter()),
            "the old config (vm1 and vm2) must keep serving: {after:?}"
        );
        ensure!(
            !w.server("vm2")?.access_lines().is_empty(),
            "vm2 logged nothing"
        );
        Ok(())
    });
}

/// The capabilities README's SECURITY section documents for `vmlb run` (and the DaemonSet adds):
/// CAP_NET_ADMIN (12), CAP_NET_RAW (13), CAP_PERFMON (38), CAP_BPF (39).
const DOCUMENTED_CAPS: &str = "+net_admin,+net_raw,+perfmon,+bpf";
const DOCUMENTED_CAP_MASK: u64 = 1 << 12 | 1 << 13 | 1 << 38 | 1 << 39;

/// The daemon under `setpriv` with a bounding set of only its documented capabilities: it
/// loads, attaches, pins, serves, reports its status, and keeps its directories private.
#[test]
fn the_daemon_runs_with_only_its_documented_capabilities() {
    let mut w = World::start_with(&seed_config(&[]), Some(DOCUMENTED_CAPS))
        .unwrap_or_else(|e| panic!("starting the lab: {e:#}"));
    let body = |w: &mut World| -> anyhow::Result<()> {
        let pid = w.daemon()?.child.id();
        let exe = fs::read_link(format!("/proc/{pid}/exe"))?;
        ensure!(exe.ends_with("vmlb"), "pid {pid} is {}", exe.display());
        let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
        let cap = |name: &str| -> anyhow::Result<u64> {
            let hex = status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .with_context(|| format!("{name} in /proc/{pid}/status"))?;
            Ok(u64::from_str_radix(hex.trim(), 16)?)
        };
        ensure!(
            cap("CapEff:")? == DOCUMENTED_CAP_MASK && cap("CapBnd:")? == DOCUMENTED_CAP_MASK,
            "effective {:x}, bounding {:x}; want {DOCUMENTED_CAP_MASK:x}",
            cap("CapEff:")?,
            cap("CapBnd:")?
        );
        let spread = w.spread(20, "caps")?;
        ensure!(spread.len() == 2, "both VMs: {spread:?}");
        use std::os::unix::fs::PermissionsExt as _;
        for dir in [
            w.dir.pins(),
            w.dir.pins().join(NODE_DEV),
            w.dir.path.join("run").join(NODE_DEV),
        ] {
            let mode = fs::metadata(&dir)?.permissions().mode() & 0o777;
            ensure!(mode == 0o700, "{} is {mode:o}", dir.display());
        }
        let st = w.inspect("status")?;
        ensure!(
            st["attach"] == "loaded_native"
                && st["xdp_mode"] == "native"
                && st["daemon"]["pid"] == pid
                && st["daemon"]["running"] == true
                && st["last_reload"]["result"] == "applied"
                && st["program"]["id"].as_u64().is_some_and(|id| id > 0),
            "inspect status: {st}"
        );
        Ok(())
    };
    if let Err(e) = body(&mut w) {
        eprintln!("{}", w.report());
        panic!("{e:#}");
    }
}

/// Hundreds of rapid edits, valid and invalid mixed, some written in place in two pieces, while
/// wrk runs: the daemon refuses every invalid state with file:line, never installs anything but
/// one of the two valid configurations, and no request fails.
#[test]
fn a_config_storm_applies_only_whole_valid_files_and_fails_no_request() {
    const EDITS: usize = 300;
    // Two valid configurations that keep both VMs serving (they differ in vm1's weight), an
    // invalid address, and a file cut inside a quoted address (what a reader sees halfway
    // through an in-place write).
    let valid = |w1: u32| {
        format!(
            "{}  - address: \"10.10.1.2\"\n    weight: {w1}\n  - address: \"10.10.1.3\"\n",
            service_entry(&[], &[80], &[])
        )
    };
    let (a, b) = (valid(1), valid(2));
    assert!(a.ends_with("\"10.10.1.3\"\n"), "{a}");
    let invalid = a.replace("10.10.1.3", "10.10.1.300");
    let bad_line = 1 + invalid
        .lines()
        .position(|l| l.contains("10.10.1.300"))
        .expect("bad line");
    let cut = a.rfind("10.10.1.3").expect("address") + 4;
    scenario(&a, |w| {
        use std::io::Write as _;
        let wrk = w
            .lab
            .client
            .command("wrk")
            .args(["-t1", "-c4", "-d25s", "--timeout", "2s"])
            .arg(format!("http://{VIP}/"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning wrk (apt-get install wrk)")?;
        let config = w.dir.config();
        // Removing the service, even for a moment (an empty file applied), gives it a new id.
        let service_id = |w: &World| -> anyhow::Result<Value> {
            Ok(rows(&w.inspect("services")?, "services")?
                .first()
                .context("no service")?["id"]
                .clone())
        };
        let first_id = service_id(w)?;
        let (mut valid_edits, mut invalid_edits, mut torn_edits) = (0, 0, 0);
        let mut installed = BTreeSet::new();
        let started = Instant::now();
        for i in 0..EDITS {
            match i % 10 {
                // In place, in two pieces: between them the file ends inside a quoted address.
                3 | 8 => {
                    let text = if i % 20 < 10 { &a } else { &b };
                    let mut f = fs::File::create(&config)?;
                    f.write_all(&text.as_bytes()[..cut])?;
                    f.sync_data()?;
                    thread::sleep(Duration::from_millis(3));
                    f.write_all(&text.as_bytes()[cut..])?;
                    torn_edits += 1;
                }
                5 => {
                    w.write_config(&invalid)?;
                    invalid_edits += 1;
                }
                n => {
                    w.write_config(if n % 2 == 0 { &a } else { &b })?;
                    valid_edits += 1;
                }
            }
            // 30-90 ms apart: faster than the reload debounce, so edits coalesce too.
            thread::sleep(Duration::from_millis(30 + (i as u64 * 37) % 60));
            if i % 25 == 0 {
                // What is installed is always one of the two valid configurations.
                let backends = w.inspect("backends")?;
                let set: Vec<(String, u64)> = rows(&backends, "backends")?
                    .iter()
                    .filter(|b| b["up"] == true)
                    .map(|b| {
                        (
                            b["addr"].as_str().unwrap_or("").to_string(),
                            b["weight"].as_u64().unwrap_or(0),
                        )
                    })
                    .collect();
                ensure!(
                    set == [("10.10.1.2".to_string(), 1), ("10.10.1.3".to_string(), 1)]
                        || set == [("10.10.1.2".to_string(), 2), ("10.10.1.3".to_string(), 1)],
                    "installed backends: {set:?}"
                );
                installed.insert(set);
                ensure!(
                    service_id(w)? == first_id,
                    "the service was removed and re-added"
                );
                w.daemon_alive()?;
            }
        }
        let storm = started.elapsed();
        // End on a known valid state and wait until it is the running one.
        w.write_config(&b)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let st = w.inspect("status")?;
            let done = st["last_reload"]["result"] == "applied"
                || st["last_reload"]["result"] == "unchanged";
            let weights: Vec<u64> = rows(&w.inspect("backends")?, "backends")?
                .iter()
                .map(|b| b["weight"].as_u64().unwrap_or(0))
                .collect();
            if done && weights == [2, 1] {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "the final config never ran: {st}"
            );
            thread::sleep(Duration::from_millis(100));
        }

        ensure!(
            service_id(w)? == first_id,
            "the service was removed and re-added"
        );
        let out = wrk.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success(),
            "wrk: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (requests, socket_errors, non_2xx) = parse_wrk(&text)?;
        let log = w.log();
        let want = format!("{}:{bad_line}: spec.endpoints[1].address", config.display());
        let refused_bad = log.lines().filter(|l| l.contains(&want)).count();
        let refused_torn = log
            .lines()
            .filter(|l| l.contains("invalid YAML") || l.contains("changed while it was read"))
            .count();
        let url = format!("http://{}/metrics", w.daemon()?.metrics);
        let metrics = w.lab.node.exec(&["curl", "-sf", "--max-time", "2", &url])?;
        let metrics = String::from_utf8_lossy(&metrics.stdout).to_string();
        let reloads: Vec<&str> = metrics
            .lines()
            .filter(|l| l.starts_with("vmlb_config_reloads_total"))
            .collect();
        println!(
            "config storm: {EDITS} edits in {storm:?} ({valid_edits} valid, {invalid_edits} invalid address, \
             {torn_edits} written in place in two pieces); reloads {reloads:?}; refusals logged with \
             the invalid address's file:line {refused_bad}, of torn/partial reads {refused_torn}; \
             wrk {requests} requests, socket errors {socket_errors:?}, non-2xx {non_2xx}; installed \
             states seen {installed:?}"
        );
        ensure!(refused_bad > 0, "no refusal named {want}:\n{log}");
        ensure!(requests > 0, "wrk made no request");
        ensure!(
            socket_errors.iter().all(|&n| n == 0) && non_2xx == 0,
            "failed requests: socket errors {socket_errors:?}, non-2xx {non_2xx}"
        );
        ensure!(
            reloads.iter().any(|l| l.contains("result=\"invalid\"")),
            "no invalid reload counted: {reloads:?}"
        );
        Ok(())
    });
}

/// A counter of `vmlb inspect stats -o json`.
fn counter(stats: &Value, name: &str) -> anyhow::Result<u64> {
    rows(stats, "counters")?
        .iter()
        .find(|c| c["name"] == name)
        .and_then(|c| c["value"].as_u64())
        .with_context(|| format!("counter {name} missing"))
}

/// The connection-rate limit of full NAT, raised with a SNAT pool: for two minutes, clients on
/// 20 addresses open 1200 new connections per second (600 per VM, above the ~480/s that one
/// SNAT address with the default 31,741 ports can sustain against the VMs' 60 s TIME_WAIT),
/// each closed by the server first, through a pool of four dedicated SNAT addresses using the
/// whole port range. No request may fail, and no VM may reject a SYN for a tuple still in
/// TIME_WAIT (PAWS): vmlb holds every closed SNAT tuple for 66 s before reusing it.
#[test]
fn sustained_close_load_from_many_clients_through_a_snat_pool() {
    const POOL: [&str; 4] = ["10.10.1.121", "10.10.1.122", "10.10.1.123", "10.10.1.124"];
    let pool = POOL.join(",");
    let config = seed_config(&[
        ("vmlb.io/snat-address", pool.as_str()),
        ("vmlb.io/snat-ports", "1024-65535"),
        ("vmlb.io/health-check", "none"),
    ]);
    let _alone = MACHINE.write().unwrap_or_else(|e| e.into_inner());
    run_scenario(&config, |w| {
        // The pool addresses are the node's (so the VMs resolve them), but the node's own
        // connections never use them as a source: that is what makes the whole port range safe.
        for a in POOL {
            w.lab
                .node
                .ip(&["addr", "add", &format!("{a}/32"), "dev", NODE_DEV])?;
        }
        let sources: Vec<Ipv4Addr> = (60..80).map(|d| Ipv4Addr::new(10, 10, 1, d)).collect();
        for s in &sources {
            w.lab
                .client
                .ip(&["addr", "add", &format!("{s}/24"), "dev", "eth0"])?;
        }
        let paws_before: Vec<_> = w
            .lab
            .vms
            .iter()
            .map(|vm| vmlb_tests::load::tcp_ext(&vm.ns))
            .collect::<anyhow::Result<_>>()?;
        let secs: u64 = std::env::var("VMLB_SUSTAINED_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(120);
        let load = vmlb_tests::load::CloseLoad {
            sources,
            to: std::net::SocketAddrV4::new(VIP, 80),
            rate: 1200,
            duration: Duration::from_secs(secs),
            workers: 24,
        };
        let r = vmlb_tests::load::run(&w.lab.client, &load)?;
        let stats = w.inspect("stats")?;
        let mut paws = BTreeMap::new();
        for (vm, before) in w.lab.vms.iter().zip(&paws_before) {
            let after = vmlb_tests::load::tcp_ext(&vm.ns)?;
            for k in ["PAWSTimewait", "TWRecycled", "PAWSActive", "PAWSEstab"] {
                let d = after.get(k).copied().unwrap_or(0) - before.get(k).copied().unwrap_or(0);
                paws.insert(format!("{}:{k}", vm.name), d);
            }
        }
        let exhausted = counter(&stats, "drop_snat_exhausted")?;
        let flows = w.inspect("flows")?;
        println!(
            "sustained close load: {} requests in {:.1?} ({:.0}/s), {} failed, answers {:?}, \
             slowest {:.1?}; drop_snat_exhausted {exhausted}, snat collisions {}, flows live at \
             the end {}; VM TCP counters {paws:?}",
            r.requests,
            r.elapsed,
            r.requests as f64 / r.elapsed.as_secs_f64(),
            r.failed,
            r.answers,
            r.max_latency,
            counter(&stats, "snat_port_collision")?,
            rows(&flows, "flows")?.len(),
        );
        ensure!(
            r.failed == 0,
            "{} of {} requests failed:\n{}",
            r.failed,
            r.requests,
            r.failures.join("\n")
        );
        ensure!(r.requests == 1200 * secs, "{} requests made", r.requests);
        for vm in ["vm1", "vm2"] {
            ensure!(
                r.answers.get(vm).copied().unwrap_or(0) > r.requests / 4,
                "{vm} served too little: {:?}",
                r.answers
            );
            ensure!(
                paws[&format!("{vm}:PAWSTimewait")] == 0,
                "{vm} rejected SYNs by PAWS in TIME_WAIT: {paws:?}"
            );
        }
        ensure!(
            exhausted == 0,
            "{exhausted} new flows ran out of SNAT tuples"
        );
        Ok(())
    });
}
